//! TLS for the end-to-end tests: a certificate authority generated in the test, the pairs
//! it issues (written to files as an operator would), and a real TLS client that trusts it
//! and reports what the handshake gave (the server's certificate, ALPN, TLS version).

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Version};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    ClientConfig, DigitallySignedStruct, ProtocolVersion, RootCertStore, SignatureScheme,
    SupportedProtocolVersion,
};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::harness::Reply;

/// Every connect and exchange is bounded by this.
const LIMIT: Duration = Duration::from_secs(10);

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A certificate authority made for one test.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    cert: rcgen::Certificate,
}

impl TestCa {
    /// A new CA named `name`.
    pub fn new(name: &str) -> TestCa {
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).expect("CA certificate");
        TestCa {
            issuer: Issuer::new(params, key),
            cert,
        }
    }

    /// A server certificate for `names` (DNS names, `*.` wildcards, or IP addresses) and
    /// its key; the chain file holds the leaf and this CA.
    pub fn issue(&self, names: &[&str]) -> CertKey {
        let key = KeyPair::generate().expect("leaf key");
        let names: Vec<String> = names.iter().map(|name| (*name).to_owned()).collect();
        let mut params = CertificateParams::new(names.clone()).expect("leaf params");
        params.distinguished_name.push(
            DnType::CommonName,
            names.first().cloned().unwrap_or_default(),
        );
        let leaf = params
            .signed_by(&key, &self.issuer)
            .expect("leaf certificate");
        CertKey {
            chain_pem: format!("{}{}", leaf.pem(), self.cert.pem()),
            key_pem: key.serialize_pem(),
            leaf_der: leaf.der().to_vec(),
        }
    }

    /// A client certificate whose subject is `CN={common_name}` (extended key usage
    /// clientAuth) and its key.
    pub fn issue_client(&self, common_name: &str) -> CertKey {
        let key = KeyPair::generate().expect("client key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("client params");
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let leaf = params
            .signed_by(&key, &self.issuer)
            .expect("client certificate");
        CertKey {
            chain_pem: format!("{}{}", leaf.pem(), self.cert.pem()),
            key_pem: key.serialize_pem(),
            leaf_der: leaf.der().to_vec(),
        }
    }

    /// This CA's certificate, PEM (what `--tls-client-ca` reads).
    pub fn pem(&self) -> String {
        self.cert.pem()
    }

    /// A client that trusts this CA, offers ALPN `http/1.1` and TLS 1.2 and 1.3.
    pub fn client(&self) -> TlsClient {
        let mut roots = RootCertStore::empty();
        roots.add(self.cert.der().clone()).expect("CA is a root");
        TlsClient {
            roots: Arc::new(roots),
            alpn: vec![b"http/1.1".to_vec()],
            versions: rustls::ALL_VERSIONS,
            identity: None,
        }
    }
}

/// A certificate chain and its private key, in PEM.
#[derive(Clone)]
pub struct CertKey {
    /// The leaf followed by the issuing CA.
    pub chain_pem: String,
    /// The leaf's private key.
    pub key_pem: String,
    /// The leaf certificate, to compare with what a client was shown.
    pub leaf_der: Vec<u8>,
}

impl CertKey {
    /// Writes `dir/{stem}.crt` and `dir/{stem}.key`, each replaced atomically (written
    /// aside, then renamed), and returns their paths.
    pub fn write(&self, dir: &Path, stem: &str) -> (PathBuf, PathBuf) {
        let cert = dir.join(format!("{stem}.crt"));
        let key = dir.join(format!("{stem}.key"));
        write_atomically(&cert, self.chain_pem.as_bytes());
        write_atomically(&key, self.key_pem.as_bytes());
        (cert, key)
    }
}

/// Replaces `path` with `content` by writing a sibling file and renaming it over.
pub fn write_atomically(path: &Path, content: &[u8]) {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, content).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

/// A TLS client with a fresh session per connection (no resumption, so every handshake
/// shows the server's certificate).
#[derive(Clone)]
pub struct TlsClient {
    roots: Arc<RootCertStore>,
    alpn: Vec<Vec<u8>>,
    versions: &'static [&'static SupportedProtocolVersion],
    identity: Option<CertKey>,
}

impl TlsClient {
    /// Offers these ALPN protocols, in order.
    pub fn alpn(mut self, protocols: &[&str]) -> TlsClient {
        self.alpn = protocols.iter().map(|p| p.as_bytes().to_vec()).collect();
        self
    }

    /// Presents `identity` when the server asks for a client certificate.
    pub fn identity(mut self, identity: &CertKey) -> TlsClient {
        self.identity = Some(identity.clone());
        self
    }

    /// Offers TLS 1.2 only.
    pub fn tls12_only(mut self) -> TlsClient {
        static TLS12: [&SupportedProtocolVersion; 1] = [&rustls::version::TLS12];
        self.versions = &TLS12;
        self
    }

    /// Connects to `addr` and completes a handshake for `server_name`: a DNS name is sent
    /// as SNI, an IP address sends none. The failure carries the certificate the server
    /// presented, if it got that far.
    pub async fn connect(
        &self,
        addr: SocketAddr,
        server_name: &str,
    ) -> Result<TlsConnection, HandshakeFailure> {
        let presented = Arc::new(Mutex::new(None));
        let verifier = WebPkiServerVerifier::builder_with_provider(self.roots.clone(), provider())
            .build()
            .expect("verifier");
        let builder = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(self.versions)
            .expect("versions")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Recording {
                inner: verifier,
                presented: presented.clone(),
            }));
        let mut config = match &self.identity {
            Some(identity) => {
                let chain = CertificateDer::pem_slice_iter(identity.chain_pem.as_bytes())
                    .collect::<Result<Vec<_>, _>>()
                    .expect("client chain");
                let key =
                    PrivateKeyDer::from_pem_slice(identity.key_pem.as_bytes()).expect("client key");
                builder
                    .with_client_auth_cert(chain, key)
                    .expect("client identity")
            }
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = self.alpn.clone();
        let name = match server_name.parse::<IpAddr>() {
            Ok(ip) => ServerName::IpAddress(ip.into()),
            Err(_) => ServerName::try_from(server_name.to_owned()).expect("valid DNS name"),
        };
        let handshake = async {
            let tcp = TcpStream::connect(addr).await?;
            TlsConnector::from(Arc::new(config))
                .connect(name, tcp)
                .await
        };
        let outcome = tokio::time::timeout(LIMIT, handshake)
            .await
            .unwrap_or_else(|_| Err(std::io::Error::other("handshake took over 10 s")));
        match outcome {
            Ok(stream) => Ok(TlsConnection { stream }),
            Err(error) => Err(HandshakeFailure {
                error,
                presented_leaf: presented.lock().expect("lock").take(),
            }),
        }
    }
}

/// A handshake that failed.
#[derive(Debug)]
pub struct HandshakeFailure {
    /// Why.
    pub error: std::io::Error,
    /// The leaf certificate the server presented, when it presented one.
    pub presented_leaf: Option<Vec<u8>>,
}

/// A completed TLS connection.
pub struct TlsConnection {
    stream: TlsStream<TcpStream>,
}

impl TlsConnection {
    /// The leaf certificate the server presented.
    pub fn peer_leaf(&self) -> Vec<u8> {
        let (_, session) = self.stream.get_ref();
        session
            .peer_certificates()
            .and_then(|chain| chain.first())
            .map(|leaf| leaf.to_vec())
            .unwrap_or_default()
    }

    /// The negotiated ALPN protocol ("" when none).
    pub fn alpn(&self) -> String {
        let (_, session) = self.stream.get_ref();
        String::from_utf8_lossy(session.alpn_protocol().unwrap_or_default()).into_owned()
    }

    /// The TLS stream itself, for tests that speak HTTP on it by hand.
    pub fn into_stream(self) -> TlsStream<TcpStream> {
        self.stream
    }

    /// The negotiated TLS version.
    pub fn protocol_version(&self) -> Option<ProtocolVersion> {
        self.stream.get_ref().1.protocol_version()
    }

    /// Sends one GET for `path` (Host `host`, extra `headers`) over this connection, as
    /// HTTP/2 when ALPN chose `h2`, else HTTP/1.1, and reads the whole response. Returns
    /// the reply and the HTTP version it came in; panics when the exchange fails.
    pub async fn get(self, host: &str, path: &str, headers: &[(&str, &str)]) -> (Reply, Version) {
        self.try_get(host, path, headers)
            .await
            .unwrap_or_else(|error| panic!("GET {path} over TLS: {error}"))
    }

    /// [`TlsConnection::get`], with a failed exchange (e.g. the server refusing the client's
    /// certificate after the handshake, as TLS 1.3 allows) returned as text.
    pub async fn try_get(
        self,
        host: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<(Reply, Version), String> {
        let h2 = self.alpn() == "h2";
        let io = TokioIo::new(self.stream);
        let mut request = if h2 {
            Request::get(format!("https://{host}{path}")).version(Version::HTTP_2)
        } else {
            Request::get(path).header(http::header::HOST, host)
        };
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request.body(Full::<Bytes>::default()).expect("request");
        let exchange = async move {
            let response = if h2 {
                let (mut sender, connection) =
                    hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                        .await
                        .map_err(|error| format!("h2 handshake: {error:?}"))?;
                tokio::spawn(connection);
                sender.send_request(request).await
            } else {
                let (mut sender, connection) = hyper::client::conn::http1::handshake(io)
                    .await
                    .map_err(|error| format!("http/1.1 handshake: {error:?}"))?;
                tokio::spawn(connection);
                sender.send_request(request).await
            }
            .map_err(|error| format!("no response: {error:?}"))?;
            let (parts, body) = response.into_parts();
            let body = body
                .collect()
                .await
                .map_err(|error| format!("body: {error:?}"))?
                .to_bytes();
            let reply = Reply {
                status: parts.status.as_u16(),
                headers: parts.headers,
                body: String::from_utf8_lossy(&body).into_owned(),
            };
            Ok((reply, parts.version))
        };
        tokio::time::timeout(LIMIT, exchange)
            .await
            .unwrap_or_else(|_| Err("no whole response within 10 s".to_owned()))
    }
}

/// Verifies as webpki does, and remembers the leaf the server presented (so a test can
/// tell which certificate a failed handshake was shown).
#[derive(Debug)]
struct Recording {
    inner: Arc<WebPkiServerVerifier>,
    presented: Arc<Mutex<Option<Vec<u8>>>>,
}

impl ServerCertVerifier for Recording {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        *self.presented.lock().expect("lock") = Some(end_entity.to_vec());
        self.inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// A TLS 1.1 ClientHello (record version 3.1, client_version 3.2, no supported_versions
/// extension), as an old client sends it.
pub fn tls11_client_hello() -> Vec<u8> {
    let mut body = vec![0x03, 0x02]; // client_version TLS 1.1
    body.extend([0x42; 32]); // random
    body.push(0); // no session id
    body.extend([0x00, 0x04, 0xc0, 0x13, 0x00, 0x2f]); // two TLS 1.1 cipher suites
    body.extend([0x01, 0x00]); // null compression only
    let mut handshake = vec![0x01]; // ClientHello
    handshake.extend(&(body.len() as u32).to_be_bytes()[1..]);
    handshake.extend(body);
    let mut record = vec![0x16, 0x03, 0x01]; // handshake record
    record.extend((handshake.len() as u16).to_be_bytes());
    record.extend(handshake);
    record
}

//! The rustls server settings and the handshake under a timeout.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use middleware::ClientCertificate;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::server::TlsStream;
use x509_cert::der::Decode;

use super::certs::provider;
use super::{CertStore, TlsError, TlsMetrics};

/// ALPN protocols offered, in preference order.
const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// A handshake that did not complete.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The client did not finish within the handshake timeout.
    #[error("tls handshake not finished within {0:?}")]
    Timeout(Duration),
    /// The handshake failed (bad client hello, no shared version or cipher, reset).
    #[error("tls handshake failed: {0}")]
    Failed(#[source] std::io::Error),
}

/// Accepts TLS on a connection: TLS 1.2 and 1.3, ALPN `h2` and `http/1.1`, the certificate
/// picked by the [`CertStore`], and, with a client CA, a client certificate required and
/// verified against it. Cheap to clone.
#[derive(Clone)]
pub struct TlsAcceptor {
    acceptor: tokio_rustls::TlsAcceptor,
    handshake_timeout: Duration,
    metrics: TlsMetrics,
}

impl TlsAcceptor {
    /// An acceptor serving `store`'s certificates; a client that has not finished its
    /// handshake after `handshake_timeout` is dropped. With `client_ca` (a PEM file of one or
    /// more CA certificates), every client must present a certificate issued by one of them.
    pub fn new(
        store: &CertStore,
        client_ca: Option<&Path>,
        handshake_timeout: Duration,
        metrics: TlsMetrics,
    ) -> Result<Self, TlsError> {
        let builder = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|err| TlsError::Config(err.to_string()))?;
        let builder = match client_ca {
            Some(path) => builder.with_client_cert_verifier(client_verifier(path)?),
            None => builder.with_no_client_auth(),
        };
        let mut config = builder.with_cert_resolver(Arc::new(store.clone()));
        config.alpn_protocols = ALPN.iter().map(|protocol| protocol.to_vec()).collect();
        Ok(Self {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
            handshake_timeout,
            metrics,
        })
    }

    /// Runs the server side of the handshake on `io`, bounded by the handshake timeout;
    /// failures are counted in `go_gateway_tls_handshake_failures_total`.
    pub async fn accept<IO>(&self, io: IO) -> Result<TlsStream<IO>, HandshakeError>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        match tokio::time::timeout(self.handshake_timeout, self.acceptor.accept(io)).await {
            Ok(Ok(stream)) => Ok(stream),
            Ok(Err(err)) => {
                self.metrics.handshake_errors.inc();
                Err(HandshakeError::Failed(err))
            }
            Err(_elapsed) => {
                self.metrics.handshake_timeouts.inc();
                Err(HandshakeError::Timeout(self.handshake_timeout))
            }
        }
    }
}

/// The verified certificate the client presented on `stream`, if it presented one.
pub fn client_certificate<IO>(stream: &TlsStream<IO>) -> Option<Arc<ClientCertificate>> {
    let leaf = stream.get_ref().1.peer_certificates()?.first()?;
    // rustls has verified the chain, so the leaf is a certificate; an unprintable subject
    // is shown empty rather than dropping the connection.
    let subject = x509_cert::Certificate::from_der(leaf.as_ref())
        .map(|cert| cert.tbs_certificate.subject.to_string())
        .unwrap_or_default();
    Some(Arc::new(ClientCertificate {
        subject,
        der: bytes::Bytes::copy_from_slice(leaf.as_ref()),
    }))
}

/// Requires a client certificate that chains to one of the CA certificates in `path`.
fn client_verifier(
    path: &Path,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, TlsError> {
    let error = |message: String| TlsError::ClientCa {
        path: path.to_owned(),
        message,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|err| error(err.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| error(format!("bad PEM: {err}")))?;
    if certs.is_empty() {
        return Err(error(
            "no certificate found (expected a PEM \"BEGIN CERTIFICATE\" block)".to_owned(),
        ));
    }
    let mut roots = RootCertStore::empty();
    for cert in certs {
        roots
            .add(cert)
            .map_err(|err| error(format!("not a usable CA certificate: {err}")))?;
    }
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(|err| error(err.to_string()))
}

//! Reading one certificate pair from its files: PEM chain, PEM key, the key checked against
//! the leaf, and the leaf's SAN DNS names.

use std::sync::{Arc, OnceLock};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use sha2::{Digest, Sha256};
use x509_cert::der::Decode;
use x509_cert::ext::pkix::SubjectAltName;
use x509_cert::ext::pkix::name::GeneralName;

use super::{CertPair, TlsError};

/// The crypto provider of every TLS listener (ring, as the rest of the gateway).
pub(crate) fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

/// The bytes of a pair's two files, read once so the hash and the parse see the same content.
#[derive(PartialEq, Eq)]
pub(crate) struct PairFiles {
    cert: Vec<u8>,
    key: Vec<u8>,
}

impl PairFiles {
    /// Reads both files.
    pub(crate) fn read(pair: &CertPair) -> Result<Self, TlsError> {
        let cert = std::fs::read(&pair.cert).map_err(|err| TlsError::Cert {
            path: pair.cert.clone(),
            message: err.to_string(),
        })?;
        let key = std::fs::read(&pair.key).map_err(|err| TlsError::Key {
            path: pair.key.clone(),
            message: err.to_string(),
        })?;
        Ok(Self { cert, key })
    }

    /// sha256 over both files (each prefixed by its length, so bytes cannot move across).
    pub(crate) fn sha256(&self) -> [u8; 32] {
        let mut hasher = Sha256::new();
        for part in [&self.cert, &self.key] {
            hasher.update((part.len() as u64).to_le_bytes());
            hasher.update(part);
        }
        hasher.finalize().into()
    }
}

/// A pair ready to serve.
pub(crate) struct LoadedPair {
    /// The chain and signing key handed to rustls.
    pub(crate) certified: Arc<CertifiedKey>,
    /// SAN DNS names of the leaf, lower case, without a trailing dot (`*.` kept).
    pub(crate) names: Vec<String>,
    /// [`PairFiles::sha256`] of what it was loaded from.
    pub(crate) files_sha256: [u8; 32],
    /// Hex sha256 of the leaf certificate (what `openssl x509 -fingerprint -sha256` shows).
    pub(crate) fingerprint: String,
    /// The leaf's notAfter, as text.
    pub(crate) not_after: String,
}

impl LoadedPair {
    /// Parses `files` (read from `pair`): a non-empty chain, a key the provider can use and
    /// that matches the leaf, and the leaf's SAN names.
    pub(crate) fn load(pair: &CertPair, files: &PairFiles) -> Result<Self, TlsError> {
        let cert_error = |message: String| TlsError::Cert {
            path: pair.cert.clone(),
            message,
        };
        let chain = CertificateDer::pem_slice_iter(&files.cert)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|err| cert_error(format!("bad PEM: {err}")))?;
        let Some(leaf) = chain.first() else {
            return Err(cert_error(
                "no certificate found (expected a PEM \"BEGIN CERTIFICATE\" block)".to_owned(),
            ));
        };
        let parsed = x509_cert::Certificate::from_der(leaf.as_ref())
            .map_err(|err| cert_error(format!("not an X.509 certificate: {err}")))?;
        let names = san_dns_names(&parsed)
            .map_err(|err| cert_error(format!("unreadable subjectAltName: {err}")))?;
        let not_after = parsed.tbs_certificate.validity.not_after.to_string();
        let fingerprint = hex::encode(Sha256::digest(leaf.as_ref()));

        let key_error = |message: String| TlsError::Key {
            path: pair.key.clone(),
            message,
        };
        let key = PrivateKeyDer::from_pem_slice(&files.key).map_err(|err| match err {
            pem::Error::NoItemsFound => key_error(
                "no private key found (expected a PEM \"BEGIN PRIVATE KEY\", \"BEGIN RSA PRIVATE KEY\" or \"BEGIN EC PRIVATE KEY\" block)"
                    .to_owned(),
            ),
            other => key_error(format!("bad PEM: {other}")),
        })?;
        let signing_key = provider()
            .key_provider
            .load_private_key(key)
            .map_err(|err| key_error(format!("unusable private key: {err}")))?;
        let certified = CertifiedKey::new(chain, signing_key);
        match certified.keys_match() {
            // A key type whose public half the provider cannot derive cannot be checked here;
            // rustls would then fail its handshakes, as it would any other server's.
            Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
            Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
                return Err(TlsError::Mismatch {
                    cert: pair.cert.clone(),
                    key: pair.key.clone(),
                });
            }
            Err(other) => return Err(cert_error(format!("unusable certificate: {other}"))),
        }
        Ok(Self {
            certified: Arc::new(certified),
            names,
            files_sha256: files.sha256(),
            fingerprint,
            not_after,
        })
    }
}

/// The DNS names of the certificate's subjectAltName extension (none without one).
fn san_dns_names(cert: &x509_cert::Certificate) -> Result<Vec<String>, x509_cert::der::Error> {
    let Some((_critical, san)) = cert.tbs_certificate.get::<SubjectAltName>()? else {
        return Ok(Vec::new());
    };
    Ok(san
        .0
        .iter()
        .filter_map(|name| match name {
            GeneralName::DnsName(dns) => Some(dns.as_str()),
            _ => None,
        })
        .map(|name| name.trim_end_matches('.').to_ascii_lowercase())
        .filter(|name| !name.is_empty())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair_in(dir: &tempfile::TempDir, cert: &str, key: &str) -> CertPair {
        let pair = CertPair {
            cert: dir.path().join("cert.pem"),
            key: dir.path().join("key.pem"),
        };
        std::fs::write(&pair.cert, cert).expect("write cert");
        std::fs::write(&pair.key, key).expect("write key");
        pair
    }

    fn self_signed(names: &[&str]) -> (String, String) {
        let names: Vec<String> = names.iter().map(|name| (*name).to_owned()).collect();
        let generated = rcgen::generate_simple_self_signed(names).expect("generate");
        (generated.cert.pem(), generated.signing_key.serialize_pem())
    }

    fn load(pair: &CertPair) -> Result<LoadedPair, TlsError> {
        LoadedPair::load(pair, &PairFiles::read(pair)?)
    }

    #[test]
    fn a_pair_loads_with_its_san_names() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (cert, key) = self_signed(&["A.test", "*.b.test", "c.test."]);
        let loaded = load(&pair_in(&dir, &cert, &key)).expect("loads");
        assert_eq!(loaded.names, ["a.test", "*.b.test", "c.test"]);
        assert_eq!(loaded.fingerprint.len(), 64);
        assert!(!loaded.not_after.is_empty());
    }

    #[test]
    fn a_key_of_another_certificate_is_a_mismatch() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (cert, _) = self_signed(&["a.test"]);
        let (_, other_key) = self_signed(&["a.test"]);
        let pair = pair_in(&dir, &cert, &other_key);
        assert_eq!(
            load(&pair).err(),
            Some(TlsError::Mismatch {
                cert: pair.cert.clone(),
                key: pair.key.clone()
            })
        );
    }

    #[test]
    fn broken_files_name_the_file_and_the_problem() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (cert, key) = self_signed(&["a.test"]);
        let cases = [
            ("", key.as_str(), "no certificate found"),
            ("not pem at all", key.as_str(), "no certificate found"),
            (
                "-----BEGIN CERTIFICATE-----\nMIIB\n",
                key.as_str(),
                "bad PEM",
            ),
            (cert.as_str(), "", "no private key found"),
            (cert.as_str(), &key[..key.len() / 2], "bad PEM"),
        ];
        for (cert_text, key_text, want) in cases {
            let pair = pair_in(&dir, cert_text, key_text);
            let error = load(&pair).err().expect("refused").to_string();
            assert!(error.contains(want), "{error:?} should say {want:?}");
            assert!(!error.contains('\n'), "one line: {error:?}");
            let file = if error.starts_with("certificate") {
                &pair.cert
            } else {
                &pair.key
            };
            assert!(error.contains(&file.display().to_string()), "{error:?}");
        }
    }

    #[test]
    fn a_missing_file_is_named() {
        let pair = CertPair {
            cert: "/nonexistent/cert.pem".into(),
            key: "/nonexistent/key.pem".into(),
        };
        let error = load(&pair).err().expect("refused").to_string();
        assert!(
            error.starts_with("certificate /nonexistent/cert.pem: "),
            "{error}"
        );
    }
}

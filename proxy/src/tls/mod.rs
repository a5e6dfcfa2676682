//! HTTPS listeners: the served certificates, the rustls settings, the handshake.
//!
//! - [`CertStore`] holds one certificate chain and key per `--tls-cert`/`--tls-key` pair and
//!   picks one per handshake by SNI: a SAN DNS name equal to the server name first, then a
//!   `*.` wildcard SAN covering it (one label, as RFC 6125 says), else the first pair; a
//!   client without SNI gets the first pair too. The common name is not consulted, as Go's
//!   `crypto/tls` (which Kratos serves with) and browsers no longer do.
//! - [`CertStore::watch`] re-hashes the files every reload interval; a pair whose files
//!   changed (and stayed unchanged for a settle delay, so a half-written file is not read)
//!   is loaded and swapped in for new handshakes. A pair that fails to load (bad PEM, a key
//!   that does not match, a missing file) is logged once and counted in
//!   `go_gateway_tls_certificate_reloads_total{result="failed"}`; the previous pair keeps
//!   serving.
//! - [`TlsAcceptor`] runs the handshake under a timeout: TLS 1.2 and 1.3 only, ALPN `h2` and
//!   `http/1.1`. What follows the handshake is the same HTTP serving as on plain listeners.
//! - With a client CA (`--tls-client-ca`), clients must present a certificate issued by it
//!   (mTLS); the verified certificate ([`middleware::ClientCertificate`], its subject and
//!   DER) rides on every request of the connection and reaches middlewares through
//!   `RequestOptions::client_certificate`.
//!
//! The SAN names are read with `x509-cert` (RustCrypto's X.509 model). rustls-webpki's
//! `EndEntityCert` only answers "is this certificate valid for name N", which cannot tell
//! an exact match from a wildcard one (the exact match must win even when a wildcard pair
//! comes first); `x509-parser` would also do, but pulls in a second DER stack (nom,
//! asn1-rs, der-parser) where `x509-cert` reuses the `der`/`spki` crates already in the
//! build. PEM is parsed with `rustls-pki-types` (the maintained successor of
//! rustls-pemfile), from the same bytes that were hashed, so what is hashed is what is
//! served.

mod acceptor;
mod certs;
mod reload;
mod resolver;

use std::path::PathBuf;

pub use acceptor::{HandshakeError, TlsAcceptor, client_certificate};
pub use resolver::CertStore;

/// One served certificate: a PEM chain (leaf first) and its PEM private key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertPair {
    /// The certificate chain file.
    pub cert: PathBuf,
    /// The private key file (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// A certificate pair or client CA that could not be loaded; the text is one line naming
/// the file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TlsError {
    /// No pair was given.
    #[error("no certificate pair given")]
    NoPair,
    /// The certificate file could not be read or holds no usable certificate.
    #[error("certificate {path}: {message}")]
    Cert {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// The key file could not be read or holds no usable key.
    #[error("key {path}: {message}")]
    Key {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// The key is not the one the certificate was issued for.
    #[error("key {key} does not match the certificate in {cert}")]
    Mismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
    },
    /// The client CA file could not be read or holds no usable CA certificate.
    #[error("client CA {path}: {message}")]
    ClientCa {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// rustls refused the settings.
    #[error("tls settings: {0}")]
    Config(String),
}

/// TLS counters, registered once in the gateway's registry.
#[derive(Clone)]
pub struct TlsMetrics {
    reloads_applied: prometheus::IntCounter,
    reloads_failed: prometheus::IntCounter,
    handshake_timeouts: prometheus::IntCounter,
    handshake_errors: prometheus::IntCounter,
}

impl TlsMetrics {
    /// Registers `go_gateway_tls_certificate_reloads_total{result="applied"|"failed"}` and
    /// `go_gateway_tls_handshake_failures_total{reason="timeout"|"error"}` in `registry`.
    pub fn register(registry: &prometheus::Registry) -> prometheus::Result<Self> {
        let reloads = prometheus::IntCounterVec::new(
            prometheus::Opts::new(
                "go_gateway_tls_certificate_reloads_total",
                "Certificate pairs whose files changed, by whether the new pair was applied.",
            ),
            &["result"],
        )?;
        let handshakes = prometheus::IntCounterVec::new(
            prometheus::Opts::new(
                "go_gateway_tls_handshake_failures_total",
                "TLS handshakes that did not complete, by reason.",
            ),
            &["reason"],
        )?;
        registry.register(Box::new(reloads.clone()))?;
        registry.register(Box::new(handshakes.clone()))?;
        Ok(Self {
            reloads_applied: reloads.with_label_values(&["applied"]),
            reloads_failed: reloads.with_label_values(&["failed"]),
            handshake_timeouts: handshakes.with_label_values(&["timeout"]),
            handshake_errors: handshakes.with_label_values(&["error"]),
        })
    }

    /// Counters that are not exported anywhere (for tests and embedders without metrics).
    pub fn unregistered() -> Self {
        Self::register(&prometheus::Registry::new()).expect("fresh registry")
    }
}

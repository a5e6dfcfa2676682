//! The served certificates and the SNI rule that picks one per handshake.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use super::certs::{LoadedPair, PairFiles};
use super::{CertPair, TlsError};

/// The certificate pairs of the HTTPS listeners, swapped as a whole when a file changes
/// (the handshake path takes no lock). Cheap to clone; clones share the pairs.
#[derive(Clone)]
pub struct CertStore {
    pub(super) inner: Arc<StoreInner>,
}

pub(super) struct StoreInner {
    /// The files, in flag order (the first pair is the default).
    pub(super) pairs: Vec<CertPair>,
    pub(super) current: ArcSwap<CertSet>,
}

/// The loaded pairs and their SAN names, indexed for the SNI rule.
pub(super) struct CertSet {
    pub(super) pairs: Vec<Arc<LoadedPair>>,
    /// Exact SAN name -> first pair that lists it.
    exact: HashMap<String, usize>,
    /// `*.parent` SAN -> first pair that lists it, keyed by `parent`.
    wildcard: HashMap<String, usize>,
}

impl CertSet {
    /// Indexes `pairs` (not empty) in order: on a name two pairs share, the first wins.
    pub(super) fn new(pairs: Vec<Arc<LoadedPair>>) -> Self {
        let mut exact = HashMap::new();
        let mut wildcard = HashMap::new();
        for (index, pair) in pairs.iter().enumerate() {
            for name in &pair.names {
                match name.strip_prefix("*.") {
                    Some(parent) => wildcard.entry(parent.to_owned()).or_insert(index),
                    None => exact.entry(name.clone()).or_insert(index),
                };
            }
        }
        Self {
            pairs,
            exact,
            wildcard,
        }
    }

    /// The pair for `server_name`: an exact SAN, then a wildcard SAN one label up, else the
    /// first pair.
    fn pick(&self, server_name: Option<&str>) -> &Arc<LoadedPair> {
        let index = server_name.and_then(|name| self.lookup(name)).unwrap_or(0);
        &self.pairs[index]
    }

    fn lookup(&self, name: &str) -> Option<usize> {
        let name = name.strip_suffix('.').unwrap_or(name);
        let lowered;
        let name = if name.bytes().any(|byte| byte.is_ascii_uppercase()) {
            lowered = name.to_ascii_lowercase();
            lowered.as_str()
        } else {
            name
        };
        if let Some(&index) = self.exact.get(name) {
            return Some(index);
        }
        // A wildcard covers exactly one label: `x.b.test` under `*.b.test`, not `b.test`
        // nor `y.x.b.test`.
        let (label, parent) = name.split_once('.')?;
        if label.is_empty() {
            return None;
        }
        self.wildcard.get(parent).copied()
    }
}

impl CertStore {
    /// Loads every pair (in order; the first is the default). Fails on the first pair that
    /// cannot be read, parsed, or whose key does not match its certificate.
    pub fn load(pairs: Vec<CertPair>) -> Result<Self, TlsError> {
        if pairs.is_empty() {
            return Err(TlsError::NoPair);
        }
        let loaded = pairs
            .iter()
            .map(|pair| Ok(Arc::new(LoadedPair::load(pair, &PairFiles::read(pair)?)?)))
            .collect::<Result<Vec<_>, TlsError>>()?;
        // Logged once every pair is good, so a failed start prints only its error.
        for (pair, pair_loaded) in pairs.iter().zip(&loaded) {
            if pair_loaded.names.is_empty() {
                tracing::warn!(
                    cert = %pair.cert.display(),
                    "certificate has no subjectAltName DNS names: SNI never selects it"
                );
            }
            tracing::info!(
                cert = %pair.cert.display(),
                names = ?pair_loaded.names,
                fingerprint = %pair_loaded.fingerprint,
                not_after = %pair_loaded.not_after,
                "tls certificate loaded"
            );
        }
        Ok(Self {
            inner: Arc::new(StoreInner {
                pairs,
                current: ArcSwap::from_pointee(CertSet::new(loaded)),
            }),
        })
    }

    /// The SAN names of each pair now served, in flag order.
    pub fn names(&self) -> Vec<Vec<String>> {
        let set = self.inner.current.load();
        set.pairs.iter().map(|pair| pair.names.clone()).collect()
    }

    /// The hex sha256 fingerprint of each leaf certificate now served, in flag order.
    pub fn fingerprints(&self) -> Vec<String> {
        let set = self.inner.current.load();
        set.pairs
            .iter()
            .map(|pair| pair.fingerprint.clone())
            .collect()
    }

    /// The chain and key a handshake naming `server_name` gets.
    pub(super) fn pick(&self, server_name: Option<&str>) -> Arc<CertifiedKey> {
        self.inner
            .current
            .load()
            .pick(server_name)
            .certified
            .clone()
    }
}

impl std::fmt::Debug for CertStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertStore")
            .field("pairs", &self.inner.pairs)
            .field("names", &self.names())
            .finish()
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.pick(client_hello.server_name()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A set whose pairs carry only names (the key is a throwaway self-signed one).
    fn set(names: &[&[&str]]) -> CertSet {
        let generated =
            rcgen::generate_simple_self_signed(vec!["unused.test".to_owned()]).expect("generate");
        let key =
            rustls::pki_types::PrivateKeyDer::Pkcs8(generated.signing_key.serialize_der().into());
        let signing_key = super::super::certs::provider()
            .key_provider
            .load_private_key(key)
            .expect("key");
        let pairs = names
            .iter()
            .map(|names| {
                Arc::new(LoadedPair {
                    certified: Arc::new(CertifiedKey::new(
                        vec![generated.cert.der().clone()],
                        signing_key.clone(),
                    )),
                    names: names.iter().map(|name| (*name).to_owned()).collect(),
                    files_sha256: [0; 32],
                    fingerprint: names.join(","),
                    not_after: String::new(),
                })
            })
            .collect();
        CertSet::new(pairs)
    }

    fn picked(set: &CertSet, name: Option<&str>) -> String {
        set.pick(name).fingerprint.clone()
    }

    #[test]
    fn exact_then_wildcard_then_the_first_pair() {
        let set = set(&[&["default.test"], &["*.b.test"], &["a.test", "x.b.test"]]);
        assert_eq!(picked(&set, Some("a.test")), "a.test,x.b.test");
        // the exact name wins over a wildcard listed earlier
        assert_eq!(picked(&set, Some("x.b.test")), "a.test,x.b.test");
        assert_eq!(picked(&set, Some("y.b.test")), "*.b.test");
        assert_eq!(picked(&set, Some("unknown.test")), "default.test");
        assert_eq!(picked(&set, None), "default.test");
    }

    #[test]
    fn a_wildcard_covers_one_label() {
        let set = set(&[&["default.test"], &["*.b.test"]]);
        assert_eq!(picked(&set, Some("b.test")), "default.test");
        assert_eq!(picked(&set, Some("y.x.b.test")), "default.test");
        assert_eq!(picked(&set, Some(".b.test")), "default.test");
    }

    #[test]
    fn names_match_case_insensitively_and_ignore_a_trailing_dot() {
        let set = set(&[&["default.test"], &["a.test", "*.b.test"]]);
        assert_eq!(picked(&set, Some("A.Test")), "a.test,*.b.test");
        assert_eq!(picked(&set, Some("a.test.")), "a.test,*.b.test");
        assert_eq!(picked(&set, Some("X.B.TEST")), "a.test,*.b.test");
    }

    #[test]
    fn on_a_shared_name_the_first_pair_wins() {
        let set = set(&[
            &["default.test"],
            &["a.test"],
            &["a.test", "*.b.test"],
            &["*.b.test"],
        ]);
        assert_eq!(picked(&set, Some("a.test")), "a.test");
        assert_eq!(picked(&set, Some("x.b.test")), "a.test,*.b.test");
    }
}

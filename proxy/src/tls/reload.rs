//! Hot rotation: the pairs' files are re-hashed every interval and a changed pair is
//! swapped in for new handshakes; a broken one leaves the previous pair serving.

use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use super::TlsMetrics;
use super::certs::{LoadedPair, PairFiles};
use super::resolver::{CertSet, CertStore};

/// How long changed files must stay unchanged before they are read as a new pair: a
/// rotation that writes the certificate and then the key is caught whole, not half.
const SETTLE_DELAY: Duration = Duration::from_millis(50);

/// What the watch remembers between polls: per pair, the content (or read error) that last
/// failed, so a broken pair is reported once rather than every tick.
pub(super) struct WatchState {
    rejected: Vec<Option<[u8; 32]>>,
    settle: Duration,
}

impl WatchState {
    pub(super) fn new(pairs: usize, settle: Duration) -> Self {
        Self {
            rejected: vec![None; pairs],
            settle,
        }
    }
}

impl CertStore {
    /// Re-hashes the files every `interval` until `shutdown`; see the module doc. Reads run
    /// on a blocking thread.
    pub fn watch(
        &self,
        interval: Duration,
        shutdown: CancellationToken,
        metrics: TlsMetrics,
    ) -> tokio::task::JoinHandle<()> {
        let store = self.clone();
        tokio::spawn(async move {
            let pairs = store.inner.pairs.len();
            let mut state = WatchState::new(pairs, SETTLE_DELAY);
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(interval) => {}
                }
                let (poller, metrics) = (store.clone(), metrics.clone());
                let polled = tokio::task::spawn_blocking(move || {
                    let mut state = state;
                    poller.poll(&mut state, &metrics);
                    state
                });
                state = match polled.await {
                    Ok(state) => state,
                    Err(error) => {
                        tracing::error!(%error, "tls certificate poll failed");
                        WatchState::new(pairs, SETTLE_DELAY)
                    }
                };
            }
            tracing::debug!("tls certificate watch stopped");
        })
    }

    /// One polling step over every pair; swaps in a new set when a pair was replaced.
    /// Returns whether it did.
    pub(super) fn poll(&self, state: &mut WatchState, metrics: &TlsMetrics) -> bool {
        let current = self.inner.current.load_full();
        let mut pairs = current.pairs.clone();
        let mut replaced = false;
        for (index, paths) in self.inner.pairs.iter().enumerate() {
            let files = match PairFiles::read(paths) {
                Ok(files) => files,
                Err(error) => {
                    let key: [u8; 32] = Sha256::digest(error.to_string()).into();
                    report_failure(state, index, key, &error, metrics);
                    continue;
                }
            };
            let sha256 = files.sha256();
            if sha256 == pairs[index].files_sha256 {
                // Back to what is served: a later break of the same kind is news again.
                state.rejected[index] = None;
                continue;
            }
            if state.rejected[index] == Some(sha256) {
                continue;
            }
            std::thread::sleep(state.settle);
            match PairFiles::read(paths) {
                Ok(again) if again == files => {}
                _ => {
                    tracing::debug!(
                        cert = %paths.cert.display(),
                        "tls certificate files are being written; waiting for them to settle"
                    );
                    continue;
                }
            }
            match LoadedPair::load(paths, &files) {
                Ok(loaded) => {
                    tracing::info!(
                        cert = %paths.cert.display(),
                        names = ?loaded.names,
                        fingerprint = %loaded.fingerprint,
                        not_after = %loaded.not_after,
                        "tls certificate reloaded; new handshakes get it"
                    );
                    metrics.reloads_applied.inc();
                    state.rejected[index] = None;
                    pairs[index] = Arc::new(loaded);
                    replaced = true;
                }
                Err(error) => report_failure(state, index, sha256, &error, metrics),
            }
        }
        if replaced {
            self.inner.current.store(Arc::new(CertSet::new(pairs)));
        }
        replaced
    }
}

fn report_failure(
    state: &mut WatchState,
    index: usize,
    key: [u8; 32],
    error: &super::TlsError,
    metrics: &TlsMetrics,
) {
    if state.rejected[index] == Some(key) {
        return;
    }
    state.rejected[index] = Some(key);
    metrics.reloads_failed.inc();
    tracing::error!(%error, "tls certificate not reloaded; the previous one keeps serving");
}

#[cfg(test)]
mod tests {
    use super::super::CertPair;
    use super::*;

    struct Files {
        dir: tempfile::TempDir,
        pairs: Vec<CertPair>,
    }

    impl Files {
        fn new(count: usize) -> Self {
            let dir = tempfile::tempdir().expect("tempdir");
            let pairs = (0..count)
                .map(|index| CertPair {
                    cert: dir.path().join(format!("cert{index}.pem")),
                    key: dir.path().join(format!("key{index}.pem")),
                })
                .collect();
            Self { dir, pairs }
        }

        fn write(&self, index: usize, name: &str) {
            let generated =
                rcgen::generate_simple_self_signed(vec![name.to_owned()]).expect("generate");
            self.write_raw(
                index,
                &generated.cert.pem(),
                &generated.signing_key.serialize_pem(),
            );
        }

        fn write_raw(&self, index: usize, cert: &str, key: &str) {
            let tmp = self.dir.path().join("tmp");
            std::fs::write(&tmp, cert).expect("write");
            std::fs::rename(&tmp, &self.pairs[index].cert).expect("rename");
            std::fs::write(&tmp, key).expect("write");
            std::fs::rename(&tmp, &self.pairs[index].key).expect("rename");
        }
    }

    fn reloads(metrics: &TlsMetrics) -> (u64, u64) {
        (metrics.reloads_applied.get(), metrics.reloads_failed.get())
    }

    #[test]
    fn a_changed_pair_is_swapped_in_and_a_broken_one_is_reported_once() {
        let files = Files::new(2);
        files.write(0, "a.test");
        files.write(1, "b.test");
        let store = CertStore::load(files.pairs.clone()).expect("loads");
        let metrics = TlsMetrics::unregistered();
        let mut state = WatchState::new(2, Duration::ZERO);
        assert!(!store.poll(&mut state, &metrics), "nothing changed");

        files.write(1, "new-b.test");
        assert!(store.poll(&mut state, &metrics));
        assert_eq!(store.names(), [["a.test"], ["new-b.test"]]);
        assert_eq!(reloads(&metrics), (1, 0));

        let served = store.fingerprints();
        files.write_raw(1, "garbage", "garbage");
        assert!(!store.poll(&mut state, &metrics));
        assert!(!store.poll(&mut state, &metrics));
        assert_eq!(reloads(&metrics), (1, 1), "reported once");
        assert_eq!(store.fingerprints(), served, "the previous pair serves");

        // a key that belongs to another certificate
        let one = rcgen::generate_simple_self_signed(vec!["c.test".to_owned()]).expect("gen");
        let two = rcgen::generate_simple_self_signed(vec!["c.test".to_owned()]).expect("gen");
        files.write_raw(1, &one.cert.pem(), &two.signing_key.serialize_pem());
        assert!(!store.poll(&mut state, &metrics));
        assert_eq!(reloads(&metrics), (1, 2));
        assert_eq!(store.fingerprints(), served);

        std::fs::remove_file(&files.pairs[0].key).expect("remove");
        assert!(!store.poll(&mut state, &metrics));
        assert_eq!(reloads(&metrics), (1, 3), "a missing file is a failure too");
        assert_eq!(store.names(), [["a.test"], ["new-b.test"]]);

        files.write(0, "new-a.test");
        files.write(1, "newer-b.test");
        assert!(store.poll(&mut state, &metrics));
        assert_eq!(store.names(), [["new-a.test"], ["newer-b.test"]]);
        assert_eq!(reloads(&metrics), (3, 3));
    }
}

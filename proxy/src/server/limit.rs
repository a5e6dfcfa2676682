//! The cap on open downstream connections. A connection beyond it is accepted and closed at
//! once (the client sees the connection end before any byte), counted in
//! `go_gateway_connections_refused_total`; the connections already open keep being served.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus::{IntCounter, IntGauge};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Default cap on open downstream connections for a library user (the binary derives its
/// default from the open-file limit).
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;

/// How many downstream connections may be open at once, across every listener given a
/// clone of the same limit. Cheap to clone: clones share the count.
#[derive(Debug, Clone)]
pub struct ConnectionLimit {
    slots: Arc<Semaphore>,
    max: usize,
    refused: Arc<AtomicU64>,
}

impl ConnectionLimit {
    /// A limit of `max` open connections (at least one).
    pub fn new(max: usize) -> Self {
        let max = max.clamp(1, Semaphore::MAX_PERMITS);
        Self {
            slots: Arc::new(Semaphore::new(max)),
            max,
            refused: Arc::new(AtomicU64::new(0)),
        }
    }

    /// The cap.
    pub fn max(&self) -> usize {
        self.max
    }

    /// A slot for a connection just accepted, or `None` when the cap is reached (the
    /// refusal is counted in `refused`). The slot keeps the connection counted in `open`
    /// for as long as it lives, which is as long as the connection's socket (an upgraded
    /// connection's tunnel included).
    pub(super) fn admit(&self, open: &IntGauge, refused: &IntCounter) -> Option<ConnectionSlot> {
        match self.slots.clone().try_acquire_owned() {
            Ok(permit) => {
                open.inc();
                Some(ConnectionSlot {
                    _permit: permit,
                    open: open.clone(),
                })
            }
            Err(_) => {
                refused.inc();
                // The first refusal of a burst is worth a warning; the rest only count.
                if self
                    .refused
                    .fetch_add(1, Ordering::Relaxed)
                    .is_multiple_of(1000)
                {
                    tracing::warn!(
                        max = self.max,
                        "connection limit reached: new connections are closed at once"
                    );
                }
                None
            }
        }
    }
}

impl Default for ConnectionLimit {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_CONNECTIONS)
    }
}

/// One admitted connection: holds its place under the cap and in `go_gateway_connections`.
#[derive(Debug)]
pub(super) struct ConnectionSlot {
    _permit: OwnedSemaphorePermit,
    open: IntGauge,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.open.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn beyond_the_cap_connections_are_refused_and_counted_until_a_slot_frees() {
        let limit = ConnectionLimit::new(2);
        let open = IntGauge::new("open", "open").unwrap();
        let refused = IntCounter::new("refused", "refused").unwrap();
        let first = limit.admit(&open, &refused).expect("first admitted");
        let _second = limit.admit(&open, &refused).expect("second admitted");
        assert!(limit.admit(&open, &refused).is_none());
        assert_eq!((open.get(), refused.get()), (2, 1));
        drop(first);
        assert_eq!(open.get(), 1);
        assert!(
            limit.clone().admit(&open, &refused).is_some(),
            "a clone shares the count"
        );
        assert_eq!(ConnectionLimit::new(0).max(), 1);
    }
}

//! In-flight request accounting and the one-shot close that waits on it.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::{Notify, OnceCell};

use crate::Closer;

/// Counts in-flight requests and wakes a waiting close when the count reaches zero.
#[derive(Debug, Default)]
struct Counter {
    in_flight: AtomicUsize,
    drained: Notify,
}

/// Guard marking one request in flight; dropping it lets `sync_close` proceed.
#[derive(Debug)]
#[must_use = "the request counts as in flight only while the guard lives"]
pub struct InFlight {
    counter: Arc<Counter>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.counter.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.counter.drained.notify_waiters();
        }
    }
}

/// The closing half of a router: in-flight count, the closers, and the once-only close.
#[derive(Default)]
pub(crate) struct Lifecycle {
    counter: Arc<Counter>,
    closers: Mutex<Vec<Closer>>,
    closed: OnceCell<()>,
}

impl std::fmt::Debug for Lifecycle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lifecycle")
            .field("in_flight", &self.in_flight())
            .field("closed", &self.closed.initialized())
            .finish_non_exhaustive()
    }
}

impl Lifecycle {
    /// Keeps `closer` to run at close time.
    pub(crate) fn push_closer(&mut self, closer: Closer) {
        self.closers
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .push(closer);
    }

    /// Marks one request in flight.
    pub(crate) fn enter(&self) -> InFlight {
        self.counter.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight {
            counter: Arc::clone(&self.counter),
        }
    }

    /// How many requests are in flight now.
    pub(crate) fn in_flight(&self) -> usize {
        self.counter.in_flight.load(Ordering::Acquire)
    }

    /// Waits for the in-flight count to reach zero (at most `grace`), then runs every
    /// closer once. Later and concurrent calls share the first call's outcome.
    pub(crate) async fn close(&self, grace: Duration) {
        self.closed
            .get_or_init(|| async {
                // An expired grace is the documented way out, not an error.
                let _drained = tokio::time::timeout(grace, self.drained()).await;
                let closers = std::mem::take(
                    &mut *self.closers.lock().unwrap_or_else(PoisonError::into_inner),
                );
                for closer in closers {
                    // One failing closer must not keep the others from releasing their resources.
                    if catch_unwind(AssertUnwindSafe(closer)).is_err() {
                        tracing::error!("a route closer panicked; the remaining closers still run");
                    }
                }
            })
            .await;
    }

    /// Resolves once no request is in flight.
    async fn drained(&self) {
        loop {
            let notified = self.counter.drained.notified();
            tokio::pin!(notified);
            // Register before reading the count so a drop in between cannot be missed.
            notified.as_mut().enable();
            if self.in_flight() == 0 {
                return;
            }
            notified.await;
        }
    }
}

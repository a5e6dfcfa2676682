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

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::Mutex;

    use tokio::time::Instant;

    use crate::{Closer, MuxRouter, Router};

    use super::*;

    /// A router with `count` routes whose closers record their index in `log`.
    fn router_with_closers(count: usize) -> (Arc<MuxRouter<usize>>, Arc<Mutex<Vec<usize>>>) {
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut router = MuxRouter::new();
        for id in 0..count {
            let log = Arc::clone(&log);
            let closer: Closer = Box::new(move || log.lock().expect("log").push(id));
            router
                .handle(&format!("/r{id}"), "", "", id, Some(closer))
                .expect("register");
        }
        (Arc::new(router), log)
    }

    fn closed(log: &Mutex<Vec<usize>>) -> Vec<usize> {
        log.lock().expect("log").clone()
    }

    #[tokio::test(start_paused = true)]
    async fn close_without_requests_is_immediate() {
        let (router, log) = router_with_closers(3);
        let start = Instant::now();
        router.sync_close(Duration::from_secs(30)).await;
        assert_eq!(start.elapsed(), Duration::ZERO);
        assert_eq!(closed(&log), vec![0, 1, 2]);
    }

    #[tokio::test(start_paused = true)]
    async fn close_waits_for_in_flight_requests() {
        let (router, log) = router_with_closers(2);
        let first = router.enter();
        let second = router.enter();
        assert_eq!(router.in_flight(), 2);
        let requests = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            drop(first);
            tokio::time::sleep(Duration::from_secs(2)).await;
            drop(second);
        });
        let closing = {
            let router = Arc::clone(&router);
            let log = Arc::clone(&log);
            tokio::spawn(async move {
                let start = Instant::now();
                router.sync_close(Duration::from_secs(30)).await;
                (start.elapsed(), closed(&log))
            })
        };
        // While a request is in flight nothing is closed.
        tokio::time::sleep(Duration::from_millis(2_500)).await;
        assert!(closed(&log).is_empty());
        assert_eq!(router.in_flight(), 1);
        let (elapsed, at_close) = closing.await.expect("close task");
        requests.await.expect("request task");
        assert_eq!(elapsed, Duration::from_secs(3));
        assert_eq!(at_close, vec![0, 1]);
        assert_eq!(router.in_flight(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn close_gives_up_waiting_after_the_grace() {
        let (router, log) = router_with_closers(2);
        let stuck = router.enter();
        let start = Instant::now();
        router.sync_close(Duration::from_secs(5)).await;
        assert_eq!(start.elapsed(), Duration::from_secs(5));
        assert_eq!(closed(&log), vec![0, 1]);
        assert_eq!(router.in_flight(), 1);
        drop(stuck);
        assert_eq!(router.in_flight(), 0);
        assert_eq!(
            closed(&log),
            vec![0, 1],
            "dropping the guard later closes nothing again"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn closers_run_once_across_repeated_and_concurrent_calls() {
        let (router, log) = router_with_closers(3);
        let guard = router.enter();
        let release = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            drop(guard);
        });
        let start = Instant::now();
        // Both concurrent calls return only once the (single) close has finished.
        tokio::join!(
            router.sync_close(Duration::from_secs(10)),
            router.sync_close(Duration::from_secs(10)),
        );
        assert_eq!(start.elapsed(), Duration::from_secs(1));
        release.await.expect("release task");
        assert_eq!(closed(&log), vec![0, 1, 2]);
        let _late = router.enter();
        let again = Instant::now();
        router.sync_close(Duration::from_secs(10)).await;
        assert_eq!(
            again.elapsed(),
            Duration::ZERO,
            "a later call returns at once"
        );
        assert_eq!(closed(&log), vec![0, 1, 2]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_panicking_closer_does_not_stop_the_others() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut router = MuxRouter::new();
        router
            .handle(
                "/boom",
                "",
                "",
                0,
                Some(Box::new(|| panic!("closer failed"))),
            )
            .expect("register");
        let after = Arc::clone(&log);
        router
            .handle(
                "/fine",
                "",
                "",
                1,
                Some(Box::new(move || after.lock().expect("log").push(1))),
            )
            .expect("register");
        router.sync_close(Duration::from_secs(1)).await;
        assert_eq!(closed(&log), vec![1]);
    }

    #[test]
    fn the_close_future_is_send() {
        fn assert_send<T: Send>(_: &T) {}
        let router: MuxRouter<usize> = MuxRouter::new();
        assert_send(&router.sync_close(Duration::ZERO));
    }
}

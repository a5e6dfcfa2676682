//! The narrow metrics handle built-ins get: a counter of the requests they refused, and a
//! gauge for the state of a shared store they use (Redis).
//!
//! Metric families belong to the proxy; a middleware only asks for a counter labelled with
//! its name, the endpoint and a reason, and increments it. [`LocalDenials`] keeps the counts
//! in memory, for tests and embedders without Prometheus.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// One counter of refused requests.
pub trait Counter: Send + Sync {
    /// Adds one.
    fn inc(&self);
}

/// A cheap, cloneable counter handle.
pub type DenialCounter = Arc<dyn Counter>;

/// One gauge a middleware sets.
pub trait Gauge: Send + Sync {
    /// Sets the value.
    fn set(&self, value: i64);
}

/// A cheap, cloneable gauge handle.
pub type GaugeHandle = Arc<dyn Gauge>;

/// Hands out denial counters; the proxy backs it with `go_gateway_middleware_denied_total`.
pub trait Denials: Send + Sync {
    /// The counter for `middleware` on the endpoint with path pattern `endpoint`, by `reason`.
    fn counter(&self, middleware: &str, endpoint: &str, reason: &str) -> DenialCounter;

    /// The gauge saying whether a shared store is reachable (1) or not (0): `store` is its
    /// kind (`redis`), `target` its address without credentials. The proxy backs it with
    /// `go_gateway_middleware_store_up{store,target}`; by default the value is kept nowhere.
    fn store_up(&self, store: &str, target: &str) -> GaugeHandle {
        let _ = (store, target);
        Arc::new(AtomicI64::new(0))
    }
}

impl Gauge for AtomicI64 {
    fn set(&self, value: i64) {
        self.store(value, Ordering::Relaxed);
    }
}

impl Counter for AtomicU64 {
    fn inc(&self) {
        self.fetch_add(1, Ordering::Relaxed);
    }
}

/// Denial counts kept in memory.
#[derive(Debug, Default)]
pub struct LocalDenials {
    counts: Mutex<HashMap<(String, String, String), Arc<AtomicU64>>>,
}

impl LocalDenials {
    /// The count so far for `middleware` on `endpoint` by `reason`.
    pub fn get(&self, middleware: &str, endpoint: &str, reason: &str) -> u64 {
        let key = (
            middleware.to_owned(),
            endpoint.to_owned(),
            reason.to_owned(),
        );
        self.counts
            .lock()
            .ok()
            .and_then(|counts| counts.get(&key).map(|count| count.load(Ordering::Relaxed)))
            .unwrap_or(0)
    }
}

impl Denials for LocalDenials {
    fn counter(&self, middleware: &str, endpoint: &str, reason: &str) -> DenialCounter {
        let key = (
            middleware.to_owned(),
            endpoint.to_owned(),
            reason.to_owned(),
        );
        match self.counts.lock() {
            Ok(mut counts) => counts.entry(key).or_default().clone(),
            Err(_) => Arc::new(AtomicU64::new(0)),
        }
    }
}

//! Load balancing over a set of backend nodes.
//!
//! A [`Selector`] holds the current node set (replaced as a whole by [`Selector::apply`]) and
//! picks one node per request. The pick returns a [`Done`] guard; reporting the request's
//! outcome through it feeds the balancer (latency and success rate for `p2c`).
//!
//! Three algorithms are available (see [`Algorithm`]):
//! - `p2c` (default): power of two choices over an EWMA of latency and success rate, aware of
//!   in-flight requests, with a forced pick of a node left unpicked for more than 3 s so its
//!   statistics recover.
//! - `wrr`: nginx's smooth weighted round robin over [`Node::weight`].
//! - `random`: uniform.
//!
//! The request path reads the node set through an `ArcSwap` and keeps per-node statistics in
//! atomics: `select` and [`Done::done`] take no lock and allocate nothing when no filter is
//! given. The one exception is `wrr`, which updates all current weights under a short mutex
//! (the smooth algorithm needs a consistent view of them).

mod ewma;
mod node_set;
mod p2c;
mod random;
mod rng;
mod wrr;

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Instant;

/// The weight of a node that does not set one.
pub const DEFAULT_WEIGHT: i64 = 10;

/// A backend instance the gateway can send requests to.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Node {
    /// Network address, `host:port`.
    pub address: String,
    /// Whether to connect with TLS.
    pub tls: bool,
    /// Scheduling weight used by `wrr`; `None` means [`DEFAULT_WEIGHT`].
    pub weight: Option<i64>,
    /// Name of the discovered service, empty for static targets.
    pub service_name: String,
    /// Version of the discovered instance, empty when unknown.
    pub version: String,
    /// Instance metadata, from the registry or the backend config.
    pub metadata: BTreeMap<String, String>,
    /// Where the transport caches its parsed form of `address` (set once per node; not
    /// part of the node's identity, not copied by `clone`).
    pub transport: TransportCache,
}

/// A write-once slot a transport uses to keep per-node data (for HTTP, the parsed
/// authority), so the request path does not parse the address on every pick. The selector
/// never looks inside.
#[derive(Default)]
pub struct TransportCache(std::sync::OnceLock<Box<dyn std::any::Any + Send + Sync>>);

impl TransportCache {
    /// The cached value of type `T`, computing it with `init` the first time.
    /// Returns None if another type was cached first (a bug in the caller), or `init` fails.
    pub fn get_or_try_init<T: Send + Sync + 'static>(
        &self,
        init: impl FnOnce() -> Option<T>,
    ) -> Option<&T> {
        if let Some(value) = self.0.get() {
            return value.downcast_ref();
        }
        let value = init()?;
        self.0.get_or_init(|| Box::new(value)).downcast_ref()
    }
}

impl Clone for TransportCache {
    fn clone(&self) -> Self {
        TransportCache::default()
    }
}

impl PartialEq for TransportCache {
    fn eq(&self, _other: &Self) -> bool {
        true
    }
}

impl Eq for TransportCache {}

impl std::fmt::Debug for TransportCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TransportCache")
    }
}

impl Node {
    /// A node at `address` with every other field left at its default.
    pub fn new(address: impl Into<String>) -> Self {
        Node {
            address: address.into(),
            ..Node::default()
        }
    }

    /// The weight `wrr` uses: [`Node::weight`] or [`DEFAULT_WEIGHT`], clamped to
    /// `1..=u32::MAX` (a zero or negative weight still receives a little traffic).
    pub fn effective_weight(&self) -> i64 {
        self.weight
            .unwrap_or(DEFAULT_WEIGHT)
            .clamp(1, i64::from(u32::MAX))
    }
}

/// Predicate: a node is eligible when every filter returns true.
pub type NodeFilter = Arc<dyn Fn(&Node) -> bool + Send + Sync>;

/// Outcome of a request, reported when the response body ended (or failed).
#[derive(Debug, Clone, Copy)]
pub struct DoneInfo {
    /// False when the request failed in a way that says the node is unhealthy.
    pub success: bool,
}

/// Reports the outcome of one pick back to the balancer.
///
/// Dropping it without calling [`Done::done`] only releases the in-flight slot: the request
/// was cancelled, so it gives no latency or success sample.
pub struct Done {
    /// The picked node's statistics and the pick time, for algorithms that keep statistics.
    pick: Option<ewma::Pick>,
}

impl Done {
    /// A guard that records nothing (algorithms without feedback).
    pub(crate) const fn untracked() -> Self {
        Done { pick: None }
    }

    /// Reports the request's outcome, measured as ending now.
    pub fn done(mut self, info: DoneInfo) {
        if let Some(pick) = self.pick.take() {
            pick.finish(Instant::now(), info.success);
        }
    }

    /// Reports the request's outcome as ending at `now` (deterministic tests).
    #[cfg(test)]
    pub(crate) fn done_at(mut self, info: DoneInfo, now: Instant) {
        if let Some(pick) = self.pick.take() {
            pick.finish(now, info.success);
        }
    }
}

impl Drop for Done {
    fn drop(&mut self) {
        if let Some(pick) = self.pick.take() {
            pick.cancel();
        }
    }
}

impl fmt::Debug for Done {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Done")
            .field("tracked", &self.pick.is_some())
            .finish()
    }
}

/// Why no node could be picked.
#[derive(Debug, thiserror::Error)]
pub enum SelectError {
    /// The node set is empty or every node was filtered out.
    #[error("no node available")]
    NoAvailable,
}

/// Picks a backend node per request among a replaceable node set.
pub trait Selector: Send + Sync + 'static {
    /// Picks a node among those passing every filter.
    fn select(&self, filters: &[NodeFilter]) -> Result<(Arc<Node>, Done), SelectError>;
    /// Replaces the node set; a node whose address (and tls flag) survives keeps its
    /// statistics (EWMA, in-flight, wrr current weight).
    fn apply(&self, nodes: Vec<Node>);
    /// Current nodes (for debug views), in apply order.
    fn nodes(&self) -> Vec<Arc<Node>>;
}

/// The balancing algorithm of a [`Selector`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Algorithm {
    /// Power of two choices over EWMA latency, success rate and in-flight requests.
    #[default]
    P2c,
    /// Smooth weighted round robin over [`Node::weight`].
    Wrr,
    /// Uniform random.
    Random,
}

impl Algorithm {
    /// The name used in configuration: `p2c`, `wrr` or `random`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Algorithm::P2c => "p2c",
            Algorithm::Wrr => "wrr",
            Algorithm::Random => "random",
        }
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A selector algorithm name that is not `p2c`, `wrr` or `random`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown selector algorithm {0:?}: want p2c, wrr or random")]
pub struct UnknownAlgorithm(pub String);

impl FromStr for Algorithm {
    type Err = UnknownAlgorithm;

    /// Parses `""` or `"p2c"` (the default), `"wrr"` and `"random"`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "" | "p2c" => Ok(Algorithm::P2c),
            "wrr" => Ok(Algorithm::Wrr),
            "random" => Ok(Algorithm::Random),
            other => Err(UnknownAlgorithm(other.to_owned())),
        }
    }
}

/// Builds an empty selector running `algorithm`; fill it with [`Selector::apply`].
pub fn build(algorithm: Algorithm) -> Arc<dyn Selector> {
    match algorithm {
        Algorithm::P2c => Arc::new(p2c::P2c::default()),
        Algorithm::Wrr => Arc::new(wrr::Wrr::default()),
        Algorithm::Random => Arc::new(random::Random::default()),
    }
}

#[cfg(test)]
mod tests;

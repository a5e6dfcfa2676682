//! Per-node statistics for `p2c`: exponentially weighted moving averages of latency and
//! success rate, the in-flight count and the last pick time, all in atomics.
//!
//! Like Kratos' ewma node, a sample's weight depends on the time since the previous sample:
//! the old average decays by `exp(-elapsed / TAU)`, so a node's score follows recent
//! behaviour (about 600 ms mean lifetime) however busy it is. Under concurrency two reports
//! may race and one sample may count for less; the averages stay approximate, never corrupt.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Mean lifetime of a sample in the moving averages.
const TAU: Duration = Duration::from_millis(600);
/// Added to the latency before scoring so nodes a few milliseconds apart (other zones) score
/// alike.
const LATENCY_FLOOR: Duration = Duration::from_millis(5);
/// Success rate scale: 1.0 means every recent request succeeded.
const FULL_SUCCESS: f64 = 1.0;

/// The statistics of one node, shared by every pick of it and kept across apply.
///
/// Aligned to a cache line so busy nodes do not slow each other down through false sharing.
#[derive(Debug)]
#[repr(align(64))]
pub(crate) struct NodeStats {
    /// Origin of every timestamp below (stored as nanoseconds since it).
    epoch: Instant,
    /// EWMA latency in nanoseconds as f64 bits; 0.0 until the first sample.
    latency: AtomicU64,
    /// EWMA success rate in `0.0..=1.0` as f64 bits.
    success: AtomicU64,
    /// Requests picked and not yet reported or dropped.
    in_flight: AtomicU64,
    /// Time of the last report.
    last_report: AtomicU64,
    /// Time of the last pick (the node's creation until it is first picked).
    last_pick: AtomicU64,
}

impl NodeStats {
    /// Fresh statistics: no latency sample, full success, nothing in flight.
    pub(crate) fn new(epoch: Instant) -> Self {
        NodeStats {
            epoch,
            latency: AtomicU64::new(0f64.to_bits()),
            success: AtomicU64::new(FULL_SUCCESS.to_bits()),
            in_flight: AtomicU64::new(0),
            last_report: AtomicU64::new(0),
            last_pick: AtomicU64::new(0),
        }
    }

    fn nanos(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    /// The EWMA latency in nanoseconds, `None` before the first report.
    pub(crate) fn latency(&self) -> Option<f64> {
        let latency = f64::from_bits(self.latency.load(Ordering::Relaxed));
        (latency > 0.0).then_some(latency)
    }

    /// The EWMA success rate in `0.0..=1.0`.
    pub(crate) fn success(&self) -> f64 {
        f64::from_bits(self.success.load(Ordering::Relaxed))
    }

    /// Requests in flight.
    pub(crate) fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// The score `p2c` maximises, given the latency to assume (the node's own EWMA, or a peer's
    /// when it has none): success / (sqrt(latency + 5 ms) × (in-flight + 1)). The square root,
    /// as in Kratos, keeps one slow spell from starving a node for long.
    pub(crate) fn score(&self, latency_nanos: f64) -> f64 {
        let load = (latency_nanos + LATENCY_FLOOR.as_nanos() as f64).sqrt()
            * (self.in_flight() + 1) as f64;
        self.success() / load
    }

    /// Claims a forced pick if the node has not been picked for more than `gap`: only one
    /// caller wins per gap, through a compare-exchange on the last pick time.
    pub(crate) fn try_force(&self, now: Instant, gap: Duration) -> bool {
        let now = self.nanos(now);
        let last = self.last_pick.load(Ordering::Relaxed);
        let gap = u64::try_from(gap.as_nanos()).unwrap_or(u64::MAX);
        now.saturating_sub(last) > gap
            && self
                .last_pick
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }

    /// Records a pick at `now` and returns what its report needs.
    pub(crate) fn pick(self: &Arc<Self>, now: Instant) -> Pick {
        let start = self.nanos(now);
        // A plain store: a racing pick may set a time a few nanoseconds older, which is harmless.
        self.last_pick.store(start, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        Pick {
            stats: Arc::clone(self),
            start,
        }
    }

    /// Folds one request's latency and outcome into the averages.
    fn record(&self, start: u64, now: Instant, success: bool) {
        let now = self.nanos(now);
        let elapsed = now.saturating_sub(self.last_report.swap(now, Ordering::Relaxed));
        let sample = now.saturating_sub(start).max(1) as f64;
        // Weight kept by the old average; the first sample replaces the initial values.
        let keep = if self.latency().is_none() {
            0.0
        } else {
            (-(elapsed as f64) / TAU.as_nanos() as f64).exp()
        };
        let blend = |old: f64, sample: f64| old * keep + sample * (1.0 - keep);
        let old_latency = f64::from_bits(self.latency.load(Ordering::Relaxed));
        // Never store 0.0, which means "no sample yet".
        let latency = blend(old_latency, sample).max(1.0);
        self.latency.store(latency.to_bits(), Ordering::Relaxed);
        let outcome = if success { FULL_SUCCESS } else { 0.0 };
        let success = blend(self.success(), outcome);
        self.success.store(success.to_bits(), Ordering::Relaxed);
    }

    fn release(&self) {
        // Balanced by construction: each `Pick` is finished or cancelled exactly once.
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One outstanding pick: the node's statistics and when it was picked.
pub(crate) struct Pick {
    stats: Arc<NodeStats>,
    start: u64,
}

impl Pick {
    /// The request ended at `now`: release the in-flight slot and record the sample.
    pub(crate) fn finish(self, now: Instant, success: bool) {
        self.stats.release();
        self.stats.record(self.start, now, success);
    }

    /// The request was cancelled: only release the in-flight slot.
    pub(crate) fn cancel(self) {
        self.stats.release();
    }
}

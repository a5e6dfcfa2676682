//! When the breaker lets a request through: the three triggers.
//!
//! - [`SreThrottle`]: Google SRE client-side adaptive throttling, as go-kratos/aegis' `sre`
//!   breaker. Over the rolling window, with `k = 1 / success`, a request is rejected with
//!   probability `max(0, (total - k * successes) / (total + 1))` once `total >= request`.
//!   Rejected requests count as failures, so the rejection rate stays up while the upstream
//!   is down and decays as successes come back.
//! - [`RatioGate`]: Kratos' `ratio`: lets `ratio` requests in 10,000 through at random.
//! - [`ThresholdBreaker`]: the classic closed / open / half-open breaker. Closed: when at
//!   least `request` attempts in the window failed at `errorThresholdPercentage` percent or
//!   more, it opens. Open: everything is rejected for `resetTimeout`. Half-open: exactly one
//!   probe goes through; its success closes the breaker (with a fresh window), its failure
//!   opens it again.
//!
//! Every lock here is held for a few additions; time is tokio's clock.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use super::window::RollingWindow;

/// What the trigger decided for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Go on; report the outcome with [`Trigger::record`].
    Allowed,
    /// Go on as the single half-open probe; its outcome decides the breaker's state.
    Probe,
    /// Rejected: the breaker is open.
    Denied,
}

/// One of the configured triggers.
#[derive(Debug)]
pub enum Trigger {
    /// Adaptive throttling (`successRatio`).
    Sre(SreThrottle),
    /// Static random admission (`ratio`).
    Ratio(RatioGate),
    /// Closed / open / half-open (`errorThreshold`).
    Threshold(ThresholdBreaker),
}

impl Trigger {
    /// Decides whether a request may go on now.
    pub fn admit(&self, now: Instant) -> Admission {
        match self {
            Trigger::Sre(sre) => sre.admit(now, rand::random::<f64>()),
            Trigger::Ratio(ratio) => ratio.admit(rand::random_range(0..10_000)),
            Trigger::Threshold(breaker) => breaker.admit(now),
        }
    }

    /// Reports the outcome of a request that was let through as `admission`; returns the
    /// breaker's new state when this outcome changed it.
    pub fn record(
        &self,
        admission: Admission,
        success: bool,
        now: Instant,
    ) -> Option<BreakerState> {
        match self {
            Trigger::Sre(sre) => {
                sre.record(success, now);
                None
            }
            Trigger::Ratio(_) => None,
            Trigger::Threshold(breaker) => breaker.record(admission, success, now),
        }
    }

    /// Reports a request that was rejected (the SRE throttle counts it as a failure).
    pub fn record_denied(&self, now: Instant) {
        if let Trigger::Sre(sre) = self {
            sre.record(false, now);
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding the lock leaves plain counters behind; keep using them.
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Google SRE adaptive throttling over a rolling window.
#[derive(Debug)]
pub struct SreThrottle {
    k: f64,
    min_requests: u64,
    window: Mutex<RollingWindow>,
}

impl SreThrottle {
    /// `success` in (0, 1]: the success ratio below which requests start being rejected.
    pub fn new(
        success: f64,
        min_requests: u64,
        window: Duration,
        buckets: usize,
        now: Instant,
    ) -> Self {
        Self {
            k: 1.0 / success,
            min_requests,
            window: Mutex::new(RollingWindow::new(window, buckets, now)),
        }
    }

    /// The probability that a request is rejected now.
    pub fn reject_probability(&self, now: Instant) -> f64 {
        let counts = lock(&self.window).summary(now);
        let total = counts.total as f64;
        let weighted_successes = self.k * counts.successes as f64;
        if counts.total < self.min_requests || total <= weighted_successes {
            return 0.0;
        }
        ((total - weighted_successes) / (total + 1.0)).max(0.0)
    }

    /// Admits unless `roll` (uniform in [0, 1)) falls under the reject probability.
    pub fn admit(&self, now: Instant, roll: f64) -> Admission {
        if roll < self.reject_probability(now) {
            Admission::Denied
        } else {
            Admission::Allowed
        }
    }

    fn record(&self, success: bool, now: Instant) {
        lock(&self.window).record(success, now);
    }
}

/// Kratos' `ratio` trigger: `ratio` requests in 10,000 pass.
#[derive(Debug)]
pub struct RatioGate {
    ratio: u64,
}

impl RatioGate {
    /// Lets `ratio` / 10,000 of the requests through.
    pub fn new(ratio: u64) -> Self {
        Self { ratio }
    }

    /// Admits when `roll` (uniform in 0..10,000) is below the ratio.
    pub fn admit(&self, roll: u64) -> Admission {
        if roll < self.ratio {
            Admission::Allowed
        } else {
            Admission::Denied
        }
    }
}

/// Settings of [`ThresholdBreaker`].
#[derive(Debug, Clone, Copy)]
pub struct ThresholdSettings {
    /// Failure percentage (0-100] that opens the breaker.
    pub error_percentage: f64,
    /// Attempts the window must hold before the percentage is looked at.
    pub min_requests: u64,
    /// How long the breaker stays open before a probe is let through.
    pub reset_timeout: Duration,
    /// Length of the rolling window.
    pub window: Duration,
    /// Buckets of the rolling window.
    pub buckets: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Closed,
    Open { until: Instant },
    HalfOpen { probing: bool },
}

#[derive(Debug)]
struct ThresholdState {
    phase: Phase,
    window: RollingWindow,
}

/// The classic closed / open / half-open circuit breaker.
#[derive(Debug)]
pub struct ThresholdBreaker {
    settings: ThresholdSettings,
    state: Mutex<ThresholdState>,
}

/// The breaker's state as operators name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Requests flow; failures are counted.
    Closed,
    /// Requests are rejected.
    Open,
    /// One probe decides.
    HalfOpen,
}

impl ThresholdBreaker {
    /// A closed breaker.
    pub fn new(settings: ThresholdSettings, now: Instant) -> Self {
        Self {
            settings,
            state: Mutex::new(ThresholdState {
                phase: Phase::Closed,
                window: RollingWindow::new(settings.window, settings.buckets, now),
            }),
        }
    }

    /// The current state (an open breaker whose reset timeout passed reads as half-open).
    pub fn state(&self, now: Instant) -> BreakerState {
        match lock(&self.state).phase {
            Phase::Closed => BreakerState::Closed,
            Phase::Open { until } if now < until => BreakerState::Open,
            Phase::Open { .. } | Phase::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    /// Decides for one request.
    pub fn admit(&self, now: Instant) -> Admission {
        let mut state = lock(&self.state);
        match state.phase {
            Phase::Closed => Admission::Allowed,
            Phase::Open { until } if now < until => Admission::Denied,
            Phase::Open { .. } | Phase::HalfOpen { probing: false } => {
                state.phase = Phase::HalfOpen { probing: true };
                Admission::Probe
            }
            Phase::HalfOpen { probing: true } => Admission::Denied,
        }
    }

    /// Reports the outcome of a request admitted as `admission`; returns the new state when
    /// this outcome changed it.
    pub fn record(
        &self,
        admission: Admission,
        success: bool,
        now: Instant,
    ) -> Option<BreakerState> {
        let mut state = lock(&self.state);
        match admission {
            Admission::Probe if success => {
                state.phase = Phase::Closed;
                state.window.reset(now);
                Some(BreakerState::Closed)
            }
            Admission::Probe => {
                state.phase = Phase::Open {
                    until: now + self.settings.reset_timeout,
                };
                Some(BreakerState::Open)
            }
            Admission::Allowed => {
                state.window.record(success, now);
                if state.phase != Phase::Closed || success {
                    return None;
                }
                let counts = state.window.summary(now);
                let failed = counts.failures() as f64 * 100.0 / counts.total.max(1) as f64;
                if counts.total < self.settings.min_requests
                    || failed < self.settings.error_percentage
                {
                    return None;
                }
                state.phase = Phase::Open {
                    until: now + self.settings.reset_timeout,
                };
                Some(BreakerState::Open)
            }
            Admission::Denied => None,
        }
    }

    /// The half-open probe ended without an outcome (its client went away): the next
    /// request becomes the probe.
    pub fn cancel_probe(&self) {
        let mut state = lock(&self.state);
        if state.phase == (Phase::HalfOpen { probing: true }) {
            state.phase = Phase::HalfOpen { probing: false };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> ThresholdSettings {
        ThresholdSettings {
            error_percentage: 50.0,
            min_requests: 4,
            reset_timeout: Duration::from_millis(300),
            window: Duration::from_secs(10),
            buckets: 10,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn threshold_opens_after_enough_failures_and_recovers_through_one_probe() {
        let breaker = ThresholdBreaker::new(settings(), Instant::now());
        let now = Instant::now();
        // Three failures: below the minimum number of requests, still closed.
        for _ in 0..3 {
            assert_eq!(breaker.admit(now), Admission::Allowed);
            breaker.record(Admission::Allowed, false, now);
        }
        assert_eq!(breaker.state(now), BreakerState::Closed);
        breaker.record(Admission::Allowed, false, now);
        assert_eq!(breaker.state(now), BreakerState::Open);
        assert_eq!(breaker.admit(now), Admission::Denied);

        tokio::time::advance(Duration::from_millis(299)).await;
        assert_eq!(breaker.admit(Instant::now()), Admission::Denied);
        tokio::time::advance(Duration::from_millis(1)).await;
        let now = Instant::now();
        assert_eq!(breaker.admit(now), Admission::Probe);
        // While the probe is out, everybody else is rejected.
        assert_eq!(breaker.admit(now), Admission::Denied);
        breaker.record(Admission::Probe, false, now);
        assert_eq!(breaker.state(now), BreakerState::Open);
        assert_eq!(breaker.admit(now), Admission::Denied);

        tokio::time::advance(Duration::from_millis(300)).await;
        let now = Instant::now();
        assert_eq!(breaker.admit(now), Admission::Probe);
        // A probe whose client went away hands the probe on.
        breaker.cancel_probe();
        assert_eq!(breaker.admit(now), Admission::Probe);
        breaker.record(Admission::Probe, true, now);
        assert_eq!(breaker.state(now), BreakerState::Closed);
        // The window starts afresh: one failure does not reopen it.
        breaker.record(Admission::Allowed, false, now);
        assert_eq!(breaker.admit(now), Admission::Allowed);
    }

    #[tokio::test(start_paused = true)]
    async fn threshold_needs_the_failure_percentage() {
        let breaker = ThresholdBreaker::new(settings(), Instant::now());
        let now = Instant::now();
        for index in 0..20 {
            // Every third attempt fails: at most 33% < 50%.
            breaker.record(Admission::Allowed, index % 3 != 2, now);
        }
        assert_eq!(breaker.state(now), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn failures_that_left_the_window_do_not_count() {
        let breaker = ThresholdBreaker::new(settings(), Instant::now());
        for _ in 0..3 {
            breaker.record(Admission::Allowed, false, Instant::now());
        }
        tokio::time::advance(Duration::from_secs(11)).await;
        // Counted with the old ones this would be 4 failures of 4.
        breaker.record(Admission::Allowed, false, Instant::now());
        assert_eq!(breaker.state(Instant::now()), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn sre_rejects_in_proportion_to_failures() {
        let now = Instant::now();
        let sre = SreThrottle::new(0.5, 10, Duration::from_secs(3), 10, now);
        for _ in 0..9 {
            sre.record(false, now);
        }
        // Below the minimum number of requests nothing is rejected.
        assert_eq!(sre.reject_probability(now), 0.0);
        sre.record(false, now);
        // 10 failures, 0 successes: 10 / 11.
        assert!((sre.reject_probability(now) - 10.0 / 11.0).abs() < 1e-9);
        assert_eq!(sre.admit(now, 0.5), Admission::Denied);
        assert_eq!(sre.admit(now, 0.95), Admission::Allowed);

        // 10 successes more: k * successes = 2 * 10 = 20 >= 20 total: nothing rejected.
        for _ in 0..10 {
            sre.record(true, now);
        }
        assert_eq!(sre.reject_probability(now), 0.0);

        // Everything leaves the window after it passes.
        tokio::time::advance(Duration::from_secs(4)).await;
        assert_eq!(sre.reject_probability(Instant::now()), 0.0);
    }

    #[test]
    fn ratio_lets_its_share_through() {
        let gate = RatioGate::new(2_500);
        assert_eq!(gate.admit(0), Admission::Allowed);
        assert_eq!(gate.admit(2_499), Admission::Allowed);
        assert_eq!(gate.admit(2_500), Admission::Denied);
        assert_eq!(RatioGate::new(0).admit(0), Admission::Denied);
    }
}

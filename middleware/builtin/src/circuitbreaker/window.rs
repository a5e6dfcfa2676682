//! A rolling count of successes and totals over a time window split into buckets.
//!
//! The window is `buckets` buckets of `window / buckets` each; a bucket is cleared when the
//! clock moves past it, so counts older than the window fall out a bucket at a time. Time
//! is tokio's clock, so tests can pause and advance it.

use std::time::Duration;

use tokio::time::Instant;

/// Successes and attempts counted in one bucket.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Attempts that succeeded.
    pub successes: u64,
    /// All attempts (successes included).
    pub total: u64,
}

impl Counts {
    /// Attempts that failed.
    pub fn failures(&self) -> u64 {
        self.total - self.successes
    }
}

/// Success/total counts over the last `window`, in buckets.
#[derive(Debug)]
pub struct RollingWindow {
    buckets: Vec<Counts>,
    width: Duration,
    /// Index of the bucket that `current_start` begins.
    current: usize,
    current_start: Instant,
}

impl RollingWindow {
    /// A window of `window` split into `buckets` buckets (at least one, each at least 1 ms).
    pub fn new(window: Duration, buckets: usize, now: Instant) -> Self {
        let buckets = buckets.max(1);
        let width = (window / buckets as u32).max(Duration::from_millis(1));
        Self {
            buckets: vec![Counts::default(); buckets],
            width,
            current: 0,
            current_start: now,
        }
    }

    /// Counts one attempt that ended with `success`.
    pub fn record(&mut self, success: bool, now: Instant) {
        self.advance(now);
        let bucket = &mut self.buckets[self.current];
        bucket.total += 1;
        if success {
            bucket.successes += 1;
        }
    }

    /// The counts of the whole window.
    pub fn summary(&mut self, now: Instant) -> Counts {
        self.advance(now);
        self.buckets
            .iter()
            .fold(Counts::default(), |sum, bucket| Counts {
                successes: sum.successes + bucket.successes,
                total: sum.total + bucket.total,
            })
    }

    /// Forgets everything counted so far.
    pub fn reset(&mut self, now: Instant) {
        self.buckets.fill(Counts::default());
        self.current = 0;
        self.current_start = now;
    }

    fn advance(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.current_start);
        let steps = (elapsed.as_nanos() / self.width.as_nanos()) as u64;
        if steps == 0 {
            return;
        }
        let len = self.buckets.len();
        if steps >= len as u64 {
            self.buckets.fill(Counts::default());
        } else {
            for step in 1..=steps as usize {
                self.buckets[(self.current + step) % len] = Counts::default();
            }
        }
        self.current = (self.current + (steps % len as u64) as usize) % len;
        // `steps` may be huge after a long idle time; move the start to the bucket `now` is in.
        let skipped = u32::try_from(steps).unwrap_or(u32::MAX);
        self.current_start = self
            .current_start
            .checked_add(self.width.saturating_mul(skipped))
            .filter(|start| *start <= now)
            .unwrap_or(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn counts_fall_out_bucket_by_bucket() {
        let start = Instant::now();
        let mut window = RollingWindow::new(Duration::from_secs(1), 10, start);
        window.record(true, start);
        window.record(false, start);
        tokio::time::advance(Duration::from_millis(500)).await;
        window.record(false, Instant::now());
        assert_eq!(
            window.summary(Instant::now()),
            Counts {
                successes: 1,
                total: 3
            }
        );

        // 1.05 s after start: the first bucket (two attempts) has left the window.
        tokio::time::advance(Duration::from_millis(550)).await;
        assert_eq!(
            window.summary(Instant::now()),
            Counts {
                successes: 0,
                total: 1
            }
        );

        // Long idle: everything is gone, and counting starts afresh.
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert_eq!(window.summary(Instant::now()), Counts::default());
        window.record(true, Instant::now());
        assert_eq!(window.summary(Instant::now()).total, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn reset_clears_the_window() {
        let now = Instant::now();
        let mut window = RollingWindow::new(Duration::from_secs(10), 5, now);
        for _ in 0..7 {
            window.record(false, now);
        }
        assert_eq!(window.summary(now).failures(), 7);
        window.reset(now);
        assert_eq!(window.summary(now), Counts::default());
    }
}

//! Reading a discovery [`Watcher`] in tests: snapshots within a deadline, instance ids,
//! and latency samples.

use std::fmt;
use std::time::Duration;

use discovery::{ServiceInstance, Watcher};
use tokio::time::Instant;

/// The ids of `instances`, in order.
pub fn ids(instances: &[ServiceInstance]) -> Vec<&str> {
    instances
        .iter()
        .map(|instance| instance.id.as_str())
        .collect()
}

/// The next snapshot, which must arrive within `limit` and be Ok.
pub async fn next_within(watcher: &mut Box<dyn Watcher>, limit: Duration) -> Vec<ServiceInstance> {
    match tokio::time::timeout(limit, watcher.next()).await {
        Ok(Ok(snapshot)) => snapshot,
        Ok(Err(error)) => panic!("watcher returned an error: {error}"),
        Err(_) => panic!("no snapshot within {limit:?}"),
    }
}

/// Calls `next()` (errors allowed) until a snapshot satisfies `wanted`, within `limit`;
/// returns it and how many errors came on the way.
pub async fn wait_for(
    watcher: &mut Box<dyn Watcher>,
    limit: Duration,
    wanted: impl Fn(&[ServiceInstance]) -> bool,
) -> (Vec<ServiceInstance>, usize) {
    let deadline = Instant::now() + limit;
    let mut errors = 0;
    loop {
        match tokio::time::timeout_at(deadline, watcher.next()).await {
            Ok(Ok(snapshot)) if wanted(&snapshot) => return (snapshot, errors),
            Ok(Ok(_)) => {}
            Ok(Err(_)) => errors += 1,
            Err(_) => panic!("no wanted snapshot within {limit:?} ({errors} errors seen)"),
        }
    }
}

/// Minimum, median and maximum of latency samples; prints as
/// `over N samples: min …, median …, max …`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Latencies {
    /// How many samples.
    pub count: usize,
    /// The smallest sample.
    pub min: Duration,
    /// The middle sample (the upper one of an even count).
    pub median: Duration,
    /// The largest sample.
    pub max: Duration,
}

impl Latencies {
    /// Summarises `samples`; panics when there are none.
    pub fn of(samples: &[Duration]) -> Latencies {
        let mut sorted = samples.to_vec();
        sorted.sort();
        assert!(!sorted.is_empty(), "no latency samples");
        Latencies {
            count: sorted.len(),
            min: sorted[0],
            median: sorted[sorted.len() / 2],
            max: sorted[sorted.len() - 1],
        }
    }
}

impl fmt::Display for Latencies {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "over {} samples: min {:?}, median {:?}, max {:?}",
            self.count, self.min, self.median, self.max
        )
    }
}

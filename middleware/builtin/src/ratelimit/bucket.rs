//! Lock-free token buckets (GCRA) and a sharded, bounded map of them by key.
//!
//! A bucket is one `AtomicU64`: the theoretical arrival time (TAT) of the next request,
//! in nanoseconds since the limiter started. A request is allowed when moving the TAT one
//! emission interval forward keeps it within `burst` intervals of now; a compare-and-swap
//! publishes the new TAT. This is exactly a token bucket of size `burst` refilled at
//! `rate`, with no lock and no background refill task.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::RwLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// The verdict for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// Whether the request may pass.
    pub allowed: bool,
    /// Requests that could pass right now after this one.
    pub remaining: u64,
    /// Time until the bucket is full again.
    pub reset: Duration,
    /// When denied: time until one request may pass.
    pub retry_after: Duration,
}

/// Rate and burst of a bucket, fixed at build time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    /// Nanoseconds between two tokens.
    interval_ns: u64,
    /// Bucket size.
    burst: u64,
}

impl Quota {
    /// `rate` tokens per second, at most `burst` at once (`burst` >= 1, `rate` > 0).
    pub fn new(rate: f64, burst: u64) -> Self {
        let interval_ns = (1e9 / rate).round().clamp(1.0, u64::MAX as f64) as u64;
        Self {
            interval_ns,
            burst: burst.max(1),
        }
    }

    /// The bucket size (the `RateLimit-Limit` value).
    pub fn burst(&self) -> u64 {
        self.burst
    }

    /// Time between two tokens.
    pub fn interval(&self) -> Duration {
        Duration::from_nanos(self.interval_ns)
    }

    fn tolerance_ns(&self) -> u64 {
        self.interval_ns.saturating_mul(self.burst)
    }
}

/// One lock-free token bucket.
#[derive(Debug, Default)]
pub struct Bucket {
    tat: AtomicU64,
}

impl Bucket {
    /// Takes a token at `now_ns` (nanoseconds since the limiter's epoch) if one is there.
    pub fn acquire(&self, quota: Quota, now_ns: u64) -> Decision {
        let tolerance = quota.tolerance_ns();
        let mut tat = self.tat.load(Ordering::Acquire);
        loop {
            let new_tat = tat.max(now_ns).saturating_add(quota.interval_ns);
            let ahead = new_tat - now_ns;
            if ahead > tolerance {
                let backlog = tat.saturating_sub(now_ns);
                return Decision {
                    allowed: false,
                    remaining: 0,
                    reset: Duration::from_nanos(backlog),
                    retry_after: Duration::from_nanos(ahead - tolerance),
                };
            }
            match self
                .tat
                .compare_exchange_weak(tat, new_tat, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    return Decision {
                        allowed: true,
                        remaining: (tolerance - ahead) / quota.interval_ns,
                        reset: Duration::from_nanos(ahead),
                        retry_after: Duration::ZERO,
                    };
                }
                Err(current) => tat = current,
            }
        }
    }

    /// Whether the bucket is full at `now_ns` (its key may be forgotten without effect).
    fn is_idle(&self, now_ns: u64) -> bool {
        self.tat.load(Ordering::Acquire) <= now_ns
    }

    fn tat(&self) -> u64 {
        self.tat.load(Ordering::Acquire)
    }
}

/// What a request is counted under.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Key {
    /// The client's IP address.
    Ip(IpAddr),
    /// A header's value.
    Text(Box<[u8]>),
    /// The request carried nothing to key on (no client address, header absent).
    Missing,
}

const SHARDS: usize = 16;

/// The keys' hash: foldhash's seeded quality variant. std's SipHash, computed twice per
/// request (shard, then map), was 0.4k instructions of a rate-limited request (callgrind,
/// tests/bench middleware scenario). Keys come from clients, so the seed is random per map
/// and a shard holds at most `per_shard` keys.
type KeyHasher = foldhash::quality::RandomState;

/// Buckets by key, in shards with a read-write lock each: the common case (a known key)
/// takes a shared read lock on one shard and then only atomics. The map holds at most
/// `max_keys` keys; a full shard first forgets idle keys (full buckets, so nothing
/// changes for them), then the key whose bucket refilled the most.
pub struct KeyedBuckets {
    shards: Vec<RwLock<HashMap<Key, Bucket, KeyHasher>>>,
    hasher: KeyHasher,
    per_shard: usize,
}

impl KeyedBuckets {
    /// A map holding at most about `max_keys` keys.
    pub fn new(max_keys: usize) -> Self {
        // Seeds of their own for the shard choice and each shard's map: with one seed, the
        // keys of a shard would share the hash bits that choose their slot in the map.
        Self {
            shards: (0..SHARDS)
                .map(|_| RwLock::new(HashMap::with_hasher(KeyHasher::default())))
                .collect(),
            hasher: KeyHasher::default(),
            per_shard: max_keys.div_ceil(SHARDS).max(1),
        }
    }

    /// Takes a token from `key`'s bucket.
    pub fn acquire(&self, key: Key, quota: Quota, now_ns: u64) -> Decision {
        let shard = &self.shards[self.hasher.hash_one(&key) as usize % SHARDS];
        if let Ok(map) = shard.read() {
            if let Some(bucket) = map.get(&key) {
                return bucket.acquire(quota, now_ns);
            }
        }
        let mut map = match shard.write() {
            Ok(map) => map,
            Err(poisoned) => poisoned.into_inner(),
        };
        if !map.contains_key(&key) && map.len() >= self.per_shard {
            map.retain(|_, bucket| !bucket.is_idle(now_ns));
            if map.len() >= self.per_shard {
                let oldest = map
                    .iter()
                    .min_by_key(|(_, bucket)| bucket.tat())
                    .map(|(key, _)| key.clone());
                if let Some(oldest) = oldest {
                    map.remove(&oldest);
                }
            }
        }
        map.entry(key).or_default().acquire(quota, now_ns)
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keys held now.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|shard| shard.read().map(|map| map.len()).unwrap_or(0))
            .sum()
    }
}

/// Nanoseconds since `epoch` on tokio's clock (so tests can pause time).
pub fn nanos_since(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn burst_then_one_per_interval() {
        let quota = Quota::new(10.0, 5);
        let bucket = Bucket::default();
        let allowed = (0..8).filter(|_| bucket.acquire(quota, 0).allowed).count();
        assert_eq!(allowed, 5);
        let denied = bucket.acquire(quota, 0);
        assert_eq!(denied.retry_after, Duration::from_millis(100));
        assert_eq!(denied.reset, Duration::from_millis(500));
        assert!(!bucket.acquire(quota, 99 * MS).allowed);
        let next = bucket.acquire(quota, 100 * MS);
        assert!(next.allowed);
        assert_eq!(next.remaining, 0);
        assert!(!bucket.acquire(quota, 100 * MS).allowed);
        // After a full refill the whole burst is there again.
        let fresh = bucket.acquire(quota, 2_000 * MS);
        assert!(fresh.allowed);
        assert_eq!(fresh.remaining, 4);
    }

    #[test]
    fn concurrent_takers_never_exceed_the_burst() {
        let quota = Quota::new(1.0, 100);
        let bucket = Arc::new(Bucket::default());
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let bucket = bucket.clone();
                std::thread::spawn(move || {
                    (0..100)
                        .filter(|_| bucket.acquire(quota, 0).allowed)
                        .count()
                })
            })
            .collect();
        let total: usize = threads.into_iter().map(|t| t.join().expect("thread")).sum();
        assert_eq!(total, 100);
    }

    #[test]
    fn keys_are_independent_and_the_map_is_bounded() {
        let quota = Quota::new(1.0, 1);
        let map = KeyedBuckets::new(32);
        let ip = |n: u8| Key::Ip(IpAddr::from([10, 0, 0, n]));
        assert!(map.acquire(ip(1), quota, 0).allowed);
        assert!(!map.acquire(ip(1), quota, 0).allowed);
        assert!(map.acquire(ip(2), quota, 0).allowed);
        assert!(
            map.acquire(Key::Text(Box::from(&b"k"[..])), quota, 0)
                .allowed
        );
        for n in 0..=255u8 {
            map.acquire(ip(n), quota, 0);
        }
        assert!(map.len() <= 32, "{} keys", map.len());
        // Idle keys are forgotten first: after a refill, new keys push out old ones.
        for n in 0..=255u8 {
            map.acquire(Key::Text(Box::from([n])), quota, 10_000 * MS);
        }
        assert!(map.len() <= 32);
    }
}

//! The response store: a size-bounded concurrent map from request keys to responses.
//!
//! Built on `quick_cache` (sharded, one short lock per shard, weight-bounded, CLOCK-PRO
//! eviction that keeps often-hit entries over one-off ones). It has no notion of time, so
//! freshness is checked here on every lookup (tokio's clock) and stale entries are removed
//! when met; the byte bound is what limits memory.
//!
//! `Vary`: the primary key (method, host, path and query) maps either to a response, or
//! to the list of request headers the upstream said the response varies on; then the
//! response lives under a secondary key that adds those headers' values.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, StatusCode};
use quick_cache::{OptionsBuilder, Weighter};
use tokio::time::Instant;

/// A stored response.
#[derive(Debug)]
pub struct Stored {
    /// Status code.
    pub status: StatusCode,
    /// Response headers as received (without `Age`).
    pub headers: HeaderMap,
    /// The whole body.
    pub body: Bytes,
    /// When it was stored.
    pub stored_at: Instant,
    /// When it stops being fresh.
    pub expires_at: Instant,
    /// Its age when it arrived (upstream `Age`).
    pub initial_age: Duration,
    /// May answer requests carrying `Authorization`.
    pub shared_with_authorized: bool,
}

impl Stored {
    /// The `Age` to send at `now`, in seconds.
    pub fn age(&self, now: Instant) -> u64 {
        (self.initial_age + now.saturating_duration_since(self.stored_at)).as_secs()
    }

    fn weight(&self) -> u64 {
        let headers: usize = self
            .headers
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len() + 32)
            .sum();
        (self.body.len() + headers + 128) as u64
    }
}

#[derive(Clone)]
enum Slot {
    Variants(Arc<[HeaderName]>),
    Response(Arc<Stored>),
}

#[derive(Clone)]
struct SlotWeighter;

impl Weighter<String, Slot> for SlotWeighter {
    fn weight(&self, key: &String, slot: &Slot) -> u64 {
        let slot = match slot {
            Slot::Variants(names) => {
                names
                    .iter()
                    .map(|name| name.as_str().len() as u64 + 16)
                    .sum::<u64>()
                    + 64
            }
            Slot::Response(stored) => stored.weight(),
        };
        key.len() as u64 + slot
    }
}

/// Stored responses of one cache middleware.
pub struct Store {
    entries: quick_cache::sync::Cache<String, Slot, SlotWeighter>,
}

impl Store {
    /// A store holding at most `max_bytes`, with entries of up to `max_entry_bytes`.
    pub fn new(max_bytes: u64, max_entry_bytes: u64) -> Self {
        // Each shard holds 1/shards of the bytes and must fit several of the largest
        // entries, so small caches get few shards.
        let room_for = max_bytes / max_entry_bytes.saturating_mul(4).max(1);
        let shards = prev_power_of_two(room_for.clamp(1, 64) as usize);
        let estimated_items = (max_bytes / (16 * 1024)).clamp(16, 1 << 20) as usize;
        let options = OptionsBuilder::new()
            .shards(shards)
            .estimated_items_capacity(estimated_items)
            .weight_capacity(max_bytes)
            .build();
        let entries = match options {
            Ok(options) => quick_cache::sync::Cache::with_options(
                options,
                SlotWeighter,
                Default::default(),
                Default::default(),
            ),
            Err(_) => {
                quick_cache::sync::Cache::with_weighter(estimated_items, max_bytes, SlotWeighter)
            }
        };
        Self { entries }
    }

    /// The fresh response stored for a request with `primary` key and `headers`.
    pub fn lookup(&self, primary: &str, headers: &HeaderMap, now: Instant) -> Option<Arc<Stored>> {
        let (key, stored) = match self.entries.get(primary)? {
            Slot::Response(stored) => (None, stored),
            Slot::Variants(names) => {
                let key = secondary_key(primary, &names, headers);
                match self.entries.get(&key)? {
                    Slot::Response(stored) => (Some(key), stored),
                    Slot::Variants(_) => return None,
                }
            }
        };
        if now < stored.expires_at {
            return Some(stored);
        }
        let key = key.as_deref().unwrap_or(primary);
        self.entries.remove_if(
            key,
            |slot| matches!(slot, Slot::Response(s) if Arc::ptr_eq(s, &stored)),
        );
        None
    }

    /// Stores `stored` for requests with `primary` key whose `vary` headers equal those of
    /// `request_headers`.
    pub fn insert(
        &self,
        primary: String,
        vary: &[HeaderName],
        request_headers: &HeaderMap,
        stored: Stored,
    ) {
        let stored = Arc::new(stored);
        if vary.is_empty() {
            self.entries.insert(primary, Slot::Response(stored));
            return;
        }
        let key = secondary_key(&primary, vary, request_headers);
        self.entries.insert(primary, Slot::Variants(vary.into()));
        self.entries.insert(key, Slot::Response(stored));
    }

    /// Forgets what is stored under `primary` (its variants become unreachable and age out).
    pub fn invalidate(&self, primary: &str) {
        self.entries.remove(primary);
    }

    /// Bytes held now.
    pub fn weight(&self) -> u64 {
        self.entries.weight()
    }
}

/// The primary key of a request: method, host, path and query.
pub fn primary_key(method: &http::Method, host: &str, path_and_query: &str) -> String {
    format!("{method} {host}{path_and_query}")
}

fn secondary_key(primary: &str, names: &[HeaderName], headers: &HeaderMap) -> String {
    let mut key = String::with_capacity(primary.len() + 32 * names.len());
    key.push_str(primary);
    for name in names {
        key.push('\n');
        key.push_str(name.as_str());
        key.push(':');
        for (index, value) in headers.get_all(name).iter().enumerate() {
            if index > 0 {
                key.push(',');
            }
            key.push_str(&String::from_utf8_lossy(value.as_bytes()));
        }
    }
    key
}

fn prev_power_of_two(n: usize) -> usize {
    if n <= 1 {
        1
    } else {
        1 << (usize::BITS - 1 - n.leading_zeros())
    }
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    fn stored(body: &'static str, ttl: Duration) -> Stored {
        let now = Instant::now();
        Stored {
            status: StatusCode::OK,
            headers: HeaderMap::new(),
            body: Bytes::from_static(body.as_bytes()),
            stored_at: now,
            expires_at: now + ttl,
            initial_age: Duration::from_secs(5),
            shared_with_authorized: false,
        }
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(name, value)| {
                (
                    HeaderName::from_static(name),
                    HeaderValue::from_static(value),
                )
            })
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn entries_expire_and_report_their_age() {
        let store = Store::new(1 << 20, 1 << 16);
        store.insert(
            "GET h/a".into(),
            &[],
            &HeaderMap::new(),
            stored("a", Duration::from_secs(10)),
        );
        let hit = store
            .lookup("GET h/a", &HeaderMap::new(), Instant::now())
            .expect("fresh");
        assert_eq!(hit.body, "a");
        tokio::time::advance(Duration::from_secs(3)).await;
        assert_eq!(hit.age(Instant::now()), 8);
        tokio::time::advance(Duration::from_secs(7)).await;
        assert!(
            store
                .lookup("GET h/a", &HeaderMap::new(), Instant::now())
                .is_none()
        );
        assert_eq!(store.weight(), 0, "a stale entry is removed when met");
    }

    #[tokio::test(start_paused = true)]
    async fn vary_keeps_one_entry_per_header_value() {
        let store = Store::new(1 << 20, 1 << 16);
        let vary = [HeaderName::from_static("accept-language")];
        let en = headers(&[("accept-language", "en")]);
        let fr = headers(&[("accept-language", "fr")]);
        store.insert(
            "GET h/v".into(),
            &vary,
            &en,
            stored("hello", Duration::from_secs(60)),
        );
        store.insert(
            "GET h/v".into(),
            &vary,
            &fr,
            stored("bonjour", Duration::from_secs(60)),
        );
        let now = Instant::now();
        assert_eq!(
            store.lookup("GET h/v", &en, now).map(|s| s.body.clone()),
            Some(Bytes::from_static(b"hello"))
        );
        assert_eq!(
            store.lookup("GET h/v", &fr, now).map(|s| s.body.clone()),
            Some(Bytes::from_static(b"bonjour"))
        );
        assert!(store.lookup("GET h/v", &HeaderMap::new(), now).is_none());
        store.invalidate("GET h/v");
        assert!(store.lookup("GET h/v", &en, now).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn the_byte_bound_evicts() {
        let store = Store::new(8 * 1024, 1024);
        for index in 0..100 {
            store.insert(
                format!("GET h/{index}"),
                &[],
                &HeaderMap::new(),
                stored("x", Duration::from_secs(60)),
            );
        }
        assert!(store.weight() <= 8 * 1024, "weight {}", store.weight());
        assert!(
            store
                .lookup("GET h/99", &HeaderMap::new(), Instant::now())
                .is_some(),
            "the newest is kept"
        );
    }

    #[test]
    fn powers_of_two() {
        assert_eq!(
            [0, 1, 2, 3, 4, 63, 64].map(prev_power_of_two),
            [1, 1, 2, 2, 4, 32, 64]
        );
    }
}

//! Options of `cache`.

use std::time::Duration;

use serde::Deserialize;

use super::super::support::{duration, lenient_u64};

/// Options of `cache`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct CacheOptions {
    /// How long a response without `max-age`, `s-maxage` or `Expires` stays fresh.
    /// `0s` caches only responses that state their own lifetime. Default: `60s`.
    #[serde(deserialize_with = "duration", alias = "default_ttl")]
    pub default_ttl: Duration,
    /// Bytes the cache may hold in all (bodies, headers and keys); the least useful entries
    /// are evicted first. Default: 67108864 (64 MiB).
    #[serde(deserialize_with = "lenient_u64", alias = "max_bytes")]
    pub max_bytes: u64,
    /// Largest response body stored; larger ones stream through uncached. Default: 1048576
    /// (1 MiB).
    #[serde(deserialize_with = "lenient_u64", alias = "max_entry_bytes")]
    pub max_entry_bytes: u64,
    /// Response statuses that may be stored. Default: `[200, 301, 404]`.
    #[serde(alias = "status_codes")]
    pub status_codes: Vec<u16>,
}

impl Default for CacheOptions {
    fn default() -> Self {
        Self {
            default_ttl: Duration::from_secs(60),
            max_bytes: 64 * 1024 * 1024,
            max_entry_bytes: 1024 * 1024,
            status_codes: vec![200, 301, 404],
        }
    }
}

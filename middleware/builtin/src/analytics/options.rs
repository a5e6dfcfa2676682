//! Options of `analytics`.

use std::time::Duration;

use serde::Deserialize;

use crate::support::duration;

/// Options of `analytics`: where records go (`url` or `file`) and how they are batched.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct AnalyticsOptions {
    /// Collector to POST each batch to as a JSON array, `http(s)://host[:port]/path`.
    /// Default: unset (set `url` or `file`).
    pub url: String,
    /// File to append each batch to as JSON lines (created if missing, reopened for every
    /// batch so it can be rotated). Default: unset (set `url` or `file`).
    pub file: String,
    /// Records per batch: a full batch is shipped at once. Default: 100.
    #[serde(alias = "batch_size")]
    pub batch_size: usize,
    /// A batch that is not full is shipped this long after its first record. Default: `1s`.
    #[serde(alias = "flush_interval", deserialize_with = "duration")]
    pub flush_interval: Duration,
    /// Records waiting to be shipped, at most; a record that finds the queue full is
    /// dropped and counted. Default: 10000.
    #[serde(alias = "queue_size")]
    pub queue_size: usize,
    /// Limit on one POST to the collector; a batch not accepted by then is dropped and
    /// counted. Default: `5s`.
    #[serde(deserialize_with = "duration")]
    pub timeout: Duration,
}

impl Default for AnalyticsOptions {
    fn default() -> Self {
        Self {
            url: String::new(),
            file: String::new(),
            batch_size: 100,
            flush_interval: Duration::from_secs(1),
            queue_size: 10_000,
            timeout: Duration::from_secs(5),
        }
    }
}

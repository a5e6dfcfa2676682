//! Config stores: where the endpoints managed through the admin API live, shared by every
//! gateway started with the same `--store`.
//!
//! ```text
//! file://DIR                          one YAML file per endpoint (the default; this gateway only)
//! etcd://HOST:PORT[,...]/PREFIX       PREFIX/endpoints/<id>, PREFIX/instances/<id> (leased)
//! consul://HOST:PORT/PREFIX[?token=]  the same keys in Consul's KV, instances held by a
//!                                     TTL session (ACL token: ?token= or CONSUL_HTTP_TOKEN)
//! ```
//!
//! A store answers reads and conditional writes, publishes every change as a full
//! [`Snapshot`] on a `tokio::sync::watch` channel (the gateway merges it into its config),
//! and lists the gateways sharing it. The shared stores watch rather than poll (etcd: a
//! watch stream; Consul: blocking queries), keep publishing their last snapshot while the
//! store is unreachable, and catch up when it returns.

mod consul;
mod etcd;
mod file;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use configs::Endpoint;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub(crate) use consul::ConsulStore;
pub(crate) use etcd::EtcdStore;
pub(crate) use file::FileStore;

/// One endpoint held by a store, with the version a conditional write must name.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct StoredEndpoint {
    /// The id it was written under (`[A-Za-z0-9._-]`, not starting with `.`).
    pub(crate) id: String,
    /// Changes on every write (etcd: the key's mod revision; file: a counter).
    pub(crate) version: String,
    /// The endpoint, in the config file's schema.
    pub(crate) endpoint: Endpoint,
}

/// Everything a store holds, as of `revision`.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Snapshot {
    /// Changes whenever the content does (etcd: the store revision; file: a content hash).
    pub(crate) revision: String,
    /// Sorted by id: the order they are merged in.
    pub(crate) endpoints: Vec<StoredEndpoint>,
}

/// A gateway sharing the store, as `GET /admin/v1/instances` lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct InstanceInfo {
    /// Unique per running gateway.
    pub(crate) id: String,
    /// Its admin address (else its first proxy address).
    pub(crate) addr: String,
    /// The store revision its config in force includes.
    pub(crate) version: String,
    /// When it last reported (RFC 3339 UTC).
    pub(crate) seen: String,
}

/// Why a store call failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StoreError {
    /// No endpoint with that id.
    #[error("no endpoint with id {0:?}")]
    NotFound(String),
    /// `If-Match` named another version (or the endpoint does not exist).
    #[error("version mismatch: If-Match {expected:?} but the stored version is {current}")]
    Conflict {
        /// What the caller sent.
        expected: String,
        /// What the store holds (`none` when nothing is stored under the id).
        current: String,
    },
    /// The store could not be reached or failed.
    #[error("config store unavailable: {0}")]
    Unavailable(String),
}

/// The operations every store offers. Writes are atomic per endpoint; `if_match` makes
/// them conditional on the stored version.
#[async_trait::async_trait]
pub(crate) trait ConfigStore: Send + Sync {
    /// The DSN, without credentials.
    fn describe(&self) -> String;
    /// Every endpoint, sorted by id.
    async fn list(&self) -> Result<Vec<StoredEndpoint>, StoreError>;
    /// One endpoint.
    async fn get(&self, id: &str) -> Result<StoredEndpoint, StoreError>;
    /// Creates or replaces; answers what was stored.
    async fn put(
        &self,
        id: &str,
        endpoint: &Endpoint,
        if_match: Option<&str>,
    ) -> Result<StoredEndpoint, StoreError>;
    /// Removes.
    async fn delete(&self, id: &str, if_match: Option<&str>) -> Result<(), StoreError>;
    /// The latest snapshot, updated on every change (from any gateway, for shared stores).
    fn watch(&self) -> watch::Receiver<Arc<Snapshot>>;
    /// Announces (or updates) this gateway in the store's instance list.
    async fn register_instance(&self, instance: InstanceInfo);
    /// The gateways sharing the store, sorted by id.
    async fn instances(&self) -> Result<Vec<InstanceInfo>, StoreError>;
}

/// Sends `snapshot` to the store's watchers unless only its revision differs from the one
/// they have; `true` when sent. The first snapshot is news even when empty: start-up waits
/// for it.
pub(crate) fn publish(sender: &watch::Sender<Arc<Snapshot>>, snapshot: Snapshot) -> bool {
    sender.send_if_modified(|current| {
        if !current.revision.is_empty() && current.endpoints == snapshot.endpoints {
            return false;
        }
        *current = Arc::new(snapshot);
        true
    })
}

/// Opens the store `dsn` (`file://DIR`, `etcd://HOST:PORT[,...]/PREFIX` or
/// `consul://HOST:PORT/PREFIX`). Its background tasks (watch, instance lease or session)
/// end with `shutdown`.
pub(crate) fn open(
    dsn: &str,
    lease_ttl: Duration,
    shutdown: CancellationToken,
) -> Result<Arc<dyn ConfigStore>, String> {
    if let Some(dir) = dsn.strip_prefix("file://") {
        if dir.is_empty() {
            return Err(format!("--store {dsn}: file:// needs a directory"));
        }
        return Ok(Arc::new(FileStore::open(dir.into())?));
    }
    if let Some(rest) = dsn.strip_prefix("etcd://") {
        return Ok(Arc::new(EtcdStore::open(rest, lease_ttl, shutdown)?));
    }
    if let Some(rest) = dsn.strip_prefix("consul://") {
        return Ok(Arc::new(ConsulStore::open(rest, lease_ttl, shutdown)?));
    }
    Err(format!(
        "--store {dsn}: unknown scheme (expected file://DIR, etcd://HOST:PORT/PREFIX or consul://HOST:PORT/PREFIX)"
    ))
}

/// An id usable as a file name and an etcd key segment.
pub(crate) fn check_id(id: &str) -> Result<(), String> {
    let valid = !id.is_empty()
        && id.len() <= 128
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if valid {
        Ok(())
    } else {
        Err(format!(
            "id {id:?}: use 1 to 128 of A-Z a-z 0-9 . _ - (not starting with '.')"
        ))
    }
}

/// `2024-05-06T07:08:09Z` (UTC, whole seconds).
pub(crate) fn rfc3339(time: SystemTime) -> String {
    let secs = time
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = (secs / 86_400) as i64;
    let (hour, minute, second) = (secs % 86_400 / 3_600, secs % 3_600 / 60, secs % 60);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}Z")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        for good in ["a", "users-v2", "A.b_c-9"] {
            assert!(check_id(good).is_ok(), "{good}");
        }
        for bad in ["", ".hidden", "a/b", "../x", "a b", &"x".repeat(129)] {
            assert!(check_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn formats_rfc3339() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_735_689_599);
        assert_eq!(rfc3339(t), "2024-12-31T23:59:59Z");
    }
}

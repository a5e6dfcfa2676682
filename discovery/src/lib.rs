//! Service discovery for the gateway: the [`Discovery`] trait, its etcd and Consul
//! implementations, and [`from_dsn`], which turns a `--discovery` DSN into one of them.
//!
//! A [`Discovery`] answers one-shot lookups ([`Discovery::get_service`]) and opens
//! [`Watcher`]s that deliver *full snapshots* of a service's instances: the first
//! [`Watcher::next`] returns the current set, every later call waits for the next change.
//! A watcher error is transient: the caller keeps its last nodes and calls `next()` again,
//! while the watcher backs off (exponential with jitter, capped at about five seconds) and
//! reconnects inside those calls.
//!
//! Instances use the Kratos `ServiceInstance` shape, so a service registered by a Kratos
//! application (etcd or Consul registry) is understood as is.
//!
//! - [`etcd`]: `etcd-client` (v3 API, works with etcd 3.4), Kratos key layout, list + watch
//!   from the listed revision, re-watch after a disconnect, re-list after compaction.
//! - [`consul`]: blocking queries on `/v1/health/service/<name>?passing=1`, written over
//!   hyper-util rather than rs-consul because rs-consul's typed service entry drops
//!   `Service.Meta`, `Service.TaggedAddresses` and `Service.Weights`, which carry Kratos'
//!   metadata and endpoint URLs (see the module docs for the details).

use std::collections::BTreeMap;
mod backoff;
pub mod consul;
mod dsn;
pub mod etcd;

pub use backoff::Backoff;
pub use dsn::{DiscoveryDsn, from_dsn};

/// One registered instance, the Kratos `ServiceInstance` shape (JSON field names exactly these).
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct ServiceInstance {
    /// Unique instance id within the service.
    pub id: String,
    /// Service name.
    pub name: String,
    /// Version the instance reports (may be empty).
    pub version: String,
    /// Free-form metadata (for example `weight`).
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// Endpoint URLs such as `http://127.0.0.1:8000?isSecure=false` or `grpc://127.0.0.1:9000`.
    #[serde(default)]
    pub endpoints: Vec<String>,
}

impl ServiceInstance {
    /// The first endpoint with this scheme ("http" or "grpc") as (host:port, secure) — secure
    /// from `?isSecure=true`.
    pub fn endpoint(&self, scheme: &str) -> Option<(String, bool)> {
        self.endpoints
            .iter()
            .find_map(|endpoint| parse_endpoint(endpoint, scheme))
    }
}

/// Splits `scheme://host:port[/path][?query]` into (host:port, secure) when the scheme matches.
fn parse_endpoint(endpoint: &str, scheme: &str) -> Option<(String, bool)> {
    let (endpoint_scheme, rest) = endpoint.split_once("://")?;
    if !endpoint_scheme.eq_ignore_ascii_case(scheme) {
        return None;
    }
    let (before_query, query) = match rest.split_once('?') {
        Some((before, query)) => (before, query),
        None => (rest, ""),
    };
    let authority = before_query.split('/').next().unwrap_or_default();
    // Drop any `user:pass@` part; Kratos never registers one, but a URL may carry it.
    let authority = authority.rsplit('@').next().unwrap_or_default();
    if authority.is_empty() {
        return None;
    }
    let secure = query.split('&').any(|pair| {
        pair.split_once('=')
            .is_some_and(|(key, value)| key == "isSecure" && value.eq_ignore_ascii_case("true"))
    });
    Some((authority.to_owned(), secure))
}

/// Why a registry request failed. Every variant is transient from the caller's point of view.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The registry could not be reached or the connection broke.
    #[error("registry {registry} unreachable: {reason}")]
    Unreachable {
        /// Registry address, as in [`Discovery::describe`].
        registry: String,
        /// What the transport reported.
        reason: String,
    },
    /// The registry answered with an error status or a body we could not read.
    #[error("bad response from registry {registry}: {reason}")]
    BadResponse {
        /// Registry address, as in [`Discovery::describe`].
        registry: String,
        /// What was wrong with the answer.
        reason: String,
    },
    /// The request did not complete in time.
    #[error("request to registry {registry} timed out after {after:?}")]
    Timeout {
        /// Registry address, as in [`Discovery::describe`].
        registry: String,
        /// How long we waited.
        after: std::time::Duration,
    },
    /// The service name cannot be looked up (empty, or unusable in the registry's layout).
    #[error("invalid service name {name:?}: {reason}")]
    InvalidName {
        /// The name as given.
        name: String,
        /// Why it is unusable.
        reason: &'static str,
    },
    /// The watcher was stopped; `next()` will not return more snapshots.
    #[error("watcher stopped")]
    Stopped,
}

/// A `--discovery` DSN that could not be parsed; the message names the problem.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DsnError {
    /// The DSN has no `scheme://` part.
    #[error("discovery DSN {dsn:?} has no scheme; expected consul://HOST:PORT or etcd://HOST:PORT")]
    MissingScheme {
        /// The DSN as given.
        dsn: String,
    },
    /// The scheme is neither `consul` nor `etcd`.
    #[error("unknown discovery scheme {scheme:?}; expected \"consul\" or \"etcd\"")]
    UnknownScheme {
        /// The scheme as given.
        scheme: String,
    },
    /// An address has no host.
    #[error("discovery DSN {dsn:?} is missing a host")]
    MissingHost {
        /// The DSN as given.
        dsn: String,
    },
    /// An address has a missing, non-numeric or out-of-range port.
    #[error("discovery DSN address {address:?} has a bad port: {reason}")]
    BadPort {
        /// The `host:port` as given.
        address: String,
        /// What is wrong with the port.
        reason: String,
    },
    /// The query string has an unknown key, a repeated key or a bad value.
    #[error("discovery DSN has a bad query: {reason}")]
    BadQuery {
        /// What is wrong with the query.
        reason: String,
    },
}

/// A service registry the gateway resolves `discovery:///name` targets through.
#[async_trait::async_trait]
pub trait Discovery: Send + Sync + 'static {
    /// Current instances of a service (one request).
    async fn get_service(&self, name: &str) -> Result<Vec<ServiceInstance>, Error>;
    /// Starts watching a service. The watcher's first `next()` returns the current snapshot.
    async fn watch(&self, name: &str) -> Result<Box<dyn Watcher>, Error>;
    /// Registry kind and address for logs/debug, e.g. "etcd://127.0.0.1:2379".
    fn describe(&self) -> String;
}

/// A running watch of one service that yields full snapshots of its instances.
#[async_trait::async_trait]
pub trait Watcher: Send + 'static {
    /// Next full snapshot of the service's instances (the first call: the current set; later:
    /// after each change). Err = a transient failure (the caller logs it, keeps the last nodes
    /// and calls next() again); the watcher itself backs off (exponential with jitter, capped
    /// ~5 s) and reconnects inside the following next() calls. Zero instances is Ok(vec![]).
    async fn next(&mut self) -> Result<Vec<ServiceInstance>, Error>;
    /// Stops the watch and frees its resources.
    async fn stop(&mut self);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_endpoints(endpoints: &[&str]) -> ServiceInstance {
        ServiceInstance {
            endpoints: endpoints
                .iter()
                .map(|endpoint| endpoint.to_string())
                .collect(),
            ..ServiceInstance::default()
        }
    }

    #[test]
    fn endpoint_picks_the_first_of_a_scheme() {
        let instance = with_endpoints(&[
            "grpc://10.0.0.1:9000?isSecure=true",
            "http://10.0.0.1:8000?isSecure=false",
            "http://10.0.0.2:8000",
        ]);
        assert_eq!(
            instance.endpoint("http"),
            Some(("10.0.0.1:8000".into(), false))
        );
        assert_eq!(
            instance.endpoint("grpc"),
            Some(("10.0.0.1:9000".into(), true))
        );
        assert_eq!(instance.endpoint("https"), None);
    }

    #[test]
    fn endpoint_reads_the_secure_flag_and_ignores_paths() {
        let instance = with_endpoints(&["HTTP://[::1]:8443/base?x=1&isSecure=TRUE"]);
        assert_eq!(instance.endpoint("http"), Some(("[::1]:8443".into(), true)));
        let instance = with_endpoints(&["http://h:1?isSecure=yes", "http://"]);
        assert_eq!(instance.endpoint("http"), Some(("h:1".into(), false)));
        assert_eq!(with_endpoints(&["http://"]).endpoint("http"), None);
        assert_eq!(with_endpoints(&["127.0.0.1:80"]).endpoint("http"), None);
    }

    #[test]
    fn json_shape_is_kratos() {
        let instance: ServiceInstance = serde_json::from_str(
            r#"{"id":"1","name":"helloworld","version":"v1","metadata":{"weight":"5"},
                "endpoints":["http://127.0.0.1:8000?isSecure=false"]}"#,
        )
        .expect("Kratos JSON");
        assert_eq!(
            instance.metadata.get("weight").map(String::as_str),
            Some("5")
        );
        let minimal: ServiceInstance =
            serde_json::from_str(r#"{"id":"1","name":"s","version":""}"#).expect("no maps");
        assert!(minimal.endpoints.is_empty() && minimal.metadata.is_empty());
        let text = serde_json::to_string(&minimal).expect("serialise");
        assert_eq!(
            text,
            r#"{"id":"1","name":"s","version":"","metadata":{},"endpoints":[]}"#
        );
    }
}

//! Consul discovery over the agent's HTTP API, written directly over hyper.
//!
//! # Why not rs-consul
//! rs-consul 0.15 (the crate the project names for Consul) does return the `X-Consul-Index` of a
//! blocking query (`ResponseMeta::index`), but its typed `ServiceNode.Service` carries only
//! `ID`, `Service`, `Address`, `Port` and `Tags`: `Service.Meta` (Kratos' metadata, including
//! `weight`), `Service.TaggedAddresses` (where Kratos registers its full endpoint URLs such as
//! `http://10.0.0.1:8000?isSecure=false` and `grpc://10.0.0.1:9000`) and `Service.Weights`
//! are dropped during deserialisation, and its raw response is not exposed. Without them a
//! Kratos service's gRPC endpoint, TLS flag and metadata would be lost, so this module sends
//! the one request it needs itself (a hyper-util pooled client) and parses the documented
//! `ServiceEntry` JSON.
//!
//! # Protocol
//! `GET /v1/health/service/<name>?passing=1[&dc=DC][&index=I&wait=W]`, with the ACL token in
//! `X-Consul-Token`. The first request of a watcher is not blocking and always yields a
//! snapshot. Later ones block on the last `X-Consul-Index`; a wake-up whose instance set did
//! not change emits nothing (Consul may wake a blocking query without a change). Following
//! Consul's blocking-query guidance: an index that goes backwards resets to 0 (an immediate
//! fresh read), an index of 0 is treated as 1 so a buggy agent cannot cause a hot loop, and
//! blocking requests are spaced at least [`MIN_REQUEST_INTERVAL`] apart. The client timeout
//! of a blocking request is `wait + wait/16` (Consul's own jitter) + 10 s. Errors back off
//! exponentially with jitter, capped at 5 s.
//!
//! # Instance mapping (as Kratos' Consul registry does)
//! `id` = `Service.ID`, `name` = `Service.Service`, `version` from the tag `version=<v>`,
//! `metadata` = `Service.Meta`, `endpoints` = the `Service.TaggedAddresses` values that are
//! full URLs (`scheme://...`; Consul's own `lan`/`wan` entries hold bare addresses and are
//! skipped), ordered by tag name; when there is none, `http://<Service.Address, else
//! Node.Address>:<Service.Port>`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use serde::Deserialize;

use crate::backoff::Backoff;
use crate::{Discovery, Error, ServiceInstance, Watcher};

/// Default `wait` of a blocking query (Kratos uses 55 s).
pub const DEFAULT_WAIT: Duration = Duration::from_secs(55);

/// Timeout of a non-blocking request, and the margin added to `wait` for blocking ones.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Minimum spacing between the starts of two consecutive requests of one watcher.
pub const MIN_REQUEST_INTERVAL: Duration = Duration::from_millis(50);

/// Largest response body accepted.
const MAX_BODY_BYTES: usize = 64 * 1024 * 1024;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Discovery over a Consul agent's HTTP API.
#[derive(Clone)]
pub struct ConsulDiscovery {
    api: HealthApi,
}

impl ConsulDiscovery {
    /// A discovery over the agent at `addr` (`host:port`, an `http://` prefix is accepted);
    /// connects on first use.
    pub fn new(addr: String, token: Option<String>, datacenter: Option<String>) -> Self {
        let address = addr
            .strip_prefix("http://")
            .unwrap_or(&addr)
            .trim_end_matches('/')
            .to_owned();
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .build(connector);
        Self {
            api: HealthApi {
                address,
                token: token.filter(|token| !token.is_empty()),
                datacenter: datacenter.filter(|datacenter| !datacenter.is_empty()),
                wait: DEFAULT_WAIT,
                client,
            },
        }
    }

    /// Sets the `wait` of blocking queries (default 55 s); tests use a short one.
    pub fn with_wait(mut self, wait: Duration) -> Self {
        self.api.wait = wait;
        self
    }
}

#[async_trait::async_trait]
impl Discovery for ConsulDiscovery {
    async fn get_service(&self, name: &str) -> Result<Vec<ServiceInstance>, Error> {
        check_name(name)?;
        Ok(self.api.health(name, None).await?.instances)
    }

    async fn watch(&self, name: &str) -> Result<Box<dyn Watcher>, Error> {
        check_name(name)?;
        Ok(Box::new(ConsulWatcher {
            api: self.api.clone(),
            service: name.to_owned(),
            index: 0,
            last: None,
            backoff: Backoff::default(),
            retry_pending: false,
            last_request: None,
            stopped: false,
        }))
    }

    fn describe(&self) -> String {
        self.api.describe()
    }
}

fn check_name(name: &str) -> Result<(), Error> {
    if name.is_empty() {
        return Err(Error::InvalidName {
            name: name.to_owned(),
            reason: "the name is empty",
        });
    }
    Ok(())
}

/// The `/v1/health/service` endpoint of one agent.
#[derive(Clone)]
struct HealthApi {
    address: String,
    token: Option<String>,
    datacenter: Option<String>,
    wait: Duration,
    client: Client<HttpConnector, Empty<Bytes>>,
}

/// One answer of the health endpoint.
struct HealthResponse {
    instances: Vec<ServiceInstance>,
    index: u64,
}

impl HealthApi {
    fn describe(&self) -> String {
        match &self.datacenter {
            Some(datacenter) => format!("consul://{}?datacenter={datacenter}", self.address),
            None => format!("consul://{}", self.address),
        }
    }

    fn bad_response(&self, reason: impl Into<String>) -> Error {
        Error::BadResponse {
            registry: self.describe(),
            reason: reason.into(),
        }
    }

    /// Queries the passing instances of `service`; blocking on `index` when given.
    async fn health(&self, service: &str, index: Option<u64>) -> Result<HealthResponse, Error> {
        let mut uri = format!(
            "http://{}/v1/health/service/{}?passing=1",
            self.address,
            percent_encode(service)
        );
        if let Some(datacenter) = &self.datacenter {
            uri.push_str("&dc=");
            uri.push_str(&percent_encode(datacenter));
        }
        let timeout = match index {
            Some(index) => {
                uri.push_str(&format!(
                    "&index={index}&wait={}ms",
                    self.wait.as_millis().max(1)
                ));
                self.wait + self.wait / 16 + REQUEST_TIMEOUT
            }
            None => REQUEST_TIMEOUT,
        };
        let mut request = http::Request::get(&uri).header(http::header::ACCEPT, "application/json");
        if let Some(token) = &self.token {
            request = request.header("X-Consul-Token", token);
        }
        let request = request
            .body(Empty::new())
            .map_err(|error| self.bad_response(format!("cannot build request {uri}: {error}")))?;

        let exchange = async {
            let response =
                self.client
                    .request(request)
                    .await
                    .map_err(|error| Error::Unreachable {
                        registry: self.describe(),
                        reason: error_chain(&error),
                    })?;
            let (parts, body) = response.into_parts();
            let body = Limited::new(body, MAX_BODY_BYTES)
                .collect()
                .await
                .map_err(|error| Error::Unreachable {
                    registry: self.describe(),
                    reason: format!("reading the response body: {error}"),
                })?
                .to_bytes();
            Ok::<_, Error>((parts, body))
        };
        let (parts, body) = tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| Error::Timeout {
                registry: self.describe(),
                after: timeout,
            })??;

        if !parts.status.is_success() {
            let text = String::from_utf8_lossy(&body);
            let text: String = text.trim().chars().take(200).collect();
            return Err(self.bad_response(format!("HTTP {} from {uri}: {text}", parts.status)));
        }
        let index = parts
            .headers
            .get("X-Consul-Index")
            .ok_or_else(|| self.bad_response("the response has no X-Consul-Index header"))?
            .to_str()
            .ok()
            .and_then(|value| value.trim().parse::<u64>().ok())
            .ok_or_else(|| self.bad_response("X-Consul-Index is not a number"))?;
        let entries: Vec<ServiceEntry> = serde_json::from_slice(&body)
            .map_err(|error| self.bad_response(format!("unreadable health JSON: {error}")))?;
        let mut instances: Vec<ServiceInstance> = entries
            .into_iter()
            .map(ServiceEntry::into_instance)
            .collect();
        instances
            .sort_by(|left, right| (&left.id, &left.endpoints).cmp(&(&right.id, &right.endpoints)));
        Ok(HealthResponse { instances, index })
    }
}

/// The parts of Consul's `ServiceEntry` we read; unknown fields are ignored so newer
/// agents keep working, and `null` collections read as empty.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ServiceEntry {
    #[serde(default)]
    node: Option<EntryNode>,
    service: EntryService,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct EntryNode {
    #[serde(default)]
    address: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct EntryService {
    #[serde(rename = "ID", default)]
    id: String,
    #[serde(default)]
    service: String,
    #[serde(default)]
    tags: Option<Vec<String>>,
    #[serde(default)]
    address: String,
    #[serde(default)]
    port: u16,
    #[serde(default)]
    meta: Option<BTreeMap<String, String>>,
    #[serde(default)]
    tagged_addresses: Option<BTreeMap<String, serde_json::Value>>,
}

impl ServiceEntry {
    fn into_instance(self) -> ServiceInstance {
        let service = self.service;
        let version = service
            .tags
            .iter()
            .flatten()
            .filter_map(|tag| tag.strip_prefix("version="))
            .next_back()
            .unwrap_or_default()
            .to_owned();
        let mut endpoints: Vec<String> = service
            .tagged_addresses
            .iter()
            .flatten()
            .filter_map(|(_, value)| {
                // Consul's shape is {"Address": ..., "Port": ...}; accept a bare string too.
                let address = match value {
                    serde_json::Value::Object(fields) => fields.get("Address")?.as_str()?,
                    serde_json::Value::String(text) => text.as_str(),
                    _ => return None,
                };
                address.contains("://").then(|| address.to_owned())
            })
            .collect();
        if endpoints.is_empty() {
            let host = if service.address.is_empty() {
                self.node.unwrap_or_default().address
            } else {
                service.address
            };
            if !host.is_empty() && service.port != 0 {
                let host = if host.contains(':') && !host.starts_with('[') {
                    format!("[{host}]")
                } else {
                    host
                };
                endpoints.push(format!("http://{host}:{}", service.port));
            }
        }
        ServiceInstance {
            id: service.id,
            name: service.service,
            version,
            metadata: service.meta.unwrap_or_default(),
            endpoints,
        }
    }
}

/// A blocking-query watch of one service, created by [`ConsulDiscovery::watch`].
///
/// `next()` is cancel-safe: dropping its future leaves the watcher consistent.
pub struct ConsulWatcher {
    api: HealthApi,
    service: String,
    /// The index to block on (0 = the next request is not blocking).
    index: u64,
    /// The last snapshot returned, `None` before the first.
    last: Option<Vec<ServiceInstance>>,
    backoff: Backoff,
    /// Set after a failure: the next call sleeps a backoff delay before trying again.
    retry_pending: bool,
    last_request: Option<Instant>,
    stopped: bool,
}

#[async_trait::async_trait]
impl Watcher for ConsulWatcher {
    async fn next(&mut self) -> Result<Vec<ServiceInstance>, Error> {
        loop {
            if self.stopped {
                return Err(Error::Stopped);
            }
            if self.retry_pending {
                tokio::time::sleep(self.backoff.next_delay()).await;
                self.retry_pending = false;
            } else if let Some(previous) = self.last_request {
                let since = previous.elapsed();
                if since < MIN_REQUEST_INTERVAL {
                    tokio::time::sleep(MIN_REQUEST_INTERVAL - since).await;
                }
            }
            let blocking_index = (self.last.is_some() && self.index > 0).then_some(self.index);
            self.last_request = Some(Instant::now());
            let response = match self.api.health(&self.service, blocking_index).await {
                Ok(response) => response,
                Err(error) => {
                    tracing::warn!(service = %self.service, %error, "consul watch failed; will retry");
                    self.retry_pending = true;
                    return Err(error);
                }
            };
            self.backoff.reset();
            if response.index < self.index {
                tracing::info!(
                    service = %self.service,
                    previous = self.index,
                    index = response.index,
                    "consul index went backwards; resetting it"
                );
                self.index = 0;
            } else {
                self.index = response.index.max(1);
            }
            if self.last.as_ref() != Some(&response.instances) {
                self.last = Some(response.instances.clone());
                return Ok(response.instances);
            }
        }
    }

    async fn stop(&mut self) {
        self.stopped = true;
    }
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
fn percent_encode(text: &str) -> String {
    let mut encoded = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            encoded.push(byte as char);
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}

/// An error and its sources on one line (hyper's top-level message alone is vague).
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(json: serde_json::Value) -> ServiceInstance {
        serde_json::from_value::<ServiceEntry>(json)
            .expect("a valid entry")
            .into_instance()
    }

    #[test]
    fn kratos_registration_maps_to_its_instance() {
        let instance = entry(serde_json::json!({
            "Node": {"ID": "n1", "Node": "node1", "Address": "10.0.0.9", "Datacenter": "dc1"},
            "Service": {
                "ID": "helloworld-1", "Service": "helloworld",
                "Tags": ["primary", "version=v1.2.3"],
                "Address": "10.0.0.1", "Port": 8000,
                "Meta": {"weight": "20", "zone": "a"},
                "Weights": {"Passing": 1, "Warning": 1},
                "TaggedAddresses": {
                    "http": {"Address": "http://10.0.0.1:8000?isSecure=false", "Port": 8000},
                    "grpc": {"Address": "grpc://10.0.0.1:9000?isSecure=true", "Port": 9000},
                    "lan_ipv4": {"Address": "10.0.0.1", "Port": 8000},
                    "wan_ipv4": {"Address": "1.2.3.4", "Port": 8000}
                },
                "EnableTagOverride": false
            },
            "Checks": []
        }));
        assert_eq!(instance.id, "helloworld-1");
        assert_eq!(instance.name, "helloworld");
        assert_eq!(instance.version, "v1.2.3");
        assert_eq!(
            instance.metadata.get("weight").map(String::as_str),
            Some("20")
        );
        assert_eq!(
            instance.endpoints,
            [
                "grpc://10.0.0.1:9000?isSecure=true",
                "http://10.0.0.1:8000?isSecure=false"
            ]
        );
        assert_eq!(
            instance.endpoint("grpc"),
            Some(("10.0.0.1:9000".to_owned(), true))
        );
        assert_eq!(
            instance.endpoint("http"),
            Some(("10.0.0.1:8000".to_owned(), false))
        );
    }

    #[test]
    fn address_and_port_when_no_url_is_tagged() {
        let with_service_address = entry(serde_json::json!({
            "Node": {"Address": "10.0.0.9"},
            "Service": {"ID": "a", "Service": "s", "Address": "10.0.0.1", "Port": 80,
                        "TaggedAddresses": {"lan_ipv4": {"Address": "10.0.0.1", "Port": 80}}}
        }));
        assert_eq!(with_service_address.endpoints, ["http://10.0.0.1:80"]);
        assert_eq!(with_service_address.version, "");

        let with_node_address = entry(serde_json::json!({
            "Node": {"Address": "10.0.0.9"},
            "Service": {"ID": "a", "Service": "s", "Address": "", "Port": 81,
                        "Tags": null, "Meta": null, "TaggedAddresses": null}
        }));
        assert_eq!(with_node_address.endpoints, ["http://10.0.0.9:81"]);
        assert!(with_node_address.metadata.is_empty());

        let ipv6 = entry(serde_json::json!({
            "Service": {"ID": "a", "Service": "s", "Address": "::1", "Port": 82}
        }));
        assert_eq!(ipv6.endpoints, ["http://[::1]:82"]);

        let no_port = entry(serde_json::json!({
            "Service": {"ID": "a", "Service": "s", "Address": "10.0.0.1"}
        }));
        assert!(no_port.endpoints.is_empty());
    }

    #[test]
    fn names_are_percent_encoded() {
        assert_eq!(percent_encode("hello world/x"), "hello%20world%2Fx");
        assert_eq!(percent_encode("a-b_c.d~e"), "a-b_c.d~e");
    }
}

//! An in-process double of a Consul agent's HTTP API, faithful in the behaviours service
//! discovery depends on. It serves plain HTTP/1.1 on `127.0.0.1:<free port>`; one agent, one
//! node (`node1`, 127.0.0.1) in one datacenter (`dc1`).
//!
//! # Reproduced behaviours
//! - `GET /v1/health/service/<name>`: the `ServiceEntry` JSON shape
//!   (`Node{ID,Node,Address,Datacenter,TaggedAddresses,Meta,CreateIndex,ModifyIndex}`,
//!   `Service{Kind,ID,Service,Tags,Address,TaggedAddresses,Meta,Port,Weights{Passing,Warning},
//!   EnableTagOverride,CreateIndex,ModifyIndex}`, `Checks[{Node,CheckID,Name,Status,Notes,
//!   Output,ServiceID,ServiceName,ServiceTags,Type,CreateIndex,ModifyIndex}]`, the node's
//!   `serfHealth` check first). `passing` (present, and not `false`/`0`) keeps only entries
//!   whose checks are all `passing`. `dc` other than `dc1` is a 500 "No path to datacenter".
//! - Blocking queries: with `index` > 0 the request waits while the service's index ≤ `index`,
//!   until it changes or `wait` elapses (Go duration, default 5m, capped at 10m; Consul's
//!   extra jitter of up to wait/16 is not added, to keep tests predictable), then answers with
//!   the current body and index, changed or not. Every response of the endpoint carries
//!   `X-Consul-Index` (plus `X-Consul-Knownleader` and `X-Consul-Lastcontact`). A bad
//!   `index` or `wait` is a 400.
//! - Indexes: one raft-like counter bumped by every write; a service's index is the counter
//!   value of its last change (registration, deregistration, check status or output change);
//!   an unknown service answers with the highest index so far, as Consul does for a missing
//!   service (its table index). A TTL update that changes neither status nor output writes
//!   nothing, so it does not wake blocking queries.
//! - `PUT /v1/agent/service/register`: Consul's `AgentServiceRegistration` body (`ID` default
//!   `Name`, `Name` required, `Tags`, `Address`, `Port`, `Meta`, `Weights` default
//!   `{Passing:1, Warning:1}`, `TaggedAddresses` `{tag: {Address, Port}}`, `EnableTagOverride`,
//!   `Check` or `Checks`). A non-empty IPv4 (IPv6) `Address` adds `lan_ipv4`/`wan_ipv4`
//!   (`lan_ipv6`/`wan_ipv6`) tagged addresses, as the agent does. Check IDs default to
//!   `service:<ID>` when the registration has one check, `service:<ID>:<n>` (from 1) when it
//!   has several; a check's initial status is its `Status`, else `critical`. Re-registering
//!   an ID replaces it (and its checks).
//! - TTL checks: `PUT /v1/agent/check/pass|warn|fail/<CheckID>[?note=...]` set the status and
//!   output; a TTL check not refreshed within its `TTL` turns `critical` with output
//!   `TTL expired`. Updating a non-TTL check is a 500; an unknown check ID is a 404.
//! - `PUT /v1/agent/service/deregister/<ID>` removes the service and its checks (404 if
//!   unknown).
//! - ACL token: when the double is started with a token, every request must carry it in
//!   `X-Consul-Token` (or `?token=`); otherwise 403 `ACL not found`. (Real Consul filters
//!   reads for the anonymous token instead of refusing them; refusing is the stricter test.)
//! - Methods: a wrong method on a known path is a 405.
//!
//! - KV store (`/v1/kv/<key>`), as Consul's HTTP handler and state store behave:
//!   - `GET` answers `[{"LockIndex","Key","Flags","Value","Session","CreateIndex",
//!     "ModifyIndex"}]` (`Value` Base64, `null` for an empty value; `Session` only while a
//!     session holds the key), or a 404 with an empty body when nothing matches. The mere
//!     presence of `recurse` (even `recurse=false`) lists the prefix, as Consul checks only
//!     that the parameter is there. `X-Consul-Index`: a single key's `ModifyIndex`; for a
//!     list, the highest `ModifyIndex` or tombstone (a deleted key's index) under the prefix;
//!     when neither exists, the KV table's index. Blocking queries (`index`, `wait`) wait while
//!     that index is ≤ `index`, as for health. `?keys` and `?raw` are not reproduced (400).
//!   - `PUT` answers `true`/`false` (JSON): `?cas=N` writes only if the key's `ModifyIndex`
//!     is N (`0`: only if the key does not exist); `?acquire=S` writes and locks the key for
//!     session S unless another session holds it or the key is in its lock-delay (`false`),
//!     an unknown session is a 500 `invalid session "S"`; `?release=S` unlocks; `?flags=N`.
//!     More than one of `cas`, `acquire`, `release` is a 400 `Conflicting flags`; a value over
//!     512 KiB a 413; a write that changes nothing keeps the `ModifyIndex`.
//!   - `DELETE` answers `true`; `?cas=N` deletes only if the `ModifyIndex` is N (`true` also
//!     when the key does not exist, as Consul does); `?recurse` deletes the prefix; both
//!     together are a 400 `Conflicting flags`.
//! - Sessions (`/v1/session/...`): `PUT create` with `Name`, `TTL`, `Behavior` (`release`
//!   default, or `delete`), `LockDelay` (default 15 s; a number or string below 1000 ns is
//!   taken as seconds, as Consul does) answers `{"ID"}`; a TTL outside
//!   [`session_ttl_min`, 24h] is a 500 `Invalid Session TTL '<ns>', must be between
//!   [10s=24h0m0s]` (`session_ttl_min` defaults to 10 s as in Consul; see
//!   [`ConsulDouble::set_session_ttl_min`]). `PUT renew/<id>` answers `[session]` or a 404
//!   `Session id '<id>' not found`; `PUT destroy/<id>` answers `true`; `GET info/<id>` and
//!   `GET list` answer `[session...]`. A TTL session is invalidated when not renewed within
//!   twice its TTL (Consul's `SessionTTLMultiplier`); invalidation (expiry or destroy)
//!   deletes the keys it holds (`delete`) or unlocks them (`release`), and starts their
//!   lock-delay. Session blocking queries and health checks bound to sessions are not
//!   reproduced (the node's `serfHealth` is always passing).
//!
//! # Test controls
//! [`ConsulDouble::set_index`] forces every index down to `n` (as a snapshot restore does)
//! and releases blocked queries at once; [`ConsulDouble::fail_next`] makes the next `n`
//! health requests fail with a 500; [`ConsulDouble::request_count`] counts health requests,
//! [`ConsulDouble::kv_request_count`] KV reads. [`ConsulDouble::stop`] closes the port and
//! every connection (blocked queries included) and [`ConsulDouble::restart`] serves the same
//! data on the same port again, as an agent restarted with its data dir; session TTLs do not
//! run while it is stopped and restart from their full length, as Consul resets its session
//! timers when a leader takes over.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use discovery::ServiceInstance;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

const NODE: &str = "node1";
const NODE_ID: &str = "5c3ee6c2-3b8e-4a57-9a49-5f1d3b9c0a01";
const NODE_ADDRESS: &str = "127.0.0.1";
const DATACENTER: &str = "dc1";
const DEFAULT_WAIT: Duration = Duration::from_secs(300);
const MAX_WAIT: Duration = Duration::from_secs(600);
/// Consul's `kv_max_value_size` default.
const KV_MAX_VALUE_SIZE: usize = 512 * 1024;
/// Consul's `session_ttl_min` default.
const SESSION_TTL_MIN: Duration = Duration::from_secs(10);
/// Consul's `structs.SessionTTLMax`.
const SESSION_TTL_MAX: Duration = Duration::from_secs(24 * 3600);
/// Consul's `structs.SessionTTLMultiplier`: a session expires after twice its TTL.
const SESSION_TTL_MULTIPLIER: u32 = 2;
/// A session's lock-delay when the create request names none.
const DEFAULT_LOCK_DELAY: Duration = Duration::from_secs(15);

/// A running Consul double; stops serving when dropped.
pub struct ConsulDouble {
    address: SocketAddr,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    /// The listener's token and task while serving (`None` while stopped).
    serving: Mutex<Option<(CancellationToken, tokio::task::JoinHandle<()>)>>,
}

struct Shared {
    state: Mutex<State>,
    /// Bumped on every write (and by `set_index`), waking blocked queries.
    changes: tokio::sync::watch::Sender<u64>,
    token: Option<String>,
}

#[derive(Default)]
struct State {
    /// The raft-like index of the last write.
    index: u64,
    /// Bumped by `set_index`: blocked queries return at once, as after a snapshot restore.
    restores: u64,
    services: BTreeMap<String, Service>,
    checks: BTreeMap<String, Check>,
    /// Index of the last change to any instance of a service name (Consul's
    /// `service.<name>` index), so a deregistration wakes that name's queries.
    name_index: BTreeMap<String, u64>,
    fail_next: usize,
    health_requests: usize,
    /// The KV store, by key.
    kv: BTreeMap<String, KvEntry>,
    /// Deleted keys and the index of their deletion (Consul's graveyard; never reaped here).
    tombstones: BTreeMap<String, u64>,
    /// Index of the last change to the KV or tombstone tables.
    kv_table_index: u64,
    /// Sessions by ID.
    sessions: BTreeMap<String, Session>,
    /// Index of the last change to the sessions table.
    sessions_index: u64,
    /// Keys in their lock-delay, until when.
    lock_delays: BTreeMap<String, Instant>,
    session_ttl_min: Duration,
    /// Between `stop` and `restart`: no TTL runs.
    stopped: bool,
    kv_requests: usize,
    /// Makes session IDs.
    session_counter: u64,
}

/// One key of the KV store (Consul's `DirEntry`).
#[derive(Clone, PartialEq)]
struct KvEntry {
    value: Option<Vec<u8>>,
    flags: u64,
    session: String,
    lock_index: u64,
    create_index: u64,
    modify_index: u64,
}

#[derive(Clone)]
struct Session {
    id: String,
    name: String,
    node_checks: Vec<String>,
    lock_delay: Duration,
    behavior: String,
    /// As sent (`""`: no TTL).
    ttl: String,
    ttl_duration: Option<Duration>,
    expires_at: Option<Instant>,
    create_index: u64,
    modify_index: u64,
}

#[derive(Clone)]
struct Service {
    id: String,
    name: String,
    tags: Vec<String>,
    address: String,
    port: u16,
    meta: BTreeMap<String, String>,
    weights: Weights,
    tagged_addresses: BTreeMap<String, TaggedAddress>,
    enable_tag_override: bool,
    create_index: u64,
    modify_index: u64,
}

#[derive(Clone)]
struct Check {
    id: String,
    name: String,
    service_id: String,
    status: String,
    output: String,
    notes: String,
    ttl: Option<Duration>,
    kind: &'static str,
    expires_at: Option<Instant>,
    create_index: u64,
    modify_index: u64,
}

#[derive(Clone, Copy, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Weights {
    passing: i64,
    warning: i64,
}

#[derive(Clone, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct TaggedAddress {
    #[serde(default)]
    address: String,
    #[serde(default)]
    port: u16,
}

/// Consul's `AgentServiceRegistration` (the fields the double acts on).
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Registration {
    #[serde(rename = "ID", default)]
    id: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    tags: Option<Vec<String>>,
    #[serde(default)]
    address: String,
    #[serde(default)]
    port: u16,
    #[serde(default)]
    meta: Option<BTreeMap<String, String>>,
    #[serde(default)]
    weights: Option<Weights>,
    #[serde(default)]
    tagged_addresses: Option<BTreeMap<String, TaggedAddress>>,
    #[serde(default)]
    enable_tag_override: bool,
    #[serde(default)]
    check: Option<CheckDefinition>,
    #[serde(default)]
    checks: Option<Vec<CheckDefinition>>,
}

/// Consul's `AgentServiceCheck`.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct CheckDefinition {
    #[serde(rename = "CheckID", default)]
    check_id: String,
    #[serde(default)]
    name: String,
    #[serde(rename = "TTL", default)]
    ttl: String,
    #[serde(rename = "HTTP", default)]
    http: String,
    #[serde(rename = "TCP", default)]
    tcp: String,
    #[serde(default)]
    status: String,
    #[serde(default)]
    notes: String,
}

impl ConsulDouble {
    /// Starts a double that needs no ACL token.
    pub async fn start() -> ConsulDouble {
        Self::start_inner(None).await
    }

    /// Starts a double that requires this ACL token on every request.
    pub async fn start_with_token(token: &str) -> ConsulDouble {
        Self::start_inner(Some(token.to_owned())).await
    }

    async fn start_inner(token: Option<String>) -> ConsulDouble {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the Consul double");
        let address = listener.local_addr().expect("local address");
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                // A fresh Consul has written its own node and serfHealth check already.
                index: 10,
                session_ttl_min: SESSION_TTL_MIN,
                ..State::default()
            }),
            changes: tokio::sync::watch::channel(0).0,
            token,
        });
        let shutdown = CancellationToken::new();
        let serving = shutdown.child_token();
        let task = tokio::spawn(serve(listener, Arc::clone(&shared), serving.clone()));
        tokio::spawn(expire_ttls(Arc::clone(&shared), shutdown.clone()));
        ConsulDouble {
            address,
            shared,
            shutdown,
            serving: Mutex::new(Some((serving, task))),
        }
    }

    /// Stops serving: the port is closed and every open connection (blocked queries
    /// included) is dropped. The data stays for [`ConsulDouble::restart`].
    pub async fn stop(&self) {
        let serving = self
            .serving
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        self.shared.lock().stopped = true;
        if let Some((token, task)) = serving {
            token.cancel();
            let _ = task.await;
        }
    }

    /// Serves the same data on the same port again (retrying the bind for up to 5 s) and
    /// restarts every session and check TTL from its full length.
    pub async fn restart(&self) {
        if self
            .serving
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .is_some()
        {
            return;
        }
        let started = Instant::now();
        let listener = loop {
            match TcpListener::bind(self.address).await {
                Ok(listener) => break listener,
                Err(error) if started.elapsed() > Duration::from_secs(5) => {
                    panic!("rebind the Consul double on {}: {error}", self.address)
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        {
            let mut state = self.shared.lock();
            state.stopped = false;
            let now = Instant::now();
            for session in state.sessions.values_mut() {
                session.expires_at = session
                    .ttl_duration
                    .map(|ttl| now + ttl * SESSION_TTL_MULTIPLIER);
            }
            for check in state.checks.values_mut() {
                if let (Some(ttl), Some(_)) = (check.ttl, check.expires_at) {
                    check.expires_at = Some(now + ttl);
                }
            }
        }
        let serving = self.shutdown.child_token();
        let task = tokio::spawn(serve(listener, Arc::clone(&self.shared), serving.clone()));
        *self
            .serving
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some((serving, task));
    }

    /// Sets Consul's `session_ttl_min` (default 10 s): the shortest session TTL accepted.
    pub fn set_session_ttl_min(&self, min: Duration) {
        self.shared.lock().session_ttl_min = min;
    }

    /// How many `GET /v1/kv/...` requests were received so far.
    pub fn kv_request_count(&self) -> usize {
        self.shared.lock().kv_requests
    }

    /// The keys of the KV store, sorted.
    pub fn kv_keys(&self) -> Vec<String> {
        self.shared.lock().kv.keys().cloned().collect()
    }

    /// The value under `key` (`None` when missing; an empty value is `Some("")`).
    pub fn kv_value(&self, key: &str) -> Option<String> {
        self.shared.lock().kv.get(key).map(|entry| {
            String::from_utf8_lossy(entry.value.as_deref().unwrap_or_default()).into_owned()
        })
    }

    /// The IDs of the live sessions, sorted.
    pub fn session_ids(&self) -> Vec<String> {
        self.shared.lock().sessions.keys().cloned().collect()
    }

    /// `127.0.0.1:PORT` of the HTTP API.
    pub fn address(&self) -> String {
        self.address.to_string()
    }

    /// Forces every index down to `n` (as a restore from an older snapshot does) and
    /// releases blocked queries immediately.
    pub fn set_index(&self, n: u64) {
        let mut state = self.shared.lock();
        state.index = n;
        state.restores += 1;
        for service in state.services.values_mut() {
            service.modify_index = service.modify_index.min(n);
            service.create_index = service.create_index.min(n);
        }
        for check in state.checks.values_mut() {
            check.modify_index = check.modify_index.min(n);
            check.create_index = check.create_index.min(n);
        }
        for index in state.name_index.values_mut() {
            *index = (*index).min(n);
        }
        for entry in state.kv.values_mut() {
            entry.modify_index = entry.modify_index.min(n);
            entry.create_index = entry.create_index.min(n);
        }
        for index in state.tombstones.values_mut() {
            *index = (*index).min(n);
        }
        state.kv_table_index = state.kv_table_index.min(n);
        state.sessions_index = state.sessions_index.min(n);
        drop(state);
        self.shared.notify();
    }

    /// The next `n` health requests fail with HTTP 500.
    pub fn fail_next(&self, n: usize) {
        self.shared.lock().fail_next = n;
    }

    /// How many `GET /v1/health/service/...` requests were received so far.
    pub fn request_count(&self) -> usize {
        self.shared.lock().health_requests
    }

    /// The current index (of the last write).
    pub fn index(&self) -> u64 {
        self.shared.lock().index
    }

    /// Sends `PUT <path>` with a JSON body over HTTP, as a client of the agent would, and
    /// returns the status.
    pub async fn put(&self, path: &str, body: Option<Value>) -> StatusCode {
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<Full<Bytes>>();
        let body = body.map(|body| body.to_string()).unwrap_or_default();
        let mut request = Request::put(format!("http://{}{path}", self.address));
        if let Some(token) = &self.shared.token {
            request = request.header("X-Consul-Token", token);
        }
        let request = request
            .body(Full::new(Bytes::from(body)))
            .expect("build request");
        let response = client.request(request).await.expect("PUT to the double");
        response.status()
    }

    /// Sends `method path` with a raw body (and the double's token, if any), as a client of
    /// the agent would; answers the status, headers and body.
    pub async fn request(
        &self,
        method: &str,
        path: &str,
        body: impl Into<Bytes>,
    ) -> (StatusCode, http::HeaderMap, String) {
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<Full<Bytes>>();
        let mut request = Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", self.address));
        if let Some(token) = &self.shared.token {
            request = request.header("X-Consul-Token", token);
        }
        let request = request.body(Full::new(body.into())).expect("build request");
        let response = client
            .request(request)
            .await
            .expect("request to the double");
        let (parts, body) = response.into_parts();
        let body = body.collect().await.expect("read the body").to_bytes();
        (
            parts.status,
            parts.headers,
            String::from_utf8_lossy(&body).into_owned(),
        )
    }

    /// `PUT /v1/agent/service/register` with this registration; panics unless 200.
    pub async fn register(&self, registration: Value) {
        let status = self
            .put("/v1/agent/service/register", Some(registration))
            .await;
        assert_eq!(status, StatusCode::OK, "register");
    }

    /// Registers `instance` exactly as Kratos' Consul registry does: Tags `version=<v>`, Meta
    /// = metadata, TaggedAddresses `{scheme: {Address: endpoint URL, Port}}`, Address/Port
    /// from the first endpoint, and a TTL check `service:<ID>` that starts `passing` (Kratos
    /// sends its first heartbeat right away).
    pub async fn register_kratos(&self, instance: &ServiceInstance) {
        let mut tagged = serde_json::Map::new();
        let mut first: Option<(String, u16)> = None;
        for endpoint in &instance.endpoints {
            let (scheme, rest) = endpoint.split_once("://").expect("endpoint URL");
            let authority = rest.split(['/', '?']).next().unwrap_or_default();
            let (host, port) = authority.rsplit_once(':').expect("host:port");
            let port: u16 = port.parse().expect("port");
            first.get_or_insert((host.to_owned(), port));
            tagged.insert(
                scheme.to_owned(),
                json!({"Address": endpoint, "Port": port}),
            );
        }
        let (address, port) = first.unwrap_or_default();
        self.register(json!({
            "ID": instance.id,
            "Name": instance.name,
            "Tags": [format!("version={}", instance.version)],
            "Meta": instance.metadata,
            "Address": address,
            "Port": port,
            "TaggedAddresses": tagged,
            "Checks": [{"CheckID": format!("service:{}", instance.id), "TTL": "30s", "Status": "passing"}],
        }))
        .await;
    }

    /// `PUT /v1/agent/service/deregister/<id>`; panics unless 200.
    pub async fn deregister(&self, id: &str) {
        let status = self
            .put(&format!("/v1/agent/service/deregister/{id}"), None)
            .await;
        assert_eq!(status, StatusCode::OK, "deregister {id}");
    }

    /// `PUT /v1/agent/check/pass/<check_id>`; panics unless 200.
    pub async fn pass(&self, check_id: &str) {
        let status = self
            .put(&format!("/v1/agent/check/pass/{check_id}"), None)
            .await;
        assert_eq!(status, StatusCode::OK, "pass {check_id}");
    }

    /// `PUT /v1/agent/check/fail/<check_id>`; panics unless 200.
    pub async fn fail(&self, check_id: &str) {
        let status = self
            .put(&format!("/v1/agent/check/fail/{check_id}"), None)
            .await;
        assert_eq!(status, StatusCode::OK, "fail {check_id}");
    }
}

impl Drop for ConsulDouble {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn notify(&self) {
        self.changes.send_modify(|version| *version += 1);
    }
}

impl State {
    /// Records a write touching the service `name` and returns its index.
    fn write(&mut self, name: &str) -> u64 {
        self.index += 1;
        self.name_index.insert(name.to_owned(), self.index);
        self.index
    }

    /// The name of the service a check belongs to.
    fn service_name_of(&self, check_id: &str) -> String {
        self.checks
            .get(check_id)
            .and_then(|check| self.services.get(&check.service_id))
            .map(|service| service.name.clone())
            .unwrap_or_default()
    }

    /// The index a health query for `name` reports: the name's own index while it has
    /// instances, else the highest index (Consul's table index for a missing service).
    fn service_index(&self, name: &str) -> u64 {
        let exists = self.services.values().any(|service| service.name == name);
        let index = if exists {
            self.name_index.get(name).copied().unwrap_or(self.index)
        } else {
            self.index
        };
        // Consul never answers with index 0.
        index.max(1)
    }

    fn entries(&self, name: &str, passing_only: bool) -> Vec<Value> {
        self.services
            .values()
            .filter(|service| service.name == name)
            .filter_map(|service| {
                let checks: Vec<&Check> = self
                    .checks
                    .values()
                    .filter(|check| check.service_id == service.id)
                    .collect();
                if passing_only && checks.iter().any(|check| check.status != "passing") {
                    return None;
                }
                let mut check_json = vec![serf_health()];
                check_json.extend(checks.iter().map(|check| check_to_json(check, service)));
                Some(json!({
                    "Node": {
                        "ID": NODE_ID,
                        "Node": NODE,
                        "Address": NODE_ADDRESS,
                        "Datacenter": DATACENTER,
                        "TaggedAddresses": {
                            "lan": NODE_ADDRESS, "lan_ipv4": NODE_ADDRESS,
                            "wan": NODE_ADDRESS, "wan_ipv4": NODE_ADDRESS
                        },
                        "Meta": {"consul-network-segment": ""},
                        "CreateIndex": 5,
                        "ModifyIndex": 5
                    },
                    "Service": service_to_json(service),
                    "Checks": check_json,
                }))
            })
            .collect()
    }
}

fn serf_health() -> Value {
    json!({
        "Node": NODE,
        "CheckID": "serfHealth",
        "Name": "Serf Health Status",
        "Status": "passing",
        "Notes": "",
        "Output": "Agent alive and reachable",
        "ServiceID": "",
        "ServiceName": "",
        "ServiceTags": [],
        "Type": "",
        "Definition": {},
        "CreateIndex": 6,
        "ModifyIndex": 6
    })
}

fn service_to_json(service: &Service) -> Value {
    let mut value = json!({
        "Kind": "",
        "ID": service.id,
        "Service": service.name,
        "Tags": service.tags,
        "Address": service.address,
        "Meta": service.meta,
        "Port": service.port,
        "Weights": {"Passing": service.weights.passing, "Warning": service.weights.warning},
        "EnableTagOverride": service.enable_tag_override,
        "Proxy": {"Mode": "", "MeshGateway": {}, "Expose": {}},
        "Connect": {},
        "CreateIndex": service.create_index,
        "ModifyIndex": service.modify_index,
    });
    // Consul omits an empty TaggedAddresses.
    if !service.tagged_addresses.is_empty() {
        let tagged: serde_json::Map<String, Value> = service
            .tagged_addresses
            .iter()
            .map(|(tag, address)| {
                (
                    tag.clone(),
                    json!({"Address": address.address, "Port": address.port}),
                )
            })
            .collect();
        value["TaggedAddresses"] = Value::Object(tagged);
    }
    value
}

fn check_to_json(check: &Check, service: &Service) -> Value {
    json!({
        "Node": NODE,
        "CheckID": check.id,
        "Name": check.name,
        "Status": check.status,
        "Notes": check.notes,
        "Output": check.output,
        "ServiceID": service.id,
        "ServiceName": service.name,
        "ServiceTags": service.tags,
        "Type": check.kind,
        "Definition": {},
        "CreateIndex": check.create_index,
        "ModifyIndex": check.modify_index,
    })
}

async fn serve(listener: TcpListener, shared: Arc<Shared>, shutdown: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let Ok((stream, _)) = accepted else { continue };
        let shared = Arc::clone(&shared);
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let shared = Arc::clone(&shared);
                async move { Ok::<_, Infallible>(handle(&shared, request).await) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = connection => {}
            }
        });
    }
}

/// Turns expired TTL checks critical, as the agent's TTL timers do, and invalidates
/// sessions not renewed in time, as the leader's session timers do.
async fn expire_ttls(shared: Arc<Shared>, shutdown: CancellationToken) {
    let mut ticker = tokio::time::interval(Duration::from_millis(50));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let now = Instant::now();
        let mut state = shared.lock();
        if state.stopped {
            continue;
        }
        let expired_sessions: Vec<String> = state
            .sessions
            .values()
            .filter(|session| session.expires_at.is_some_and(|at| at <= now))
            .map(|session| session.id.clone())
            .collect();
        for id in &expired_sessions {
            state.invalidate_session(id, now);
        }
        let expired: Vec<String> = state
            .checks
            .values()
            .filter(|check| check.expires_at.is_some_and(|at| at <= now))
            .map(|check| check.id.clone())
            .collect();
        if expired.is_empty() {
            drop(state);
            if !expired_sessions.is_empty() {
                shared.notify();
            }
            continue;
        }
        let mut changed = !expired_sessions.is_empty();
        for id in expired {
            let name = state.service_name_of(&id);
            let Some(check) = state.checks.get_mut(&id) else {
                continue;
            };
            check.expires_at = None;
            if check.status == "critical" && check.output == "TTL expired" {
                continue;
            }
            let index = state.write(&name);
            if let Some(check) = state.checks.get_mut(&id) {
                check.status = "critical".to_owned();
                check.output = "TTL expired".to_owned();
                check.modify_index = index;
            }
            changed = true;
        }
        drop(state);
        if changed {
            shared.notify();
        }
    }
}

fn text(status: StatusCode, body: impl Into<String>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.into())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

fn query_params(request: &Request<Incoming>) -> BTreeMap<String, String> {
    request
        .uri()
        .query()
        .unwrap_or_default()
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(key), percent_decode(value))
        })
        .collect()
}

async fn handle(shared: &Shared, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let params = query_params(&request);
    if let Some(token) = &shared.token {
        let sent = request
            .headers()
            .get("X-Consul-Token")
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned)
            .or_else(|| params.get("token").cloned());
        if sent.as_deref() != Some(token.as_str()) {
            return text(StatusCode::FORBIDDEN, "ACL not found");
        }
    }
    let path = request.uri().path().to_owned();
    let method = request.method().clone();
    if let Some(key) = path.strip_prefix("/v1/kv/") {
        if let Some(datacenter) = params.get("dc")
            && !datacenter.is_empty()
            && datacenter != DATACENTER
        {
            return text(StatusCode::INTERNAL_SERVER_ERROR, "No path to datacenter");
        }
        // Consul refuses traversal in the raw path before decoding it.
        if key.contains("../") || key.to_ascii_lowercase().contains("%2e%2e") {
            return text(
                StatusCode::BAD_REQUEST,
                "URL path contains invalid traversal sequence",
            );
        }
        let key = percent_decode_path(key);
        return match method {
            Method::GET => kv_get(shared, &key, &params).await,
            Method::PUT => {
                let body = match request.into_body().collect().await {
                    Ok(body) => body.to_bytes(),
                    Err(error) => return text(StatusCode::BAD_REQUEST, error.to_string()),
                };
                kv_put(shared, &key, &params, &body)
            }
            Method::DELETE => kv_delete(shared, &key, &params),
            _ => text(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("method {method} not allowed"),
            ),
        };
    }
    if let Some(rest) = path.strip_prefix("/v1/session/") {
        let (verb, id) = rest.split_once('/').unwrap_or((rest, ""));
        let id = percent_decode_path(id);
        let wanted = match verb {
            "create" | "renew" | "destroy" => Method::PUT,
            "info" | "list" => Method::GET,
            _ => return text(StatusCode::NOT_FOUND, format!("no handler for {path}")),
        };
        if method != wanted {
            return text(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("method {method} not allowed"),
            );
        }
        return match verb {
            "create" => {
                let body = match request.into_body().collect().await {
                    Ok(body) => body.to_bytes(),
                    Err(error) => return text(StatusCode::BAD_REQUEST, error.to_string()),
                };
                session_create(shared, &body)
            }
            "renew" => session_renew(shared, &id),
            "destroy" => session_destroy(shared, &id),
            "info" => session_list(shared, Some(&id)),
            _ => session_list(shared, None),
        };
    }
    if let Some(name) = path.strip_prefix("/v1/health/service/") {
        if method != Method::GET {
            return text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
        }
        return health(shared, &percent_decode(name), &params).await;
    }
    let agent_write =
        path.starts_with("/v1/agent/service/") || path.starts_with("/v1/agent/check/");
    if agent_write && method != Method::PUT {
        return text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
    }
    if path == "/v1/agent/service/register" {
        let body = match request.into_body().collect().await {
            Ok(body) => body.to_bytes(),
            Err(error) => return text(StatusCode::BAD_REQUEST, error.to_string()),
        };
        return register(shared, &body);
    }
    if let Some(id) = path.strip_prefix("/v1/agent/service/deregister/") {
        let id = percent_decode(id);
        let mut state = shared.lock();
        let Some(removed) = state.services.remove(&id) else {
            return text(StatusCode::NOT_FOUND, format!("Unknown service ID {id:?}"));
        };
        state.checks.retain(|_, check| check.service_id != id);
        state.write(&removed.name);
        drop(state);
        shared.notify();
        return text(StatusCode::OK, "");
    }
    for (verb, status) in [
        ("pass", "passing"),
        ("warn", "warning"),
        ("fail", "critical"),
    ] {
        if let Some(id) = path.strip_prefix(&format!("/v1/agent/check/{verb}/")) {
            let note = params.get("note").cloned().unwrap_or_default();
            return update_ttl(shared, &percent_decode(id), status, &note);
        }
    }
    text(StatusCode::NOT_FOUND, format!("no handler for {path}"))
}

async fn health(
    shared: &Shared,
    name: &str,
    params: &BTreeMap<String, String>,
) -> Response<Full<Bytes>> {
    {
        let mut state = shared.lock();
        state.health_requests += 1;
        if state.fail_next > 0 {
            state.fail_next -= 1;
            return text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "rpc error making call: No cluster leader",
            );
        }
    }
    if let Some(datacenter) = params.get("dc")
        && !datacenter.is_empty()
        && datacenter != DATACENTER
    {
        return text(StatusCode::INTERNAL_SERVER_ERROR, "No path to datacenter");
    }
    let passing_only = params
        .get("passing")
        .is_some_and(|value| value != "false" && value != "0");
    let min_index = match params.get("index") {
        None => 0,
        Some(value) => match value.parse::<u64>() {
            Ok(index) => index,
            Err(_) => return text(StatusCode::BAD_REQUEST, "Invalid index"),
        },
    };
    let wait = match params.get("wait") {
        None => DEFAULT_WAIT,
        Some(value) => match parse_go_duration(value) {
            Some(wait) => wait.min(MAX_WAIT),
            None => return text(StatusCode::BAD_REQUEST, "Invalid wait time"),
        },
    };

    if min_index > 0 {
        let deadline = tokio::time::Instant::now() + wait;
        let mut changes = shared.changes.subscribe();
        let restores_at_start = shared.lock().restores;
        loop {
            {
                let state = shared.lock();
                if state.service_index(name) > min_index || state.restores != restores_at_start {
                    break;
                }
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => {}
                // Timed out (or the double is going away): answer with the current state.
                _ => break,
            }
        }
    }

    let state = shared.lock();
    let index = state.service_index(name);
    let body = Value::Array(state.entries(name, passing_only)).to_string();
    drop(state);
    let mut response = Response::new(Full::new(Bytes::from(body)));
    let headers = response.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    headers.insert("X-Consul-Index", http::HeaderValue::from(index));
    headers.insert(
        "X-Consul-Knownleader",
        http::HeaderValue::from_static("true"),
    );
    headers.insert("X-Consul-Lastcontact", http::HeaderValue::from_static("0"));
    response
}

fn register(shared: &Shared, body: &[u8]) -> Response<Full<Bytes>> {
    let registration: Registration = match serde_json::from_slice(body) {
        Ok(registration) => registration,
        Err(error) => {
            return text(
                StatusCode::BAD_REQUEST,
                format!("Request decode failed: {error}"),
            );
        }
    };
    if registration.name.is_empty() {
        return text(StatusCode::BAD_REQUEST, "Missing service name");
    }
    let id = if registration.id.is_empty() {
        registration.name.clone()
    } else {
        registration.id.clone()
    };
    // `Check` then `Checks`, as one list: a check without an ID is `service:<ID>`, numbered
    // `service:<ID>:<n>` (from 1) when the list holds more than one.
    let definitions: Vec<CheckDefinition> = registration
        .check
        .into_iter()
        .chain(registration.checks.into_iter().flatten())
        .collect();
    let numbered = definitions.len() > 1;
    let mut checks = Vec::new();
    for (position, definition) in definitions.into_iter().enumerate() {
        let default_id = if numbered {
            format!("service:{id}:{}", position + 1)
        } else {
            format!("service:{id}")
        };
        let ttl = match definition.ttl.as_str() {
            "" => None,
            ttl => match parse_go_duration(ttl) {
                Some(ttl) => Some(ttl),
                None => {
                    return text(
                        StatusCode::BAD_REQUEST,
                        format!("Invalid check: TTL {ttl:?}"),
                    );
                }
            },
        };
        let kind = if ttl.is_some() {
            "ttl"
        } else if !definition.http.is_empty() {
            "http"
        } else if !definition.tcp.is_empty() {
            "tcp"
        } else {
            ""
        };
        checks.push(Check {
            id: if definition.check_id.is_empty() {
                default_id
            } else {
                definition.check_id
            },
            name: if definition.name.is_empty() {
                format!("Service '{}' check", registration.name)
            } else {
                definition.name
            },
            service_id: id.clone(),
            status: if definition.status.is_empty() {
                "critical".to_owned()
            } else {
                definition.status
            },
            output: String::new(),
            notes: definition.notes,
            ttl,
            kind,
            expires_at: ttl.map(|ttl| Instant::now() + ttl),
            create_index: 0,
            modify_index: 0,
        });
    }

    let mut tagged_addresses = registration.tagged_addresses.unwrap_or_default();
    if let Ok(ip) = registration.address.parse::<std::net::IpAddr>() {
        let family = if ip.is_ipv4() { "ipv4" } else { "ipv6" };
        for side in ["lan", "wan"] {
            tagged_addresses
                .entry(format!("{side}_{family}"))
                .or_insert_with(|| TaggedAddress {
                    address: registration.address.clone(),
                    port: registration.port,
                });
        }
    }

    let mut state = shared.lock();
    if let Some(previous) = state.services.get(&id).map(|service| service.name.clone())
        && previous != registration.name
    {
        state.write(&previous);
    }
    let index = state.write(&registration.name);
    let create_index = state
        .services
        .get(&id)
        .map_or(index, |service| service.create_index);
    state.checks.retain(|_, check| check.service_id != id);
    for mut check in checks {
        check.create_index = index;
        check.modify_index = index;
        state.checks.insert(check.id.clone(), check);
    }
    state.services.insert(
        id.clone(),
        Service {
            id,
            name: registration.name,
            tags: registration.tags.unwrap_or_default(),
            address: registration.address,
            port: registration.port,
            meta: registration.meta.unwrap_or_default(),
            weights: registration.weights.unwrap_or(Weights {
                passing: 1,
                warning: 1,
            }),
            tagged_addresses,
            enable_tag_override: registration.enable_tag_override,
            create_index,
            modify_index: index,
        },
    );
    drop(state);
    shared.notify();
    text(StatusCode::OK, "")
}

fn update_ttl(shared: &Shared, id: &str, status: &str, note: &str) -> Response<Full<Bytes>> {
    let mut state = shared.lock();
    let Some(check) = state.checks.get(id) else {
        return text(StatusCode::NOT_FOUND, format!("Unknown check ID {id:?}"));
    };
    let Some(ttl) = check.ttl else {
        return text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("CheckID {id:?} does not have associated TTL"),
        );
    };
    let changed = check.status != status || check.output != note;
    let name = state.service_name_of(id);
    let index = if changed { state.write(&name) } else { 0 };
    if let Some(check) = state.checks.get_mut(id) {
        check.expires_at = Some(Instant::now() + ttl);
        if changed {
            check.status = status.to_owned();
            check.output = note.to_owned();
            check.modify_index = index;
        }
    }
    drop(state);
    if changed {
        shared.notify();
    }
    text(StatusCode::OK, "")
}

impl State {
    /// A raft apply: every KV or session write takes the next index, changed or not.
    fn apply(&mut self) -> u64 {
        self.index += 1;
        self.index
    }

    /// Consul's `kvsSetTxn`: keeps `CreateIndex`, keeps the session unless `update_session`,
    /// and writes nothing (the `ModifyIndex` stays) when the entry would not change.
    fn kv_set(&mut self, index: u64, key: &str, mut entry: KvEntry, update_session: bool) {
        let existing = self.kv.get(key);
        entry.create_index = existing.map_or(index, |existing| existing.create_index);
        if !update_session {
            entry.session = existing
                .map(|existing| existing.session.clone())
                .unwrap_or_default();
            entry.lock_index = existing.map_or(0, |existing| existing.lock_index);
        }
        if let Some(existing) = existing {
            let mut same = entry.clone();
            same.modify_index = existing.modify_index;
            if *existing == same {
                return;
            }
        }
        entry.modify_index = index;
        self.kv.insert(key.to_owned(), entry);
        self.kv_table_index = index;
    }

    /// Consul's `kvsDeleteTxn`: removes the key and leaves a tombstone.
    fn kv_delete(&mut self, index: u64, key: &str) {
        if self.kv.remove(key).is_some() {
            self.tombstones.insert(key.to_owned(), index);
            self.kv_table_index = index;
        }
    }

    fn kv_under<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = (&'a String, &'a KvEntry)> {
        self.kv
            .range(prefix.to_owned()..)
            .take_while(move |(key, _)| key.starts_with(prefix))
    }

    /// The `X-Consul-Index` of a read: `KVS.Get` answers the key's `ModifyIndex` (the table
    /// index when it is missing); `KVS.List` the highest `ModifyIndex` or tombstone under the
    /// prefix, else the table index. Never 0.
    fn kv_index(&self, key: &str, recurse: bool) -> u64 {
        let index = if recurse {
            let entries = self
                .kv_under(key)
                .map(|(_, entry)| entry.modify_index)
                .max();
            let graves = if key.is_empty() {
                Some(self.kv_table_index)
            } else {
                self.tombstones
                    .range(key.to_owned()..)
                    .take_while(|(grave, _)| grave.starts_with(key))
                    .map(|(_, index)| *index)
                    .max()
            };
            match entries.into_iter().chain(graves).max() {
                Some(index) if index != 0 => index,
                _ => self.kv_table_index,
            }
        } else {
            self.kv
                .get(key)
                .map_or(self.kv_table_index, |entry| entry.modify_index)
        };
        index.max(1)
    }

    /// Consul's `deleteSessionTxn`: starts the lock-delay of every key the session holds,
    /// then deletes (`delete`) or unlocks (`release`) them. `false` if there is no such
    /// session.
    fn invalidate_session(&mut self, id: &str, now: Instant) -> bool {
        let Some(session) = self.sessions.remove(id) else {
            return false;
        };
        let index = self.apply();
        self.sessions_index = index;
        let held: Vec<String> = self
            .kv
            .iter()
            .filter(|(_, entry)| entry.session == id)
            .map(|(key, _)| key.clone())
            .collect();
        for key in held {
            if !session.lock_delay.is_zero() {
                self.lock_delays
                    .insert(key.clone(), now + session.lock_delay);
            }
            if session.behavior == "delete" {
                self.kv_delete(index, &key);
            } else if let Some(entry) = self.kv.get_mut(&key) {
                entry.session.clear();
                entry.modify_index = index;
                self.kv_table_index = index;
            }
        }
        true
    }
}

fn kv_entry_json(key: &str, entry: &KvEntry) -> Value {
    let mut value = json!({
        "LockIndex": entry.lock_index,
        "Key": key,
        "Flags": entry.flags,
        "Value": entry
            .value
            .as_ref()
            .map(|value| base64::engine::general_purpose::STANDARD.encode(value)),
        "CreateIndex": entry.create_index,
        "ModifyIndex": entry.modify_index,
    });
    if !entry.session.is_empty() {
        value["Session"] = Value::String(entry.session.clone());
    }
    value
}

fn session_json(session: &Session) -> Value {
    json!({
        "ID": session.id,
        "Name": session.name,
        "Node": NODE,
        "NodeChecks": session.node_checks,
        "ServiceChecks": null,
        "LockDelay": session.lock_delay.as_nanos() as u64,
        "Behavior": session.behavior,
        "TTL": session.ttl,
        "CreateIndex": session.create_index,
        "ModifyIndex": session.modify_index,
    })
}

/// A JSON body with Consul's query-meta headers.
fn json_response(status: StatusCode, body: &Value, index: Option<u64>) -> Response<Full<Bytes>> {
    let body = if status == StatusCode::NOT_FOUND {
        String::new()
    } else {
        body.to_string()
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    if let Some(index) = index {
        headers.insert("X-Consul-Index", http::HeaderValue::from(index));
        headers.insert(
            "X-Consul-Knownleader",
            http::HeaderValue::from_static("true"),
        );
        headers.insert("X-Consul-Lastcontact", http::HeaderValue::from_static("0"));
    }
    response
}

/// A refusal: the status and text Consul answers with.
type Refusal = (StatusCode, String);

/// `index` and `wait` of a blocking query; `Err` is Consul's 400.
fn blocking_params(params: &BTreeMap<String, String>) -> Result<(u64, Duration), Refusal> {
    let invalid = |what: &str| (StatusCode::BAD_REQUEST, what.to_owned());
    let min_index = match params.get("index") {
        None => 0,
        Some(value) => value.parse::<u64>().map_err(|_| invalid("Invalid index"))?,
    };
    let wait = match params.get("wait") {
        None => DEFAULT_WAIT,
        Some(value) => parse_go_duration(value)
            .map(|wait| wait.min(MAX_WAIT))
            .ok_or_else(|| invalid("Invalid wait time"))?,
    };
    Ok((min_index, wait))
}

/// Waits while `index_of` ≤ `min_index` (at most `wait`), as Consul's blocking queries do;
/// a restore (`set_index`) releases the wait at once.
async fn block(shared: &Shared, min_index: u64, wait: Duration, index_of: impl Fn(&State) -> u64) {
    if min_index == 0 {
        return;
    }
    let deadline = tokio::time::Instant::now() + wait;
    let mut changes = shared.changes.subscribe();
    let restores_at_start = shared.lock().restores;
    loop {
        {
            let state = shared.lock();
            if index_of(&state) > min_index || state.restores != restores_at_start {
                return;
            }
        }
        match tokio::time::timeout_at(deadline, changes.changed()).await {
            Ok(Ok(())) => {}
            _ => return,
        }
    }
}

async fn kv_get(
    shared: &Shared,
    key: &str,
    params: &BTreeMap<String, String>,
) -> Response<Full<Bytes>> {
    shared.lock().kv_requests += 1;
    if params.contains_key("keys") || params.contains_key("raw") {
        return text(
            StatusCode::BAD_REQUEST,
            "the Consul double does not reproduce ?keys or ?raw",
        );
    }
    // Consul checks only that `recurse` is present, whatever its value.
    let recurse = params.contains_key("recurse");
    if !recurse && key.is_empty() {
        return text(StatusCode::BAD_REQUEST, "Missing key name");
    }
    let (min_index, wait) = match blocking_params(params) {
        Ok(blocking) => blocking,
        Err((status, message)) => return text(status, message),
    };
    block(shared, min_index, wait, |state| {
        state.kv_index(key, recurse)
    })
    .await;
    let state = shared.lock();
    let index = state.kv_index(key, recurse);
    let entries: Vec<Value> = if recurse {
        state
            .kv_under(key)
            .map(|(key, entry)| kv_entry_json(key, entry))
            .collect()
    } else {
        state
            .kv
            .get(key)
            .map(|entry| kv_entry_json(key, entry))
            .into_iter()
            .collect()
    };
    drop(state);
    let status = if entries.is_empty() {
        StatusCode::NOT_FOUND
    } else {
        StatusCode::OK
    };
    json_response(status, &Value::Array(entries), Some(index))
}

/// More than one of `flags` present: Consul's 400.
fn conflicting(params: &BTreeMap<String, String>, flags: &[&str]) -> Option<Response<Full<Bytes>>> {
    let present = flags
        .iter()
        .filter(|flag| params.contains_key(**flag))
        .count();
    (present > 1).then(|| {
        let encoded: Vec<String> = params
            .iter()
            .map(|(key, value)| format!("{key}={value}"))
            .collect();
        text(
            StatusCode::BAD_REQUEST,
            format!("Conflicting flags: {}\n", encoded.join("&")),
        )
    })
}

/// A `strconv.ParseUint` failure, which Consul returns as a 500.
fn parse_uint(name: &str, params: &BTreeMap<String, String>) -> Result<Option<u64>, Refusal> {
    match params.get(name) {
        None => Ok(None),
        Some(value) => value.parse::<u64>().map(Some).map_err(|_| {
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("strconv.ParseUint: parsing {value:?}: invalid syntax"),
            )
        }),
    }
}

fn kv_put(
    shared: &Shared,
    key: &str,
    params: &BTreeMap<String, String>,
    body: &[u8],
) -> Response<Full<Bytes>> {
    if key.is_empty() {
        return text(StatusCode::BAD_REQUEST, "Missing key name");
    }
    if let Some(response) = conflicting(params, &["cas", "acquire", "release"]) {
        return response;
    }
    let flags = match parse_uint("flags", params) {
        Ok(flags) => flags.unwrap_or(0),
        Err((status, message)) => return text(status, message),
    };
    let cas = match parse_uint("cas", params) {
        Ok(cas) => cas,
        Err((status, message)) => return text(status, message),
    };
    if body.len() > KV_MAX_VALUE_SIZE {
        return text(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "Request body({} bytes) too large, max size: {KV_MAX_VALUE_SIZE} bytes. See https://developer.hashicorp.com/docs/agent/config/config-files#kv_max_value_size.",
                body.len()
            ),
        );
    }
    let entry = KvEntry {
        // An empty body is stored as a nil value (`"Value": null`).
        value: (!body.is_empty()).then(|| body.to_vec()),
        flags,
        session: String::new(),
        lock_index: 0,
        create_index: 0,
        modify_index: 0,
    };
    let now = Instant::now();
    let mut state = shared.lock();
    let done = if let Some(session) = params.get("acquire") {
        // The leader checks the lock-delay before the write reaches the state store.
        if state.lock_delays.get(key).is_some_and(|until| *until > now) {
            false
        } else if session.is_empty() {
            return text(StatusCode::INTERNAL_SERVER_ERROR, "missing session");
        } else if !state.sessions.contains_key(session) {
            return text(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("invalid session {session:?}"),
            );
        } else {
            let index = state.apply();
            let lock_index = match state.kv.get(key) {
                Some(existing) if existing.session == *session => Some(existing.lock_index),
                Some(existing) if !existing.session.is_empty() => None,
                Some(existing) => Some(existing.lock_index + 1),
                None => Some(1),
            };
            match lock_index {
                Some(lock_index) => {
                    let entry = KvEntry {
                        session: session.clone(),
                        lock_index,
                        ..entry
                    };
                    state.kv_set(index, key, entry, true);
                    true
                }
                None => false,
            }
        }
    } else if let Some(session) = params.get("release") {
        if session.is_empty() {
            return text(StatusCode::INTERNAL_SERVER_ERROR, "missing session");
        }
        let index = state.apply();
        match state.kv.get(key) {
            Some(existing) if existing.session == *session => {
                let entry = KvEntry {
                    lock_index: existing.lock_index,
                    ..entry
                };
                state.kv_set(index, key, entry, true);
                true
            }
            _ => false,
        }
    } else if let Some(cas) = cas {
        let index = state.apply();
        let matches = match state.kv.get(key) {
            None => cas == 0,
            Some(existing) => cas != 0 && existing.modify_index == cas,
        };
        if matches {
            state.kv_set(index, key, entry, false);
        }
        matches
    } else {
        let index = state.apply();
        state.kv_set(index, key, entry, false);
        true
    };
    drop(state);
    shared.notify();
    json_response(StatusCode::OK, &Value::Bool(done), None)
}

fn kv_delete(
    shared: &Shared,
    key: &str,
    params: &BTreeMap<String, String>,
) -> Response<Full<Bytes>> {
    if let Some(response) = conflicting(params, &["recurse", "cas"]) {
        return response;
    }
    let recurse = params.contains_key("recurse");
    if !recurse && key.is_empty() {
        return text(StatusCode::BAD_REQUEST, "Missing key name");
    }
    let cas = match parse_uint("cas", params) {
        Ok(cas) => cas,
        Err((status, message)) => return text(status, message),
    };
    let mut state = shared.lock();
    let index = state.apply();
    let done = if recurse {
        let keys: Vec<String> = state.kv_under(key).map(|(key, _)| key.clone()).collect();
        for doomed in &keys {
            state.kv_delete(index, doomed);
        }
        if !keys.is_empty() {
            state.tombstones.insert(key.to_owned(), index);
        }
        true
    } else if let Some(cas) = cas {
        // Consul's `kvsDeleteCASTxn`: a missing key counts as deleted.
        match state.kv.get(key) {
            None => true,
            Some(existing) if existing.modify_index == cas => {
                state.kv_delete(index, key);
                true
            }
            Some(_) => false,
        }
    } else {
        state.kv_delete(index, key);
        true
    };
    drop(state);
    shared.notify();
    json_response(StatusCode::OK, &Value::Bool(done), None)
}

/// The value of `name` in a JSON object, matched case-insensitively as Consul's decoder does.
fn field<'a>(body: &'a Value, name: &str) -> Option<&'a Value> {
    body.as_object()?
        .iter()
        .find(|(key, _)| key.eq_ignore_ascii_case(name))
        .map(|(_, value)| value)
}

fn session_create(shared: &Shared, body: &[u8]) -> Response<Full<Bytes>> {
    let body: Value = if body.is_empty() {
        json!({})
    } else {
        match serde_json::from_slice(body) {
            Ok(body) => body,
            Err(error) => {
                return text(
                    StatusCode::BAD_REQUEST,
                    format!("Request decode failed: {error}"),
                );
            }
        }
    };
    let string = |name: &str| {
        field(&body, name)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    // Consul's FixupLockDelay: a string is a Go duration, a number nanoseconds; either
    // below 1000 ns is taken as seconds.
    let lock_delay = match field(&body, "LockDelay") {
        None | Some(Value::Null) => DEFAULT_LOCK_DELAY,
        Some(Value::String(text_value)) => match parse_go_duration(text_value) {
            Some(delay) if delay < Duration::from_nanos(1000) => {
                Duration::from_secs(delay.as_nanos() as u64)
            }
            Some(delay) => delay,
            None => {
                return text(
                    StatusCode::BAD_REQUEST,
                    format!("Request decode failed: time: invalid duration {text_value:?}"),
                );
            }
        },
        Some(Value::Number(number)) => {
            let nanos = number.as_f64().unwrap_or(0.0).max(0.0) as u64;
            if nanos < 1000 {
                Duration::from_secs(nanos)
            } else {
                Duration::from_nanos(nanos)
            }
        }
        Some(other) => {
            return text(
                StatusCode::BAD_REQUEST,
                format!("Request decode failed: LockDelay {other}"),
            );
        }
    };
    let behavior = match string("Behavior").as_str() {
        "" | "release" => "release".to_owned(),
        "delete" => "delete".to_owned(),
        other => {
            return text(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("Invalid Behavior setting '{other}'"),
            );
        }
    };
    let ttl = string("TTL");
    let mut state = shared.lock();
    let ttl_duration = if ttl.is_empty() {
        None
    } else {
        match parse_go_duration(&ttl) {
            None => {
                return text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("Session TTL '{ttl}' invalid: time: invalid duration {ttl:?}"),
                );
            }
            Some(duration) if duration.is_zero() => None,
            Some(duration) if duration < state.session_ttl_min || duration > SESSION_TTL_MAX => {
                return text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!(
                        "Invalid Session TTL '{}', must be between [{}={}]",
                        duration.as_nanos(),
                        go_duration(state.session_ttl_min),
                        go_duration(SESSION_TTL_MAX)
                    ),
                );
            }
            Some(duration) => Some(duration),
        }
    };
    let node_checks = match field(&body, "NodeChecks").or_else(|| field(&body, "Checks")) {
        Some(Value::Array(checks)) => checks
            .iter()
            .filter_map(|check| check.as_str().map(str::to_owned))
            .collect(),
        _ => vec!["serfHealth".to_owned()],
    };
    state.session_counter += 1;
    let id = session_id(state.session_counter);
    let index = state.apply();
    state.sessions_index = index;
    state.sessions.insert(
        id.clone(),
        Session {
            id: id.clone(),
            name: string("Name"),
            node_checks,
            lock_delay,
            behavior,
            ttl,
            ttl_duration,
            expires_at: ttl_duration.map(|ttl| Instant::now() + ttl * SESSION_TTL_MULTIPLIER),
            create_index: index,
            modify_index: index,
        },
    );
    drop(state);
    shared.notify();
    json_response(StatusCode::OK, &json!({ "ID": id }), None)
}

fn session_renew(shared: &Shared, id: &str) -> Response<Full<Bytes>> {
    if id.is_empty() {
        return text(StatusCode::BAD_REQUEST, "Missing session");
    }
    let mut state = shared.lock();
    let Some(session) = state.sessions.get_mut(id) else {
        return text(
            StatusCode::NOT_FOUND,
            format!("Session id '{id}' not found"),
        );
    };
    session.expires_at = session
        .ttl_duration
        .map(|ttl| Instant::now() + ttl * SESSION_TTL_MULTIPLIER);
    let body = Value::Array(vec![session_json(session)]);
    drop(state);
    json_response(StatusCode::OK, &body, None)
}

fn session_destroy(shared: &Shared, id: &str) -> Response<Full<Bytes>> {
    if id.is_empty() {
        return text(StatusCode::BAD_REQUEST, "Missing session");
    }
    let destroyed = shared.lock().invalidate_session(id, Instant::now());
    if destroyed {
        shared.notify();
    }
    json_response(StatusCode::OK, &Value::Bool(true), None)
}

/// `GET /v1/session/info/<id>` (`Some`) or `GET /v1/session/list`.
fn session_list(shared: &Shared, id: Option<&str>) -> Response<Full<Bytes>> {
    if id == Some("") {
        return text(StatusCode::BAD_REQUEST, "Missing session");
    }
    let state = shared.lock();
    let sessions: Vec<Value> = state
        .sessions
        .values()
        .filter(|session| id.is_none_or(|id| session.id == id))
        .map(session_json)
        .collect();
    let index = state.sessions_index.max(1);
    drop(state);
    json_response(StatusCode::OK, &Value::Array(sessions), Some(index))
}

/// A UUID-shaped session ID, unique within the double and unpredictable across runs.
fn session_id(counter: u64) -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(counter);
    let high = hasher.finish();
    hasher.write_u64(high);
    let low = hasher.finish();
    let hex = format!("{high:016x}{low:016x}");
    format!(
        "{}-{}-4{}-a{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[13..16],
        &hex[17..20],
        &hex[20..32]
    )
}

/// A duration as Go prints it ("10s", "1m30s", "24h0m0s", "500ms").
fn go_duration(duration: Duration) -> String {
    let total = duration.as_secs();
    if total == 0 {
        return format!("{}ms", duration.as_millis());
    }
    let (hours, minutes, seconds) = (total / 3600, total % 3600 / 60, total % 60);
    if hours > 0 {
        format!("{hours}h{minutes}m{seconds}s")
    } else if minutes > 0 {
        format!("{minutes}m{seconds}s")
    } else {
        format!("{seconds}s")
    }
}

/// Parses a Go duration ("55s", "1m30s", "250ms", "1.5h"); `None` if malformed.
fn parse_go_duration(text: &str) -> Option<Duration> {
    if text == "0" {
        return Some(Duration::ZERO);
    }
    let mut rest = text;
    let mut total = 0f64;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let number_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let number: f64 = rest[..number_end].parse().ok()?;
        rest = &rest[number_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let seconds_per_unit = match &rest[..unit_end] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        total += number * seconds_per_unit;
        rest = &rest[unit_end..];
    }
    Some(Duration::from_secs_f64(total))
}

/// Decodes `%XX` in a URL path (no `+` for space there, unlike a query).
fn percent_decode_path(text: &str) -> String {
    percent_decode(&text.replace('+', "%2B"))
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] == b'%'
            && let Some(hex) = bytes.get(index + 1..index + 3)
            && let Some(byte) = std::str::from_utf8(hex)
                .ok()
                .and_then(|hex| u8::from_str_radix(hex, 16).ok())
        {
            decoded.push(byte);
            index += 3;
            continue;
        }
        decoded.push(if bytes[index] == b'+' {
            b' '
        } else {
            bytes[index]
        });
        index += 1;
    }
    String::from_utf8_lossy(&decoded).into_owned()
}

#[cfg(test)]
mod unit_tests {
    use super::{ConsulDouble, parse_go_duration};
    use serde_json::Value;
    use std::time::{Duration, Instant};

    fn index(headers: &http::HeaderMap) -> u64 {
        headers
            .get("X-Consul-Index")
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.parse().ok())
            .expect("X-Consul-Index")
    }

    fn keys(body: &str) -> Vec<String> {
        serde_json::from_str::<Value>(body)
            .expect("JSON")
            .as_array()
            .expect("a list")
            .iter()
            .map(|entry| entry["Key"].as_str().unwrap_or_default().to_owned())
            .collect()
    }

    #[tokio::test]
    async fn kv_reads_writes_and_check_and_set() {
        let consul = ConsulDouble::start().await;
        let (status, headers, body) = consul.request("GET", "/v1/kv/app/?recurse", "").await;
        assert_eq!((status.as_u16(), body.as_str()), (404, ""));
        let empty_index = index(&headers);
        assert!(empty_index >= 1);

        let (status, _, body) = consul.request("PUT", "/v1/kv/app/a", "hello").await;
        assert_eq!((status.as_u16(), body.as_str()), (200, "true"));
        let (_, headers, body) = consul.request("GET", "/v1/kv/app/a", "").await;
        let entry = &serde_json::from_str::<Value>(&body).unwrap()[0];
        assert_eq!(entry["Key"], "app/a");
        assert_eq!(entry["Value"], "aGVsbG8=");
        assert_eq!(entry["Flags"], 0);
        assert_eq!(entry["LockIndex"], 0);
        assert!(entry.get("Session").is_none(), "no Session while unlocked");
        let a_index = entry["ModifyIndex"].as_u64().unwrap();
        assert_eq!(entry["CreateIndex"].as_u64().unwrap(), a_index);
        assert_eq!(index(&headers), a_index, "a key's index is its ModifyIndex");
        assert!(a_index > empty_index);

        // Writing the same value changes nothing.
        consul.request("PUT", "/v1/kv/app/a", "hello").await;
        let (_, headers, _) = consul.request("GET", "/v1/kv/app/a", "").await;
        assert_eq!(index(&headers), a_index);

        // cas: 0 creates only; N must be the ModifyIndex.
        let (_, _, body) = consul.request("PUT", "/v1/kv/app/a?cas=0", "x").await;
        assert_eq!(body, "false");
        let (_, _, body) = consul
            .request("PUT", &format!("/v1/kv/app/a?cas={}", a_index + 100), "x")
            .await;
        assert_eq!(body, "false");
        let (_, _, body) = consul
            .request("PUT", &format!("/v1/kv/app/a?cas={a_index}"), "v2")
            .await;
        assert_eq!(body, "true");
        let (_, _, body) = consul.request("PUT", "/v1/kv/app/ab?cas=0", "").await;
        assert_eq!(body, "true");
        let (_, _, body) = consul.request("GET", "/v1/kv/app/ab", "").await;
        assert_eq!(
            serde_json::from_str::<Value>(&body).unwrap()[0]["Value"],
            Value::Null
        );

        // `recurse` lists whatever its value, as Consul only checks that it is present.
        for query in ["?recurse", "?recurse=false"] {
            let (_, _, body) = consul
                .request("GET", &format!("/v1/kv/app/a{query}"), "")
                .await;
            assert_eq!(keys(&body), ["app/a", "app/ab"], "{query}");
        }
        // ... and deletes a prefix: with cas that is a conflict.
        let (status, _, _) = consul
            .request("DELETE", "/v1/kv/app/a?recurse=false&cas=1", "")
            .await;
        assert_eq!(status.as_u16(), 400);
        let (_, _, body) = consul.request("DELETE", "/v1/kv/app/a?cas=1", "").await;
        assert_eq!(body, "false", "stale cas");
        let (_, _, body) = consul
            .request("DELETE", "/v1/kv/app/nothing?cas=1", "")
            .await;
        assert_eq!(body, "true", "a missing key counts as deleted");
        let (_, _, body) = consul.request("DELETE", "/v1/kv/app/a", "").await;
        assert_eq!(body, "true");
        assert_eq!(consul.kv_keys(), ["app/ab"]);
        let (status, _, _) = consul
            .request("PUT", "/v1/kv/app/c?cas=0&acquire=x", "")
            .await;
        assert_eq!(status.as_u16(), 400, "conflicting flags");
        let (status, _, _) = consul
            .request("PUT", "/v1/kv/app/c", vec![b'x'; 600 * 1024])
            .await;
        assert_eq!(status.as_u16(), 413);
    }

    #[tokio::test]
    async fn kv_blocking_queries_wake_on_their_prefix_only() {
        let consul = ConsulDouble::start().await;
        consul.request("PUT", "/v1/kv/watched/a", "1").await;
        let (_, headers, _) = consul.request("GET", "/v1/kv/watched/?recurse", "").await;
        let watched = index(&headers);

        // A write elsewhere does not wake it: it answers at `wait` with the same index.
        let started = Instant::now();
        let query = format!("/v1/kv/watched/?recurse&index={watched}&wait=300ms");
        let (blocked, _) = tokio::join!(consul.request("GET", &query, ""), async {
            consul.request("PUT", "/v1/kv/elsewhere/b", "1").await
        });
        assert!(started.elapsed() >= Duration::from_millis(300));
        assert_eq!(index(&blocked.1), watched);

        // A write under it wakes it at once with the new index.
        let started = Instant::now();
        let query = format!("/v1/kv/watched/?recurse&index={watched}&wait=10s");
        let (woken, _) = tokio::join!(consul.request("GET", &query, ""), async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            consul.request("PUT", "/v1/kv/watched/c", "1").await
        });
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(index(&woken.1) > watched);
        assert_eq!(keys(&woken.2), ["watched/a", "watched/c"]);

        // A delete keeps the index from sliding back (tombstone), even once the prefix is empty.
        let (_, headers, _) = consul.request("GET", "/v1/kv/watched/?recurse", "").await;
        let before = index(&headers);
        consul
            .request("DELETE", "/v1/kv/watched/?recurse", "")
            .await;
        let (status, headers, _) = consul.request("GET", "/v1/kv/watched/?recurse", "").await;
        assert_eq!(status.as_u16(), 404);
        assert!(index(&headers) > before);
    }

    #[tokio::test]
    async fn sessions_lock_keys_and_delete_them_when_they_expire() {
        let consul = ConsulDouble::start().await;
        let create = r#"{"Name": "gw", "TTL": "1s", "Behavior": "delete", "LockDelay": "0s"}"#;
        let (status, _, body) = consul.request("PUT", "/v1/session/create", create).await;
        assert_eq!(
            status.as_u16(),
            500,
            "below Consul's default session_ttl_min"
        );
        assert_eq!(
            body,
            "Invalid Session TTL '1000000000', must be between [10s=24h0m0s]"
        );
        consul.set_session_ttl_min(Duration::from_secs(1));
        let (status, _, body) = consul.request("PUT", "/v1/session/create", create).await;
        assert_eq!(status.as_u16(), 200, "{body}");
        let id = serde_json::from_str::<Value>(&body).unwrap()["ID"]
            .as_str()
            .unwrap()
            .to_owned();
        let (_, _, body) = consul
            .request("PUT", "/v1/session/create", r#"{"TTL": "10s"}"#)
            .await;
        let other = serde_json::from_str::<Value>(&body).unwrap()["ID"]
            .as_str()
            .unwrap()
            .to_owned();

        let (_, _, body) = consul
            .request("PUT", &format!("/v1/kv/inst/one?acquire={id}"), "v")
            .await;
        assert_eq!(body, "true");
        let (_, _, body) = consul
            .request("PUT", &format!("/v1/kv/inst/one?acquire={other}"), "w")
            .await;
        assert_eq!(body, "false", "held by another session");
        let (status, _, _) = consul
            .request("PUT", "/v1/kv/inst/one?acquire=no-such-session", "w")
            .await;
        assert_eq!(status.as_u16(), 500);
        let (_, _, body) = consul.request("GET", "/v1/kv/inst/one", "").await;
        let entry = &serde_json::from_str::<Value>(&body).unwrap()[0];
        assert_eq!(
            (entry["Session"].as_str(), entry["LockIndex"].as_u64()),
            (Some(id.as_str()), Some(1))
        );

        let (status, _, body) = consul
            .request("PUT", &format!("/v1/session/renew/{id}"), "")
            .await;
        assert_eq!(status.as_u16(), 200);
        let session = &serde_json::from_str::<Value>(&body).unwrap()[0];
        assert_eq!(
            (session["Behavior"].as_str(), session["TTL"].as_str()),
            (Some("delete"), Some("1s"))
        );

        // Not renewed: gone after twice the TTL, and the key with it.
        let renewed = Instant::now();
        while consul.kv_value("inst/one").is_some() {
            assert!(
                renewed.elapsed() < Duration::from_secs(5),
                "the session never expired"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            renewed.elapsed() >= Duration::from_millis(1900),
            "{:?}",
            renewed.elapsed()
        );
        let (status, _, body) = consul
            .request("PUT", &format!("/v1/session/renew/{id}"), "")
            .await;
        assert_eq!(
            (status.as_u16(), body),
            (404, format!("Session id '{id}' not found"))
        );

        // Destroying a `release` session unlocks its keys, which then sit in their lock-delay.
        let (_, _, body) = consul
            .request("PUT", &format!("/v1/kv/inst/two?acquire={other}"), "v")
            .await;
        assert_eq!(body, "true");
        let (_, _, body) = consul
            .request("PUT", &format!("/v1/session/destroy/{other}"), "")
            .await;
        assert_eq!(body, "true");
        assert_eq!(consul.kv_value("inst/two").as_deref(), Some("v"));
        let (_, _, body) = consul.request("PUT", "/v1/session/create", "").await;
        let third = serde_json::from_str::<Value>(&body).unwrap()["ID"]
            .as_str()
            .unwrap()
            .to_owned();
        let (_, _, body) = consul
            .request("PUT", &format!("/v1/kv/inst/two?acquire={third}"), "v")
            .await;
        assert_eq!(body, "false", "in the 15 s default lock-delay");
    }

    #[tokio::test]
    async fn stop_closes_the_port_and_restart_serves_the_same_data() {
        let consul = ConsulDouble::start().await;
        consul.request("PUT", "/v1/kv/k", "v").await;
        consul.stop().await;
        assert!(
            tokio::net::TcpStream::connect(consul.address())
                .await
                .is_err(),
            "the port is closed"
        );
        consul.restart().await;
        let (status, _, body) = consul.request("GET", "/v1/kv/k", "").await;
        assert_eq!(status.as_u16(), 200);
        assert_eq!(
            serde_json::from_str::<Value>(&body).unwrap()[0]["Value"],
            "dg=="
        );
    }

    #[test]
    fn go_durations() {
        assert_eq!(parse_go_duration("55s"), Some(Duration::from_secs(55)));
        assert_eq!(parse_go_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_go_duration("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_go_duration("0"), Some(Duration::ZERO));
        assert_eq!(parse_go_duration("10"), None);
        assert_eq!(parse_go_duration(""), None);
        assert_eq!(parse_go_duration("5x"), None);
    }
}

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
//! # Test controls
//! [`ConsulDouble::set_index`] forces every index down to `n` (as a snapshot restore does)
//! and releases blocked queries at once; [`ConsulDouble::fail_next`] makes the next `n`
//! health requests fail with a 500; [`ConsulDouble::request_count`] counts health requests.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

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

/// A running Consul double; stops serving when dropped.
pub struct ConsulDouble {
    address: SocketAddr,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
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
                ..State::default()
            }),
            changes: tokio::sync::watch::channel(0).0,
            token,
        });
        let shutdown = CancellationToken::new();
        tokio::spawn(serve(listener, Arc::clone(&shared), shutdown.clone()));
        tokio::spawn(expire_ttls(Arc::clone(&shared), shutdown.clone()));
        ConsulDouble {
            address,
            shared,
            shutdown,
        }
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

/// Turns expired TTL checks critical, as the agent's TTL timers do.
async fn expire_ttls(shared: Arc<Shared>, shutdown: CancellationToken) {
    let mut ticker = tokio::time::interval(Duration::from_millis(50));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let now = Instant::now();
        let mut state = shared.lock();
        let expired: Vec<String> = state
            .checks
            .values()
            .filter(|check| check.expires_at.is_some_and(|at| at <= now))
            .map(|check| check.id.clone())
            .collect();
        if expired.is_empty() {
            continue;
        }
        let mut changed = false;
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
    use super::parse_go_duration;
    use std::time::Duration;

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

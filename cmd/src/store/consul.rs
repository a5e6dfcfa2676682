//! `consul://HOST:PORT/PREFIX[?token=TOKEN]` (without `token`, the ACL token in
//! `CONSUL_HTTP_TOKEN`, if set).
//!
//! # Layout
//! - `PREFIX/endpoints/<id>` holds `{"id","endpoint"}` as JSON, as in the etcd store. The
//!   version of an endpoint is the key's `ModifyIndex`, so `If-Match: N` is a check-and-set
//!   write `?cas=N`; `If-Match: 0` creates only, as etcd's compare against a missing key's
//!   revision 0 does in the etcd store.
//! - `PREFIX/endpoints/` itself is an empty "folder" key (what Consul's UI writes for a
//!   folder), written create-only (`?cas=0`) by every gateway, so that the prefix is never
//!   empty (see *Why*).
//! - `PREFIX/instances/<id>` holds each gateway's [`InstanceInfo`], locked (`?acquire=`) by a
//!   session with TTL `--store-lease-ttl` and `Behavior: delete`, renewed every third of the
//!   TTL. When a gateway dies, Consul invalidates its session once the TTL has passed
//!   (Consul allows itself up to twice the TTL) and deletes the key; a clean shutdown destroys
//!   the session, which deletes the key at once. Consul refuses TTLs below its
//!   `session_ttl_min` (10 s unless configured, also the flag's default).
//!
//! # Watch
//! One task reads `PREFIX/endpoints/` recursively, then repeats the read as a blocking query
//! on the last `X-Consul-Index` (`wait` 55 s; the request is bounded by wait + wait/16 +
//! 10 s). Following Consul's rules for blocking queries: an index lower than the last one
//! resets it to 0 (the next read is a plain read), an index of 0 is taken as 1, and failures
//! back off exponentially with jitter (100 ms doubling to 3 s). A wake-up whose endpoints did
//! not change publishes nothing, and the next read then starts at least 50 ms after the last
//! one, so an agent that answers at once without news cannot make it spin; after a change
//! the next read starts at once, so a burst of changes is not delayed. While Consul is
//! unreachable the last snapshot stays published, so the gateway keeps its config, and
//! writes answer 503.
//!
//! # Why part of it is not rs-consul
//! rs-consul 0.15, the crate the project uses for Consul, carries the KV reads (`read_key`,
//! with `index`/`wait` for the blocking query and the `X-Consul-Index` in
//! `ResponseMeta::index`) and writes (`create_or_update_key` with `check_and_set` and
//! `acquire`). Three things it cannot do are sent directly over HTTP (a hyper-util client, as
//! `discovery`'s Consul registry does):
//! - **deletes**: `delete_key` always sends `recurse=<bool>`. Consul only checks that
//!   `recurse` is present, so deleting `a` would delete every key starting with `a` (`ab`
//!   too), and `recurse` with `cas` is a 400 "Conflicting flags".
//! - **sessions**: its session calls are private to `get_lock`, whose lock can be neither
//!   renewed nor destroyed (it releases the key on drop, with a blocking call).
//!
//! And one it cannot do is avoided: on a 404 (nothing under the prefix) `read_key` returns
//! an error without the `X-Consul-Index`, so a watch of an empty prefix could not block. The
//! folder key keeps the prefix non-empty; should it be deleted, the watch writes it again.
//! Its single-key reads also send `recurse=false`, which Consul takes as a listing: `get`
//! keeps only the exact key. A value under the prefix that is not UTF-8 fails the whole read
//! (rs-consul decodes every value to a string).

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use configs::Endpoint;
use discovery::Backoff;
use http::{Method, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rs_consul::{
    Config, Consul, ConsulError, CreateOrUpdateKeyRequest, ReadKeyRequest, ReadKeyResponse,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use super::{ConfigStore, InstanceInfo, Snapshot, StoreError, StoredEndpoint};

/// Bound on each non-blocking call.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

/// `wait` of the blocking query (Kratos' value).
const WAIT: Duration = Duration::from_secs(55);

/// Margin over `wait` + `wait/16` (Consul's jitter) before a blocking read is abandoned.
const BLOCKING_MARGIN: Duration = Duration::from_secs(10);

/// Minimum spacing between the starts of two reads of the watch when the first brought
/// no change.
const MIN_REQUEST_INTERVAL: Duration = Duration::from_millis(50);

/// Largest response body read by the direct requests.
const MAX_BODY_BYTES: usize = 1024 * 1024;

/// The value under `PREFIX/endpoints/<id>` (the etcd store's format).
#[derive(Serialize, Deserialize)]
struct Value {
    id: String,
    endpoint: Endpoint,
}

/// The Consul store. Cheap to share; its tasks end with the shutdown token.
pub(crate) struct ConsulStore {
    inner: Arc<Inner>,
}

struct Inner {
    /// `HOST:PORT`.
    address: String,
    /// Without leading or trailing `/`.
    prefix: String,
    consul: Consul,
    http: DirectHttp,
    snapshot: watch::Sender<Arc<Snapshot>>,
    instance: Mutex<Option<InstanceInfo>>,
    instance_changed: Notify,
    lease_ttl: Duration,
    shutdown: CancellationToken,
}

impl ConsulStore {
    /// Parses `HOST:PORT/PREFIX[?token=T]` (after `consul://`) and starts the watch and
    /// instance tasks.
    pub(crate) fn open(
        rest: &str,
        lease_ttl: Duration,
        shutdown: CancellationToken,
    ) -> Result<ConsulStore, String> {
        let dsn = ConsulDsn::parse(rest, std::env::var("CONSUL_HTTP_TOKEN").ok())?;
        let consul = Consul::new(Config {
            address: format!("http://{}", dsn.address),
            token: dsn.token.clone(),
            ..Config::default()
        });
        let (snapshot, _) = watch::channel(Arc::new(Snapshot::default()));
        let inner = Arc::new(Inner {
            http: DirectHttp::new(&dsn.address, dsn.token),
            address: dsn.address,
            prefix: dsn.prefix,
            consul,
            snapshot,
            instance: Mutex::new(None),
            instance_changed: Notify::new(),
            lease_ttl,
            shutdown,
        });
        tokio::spawn(inner.clone().watch_endpoints());
        tokio::spawn(inner.clone().keep_instance());
        Ok(ConsulStore { inner })
    }
}

/// What a `consul://` DSN says.
#[derive(Debug, PartialEq)]
struct ConsulDsn {
    address: String,
    prefix: String,
    token: Option<String>,
}

impl ConsulDsn {
    /// `HOST:PORT/PREFIX[?token=T]`; `env_token` (`CONSUL_HTTP_TOKEN`) when the DSN has none.
    fn parse(rest: &str, env_token: Option<String>) -> Result<ConsulDsn, String> {
        let bad = |why: &str| format!("--store consul://...: {why}");
        let (location, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (address, prefix) = location.split_once('/').unwrap_or((location, ""));
        if address.is_empty() || !address.contains(':') || address.contains('@') {
            return Err(bad("needs HOST:PORT, e.g. consul://127.0.0.1:8500/gateway"));
        }
        let prefix = prefix.trim_matches('/');
        if prefix.is_empty() {
            return Err(bad("needs a /PREFIX, e.g. consul://127.0.0.1:8500/gateway"));
        }
        // Keys go into URLs unescaped (rs-consul does not encode them).
        let safe = prefix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'/'));
        if !safe
            || prefix
                .split('/')
                .any(|segment| matches!(segment, "" | "." | ".."))
        {
            return Err(bad(
                "the PREFIX may hold A-Z a-z 0-9 . _ - and / between non-empty segments",
            ));
        }
        let mut token = None;
        for (name, value) in form_urlencoded::parse(query.as_bytes()) {
            match name.as_ref() {
                "token" => token = Some(value.into_owned()),
                other => return Err(bad(&format!("unknown parameter {other:?} (only token)"))),
            }
        }
        let token = token.or(env_token).filter(|token| !token.is_empty());
        Ok(ConsulDsn {
            address: address.to_owned(),
            prefix: prefix.to_owned(),
            token,
        })
    }
}

/// Why a read found nothing or failed.
enum Read {
    /// The entries and the `X-Consul-Index`.
    Found(Vec<ReadKeyResponse>, u64),
    /// A 404: nothing under the key.
    Missing,
}

impl Inner {
    /// `PREFIX/endpoints/`, also the folder key.
    fn endpoints_prefix(&self) -> String {
        format!("{}/endpoints/", self.prefix)
    }

    fn instances_prefix(&self) -> String {
        format!("{}/instances/", self.prefix)
    }

    fn describe(&self) -> String {
        format!("consul://{}/{}", self.address, self.prefix)
    }

    /// A failed rs-consul call, naming the agent.
    fn unavailable(&self, error: &ConsulError) -> StoreError {
        StoreError::Unavailable(format!("Consul at {}: {error}", self.address))
    }

    /// `GET /v1/kv/<key>` through rs-consul; a blocking query when `index` is given.
    async fn read(&self, key: &str, recurse: bool, index: Option<u64>) -> Result<Read, StoreError> {
        let request = ReadKeyRequest {
            key,
            recurse,
            index,
            wait: if index.is_some() {
                WAIT
            } else {
                Duration::ZERO
            },
            ..ReadKeyRequest::default()
        };
        let bound = match index {
            Some(_) => WAIT + WAIT / 16 + BLOCKING_MARGIN,
            None => REQUEST_TIMEOUT,
        };
        match tokio::time::timeout(bound, self.consul.read_key(request)).await {
            Ok(Ok(meta)) => Ok(Read::Found(meta.response, meta.index)),
            Ok(Err(ConsulError::UnexpectedResponseCode(StatusCode::NOT_FOUND, _))) => {
                Ok(Read::Missing)
            }
            Ok(Err(error)) => Err(self.unavailable(&error)),
            Err(_) => Err(StoreError::Unavailable(format!(
                "Consul at {} did not answer within {bound:?}",
                self.address
            ))),
        }
    }

    /// `PUT /v1/kv/<key>` through rs-consul; `Ok(false)` when Consul refused the
    /// check-and-set or the lock.
    async fn write(
        &self,
        key: &str,
        value: Vec<u8>,
        check_and_set: Option<i64>,
        acquire: &str,
    ) -> Result<bool, ConsulError> {
        let request = CreateOrUpdateKeyRequest {
            key,
            check_and_set,
            acquire,
            ..CreateOrUpdateKeyRequest::default()
        };
        match tokio::time::timeout(
            REQUEST_TIMEOUT,
            self.consul.create_or_update_key(request, value),
        )
        .await
        {
            Ok(result) => result.map(|(written, _)| written),
            Err(_) => Err(ConsulError::TimeoutExceeded(REQUEST_TIMEOUT)),
        }
    }

    /// The stored endpoint under `id`, if any (exact key: rs-consul's read lists the prefix).
    async fn read_endpoint(&self, id: &str) -> Result<Option<StoredEndpoint>, StoreError> {
        let key = format!("{}{id}", self.endpoints_prefix());
        Ok(match self.read(&key, false, None).await? {
            Read::Found(entries, _) => entries
                .iter()
                .find(|entry| entry.key == key)
                .and_then(|entry| self.decode(entry)),
            Read::Missing => None,
        })
    }

    /// The 412 for `expected`, naming the version stored now.
    async fn conflict(&self, id: &str, expected: &str) -> StoreError {
        match self.read_endpoint(id).await {
            Ok(current) => StoreError::Conflict {
                expected: expected.to_owned(),
                current: current.map_or_else(|| "none".to_owned(), |stored| stored.version),
            },
            Err(error) => error,
        }
    }

    /// `StoredEndpoint` from a KV entry under `PREFIX/endpoints/`; `None` for the folder key,
    /// nested keys and values that are not ours (logged).
    fn decode(&self, entry: &ReadKeyResponse) -> Option<StoredEndpoint> {
        let id = entry.key.strip_prefix(&self.endpoints_prefix())?;
        if id.is_empty() || id.contains('/') {
            return None;
        }
        let raw = entry.value.as_deref().unwrap_or_default();
        match serde_json::from_str::<Value>(raw) {
            Ok(value) => Some(StoredEndpoint {
                id: value.id,
                version: entry.modify_index.to_string(),
                endpoint: value.endpoint,
            }),
            Err(error) => {
                tracing::warn!(key = %entry.key, %error, "skipping a Consul value that is not a stored endpoint");
                None
            }
        }
    }

    /// Reads `PREFIX/endpoints/` (blocking on `index` when > 0) and publishes what changed;
    /// answers the index to block on next (0: read without blocking) and whether the
    /// endpoints changed.
    async fn watch_once(&self, index: u64) -> Result<(u64, bool), StoreError> {
        let prefix = self.endpoints_prefix();
        let blocking = (index > 0).then_some(index);
        match self.read(&prefix, true, blocking).await? {
            Read::Found(entries, found) => {
                let mut endpoints: Vec<StoredEndpoint> = entries
                    .iter()
                    .filter_map(|entry| self.decode(entry))
                    .collect();
                endpoints.sort_by(|a, b| a.id.cmp(&b.id));
                // Consul never answers 0; should it, 1 keeps the next read blocking.
                let found = found.max(1);
                let changed = self.publish(endpoints, found);
                // An index that went backwards (a restore, a new cluster): start over.
                Ok((if found < index { 0 } else { found }, changed))
            }
            Read::Missing => {
                // The folder key is gone (and nothing is under it): write it again, then read.
                self.write(&prefix, Vec::new(), Some(0), "")
                    .await
                    .map_err(|error| self.unavailable(&error))?;
                Ok((0, false))
            }
        }
    }

    /// Reads, then blocks on the last index; publishes every change. See the module doc.
    async fn watch_endpoints(self: Arc<Self>) {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(3));
        let mut index = 0_u64;
        // Set after a read that brought no change: when that read started.
        let mut idle_since: Option<tokio::time::Instant> = None;
        loop {
            if let Some(start) = idle_since {
                tokio::select! {
                    () = self.shutdown.cancelled() => return,
                    () = tokio::time::sleep_until(start + MIN_REQUEST_INTERVAL) => {}
                }
            }
            let started = tokio::time::Instant::now();
            let result = tokio::select! {
                () = self.shutdown.cancelled() => return,
                result = self.watch_once(index) => result,
            };
            match result {
                Ok((next, changed)) => {
                    index = next;
                    idle_since = (!changed).then_some(started);
                    backoff.reset();
                }
                Err(error) => {
                    idle_since = None;
                    tracing::warn!(store = %self.describe(), %error, "config store watch failed; serving the last config, will retry");
                    tokio::select! {
                        () = self.shutdown.cancelled() => return,
                        () = tokio::time::sleep(backoff.next_delay()) => {}
                    }
                }
            }
        }
    }

    /// Publishes the endpoints unless they did not change; `true` when published.
    fn publish(&self, endpoints: Vec<StoredEndpoint>, index: u64) -> bool {
        super::publish(
            &self.snapshot,
            Snapshot {
                revision: index.to_string(),
                endpoints,
            },
        )
    }

    /// Keeps `PREFIX/instances/<id>` locked by a TTL session: create the session, write the
    /// key with `acquire`, then every third of the TTL renew the session and rewrite the key
    /// (`seen`). A session Consul no longer knows is created again; one that merely could not
    /// be reached is kept. On shutdown the session is destroyed, which deletes the key.
    async fn keep_instance(self: Arc<Self>) {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(3));
        let tick = (self.lease_ttl / 3).max(Duration::from_millis(200));
        let mut session: Option<String> = None;
        loop {
            let instance = self
                .instance
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            let Some(mut instance) = instance else {
                tokio::select! {
                    () = self.shutdown.cancelled() => break,
                    () = self.instance_changed.notified() => continue,
                }
            };
            let cycle = async {
                let id = match &session {
                    Some(id) => id.clone(),
                    None => {
                        let id = self
                            .http
                            .create_session(&instance.id, self.lease_ttl)
                            .await?;
                        session = Some(id.clone());
                        id
                    }
                };
                loop {
                    instance.seen = super::rfc3339(SystemTime::now());
                    let key = format!("{}{}", self.instances_prefix(), instance.id);
                    let value = serde_json::to_vec(&instance).unwrap_or_default();
                    match self.write(&key, value, None, &id).await {
                        Ok(true) => {}
                        Ok(false) => {
                            session = None;
                            return Err(StoreError::Unavailable(format!(
                                "Consul refused to lock {key} for session {id} (held by another session, or in its lock-delay)"
                            )));
                        }
                        // A refusal (e.g. 500 "invalid session": it expired meanwhile).
                        Err(error @ ConsulError::UnexpectedResponseCode(..)) => {
                            session = None;
                            return Err(self.unavailable(&error));
                        }
                        Err(error) => return Err(self.unavailable(&error)),
                    }
                    backoff.reset();
                    tokio::select! {
                        () = self.shutdown.cancelled() => return Ok(()),
                        () = self.instance_changed.notified() => {
                            if let Some(latest) = self.instance.lock().unwrap_or_else(|p| p.into_inner()).clone() {
                                instance = latest;
                            }
                            continue;
                        }
                        () = tokio::time::sleep(tick) => {}
                    }
                    if !self.http.renew_session(&id).await? {
                        session = None;
                        return Err(StoreError::Unavailable(format!(
                            "Consul no longer knows session {id} (its TTL passed)"
                        )));
                    }
                }
            };
            match cycle.await {
                Ok(()) => break,
                Err(error) => {
                    tracing::warn!(store = %self.describe(), %error, "cannot keep this gateway registered; will retry");
                    tokio::select! {
                        () = self.shutdown.cancelled() => break,
                        () = tokio::time::sleep(backoff.next_delay()) => {}
                    }
                }
            }
        }
        // Leaving cleanly: destroying the session deletes the key at once (Behavior delete).
        if let Some(id) = session
            && let Err(error) = self.http.destroy_session(&id).await
        {
            tracing::debug!(%error, "could not destroy the instance session; it ends with its TTL");
        }
    }
}

/// The requests rs-consul does not carry (see the module doc): deletes and sessions.
struct DirectHttp {
    /// `HOST:PORT`.
    address: String,
    token: Option<String>,
    client: Client<HttpConnector, Full<Bytes>>,
}

/// Consul's `{"ID": ...}` answer to a session create.
#[derive(Deserialize)]
struct SessionCreated {
    #[serde(rename = "ID")]
    id: String,
}

impl DirectHttp {
    fn new(address: &str, token: Option<String>) -> DirectHttp {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(REQUEST_TIMEOUT));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        DirectHttp {
            address: address.to_owned(),
            token,
            client,
        }
    }

    /// Sends one request; answers the status and body (at most [`MAX_BODY_BYTES`]).
    async fn send(
        &self,
        method: Method,
        path_and_query: &str,
        body: Bytes,
    ) -> Result<(StatusCode, Bytes), StoreError> {
        let mut request = http::Request::builder()
            .method(method)
            .uri(format!("http://{}{path_and_query}", self.address));
        if let Some(token) = &self.token {
            request = request.header("X-Consul-Token", token);
        }
        let request = request.body(Full::new(body)).map_err(|error| {
            StoreError::Unavailable(format!("request {path_and_query}: {error}"))
        })?;
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|error| self.failed(error))?;
            let status = response.status();
            let body = Limited::new(response.into_body(), MAX_BODY_BYTES)
                .collect()
                .await
                .map_err(|error| self.failed(error))?
                .to_bytes();
            Ok((status, body))
        };
        tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .unwrap_or_else(|_| {
                Err(StoreError::Unavailable(format!(
                    "Consul at {} did not answer within {REQUEST_TIMEOUT:?}",
                    self.address
                )))
            })
    }

    fn failed(&self, error: impl std::fmt::Display) -> StoreError {
        StoreError::Unavailable(format!("Consul at {}: {error}", self.address))
    }

    /// A non-200 answer: Consul was reached, but it refused.
    fn refused(&self, status: StatusCode, body: &[u8]) -> StoreError {
        self.failed(format!(
            "answered {status}: {}",
            String::from_utf8_lossy(body).trim()
        ))
    }

    /// `PUT` expecting a 200 whose body is JSON of type `T`.
    async fn put_json<T: serde::de::DeserializeOwned>(
        &self,
        path_and_query: &str,
        body: Bytes,
    ) -> Result<T, StoreError> {
        let (status, body) = self.send(Method::PUT, path_and_query, body).await?;
        if status != StatusCode::OK {
            return Err(self.refused(status, &body));
        }
        serde_json::from_slice(&body)
            .map_err(|error| self.failed(format!("answered {path_and_query} with {error}")))
    }

    /// `DELETE /v1/kv/<key>[?cas=N]`: `false` when the check-and-set failed.
    async fn delete_key(&self, key: &str, check_and_set: Option<u64>) -> Result<bool, StoreError> {
        let mut path = format!("/v1/kv/{key}");
        if let Some(index) = check_and_set {
            path.push_str(&format!("?cas={index}"));
        }
        let (status, body) = self.send(Method::DELETE, &path, Bytes::new()).await?;
        if status != StatusCode::OK {
            return Err(self.refused(status, &body));
        }
        serde_json::from_slice(&body)
            .map_err(|error| self.failed(format!("answered a delete with {error}")))
    }

    /// A session that deletes the keys it holds when it ends, with this TTL and no
    /// lock-delay (so a gateway that lost its session can lock its key again at once).
    async fn create_session(&self, instance_id: &str, ttl: Duration) -> Result<String, StoreError> {
        let ttl = if ttl.subsec_millis() == 0 {
            format!("{}s", ttl.as_secs().max(1))
        } else {
            format!("{}ms", ttl.as_millis())
        };
        let body = serde_json::json!({
            "Name": format!("gateway {instance_id}"),
            "TTL": ttl,
            "Behavior": "delete",
            "LockDelay": "0s",
        });
        let created: SessionCreated = self
            .put_json("/v1/session/create", Bytes::from(body.to_string()))
            .await?;
        Ok(created.id)
    }

    /// `true` when renewed, `false` when Consul no longer knows the session (404).
    async fn renew_session(&self, id: &str) -> Result<bool, StoreError> {
        let path = format!("/v1/session/renew/{id}");
        let (status, body) = self.send(Method::PUT, &path, Bytes::new()).await?;
        match status {
            StatusCode::OK => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            status => Err(self.refused(status, &body)),
        }
    }

    async fn destroy_session(&self, id: &str) -> Result<(), StoreError> {
        let _: bool = self
            .put_json(&format!("/v1/session/destroy/{id}"), Bytes::new())
            .await?;
        Ok(())
    }
}

#[async_trait::async_trait]
impl ConfigStore for ConsulStore {
    fn describe(&self) -> String {
        self.inner.describe()
    }

    async fn list(&self) -> Result<Vec<StoredEndpoint>, StoreError> {
        let inner = &self.inner;
        let mut list: Vec<StoredEndpoint> =
            match inner.read(&inner.endpoints_prefix(), true, None).await? {
                Read::Found(entries, _) => entries
                    .iter()
                    .filter_map(|entry| inner.decode(entry))
                    .collect(),
                Read::Missing => Vec::new(),
            };
        list.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(list)
    }

    async fn get(&self, id: &str) -> Result<StoredEndpoint, StoreError> {
        self.inner
            .read_endpoint(id)
            .await?
            .ok_or_else(|| StoreError::NotFound(id.to_owned()))
    }

    async fn put(
        &self,
        id: &str,
        endpoint: &Endpoint,
        if_match: Option<&str>,
    ) -> Result<StoredEndpoint, StoreError> {
        let inner = &self.inner;
        let key = format!("{}{id}", inner.endpoints_prefix());
        let value = serde_json::to_vec(&Value {
            id: id.to_owned(),
            endpoint: endpoint.clone(),
        })
        .map_err(|err| StoreError::Unavailable(format!("encode: {err}")))?;
        let check_and_set = match if_match {
            None => None,
            Some(expected) => match expected.parse::<i64>() {
                Ok(index) if index >= 0 => Some(index),
                // No ModifyIndex looks like that: nothing can match.
                _ => return Err(inner.conflict(id, expected).await),
            },
        };
        let written = inner
            .write(&key, value, check_and_set, "")
            .await
            .map_err(|error| inner.unavailable(&error))?;
        if !written {
            return Err(inner.conflict(id, if_match.unwrap_or_default()).await);
        }
        // Consul answers a write with `true` only: its ModifyIndex is read back. Should
        // another write land in between, this answers that one (what is stored now).
        inner
            .read_endpoint(id)
            .await?
            .ok_or_else(|| StoreError::NotFound(id.to_owned()))
    }

    async fn delete(&self, id: &str, if_match: Option<&str>) -> Result<(), StoreError> {
        let inner = &self.inner;
        let key = format!("{}{id}", inner.endpoints_prefix());
        let Some(current) = inner.read_endpoint(id).await? else {
            return Err(StoreError::NotFound(id.to_owned()));
        };
        let check_and_set = match if_match {
            None => None,
            Some(expected) => match expected.parse::<u64>() {
                Ok(index) if index.to_string() == current.version => Some(index),
                _ => {
                    return Err(StoreError::Conflict {
                        expected: expected.to_owned(),
                        current: current.version,
                    });
                }
            },
        };
        if inner.http.delete_key(&key, check_and_set).await? {
            return Ok(());
        }
        // Changed between the read and the delete.
        Err(
            match inner.conflict(id, if_match.unwrap_or_default()).await {
                StoreError::Conflict { current, .. } if current == "none" => {
                    StoreError::NotFound(id.to_owned())
                }
                other => other,
            },
        )
    }

    fn watch(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.inner.snapshot.subscribe()
    }

    async fn register_instance(&self, instance: InstanceInfo) {
        *self
            .inner
            .instance
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(instance);
        self.inner.instance_changed.notify_one();
    }

    async fn instances(&self) -> Result<Vec<InstanceInfo>, StoreError> {
        let inner = &self.inner;
        let mut list: Vec<InstanceInfo> =
            match inner.read(&inner.instances_prefix(), true, None).await? {
                Read::Found(entries, _) => entries
                    .iter()
                    .filter_map(|entry| serde_json::from_str(entry.value.as_deref()?).ok())
                    .collect(),
                Read::Missing => Vec::new(),
            };
        list.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(list)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_dsns() {
        let dsn = ConsulDsn::parse("127.0.0.1:8500/fleet/", None).unwrap();
        assert_eq!(
            dsn,
            ConsulDsn {
                address: "127.0.0.1:8500".to_owned(),
                prefix: "fleet".to_owned(),
                token: None,
            }
        );
        let dsn =
            ConsulDsn::parse("consul.local:8500/a/b?token=s%3Dcret", Some("env".into())).unwrap();
        assert_eq!(dsn.prefix, "a/b");
        assert_eq!(dsn.token.as_deref(), Some("s=cret"), "the DSN's token wins");
        let dsn = ConsulDsn::parse("consul.local:8500/a", Some("env".into())).unwrap();
        assert_eq!(dsn.token.as_deref(), Some("env"), "else CONSUL_HTTP_TOKEN");
        let dsn = ConsulDsn::parse("consul.local:8500/a", Some(String::new())).unwrap();
        assert_eq!(dsn.token, None, "an empty variable is no token");
        for bad in [
            "",
            "127.0.0.1:8500",
            "127.0.0.1:8500/",
            "127.0.0.1/gw",
            "user:pw@127.0.0.1:8500/gw",
            "127.0.0.1:8500/a//b",
            "127.0.0.1:8500/a/../b",
            "127.0.0.1:8500/a b",
            "127.0.0.1:8500/gw?dc=dc2",
        ] {
            assert!(ConsulDsn::parse(bad, None).is_err(), "{bad:?}");
        }
    }
}

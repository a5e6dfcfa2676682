//! The admin API (`--admin-addr`, bearer token) and the composer that merges the config
//! store's endpoints into the file config and applies the result.
//!
//! Routes (all JSON, all need `Authorization: Bearer <token>`):
//!
//! ```text
//! GET                /admin/v1/endpoints        [{"id","version","endpoint"}]
//! GET|PUT|DELETE     /admin/v1/endpoints/{id}   If-Match: <version> makes PUT/DELETE conditional
//! GET                /admin/v1/config           the merged config in force, its version and source
//! GET                /admin/v1/instances        [{"id","addr","version","seen"}]
//! ```
//!
//! A PUT or DELETE is first checked (the merged config validated and its router built, then
//! dropped): a change that does not build is refused with 400 and nothing changes. Then it
//! is written to the store, and every gateway (this one included) applies it from the
//! store's watch through the same build-and-swap as a file reload; the call answers once
//! this gateway applied it (or after 3 s).
//! Bodies are bounded (1 MiB); JSON nesting is bounded by serde_json's recursion limit.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use configs::{Endpoint, Gateway};
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use proxy::Proxy;
use serde::Serialize;
use serde_json::json;
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::store::{ConfigStore, InstanceInfo, Snapshot, StoreError, check_id};

/// Largest accepted request body.
pub(crate) const MAX_BODY: usize = 1024 * 1024;

/// How much of a too-large body is read (and dropped) before the 413.
const MAX_DRAIN: usize = 16 * MAX_BODY;

/// Where the config in force came from, for the admin API and `/debug/config/inspect`.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Provenance {
    /// `file`, or `store` when the store contributes endpoints.
    pub(crate) source: &'static str,
    /// The store DSN (no credentials), when a store is configured.
    pub(crate) store: Option<String>,
    /// `<file sha256, 12 digits>` or `<file sha256, 12 digits>+<store revision>`.
    pub(crate) version: String,
    /// The store revision merged in ("" without a store).
    pub(crate) store_revision: String,
}

/// The file config and the store snapshot, merged and applied together.
pub(crate) struct Composer {
    proxy: Arc<Proxy>,
    current: Arc<ArcSwap<Gateway>>,
    store: Option<Arc<dyn ConfigStore>>,
    state: Mutex<State>,
    /// Serializes admin writes (each is check, then store write, then wait for the apply).
    writes: tokio::sync::Mutex<()>,
    applied: tokio::sync::watch::Sender<String>,
}

struct State {
    base: Gateway,
    base_sha256: String,
    snapshot: Arc<Snapshot>,
}

impl Composer {
    /// A composer whose file config `base` is already applied to `proxy`.
    pub(crate) fn new(
        proxy: Arc<Proxy>,
        current: Arc<ArcSwap<Gateway>>,
        store: Option<Arc<dyn ConfigStore>>,
        base: Gateway,
        base_sha256: String,
    ) -> Arc<Composer> {
        let (applied, _) = tokio::sync::watch::channel(String::new());
        Arc::new(Composer {
            proxy,
            current,
            store,
            state: Mutex::new(State {
                base,
                base_sha256,
                snapshot: Arc::new(Snapshot::default()),
            }),
            writes: tokio::sync::Mutex::new(()),
            applied,
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The store revision of the config in force, on every change.
    pub(crate) fn applied(&self) -> tokio::sync::watch::Receiver<String> {
        self.applied.subscribe()
    }

    /// Where the config in force came from.
    pub(crate) fn provenance(&self) -> Provenance {
        let state = self.state();
        let file = state
            .base_sha256
            .get(..12)
            .unwrap_or(&state.base_sha256)
            .to_owned();
        let from_store = !state.snapshot.endpoints.is_empty();
        Provenance {
            source: if from_store { "store" } else { "file" },
            store: self.store.as_ref().map(|s| s.describe()),
            version: if self.store.is_some() {
                format!("{file}+{}", state.snapshot.revision)
            } else {
                file
            },
            store_revision: state.snapshot.revision.clone(),
        }
    }

    /// The file config merged with the store's endpoints, in id order.
    fn merge(base: &Gateway, endpoints: impl IntoIterator<Item = Endpoint>) -> Gateway {
        let mut merged = base.clone();
        configs::merge_priority(&mut merged, endpoints);
        merged
    }

    /// Validates and builds `merged`, swapping it in unless it equals the config in force.
    fn apply(&self, merged: Gateway) -> Result<(), ApplyError> {
        if **self.current.load() == merged {
            return Ok(());
        }
        configs::validate(&merged).map_err(ApplyError::Invalid)?;
        let started = std::time::Instant::now();
        self.proxy
            .update(&merged)
            .map_err(|err| ApplyError::Build(err.to_string()))?;
        tracing::info!(
            endpoints = merged.endpoints.len(),
            build_ms = started.elapsed().as_secs_f64() * 1000.0,
            "config applied"
        );
        self.current.store(Arc::new(merged));
        Ok(())
    }

    /// A new file config (from the loader's watch).
    pub(crate) fn set_base(&self, base: Gateway, sha256: String) -> Result<(), String> {
        let mut state = self.state();
        let merged = Self::merge(
            &base,
            state.snapshot.endpoints.iter().map(|s| s.endpoint.clone()),
        );
        self.apply(merged).map_err(|err| err.to_string())?;
        state.base = base;
        state.base_sha256 = sha256;
        Ok(())
    }

    /// A new store snapshot (from the store's watch).
    pub(crate) fn set_snapshot(&self, snapshot: Arc<Snapshot>) {
        let mut state = self.state();
        let merged = Self::merge(
            &state.base,
            snapshot.endpoints.iter().map(|s| s.endpoint.clone()),
        );
        match self.apply(merged) {
            Ok(()) => {
                state.snapshot = snapshot.clone();
                self.applied.send_replace(snapshot.revision.clone());
            }
            Err(error) => {
                tracing::error!(%error, revision = %snapshot.revision, "config store change not applied; the running config stays")
            }
        }
    }

    /// Would the config with `id` set to `endpoint` (or removed when `None`) apply? The
    /// merged config is validated and its router built (and dropped); nothing changes.
    fn check_change(&self, id: &str, endpoint: Option<&Endpoint>) -> Result<(), ApplyError> {
        let merged = {
            let state = self.state();
            let mut endpoints: Vec<(String, Endpoint)> = state
                .snapshot
                .endpoints
                .iter()
                .filter(|s| s.id != id)
                .map(|s| (s.id.clone(), s.endpoint.clone()))
                .collect();
            if let Some(endpoint) = endpoint {
                endpoints.push((id.to_owned(), endpoint.clone()));
                endpoints.sort_by(|a, b| a.0.cmp(&b.0));
            }
            Self::merge(&state.base, endpoints.into_iter().map(|(_, e)| e))
        };
        if **self.current.load() == merged {
            return Ok(());
        }
        configs::validate(&merged).map_err(ApplyError::Invalid)?;
        self.proxy
            .check(&merged)
            .map_err(|err| ApplyError::Build(err.to_string()))
    }

    /// Waits (at most `APPLY_WAIT`) until the config in force includes `id` at `version`
    /// (`None`: without `id`), so a write answers once this gateway routes it.
    async fn wait_applied(&self, id: &str, version: Option<&str>) {
        let mut applied = self.applied();
        let done = |state: &State| {
            let stored = state.snapshot.endpoints.iter().find(|s| s.id == id);
            match version {
                Some(version) => stored.is_some_and(|s| s.version == version),
                None => stored.is_none(),
            }
        };
        let wait = async {
            loop {
                if done(&self.state()) {
                    return;
                }
                if applied.changed().await.is_err() {
                    return;
                }
            }
        };
        if tokio::time::timeout(APPLY_WAIT, wait).await.is_err() {
            tracing::warn!(
                id,
                "a stored change is not applied yet; it will be when the store's watch delivers it"
            );
        }
    }
}

/// How long a write waits for the store's watch to bring the change back before answering.
const APPLY_WAIT: Duration = Duration::from_secs(3);

/// Why a merged config was refused.
#[derive(Debug, thiserror::Error)]
enum ApplyError {
    #[error("{0}")]
    Invalid(configs::ConfigError),
    #[error("the config does not build: {0}")]
    Build(String),
}

/// Applies every store snapshot through `composer` until `shutdown`.
pub(crate) fn follow_store(
    composer: Arc<Composer>,
    store: Arc<dyn ConfigStore>,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let mut snapshots = store.watch();
    tokio::spawn(async move {
        loop {
            let snapshot = snapshots.borrow_and_update().clone();
            composer.set_snapshot(snapshot);
            tokio::select! {
                () = shutdown.cancelled() => break,
                changed = snapshots.changed() => if changed.is_err() { break },
            }
        }
    })
}

/// Keeps this gateway's entry in the store's instance list current (its applied revision).
pub(crate) fn announce(
    composer: &Composer,
    store: Arc<dyn ConfigStore>,
    id: String,
    addr: String,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let mut applied = composer.applied();
    tokio::spawn(async move {
        loop {
            let version = applied.borrow_and_update().clone();
            store
                .register_instance(InstanceInfo {
                    id: id.clone(),
                    addr: addr.clone(),
                    version,
                    seen: crate::store::rfc3339(std::time::SystemTime::now()),
                })
                .await;
            tokio::select! {
                () = shutdown.cancelled() => break,
                changed = applied.changed() => if changed.is_err() { break },
            }
        }
    })
}

/// The admin API's state.
pub(crate) struct Admin {
    token: String,
    composer: Arc<Composer>,
    store: Arc<dyn ConfigStore>,
}

impl Admin {
    pub(crate) fn new(token: String, composer: Arc<Composer>, store: Arc<dyn ConfigStore>) -> Self {
        Admin {
            token,
            composer,
            store,
        }
    }

    /// Serves the admin API on `listener` until `shutdown`, then drains for `grace`.
    pub(crate) async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        shutdown: CancellationToken,
        grace: Duration,
    ) {
        let builder = auto::Builder::new(TokioExecutor::new());
        let graceful = GracefulShutdown::new();
        loop {
            let accepted = tokio::select! {
                () = shutdown.cancelled() => break,
                accepted = listener.accept() => accepted,
            };
            let (stream, _remote): (_, SocketAddr) = match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let admin = self.clone();
            let service = hyper::service::service_fn(move |req| {
                let admin = admin.clone();
                async move { Ok::<_, Infallible>(admin.handle(req).await) }
            });
            let connection = builder
                .serve_connection(TokioIo::new(stream), service)
                .into_owned();
            let connection = graceful.watch(connection);
            tokio::spawn(async move {
                let _ = connection.await;
            });
        }
        drop(listener);
        let _ = tokio::time::timeout(grace, graceful.shutdown()).await;
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        if !self.authorized(&req) {
            let mut response = error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return response;
        }
        let path = req.uri().path().to_owned();
        let method = req.method().clone();
        match path.as_str() {
            "/admin/v1/endpoints" => match method {
                Method::GET => self.list().await,
                _ => not_allowed("GET"),
            },
            "/admin/v1/config" => match method {
                Method::GET => self.config(),
                _ => not_allowed("GET"),
            },
            "/admin/v1/instances" => match method {
                Method::GET => match self.store.instances().await {
                    Ok(instances) => ok(&instances),
                    Err(err) => store_error(&err),
                },
                _ => not_allowed("GET"),
            },
            _ => match path.strip_prefix("/admin/v1/endpoints/") {
                Some(id) => {
                    if let Err(message) = check_id(id) {
                        return error(StatusCode::BAD_REQUEST, &message);
                    }
                    let id = id.to_owned();
                    match method {
                        Method::GET => match self.store.get(&id).await {
                            Ok(stored) => ok(&stored),
                            Err(err) => store_error(&err),
                        },
                        Method::PUT => self.put(&id, req).await,
                        Method::DELETE => self.delete(&id, &req).await,
                        _ => not_allowed("GET, PUT, DELETE"),
                    }
                }
                None => error(StatusCode::NOT_FOUND, &format!("no admin route {path}")),
            },
        }
    }

    fn authorized(&self, req: &Request<Incoming>) -> bool {
        let Some(given) = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
        else {
            return false;
        };
        bool::from(given.ct_eq(self.token.as_bytes()))
    }

    async fn list(&self) -> Response<Full<Bytes>> {
        match self.store.list().await {
            Ok(list) => ok(&list),
            Err(err) => store_error(&err),
        }
    }

    fn config(&self) -> Response<Full<Bytes>> {
        let provenance = self.composer.provenance();
        let mut config = serde_json::to_value(&**self.composer.current.load()).unwrap_or_default();
        crate::debug_views::redact_tls_keys(&mut config);
        ok(&json!({
            "version": provenance.version,
            "source": provenance.source,
            "store": provenance.store,
            "storeRevision": provenance.store_revision,
            "config": config,
        }))
    }

    async fn put(&self, id: &str, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let if_match = if_match(&req);
        let endpoint = match read_endpoint(req).await {
            Ok(endpoint) => endpoint,
            Err(response) => return *response,
        };
        let _write = self.composer.writes.lock().await;
        if let Err(err) = self.composer.check_change(id, Some(&endpoint)) {
            return apply_error(&err);
        }
        match self.store.put(id, &endpoint, if_match.as_deref()).await {
            Ok(stored) => {
                self.composer
                    .wait_applied(id, Some(stored.version.as_str()))
                    .await;
                let mut response = ok(&stored);
                if let Ok(etag) = HeaderValue::from_str(&format!("\"{}\"", stored.version)) {
                    response.headers_mut().insert(header::ETAG, etag);
                }
                response
            }
            Err(err) => store_error(&err),
        }
    }

    async fn delete(&self, id: &str, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        let if_match = if_match(req);
        let _write = self.composer.writes.lock().await;
        // Existence and version first, so a 404/412 swaps nothing.
        match self.store.get(id).await {
            Ok(stored) => {
                if let Some(expected) = &if_match
                    && *expected != stored.version
                {
                    return store_error(&StoreError::Conflict {
                        expected: expected.clone(),
                        current: stored.version,
                    });
                }
            }
            Err(err) => return store_error(&err),
        }
        if let Err(err) = self.composer.check_change(id, None) {
            return apply_error(&err);
        }
        match self.store.delete(id, if_match.as_deref()).await {
            Ok(()) => {
                self.composer.wait_applied(id, None).await;
                ok(&json!({ "id": id, "deleted": true }))
            }
            Err(err) => store_error(&err),
        }
    }
}

/// `If-Match`, without the quotes of an entity tag.
fn if_match(req: &Request<Incoming>) -> Option<String> {
    let value = req.headers().get(header::IF_MATCH)?.to_str().ok()?.trim();
    let value = value.strip_prefix("W/").unwrap_or(value);
    Some(value.trim_matches('"').to_owned())
}

/// The body if it fits in [`MAX_BODY`] (`None`: too large). The rest of a too-large body
/// is read and dropped, up to [`MAX_DRAIN`], so the client sees the 413 rather than a reset
/// connection; past that, the connection is closed.
async fn read_bounded(mut body: Incoming) -> Result<Option<Bytes>, hyper::Error> {
    let mut kept = Vec::new();
    let mut total = 0_usize;
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        total += data.len();
        if total > MAX_DRAIN {
            return Ok(None);
        }
        if total <= MAX_BODY {
            kept.extend_from_slice(&data);
        }
    }
    Ok((total <= MAX_BODY).then(|| Bytes::from(kept)))
}

/// Reads and validates the body: one endpoint, as JSON (`application/json`, or a body
/// starting with `{`) or YAML (`application/yaml`, `text/yaml`...).
async fn read_endpoint(req: Request<Incoming>) -> Result<Endpoint, Box<Response<Full<Bytes>>>> {
    let too_large = || {
        Box::new(error(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("body larger than {MAX_BODY} bytes"),
        ))
    };
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|length| length > MAX_DRAIN as u64) {
        return Err(too_large());
    }
    let body = match read_bounded(req.into_body()).await {
        Ok(Some(body)) => body,
        Ok(None) => return Err(too_large()),
        Err(err) => {
            return Err(Box::new(error(
                StatusCode::BAD_REQUEST,
                &format!("cannot read the body: {err}"),
            )));
        }
    };
    let Ok(text) = std::str::from_utf8(&body) else {
        return Err(Box::new(error(
            StatusCode::BAD_REQUEST,
            "the body is not UTF-8 text",
        )));
    };
    let json = match content_type.as_str() {
        "application/json" => true,
        "application/yaml" | "application/x-yaml" | "text/yaml" | "text/x-yaml" => false,
        "" => text.trim_start().starts_with('{'),
        other => {
            return Err(Box::new(error(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                &format!("content type {other:?}: send application/json or application/yaml"),
            )));
        }
    };
    let invalid = |err: configs::ConfigError| Box::new(config_error(&err));
    if json {
        let mut deserializer = serde_json::Deserializer::from_str(text);
        let endpoint: Endpoint =
            serde_path_to_error::deserialize(&mut deserializer).map_err(|err| {
                let path = err.path().to_string();
                let message = err.into_inner().to_string();
                Box::new(json_error(
                    StatusCode::BAD_REQUEST,
                    &format!("{path}: {message}"),
                    (path != ".").then_some(&path),
                ))
            })?;
        deserializer.end().map_err(|err| {
            Box::new(error(
                StatusCode::BAD_REQUEST,
                &format!("trailing data: {err}"),
            ))
        })?;
        configs::validate_endpoint(&endpoint).map_err(invalid)?;
        Ok(endpoint)
    } else {
        configs::parse_endpoint(text, Path::new("body")).map_err(invalid)
    }
}

fn apply_error(err: &ApplyError) -> Response<Full<Bytes>> {
    match err {
        ApplyError::Invalid(err) => config_error(err),
        ApplyError::Build(message) => error(StatusCode::BAD_REQUEST, message),
    }
}

fn config_error(err: &configs::ConfigError) -> Response<Full<Bytes>> {
    let field = match err {
        configs::ConfigError::Invalid { field, .. } => Some(field.as_str()),
        _ => None,
    };
    json_error(StatusCode::BAD_REQUEST, &err.to_string(), field)
}

fn store_error(err: &StoreError) -> Response<Full<Bytes>> {
    let status = match err {
        StoreError::NotFound(_) => StatusCode::NOT_FOUND,
        StoreError::Conflict { .. } => StatusCode::PRECONDITION_FAILED,
        StoreError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
    };
    error(status, &err.to_string())
}

fn not_allowed(allow: &'static str) -> Response<Full<Bytes>> {
    let mut response = error(
        StatusCode::METHOD_NOT_ALLOWED,
        &format!("method not allowed; use {allow}"),
    );
    response
        .headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    response
}

fn error(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    json_error(status, message, None)
}

fn json_error(status: StatusCode, message: &str, field: Option<&str>) -> Response<Full<Bytes>> {
    let body = match field {
        Some(field) => json!({ "error": message, "field": field }),
        None => json!({ "error": message }),
    };
    respond(status, &body)
}

fn ok(value: &impl Serialize) -> Response<Full<Bytes>> {
    respond(StatusCode::OK, value)
}

fn respond(status: StatusCode, value: &impl Serialize) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec());
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

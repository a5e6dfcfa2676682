//! The admin API (`--admin-addr`, bearer token) and the composer that merges the config
//! store's endpoints into the file config and applies the result.
//!
//! Routes (all JSON, all need `Authorization: Bearer <token>`):
//!
//! ```text
//! GET                /admin/v1/endpoints        [{"id","version","endpoint"}]
//! GET|PUT|DELETE     /admin/v1/endpoints/{id}   If-Match: <version> makes PUT/DELETE conditional
//! GET                /admin/v1/config           the merged config in force, its version and origin
//! GET                /admin/v1/instances        [{"id","addr","version","seen"}]
//! ```
//!
//! A PUT or DELETE is first prepared: the merged config is validated and its router built,
//! aside; a change that does not build is refused with 400 and nothing changes. Then it is
//! written to the store, and every gateway (this one included) applies it from the store's
//! watch through the same build-and-swap as a file reload; this gateway swaps in the router
//! it prepared when the store brings back the config it was built for (one build per write),
//! and builds afresh otherwise (another change came in between). The call answers once this
//! gateway applied it (or after 3 s).
//! Bodies are bounded (1 MiB); JSON nesting is bounded by serde_json's recursion limit.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use configs::{Endpoint, Gateway};
use debug::ConfigOrigin;
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
#[derive(Debug, Clone)]
pub(crate) struct Provenance {
    /// `store` when the store contributes endpoints, else `base.source` (`file`, `remote`,
    /// `ctrl`).
    pub(crate) source: String,
    /// The config the store endpoints are merged into: where it came from, its version.
    pub(crate) base: ConfigOrigin,
    /// The store DSN (no credentials), when a store is configured.
    pub(crate) store: Option<String>,
    /// `<base version>`, or `<base version>+<store revision>` with a store.
    pub(crate) version: String,
    /// The store revision merged in ("" without a store).
    pub(crate) store_revision: String,
}

/// What `--conf` names: a file (which a control service may write) or a URL.
#[derive(Clone)]
pub(crate) enum BaseSource {
    /// `--conf PATH`, and the control service writing it, if any.
    File {
        path: String,
        ctrl: Option<configs_ctrl::CtrlLoader>,
    },
    /// `--conf http(s)://...`, shown without credentials and query values.
    Remote { url: String },
}

/// Which content of the base config is in force (from the loader's [`configs::Loaded`]).
struct BaseVersion {
    sha256: String,
    main_sha256: String,
    etag: Option<String>,
}

impl BaseVersion {
    fn of(loaded: &configs::Loaded) -> Self {
        BaseVersion {
            sha256: loaded.sha256.clone(),
            main_sha256: loaded.main_sha256.clone(),
            etag: loaded.etag.clone(),
        }
    }
}

impl BaseSource {
    /// Where the base config at `version` came from: a release of the control service when
    /// the file in force is one it wrote, else the file; or the URL, versioned by its ETag.
    fn origin(&self, version: &BaseVersion) -> ConfigOrigin {
        let short = version
            .sha256
            .get(..12)
            .unwrap_or(&version.sha256)
            .to_owned();
        match self {
            BaseSource::Remote { url } => {
                let tag = version.etag.as_deref().map(|etag| {
                    let etag = etag.trim();
                    etag.strip_prefix("W/").unwrap_or(etag).trim_matches('"')
                });
                ConfigOrigin {
                    source: "remote".to_owned(),
                    url: Some(url.clone()),
                    etag: version.etag.clone(),
                    version: tag
                        .filter(|tag| !tag.is_empty())
                        .map_or(short, str::to_owned),
                    ..ConfigOrigin::default()
                }
            }
            BaseSource::File { path, ctrl } => {
                let release = ctrl
                    .as_ref()
                    .and_then(|ctrl| Some((ctrl.name(), ctrl.release_of(&version.main_sha256)?)));
                match release {
                    Some((name, release)) => ConfigOrigin {
                        source: "ctrl".to_owned(),
                        path: Some(path.clone()),
                        url: Some(configs::redact_url(&release.url)),
                        name: Some(name.to_owned()),
                        version: release.version,
                        ..ConfigOrigin::default()
                    },
                    None => ConfigOrigin {
                        source: "file".to_owned(),
                        path: Some(path.clone()),
                        version: short,
                        ..ConfigOrigin::default()
                    },
                }
            }
        }
    }
}

/// The file config and the store snapshot, merged and applied together.
pub(crate) struct Composer {
    proxy: Arc<Proxy>,
    current: Arc<ArcSwap<Gateway>>,
    store: Option<Arc<dyn ConfigStore>>,
    source: BaseSource,
    state: Mutex<State>,
    /// Serializes admin writes (each is prepare, then store write, then wait for the apply).
    writes: tokio::sync::Mutex<()>,
    /// The router the admin write in progress built, for the config it expects back.
    prepared: Mutex<Option<Prepared>>,
    applied: tokio::sync::watch::Sender<String>,
}

/// A router built for a config that is not in force yet.
struct Prepared {
    config: Gateway,
    router: proxy::BuiltRouter,
}

struct State {
    base: Gateway,
    base_version: BaseVersion,
    snapshot: Arc<Snapshot>,
}

impl Composer {
    /// A composer whose base config (`loaded`, from `source`) is already applied to
    /// `proxy`.
    pub(crate) fn new(
        proxy: Arc<Proxy>,
        current: Arc<ArcSwap<Gateway>>,
        store: Option<Arc<dyn ConfigStore>>,
        source: BaseSource,
        loaded: &configs::Loaded,
    ) -> Arc<Composer> {
        let (applied, _) = tokio::sync::watch::channel(String::new());
        Arc::new(Composer {
            proxy,
            current,
            store,
            source,
            state: Mutex::new(State {
                base: loaded.gateway.clone(),
                base_version: BaseVersion::of(loaded),
                snapshot: Arc::new(Snapshot::default()),
            }),
            writes: tokio::sync::Mutex::new(()),
            prepared: Mutex::new(None),
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
        let base = self.source.origin(&state.base_version);
        let from_store = !state.snapshot.endpoints.is_empty();
        Provenance {
            source: if from_store {
                "store".to_owned()
            } else {
                base.source.clone()
            },
            store: self.store.as_ref().map(|s| s.describe()),
            version: if self.store.is_some() {
                format!("{}+{}", base.version, state.snapshot.revision)
            } else {
                base.version.clone()
            },
            base,
            store_revision: state.snapshot.revision.clone(),
        }
    }

    /// The file config merged with the store's endpoints, in id order.
    fn merge(base: &Gateway, endpoints: impl IntoIterator<Item = Endpoint>) -> Gateway {
        let mut merged = base.clone();
        configs::merge_priority(&mut merged, endpoints);
        merged
    }

    fn prepared(&self) -> MutexGuard<'_, Option<Prepared>> {
        self.prepared.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Swaps in `merged` unless it is the config in force: the router an admin write
    /// prepared for exactly this config, else a new one (validated and built now).
    fn apply(&self, merged: Gateway) -> Result<(), ApplyError> {
        if **self.current.load() == merged {
            return Ok(());
        }
        let started = std::time::Instant::now();
        let prepared = {
            let mut slot = self.prepared();
            match slot.take() {
                Some(prepared) if prepared.config == merged => Some(prepared.router),
                other => {
                    *slot = other;
                    None
                }
            }
        };
        let prebuilt = prepared.is_some();
        let router = match prepared {
            Some(router) => router,
            None => {
                configs::validate(&merged).map_err(ApplyError::Invalid)?;
                self.proxy
                    .build(&merged)
                    .map_err(|err| ApplyError::Build(err.to_string()))?
            }
        };
        self.proxy.install(router);
        tracing::info!(
            endpoints = merged.endpoints.len(),
            build_ms = started.elapsed().as_secs_f64() * 1000.0,
            prebuilt,
            "config applied"
        );
        self.current.store(Arc::new(merged));
        Ok(())
    }

    /// A new base config (from the loader's watch).
    pub(crate) fn set_base(&self, loaded: configs::Loaded) -> Result<(), String> {
        let mut state = self.state();
        let merged = Self::merge(
            &loaded.gateway,
            state.snapshot.endpoints.iter().map(|s| s.endpoint.clone()),
        );
        self.apply(merged).map_err(|err| err.to_string())?;
        state.base_version = BaseVersion::of(&loaded);
        state.base = loaded.gateway;
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
    /// merged config is validated and its router built and kept aside, for [`apply`] to
    /// swap in when the store brings the change back; nothing changes now.
    ///
    /// [`apply`]: Composer::apply
    fn prepare_change(&self, id: &str, endpoint: Option<&Endpoint>) -> Result<(), ApplyError> {
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
        let router = self
            .proxy
            .build(&merged)
            .map_err(|err| ApplyError::Build(err.to_string()))?;
        *self.prepared() = Some(Prepared {
            config: merged,
            router,
        });
        Ok(())
    }

    /// Drops (and closes) a prepared router that was not swapped in.
    fn discard_prepared(&self) {
        let unused = self.prepared().take();
        drop(unused);
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
            "base": provenance.base,
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
        self.write(id, &endpoint, if_match.as_deref()).await
    }

    /// Prepares, stores and waits for the apply of `endpoint` under `id`.
    async fn write(
        &self,
        id: &str,
        endpoint: &Endpoint,
        if_match: Option<&str>,
    ) -> Response<Full<Bytes>> {
        let _write = self.composer.writes.lock().await;
        if let Err(err) = self.composer.prepare_change(id, Some(endpoint)) {
            return apply_error(&err);
        }
        let response = match self.store.put(id, endpoint, if_match).await {
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
        };
        self.composer.discard_prepared();
        response
    }

    async fn delete(&self, id: &str, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        self.remove(id, if_match(req).as_deref()).await
    }

    /// Checks, prepares, deletes and waits for the apply of the removal of `id`.
    async fn remove(&self, id: &str, if_match: Option<&str>) -> Response<Full<Bytes>> {
        let _write = self.composer.writes.lock().await;
        // Existence and version first, so a 404/412 swaps nothing.
        match self.store.get(id).await {
            Ok(stored) => {
                if let Some(expected) = if_match
                    && expected != stored.version
                {
                    return store_error(&StoreError::Conflict {
                        expected: expected.to_owned(),
                        current: stored.version,
                    });
                }
            }
            Err(err) => return store_error(&err),
        }
        if let Err(err) = self.composer.prepare_change(id, None) {
            return apply_error(&err);
        }
        let response = match self.store.delete(id, if_match).await {
            Ok(()) => {
                self.composer.wait_applied(id, None).await;
                ok(&json!({ "id": id, "deleted": true }))
            }
            Err(err) => store_error(&err),
        };
        self.composer.discard_prepared();
        response
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::store::FileStore;

    /// A composer and admin API on a file store in `dir`, over a base config of three
    /// endpoints with a global middleware that counts how many times it is built (once per
    /// endpoint per router build).
    async fn admin_on(dir: &Path) -> (Admin, Arc<AtomicUsize>, CancellationToken) {
        let builds = Arc::new(AtomicUsize::new(0));
        let counted = builds.clone();
        let mut registry = middleware::Registry::new();
        registry.register("count", move |_: &configs::Middleware, _: &_| {
            counted.fetch_add(1, Ordering::SeqCst);
            Ok(middleware::Middleware::from_fn("count", |next| next))
        });
        let clients = client::Factory::new(client::ClientOptions::default(), None);
        let proxy = Arc::new(Proxy::new(
            clients,
            registry,
            Arc::new(proxy::Metrics::new()),
        ));
        let base = configs::parse(
            "middlewares:\n  - name: count\nendpoints:\n  - path: /a\n    backends: [{target: 127.0.0.1:9}]\n  - path: /b\n    backends: [{target: 127.0.0.1:9}]\n  - path: /c\n    backends: [{target: 127.0.0.1:9}]\n",
            Path::new("base.yaml"),
        )
        .unwrap();
        proxy.update(&base).unwrap();
        let current = Arc::new(ArcSwap::from_pointee(base.clone()));
        let store: Arc<dyn ConfigStore> = Arc::new(FileStore::open(dir.to_path_buf()).unwrap());
        let loaded = configs::Loaded {
            gateway: base,
            sha256: "0".repeat(64),
            main_sha256: "0".repeat(64),
            etag: None,
            loaded_at: std::time::SystemTime::now(),
            skipped: Vec::new(),
        };
        let source = BaseSource::File {
            path: "base.yaml".to_owned(),
            ctrl: None,
        };
        let composer = Composer::new(proxy, current, Some(store.clone()), source, &loaded);
        let shutdown = CancellationToken::new();
        follow_store(composer.clone(), store.clone(), shutdown.clone());
        let admin = Admin::new("t".to_owned(), composer, store);
        (admin, builds, shutdown)
    }

    fn endpoint(path: &str, extra: &str) -> Endpoint {
        configs::parse_endpoint(
            &format!("path: {path}\nbackends: [{{target: 127.0.0.1:9}}]\n{extra}"),
            Path::new("e.yaml"),
        )
        .unwrap()
    }

    fn paths(admin: &Admin) -> Vec<String> {
        let mut paths: Vec<String> = admin
            .composer
            .proxy
            .routes()
            .into_iter()
            .map(|r| r.path)
            .collect();
        paths.sort();
        paths
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_admin_write_builds_the_router_once() {
        let dir = tempfile::tempdir().unwrap();
        let (admin, builds, shutdown) = admin_on(dir.path()).await;
        let before = builds.load(Ordering::SeqCst);

        let put = admin.write("d", &endpoint("/d", ""), None).await;
        assert_eq!(put.status(), StatusCode::OK);
        assert_eq!(paths(&admin), ["/a", "/b", "/c", "/d"]);
        // One router of four endpoints, not a check build and then a second one.
        assert_eq!(builds.load(Ordering::SeqCst) - before, 4);
        assert!(admin.composer.prepared().is_none(), "nothing left aside");

        let before = builds.load(Ordering::SeqCst);
        let deleted = admin.remove("d", None).await;
        assert_eq!(deleted.status(), StatusCode::OK);
        assert_eq!(paths(&admin), ["/a", "/b", "/c"]);
        assert_eq!(builds.load(Ordering::SeqCst) - before, 3);
        shutdown.cancel();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_that_does_not_build_is_400_and_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (admin, _builds, shutdown) = admin_on(dir.path()).await;
        let broken = endpoint(
            "/broken",
            "middlewares:\n  - name: not-registered\n    required: true\n",
        );
        let refused = admin.write("broken", &broken, None).await;
        assert_eq!(refused.status(), StatusCode::BAD_REQUEST);
        assert_eq!(paths(&admin), ["/a", "/b", "/c"]);
        assert!(
            admin.store.list().await.unwrap().is_empty(),
            "nothing stored"
        );
        assert!(admin.composer.prepared().is_none());
        // A write the store refuses (412) leaves nothing aside either.
        let stale = admin.write("e", &endpoint("/e", ""), Some("7")).await;
        assert_eq!(stale.status(), StatusCode::PRECONDITION_FAILED);
        assert!(admin.composer.prepared().is_none());
        assert_eq!(paths(&admin), ["/a", "/b", "/c"]);
        shutdown.cancel();
    }
}

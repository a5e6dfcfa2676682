//! The proxy: holds the current router in an `ArcSwap`, builds a complete new router on
//! each config update, and serves requests through the matched endpoint's handler.
//!
//! A config that fails to build leaves the old router serving. A replaced router drains
//! its in-flight requests (bounded grace) and then closes its clients and middlewares.

mod edge;
mod endpoint;
mod error;
mod headers;
pub mod metrics;
mod render;
mod retry;
pub mod server;
pub mod tls;
mod tunnel;

use std::borrow::Cow;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use futures_util::FutureExt;
use http::uri::PathAndQuery;
use http::{Request, Response, Uri};
use http_body_util::BodyExt;
use middleware::{Body, BoxError, BuildContext, EndpointInfo, Registry};
use router::path::PathError;
use router::{MatchRule, MatchSource, MatchTest, MuxRouter, RequestParts, RouteMatch, Router};
use serde::Serialize;

pub use edge::Edge;
pub use endpoint::{DEFAULT_ENDPOINT_TIMEOUT, EndpointHandler, EndpointSpec, effective_timeout};
pub use error::{ProxyError, Side};
pub use metrics::Metrics;
pub use render::{Dialect, error_response, rendered};
pub use retry::RetrySwitch;
pub use tunnel::{DEFAULT_TUNNEL_IDLE_TIMEOUT, HALF_CLOSED_LINGER};

/// How long a replaced router waits for its in-flight requests before closing its clients.
pub const DEFAULT_CLOSE_GRACE: Duration = Duration::from_secs(30);

/// A config update that could not be built; the old router keeps serving.
#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    /// An endpoint's client could not be built.
    #[error("endpoint {endpoint}: {source}")]
    Client {
        /// "METHOD path".
        endpoint: String,
        /// The cause.
        #[source]
        source: client::BuildError,
    },
    /// A required middleware failed to build.
    #[error("endpoint {endpoint}: {source}")]
    Middleware {
        /// "METHOD path".
        endpoint: String,
        /// The cause.
        #[source]
        source: middleware::BuildError,
    },
    /// The route could not be registered.
    #[error("endpoint {endpoint}: {source}")]
    Route {
        /// "METHOD path".
        endpoint: String,
        /// The cause.
        #[source]
        source: router::RouteError,
    },
}

/// One route as shown by `/debug/proxy/router/inspect`.
#[derive(Debug, Clone, Serialize)]
pub struct RouteInfo {
    /// Path pattern.
    pub path: String,
    /// Method ("" = any).
    pub method: String,
    /// Host ("" = any).
    pub host: String,
    /// "HTTP" or "GRPC".
    pub protocol: String,
    /// Configured backend targets.
    pub backends: Vec<String>,
    /// The endpoint timeout in force, as a Go duration (`1s` when the config sets none).
    pub timeout: String,
    /// Header matchers of the endpoint (empty for most).
    pub headers: Vec<configs::Matcher>,
    /// Query matchers of the endpoint (empty for most).
    pub query: Vec<configs::Matcher>,
}

struct RouterState {
    router: MuxRouter<Arc<EndpointHandler>>,
    routes: Vec<RouteInfo>,
    /// Whether any route is bound to a host.
    any_host: bool,
}

/// A router built by [`Proxy::build`] and not serving yet. [`Proxy::install`] swaps it in;
/// dropped instead, it is closed (its clients and middlewares released).
pub struct BuiltRouter {
    state: Option<RouterState>,
}

impl std::fmt::Debug for BuiltRouter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BuiltRouter")
            .field("routes", &self.state.as_ref().map_or(0, |s| s.routes.len()))
            .finish()
    }
}

impl Drop for BuiltRouter {
    fn drop(&mut self) {
        if let Some(state) = self.state.take() {
            spawn_close(async move { state.router.sync_close(Duration::ZERO).await });
        }
    }
}

/// The gateway's request handler.
pub struct Proxy {
    state: ArcSwap<RouterState>,
    clients: client::Factory,
    middlewares: Registry,
    metrics: Arc<Metrics>,
    close_grace: Duration,
    /// The gateway-wide Redis DSN handed to middleware factories (`--redis`).
    redis: Option<Arc<str>>,
    /// Every upgrade tunnel of every router this proxy builds; they outlive reloads.
    tunnels: tunnel::Tunnels,
    /// Kratos' `gw:Retry`: whether any endpoint retries.
    retries: RetrySwitch,
    /// Closes the tunnels when the proxy goes away (after the server's shutdown grace).
    _close_tunnels: tokio_util::sync::DropGuard,
}

impl Proxy {
    /// A proxy with an empty router (every request gets 404 until the first update).
    pub fn new(clients: client::Factory, middlewares: Registry, metrics: Arc<Metrics>) -> Self {
        let tunnels = tunnel::Tunnels::default();
        Self {
            state: ArcSwap::from_pointee(RouterState {
                router: MuxRouter::new(),
                routes: vec![],
                any_host: false,
            }),
            clients,
            middlewares,
            metrics,
            close_grace: DEFAULT_CLOSE_GRACE,
            retries: RetrySwitch::default(),
            redis: None,
            _close_tunnels: tunnels.cancel_token().drop_guard(),
            tunnels,
        }
    }

    /// Sets how long an upgrade tunnel (WebSocket, ...) may carry no byte either way before
    /// both sides are closed (default [`DEFAULT_TUNNEL_IDLE_TIMEOUT`], 60 s; zero means the
    /// default). Applies to the endpoints built by later updates.
    pub fn with_tunnel_idle_timeout(mut self, idle_timeout: Duration) -> Self {
        self.tunnels = self.tunnels.with_idle_timeout(idle_timeout);
        self
    }

    /// Closes every open upgrade tunnel, e.g. once a shutdown's grace has passed. Dropping
    /// the proxy does it too, so tunnels end with the gateway that opened them.
    pub fn close_tunnels(&self) {
        self.tunnels.close();
    }

    /// Sets the Redis DSN middlewares use when their own `redis` option is unset
    /// (`--redis`); applies to the endpoints built by later updates.
    pub fn with_redis(mut self, dsn: Option<String>) -> Self {
        self.redis = dsn.map(Arc::from);
        self
    }

    /// Sets how long a replaced router may drain before its clients are closed.
    pub fn with_close_grace(mut self, grace: Duration) -> Self {
        self.close_grace = grace;
        self
    }

    /// The switch that turns retries off for every endpoint (Kratos' `gw:Retry` flag).
    pub fn retries(&self) -> &RetrySwitch {
        &self.retries
    }

    /// The metric families.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The client factory (and through it the service watcher).
    pub fn clients(&self) -> &client::Factory {
        &self.clients
    }

    /// Builds a complete router for `config` and swaps it in; the old router drains and
    /// closes in the background. On error nothing changes.
    pub fn update(&self, config: &configs::Gateway) -> Result<(), UpdateError> {
        let built = self.build(config)?;
        self.install(built);
        Ok(())
    }

    /// Builds a complete router for `config` without swapping it in: [`install`] does that
    /// later, so a caller can validate a change and apply it with one build (the admin API
    /// builds before it stores a change, then installs when the store brings it back). On
    /// error, what was built so far is closed.
    ///
    /// [`install`]: Proxy::install
    pub fn build(&self, config: &configs::Gateway) -> Result<BuiltRouter, UpdateError> {
        let mut router = MuxRouter::new();
        let mut routes = Vec::with_capacity(config.endpoints.len());
        if let Err(err) = self.build_routes(config, &mut router, &mut routes) {
            // Release what the endpoints built so far hold (watcher subscriptions,
            // middleware tasks); nothing was served through this router.
            spawn_close(async move { router.sync_close(Duration::ZERO).await });
            return Err(err);
        }
        let any_host = routes.iter().any(|route| !route.host.is_empty());
        Ok(BuiltRouter {
            state: Some(RouterState {
                router,
                routes,
                any_host,
            }),
        })
    }

    /// Swaps in a router [`build`](Proxy::build) made (on this proxy); the old router
    /// drains and closes in the background.
    pub fn install(&self, mut built: BuiltRouter) {
        let Some(state) = built.state.take() else {
            return;
        };
        let old = self.state.swap(Arc::new(state));
        let grace = self.close_grace;
        spawn_close(async move { old.router.sync_close(grace).await });
    }

    fn build_routes(
        &self,
        config: &configs::Gateway,
        router: &mut MuxRouter<Arc<EndpointHandler>>,
        routes: &mut Vec<RouteInfo>,
    ) -> Result<(), UpdateError> {
        for endpoint in &config.endpoints {
            let name = endpoint_name(endpoint);
            let handler = self.build_endpoint(config, endpoint, &name)?;
            let closer_handler = handler.clone();
            router
                .handle_matching(
                    &endpoint.path,
                    &endpoint.method,
                    &endpoint.host,
                    match_rules(endpoint),
                    handler,
                    Some(Box::new(move || closer_handler.close())),
                )
                .map_err(|source| UpdateError::Route {
                    endpoint: name,
                    source,
                })?;
            routes.push(RouteInfo {
                path: endpoint.path.clone(),
                method: endpoint.method.clone(),
                host: endpoint.host.clone(),
                protocol: endpoint.protocol.as_str().into(),
                backends: endpoint.backends.iter().map(|b| b.target.clone()).collect(),
                timeout: configs::format_duration(endpoint::effective_timeout(endpoint.timeout)),
                headers: endpoint.headers.clone(),
                query: endpoint.query.clone(),
            });
        }
        Ok(())
    }

    fn build_endpoint(
        &self,
        config: &configs::Gateway,
        endpoint: &configs::Endpoint,
        name: &str,
    ) -> Result<Arc<EndpointHandler>, UpdateError> {
        let info = Arc::new(EndpointInfo::from_config(endpoint));
        let spec = client::ClientSpec {
            name,
            protocol: endpoint.protocol,
            selector: &endpoint.selector,
            backends: &endpoint.backends,
            tls_store: &config.tls_store,
        };
        let client = self
            .clients
            .build(&spec)
            .map_err(|source| UpdateError::Client {
                endpoint: name.into(),
                source,
            })?;
        let ctx = BuildContext::new(info.clone())
            .with_denials(self.metrics.clone())
            .with_redis(self.redis.clone());
        let mut built = Vec::new();
        for entry in config.middlewares.iter().chain(&endpoint.middlewares) {
            match self.middlewares.build(entry, &ctx) {
                Ok(Some(middleware)) => built.push(middleware),
                Ok(None) => {
                    tracing::warn!(endpoint = name, middleware = %entry.name, "unknown middleware skipped")
                }
                Err(source) => {
                    self.metrics
                        .middleware_build_failures
                        .with_label_values(&[&entry.name])
                        .inc();
                    client.close();
                    for middleware in &built {
                        middleware.close();
                    }
                    return Err(UpdateError::Middleware {
                        endpoint: name.into(),
                        source,
                    });
                }
            }
        }
        let spec = EndpointSpec {
            timeout: endpoint.timeout,
            retry: endpoint.retry.as_ref(),
        };
        Ok(Arc::new(
            EndpointHandler::new(info, spec, client, built, &self.metrics)
                .with_tunnels(self.tunnels.clone())
                .with_retry_switch(self.retries.clone()),
        ))
    }

    /// Routes shown by `/debug/proxy/router/inspect`.
    pub fn routes(&self) -> Vec<RouteInfo> {
        self.state.load().routes.clone()
    }

    /// Serves one downstream request; never fails (errors become responses).
    pub async fn handle<B>(&self, req: Request<B>, remote: SocketAddr) -> Response<Body>
    where
        B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        // One spelling of the path for the router and the upstream alike.
        let normal = match router::path::normalize(req.uri().path()) {
            Ok(Cow::Borrowed(_)) => None,
            Ok(Cow::Owned(normal)) => Some(normal),
            Err(err) => {
                let err = match err {
                    PathError::DotSegment => ProxyError::DotSegment,
                    PathError::BadEscape => ProxyError::BadRequest("invalid percent-encoding"),
                };
                return error_response(&err, Dialect::of_request(&req));
            }
        };
        let mut req = req;
        if let Some(normal) = normal {
            match with_path(std::mem::take(req.uri_mut()), &normal) {
                Some(uri) => *req.uri_mut() = uri,
                None => {
                    let err = ProxyError::BadRequest("invalid path");
                    return error_response(&err, Dialect::of_request(&req));
                }
            }
        }
        let state = self.state.load_full();
        // The Host header is only looked at when some route is bound to a host.
        let host = if state.any_host {
            request_host(&req)
        } else {
            ""
        };
        let path = req.uri().path();
        // Headers and query are read only if a candidate route has matchers.
        let parts = RequestView(&req);
        let handler = match state
            .router
            .route_request(req.method().as_str(), host, path, &parts)
        {
            RouteMatch::Found(handler) => handler.clone(),
            RouteMatch::NotFound => {
                self.metrics.count_unmatched(req.method(), 404);
                return error_response(&ProxyError::NotFound, Dialect::of_request(&req));
            }
            RouteMatch::MethodNotAllowed => {
                match preflight_method(&req)
                    .map(|method| state.router.route_request(method, host, path, &parts))
                {
                    // A CORS preflight goes to the endpoint of the method it asks about, when
                    // a middleware there declares that it answers preflights.
                    Some(RouteMatch::Found(handler)) if handler.answers_preflight() => {
                        handler.clone()
                    }
                    _ => {
                        self.metrics.count_unmatched(req.method(), 405);
                        return error_response(
                            &ProxyError::MethodNotAllowed,
                            Dialect::of_request(&req),
                        );
                    }
                }
            }
        };
        let _in_flight = state.router.enter();
        // An empty body (most GETs) needs no boxed wrapper.
        let req = req.map(|body| {
            if body.is_end_stream() {
                middleware::empty_body()
            } else {
                body.map_err(Into::into).boxed_unsync()
            }
        });
        let protocol = handler.info().protocol;
        // Boxed once here, so the layers above move a pointer rather than the whole state.
        let serve = boxed_with(|| handler.serve(req, remote));
        match AssertUnwindSafe(serve).catch_unwind().await {
            Ok(response) => response,
            Err(_) => {
                tracing::error!(endpoint = %handler.info().path, "handler panicked");
                error_response(&ProxyError::Panic, protocol.into())
            }
        }
    }
}

/// The future `make` returns, built in a box. `Box::pin(future)` builds the future first
/// and then copies all of it into the box: 4 KiB for an endpoint's request, 5.6 KiB for the
/// connection's per-request future: 0.56k instructions of memcpy per request (callgrind).
/// Allocated first, the box is where `make` writes its result.
pub(crate) fn boxed_with<F: std::future::Future>(make: impl FnOnce() -> F) -> Pin<Box<F>> {
    Box::into_pin(Box::write(Box::new_uninit(), make()))
}

/// Runs a router's close in the background (it may wait for in-flight requests).
fn spawn_close(close: impl std::future::Future<Output = ()> + Send + 'static) {
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => {
            runtime.spawn(close);
        }
        Err(_) => tracing::warn!("no runtime: a replaced router was not closed"),
    }
}

/// `uri` with its path replaced by `path` (the query kept).
fn with_path(uri: Uri, path: &str) -> Option<Uri> {
    let mut parts = uri.into_parts();
    let path_and_query = match parts.path_and_query.as_ref().and_then(|p| p.query()) {
        Some(query) => format!("{path}?{query}"),
        None => path.to_owned(),
    };
    parts.path_and_query = Some(PathAndQuery::from_maybe_shared(Bytes::from(path_and_query)).ok()?);
    Uri::from_parts(parts).ok()
}

fn endpoint_name(endpoint: &configs::Endpoint) -> String {
    let method = if endpoint.method.is_empty() {
        "*"
    } else {
        &endpoint.method
    };
    format!("{method} {}{}", endpoint.host, endpoint.path)
}

/// The router's rules for an endpoint's `headers:` and `query:` (validated by `configs`).
fn match_rules(endpoint: &configs::Endpoint) -> Vec<MatchRule> {
    let rule = |source, matcher: &configs::Matcher| MatchRule {
        source,
        name: matcher.name.clone(),
        test: match (&matcher.value, &matcher.regex) {
            (Some(value), _) => MatchTest::Value(value.clone()),
            (None, Some(regex)) => MatchTest::Regex(regex.clone()),
            (None, None) => MatchTest::Present,
        },
    };
    let headers = endpoint
        .headers
        .iter()
        .map(|m| rule(MatchSource::Header, m));
    let query = endpoint.query.iter().map(|m| rule(MatchSource::Query, m));
    headers.chain(query).collect()
}

/// A request's headers and query as the router's matchers read them.
struct RequestView<'r, B>(&'r Request<B>);

impl<B> RequestParts for RequestView<'_, B> {
    fn header_values(&self, name: &str) -> impl Iterator<Item = &[u8]> {
        self.0
            .headers()
            .get_all(name)
            .iter()
            .map(http::HeaderValue::as_bytes)
    }

    fn raw_query(&self) -> Option<&str> {
        self.0.uri().query()
    }
}

/// The method a CORS preflight (`OPTIONS` with `Access-Control-Request-Method`) asks about.
fn preflight_method<B>(req: &Request<B>) -> Option<&str> {
    if req.method() != http::Method::OPTIONS {
        return None;
    }
    req.headers()
        .get(http::header::ACCESS_CONTROL_REQUEST_METHOD)
        .and_then(|v| v.to_str().ok())
}

fn request_host<B>(req: &Request<B>) -> &str {
    req.headers()
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().host())
        .unwrap_or("")
}

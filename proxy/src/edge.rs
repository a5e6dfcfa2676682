//! The edge: where the HTTP server, `/metrics`, `/debug` and the proxy meet. Every request
//! enters here once; nothing below it can fail the connection, since every failure has
//! already become a response (`Error = Infallible`).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response};
use middleware::{Body, BoxError};

use crate::Proxy;
use crate::error::ProxyError;
use crate::headers::host_problem;
use crate::metrics::Metrics;
use crate::render::{Dialect, error_response};

/// `/metrics` in Prometheus text format; 403 to a request that came through another proxy
/// (`X-Forwarded-For` or `Forwarded`), as Kratos answers, so metrics never leak to the
/// internet through a load balancer in front of the gateway.
pub(crate) fn metrics_response<B>(metrics: &Metrics, req: &Request<B>) -> Response<Body> {
    let forwarded = req.headers().contains_key("x-forwarded-for")
        || req.headers().contains_key(http::header::FORWARDED);
    if forwarded {
        let mut response = Response::new(middleware::full_body("forbidden: forwarded request\n"));
        *response.status_mut() = http::StatusCode::FORBIDDEN;
        return response;
    }
    let mut response = Response::new(middleware::full_body(metrics.encode()));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    response
}

/// The outermost service of every listener.
pub struct Edge {
    proxy: Arc<Proxy>,
    debug: Option<Arc<debug::DebugMux>>,
    /// A `--metrics-addr` listener: `/metrics` only, everything else 404.
    metrics_only: bool,
}

impl Edge {
    /// An edge in front of `proxy`; `debug` mounts the `/debug/*` views when given.
    pub fn new(proxy: Arc<Proxy>, debug: Option<Arc<debug::DebugMux>>) -> Self {
        Self {
            proxy,
            debug,
            metrics_only: false,
        }
    }

    /// The edge of a `--metrics-addr` listener: it serves `/metrics` (with the same refusal
    /// of forwarded requests) and answers 404 to everything else, so no proxied route or
    /// debug view is reachable through it.
    pub fn metrics_only(proxy: Arc<Proxy>) -> Self {
        Self {
            proxy,
            debug: None,
            metrics_only: true,
        }
    }

    /// The metric families (open connections are counted by the server).
    pub fn metrics(&self) -> &Arc<Metrics> {
        self.proxy.metrics()
    }

    /// Serves one request: a malformed `Host` gets 400, then `/metrics`, `/debug/*` (when
    /// mounted), else the proxy. Every branch lives in one async fn, so the proxied path
    /// pays for no extra boxing.
    pub async fn call<B>(
        self: Arc<Self>,
        req: Request<B>,
        remote: SocketAddr,
    ) -> Result<Response<Body>, Infallible>
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        // A request off the wire whose Host is missing, doubled or invalid is refused
        // before anything routes it (RFC 9112 §3.2).
        if let Some(problem) = host_problem(&req) {
            let dialect = Dialect::of_request(&req);
            return Ok(error_response(&ProxyError::BadRequest(problem), dialect));
        }
        if req.uri().path() == "/metrics" {
            return Ok(metrics_response(self.metrics(), &req));
        }
        if self.metrics_only {
            let mut response = Response::new(middleware::full_body("not found\n"));
            *response.status_mut() = http::StatusCode::NOT_FOUND;
            return Ok(response);
        }
        if let Some(debug) = &self.debug
            && debug::DebugMux::matches(req.uri().path())
        {
            // Boxed: the debug views' state (a profile being taken) would otherwise make
            // every proxied request's future larger, and it is copied when it moves.
            let response = Box::pin(debug.handle(req, remote)).await;
            return Ok(
                response.map(|body| middleware::full_body(body.into_inner().unwrap_or_default()))
            );
        }
        Ok(self.proxy.handle(req, remote).await)
    }
}

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
use crate::metrics::Metrics;

/// The outermost service of every listener.
pub struct Edge {
    proxy: Arc<Proxy>,
    debug: Option<Arc<debug::DebugMux>>,
}

impl Edge {
    /// An edge in front of `proxy`; `debug` mounts the `/debug/*` views when given.
    pub fn new(proxy: Arc<Proxy>, debug: Option<Arc<debug::DebugMux>>) -> Self {
        Self { proxy, debug }
    }

    /// The metric families (open connections are counted by the server).
    pub fn metrics(&self) -> &Arc<Metrics> {
        self.proxy.metrics()
    }

    /// Serves one request: `/metrics`, `/debug/*` (when mounted), else the proxy. Every
    /// branch lives in one async fn, so the proxied path pays for no extra boxing.
    pub async fn call<B>(
        self: Arc<Self>,
        req: Request<B>,
        remote: SocketAddr,
    ) -> Result<Response<Body>, Infallible>
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        if req.uri().path() == "/metrics" {
            let mut response = Response::new(middleware::full_body(self.metrics().encode()));
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            return Ok(response);
        }
        if let Some(debug) = &self.debug
            && debug::DebugMux::matches(req.uri().path())
        {
            let response = debug.handle(req, remote).await;
            return Ok(
                response.map(|body| middleware::full_body(body.into_inner().unwrap_or_default()))
            );
        }
        Ok(self.proxy.handle(req, remote).await)
    }
}

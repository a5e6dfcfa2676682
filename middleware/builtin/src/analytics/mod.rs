//! `analytics` (Apigee Edge's analytics plugin): one JSON record per request,
//! `{time, endpoint, method, path, node, status, latency_ms, rx_bytes, tx_bytes, client}`,
//! batched and POSTed to a collector as a JSON array (`url`) or appended to a file as JSON
//! lines (`file`).
//!
//! - The record is written when the response body ends (or fails, or the client goes
//!   away), so `latency_ms` covers the whole exchange and the byte counts are right for
//!   streamed bodies: both bodies are counted as they are polled
//!   ([`observe`](middleware::hooks::observe)). `node` is the node the client picked
//!   ([`RequestOptions::backend`]); `client` is the id an `auth` middleware recorded
//!   ([`RequestScope::client_id`](middleware::RequestScope)), else the peer's IP.
//! - A request never waits for analytics: records go into a bounded queue with
//!   `try_send`; a full queue, or a batch the collector or the file does not take, drops
//!   records and counts them in `go_gateway_middleware_denied_total{middleware="analytics",
//!   reason="record_dropped"}` (the request itself is never refused).
//! - Middlewares with the same options share one sink (one queue, one shipping task, one
//!   writer of the file) across endpoints and config reloads; it ends, after shipping what
//!   is left, when the last of them is dropped.
//! - The chain runs once per attempt, so a retried request gives one record per attempt.

mod options;
mod record;
mod sink;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, ready};
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use http::{Method, Request, Response, Uri};
use http_body::Body as _;
use tower::{Layer, Service};

pub use self::options::AnalyticsOptions;
pub use self::record::{Client, Record};
pub use self::sink::SinkSnapshot;
use self::sink::{Destination, Sink};
use crate::support::{Denied, decode, option_error};
use middleware::hooks::{BodyEnd, BodyObserver, observe};
use middleware::{
    BackendSlot, Body, BoxError, BuildContext, BuildError, EndpointInfo, Factory, Middleware,
    RequestOptions,
};

/// The name this middleware is registered under and counted as.
pub const NAME: &str = "analytics";

/// Builds `analytics` middlewares; keeps their sinks so equal options share one.
/// Cheap to clone: clones share the sinks.
#[derive(Clone)]
pub struct AnalyticsFactory {
    clients: client::Factory,
    sinks: Arc<Mutex<HashMap<AnalyticsOptions, Weak<Sink>>>>,
}

impl AnalyticsFactory {
    /// A factory; `clients` builds the collector's client.
    pub fn new(clients: client::Factory) -> Self {
        Self {
            clients,
            sinks: Arc::default(),
        }
    }

    /// The counts of every live sink (queue bound, high-water mark, drops, shipped).
    pub fn snapshots(&self) -> Vec<SinkSnapshot> {
        let Ok(sinks) = self.sinks.lock() else {
            return Vec::new();
        };
        sinks
            .values()
            .filter_map(Weak::upgrade)
            .map(|sink| sink.snapshot())
            .collect()
    }

    /// The sink for `options`: the live one with the same options, or a new one.
    fn sink(&self, options: &AnalyticsOptions, name: &str) -> Result<Arc<Sink>, BuildError> {
        let mut sinks = self
            .sinks
            .lock()
            .map_err(|_| BuildError::new(name, "analytics sinks poisoned"))?;
        if let Some(sink) = sinks.get(options).and_then(Weak::upgrade) {
            return Ok(sink);
        }
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| BuildError::new(name, "needs a tokio runtime to ship records"))?;
        let destination = if options.url.is_empty() {
            Destination::File(options.file.clone().into())
        } else {
            let url: Uri = options
                .url
                .parse()
                .map_err(|err| option_error(name, "url", err))?;
            let (Some(scheme), Some(authority)) = (url.scheme_str(), url.authority()) else {
                return Err(option_error(
                    name,
                    "url",
                    "must be an absolute http(s):// URL",
                ));
            };
            if scheme != "http" && scheme != "https" {
                return Err(option_error(
                    name,
                    "url",
                    format!("unsupported scheme {scheme:?} (http or https)"),
                ));
            }
            let backends = [configs::Backend {
                target: format!("{scheme}://{authority}"),
                ..Default::default()
            }];
            let spec = client::ClientSpec {
                name: "analytics collector",
                protocol: configs::Protocol::Http,
                selector: "",
                backends: &backends,
                tls_store: &Default::default(),
            };
            let client = self
                .clients
                .build(&spec)
                .map_err(|err| option_error(name, "url", err))?;
            Destination::Collector {
                client,
                url,
                timeout: options.timeout,
            }
        };
        let sink = Arc::new(Sink::start(
            destination,
            options.batch_size,
            options.flush_interval,
            options.queue_size,
            &runtime,
        ));
        sinks.retain(|_, sink| sink.strong_count() > 0);
        sinks.insert(options.clone(), Arc::downgrade(&sink));
        Ok(sink)
    }
}

impl Factory for AnalyticsFactory {
    fn build(
        &self,
        config: &configs::Middleware,
        ctx: &BuildContext,
    ) -> Result<Middleware, BuildError> {
        let options: AnalyticsOptions = decode(config)?;
        let name = &config.name;
        match (options.url.is_empty(), options.file.is_empty()) {
            (true, true) => return Err(option_error(name, "url", "set url or file")),
            (false, false) => {
                return Err(option_error(name, "file", "set url or file, not both"));
            }
            _ => {}
        }
        if options.batch_size == 0 {
            return Err(option_error(name, "batchSize", "must be at least 1"));
        }
        if options.queue_size == 0 {
            return Err(option_error(name, "queueSize", "must be at least 1"));
        }
        if options.flush_interval.is_zero() {
            return Err(option_error(name, "flushInterval", "must be positive"));
        }
        if options.timeout.is_zero() {
            return Err(option_error(name, "timeout", "must be positive"));
        }
        let sink = self.sink(&options, name)?;
        let layer = AnalyticsLayer {
            shared: Arc::new(Shared {
                sink,
                endpoint: ctx.endpoint.clone(),
                dropped: Denied::new(ctx.denial_counter(NAME, "record_dropped")),
            }),
        };
        Ok(Middleware::from_layer(name, layer))
    }
}

struct Shared {
    sink: Arc<Sink>,
    /// The endpoint the middleware was built for (used when a request has no options).
    endpoint: Arc<EndpointInfo>,
    dropped: Denied,
}

/// The tower layer of `analytics`.
#[derive(Clone)]
pub struct AnalyticsLayer {
    shared: Arc<Shared>,
}

impl<S> Layer<S> for AnalyticsLayer {
    type Service = Analytics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Analytics {
            shared: self.shared.clone(),
            inner,
        }
    }
}

/// The `analytics` service: passes every request on and records it at the end.
#[derive(Clone)]
pub struct Analytics<S> {
    shared: Arc<Shared>,
    inner: S,
}

impl<S> Service<Request<Body>> for Analytics<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = BoxError>,
{
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let options = request.extensions().get::<RequestOptions>();
        let rx_bytes = Arc::new(AtomicU64::new(0));
        let pending = Pending {
            shared: self.shared.clone(),
            time: SystemTime::now(),
            start: Instant::now(),
            endpoint: options.map_or_else(|| self.shared.endpoint.clone(), |o| o.endpoint.clone()),
            method: request.method().clone(),
            path: request.uri().path().to_owned(),
            options: options.map(|o| Slots {
                backend: o.backend.clone(),
                scope: o.scope.clone(),
                peer: o.client_addr,
            }),
            rx_bytes: rx_bytes.clone(),
        };
        // An empty body has nothing to count; others are counted as the upstream reads them.
        let request = if request.body().is_end_stream() {
            request
        } else {
            request.map(|body| observe(body, CountRx(rx_bytes)))
        };
        ResponseFuture {
            future: self.inner.call(request),
            pending: Some(pending),
        }
    }
}

/// What the record needs from the request, kept until the response ends.
struct Pending {
    shared: Arc<Shared>,
    time: SystemTime,
    start: Instant,
    endpoint: Arc<EndpointInfo>,
    method: Method,
    path: String,
    options: Option<Slots>,
    rx_bytes: Arc<AtomicU64>,
}

/// The request options' slots that are filled after the request passed: the node the
/// client picked and the client id an `auth` recorded.
struct Slots {
    backend: Arc<BackendSlot>,
    scope: Arc<middleware::RequestScope>,
    peer: Option<SocketAddr>,
}

impl Pending {
    fn finish(self, status: u16, tx_bytes: u64) {
        let (node, client) = match &self.options {
            Some(slots) => (
                slots.backend.get(),
                match (slots.scope.client_id.get(), slots.peer) {
                    (Some(id), _) => Client::Id(id.clone()),
                    (None, Some(peer)) => Client::Ip(peer.ip()),
                    (None, None) => Client::Unknown,
                },
            ),
            None => (None, Client::Unknown),
        };
        let record = Record {
            time: self.time,
            endpoint: self.endpoint,
            method: self.method,
            path: self.path,
            node,
            status,
            latency: self.start.elapsed(),
            rx_bytes: self.rx_bytes.load(Ordering::Relaxed),
            tx_bytes,
            client,
            dropped: self.shared.dropped.clone(),
        };
        self.shared.sink.push(record);
    }
}

/// Counts request body bytes as the upstream reads them.
struct CountRx(Arc<AtomicU64>);

impl BodyObserver for CountRx {
    fn data(&mut self, chunk: &Bytes) {
        self.0.fetch_add(chunk.len() as u64, Ordering::Relaxed);
    }

    fn end(self, _end: BodyEnd) {}
}

/// Counts response body bytes and writes the record when the body ends.
struct Finish {
    pending: Pending,
    status: u16,
    tx_bytes: u64,
}

impl BodyObserver for Finish {
    fn data(&mut self, chunk: &Bytes) {
        self.tx_bytes += chunk.len() as u64;
    }

    fn end(self, _end: BodyEnd) {
        self.pending.finish(self.status, self.tx_bytes);
    }
}

pin_project_lite::pin_project! {
    /// Response future of [`Analytics`]: the inner call; its response's body is watched
    /// to write the record at its end. Dropped before the answer (client gone, timeout),
    /// it records status 499.
    pub struct ResponseFuture<F> {
        #[pin]
        future: F,
        pending: Option<Pending>,
    }

    impl<F> PinnedDrop for ResponseFuture<F> {
        fn drop(this: Pin<&mut Self>) {
            if let Some(pending) = this.project().pending.take() {
                pending.finish(499, 0);
            }
        }
    }
}

impl<F> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<Body>, BoxError>>,
{
    type Output = Result<Response<Body>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.future.poll(cx));
        let Some(pending) = this.pending.take() else {
            return Poll::Ready(result);
        };
        Poll::Ready(match result {
            Ok(response) => {
                let status = response.status().as_u16();
                Ok(response.map(|body| {
                    observe(
                        body,
                        Finish {
                            pending,
                            status,
                            tx_bytes: 0,
                        },
                    )
                }))
            }
            Err(error) => {
                pending.finish(502, 0);
                Err(error)
            }
        })
    }
}

#[cfg(test)]
mod tests;

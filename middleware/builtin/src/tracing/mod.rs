//! `tracing`: OpenTelemetry spans for every request, W3C trace context to the upstream, and
//! export over OTLP/HTTP protobuf (Kratos' `tracing` middleware and options).
//!
//! Per request, a **server** span (`SpanKind::Server`) continues the trace of an incoming
//! `traceparent`/`tracestate`, or starts a new trace. Per attempt (the middleware chain
//! runs once per attempt, retries included), a **client** span, child of the server span,
//! is sent upstream as `traceparent` (the same trace id, the client span as parent) and
//! `tracestate`. Attributes: `http.request.method`, `url.path`, `http.route` (the
//! endpoint's path pattern) and `http.response.status_code` on both; `client.address` on
//! the server span; `gateway.attempt`, `gateway.node` (the upstream address),
//! `server.address`/`server.port` and, on a retry, `http.request.resend_count` on the
//! client span. A transport error or an error status (client span: 4xx and 5xx; server
//! span: 5xx) sets the span's status to error.
//!
//! The server span ends when the proxy has the response head (the request's final status,
//! 499 when the client went away first); a client span when its attempt has the response
//! head or failed (or was cut by a timeout). The per-request state lives in the request's
//! [`RequestScope`](middleware::RequestScope).
//!
//! Sampling is parent-based: an incoming trace keeps its sampled flag; a new trace is
//! sampled at `sampleRatio`. Unsampled spans are not exported, but their context is still
//! propagated (flag `00`). Exporting is batched and never blocks a request; see
//! [`collector`] for the queue bound and what happens when the collector is down.

mod collector;
#[cfg(test)]
mod tests;

use std::borrow::Cow;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll, ready};
use std::time::Duration;

use http::{Request, Response, Uri};
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{SpanBuilder, SpanKind, Status, TraceContextExt, Tracer as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_http::{HeaderExtractor, HeaderInjector};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use serde::Deserialize;
use tower::{Layer, Service};

use middleware::{
    BackendSlot, Body, BoxError, BuildContext, BuildError, Middleware, RequestOptions,
};

pub use collector::{MAX_QUEUE_SIZE, force_flush, shutdown};

use crate::support::{decode, lenient_f64, opt_duration, option_error};
use collector::{Collector, SampleRatio};

/// Kratos' default timeout of one export request.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Where spans go when neither `httpEndpoint` nor `httpEndpointUrl` is set (the
/// OpenTelemetry collector's default OTLP/HTTP port on this host).
pub const DEFAULT_ENDPOINT_URL: &str = "http://localhost:4318/v1/traces";

/// Options of the `tracing` middleware (Kratos' `gateway.middleware.tracing.v1.Tracing`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct TracingOptions {
    /// `host:port` of an OTLP/HTTP collector; spans go to `http://host:port/v1/traces`
    /// (`https://` when `insecure: false` is written out). Default: unset, see
    /// `httpEndpointUrl`. Set one of the two, not both.
    #[serde(alias = "http_endpoint")]
    pub http_endpoint: Option<String>,
    /// The full URL spans are posted to, e.g. `https://otel.example.com/v1/traces`.
    /// Default: `http://localhost:4318/v1/traces` when `httpEndpoint` is unset too.
    #[serde(alias = "http_endpoint_url")]
    pub http_endpoint_url: Option<String>,
    /// Share of new traces recorded and exported, 0 to 1 (by trace id). Default: 1 (all).
    /// A request carrying `traceparent` follows its sampled flag instead.
    #[serde(alias = "sample_ratio", deserialize_with = "opt_lenient_f64")]
    pub sample_ratio: Option<f64>,
    /// Timeout of one export request to the collector (Go duration). Default: `10s`.
    #[serde(deserialize_with = "opt_duration")]
    pub timeout: Option<Duration>,
    /// `true`: plain HTTP even for an `https://` URL (as Kratos' `WithInsecure`); `false`
    /// with `httpEndpoint`: HTTPS. Default: unset (`httpEndpoint` is plain HTTP, a URL
    /// keeps its scheme).
    pub insecure: Option<bool>,
}

fn opt_lenient_f64<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<f64>, D::Error> {
    lenient_f64(deserializer).map(Some)
}

impl TracingOptions {
    /// The URL spans are posted to.
    fn collector_url(&self, name: &str) -> Result<String, BuildError> {
        let url = match (&self.http_endpoint, &self.http_endpoint_url) {
            (Some(_), Some(_)) => {
                return Err(option_error(
                    name,
                    "httpEndpoint",
                    "set either httpEndpoint or httpEndpointUrl, not both",
                ));
            }
            (Some(host_port), None) => {
                let authority = host_port
                    .parse::<http::uri::Authority>()
                    .ok()
                    .filter(|authority| authority.port_u16().is_some())
                    .ok_or_else(|| {
                        option_error(
                            name,
                            "httpEndpoint",
                            format!("`{host_port}` is not host:port"),
                        )
                    })?;
                let scheme = if self.insecure == Some(false) {
                    "https"
                } else {
                    "http"
                };
                return Ok(format!("{scheme}://{authority}/v1/traces"));
            }
            (None, Some(url)) => url.clone(),
            (None, None) => DEFAULT_ENDPOINT_URL.to_owned(),
        };
        let uri = url
            .parse::<Uri>()
            .ok()
            .filter(|uri| {
                matches!(uri.scheme_str(), Some("http" | "https")) && uri.authority().is_some()
            })
            .ok_or_else(|| {
                option_error(
                    name,
                    "httpEndpointUrl",
                    format!("`{url}` is not an http:// or https:// URL"),
                )
            })?;
        if self.insecure == Some(true) && uri.scheme_str() == Some("https") {
            return Ok(format!("http{}", &url["https".len()..]));
        }
        Ok(url)
    }
}

/// Builds the middleware from its config entry.
pub fn factory(config: &configs::Middleware, ctx: &BuildContext) -> Result<Middleware, BuildError> {
    let options: TracingOptions = decode(config)?;
    let url = options.collector_url(&config.name)?;
    let ratio = options.sample_ratio.unwrap_or(1.0);
    if !(0.0..=1.0).contains(&ratio) {
        return Err(option_error(
            &config.name,
            "sampleRatio",
            format!("{ratio} is not between 0 and 1"),
        ));
    }
    let timeout = options
        .timeout
        .filter(|t| !t.is_zero())
        .unwrap_or(DEFAULT_TIMEOUT);
    let collector = Collector::shared(&url, timeout)
        .map_err(|err| BuildError::new(&config.name, format!("collector {url}: {err}")))?;
    let layer = TracingLayer::new(collector, &ctx.endpoint.path, ratio);
    Ok(Middleware::from_layer(config.name.clone(), layer))
}

/// What every span of one endpoint shares.
struct Shared {
    collector: Arc<Collector>,
    /// `http.route`: the endpoint's path pattern.
    route: String,
    /// Set on the parent context of server spans, for the sampler.
    ratio: SampleRatio,
    propagator: TraceContextPropagator,
}

/// The layer: wraps the next RoundTripper in [`Tracing`].
#[derive(Clone)]
pub struct TracingLayer {
    shared: Arc<Shared>,
}

impl TracingLayer {
    fn new(collector: Arc<Collector>, route: &str, ratio: f64) -> Self {
        Self {
            shared: Arc::new(Shared {
                collector,
                route: route.to_owned(),
                ratio: SampleRatio(ratio),
                propagator: TraceContextPropagator::new(),
            }),
        }
    }
}

impl<S> Layer<S> for TracingLayer {
    type Service = Tracing<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Tracing {
            shared: self.shared.clone(),
            inner,
        }
    }
}

/// The service: spans around each attempt, trace context into the upstream request.
#[derive(Clone)]
pub struct Tracing<S> {
    shared: Arc<Shared>,
    inner: S,
}

/// The server span of one request, kept in its [`RequestScope`](middleware::RequestScope).
#[derive(Clone)]
struct ServerSpan(Context);

impl<S> Service<Request<Body>> for Tracing<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = BoxError>,
{
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<Body>) -> Self::Future {
        let shared = &self.shared;
        let options = request.extensions().get::<RequestOptions>();
        let attempt = options.map_or(1, |options| options.attempt);
        let backend = options.map(|options| options.backend.clone());
        // Without the proxy's options (a bare chain), the call is the whole request.
        let mut own_server = None;
        let server = match options {
            Some(options) => {
                let scope = options.scope.clone();
                let client_addr = options.client_addr;
                let mut started = false;
                let ServerSpan(server) = scope.get_or_insert_with(|| {
                    started = true;
                    ServerSpan(shared.start_server(&request, client_addr))
                });
                if started {
                    let collector = shared.collector.clone();
                    let span = server.clone();
                    scope.on_finish(move |status| {
                        end_server(&span, status);
                        drop(collector);
                    });
                }
                server
            }
            None => {
                let server = shared.start_server(&request, None);
                own_server = Some(server.clone());
                server
            }
        };
        // An unsampled trace records nothing: its spans only carry the context upstream.
        let sampled = server.span().span_context().is_sampled();
        let mut attributes = Vec::new();
        if sampled {
            attributes.extend([
                KeyValue::new("http.request.method", request.method().as_str().to_owned()),
                KeyValue::new("url.path", request.uri().path().to_owned()),
                KeyValue::new("http.route", shared.route.clone()),
                KeyValue::new("gateway.attempt", i64::from(attempt)),
            ]);
        }
        if sampled && attempt > 1 {
            attributes.push(KeyValue::new(
                "http.request.resend_count",
                i64::from(attempt - 1),
            ));
        }
        let builder = SpanBuilder::from_name(span_name(&request, &shared.route))
            .with_kind(SpanKind::Client)
            .with_attributes(attributes);
        let span = shared
            .collector
            .tracer()
            .build_with_context(builder, &server);
        let client = server.with_span(span);
        shared
            .propagator
            .inject_context(&client, &mut HeaderInjector(request.headers_mut()));
        ResponseFuture {
            inner: self.inner.call(request),
            span: Some(AttemptSpan {
                client,
                own_server,
                backend,
                _collector: shared.collector.clone(),
            }),
        }
    }
}

impl Shared {
    /// Starts the server span of a request: a child of its `traceparent`, or a new trace.
    fn start_server(
        &self,
        request: &Request<Body>,
        client_addr: Option<std::net::SocketAddr>,
    ) -> Context {
        let parent = self
            .propagator
            .extract(&HeaderExtractor(request.headers()))
            .with_value(self.ratio);
        let mut attributes = vec![
            KeyValue::new("http.request.method", request.method().as_str().to_owned()),
            KeyValue::new("url.path", request.uri().path().to_owned()),
            KeyValue::new("http.route", self.route.clone()),
        ];
        if let Some(addr) = client_addr {
            attributes.push(KeyValue::new("client.address", addr.ip().to_string()));
        }
        let builder = SpanBuilder::from_name(span_name(request, &self.route))
            .with_kind(SpanKind::Server)
            .with_attributes(attributes);
        let span = self.collector.tracer().build_with_context(builder, &parent);
        parent.with_span(span)
    }
}

/// `{method} {route}`, as the HTTP semantic conventions name spans (bounded cardinality).
fn span_name(request: &Request<Body>, route: &str) -> Cow<'static, str> {
    Cow::Owned(format!("{} {route}", request.method()))
}

/// Ends a server span with the status the client got.
fn end_server(server: &Context, status: u16) {
    let span = server.span();
    span.set_attribute(KeyValue::new(
        "http.response.status_code",
        i64::from(status),
    ));
    if status >= 500 {
        span.set_status(Status::error(format!("status {status}")));
    }
    span.end();
}

/// The client span of one attempt, ended when the attempt's future completes or is dropped.
struct AttemptSpan {
    client: Context,
    /// The server span, when this call is the whole request (no proxy options).
    own_server: Option<Context>,
    backend: Option<Arc<BackendSlot>>,
    /// Keeps the collector (and its export thread) until the span has ended.
    _collector: Arc<Collector>,
}

impl AttemptSpan {
    fn end(self, outcome: Result<u16, &str>) {
        let span = self.client.span();
        if let Some(node) = self.backend.as_ref().and_then(|slot| slot.get()) {
            span.set_attribute(KeyValue::new("gateway.node", node.address.clone()));
            if let Some((host, port)) = node.address.rsplit_once(':')
                && let Ok(port) = port.parse::<u16>()
            {
                let host = host.trim_start_matches('[').trim_end_matches(']');
                span.set_attribute(KeyValue::new("server.address", host.to_owned()));
                span.set_attribute(KeyValue::new("server.port", i64::from(port)));
            }
        }
        match outcome {
            Ok(status) => {
                span.set_attribute(KeyValue::new(
                    "http.response.status_code",
                    i64::from(status),
                ));
                if status >= 400 {
                    span.set_status(Status::error(format!("status {status}")));
                }
            }
            Err(error) => span.set_status(Status::error(error.to_owned())),
        }
        span.end();
        if let Some(server) = &self.own_server {
            match outcome {
                Ok(status) => end_server(server, status),
                Err(error) => {
                    let span = server.span();
                    span.set_status(Status::error(error.to_owned()));
                    span.end();
                }
            }
        }
    }
}

pin_project_lite::pin_project! {
    /// Response future of [`Tracing`]: the next service's call, then the end of the
    /// attempt's span. Dropped early (a timeout), it ends the span as cancelled.
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        span: Option<AttemptSpan>,
    }

    impl<F> PinnedDrop for ResponseFuture<F> {
        fn drop(this: Pin<&mut Self>) {
            if let Some(span) = this.project().span.take() {
                span.end(Err("cancelled"));
            }
        }
    }
}

impl<F> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<Body>, BoxError>>,
{
    type Output = Result<Response<Body>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx));
        if let Some(span) = this.span.take() {
            match &result {
                Ok(response) => span.end(Ok(response.status().as_u16())),
                Err(error) => span.end(Err(&error.to_string())),
            }
        }
        Poll::Ready(result)
    }
}

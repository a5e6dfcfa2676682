//! The per-endpoint handler: timeouts, the retry loop, header rules, metrics, access log.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri, Version};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;
use middleware::{Body, BoxError, EndpointInfo, Middleware, RequestOptions, RoundTripper};
use tower::Service;
use tower::util::BoxCloneSyncService;

use crate::error::ProxyError;
use crate::headers::{
    HopByHop, MAY_UPGRADE, append_forwarded_for, asks_upgrade, hop_by_hop_present,
    strip_hop_by_hop, strip_keeping_upgrade, strip_present,
};
use crate::metrics::{EndpointMetrics, Metrics};
use crate::render::{Dialect, error_response, rendered};
use crate::retry::{RetryPolicy, RetrySwitch};
use crate::server::upgrade::Downstream;
use crate::tunnel::Tunnels;

/// Request bodies up to this size are buffered so a retry can replay them; larger or
/// unsized bodies stream through and are not retried.
pub(crate) const MAX_REPLAY_BODY: u64 = 64 * 1024;

/// The endpoint timeout of an endpoint without `timeout` (or with `timeout: 0s`), as in
/// Kratos: no request waits for an upstream's answer unbounded.
pub const DEFAULT_ENDPOINT_TIMEOUT: Duration = Duration::from_secs(1);

/// What the handler needs of an endpoint's config: its deadline and retry rules.
#[derive(Debug, Clone, Copy, Default)]
pub struct EndpointSpec<'a> {
    /// Deadline of the whole request until the response head, retries included (`None` or
    /// zero: [`DEFAULT_ENDPOINT_TIMEOUT`]). A response body already streaming is not cut.
    pub timeout: Option<Duration>,
    /// Retry rules (`None`: one attempt).
    pub retry: Option<&'a configs::Retry>,
}

/// Serves the requests of one endpoint.
pub struct EndpointHandler {
    info: Arc<EndpointInfo>,
    /// The middleware chain; None when the endpoint has no middleware, so attempts call the
    /// client directly (no boxing, no request extension).
    tripper: Option<Chain>,
    client: client::Client,
    middlewares: Vec<Middleware>,
    timeout: Duration,
    retry: RetryPolicy,
    metrics: EndpointMetrics,
    in_flight: prometheus::IntGauge,
    /// A middleware writes an access line per attempt; the handler's own per-request line
    /// would repeat it, so it is left out then.
    middleware_access_log: bool,
    /// A middleware answers CORS preflights for this endpoint.
    answers_preflight: bool,
    dialect: Dialect,
    tunnels: Tunnels,
    retries: RetrySwitch,
}

struct Head {
    method: Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
}

impl Head {
    /// The request of one attempt; `last` moves the URI out instead of copying it.
    fn request(&mut self, body: Body, headers: HeaderMap, last: bool) -> Request<Body> {
        let mut request = Request::new(body);
        *request.method_mut() = self.method.clone();
        *request.uri_mut() = if last {
            std::mem::take(&mut self.uri)
        } else {
            self.uri.clone()
        };
        *request.version_mut() = self.version;
        *request.headers_mut() = headers;
        request
    }
}

impl EndpointHandler {
    /// Wraps `client` in `middlewares` (first = outermost).
    pub fn new(
        info: Arc<EndpointInfo>,
        spec: EndpointSpec<'_>,
        client: client::Client,
        middlewares: Vec<Middleware>,
        metrics: &Metrics,
    ) -> Self {
        let declared = |has: fn(&Middleware) -> bool| middlewares.iter().any(has);
        let middleware_access_log = declared(|m| m.capabilities().access_log);
        let answers_preflight = declared(|m| m.capabilities().answers_preflight);
        let tripper = (!middlewares.is_empty()).then(|| {
            let mut tripper: RoundTripper = BoxCloneSyncService::new(client.clone());
            for middleware in middlewares.iter().rev() {
                tripper = middleware.wrap(tripper);
            }
            Chain::new(tripper)
        });
        Self {
            middleware_access_log,
            answers_preflight,
            dialect: info.protocol.into(),
            metrics: metrics.endpoint(&info),
            in_flight: metrics.in_flight.clone(),
            info,
            tripper,
            client,
            middlewares,
            timeout: effective_timeout(spec.timeout),
            retry: RetryPolicy::new(spec.retry),
            tunnels: Tunnels::default(),
            retries: RetrySwitch::default(),
        }
    }

    /// Opens this endpoint's upgrade tunnels among `tunnels` (the proxy's, so they share
    /// its idle timeout and close with it).
    pub(crate) fn with_tunnels(mut self, tunnels: Tunnels) -> Self {
        self.tunnels = tunnels;
        self
    }

    /// Retries only while `switch` is on (the proxy's, set by the `gw:Retry` feature flag).
    pub(crate) fn with_retry_switch(mut self, switch: RetrySwitch) -> Self {
        self.retries = switch;
        self
    }

    /// Whether a middleware of this endpoint answers CORS preflights.
    pub fn answers_preflight(&self) -> bool {
        self.answers_preflight
    }

    /// The endpoint's facts.
    pub fn info(&self) -> &Arc<EndpointInfo> {
        &self.info
    }

    /// The endpoint's client.
    pub fn client(&self) -> &client::Client {
        &self.client
    }

    /// Closes the client and middlewares (after the router drained).
    pub fn close(&self) {
        self.client.close();
        for middleware in &self.middlewares {
            middleware.close();
        }
    }

    /// Proxies one request; every failure becomes a response.
    pub async fn serve(&self, req: Request<Body>, remote: SocketAddr) -> Response<Body> {
        // Found once here, reused when the headers are stripped: the upgrade check costs a
        // request without both `Connection` and `Upgrade` one comparison.
        let present = hop_by_hop_present(req.headers());
        if present & MAY_UPGRADE == MAY_UPGRADE
            && req.version() == Version::HTTP_11
            && self.dialect == Dialect::Http
            && asks_upgrade(req.headers(), present)
        {
            // Boxed so the ordinary request's future does not carry the upgrade's state.
            return Box::pin(self.serve_upgrade(req, remote, present)).await;
        }
        self.in_flight.inc();
        let _in_flight = GaugeGuard(&self.in_flight);
        if self.retry.attempts > 1 {
            self.retry.budget().deposit();
        }
        let (parts, body) = req.into_parts();
        let mut record = Record {
            handler: self,
            start: Instant::now(),
            method: parts.method.clone(),
            uri: (!self.middleware_access_log
                && tracing::enabled!(target: "access", tracing::Level::INFO))
            .then(|| parts.uri.clone()),
            options: RequestOptions::new(self.info.clone(), Some(remote))
                .with_client_certificate(&parts.extensions),
            finished: false,
        };
        let mut head = Head {
            method: parts.method,
            uri: parts.uri,
            version: parts.version,
            headers: parts.headers,
        };
        let grpc = self.info.protocol == configs::Protocol::Grpc;
        strip_present(&mut head.headers, present, grpc);
        append_forwarded_for(&mut head.headers, remote.ip());
        if let Some(length) = body.size_hint().exact() {
            self.metrics.of(&head.method).rx_bytes.inc_by(length);
        }
        // Pinned where it is built: the retry loop's state is large, and moving it into the
        // timeout would copy it on every request.
        let outcome = {
            let attempts = std::pin::pin!(self.attempts(&mut head, body, &mut record.options));
            tokio::time::timeout(self.timeout, attempts)
                .await
                .unwrap_or(Err(ProxyError::Timeout))
        };
        let response = match outcome {
            Ok(mut response) => {
                strip_hop_by_hop(response.headers_mut(), false);
                // Only a middleware can refuse; without a chain there is nothing to render.
                if self.tripper.is_some() {
                    rendered(response, self.dialect)
                } else {
                    response
                }
            }
            Err(err) => {
                let backend = record.options.backend.get();
                let backend = backend.as_ref().map_or("", |node| node.address.as_str());
                tracing::warn!(endpoint = %self.info.path, backend, side = ?err.side(), error = %err, "request failed");
                error_response(&err, self.dialect)
            }
        };
        record.finish(response.status().as_u16());
        self.count_tx(response, &record.method)
    }

    /// Counts the response body into `tx_bytes`: a body of known length at once; only
    /// streams of unknown length are wrapped to count as they flow.
    fn count_tx(&self, response: Response<Body>, method: &Method) -> Response<Body> {
        let tx = &self.metrics.of(method).tx_bytes;
        if let Some(length) = response.body().size_hint().exact() {
            tx.inc_by(length);
            return response;
        }
        let tx = tx.clone();
        response.map(|body| {
            CountingBody {
                inner: body,
                counter: tx,
                count: 0,
            }
            .boxed_unsync()
        })
    }

    /// Proxies an HTTP/1.1 upgrade request (WebSocket or any other protocol): one attempt
    /// through the middleware chain (a refusal never reaches the upstream), no retry, no
    /// body replay, bounded by the endpoint's `timeout` and `perTryTimeout` until the
    /// answer's head. A `101` answer opens a tunnel between the two connections; any other
    /// answer is passed back as an ordinary response.
    async fn serve_upgrade(
        &self,
        mut req: Request<Body>,
        remote: SocketAddr,
        present: HopByHop,
    ) -> Response<Body> {
        // Taken before the request is taken apart: it resolves to the client's connection
        // once the 101 has been written.
        let downstream = Downstream::take(&mut req);
        self.in_flight.inc();
        let _in_flight = GaugeGuard(&self.in_flight);
        let (parts, body) = req.into_parts();
        let mut record = Record {
            handler: self,
            start: Instant::now(),
            method: parts.method.clone(),
            uri: (!self.middleware_access_log
                && tracing::enabled!(target: "access", tracing::Level::INFO))
            .then(|| parts.uri.clone()),
            options: RequestOptions::new(self.info.clone(), Some(remote))
                .with_client_certificate(&parts.extensions),
            finished: false,
        };
        let mut headers = parts.headers;
        strip_keeping_upgrade(&mut headers, present);
        append_forwarded_for(&mut headers, remote.ip());
        if let Some(length) = body.size_hint().exact() {
            self.metrics.of(&record.method).rx_bytes.inc_by(length);
        }
        let mut request = Request::new(body);
        *request.method_mut() = parts.method;
        *request.uri_mut() = parts.uri;
        *request.version_mut() = parts.version;
        *request.headers_mut() = headers;
        let attempt = async {
            match &self.tripper {
                Some(tripper) => {
                    request.extensions_mut().insert(record.options.clone());
                    let call = std::pin::pin!(tripper.round_trip(request));
                    within(self.retry.per_try_timeout, call)
                        .await
                        .and_then(|result| result.map_err(ProxyError::from_round_trip))
                }
                None => {
                    let send = std::pin::pin!(self.client.send(request, &record.options));
                    within(self.retry.per_try_timeout, send)
                        .await
                        .and_then(|result| result.map_err(ProxyError::from_client))
                }
            }
        };
        let outcome = tokio::time::timeout(self.timeout, attempt)
            .await
            .unwrap_or(Err(ProxyError::Timeout));
        let outcome = outcome.and_then(|mut response| {
            if response.status() != StatusCode::SWITCHING_PROTOCOLS {
                strip_hop_by_hop(response.headers_mut(), false);
                return Ok(if self.tripper.is_some() {
                    rendered(response, self.dialect)
                } else {
                    response
                });
            }
            // A 101 whose connection cannot be taken over (a middleware rebuilt the
            // response) would leave the client waiting on a dead tunnel.
            let upstream = response
                .extensions_mut()
                .remove::<hyper::upgrade::OnUpgrade>()
                .ok_or_else(|| {
                    ProxyError::Upstream("101 without an upgradable connection".into())
                })?;
            let present = hop_by_hop_present(response.headers());
            strip_keeping_upgrade(response.headers_mut(), present);
            self.tunnels.open(
                downstream,
                upstream,
                self.metrics.of(&record.method).tunnel().clone(),
                self.info.clone(),
            );
            Ok(response)
        });
        let response = match outcome {
            Ok(response) => response,
            Err(err) => {
                let backend = record.options.backend.get();
                let backend = backend.as_ref().map_or("", |node| node.address.as_str());
                tracing::warn!(endpoint = %self.info.path, backend, side = ?err.side(), error = %err, "upgrade request failed");
                error_response(&err, self.dialect)
            }
        };
        record.finish(response.status().as_u16());
        self.count_tx(response, &record.method)
    }

    async fn attempts(
        &self,
        head: &mut Head,
        body: Body,
        options: &mut RequestOptions,
    ) -> Result<Response<Body>, ProxyError> {
        let mut attempts = self.retry.attempts;
        // An HTTP/1 body of unknown length is chunked: its framing is only checked as it is
        // read. Its first chunk is read before a node is picked, so a malformed one is
        // answered 400 and the upstream sees nothing of the request (a later one cuts the
        // upstream request off mid-body, see `ProxyError::from_client`).
        let body = if head.version <= Version::HTTP_11
            && !body.is_end_stream()
            && body.size_hint().exact().is_none()
        {
            first_frame_read(body).await?
        } else {
            body
        };
        if attempts > 1 && !self.retries.enabled() {
            attempts = 1;
        }
        let mut streaming = Some(body);
        let mut replay: Option<Bytes> = None;
        if attempts > 1 {
            let replayable = streaming.as_ref().is_some_and(|b| {
                b.is_end_stream() || b.size_hint().upper().is_some_and(|n| n <= MAX_REPLAY_BODY)
            });
            if replayable {
                let body = streaming.take().map(|b| b.collect());
                if let Some(collect) = body {
                    replay = Some(
                        collect
                            .await
                            .map_err(ProxyError::from_request_body)?
                            .to_bytes(),
                    );
                }
            } else {
                attempts = 1;
            }
        }
        let mut attempt = 0;
        loop {
            attempt += 1;
            options.attempt = attempt;
            let body = match (&replay, streaming.take()) {
                (Some(bytes), _) => middleware::full_body(bytes.clone()),
                (None, Some(body)) => body,
                (None, None) => middleware::empty_body(),
            };
            // The last possible attempt takes the headers instead of copying them.
            let headers = if attempt < attempts {
                head.headers.clone()
            } else {
                std::mem::take(&mut head.headers)
            };
            let mut request = head.request(body, headers, attempt >= attempts);
            let result = match &self.tripper {
                // Pinned where they are built, as the retry loop is: `within` and its
                // timeout then move a pointer, not the attempt's whole state. The same two
                // arms stand in `serve_upgrade`: one async fn for both cost 0.28k
                // instructions a request (its future built, then moved; callgrind).
                Some(tripper) => {
                    request.extensions_mut().insert(options.clone());
                    let call = std::pin::pin!(tripper.round_trip(request));
                    within(self.retry.per_try_timeout, call)
                        .await
                        .and_then(|result| result.map_err(ProxyError::from_round_trip))
                }
                None => {
                    let send = std::pin::pin!(self.client.send(request, options));
                    within(self.retry.per_try_timeout, send)
                        .await
                        .and_then(|result| result.map_err(ProxyError::from_client))
                }
            };
            let last = attempt >= attempts;
            if !last
                && let Some(node) = options.backend.get()
                && !options.tried.contains(&node.address)
            {
                options.tried.push(node.address.clone());
            }
            match result {
                Ok(response) => {
                    if last
                        || !self.retry.should_retry(&response)
                        || !self.retry.budget().withdraw()
                    {
                        return Ok(response);
                    }
                    tracing::debug!(endpoint = %self.info.path, status = response.status().as_u16(), attempt, "retrying on response");
                }
                Err(err) => {
                    if last || !err.is_retryable() || !self.retry.budget().withdraw() {
                        return Err(err);
                    }
                    tracing::debug!(endpoint = %self.info.path, error = %err, attempt, "retrying on error");
                }
            }
        }
    }
}

/// The endpoint timeout in force for a configured `timeout`: unset or zero is the default.
pub fn effective_timeout(configured: Option<Duration>) -> Duration {
    configured
        .filter(|timeout| !timeout.is_zero())
        .unwrap_or(DEFAULT_ENDPOINT_TIMEOUT)
}

impl Drop for EndpointHandler {
    fn drop(&mut self) {
        // Closing twice is harmless; a handler dropped without its router's close still
        // releases its watcher subscriptions.
        self.client.close();
    }
}

/// Runs `future` under the per-try timeout, if there is one.
async fn within<F: std::future::Future>(
    limit: Option<Duration>,
    future: F,
) -> Result<F::Output, ProxyError> {
    match limit {
        Some(limit) => tokio::time::timeout(limit, future)
            .await
            .map_err(|_| ProxyError::Timeout),
        None => Ok(future.await),
    }
}

/// `body` with its first frame already read (it is replayed first): a framing error in it
/// surfaces here, before anything is sent upstream.
async fn first_frame_read(mut body: Body) -> Result<Body, ProxyError> {
    match body.frame().await {
        None => Ok(middleware::empty_body()),
        Some(Ok(first)) => {
            let first = futures_util::stream::once(std::future::ready(Ok(first)));
            let rest = http_body_util::BodyStream::new(body);
            Ok(http_body_util::StreamBody::new(first.chain(rest)).boxed_unsync())
        }
        Some(Err(err)) => Err(ProxyError::from_request_body(err)),
    }
}

/// An endpoint's middleware chain and the spare copies of it that requests gave back.
///
/// tower's `call` takes `&mut self`, so every request needs a copy of its own. A copy of
/// the boxed chain allocates one box per middleware and frees them afterwards: about 1k
/// instructions of a request through four middlewares (callgrind, tests/bench middleware
/// scenario: 0.75k to clone, 0.25k to drop; with the spare list and its two locks the
/// request is 0.4k cheaper). A request takes a spare copy instead and gives it back as soon
/// as `call` has returned the response future (which owns what it needs), so there are
/// about as many copies as requests were ever calling at the same moment, at most
/// [`Chain::SPARE`] kept.
struct Chain {
    tripper: RoundTripper,
    spare: std::sync::Mutex<Vec<RoundTripper>>,
}

impl Chain {
    /// Spare copies kept at most.
    const SPARE: usize = 64;

    fn new(tripper: RoundTripper) -> Self {
        Self {
            tripper,
            spare: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// One call of the chain (readiness first, as tower requires).
    async fn round_trip(&self, request: Request<Body>) -> Result<Response<Body>, BoxError> {
        let spare = self.spare.lock().ok().and_then(|mut spare| spare.pop());
        let mut tripper = spare.unwrap_or_else(|| self.tripper.clone());
        // A copy whose `poll_ready` failed is dropped, not given back.
        std::future::poll_fn(|cx| tripper.poll_ready(cx)).await?;
        let response = tripper.call(request);
        if let Ok(mut spare) = self.spare.lock()
            && spare.len() < Self::SPARE
        {
            spare.push(tripper);
        }
        response.await
    }
}

/// Metrics and the access-log line of one request. Written when the response head is
/// ready, or with status 499 when the client went away first (the future was dropped).
struct Record<'a> {
    handler: &'a EndpointHandler,
    start: Instant,
    method: Method,
    /// Kept only while the access log is enabled (the copy costs an allocation).
    uri: Option<Uri>,
    options: RequestOptions,
    finished: bool,
}

impl Record<'_> {
    fn finish(&mut self, status: u16) {
        self.finished = true;
        self.options.scope.finish(status);
        let handler = self.handler;
        let elapsed = self.start.elapsed();
        let metrics = handler.metrics.of(&self.method);
        metrics.count_code(status);
        metrics.duration.observe(elapsed.as_secs_f64());
        if self.options.attempt > 1 {
            if status < 500 {
                metrics.retry_success.inc();
            } else {
                metrics.retry_failure.inc();
            }
        }
        let Some(uri) = &self.uri else { return };
        let backend = self.options.backend.get();
        tracing::info!(
            target: "access",
            method = %self.method,
            path = uri.path(),
            endpoint = %handler.info.path,
            backend = backend.as_ref().map_or("", |node| node.address.as_str()),
            status,
            attempts = self.options.attempt,
            latency_ms = elapsed.as_secs_f64() * 1000.0,
        );
    }
}

impl Drop for Record<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.finish(499);
        }
    }
}

struct GaugeGuard<'a>(&'a prometheus::IntGauge);

impl Drop for GaugeGuard<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

pin_project_lite::pin_project! {
    /// Counts response bytes into `go_gateway_requests_tx_bytes` as they stream out.
    struct CountingBody {
        #[pin]
        inner: Body,
        counter: prometheus::IntCounter,
        count: u64,
    }

    impl PinnedDrop for CountingBody {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if *this.count > 0 {
                this.counter.inc_by(*this.count);
            }
        }
    }
}

impl HttpBody for CountingBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                *this.count += data.len() as u64;
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

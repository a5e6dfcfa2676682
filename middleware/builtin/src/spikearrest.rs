//! `spikearrest` (Apigee Edge's Spike Arrest): `allow` requests per `timeUnit`, smoothed
//! into equal intervals. `allow: 600, timeUnit: minute` admits one request per 100 ms, not
//! 600 in the first second.
//!
//! A request that comes before its slot is refused with [`Reason::RateLimited`]
//! (`429 Too Many Requests`, `Retry-After`), unless `bufferSize` > 0: then up to
//! `bufferSize` requests wait (each at most `bufferSize` intervals) for their slot instead.
//! The arithmetic is the GCRA of [`crate::ratelimit::bucket`] with a bucket of
//! `bufferSize + 1` slots, where an admitted request waits until its own slot comes. Shared
//! through Redis with `redis` (or `--redis`), exactly like `ratelimit`, with the same
//! `failureMode`. Refusals count with reason `spike_arrest`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use http::header::HeaderName;
use http::{HeaderValue, Request, Response};
use serde::Deserialize;
use tokio::time::Instant;
use tower::{Layer, Service};

use crate::ratelimit::bucket::{Bucket, Decision, Key, KeyedBuckets, Quota, nanos_since};
use crate::redis_store::{FailureMode, RedisStores, Shared, unavailable_response};
use crate::support::{Denied, decode, lenient_u64, opt_duration, option_error};
use middleware::{
    Body, BoxError, BuildContext, BuildError, Middleware, Reason, Rejection, RequestOptions,
};

/// Keys remembered at most (idle ones are forgotten first).
const MAX_KEYS: usize = 100_000;

/// The unit `allow` is counted in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TimeUnit {
    /// Per second.
    #[default]
    Second,
    /// Per minute.
    Minute,
}

/// What requests are counted under.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeySource {
    /// One rate for all requests of the endpoint.
    #[default]
    Global,
    /// The client's IP address (the TCP peer of the gateway).
    Ip,
    /// The value of the header named by `header`.
    Header,
}

/// Options of `spikearrest`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct SpikeArrestOptions {
    /// The unit of `allow`: `second` or `minute`. Default: `second`.
    pub time_unit: TimeUnit,
    /// Requests per `timeUnit`, one per `timeUnit / allow` (required, > 0). Default: 0.
    #[serde(deserialize_with = "lenient_u64")]
    pub allow: u64,
    /// Requests that may wait for their slot instead of a 429. Default: 0.
    #[serde(deserialize_with = "lenient_u64")]
    pub buffer_size: u64,
    /// What requests are counted under: `global`, `ip` or `header`. Default: `global`.
    pub key: KeySource,
    /// The header whose value is the key when `key: header` (required then). Default: empty.
    pub header: String,
    /// `redis://HOST:PORT[/DB]`: keep the state there, shared by every gateway using it.
    /// Default: empty, meaning the gateway's `--redis`, or local state without it.
    pub redis: String,
    /// While Redis is unreachable: `open` (decide locally) or `closed` (503). Default: `open`.
    pub failure_mode: FailureMode,
    /// Bound on one Redis round trip. Default: `100ms`.
    #[serde(deserialize_with = "opt_duration")]
    pub redis_timeout: Option<Duration>,
}

impl Default for SpikeArrestOptions {
    fn default() -> Self {
        Self {
            time_unit: TimeUnit::Second,
            allow: 0,
            buffer_size: 0,
            key: KeySource::Global,
            header: String::new(),
            redis: String::new(),
            failure_mode: FailureMode::Open,
            redis_timeout: None,
        }
    }
}

enum Slots {
    Global(Bucket),
    Keyed(KeyedBuckets),
}

/// The shared state of one `spikearrest` instance.
pub struct Arrester {
    quota: Quota,
    key: KeySource,
    header: Option<HeaderName>,
    slots: Slots,
    epoch: Instant,
    shared: Option<Shared>,
    denied: Denied,
    unavailable: Denied,
}

/// What happens to one request.
enum Verdict {
    /// Go on after waiting this long.
    Pass(Duration),
    /// Refused (429, or 503 without Redis in closed mode).
    Refuse(Response<Body>),
}

impl Arrester {
    /// Checks `options`; `name` is used in errors.
    pub fn new(options: &SpikeArrestOptions, name: &str) -> Result<Self, BuildError> {
        if options.allow == 0 {
            return Err(option_error(name, "allow", "must be greater than 0"));
        }
        let unit = match options.time_unit {
            TimeUnit::Second => 1.0,
            TimeUnit::Minute => 60.0,
        };
        let header = match options.key {
            KeySource::Header => {
                Some(HeaderName::try_from(options.header.as_str()).map_err(|_| {
                    option_error(
                        name,
                        "header",
                        "a valid header name is required with key: header",
                    )
                })?)
            }
            _ if !options.header.is_empty() => {
                return Err(option_error(name, "header", "only used with key: header"));
            }
            _ => None,
        };
        let slots = match options.key {
            KeySource::Global => Slots::Global(Bucket::default()),
            KeySource::Ip | KeySource::Header => Slots::Keyed(KeyedBuckets::new(MAX_KEYS)),
        };
        Ok(Self {
            quota: Quota::new(
                options.allow as f64 / unit,
                options.buffer_size.saturating_add(1),
            ),
            key: options.key,
            header,
            slots,
            epoch: Instant::now(),
            shared: None,
            denied: Denied::default(),
            unavailable: Denied::default(),
        })
    }

    fn local_key<B>(&self, request: &Request<B>) -> Key {
        match (self.key, &self.header) {
            (KeySource::Header, Some(name)) => request
                .headers()
                .get(name)
                .map_or(Key::Missing, |value| Key::Text(Box::from(value.as_bytes()))),
            _ => request
                .extensions()
                .get::<RequestOptions>()
                .and_then(|options| options.client_addr)
                .map_or(Key::Missing, |addr| Key::Ip(addr.ip())),
        }
    }

    fn redis_key(key: &Key) -> Vec<u8> {
        match key {
            Key::Ip(ip) => format!("ip:{ip}").into_bytes(),
            Key::Text(value) => [&b"h:"[..], value].concat(),
            Key::Missing => b"-".to_vec(),
        }
    }

    fn acquire_local(&self, key: Key) -> Decision {
        let now = nanos_since(self.epoch);
        match &self.slots {
            Slots::Global(bucket) => bucket.acquire(self.quota, now),
            Slots::Keyed(map) => map.acquire(key, self.quota, now),
        }
    }

    /// The verdict for a decision: an admitted request waits until its own slot.
    fn verdict(&self, decision: &Decision) -> Verdict {
        if decision.allowed {
            return Verdict::Pass(decision.reset.saturating_sub(self.quota.interval()));
        }
        self.denied.inc();
        let retry_after = decision
            .retry_after
            .as_nanos()
            .div_ceil(1_000_000_000)
            .max(1) as u64;
        Verdict::Refuse(
            Rejection::new(Reason::RateLimited, "Spike arrest violation")
                .with_header(http::header::RETRY_AFTER, HeaderValue::from(retry_after))
                .into_response(),
        )
    }
}

/// Layer of `spikearrest`.
#[derive(Clone)]
pub struct SpikeArrestLayer {
    arrester: Arc<Arrester>,
}

impl SpikeArrestLayer {
    /// A layer sharing `arrester` between every service it builds.
    pub fn new(arrester: Arrester) -> Self {
        Self {
            arrester: Arc::new(arrester),
        }
    }
}

impl<S> Layer<S> for SpikeArrestLayer {
    type Service = SpikeArrest<S>;

    fn layer(&self, inner: S) -> SpikeArrest<S> {
        SpikeArrest {
            arrester: self.arrester.clone(),
            inner,
        }
    }
}

/// The `spikearrest` service.
#[derive(Clone)]
pub struct SpikeArrest<S> {
    arrester: Arc<Arrester>,
    inner: S,
}

type Admission = Pin<Box<dyn Future<Output = Verdict> + Send>>;

impl<S> Service<Request<Body>> for SpikeArrest<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = BoxError> + Clone,
{
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = ResponseFuture<S, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let key = self.arrester.local_key(&request);
        let admission: Admission = if self.arrester.shared.is_some() {
            let arrester = self.arrester.clone();
            Box::pin(async move {
                let Some(shared) = &arrester.shared else {
                    return Verdict::Pass(Duration::ZERO);
                };
                let redis_key = shared.key(&Arrester::redis_key(&key));
                let quota = arrester.quota;
                let decision = match shared
                    .store
                    .gcra(&redis_key, quota.interval(), quota.burst(), shared.timeout)
                    .await
                {
                    Ok(decision) => decision,
                    Err(_) if shared.failure_mode == FailureMode::Open => {
                        arrester.acquire_local(key)
                    }
                    Err(_) => {
                        arrester.unavailable.inc();
                        return Verdict::Refuse(unavailable_response());
                    }
                };
                let verdict = arrester.verdict(&decision);
                if let Verdict::Pass(wait) = verdict
                    && !wait.is_zero()
                {
                    tokio::time::sleep(wait).await;
                }
                verdict
            })
        } else {
            match self.arrester.verdict(&self.arrester.acquire_local(key)) {
                Verdict::Pass(wait) if wait.is_zero() => {
                    return ResponseFuture {
                        state: State::Passed {
                            future: self.inner.call(request),
                        },
                    };
                }
                Verdict::Pass(wait) => Box::pin(async move {
                    tokio::time::sleep(wait).await;
                    Verdict::Pass(wait)
                }),
                Verdict::Refuse(response) => {
                    return ResponseFuture {
                        state: State::Refused {
                            response: Some(response),
                        },
                    };
                }
            }
        };
        // The inner service that was polled ready goes into the future.
        let clone = self.inner.clone();
        ResponseFuture {
            state: State::Admitting {
                admission,
                request: Some(request),
                inner: Some(std::mem::replace(&mut self.inner, clone)),
            },
        }
    }
}

pin_project_lite::pin_project! {
    /// Response future of [`SpikeArrest`].
    pub struct ResponseFuture<S, F> {
        #[pin]
        state: State<S, F>,
    }
}

pin_project_lite::pin_project! {
    #[project = StateProj]
    enum State<S, F> {
        Refused { response: Option<Response<Body>> },
        // Asking Redis and/or waiting for the slot.
        Admitting { admission: Admission, request: Option<Request<Body>>, inner: Option<S> },
        Passed { #[pin] future: F },
    }
}

impl<S, F> Future for ResponseFuture<S, F>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = BoxError, Future = F>,
    F: Future<Output = Result<Response<Body>, BoxError>>,
{
    type Output = Result<Response<Body>, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            match self.as_mut().project().state.project() {
                StateProj::Refused { response } => {
                    return Poll::Ready(
                        response
                            .take()
                            .ok_or_else(|| "spikearrest future polled after completion".into()),
                    );
                }
                StateProj::Admitting {
                    admission,
                    request,
                    inner,
                } => {
                    let verdict = ready!(admission.as_mut().poll(cx));
                    let (Some(request), Some(mut inner)) = (request.take(), inner.take()) else {
                        return Poll::Ready(Err(
                            "spikearrest future polled after completion".into()
                        ));
                    };
                    match verdict {
                        Verdict::Refuse(response) => return Poll::Ready(Ok(response)),
                        Verdict::Pass(_) => {
                            let future = inner.call(request);
                            self.as_mut().project().state.set(State::Passed { future });
                        }
                    }
                }
                StateProj::Passed { future } => return future.poll(cx),
            }
        }
    }
}

/// The factory of `spikearrest`; Redis-backed instances take their store from `stores`.
pub fn factory(
    stores: Arc<RedisStores>,
) -> impl Fn(&configs::Middleware, &BuildContext) -> Result<Middleware, BuildError> + Send + Sync {
    move |config, ctx| build(config, ctx, &stores)
}

/// Builds `spikearrest` from its config entry.
pub fn build(
    config: &configs::Middleware,
    ctx: &BuildContext,
    stores: &RedisStores,
) -> Result<Middleware, BuildError> {
    let options: SpikeArrestOptions = decode(config)?;
    let mut arrester = Arrester::new(&options, &config.name)?;
    arrester.shared = Shared::build(
        stores,
        "spikearrest",
        config,
        ctx,
        &options.redis,
        options.failure_mode,
        options.redis_timeout,
    )?;
    arrester.denied = Denied::new(ctx.denial_counter(&config.name, "spike_arrest"));
    arrester.unavailable = Denied::new(ctx.denial_counter(&config.name, "redis_unavailable"));
    Ok(Middleware::from_layer(
        &config.name,
        SpikeArrestLayer::new(arrester),
    ))
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use http::StatusCode;
    use middleware::denials::LocalDenials;
    use middleware::{EndpointInfo, RoundTripper, full_body};
    use tower::ServiceExt;

    use super::*;

    fn entry(options: serde_json::Value) -> configs::Middleware {
        configs::Middleware {
            name: "spikearrest".into(),
            options,
            required: false,
        }
    }

    fn ctx() -> (BuildContext, Arc<LocalDenials>) {
        let endpoint = EndpointInfo {
            path: "/spiky".into(),
            ..Default::default()
        };
        let denials = Arc::new(LocalDenials::default());
        let ctx = BuildContext::new(Arc::new(endpoint)).with_denials(denials.clone());
        (ctx, denials)
    }

    fn service(options: serde_json::Value) -> (RoundTripper, Arc<LocalDenials>) {
        let (ctx, denials) = ctx();
        let ok = RoundTripper::new(tower::service_fn(|_request: Request<Body>| async {
            Ok::<_, BoxError>(Response::new(full_body("ok")))
        }));
        let middleware = build(&entry(options), &ctx, &RedisStores::default()).expect("builds");
        (middleware.wrap(ok), denials)
    }

    fn request() -> Request<Body> {
        let mut request = Request::new(full_body(""));
        let addr = SocketAddr::from(([10, 0, 0, 1], 4000));
        request
            .extensions_mut()
            .insert(RequestOptions::new(Default::default(), Some(addr)));
        request
    }

    #[tokio::test(start_paused = true)]
    async fn six_hundred_per_minute_is_one_per_100ms_not_a_burst() {
        let (service, denials) = service(serde_json::json!({"timeUnit": "minute", "allow": 600}));
        // A burst at one instant: only the first passes.
        let mut statuses = Vec::new();
        for _ in 0..10 {
            statuses.push(
                service
                    .clone()
                    .oneshot(request())
                    .await
                    .expect("response")
                    .status(),
            );
        }
        assert_eq!(statuses[0], StatusCode::OK);
        assert!(
            statuses[1..]
                .iter()
                .all(|s| *s == StatusCode::TOO_MANY_REQUESTS)
        );
        // A request every 25 ms for 2 s: exactly one per 100 ms passes.
        let mut admitted = Vec::new();
        let started = Instant::now();
        for _ in 0..80 {
            tokio::time::advance(Duration::from_millis(25)).await;
            let response = service.clone().oneshot(request()).await.expect("response");
            if response.status() == StatusCode::OK {
                admitted.push(started.elapsed());
            } else {
                assert_eq!(response.headers()["retry-after"], "1");
            }
        }
        assert_eq!(admitted.len(), 20, "{admitted:?}");
        for pair in admitted.windows(2) {
            assert_eq!(
                pair[1] - pair[0],
                Duration::from_millis(100),
                "{admitted:?}"
            );
        }
        assert_eq!(denials.get("spikearrest", "/spiky", "spike_arrest"), 9 + 60);
    }

    #[tokio::test(start_paused = true)]
    async fn buffered_requests_wait_for_their_slot() {
        let (service, denials) = service(serde_json::json!({"allow": 10, "bufferSize": 3}));
        let started = Instant::now();
        let mut calls = Vec::new();
        for _ in 0..6 {
            let mut service = service.clone();
            std::future::poll_fn(|cx| service.poll_ready(cx))
                .await
                .expect("ready");
            // The boxed future is 'static, so it can run on its own task.
            let future = service.call(request());
            calls.push(tokio::spawn(async move {
                let status = future.await.expect("response").status();
                (status, Instant::now() - started)
            }));
        }
        let mut outcomes = Vec::new();
        for call in calls {
            outcomes.push(call.await.expect("task"));
        }
        outcomes.sort_by_key(|(_, at)| *at);
        let passed: Vec<Duration> = outcomes
            .iter()
            .filter(|(status, _)| *status == StatusCode::OK)
            .map(|(_, at)| *at)
            .collect();
        // One now, three queued in the buffer at 100 ms spacing; the other two refused at once.
        assert_eq!(
            passed,
            [0, 100, 200, 300].map(Duration::from_millis),
            "{outcomes:?}"
        );
        let refused: Vec<_> = outcomes
            .iter()
            .filter(|(status, _)| *status == StatusCode::TOO_MANY_REQUESTS)
            .collect();
        assert_eq!(refused.len(), 2, "{outcomes:?}");
        assert!(refused.iter().all(|(_, at)| at.is_zero()), "{outcomes:?}");
        assert_eq!(denials.get("spikearrest", "/spiky", "spike_arrest"), 2);
    }

    #[tokio::test]
    async fn keyed_by_header() {
        let (service, _) =
            service(serde_json::json!({"allow": 1, "key": "header", "header": "x-client"}));
        let with = |key: &'static str| {
            let mut request = request();
            request
                .headers_mut()
                .insert("x-client", HeaderValue::from_static(key));
            request
        };
        let status = |request| {
            let service = service.clone();
            async move { service.oneshot(request).await.expect("response").status() }
        };
        assert_eq!(status(with("a")).await, StatusCode::OK);
        assert_eq!(status(with("a")).await, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(status(with("b")).await, StatusCode::OK);
    }

    #[test]
    fn option_errors_name_the_field() {
        let cases = [
            (
                serde_json::json!({}),
                "options.allow: must be greater than 0",
            ),
            (
                serde_json::json!({"allow": 1, "timeUnit": "hour"}),
                "options.timeUnit: unknown variant `hour`",
            ),
            (
                serde_json::json!({"allow": 1, "key": "header"}),
                "options.header: a valid header name",
            ),
            (
                serde_json::json!({"allow": 1, "header": "x"}),
                "options.header: only used",
            ),
            (
                serde_json::json!({"allow": 1, "redis": "localhost"}),
                "options.redis: ",
            ),
            (
                serde_json::json!({"allow": 1, "failureMode": "maybe"}),
                "options.failureMode: unknown variant",
            ),
            (
                serde_json::json!({"allow": 1, "redis": "redis://127.0.0.1:1", "redisTimeout": "0s"}),
                "options.redisTimeout: must be greater than 0",
            ),
        ];
        for (options, expected) in cases {
            let err = build(&entry(options.clone()), &ctx().0, &RedisStores::default())
                .err()
                .expect("bad options");
            let text = err.to_string();
            assert!(text.contains(expected), "{options}: {text}");
        }
    }
}

//! `ratelimit`: a token bucket per client IP, per header value, or one for everyone.
//!
//! Configure either `rate` (+ `burst`) or `max` per `window`. A request without a token
//! is refused with [`Reason::RateLimited`] (`429 Too Many Requests`) and `Retry-After`;
//! every response carries `RateLimit-Limit`, `RateLimit-Remaining` and `RateLimit-Reset`
//! (seconds). Buckets are lock-free (see [`bucket`]); denials count in the proxy's
//! `go_gateway_middleware_denied_total{middleware="ratelimit",reason="rate_limited"}`.
//!
//! With `redis` (or the gateway's `--redis`) the bucket lives in Redis and every gateway
//! using it shares it: the same GCRA as the local bucket, run by a server-side script on the
//! server's clock (see [`crate::redis_store`]). While Redis is unreachable, `failureMode:
//! open` decides with the local bucket and `closed` answers 503 (counted with reason
//! `redis_unavailable`).

pub mod bucket;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use http::header::HeaderName;
use http::{HeaderMap, HeaderValue, Request, Response};
use serde::Deserialize;
use tokio::time::Instant;
use tower::{Layer, Service};

use self::bucket::{Bucket, Decision, Key, KeyedBuckets, Quota, nanos_since};
use super::redis_store::{FailureMode, RedisStores, Shared, Unavailable, unavailable_response};
use super::support::{Denied, decode, lenient_f64, lenient_u64, opt_duration, option_error};
use middleware::denials::DenialCounter;
use middleware::{
    Body, BoxError, BuildContext, BuildError, Middleware, Reason, Rejection, RequestOptions,
};

/// What requests are counted under.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeySource {
    /// The client's IP address (the TCP peer of the gateway).
    #[default]
    Ip,
    /// The value of the header named by `header`.
    Header,
    /// One bucket for all requests of the endpoint.
    Global,
}

/// Options of `ratelimit`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct RateLimitOptions {
    /// What requests are counted under: `ip`, `header` or `global`. Default: `ip`.
    pub key: KeySource,
    /// The header whose value is the key when `key: header` (required then); requests
    /// without it share one bucket. Default: empty.
    pub header: String,
    /// Tokens refilled per second. Default: 0 (then `max` / `window` set the rate).
    #[serde(deserialize_with = "lenient_f64")]
    pub rate: f64,
    /// Bucket size: requests that may pass at once. Default: 0, meaning `rate` rounded up
    /// (at least 1), or `max` when `max` / `window` are used.
    #[serde(deserialize_with = "lenient_u64")]
    pub burst: u64,
    /// Requests allowed per `window` (instead of `rate`). Default: 0 (unset).
    #[serde(deserialize_with = "lenient_u64")]
    pub max: u64,
    /// The window of `max`, e.g. `1m`. Default: unset.
    #[serde(deserialize_with = "opt_duration")]
    pub window: Option<Duration>,
    /// Most keys remembered; idle keys are forgotten first. Default: 100000.
    #[serde(deserialize_with = "lenient_u64", alias = "max_keys")]
    pub max_keys: u64,
    /// Whether responses carry the `RateLimit-*` headers. Default: true.
    pub headers: bool,
    /// `redis://HOST:PORT[/DB]`: keep the buckets there, shared by every gateway using it.
    /// Default: empty, meaning the gateway's `--redis`, or local buckets without it.
    pub redis: String,
    /// While Redis is unreachable: `open` (decide with the local bucket) or `closed` (503).
    /// Default: `open`.
    pub failure_mode: FailureMode,
    /// Bound on one Redis round trip. Default: `100ms`.
    #[serde(deserialize_with = "opt_duration")]
    pub redis_timeout: Option<Duration>,
}

impl Default for RateLimitOptions {
    fn default() -> Self {
        Self {
            key: KeySource::Ip,
            header: String::new(),
            rate: 0.0,
            burst: 0,
            max: 0,
            window: None,
            max_keys: 100_000,
            headers: true,
            redis: String::new(),
            failure_mode: FailureMode::Open,
            redis_timeout: None,
        }
    }
}

enum Buckets {
    Global(Bucket),
    Ip(KeyedBuckets),
    Header(HeaderName, KeyedBuckets),
}

/// The shared state of one `ratelimit` instance.
pub struct Limiter {
    quota: Quota,
    buckets: Buckets,
    epoch: Instant,
    headers: bool,
    /// `RateLimit-Limit`, the same on every response: made once (a clone shares it).
    limit_value: HeaderValue,
    denied: Denied,
    shared: Option<Shared>,
    unavailable: Denied,
}

impl Limiter {
    /// Checks `options`; `name` is used in errors.
    pub fn new(options: &RateLimitOptions, name: &str) -> Result<Self, BuildError> {
        let (rate, default_burst) = match (options.rate > 0.0, options.max > 0, options.window) {
            (true, false, None) => (options.rate, options.rate.ceil() as u64),
            (false, true, Some(window)) if !window.is_zero() => {
                (options.max as f64 / window.as_secs_f64(), options.max)
            }
            (false, true, _) => {
                return Err(option_error(
                    name,
                    "window",
                    "required (and non-zero) with max",
                ));
            }
            (false, false, Some(_)) => {
                return Err(option_error(name, "max", "required with window"));
            }
            (true, _, _) => {
                return Err(option_error(
                    name,
                    "rate",
                    "set either rate or max/window, not both",
                ));
            }
            (false, false, None) => {
                return Err(option_error(
                    name,
                    "rate",
                    "must be greater than 0 (or set max and window)",
                ));
            }
        };
        if options.rate < 0.0 {
            return Err(option_error(name, "rate", "must not be negative"));
        }
        let burst = if options.burst > 0 {
            options.burst
        } else {
            default_burst.max(1)
        };
        let max_keys = usize::try_from(options.max_keys)
            .unwrap_or(usize::MAX)
            .max(1);
        let buckets = match options.key {
            KeySource::Global => Buckets::Global(Bucket::default()),
            KeySource::Ip => Buckets::Ip(KeyedBuckets::new(max_keys)),
            KeySource::Header => {
                let header = HeaderName::try_from(options.header.as_str()).map_err(|_| {
                    option_error(
                        name,
                        "header",
                        "a valid header name is required with key: header",
                    )
                })?;
                Buckets::Header(header, KeyedBuckets::new(max_keys))
            }
        };
        if options.key != KeySource::Header && !options.header.is_empty() {
            return Err(option_error(name, "header", "only used with key: header"));
        }
        Ok(Self {
            quota: Quota::new(rate, burst),
            buckets,
            epoch: Instant::now(),
            headers: options.headers,
            limit_value: HeaderValue::from(burst),
            denied: Denied::default(),
            shared: None,
            unavailable: Denied::default(),
        })
    }

    /// Keeps the buckets in Redis (`shared`); `unavailable` counts the 503s of
    /// `failureMode: closed`.
    pub fn with_shared(mut self, shared: Option<Shared>, unavailable: DenialCounter) -> Self {
        self.shared = shared;
        self.unavailable = Denied::new(unavailable);
        self
    }

    /// What the request is counted under, as the end of a Redis key.
    fn key_suffix<B>(&self, request: &Request<B>) -> Vec<u8> {
        match &self.buckets {
            Buckets::Global(_) => b"g".to_vec(),
            Buckets::Ip(_) => request
                .extensions()
                .get::<RequestOptions>()
                .and_then(|options| options.client_addr)
                .map_or_else(
                    || b"-".to_vec(),
                    |addr| format!("ip:{}", addr.ip()).into_bytes(),
                ),
            Buckets::Header(name, _) => match request.headers().get(name) {
                Some(value) => [b"h:", value.as_bytes()].concat(),
                None => b"-".to_vec(),
            },
        }
    }

    /// Counts denials in `counter`.
    pub fn with_denied_counter(mut self, counter: DenialCounter) -> Self {
        self.denied = Denied::new(counter);
        self
    }

    /// Takes a token for `request`.
    pub fn check<B>(&self, request: &Request<B>) -> Decision {
        let now = nanos_since(self.epoch);
        match &self.buckets {
            Buckets::Global(bucket) => bucket.acquire(self.quota, now),
            Buckets::Ip(map) => {
                let ip = request
                    .extensions()
                    .get::<RequestOptions>()
                    .and_then(|options| options.client_addr)
                    .map_or(Key::Missing, |addr| Key::Ip(addr.ip()));
                map.acquire(ip, self.quota, now)
            }
            Buckets::Header(name, map) => {
                let key = request
                    .headers()
                    .get(name)
                    .map_or(Key::Missing, |value| Key::Text(Box::from(value.as_bytes())));
                map.acquire(key, self.quota, now)
            }
        }
    }

    fn write_headers(&self, headers: &mut HeaderMap, decision: &Decision) {
        if !self.headers {
            return;
        }
        // Static names: a `&str` name is parsed and hashed anew on every insert.
        static LIMIT: HeaderName = HeaderName::from_static("ratelimit-limit");
        static REMAINING: HeaderName = HeaderName::from_static("ratelimit-remaining");
        static RESET: HeaderName = HeaderName::from_static("ratelimit-reset");
        headers.insert(&LIMIT, self.limit_value.clone());
        headers.insert(&REMAINING, HeaderValue::from(decision.remaining));
        headers.insert(&RESET, HeaderValue::from(ceil_secs(decision.reset)));
    }

    fn denied_response(&self, decision: &Decision) -> Response<Body> {
        self.denied.inc();
        let retry_after = ceil_secs(decision.retry_after).max(1);
        let mut rejection = Rejection::new(Reason::RateLimited, "Too Many Requests")
            .with_header(http::header::RETRY_AFTER, HeaderValue::from(retry_after));
        self.write_headers(&mut rejection.headers, decision);
        rejection.into_response()
    }
}

fn ceil_secs(duration: Duration) -> u64 {
    duration.as_nanos().div_ceil(1_000_000_000) as u64
}

/// Layer of `ratelimit`.
#[derive(Clone)]
pub struct RateLimitLayer {
    limiter: Arc<Limiter>,
}

impl RateLimitLayer {
    /// A layer sharing `limiter` between every service it builds.
    pub fn new(limiter: Limiter) -> Self {
        Self {
            limiter: Arc::new(limiter),
        }
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimit<S>;

    fn layer(&self, inner: S) -> RateLimit<S> {
        RateLimit {
            limiter: self.limiter.clone(),
            inner,
        }
    }
}

/// The `ratelimit` service.
#[derive(Clone)]
pub struct RateLimit<S> {
    limiter: Arc<Limiter>,
    inner: S,
}

impl<S> Service<Request<Body>> for RateLimit<S>
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
        if let Some(shared) = &self.limiter.shared {
            let key = shared.key(&self.limiter.key_suffix(&request));
            let limiter = self.limiter.clone();
            let check = Box::pin(async move {
                let Some(shared) = &limiter.shared else {
                    return Err(Unavailable);
                };
                let quota = limiter.quota;
                shared
                    .store
                    .gcra(&key, quota.interval(), quota.burst(), shared.timeout)
                    .await
            });
            // The inner service that was polled ready goes into the future.
            let clone = self.inner.clone();
            return ResponseFuture {
                state: State::Checking {
                    check,
                    request: Some(request),
                    inner: Some(std::mem::replace(&mut self.inner, clone)),
                    limiter: self.limiter.clone(),
                },
            };
        }
        let decision = self.limiter.check(&request);
        if !decision.allowed {
            let response = self.limiter.denied_response(&decision);
            return ResponseFuture {
                state: State::Denied {
                    response: Some(response),
                },
            };
        }
        ResponseFuture {
            state: State::Passed {
                future: self.inner.call(request),
                decision,
                limiter: self.limiter.clone(),
            },
        }
    }
}

type Check = Pin<Box<dyn Future<Output = Result<Decision, Unavailable>> + Send>>;

pin_project_lite::pin_project! {
    /// Response future of [`RateLimit`].
    pub struct ResponseFuture<S, F> {
        #[pin]
        state: State<S, F>,
    }
}

pin_project_lite::pin_project! {
    #[project = StateProj]
    enum State<S, F> {
        Denied { response: Option<Response<Body>> },
        // Redis-backed: the round trip, then the inner service.
        Checking { check: Check, request: Option<Request<Body>>, inner: Option<S>, limiter: Arc<Limiter> },
        Passed { #[pin] future: F, decision: Decision, limiter: Arc<Limiter> },
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
                StateProj::Denied { response } => {
                    return Poll::Ready(
                        response
                            .take()
                            .ok_or_else(|| "ratelimit future polled after completion".into()),
                    );
                }
                StateProj::Checking {
                    check,
                    request,
                    inner,
                    limiter,
                } => {
                    let checked = ready!(check.as_mut().poll(cx));
                    let (Some(request), Some(mut inner)) = (request.take(), inner.take()) else {
                        return Poll::Ready(Err("ratelimit future polled after completion".into()));
                    };
                    let decision = match checked {
                        Ok(decision) => decision,
                        Err(_) => match limiter.shared.as_ref().map(|shared| shared.failure_mode) {
                            Some(FailureMode::Closed) => {
                                limiter.unavailable.inc();
                                return Poll::Ready(Ok(unavailable_response()));
                            }
                            _ => limiter.check(&request),
                        },
                    };
                    if !decision.allowed {
                        return Poll::Ready(Ok(limiter.denied_response(&decision)));
                    }
                    let limiter = limiter.clone();
                    let future = inner.call(request);
                    self.as_mut().project().state.set(State::Passed {
                        future,
                        decision,
                        limiter,
                    });
                }
                StateProj::Passed {
                    future,
                    decision,
                    limiter,
                } => {
                    let mut response = ready!(future.poll(cx))?;
                    limiter.write_headers(response.headers_mut(), decision);
                    return Poll::Ready(Ok(response));
                }
            }
        }
    }
}

/// The factory of `ratelimit`; Redis-backed instances take their store from `stores`.
pub fn factory(
    stores: Arc<RedisStores>,
) -> impl Fn(&configs::Middleware, &BuildContext) -> Result<Middleware, BuildError> + Send + Sync {
    move |config, ctx| build(config, ctx, &stores)
}

/// Builds `ratelimit` from its config entry.
pub fn build(
    config: &configs::Middleware,
    ctx: &BuildContext,
    stores: &RedisStores,
) -> Result<Middleware, BuildError> {
    let options: RateLimitOptions = decode(config)?;
    let denied = ctx.denial_counter(&config.name, "rate_limited");
    let shared = Shared::build(
        stores,
        "ratelimit",
        config,
        ctx,
        &options.redis,
        options.failure_mode,
        options.redis_timeout,
    )?;
    let limiter = Limiter::new(&options, &config.name)?
        .with_denied_counter(denied)
        .with_shared(
            shared,
            ctx.denial_counter(&config.name, "redis_unavailable"),
        );
    Ok(Middleware::from_layer(
        &config.name,
        RateLimitLayer::new(limiter),
    ))
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use tower::ServiceExt;

    use http::StatusCode;
    use middleware::denials::LocalDenials;
    use middleware::{EndpointInfo, RoundTripper, full_body};

    use super::*;

    fn entry(options: serde_json::Value) -> configs::Middleware {
        configs::Middleware {
            name: "ratelimit".into(),
            options,
            required: false,
        }
    }

    fn ctx() -> (BuildContext, Arc<LocalDenials>) {
        let endpoint = EndpointInfo {
            path: "/limited".into(),
            ..Default::default()
        };
        let denials = Arc::new(LocalDenials::default());
        let ctx = BuildContext::new(Arc::new(endpoint)).with_denials(denials.clone());
        (ctx, denials)
    }

    fn ok() -> RoundTripper {
        RoundTripper::new(tower::service_fn(|_request: Request<Body>| async {
            Ok::<_, BoxError>(Response::new(full_body("ok")))
        }))
    }

    fn request_from(ip: [u8; 4]) -> Request<Body> {
        let mut request = Request::new(full_body(""));
        let addr = SocketAddr::from((ip, 4000));
        request
            .extensions_mut()
            .insert(RequestOptions::new(Default::default(), Some(addr)));
        request
    }

    async fn status(service: &RoundTripper, request: Request<Body>) -> Response<Body> {
        service.clone().oneshot(request).await.expect("response")
    }

    #[tokio::test(start_paused = true)]
    async fn exactly_burst_then_one_per_interval_on_a_paused_clock() {
        let (ctx, denials) = ctx();
        let middleware = build(
            &entry(serde_json::json!({"rate": 10, "burst": 5, "key": "global"})),
            &ctx,
            &RedisStores::default(),
        )
        .expect("builds");
        let service = middleware.wrap(ok());
        let mut passed = 0;
        for _ in 0..20 {
            if status(&service, request_from([10, 0, 0, 1])).await.status() == StatusCode::OK {
                passed += 1;
            }
        }
        assert_eq!(passed, 5);
        for step in 0..10 {
            tokio::time::advance(Duration::from_millis(100)).await;
            let first = status(&service, request_from([10, 0, 0, 1])).await;
            assert_eq!(first.status(), StatusCode::OK, "step {step}");
            let second = status(&service, request_from([10, 0, 0, 1])).await;
            assert_eq!(
                second.status(),
                StatusCode::TOO_MANY_REQUESTS,
                "step {step}"
            );
            assert_eq!(second.headers()["retry-after"], "1");
            assert_eq!(second.headers()["ratelimit-remaining"], "0");
            assert_eq!(
                Rejection::of(&second).map(|rejection| rejection.reason),
                Some(Reason::RateLimited)
            );
        }
        assert_eq!(
            denials.get("ratelimit", "/limited", "rate_limited"),
            15 + 10
        );
    }

    #[tokio::test(start_paused = true)]
    async fn max_per_window_and_headers() {
        let middleware = build(
            &entry(serde_json::json!({"max": "3", "window": "3s"})),
            &ctx().0,
            &RedisStores::default(),
        )
        .expect("builds");
        let service = middleware.wrap(ok());
        let first = status(&service, request_from([10, 0, 0, 1])).await;
        assert_eq!(first.status(), StatusCode::OK);
        assert_eq!(first.headers()["ratelimit-limit"], "3");
        assert_eq!(first.headers()["ratelimit-remaining"], "2");
        assert_eq!(first.headers()["ratelimit-reset"], "1");
        status(&service, request_from([10, 0, 0, 1])).await;
        status(&service, request_from([10, 0, 0, 1])).await;
        let denied = status(&service, request_from([10, 0, 0, 1])).await;
        assert_eq!(denied.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(denied.headers()["retry-after"], "1");
        assert_eq!(denied.headers()["ratelimit-reset"], "3");
        // Another client has its own bucket.
        assert_eq!(
            status(&service, request_from([10, 0, 0, 2])).await.status(),
            StatusCode::OK
        );
    }

    #[tokio::test]
    async fn keyed_by_header() {
        let options =
            serde_json::json!({"key": "header", "header": "x-api-key", "rate": 1, "burst": 1});
        let service = build(&entry(options), &ctx().0, &RedisStores::default())
            .expect("builds")
            .wrap(ok());
        let with = |key: &str| {
            let mut request = request_from([10, 0, 0, 1]);
            request
                .headers_mut()
                .insert("x-api-key", HeaderValue::from_str(key).expect("value"));
            request
        };
        assert_eq!(status(&service, with("a")).await.status(), StatusCode::OK);
        assert_eq!(
            status(&service, with("a")).await.status(),
            StatusCode::TOO_MANY_REQUESTS
        );
        assert_eq!(status(&service, with("b")).await.status(), StatusCode::OK);
    }

    #[test]
    fn option_errors_name_the_field() {
        let cases = [
            (
                serde_json::json!({"rate": 1, "burts": 2}),
                "options.burts: unknown field `burts`",
            ),
            (
                serde_json::json!({"rate": "fast"}),
                "options.rate: invalid value",
            ),
            (
                serde_json::json!({"rate": 1, "burst": -1}),
                "options.burst: invalid value",
            ),
            (
                serde_json::json!({"rate": 1, "key": "cookie"}),
                "options.key: unknown variant `cookie`",
            ),
            (serde_json::json!({"max": 10}), "options.window: required"),
            (
                serde_json::json!({"rate": 1, "max": 10, "window": "1s"}),
                "options.rate: set either",
            ),
            (
                serde_json::json!({"rate": 1, "key": "header"}),
                "options.header: a valid header name",
            ),
            (
                serde_json::json!({"max": 1, "window": "soon"}),
                "options.window: invalid duration",
            ),
            (
                serde_json::json!({}),
                "options.rate: must be greater than 0",
            ),
        ];
        for (options, expected) in cases {
            let err = build(&entry(options.clone()), &ctx().0, &RedisStores::default())
                .err()
                .expect("bad options");
            let text = err.to_string();
            assert!(
                text.starts_with("middleware ratelimit: ") && text.contains(expected),
                "{options}: {text}"
            );
        }
    }
}

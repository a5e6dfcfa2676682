//! `ratelimit`: a token bucket per client IP, per header value, or one for everyone.
//!
//! Configure either `rate` (+ `burst`) or `max` per `window`. A request without a token
//! is refused with [`Reason::RateLimited`] (`429 Too Many Requests`) and `Retry-After`;
//! every response carries `RateLimit-Limit`, `RateLimit-Remaining` and `RateLimit-Reset`
//! (seconds). Buckets are lock-free (see [`bucket`]); denials count in the proxy's
//! `go_gateway_middleware_denied_total{middleware="ratelimit",reason="rate_limited"}`.

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
    denied: Denied,
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
            denied: Denied::default(),
        })
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
        headers.insert("ratelimit-limit", HeaderValue::from(self.quota.burst()));
        headers.insert("ratelimit-remaining", HeaderValue::from(decision.remaining));
        headers.insert(
            "ratelimit-reset",
            HeaderValue::from(ceil_secs(decision.reset)),
        );
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
    S: Service<Request<Body>, Response = Response<Body>, Error = BoxError>,
{
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
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

pin_project_lite::pin_project! {
    /// Response future of [`RateLimit`].
    pub struct ResponseFuture<F> {
        #[pin]
        state: State<F>,
    }
}

pin_project_lite::pin_project! {
    #[project = StateProj]
    enum State<F> {
        Denied { response: Option<Response<Body>> },
        Passed { #[pin] future: F, decision: Decision, limiter: Arc<Limiter> },
    }
}

impl<F> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<Body>, BoxError>>,
{
    type Output = Result<Response<Body>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Denied { response } => Poll::Ready(
                response
                    .take()
                    .ok_or_else(|| "ratelimit future polled after completion".into()),
            ),
            StateProj::Passed {
                future,
                decision,
                limiter,
            } => {
                let mut response = ready!(future.poll(cx))?;
                limiter.write_headers(response.headers_mut(), decision);
                Poll::Ready(Ok(response))
            }
        }
    }
}

/// Builds `ratelimit` from its config entry.
pub fn factory(config: &configs::Middleware, ctx: &BuildContext) -> Result<Middleware, BuildError> {
    let options: RateLimitOptions = decode(config)?;
    let denied = ctx.denial_counter(&config.name, "rate_limited");
    let limiter = Limiter::new(&options, &config.name)?.with_denied_counter(denied);
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
        let middleware = factory(
            &entry(serde_json::json!({"rate": 10, "burst": 5, "key": "global"})),
            &ctx,
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
        let middleware = factory(
            &entry(serde_json::json!({"max": "3", "window": "3s"})),
            &ctx().0,
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
        let service = factory(&entry(options), &ctx().0)
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
            let err = factory(&entry(options.clone()), &ctx().0)
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

//! `cors`: Cross-Origin Resource Sharing, answered at the gateway (Kratos' `cors`
//! middleware, same option names and defaults).
//!
//! - No `Origin` header, or an `Origin` equal to the request's own `Host`: not a
//!   cross-origin request; passed on untouched.
//! - Origin not allowed: refused with [`Reason::Forbidden`] (`403`), counted in the
//!   proxy's `go_gateway_middleware_denied_total{reason="origin_not_allowed"}`; the upstream
//!   never sees the request.
//! - Preflight (`OPTIONS` with `Origin` and `Access-Control-Request-Method`): answered
//!   here with `204 No Content` and the `Access-Control-Allow-*` headers. The middleware
//!   declares [`Capabilities::answers_preflight`], so the router sends a preflight for
//!   method M to the endpoint serving M on that path.
//! - Other requests go upstream; the response gets `Access-Control-Allow-Origin` (the
//!   request's origin), `Vary: Origin` and the credentials / expose headers.
//!
//! Difference from Kratos: lists given in the options replace the defaults (Kratos merges
//! options into its defaults, which appends to the default lists). tower-http's `CorsLayer`
//! is not used because it cannot refuse a disallowed origin with 403.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use http::header::{self, HeaderName};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri};
use serde::Deserialize;
use tower::{Layer, Service};

use super::support::{Denied, decode, duration, option_error};
use middleware::denials::DenialCounter;
use middleware::{
    Body, BoxError, BuildContext, BuildError, Capabilities, Middleware, Reason, Rejection,
    empty_body,
};

const REQUEST_PRIVATE_NETWORK: &str = "access-control-request-private-network";
const ALLOW_PRIVATE_NETWORK: &str = "access-control-allow-private-network";

/// Options of `cors` (Kratos' `gateway.middleware.cors.v1.Cors`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct CorsOptions {
    /// Send `Access-Control-Allow-Credentials: true`. Default: true.
    #[serde(alias = "allow_credentials")]
    pub allow_credentials: bool,
    /// Allowed origins: a host (`example.com`), a full origin (`https://example.com:8443`),
    /// a suffix wildcard (`*.example.com` or `.example.com`: any subdomain), or `*` (any
    /// origin). Hosts compare case-insensitively and ignore scheme and port.
    /// Default: none (every cross-origin request is refused).
    #[serde(alias = "allow_origins")]
    pub allow_origins: Vec<String>,
    /// Methods announced in `Access-Control-Allow-Methods`.
    /// Default: `GET, POST, PUT, DELETE`.
    #[serde(alias = "allow_methods")]
    pub allow_methods: Vec<String>,
    /// Request headers announced in `Access-Control-Allow-Headers` on preflight.
    /// Default: `Origin, Content-Length, Content-Type`.
    #[serde(alias = "allow_headers")]
    pub allow_headers: Vec<String>,
    /// Response headers announced in `Access-Control-Expose-Headers`. Default: none.
    #[serde(alias = "expose_headers")]
    pub expose_headers: Vec<String>,
    /// How long browsers may cache a preflight (`Access-Control-Max-Age`, whole seconds).
    /// Default: `10m`.
    #[serde(alias = "max_age", deserialize_with = "duration")]
    pub max_age: Duration,
    /// Answer `Access-Control-Allow-Private-Network: true` to preflights asking for it.
    /// Default: false.
    #[serde(alias = "allow_private_network")]
    pub allow_private_network: bool,
}

impl Default for CorsOptions {
    fn default() -> Self {
        Self {
            allow_credentials: true,
            allow_origins: Vec::new(),
            allow_methods: ["GET", "POST", "PUT", "DELETE"].map(String::from).to_vec(),
            allow_headers: ["Origin", "Content-Length", "Content-Type"]
                .map(String::from)
                .to_vec(),
            expose_headers: Vec::new(),
            max_age: Duration::from_secs(600),
            allow_private_network: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum OriginRule {
    Any,
    Host(String),
    Suffix(String),
    Exact(String),
}

/// The checked policy with its header values prepared once.
#[derive(Debug)]
pub struct CorsPolicy {
    rules: Vec<OriginRule>,
    preflight: HeaderMap,
    actual: HeaderMap,
    allow_private_network: bool,
    denied: Denied,
}

impl CorsPolicy {
    /// Checks `options`; `name` is used in errors.
    pub fn new(options: &CorsOptions, name: &str) -> Result<Self, BuildError> {
        let mut rules = Vec::with_capacity(options.allow_origins.len());
        for origin in &options.allow_origins {
            let origin = origin.trim().to_ascii_lowercase();
            let rule = if origin == "*" {
                OriginRule::Any
            } else if let Some(suffix) = origin.strip_prefix('*') {
                OriginRule::Suffix(suffix.to_owned())
            } else if origin.starts_with('.') {
                OriginRule::Suffix(origin)
            } else if origin.contains("://") {
                OriginRule::Exact(origin.trim_end_matches('/').to_owned())
            } else if !origin.is_empty() {
                OriginRule::Host(origin)
            } else {
                return Err(option_error(name, "allowOrigins", "empty origin"));
            };
            rules.push(rule);
        }
        let methods = joined(name, "allowMethods", &options.allow_methods, |m| {
            m.to_ascii_uppercase()
        })?;
        let allow_headers = joined(name, "allowHeaders", &options.allow_headers, canonical)?;
        let expose_headers = joined(name, "exposeHeaders", &options.expose_headers, canonical)?;

        let mut actual = HeaderMap::new();
        if options.allow_credentials {
            actual.insert(
                header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
        let mut preflight = actual.clone();
        if let Some(methods) = methods {
            // Kratos also sends the methods on actual responses, for early browsers.
            actual.insert(header::ACCESS_CONTROL_ALLOW_METHODS, methods.clone());
            preflight.insert(header::ACCESS_CONTROL_ALLOW_METHODS, methods);
        }
        if let Some(expose) = expose_headers {
            actual.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, expose);
        }
        if let Some(headers) = allow_headers {
            preflight.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, headers);
        }
        preflight.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from(options.max_age.as_secs()),
        );
        preflight.insert(
            header::VARY,
            HeaderValue::from_static(
                "Origin, Access-Control-Request-Method, Access-Control-Request-Headers",
            ),
        );
        Ok(Self {
            rules,
            preflight,
            actual,
            allow_private_network: options.allow_private_network,
            denied: Denied::default(),
        })
    }

    /// Counts refused origins in `counter`.
    pub fn with_denied_counter(mut self, counter: DenialCounter) -> Self {
        self.denied = Denied::new(counter);
        self
    }

    /// Whether `origin` (an `Origin` header value) is allowed.
    pub fn allows(&self, origin: &str) -> bool {
        let Some(parsed) = parse_origin(origin) else {
            return false;
        };
        let host = parsed.host.to_ascii_lowercase();
        self.rules.iter().any(|rule| match rule {
            OriginRule::Any => true,
            OriginRule::Host(allowed) => host == *allowed,
            OriginRule::Suffix(suffix) => host.ends_with(suffix.as_str()),
            OriginRule::Exact(allowed) => origin.eq_ignore_ascii_case(allowed),
        })
    }

    fn deny(&self) -> Response<Body> {
        self.denied.inc();
        Rejection::new(Reason::Forbidden, "origin not allowed").into_response()
    }

    fn preflight_response(
        &self,
        origin: &HeaderValue,
        request_headers: &HeaderMap,
    ) -> Response<Body> {
        let mut response = Response::new(empty_body());
        *response.status_mut() = StatusCode::NO_CONTENT;
        let headers = response.headers_mut();
        headers.clone_from(&self.preflight);
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
        let asks_private = request_headers
            .get(REQUEST_PRIVATE_NETWORK)
            .is_some_and(|value| value.as_bytes().eq_ignore_ascii_case(b"true"));
        if self.allow_private_network && asks_private {
            headers.insert(
                HeaderName::from_static(ALLOW_PRIVATE_NETWORK),
                HeaderValue::from_static("true"),
            );
        }
        response
    }

    fn decorate(&self, origin: HeaderValue, headers: &mut HeaderMap) {
        for (name, value) in &self.actual {
            headers.insert(name.clone(), value.clone());
        }
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        let varies_on_origin = headers
            .get_all(header::VARY)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(','))
            .any(|name| name.trim().eq_ignore_ascii_case("origin") || name.trim() == "*");
        if !varies_on_origin {
            headers.append(header::VARY, HeaderValue::from_static("Origin"));
        }
    }
}

fn canonical(name: &str) -> String {
    name.split('-')
        .map(|part| {
            let mut chars = part.chars();
            match chars.next() {
                Some(first) => {
                    first.to_ascii_uppercase().to_string() + &chars.as_str().to_ascii_lowercase()
                }
                None => String::new(),
            }
        })
        .collect::<Vec<_>>()
        .join("-")
}

/// Trims, normalises and de-duplicates `values` into one comma-separated header value.
fn joined(
    name: &str,
    field: &str,
    values: &[String],
    normalise: impl Fn(&str) -> String,
) -> Result<Option<HeaderValue>, BuildError> {
    let mut seen: Vec<String> = Vec::with_capacity(values.len());
    for value in values {
        let value = normalise(value.trim());
        if value.is_empty() {
            return Err(option_error(name, field, "empty entry"));
        }
        if !seen.iter().any(|known| known.eq_ignore_ascii_case(&value)) {
            seen.push(value);
        }
    }
    if seen.is_empty() {
        return Ok(None);
    }
    HeaderValue::try_from(seen.join(","))
        .map(Some)
        .map_err(|_| option_error(name, field, "invalid header characters"))
}

struct ParsedOrigin<'a> {
    host: &'a str,
    authority: &'a str,
}

fn parse_origin(origin: &str) -> Option<ParsedOrigin<'_>> {
    let (_, rest) = origin.split_once("://")?;
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.is_empty()
        || authority.contains(['/', '@', '?', '#'])
        || origin.parse::<Uri>().is_err()
    {
        return None;
    }
    let host = match authority.strip_prefix('[') {
        Some(bracketed) => bracketed.split(']').next()?,
        None => match authority.rsplit_once(':') {
            Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
            _ => authority,
        },
    };
    Some(ParsedOrigin { host, authority })
}

/// Whether `origin` names the same host and port the request was sent to.
fn same_origin(origin: &str, request_headers: &HeaderMap) -> bool {
    let Some(host) = request_headers
        .get(header::HOST)
        .and_then(|value| value.to_str().ok())
    else {
        return false;
    };
    parse_origin(origin).is_some_and(|parsed| parsed.authority.eq_ignore_ascii_case(host))
}

/// Layer of `cors`.
#[derive(Clone)]
pub struct CorsLayer {
    policy: Arc<CorsPolicy>,
}

impl CorsLayer {
    /// A layer applying `policy`.
    pub fn new(policy: CorsPolicy) -> Self {
        Self {
            policy: Arc::new(policy),
        }
    }
}

impl<S> Layer<S> for CorsLayer {
    type Service = Cors<S>;

    fn layer(&self, inner: S) -> Cors<S> {
        Cors {
            policy: self.policy.clone(),
            inner,
        }
    }
}

/// The `cors` service.
#[derive(Clone)]
pub struct Cors<S> {
    policy: Arc<CorsPolicy>,
    inner: S,
}

impl<S> Service<Request<Body>> for Cors<S>
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
        let origin = request.headers().get(header::ORIGIN).cloned();
        let cross_origin = origin.filter(|origin| {
            origin
                .to_str()
                .map_or(true, |text| !same_origin(text, request.headers()))
        });
        let Some(origin) = cross_origin else {
            return ResponseFuture {
                state: State::Passed {
                    future: self.inner.call(request),
                    cors: None,
                },
            };
        };
        if !origin.to_str().is_ok_and(|text| self.policy.allows(text)) {
            return ResponseFuture::answered(self.policy.deny());
        }
        let preflight = request.method() == Method::OPTIONS
            && request
                .headers()
                .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
        if preflight {
            return ResponseFuture::answered(
                self.policy.preflight_response(&origin, request.headers()),
            );
        }
        ResponseFuture {
            state: State::Passed {
                future: self.inner.call(request),
                cors: Some((self.policy.clone(), origin)),
            },
        }
    }
}

pin_project_lite::pin_project! {
    /// Response future of [`Cors`].
    pub struct ResponseFuture<F> {
        #[pin]
        state: State<F>,
    }
}

pin_project_lite::pin_project! {
    #[project = StateProj]
    enum State<F> {
        Answered { response: Option<Response<Body>> },
        Passed { #[pin] future: F, cors: Option<(Arc<CorsPolicy>, HeaderValue)> },
    }
}

impl<F> ResponseFuture<F> {
    fn answered(response: Response<Body>) -> Self {
        Self {
            state: State::Answered {
                response: Some(response),
            },
        }
    }
}

impl<F> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<Body>, BoxError>>,
{
    type Output = Result<Response<Body>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Answered { response } => Poll::Ready(
                response
                    .take()
                    .ok_or_else(|| "cors future polled after completion".into()),
            ),
            StateProj::Passed { future, cors } => {
                let mut response = ready!(future.poll(cx))?;
                if let Some((policy, origin)) = cors.take() {
                    policy.decorate(origin, response.headers_mut());
                }
                Poll::Ready(Ok(response))
            }
        }
    }
}

/// Builds `cors` from its config entry.
pub fn factory(config: &configs::Middleware, ctx: &BuildContext) -> Result<Middleware, BuildError> {
    let options: CorsOptions = decode(config)?;
    let denied = ctx.denial_counter(&config.name, "origin_not_allowed");
    let policy = CorsPolicy::new(&options, &config.name)?.with_denied_counter(denied);
    let middleware = Middleware::from_layer(&config.name, CorsLayer::new(policy));
    Ok(middleware.with_capabilities(Capabilities {
        answers_preflight: true,
        ..Default::default()
    }))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tower::ServiceExt;

    use super::*;
    use middleware::denials::LocalDenials;
    use middleware::{EndpointInfo, RoundTripper, full_body};

    fn entry(options: serde_json::Value) -> configs::Middleware {
        configs::Middleware {
            name: "cors".into(),
            options,
            required: false,
        }
    }

    fn ctx() -> BuildContext {
        BuildContext::new(Default::default())
    }

    fn counting(hits: Arc<AtomicUsize>) -> RoundTripper {
        RoundTripper::new(tower::service_fn(move |_request: Request<Body>| {
            hits.fetch_add(1, Ordering::SeqCst);
            async { Ok::<_, BoxError>(Response::new(full_body("upstream"))) }
        }))
    }

    async fn call(
        options: serde_json::Value,
        method: Method,
        headers: &[(&str, &str)],
    ) -> (Response<Body>, usize) {
        call_counted(options, method, headers, &ctx()).await
    }

    async fn call_counted(
        options: serde_json::Value,
        method: Method,
        headers: &[(&str, &str)],
        ctx: &BuildContext,
    ) -> (Response<Body>, usize) {
        let hits = Arc::new(AtomicUsize::new(0));
        let service = factory(&entry(options), ctx)
            .expect("builds")
            .wrap(counting(hits.clone()));
        let mut request = Request::builder().method(method).uri("/x");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = service
            .oneshot(request.body(full_body("")).expect("request"))
            .await
            .expect("response");
        (response, hits.load(Ordering::SeqCst))
    }

    #[test]
    fn origin_rules() {
        let options = CorsOptions {
            allow_origins: [
                "example.com",
                "*.foo.com",
                ".bar.com",
                "https://exact.io:8443",
            ]
            .map(String::from)
            .to_vec(),
            ..Default::default()
        };
        let policy = CorsPolicy::new(&options, "cors").expect("valid");
        assert!(policy.allows("https://example.com"));
        assert!(policy.allows("http://EXAMPLE.com:8080"));
        assert!(!policy.allows("https://sub.example.com"));
        assert!(policy.allows("https://a.foo.com"));
        assert!(!policy.allows("https://foo.com"));
        assert!(policy.allows("https://x.y.bar.com"));
        assert!(policy.allows("https://exact.io:8443"));
        assert!(!policy.allows("http://exact.io:8443"));
        assert!(!policy.allows("null"));
        assert!(!policy.allows("https://evil.com"));
        let any = CorsPolicy::new(
            &CorsOptions {
                allow_origins: vec!["*".into()],
                ..Default::default()
            },
            "cors",
        )
        .expect("valid");
        assert!(any.allows("https://whatever.dev"));
    }

    #[tokio::test]
    async fn preflight_is_answered_locally() {
        let options = serde_json::json!({
            "allowOrigins": ["*.example.com"],
            "allowMethods": ["get", "patch"],
            "allowHeaders": ["x-token", "content-type"],
            "maxAge": "1m",
            "allowPrivateNetwork": true,
        });
        let (response, hits) = call(
            options,
            Method::OPTIONS,
            &[
                ("origin", "https://app.example.com"),
                ("access-control-request-method", "PATCH"),
                (REQUEST_PRIVATE_NETWORK, "true"),
            ],
        )
        .await;
        assert_eq!(hits, 0);
        assert_eq!(response.status(), StatusCode::NO_CONTENT);
        let headers = response.headers();
        assert_eq!(
            headers["access-control-allow-origin"],
            "https://app.example.com"
        );
        assert_eq!(headers["access-control-allow-methods"], "GET,PATCH");
        assert_eq!(
            headers["access-control-allow-headers"],
            "X-Token,Content-Type"
        );
        assert_eq!(headers["access-control-max-age"], "60");
        assert_eq!(headers["access-control-allow-credentials"], "true");
        assert_eq!(headers[ALLOW_PRIVATE_NETWORK], "true");
        assert!(
            headers["vary"]
                .to_str()
                .expect("text")
                .starts_with("Origin")
        );
    }

    #[tokio::test]
    async fn actual_requests_get_the_origin_and_vary() {
        let options = serde_json::json!({"allowOrigins": ["example.com"], "exposeHeaders": ["x-request-id"], "allowCredentials": false});
        let (response, hits) =
            call(options, Method::GET, &[("origin", "https://example.com")]).await;
        assert_eq!(hits, 1);
        assert_eq!(response.status(), StatusCode::OK);
        let headers = response.headers();
        assert_eq!(
            headers["access-control-allow-origin"],
            "https://example.com"
        );
        assert_eq!(headers["vary"], "Origin");
        assert_eq!(headers["access-control-expose-headers"], "X-Request-Id");
        assert!(!headers.contains_key("access-control-allow-credentials"));
    }

    #[tokio::test]
    async fn disallowed_origins_are_refused_and_others_pass_untouched() {
        let options = serde_json::json!({"allowOrigins": ["example.com"]});
        let denials = Arc::new(LocalDenials::default());
        let endpoint = Arc::new(EndpointInfo {
            path: "/x".into(),
            ..Default::default()
        });
        let ctx = BuildContext::new(endpoint).with_denials(denials.clone());
        let (response, hits) = call_counted(
            options.clone(),
            Method::GET,
            &[("origin", "https://evil.com")],
            &ctx,
        )
        .await;
        assert_eq!((response.status(), hits), (StatusCode::FORBIDDEN, 0));
        assert_eq!(
            Rejection::of(&response).map(|rejection| rejection.reason),
            Some(Reason::Forbidden)
        );
        assert_eq!(denials.get("cors", "/x", "origin_not_allowed"), 1);
        let (response, hits) = call(options.clone(), Method::GET, &[]).await;
        assert_eq!((response.status(), hits), (StatusCode::OK, 1));
        assert!(
            !response
                .headers()
                .contains_key("access-control-allow-origin")
        );
        let (response, hits) = call(
            options,
            Method::POST,
            &[
                ("origin", "http://gateway.local:8080"),
                ("host", "gateway.local:8080"),
            ],
        )
        .await;
        assert_eq!(
            (response.status(), hits),
            (StatusCode::OK, 1),
            "same origin is not cross-origin"
        );
    }

    #[test]
    fn declares_that_it_answers_preflights() {
        let middleware = factory(&entry(serde_json::Value::Null), &ctx()).expect("builds");
        assert!(middleware.capabilities().answers_preflight);
        assert!(!middleware.capabilities().access_log);
    }

    #[test]
    fn defaults_follow_kratos_and_typos_name_the_field() {
        let options: CorsOptions =
            decode(&entry(serde_json::json!({"allow_credentials": false}))).expect("ok");
        assert_eq!(options.allow_methods, ["GET", "POST", "PUT", "DELETE"]);
        assert_eq!(options.max_age, Duration::from_secs(600));
        assert!(!options.allow_credentials);
        let err = factory(&entry(serde_json::json!({"alowOrigins": ["a"]})), &ctx())
            .err()
            .expect("typo");
        assert!(
            err.to_string()
                .contains("middleware cors: options.alowOrigins: unknown field `alowOrigins`"),
            "{err}"
        );
        let err = factory(&entry(serde_json::json!({"maxAge": 5})), &ctx())
            .err()
            .expect("type");
        assert!(
            err.to_string().contains("options.maxAge: invalid type"),
            "{err}"
        );
        let err = factory(&entry(serde_json::json!({"allowOrigins": "a.com"})), &ctx())
            .err()
            .expect("type");
        assert!(
            err.to_string()
                .contains("options.allowOrigins: invalid type"),
            "{err}"
        );
    }
}

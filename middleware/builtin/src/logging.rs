//! `logging`: one structured access-log line per attempt, through `tracing` with target
//! `access` (Kratos' `logging` middleware).
//!
//! Fields: `host`, `method`, `path`, `query`, `endpoint` (the configured pattern),
//! `backend` (the node the attempt went to), `status`, `latency_ms` (until the response
//! head arrived), `attempt`, and `error` when the round trip failed without a response.
//! Credentials are never written: header values listed in `headers` and query values
//! whose names look like secrets (`*key*`, `*token*`, `*secret*`, `*pass*`, `*auth*`,
//! `*sig*`, `*session*`, `*cookie*`) are shown as `[redacted]`; `Authorization`,
//! `Proxy-Authorization`, `Cookie` and `Set-Cookie` likewise.
//!
//! The middleware declares [`Capabilities::access_log`], so the proxy skips its own
//! per-request access line on endpoints that use it.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use http::header::{self, HeaderName, HeaderValue};
use http::{Method, Request, Response, Uri};
use serde::Deserialize;
use tokio::time::Instant;
use tower::{Layer, Service};

use super::support::{decode, option_error};
use middleware::{
    BackendSlot, Body, BoxError, BuildContext, BuildError, Capabilities, EndpointInfo, Middleware,
    RequestOptions,
};

const REDACTED: &str = "[redacted]";

/// Options of `logging` (Kratos' message is empty; `headers` is ours).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct LoggingOptions {
    /// Request headers to include in the `headers` field (`name=value; ...`); values of
    /// credential headers are redacted. Default: none.
    pub headers: Vec<String>,
}

/// Whether a header or query parameter named `name` may carry a credential.
pub fn is_sensitive(name: &str) -> bool {
    [
        "key", "token", "secret", "pass", "auth", "sig", "session", "cookie",
    ]
    .iter()
    .any(|word| {
        name.as_bytes()
            .windows(word.len())
            .any(|part| part.eq_ignore_ascii_case(word.as_bytes()))
    })
}

/// The query string with the values of sensitive parameters replaced by `[redacted]`;
/// borrowed as it is when none has a value to hide.
pub fn redact_query(query: &str) -> Cow<'_, str> {
    let hides = |pair: &str| {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        if value.is_empty() {
            return false;
        }
        let decoded: Cow<'_, str> = if name.contains(['%', '+']) {
            form_urlencoded::parse(name.as_bytes())
                .map(|(name, _)| name)
                .collect::<String>()
                .into()
        } else {
            name.into()
        };
        is_sensitive(name) || is_sensitive(&decoded)
    };
    if !query.split('&').any(hides) {
        return Cow::Borrowed(query);
    }
    let mut out = String::with_capacity(query.len());
    for (index, pair) in query.split('&').enumerate() {
        if index > 0 {
            out.push('&');
        }
        if hides(pair) {
            let name = pair.split_once('=').map_or(pair, |(name, _)| name);
            let _ = write!(out, "{name}={REDACTED}");
        } else {
            out.push_str(pair);
        }
    }
    Cow::Owned(out)
}

/// The `logging` layer's settings.
#[derive(Debug, Clone)]
pub struct AccessLog {
    headers: Arc<[HeaderName]>,
}

impl AccessLog {
    /// Checks `options`; `name` is used in errors.
    pub fn new(options: &LoggingOptions, name: &str) -> Result<Self, BuildError> {
        let headers = options
            .headers
            .iter()
            .map(|header| {
                HeaderName::try_from(header.as_str()).map_err(|_| {
                    option_error(name, "headers", format!("invalid header name {header:?}"))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            headers: headers.into(),
        })
    }
}

/// What the line says about the request, taken before the request moves on. Nothing is
/// copied: the host, method and URI share the request's bytes, and the query is redacted
/// only when the line is written (and only copied when it holds a secret).
struct RequestFacts {
    host: Option<HeaderValue>,
    method: Method,
    uri: Uri,
    headers: String,
    endpoint: Option<Arc<EndpointInfo>>,
    attempt: u32,
    backend: Option<Arc<BackendSlot>>,
    start: Instant,
}

impl RequestFacts {
    fn new(log: &AccessLog, request: &Request<Body>) -> Self {
        let options = request.extensions().get::<RequestOptions>();
        let mut headers = String::new();
        for name in log.headers.iter() {
            for value in request.headers().get_all(name) {
                if !headers.is_empty() {
                    headers.push_str("; ");
                }
                let always_secret = matches!(
                    name.as_str(),
                    "authorization" | "proxy-authorization" | "cookie" | "set-cookie"
                );
                let value = if always_secret || is_sensitive(name.as_str()) {
                    REDACTED
                } else {
                    value.to_str().unwrap_or("[binary]")
                };
                let _ = write!(headers, "{name}={value}");
            }
        }
        Self {
            host: request.headers().get(header::HOST).cloned(),
            method: request.method().clone(),
            uri: request.uri().clone(),
            headers,
            endpoint: options.map(|options| options.endpoint.clone()),
            attempt: options.map_or(1, |options| options.attempt),
            backend: options.map(|options| options.backend.clone()),
            start: Instant::now(),
        }
    }

    fn emit(&self, outcome: Result<u16, &BoxError>) {
        let backend = self.backend.as_ref().and_then(|slot| slot.get());
        let backend = backend.as_ref().map_or("", |node| node.address.as_str());
        let latency_ms = self.start.elapsed().as_secs_f64() * 1000.0;
        let host = self
            .host
            .as_ref()
            .and_then(|value| value.to_str().ok())
            .or_else(|| self.uri.host())
            .unwrap_or("");
        let path = self.uri.path();
        let query = self.uri.query().map(redact_query).unwrap_or_default();
        let endpoint = self.endpoint.as_ref().map_or("", |info| info.path.as_str());
        match outcome {
            Ok(status) => tracing::info!(
                target: "access",
                host = %host,
                method = %self.method,
                path = %path,
                query = %query,
                endpoint = %endpoint,
                backend,
                status,
                latency_ms,
                attempt = self.attempt,
                headers = %self.headers,
            ),
            Err(error) => tracing::warn!(
                target: "access",
                host = %host,
                method = %self.method,
                path = %path,
                query = %query,
                endpoint = %endpoint,
                backend,
                latency_ms,
                attempt = self.attempt,
                headers = %self.headers,
                error = %error,
            ),
        }
    }
}

/// Layer of `logging`.
#[derive(Clone)]
pub struct LoggingLayer {
    log: AccessLog,
}

impl LoggingLayer {
    /// A layer writing access lines as `log` says.
    pub fn new(log: AccessLog) -> Self {
        Self { log }
    }
}

impl<S> Layer<S> for LoggingLayer {
    type Service = Logging<S>;

    fn layer(&self, inner: S) -> Logging<S> {
        Logging {
            log: self.log.clone(),
            inner,
        }
    }
}

/// The `logging` service.
#[derive(Clone)]
pub struct Logging<S> {
    log: AccessLog,
    inner: S,
}

impl<S> Service<Request<Body>> for Logging<S>
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
        let facts = RequestFacts::new(&self.log, &request);
        ResponseFuture {
            future: self.inner.call(request),
            facts: Some(facts),
        }
    }
}

pin_project_lite::pin_project! {
    /// Response future of [`Logging`]: writes the line when the response head (or the
    /// error) arrives.
    pub struct ResponseFuture<F> {
        #[pin]
        future: F,
        facts: Option<RequestFacts>,
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
        if let Some(facts) = this.facts.take() {
            facts.emit(result.as_ref().map(|response| response.status().as_u16()));
        }
        Poll::Ready(result)
    }
}

/// Builds `logging` from its config entry.
pub fn factory(
    config: &configs::Middleware,
    _ctx: &BuildContext,
) -> Result<Middleware, BuildError> {
    let options: LoggingOptions = decode(config)?;
    let log = AccessLog::new(&options, &config.name)?;
    let middleware = Middleware::from_layer(&config.name, LoggingLayer::new(log));
    Ok(middleware.with_capabilities(Capabilities {
        access_log: true,
        ..Default::default()
    }))
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::Mutex;

    use tower::ServiceExt;

    use super::*;
    use middleware::{EndpointInfo, RoundTripper, full_body};

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("lock").extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
        type Writer = Captured;
        fn make_writer(&'a self) -> Captured {
            self.clone()
        }
    }

    fn entry(options: serde_json::Value) -> configs::Middleware {
        configs::Middleware {
            name: "logging".into(),
            options,
            required: false,
        }
    }

    fn ctx() -> BuildContext {
        BuildContext::new(Default::default())
    }

    #[test]
    fn query_secrets_are_redacted() {
        assert_eq!(
            redact_query("a=1&api_key=abc&token=t&b"),
            "a=1&api_key=[redacted]&token=[redacted]&b"
        );
        assert_eq!(
            redact_query("X-Amz-Signature=s&page=2"),
            "X-Amz-Signature=[redacted]&page=2"
        );
        assert_eq!(redact_query("api%5Fkey=abc"), "api%5Fkey=[redacted]");
        assert_eq!(redact_query("API_KEY=abc"), "API_KEY=[redacted]");
        // Nothing to hide (no secret name, or a secret name without a value): not copied.
        assert!(matches!(
            redact_query("page=2&token="),
            Cow::Borrowed("page=2&token=")
        ));
    }

    #[tokio::test]
    async fn writes_one_line_per_attempt_without_secrets() {
        let captured = Captured::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(captured.clone())
            .with_ansi(false)
            .finish();
        let _guard = tracing::subscriber::set_default(subscriber);

        let options =
            serde_json::json!({"headers": ["authorization", "x-api-key", "user-agent", "cookie"]});
        let middleware = factory(&entry(options), &ctx()).expect("builds");
        assert!(middleware.capabilities().access_log);
        let node = Arc::new(selector::Node::new("10.0.0.9:8080"));
        let record = node.clone();
        let upstream = RoundTripper::new(tower::service_fn(move |request: Request<Body>| {
            if let Some(options) = request.extensions().get::<RequestOptions>() {
                options.backend.set(record.clone());
            }
            async { Ok::<_, BoxError>(Response::new(full_body("ok"))) }
        }));
        let endpoint = Arc::new(EndpointInfo {
            path: "/api/{name}".into(),
            ..Default::default()
        });
        let mut request = Request::builder()
            .method("POST")
            .uri("/api/alice?api_key=SECRET1&page=2")
            .header("host", "gw.example")
            .header("authorization", "Bearer SECRET2")
            .header("x-api-key", "SECRET3")
            .header("cookie", "session=SECRET4")
            .header("user-agent", "curl/8")
            .body(full_body(""))
            .expect("request");
        let mut options = RequestOptions::new(endpoint, None);
        options.attempt = 2;
        request.extensions_mut().insert(options);
        let response = middleware
            .wrap(upstream)
            .oneshot(request)
            .await
            .expect("response");
        assert_eq!(response.status(), 200);

        let output = String::from_utf8(captured.0.lock().expect("lock").clone()).expect("utf-8");
        let lines: Vec<_> = output
            .lines()
            .filter(|line| line.contains("access"))
            .collect();
        assert_eq!(lines.len(), 1, "{output}");
        let line = lines[0];
        for expected in [
            "host=gw.example",
            "method=POST",
            "path=/api/alice",
            "query=api_key=[redacted]&page=2",
            "endpoint=/api/{name}",
            "backend=\"10.0.0.9:8080\"",
            "status=200",
            "attempt=2",
            "user-agent=curl/8",
            "authorization=[redacted]",
            "x-api-key=[redacted]",
            "cookie=[redacted]",
        ] {
            assert!(line.contains(expected), "missing {expected} in {line}");
        }
        assert!(!line.contains("SECRET"), "{line}");
    }

    #[tokio::test]
    async fn logs_errors_and_rejects_typos() {
        let captured = Captured::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(captured.clone())
            .with_ansi(false)
            .finish();
        let _guard = tracing::subscriber::set_default(subscriber);
        let failing = RoundTripper::new(tower::service_fn(|_request: Request<Body>| async {
            Err::<Response<Body>, BoxError>("connect refused".into())
        }));
        let middleware = factory(&entry(serde_json::Value::Null), &ctx()).expect("builds");
        let result = middleware
            .wrap(failing)
            .oneshot(Request::new(full_body("")))
            .await;
        assert!(result.is_err());
        let output = String::from_utf8(captured.0.lock().expect("lock").clone()).expect("utf-8");
        assert!(
            output.contains("WARN") && output.contains("error=connect refused"),
            "{output}"
        );

        let err = factory(&entry(serde_json::json!({"header": ["a"]})), &ctx())
            .err()
            .expect("typo");
        assert!(
            err.to_string()
                .contains("middleware logging: options.header: unknown field `header`"),
            "{err}"
        );
    }
}

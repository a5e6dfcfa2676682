//! `validation`: refuses requests that do not fit the endpoint before they reach the
//! upstream (fagongzi's VALIDATION filter, Apigee's request checks).
//!
//! Checks, in order: required headers and query parameters ([`Reason::BadRequest`], `400`,
//! naming the missing one), the content type of requests with a body
//! ([`Reason::UnsupportedMediaType`], `415`), the body size ([`Reason::PayloadTooLarge`],
//! `413`). The size is checked up front from `Content-Length` and again while the body
//! streams, so a chunked body without a length is cut off at the limit; if the upstream had
//! not answered yet, the client gets `413` instead of the upstream's error. Refusals count
//! in the proxy's `go_gateway_middleware_denied_total` with reason `invalid_request`,
//! `unsupported_media_type` or `body_too_large`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::header::{self, HeaderName};
use http::{Request, Response};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;
use serde::Deserialize;
use tower::{Layer, Service};

use super::support::{Denied, decode, lenient_u64, option_error};
use middleware::hooks::BodyTooLarge;
use middleware::{Body, BoxError, BuildContext, BuildError, Middleware, Reason, Rejection};

/// Options of `validation`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct ValidationOptions {
    /// Largest request body in bytes (`413` above it). Default: 0, no limit.
    #[serde(deserialize_with = "lenient_u64", alias = "max_body_bytes")]
    pub max_body_bytes: u64,
    /// Headers every request must carry (`400` naming the first one missing). Default: none.
    #[serde(alias = "required_headers")]
    pub required_headers: Vec<String>,
    /// Query parameters every request must carry (present with any value, even empty).
    /// Default: none.
    #[serde(alias = "required_query")]
    pub required_query: Vec<String>,
    /// Media types a request body may have, e.g. `application/json` or `text/*`
    /// (parameters such as `charset` are ignored; `415` otherwise). Requests without a body
    /// are not checked. Default: none (any type).
    #[serde(alias = "allowed_content_types")]
    pub allowed_content_types: Vec<String>,
}

/// Refusals counted by reason.
#[derive(Debug, Default)]
struct Refusals {
    invalid: Denied,
    media_type: Denied,
    too_large: Denied,
}

/// The checked rules of one `validation` instance.
#[derive(Debug)]
pub struct Rules {
    max_body_bytes: Option<u64>,
    required_headers: Vec<HeaderName>,
    required_query: Vec<String>,
    content_types: Vec<String>,
    refusals: Refusals,
}

impl Rules {
    /// Checks `options`; `name` is used in errors.
    pub fn new(options: &ValidationOptions, name: &str) -> Result<Self, BuildError> {
        let required_headers = options
            .required_headers
            .iter()
            .map(|header| {
                HeaderName::try_from(header.as_str()).map_err(|_| {
                    option_error(
                        name,
                        "requiredHeaders",
                        format!("invalid header name {header:?}"),
                    )
                })
            })
            .collect::<Result<_, _>>()?;
        let mut content_types = Vec::with_capacity(options.allowed_content_types.len());
        for media_type in &options.allowed_content_types {
            let media_type = media_type.trim().to_ascii_lowercase();
            if media_type
                .split_once('/')
                .is_none_or(|(kind, sub)| kind.is_empty() || sub.is_empty())
            {
                return Err(option_error(
                    name,
                    "allowedContentTypes",
                    format!("{media_type:?} is not type/subtype"),
                ));
            }
            content_types.push(media_type);
        }
        if options.required_query.iter().any(String::is_empty) {
            return Err(option_error(name, "requiredQuery", "empty parameter name"));
        }
        Ok(Self {
            max_body_bytes: (options.max_body_bytes > 0).then_some(options.max_body_bytes),
            required_headers,
            required_query: options.required_query.clone(),
            content_types,
            refusals: Refusals::default(),
        })
    }

    /// Counts refusals as middleware `name` on `ctx`'s endpoint.
    pub fn with_denials(mut self, ctx: &BuildContext, name: &str) -> Self {
        let counter = |reason| Denied::new(ctx.denial_counter(name, reason));
        self.refusals = Refusals {
            invalid: counter("invalid_request"),
            media_type: counter("unsupported_media_type"),
            too_large: counter("body_too_large"),
        };
        self
    }

    fn refuse(counter: &Denied, reason: Reason, message: String) -> Response<Body> {
        counter.inc();
        Rejection::new(reason, message).into_response()
    }

    fn too_large(&self, limit: u64) -> Response<Body> {
        Self::refuse(
            &self.refusals.too_large,
            Reason::PayloadTooLarge,
            format!("request body larger than {limit} bytes"),
        )
    }

    /// The refusal for `request`'s head, if it breaks a rule.
    pub fn check(&self, request: &Request<Body>) -> Option<Response<Body>> {
        let headers = request.headers();
        if let Some(missing) = self
            .required_headers
            .iter()
            .find(|name| !headers.contains_key(*name))
        {
            return Some(Self::refuse(
                &self.refusals.invalid,
                Reason::BadRequest,
                format!("missing header {missing}"),
            ));
        }
        if !self.required_query.is_empty() {
            let query = request.uri().query().unwrap_or("");
            let present: Vec<_> = form_urlencoded::parse(query.as_bytes())
                .map(|(name, _)| name)
                .collect();
            if let Some(missing) = self
                .required_query
                .iter()
                .find(|name| !present.iter().any(|p| p == *name))
            {
                return Some(Self::refuse(
                    &self.refusals.invalid,
                    Reason::BadRequest,
                    format!("missing query parameter {missing}"),
                ));
            }
        }
        let body = request.body();
        let has_body = !body.is_end_stream() && body.size_hint().exact() != Some(0);
        if has_body && !self.content_types.is_empty() {
            let media_type = headers
                .get(header::CONTENT_TYPE)
                .and_then(|value| value.to_str().ok())
                .map(|value| {
                    value
                        .split(';')
                        .next()
                        .unwrap_or("")
                        .trim()
                        .to_ascii_lowercase()
                })
                .unwrap_or_default();
            if !self
                .content_types
                .iter()
                .any(|allowed| media_type_matches(allowed, &media_type))
            {
                let shown = if media_type.is_empty() {
                    "(none)"
                } else {
                    media_type.as_str()
                };
                return Some(Self::refuse(
                    &self.refusals.media_type,
                    Reason::UnsupportedMediaType,
                    format!("unsupported content type {shown}"),
                ));
            }
        }
        if let Some(limit) = self.max_body_bytes {
            let declared = headers
                .get(header::CONTENT_LENGTH)
                .and_then(|value| value.to_str().ok())
                .and_then(|value| value.trim().parse::<u64>().ok());
            if declared.is_some_and(|length| length > limit) || body.size_hint().lower() > limit {
                return Some(self.too_large(limit));
            }
        }
        None
    }
}

fn media_type_matches(allowed: &str, actual: &str) -> bool {
    match allowed.strip_suffix("/*") {
        Some("*") => !actual.is_empty(),
        Some(kind) => actual
            .split_once('/')
            .is_some_and(|(actual_kind, _)| actual_kind == kind),
        None => allowed == actual,
    }
}

pin_project_lite::pin_project! {
    /// A request body that fails once more than `limit` bytes went through.
    struct CappedBody {
        #[pin]
        inner: Body,
        seen: u64,
        limit: u64,
        exceeded: Arc<AtomicBool>,
    }
}

impl HttpBody for CappedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        if let Some(Ok(frame)) = &frame {
            if let Some(data) = frame.data_ref() {
                *this.seen += data.len() as u64;
                if *this.seen > *this.limit {
                    this.exceeded.store(true, Ordering::Release);
                    return Poll::Ready(Some(Err(BodyTooLarge { limit: *this.limit }.into())));
                }
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Layer of `validation`.
#[derive(Clone)]
pub struct ValidationLayer {
    rules: Arc<Rules>,
}

impl ValidationLayer {
    /// A layer enforcing `rules`.
    pub fn new(rules: Rules) -> Self {
        Self {
            rules: Arc::new(rules),
        }
    }
}

impl<S> Layer<S> for ValidationLayer {
    type Service = Validation<S>;

    fn layer(&self, inner: S) -> Validation<S> {
        Validation {
            rules: self.rules.clone(),
            inner,
        }
    }
}

/// The `validation` service.
#[derive(Clone)]
pub struct Validation<S> {
    rules: Arc<Rules>,
    inner: S,
}

impl<S> Service<Request<Body>> for Validation<S>
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
        if let Some(refusal) = self.rules.check(&request) {
            return ResponseFuture {
                state: State::Refused {
                    response: Some(refusal),
                },
            };
        }
        let Some(limit) = self.rules.max_body_bytes else {
            return ResponseFuture {
                state: State::Passed {
                    future: self.inner.call(request),
                    cap: None,
                },
            };
        };
        let exceeded = Arc::new(AtomicBool::new(false));
        let flag = exceeded.clone();
        let request = request.map(|inner| {
            CappedBody {
                inner,
                seen: 0,
                limit,
                exceeded: flag,
            }
            .boxed_unsync()
        });
        ResponseFuture {
            state: State::Passed {
                future: self.inner.call(request),
                cap: Some((exceeded, self.rules.clone(), limit)),
            },
        }
    }
}

pin_project_lite::pin_project! {
    /// Response future of [`Validation`].
    pub struct ResponseFuture<F> {
        #[pin]
        state: State<F>,
    }
}

pin_project_lite::pin_project! {
    #[project = StateProj]
    enum State<F> {
        Refused { response: Option<Response<Body>> },
        Passed { #[pin] future: F, cap: Option<(Arc<AtomicBool>, Arc<Rules>, u64)> },
    }
}

impl<F> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<Body>, BoxError>>,
{
    type Output = Result<Response<Body>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Refused { response } => Poll::Ready(
                response
                    .take()
                    .ok_or_else(|| "validation future polled after completion".into()),
            ),
            StateProj::Passed { future, cap } => match ready!(future.poll(cx)) {
                Err(error) => match cap.take() {
                    Some((exceeded, rules, limit)) if exceeded.load(Ordering::Acquire) => {
                        Poll::Ready(Ok(rules.too_large(limit)))
                    }
                    _ => Poll::Ready(Err(error)),
                },
                ok => Poll::Ready(ok),
            },
        }
    }
}

/// Builds `validation` from its config entry.
pub fn factory(config: &configs::Middleware, ctx: &BuildContext) -> Result<Middleware, BuildError> {
    let options: ValidationOptions = decode(config)?;
    let rules = Rules::new(&options, &config.name)?.with_denials(ctx, &config.name);
    Ok(Middleware::from_layer(
        &config.name,
        ValidationLayer::new(rules),
    ))
}

#[cfg(test)]
mod tests {
    use futures_util::StreamExt;
    use http_body_util::StreamBody;
    use tower::ServiceExt;

    use super::*;
    use middleware::denials::LocalDenials;
    use middleware::{EndpointInfo, RoundTripper, full_body};

    fn entry(options: serde_json::Value) -> configs::Middleware {
        configs::Middleware {
            name: "validation".into(),
            options,
            required: false,
        }
    }

    fn ctx() -> BuildContext {
        BuildContext::new(Default::default())
    }

    /// Reads the whole request body, as an upstream would, then answers 200.
    fn reading_upstream() -> RoundTripper {
        RoundTripper::new(tower::service_fn(|request: Request<Body>| async move {
            let body = request.into_body().collect().await?.to_bytes();
            Ok::<_, BoxError>(Response::new(full_body(body)))
        }))
    }

    /// The status and the body, or for a refusal `"{reason:?}: {message}"`.
    async fn call(options: serde_json::Value, request: Request<Body>) -> (u16, String) {
        call_in(&ctx(), options, request).await
    }

    async fn call_in(
        ctx: &BuildContext,
        options: serde_json::Value,
        request: Request<Body>,
    ) -> (u16, String) {
        let service = factory(&entry(options), ctx)
            .expect("builds")
            .wrap(reading_upstream());
        let response = service.oneshot(request).await.expect("response");
        let status = response.status().as_u16();
        let refusal = Rejection::of(&response)
            .map(|rejection| format!("{:?}: {}", rejection.reason, rejection.message));
        let body = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        match refusal {
            Some(refusal) => {
                assert!(body.is_empty(), "a refusal's body is rendered by the proxy");
                (status, refusal)
            }
            None => (status, String::from_utf8_lossy(&body).into_owned()),
        }
    }

    fn request(uri: &str, headers: &[(&str, &str)], body: Body) -> Request<Body> {
        let mut builder = Request::post(uri);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(body).expect("request")
    }

    #[tokio::test]
    async fn required_headers_and_query() {
        let options =
            serde_json::json!({"requiredHeaders": ["x-request-id"], "requiredQuery": ["page"]});
        let (status, body) = call(options.clone(), request("/?page=1", &[], full_body(""))).await;
        assert_eq!(
            (status, body.as_str()),
            (400, "BadRequest: missing header x-request-id")
        );
        let (status, body) = call(
            options.clone(),
            request("/?pag=1", &[("x-request-id", "1")], full_body("")),
        )
        .await;
        assert_eq!(
            (status, body.as_str()),
            (400, "BadRequest: missing query parameter page")
        );
        let (status, _) = call(
            options,
            request("/?a=b&page=", &[("x-request-id", "1")], full_body("")),
        )
        .await;
        assert_eq!(status, 200);
    }

    #[tokio::test]
    async fn content_types() {
        let options = serde_json::json!({"allowedContentTypes": ["application/json", "text/*"]});
        let json = [("content-type", "application/json; charset=utf-8")];
        assert_eq!(
            call(options.clone(), request("/", &json, full_body("{}")))
                .await
                .0,
            200
        );
        let text = [("content-type", "text/csv")];
        assert_eq!(
            call(options.clone(), request("/", &text, full_body("a,b")))
                .await
                .0,
            200
        );
        let xml = [("content-type", "application/xml")];
        let (status, body) = call(options.clone(), request("/", &xml, full_body("<a/>"))).await;
        assert_eq!(
            (status, body.as_str()),
            (
                415,
                "UnsupportedMediaType: unsupported content type application/xml"
            )
        );
        assert_eq!(
            call(options.clone(), request("/", &[], full_body("x")))
                .await
                .0,
            415
        );
        // No body, no check.
        assert_eq!(call(options, request("/", &[], full_body(""))).await.0, 200);
    }

    #[tokio::test]
    async fn body_size_up_front_and_while_streaming() {
        let options = serde_json::json!({"maxBodyBytes": 8});
        assert_eq!(
            call(options.clone(), request("/", &[], full_body("12345678")))
                .await
                .0,
            200
        );
        let (status, body) = call(options.clone(), request("/", &[], full_body("123456789"))).await;
        assert_eq!(
            (status, body.as_str()),
            (413, "PayloadTooLarge: request body larger than 8 bytes")
        );
        // A declared length is enough to refuse, before any byte is read.
        let declared = [("content-length", "1000")];
        assert_eq!(
            call(options.clone(), request("/", &declared, full_body("")))
                .await
                .0,
            413
        );
        // No length known: counted while streaming.
        let chunks = futures_util::stream::iter(["1234", "5678", "9"])
            .map(|chunk| Ok::<_, BoxError>(Frame::data(Bytes::from(chunk))));
        let streaming = StreamBody::new(chunks).boxed_unsync();
        assert_eq!(
            call(options.clone(), request("/", &[], streaming)).await.0,
            413
        );
        let chunks = futures_util::stream::iter(["1234", "5678"])
            .map(|chunk| Ok::<_, BoxError>(Frame::data(Bytes::from(chunk))));
        let (status, body) = call(
            options,
            request("/", &[], StreamBody::new(chunks).boxed_unsync()),
        )
        .await;
        assert_eq!((status, body.as_str()), (200, "12345678"));
    }

    #[tokio::test]
    async fn refusals_are_counted_by_reason() {
        let denials = Arc::new(LocalDenials::default());
        let endpoint = Arc::new(EndpointInfo {
            path: "/v".into(),
            ..Default::default()
        });
        let ctx = BuildContext::new(endpoint).with_denials(denials.clone());
        let options = serde_json::json!({
            "requiredHeaders": ["x-request-id"],
            "allowedContentTypes": ["application/json"],
            "maxBodyBytes": 4,
        });
        let id = ("x-request-id", "1");
        let json = ("content-type", "application/json");
        for (headers, body) in [
            (vec![], "{}"),
            (vec![id], "{}"),
            (vec![id, json], "{\"a\":1}"),
            (vec![id, json], "[]"),
        ] {
            call_in(
                &ctx,
                options.clone(),
                request("/", &headers, full_body(body)),
            )
            .await;
        }
        assert_eq!(denials.get("validation", "/v", "invalid_request"), 1);
        assert_eq!(denials.get("validation", "/v", "unsupported_media_type"), 1);
        assert_eq!(denials.get("validation", "/v", "body_too_large"), 1);
    }

    #[test]
    fn options_are_checked() {
        let err = factory(&entry(serde_json::json!({"maxBodySize": 1})), &ctx())
            .err()
            .expect("typo");
        assert!(
            err.to_string().contains(
                "middleware validation: options.maxBodySize: unknown field `maxBodySize`"
            ),
            "{err}"
        );
        let err = factory(&entry(serde_json::json!({"maxBodyBytes": "big"})), &ctx())
            .err()
            .expect("type");
        assert!(
            err.to_string()
                .contains("options.maxBodyBytes: invalid value"),
            "{err}"
        );
        let err = factory(
            &entry(serde_json::json!({"allowedContentTypes": ["json"]})),
            &ctx(),
        )
        .err()
        .expect("bad");
        assert!(
            err.to_string().contains("options.allowedContentTypes"),
            "{err}"
        );
    }
}

//! `transform`: rewrites request and response bodies, to show the streaming body hooks at
//! work (Apigee's per-chunk and accumulate plugins).
//!
//! - `mode: chunk` (default) rewrites each chunk as it streams with
//!   [`map_chunks`]: nothing is buffered and the client gets each transformed chunk as soon
//!   as the upstream sent it. Only length-preserving changes (`uppercase`) are allowed, so
//!   `Content-Length` stays valid.
//! - `mode: accumulate` reads the whole body first (at most `limit` bytes), then applies
//!   `uppercase` and the `replace` list and sends the result with its exact
//!   `Content-Length`. A request body over the limit is refused with
//!   [`Reason::PayloadTooLarge`] (`413`); a response body over the limit with
//!   [`Reason::BadUpstreamResponse`] (`502`). The response head waits for the whole
//!   upstream body.
//!
//! Bodies with a `Content-Encoding` other than `identity` are passed on untouched.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Request, Response};
use serde::Deserialize;
use tower::{Layer, Service};

use super::support::{decode, lenient_u64, option_error};
use middleware::hooks::{BodyTooLarge, body_with_trailers, collect_limited, map_chunks};
use middleware::{
    Body, BoxError, BuildContext, BuildError, Middleware, Reason, Rejection, RoundTripper,
};

/// Options of `transform`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TransformOptions {
    /// How request bodies are rewritten. Default: unset (untouched).
    pub request: Option<BodyTransform>,
    /// How response bodies are rewritten. Default: unset (untouched).
    pub response: Option<BodyTransform>,
}

/// When the body is transformed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Chunk by chunk as the body streams.
    #[default]
    Chunk,
    /// Once, after the whole body arrived.
    Accumulate,
}

/// One direction's transformation.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BodyTransform {
    /// Turn ASCII letters to upper case. Default: false.
    pub uppercase: bool,
    /// Text replacements applied in order, after `uppercase` (needs `mode: accumulate`,
    /// as a match may span chunks). Default: none.
    pub replace: Vec<Replace>,
    /// `chunk` or `accumulate`. Default: `chunk`.
    pub mode: Mode,
    /// Most bytes buffered in `accumulate` mode. Default: 1048576 (1 MiB).
    #[serde(deserialize_with = "lenient_u64")]
    pub limit: u64,
}

impl Default for BodyTransform {
    fn default() -> Self {
        Self {
            uppercase: false,
            replace: Vec::new(),
            mode: Mode::Chunk,
            limit: 1024 * 1024,
        }
    }
}

/// One replacement: every occurrence of `from` becomes `to`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Replace {
    /// Text to find (not empty). Default: empty (an error).
    pub from: String,
    /// Text to put instead. Default: empty (deletes `from`).
    pub to: String,
}

impl BodyTransform {
    fn check(&self, name: &str, field: &str) -> Result<(), BuildError> {
        if !self.replace.is_empty() && self.mode != Mode::Accumulate {
            return Err(option_error(
                name,
                &format!("{field}.replace"),
                "needs mode: accumulate",
            ));
        }
        if let Some(index) = self
            .replace
            .iter()
            .position(|replace| replace.from.is_empty())
        {
            return Err(option_error(
                name,
                &format!("{field}.replace[{index}].from"),
                "must not be empty",
            ));
        }
        if self.mode == Mode::Accumulate && self.limit == 0 {
            return Err(option_error(
                name,
                &format!("{field}.limit"),
                "must be greater than 0",
            ));
        }
        Ok(())
    }

    /// Applies `uppercase` then the replacements to `bytes`.
    pub fn apply(&self, bytes: Bytes) -> Bytes {
        let mut bytes = if self.uppercase {
            Bytes::from(bytes.to_ascii_uppercase())
        } else {
            bytes
        };
        for replace in &self.replace {
            bytes = replace_all(&bytes, replace.from.as_bytes(), replace.to.as_bytes());
        }
        bytes
    }

    fn is_noop(&self) -> bool {
        !self.uppercase && self.replace.is_empty()
    }
}

fn replace_all(haystack: &Bytes, from: &[u8], to: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(haystack.len());
    let mut rest = &haystack[..];
    let mut replaced = false;
    while let Some(at) = rest.windows(from.len()).position(|window| window == from) {
        out.extend_from_slice(&rest[..at]);
        out.extend_from_slice(to);
        rest = &rest[at + from.len()..];
        replaced = true;
    }
    if !replaced {
        return haystack.clone();
    }
    out.extend_from_slice(rest);
    Bytes::from(out)
}

fn encoded(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_ENCODING)
        .is_some_and(|value| !value.as_bytes().eq_ignore_ascii_case(b"identity"))
}

/// Why a body could not be transformed.
enum Failure {
    TooLarge(u64),
    Body(BoxError),
}

/// Transforms `body` per `spec`; `headers` get the new length in accumulate mode.
async fn transform_body(
    spec: &Arc<BodyTransform>,
    headers: &mut HeaderMap,
    body: Body,
) -> Result<Body, Failure> {
    if spec.is_noop() || encoded(headers) {
        return Ok(body);
    }
    match spec.mode {
        Mode::Chunk => {
            let spec = spec.clone();
            Ok(map_chunks(body, move |chunk| spec.apply(chunk)))
        }
        Mode::Accumulate => {
            let (data, trailers) = collect_limited(body, spec.limit).await.map_err(|error| {
                match error.downcast_ref::<BodyTooLarge>() {
                    Some(too_large) => Failure::TooLarge(too_large.limit),
                    None => Failure::Body(error),
                }
            })?;
            let data = spec.apply(data);
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(data.len()));
            Ok(body_with_trailers(data, trailers))
        }
    }
}

/// The two directions of one `transform` instance.
#[derive(Debug, Clone, Default)]
pub struct TransformSpec {
    request: Option<Arc<BodyTransform>>,
    response: Option<Arc<BodyTransform>>,
}

impl TransformSpec {
    /// Checks `options`; `name` is used in errors.
    pub fn new(options: &TransformOptions, name: &str) -> Result<Self, BuildError> {
        if let Some(request) = &options.request {
            request.check(name, "request")?;
        }
        if let Some(response) = &options.response {
            response.check(name, "response")?;
        }
        Ok(Self {
            request: options.request.clone().map(Arc::new),
            response: options.response.clone().map(Arc::new),
        })
    }
}

/// Layer of `transform`.
#[derive(Clone)]
pub struct TransformLayer {
    spec: TransformSpec,
}

impl TransformLayer {
    /// A layer applying `spec`.
    pub fn new(spec: TransformSpec) -> Self {
        Self { spec }
    }
}

impl<S> Layer<S> for TransformLayer
where
    S: Service<Request<Body>, Response = Response<Body>, Error = BoxError>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    type Service = Transform;

    fn layer(&self, inner: S) -> Transform {
        Transform {
            spec: self.spec.clone(),
            inner: RoundTripper::new(inner),
        }
    }
}

/// The `transform` service. The next service is boxed: the response future is an `async`
/// block, and awaiting a boxed future there keeps it `Send` for any inner service.
#[derive(Clone)]
pub struct Transform {
    spec: TransformSpec,
    inner: RoundTripper,
}

/// Response future of [`Transform`] (boxed: accumulating awaits the body first).
pub type ResponseFuture = Pin<Box<dyn Future<Output = Result<Response<Body>, BoxError>> + Send>>;

impl Service<Request<Body>> for Transform {
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> ResponseFuture {
        // Call the instance that was polled ready; keep a fresh clone for the next request.
        let fresh = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, fresh);
        let spec = self.spec.clone();
        Box::pin(async move {
            let request = match &spec.request {
                None => request,
                Some(transform) => {
                    let (mut parts, body) = request.into_parts();
                    match transform_body(transform, &mut parts.headers, body).await {
                        Ok(body) => Request::from_parts(parts, body),
                        Err(Failure::TooLarge(limit)) => {
                            let message = format!("request body larger than {limit} bytes");
                            let rejection = Rejection::new(Reason::PayloadTooLarge, message);
                            return Ok(rejection.into_response());
                        }
                        Err(Failure::Body(error)) => return Err(error),
                    }
                }
            };
            let response = inner.call(request).await?;
            let Some(transform) = &spec.response else {
                return Ok(response);
            };
            let (mut parts, body) = response.into_parts();
            match transform_body(transform, &mut parts.headers, body).await {
                Ok(body) => Ok(Response::from_parts(parts, body)),
                Err(Failure::TooLarge(limit)) => {
                    let message = format!("upstream response larger than {limit} bytes");
                    let rejection = Rejection::new(Reason::BadUpstreamResponse, message);
                    Ok(rejection.into_response())
                }
                Err(Failure::Body(error)) => Err(error),
            }
        })
    }
}

/// Builds `transform` from its config entry.
pub fn factory(
    config: &configs::Middleware,
    _ctx: &BuildContext,
) -> Result<Middleware, BuildError> {
    let options: TransformOptions = decode(config)?;
    let spec = TransformSpec::new(&options, &config.name)?;
    Ok(Middleware::from_layer(
        &config.name,
        TransformLayer::new(spec),
    ))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures_util::StreamExt;
    use http_body::Frame;
    use http_body_util::{BodyExt, StreamBody};
    use tower::ServiceExt;

    use http::StatusCode;

    use super::*;
    use middleware::full_body;

    fn entry(options: serde_json::Value) -> configs::Middleware {
        configs::Middleware {
            name: "transform".into(),
            options,
            required: false,
        }
    }

    fn ctx() -> BuildContext {
        BuildContext::new(Default::default())
    }

    /// Echoes the request body and its content-length header back.
    fn echo() -> RoundTripper {
        RoundTripper::new(tower::service_fn(|request: Request<Body>| async move {
            let length = request.headers().get(header::CONTENT_LENGTH).cloned();
            let body = request.into_body().collect().await?.to_bytes();
            let mut response = Response::new(full_body(body));
            if let Some(length) = length {
                response.headers_mut().insert("x-seen-length", length);
            }
            Ok::<_, BoxError>(response)
        }))
    }

    #[test]
    fn replace_all_bytes() {
        assert_eq!(replace_all(&Bytes::from("a-b-c"), b"-", b"+="), "a+=b+=c");
        assert_eq!(replace_all(&Bytes::from("abc"), b"x", b"y"), "abc");
    }

    #[tokio::test]
    async fn accumulate_mode_replaces_and_sets_the_length() {
        let options = serde_json::json!({
            "request": {"mode": "accumulate", "replace": [{"from": "cat", "to": "tiger"}]},
            "response": {"mode": "accumulate", "uppercase": true},
        });
        let service = factory(&entry(options), &ctx())
            .expect("builds")
            .wrap(echo());
        let request = Request::post("/")
            .header("content-length", "11")
            .body(full_body("a cat, a cat"))
            .expect("request");
        let response = service.oneshot(request).await.expect("response");
        assert_eq!(response.headers()["x-seen-length"], "16");
        assert_eq!(response.headers()["content-length"], "16");
        let body = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        assert_eq!(body, "A TIGER, A TIGER");
    }

    #[tokio::test]
    async fn limits_answer_413_and_502() {
        let options =
            serde_json::json!({"request": {"mode": "accumulate", "uppercase": true, "limit": 4}});
        let service = factory(&entry(options), &ctx())
            .expect("builds")
            .wrap(echo());
        let response = service
            .oneshot(Request::new(full_body("12345")))
            .await
            .expect("response");
        assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(
            Rejection::of(&response).map(|rejection| rejection.reason),
            Some(Reason::PayloadTooLarge)
        );
        let options =
            serde_json::json!({"response": {"mode": "accumulate", "uppercase": true, "limit": 4}});
        let service = factory(&entry(options), &ctx())
            .expect("builds")
            .wrap(echo());
        let response = service
            .oneshot(Request::new(full_body("12345")))
            .await
            .expect("response");
        assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(
            Rejection::of(&response).map(|rejection| rejection.reason),
            Some(Reason::BadUpstreamResponse)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn chunk_mode_streams_each_chunk() {
        let slow = RoundTripper::new(tower::service_fn(|_request: Request<Body>| async {
            let chunks =
                futures_util::stream::iter(["one ", "two ", "three"]).then(|chunk| async move {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    Ok::<_, BoxError>(Frame::data(Bytes::from(chunk)))
                });
            Ok::<_, BoxError>(Response::new(StreamBody::new(chunks).boxed_unsync()))
        }));
        let options = serde_json::json!({"response": {"uppercase": true}});
        let service = factory(&entry(options), &ctx()).expect("builds").wrap(slow);
        let start = tokio::time::Instant::now();
        let mut body = service
            .oneshot(Request::new(full_body("")))
            .await
            .expect("response")
            .into_body();
        let first = body
            .frame()
            .await
            .expect("frame")
            .expect("ok")
            .into_data()
            .expect("data");
        assert_eq!(
            (first, start.elapsed()),
            (Bytes::from("ONE "), Duration::from_secs(1))
        );
        let rest = body.collect().await.expect("rest").to_bytes();
        assert_eq!(rest, "TWO THREE");
    }

    #[tokio::test]
    async fn encoded_bodies_pass_untouched() {
        let gzip = RoundTripper::new(tower::service_fn(|_request: Request<Body>| async {
            let mut response = Response::new(full_body("binary"));
            response
                .headers_mut()
                .insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
            Ok::<_, BoxError>(response)
        }));
        let options = serde_json::json!({"response": {"uppercase": true}});
        let service = factory(&entry(options), &ctx()).expect("builds").wrap(gzip);
        let body = service
            .oneshot(Request::new(full_body("")))
            .await
            .expect("response")
            .into_body();
        assert_eq!(body.collect().await.expect("body").to_bytes(), "binary");
    }

    #[test]
    fn options_are_checked() {
        let build = |options| {
            factory(&entry(options), &ctx())
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        let text = build(serde_json::json!({"response": {"replace": [{"from": "a", "to": "b"}]}}));
        assert!(
            text.contains("middleware transform: options.response.replace: needs mode: accumulate"),
            "{text}"
        );
        let text = build(serde_json::json!({"response": {"mode": "stream"}}));
        assert!(
            text.contains("options.response.mode: unknown variant `stream`"),
            "{text}"
        );
        let text = build(serde_json::json!({"request": {"uppercse": true}}));
        assert!(
            text.contains("options.request.uppercse: unknown field `uppercse`"),
            "{text}"
        );
        let text =
            build(serde_json::json!({"request": {"mode": "accumulate", "replace": [{"to": "x"}]}}));
        assert!(
            text.contains("options.request.replace[0].from: must not be empty"),
            "{text}"
        );
    }
}

//! `transcoder`: lets plain HTTP clients call a gRPC upstream, as Kratos' transcoder does.
//!
//! On a `protocol: GRPC` endpoint, a request whose `Content-Type` does not start with
//! `application/grpc` (say `application/json`) is read whole, framed as one gRPC message
//! (a 5-byte prefix: uncompressed flag, big-endian length) and sent as
//! `application/grpc+json` (`application/grpc+` and the type without `application/`),
//! with `te: trailers`; the client sends it over HTTP/2. The answer is read whole, its
//! trailers (`grpc-status`, `grpc-message`, custom ones) are folded into the response
//! headers and `Content-Type` is set back to the request's. Then:
//!
//! - `grpc-status: 0`: the body is the message's bytes (the JSON), with the upstream's
//!   HTTP status;
//! - any other code: HTTP 200 with the `google.rpc.Status` as protojson,
//!   `{"code":5,"message":"...","details":[...]}` (details: see the `status` module);
//! - no `grpc-status` at all (the upstream is not speaking gRPC, e.g. a bare 404 or 503),
//!   or one that cannot be read: the round trip fails, as in Kratos, and the proxy answers
//!   as it does for any upstream failure on a gRPC endpoint (`502`'s gRPC form).
//!
//! Requests that are already gRPC (`application/grpc`, `application/grpc+proto`,
//! `application/grpc-web`, ...) and every request on an HTTP endpoint pass untouched.
//!
//! Beyond Kratos, the buffering is bounded: a request body over `maxRequestBytes` is
//! refused with `413`, a response over `maxResponseBytes` (or not made of whole,
//! uncompressed gRPC messages) becomes a `502`. These two are written here as JSON
//! (`{"code":8|13,"message":"..."}`) rather than as a typed rejection: the proxy renders
//! rejections in the endpoint's dialect, which for a `protocol: GRPC` endpoint is a gRPC
//! status that a JSON client would read as an empty 200.

mod status;

#[cfg(test)]
mod tests;

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{BufMut, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use serde::Deserialize;
use tower::{Layer, Service};

use super::support::{Denied, decode, lenient_u64, option_error};
use middleware::hooks::{BodyTooLarge, collect_limited};
use middleware::{Body, BoxError, BuildContext, BuildError, Middleware, RoundTripper, full_body};

pub use status::StatusError;

/// The middleware's name in configs.
pub const NAME: &str = "transcoder";

/// gRPC's default largest message a client receives (grpc-go, grpc-java): 4 MiB.
const DEFAULT_LIMIT: u64 = 4 * 1024 * 1024;

/// The 5-byte prefix of a gRPC message.
const PREFIX: usize = 5;

/// Options of `transcoder` (Kratos' has none; these bound what it buffers).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct TranscoderOptions {
    /// Largest request body framed, in bytes; a larger one gets `413`. Default: 4194304
    /// (4 MiB, gRPC's default message limit).
    #[serde(deserialize_with = "lenient_u64", alias = "max_request_bytes")]
    pub max_request_bytes: u64,
    /// Largest upstream response read, in bytes (frames and all); a larger one becomes a
    /// `502`. Default: 4194304 (4 MiB).
    #[serde(deserialize_with = "lenient_u64", alias = "max_response_bytes")]
    pub max_response_bytes: u64,
}

impl Default for TranscoderOptions {
    fn default() -> Self {
        Self {
            max_request_bytes: DEFAULT_LIMIT,
            max_response_bytes: DEFAULT_LIMIT,
        }
    }
}

impl TranscoderOptions {
    fn check(&self, name: &str) -> Result<(), BuildError> {
        if self.max_request_bytes == 0 || self.max_request_bytes > u64::from(u32::MAX) {
            return Err(option_error(
                name,
                "maxRequestBytes",
                "must be between 1 and 4294967295 (a gRPC message's length is 32 bits)",
            ));
        }
        if self.max_response_bytes == 0 {
            return Err(option_error(
                name,
                "maxResponseBytes",
                "must be greater than 0",
            ));
        }
        Ok(())
    }
}

/// Builds `transcoder` from its config entry. On an endpoint that is not `protocol: GRPC`
/// it passes every request on untouched (Kratos checks the protocol per request; an
/// endpoint's protocol is fixed, so the check is made once here).
pub fn factory(config: &configs::Middleware, ctx: &BuildContext) -> Result<Middleware, BuildError> {
    let options: TranscoderOptions = decode(config)?;
    options.check(&config.name)?;
    if ctx.endpoint.protocol != configs::Protocol::Grpc {
        return Ok(Middleware::from_fn(&config.name, |next| next));
    }
    status::preload();
    let denied = Denied::new(ctx.denial_counter(&config.name, "body_too_large"));
    Ok(Middleware::from_layer(
        &config.name,
        TranscoderLayer::new(options, denied),
    ))
}

/// Layer of `transcoder`.
#[derive(Debug, Clone)]
pub struct TranscoderLayer {
    limits: Limits,
}

#[derive(Debug, Clone)]
struct Limits {
    request: u64,
    response: u64,
    denied: Denied,
}

impl TranscoderLayer {
    /// A layer with `options`; requests refused as too large are counted in `denied`.
    pub fn new(options: TranscoderOptions, denied: Denied) -> Self {
        Self {
            limits: Limits {
                request: options.max_request_bytes,
                response: options.max_response_bytes,
                denied,
            },
        }
    }
}

impl<S> Layer<S> for TranscoderLayer
where
    S: Service<Request<Body>, Response = Response<Body>, Error = BoxError>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    type Service = Transcoder;

    fn layer(&self, inner: S) -> Transcoder {
        Transcoder {
            limits: self.limits.clone(),
            inner: RoundTripper::new(inner),
        }
    }
}

/// The `transcoder` service. The next service is boxed: the response future is an `async`
/// block, and awaiting a boxed future there keeps it `Send` for any inner service.
#[derive(Clone)]
pub struct Transcoder {
    limits: Limits,
    inner: RoundTripper,
}

/// Response future of [`Transcoder`] (boxed: it awaits both bodies).
pub type ResponseFuture = Pin<Box<dyn Future<Output = Result<Response<Body>, BoxError>> + Send>>;

impl Service<Request<Body>> for Transcoder {
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
        let content_type = request.headers().get(header::CONTENT_TYPE).cloned();
        if content_type
            .as_ref()
            .is_some_and(|value| value.as_bytes().starts_with(b"application/grpc"))
        {
            return Box::pin(inner.call(request));
        }
        let limits = self.limits.clone();
        Box::pin(async move {
            let (mut parts, body) = request.into_parts();
            // A declared length over the limit is refused before anything is read.
            let declared_too_large = http_body::Body::size_hint(&body).lower() > limits.request;
            let collected = if declared_too_large {
                Err(BodyTooLarge {
                    limit: limits.request,
                }
                .into())
            } else {
                collect_limited(body, limits.request).await
            };
            let framed = match collected {
                Ok((data, _trailers)) => frame(&data),
                Err(error) if error.is::<BodyTooLarge>() => {
                    limits.denied.inc();
                    let message = format!("request body is larger than {} bytes", limits.request);
                    return Ok(json_failure(StatusCode::PAYLOAD_TOO_LARGE, 8, &message));
                }
                Err(error) => return Err(error),
            };
            let headers = &mut parts.headers;
            headers.insert(
                header::CONTENT_TYPE,
                grpc_content_type(content_type.as_ref()),
            );
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(framed.len()));
            headers.insert(header::TE, HeaderValue::from_static("trailers"));
            let response = inner
                .call(Request::from_parts(parts, full_body(framed)))
                .await?;
            let (mut parts, body) = response.into_parts();
            let (data, trailers) = match collect_limited(body, limits.response).await {
                Ok(collected) => collected,
                Err(error) if error.is::<BodyTooLarge>() => {
                    let message =
                        format!("upstream response is larger than {} bytes", limits.response);
                    return Ok(json_failure(StatusCode::BAD_GATEWAY, 13, &message));
                }
                Err(error) => return Err(error),
            };
            fold_trailers(&mut parts.headers, trailers);
            parts.headers.remove(header::CONTENT_LENGTH);
            match content_type {
                Some(value) => parts.headers.insert(header::CONTENT_TYPE, value),
                None => parts.headers.remove(header::CONTENT_TYPE),
            };
            if let Some(status) = status::from_headers(&parts.headers, parts.status.as_u16())? {
                parts.status = StatusCode::OK;
                let json = status::to_json(&status);
                return Ok(Response::from_parts(parts, full_body(json)));
            }
            match unframe(data) {
                Ok(message) => Ok(Response::from_parts(parts, full_body(message))),
                Err(malformed) => {
                    let message = format!("upstream sent a malformed gRPC response: {malformed}");
                    Ok(json_failure(StatusCode::BAD_GATEWAY, 13, &message))
                }
            }
        })
    }
}

/// The upstream's `Content-Type` for a request of `content_type`: `application/json` →
/// `application/grpc+json`, `application/x-protobuf` → `application/grpc+x-protobuf`;
/// parameters (`; charset=utf-8`) are dropped (a gRPC content type takes none), and no
/// content type at all is plain `application/grpc` (the server's default codec).
fn grpc_content_type(content_type: Option<&HeaderValue>) -> HeaderValue {
    let raw = content_type.map(HeaderValue::as_bytes).unwrap_or_default();
    let essence = raw.split(|&byte| byte == b';').next().unwrap_or_default();
    let essence = essence.trim_ascii();
    let subtype = essence.strip_prefix(b"application/").unwrap_or(essence);
    if subtype.is_empty() {
        return HeaderValue::from_static("application/grpc");
    }
    let mut value = b"application/grpc+".to_vec();
    value.extend_from_slice(subtype);
    HeaderValue::from_bytes(&value).unwrap_or(HeaderValue::from_static("application/grpc"))
}

/// `message` as one uncompressed gRPC message.
fn frame(message: &[u8]) -> Bytes {
    let mut framed = BytesMut::with_capacity(PREFIX + message.len());
    framed.put_u8(0);
    // The request limit keeps the length within 32 bits.
    framed.put_u32(u32::try_from(message.len()).unwrap_or(u32::MAX));
    framed.extend_from_slice(message);
    framed.freeze()
}

/// What is wrong with a response body that should hold gRPC messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
enum Malformed {
    #[error("a message is cut short")]
    Truncated,
    #[error("a message is compressed")]
    Compressed,
}

/// The messages of a gRPC response body, prefixes removed. A unary call has one; the
/// messages of a streaming one are concatenated. An empty body gives an empty body.
fn unframe(data: Bytes) -> Result<Bytes, Malformed> {
    let mut rest = data;
    let mut first: Option<Bytes> = None;
    let mut joined: Option<BytesMut> = None;
    while !rest.is_empty() {
        if rest.len() < PREFIX {
            return Err(Malformed::Truncated);
        }
        if rest[0] != 0 {
            return Err(Malformed::Compressed);
        }
        let length = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        if rest.len() - PREFIX < length {
            return Err(Malformed::Truncated);
        }
        let message = rest.slice(PREFIX..PREFIX + length);
        rest = rest.split_off(PREFIX + length);
        match (&mut joined, first.take()) {
            (Some(joined), _) => joined.extend_from_slice(&message),
            (None, Some(previous)) => {
                let mut buffer = BytesMut::from(previous.as_ref());
                buffer.extend_from_slice(&message);
                joined = Some(buffer);
            }
            (None, None) => first = Some(message),
        }
    }
    Ok(match joined {
        Some(joined) => joined.freeze(),
        None => first.unwrap_or_default(),
    })
}

/// Moves `trailers` into `headers`; a trailer replaces a header of the same name.
fn fold_trailers(headers: &mut HeaderMap, trailers: Option<HeaderMap>) {
    let Some(trailers) = trailers else { return };
    let mut current: Option<HeaderName> = None;
    for (name, value) in trailers {
        if let Some(name) = name {
            headers.remove(&name);
            current = Some(name);
        }
        if let Some(name) = &current {
            headers.append(name.clone(), value);
        }
    }
}

/// A failure of the transcoding itself, written for the JSON client as Kratos writes a
/// gRPC error: a `google.rpc.Status` body, here with the HTTP status that says which side
/// failed.
fn json_failure(http_status: StatusCode, code: i32, message: &str) -> Response<Body> {
    let status = tonic_types::Status {
        code,
        message: message.to_owned(),
        details: Vec::new(),
    };
    let mut response = Response::new(full_body(status::to_json(&status)));
    *response.status_mut() = http_status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

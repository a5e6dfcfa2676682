//! The one place where failures and rejections become what the client sees.
//!
//! Every [`ProxyError`] and every [`Rejection`] a middleware returned is rendered here, as
//! a plain-text HTTP status for HTTP endpoints, or for `protocol: GRPC` endpoints as a
//! gRPC status: HTTP 200, `content-type: application/grpc`, `grpc-status` and
//! `grpc-message` in a trailers-only response, so gRPC clients read the code the gateway
//! chose instead of guessing one from an HTTP status.

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Response, StatusCode, header::CONTENT_TYPE};
use middleware::{Body, Reason, Rejection};

use crate::error::ProxyError;

/// gRPC status codes the gateway answers with.
mod grpc {
    pub(super) const CANCELLED: u8 = 1;
    pub(super) const UNKNOWN: u8 = 2;
    pub(super) const INVALID_ARGUMENT: u8 = 3;
    pub(super) const DEADLINE_EXCEEDED: u8 = 4;
    pub(super) const PERMISSION_DENIED: u8 = 7;
    pub(super) const RESOURCE_EXHAUSTED: u8 = 8;
    pub(super) const UNIMPLEMENTED: u8 = 12;
    pub(super) const INTERNAL: u8 = 13;
    pub(super) const UNAVAILABLE: u8 = 14;
    pub(super) const UNAUTHENTICATED: u8 = 16;
}

/// How the client expects failures to be spoken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// A status line and a short text body.
    Http,
    /// A gRPC status in a trailers-only response.
    Grpc,
}

impl From<configs::Protocol> for Dialect {
    fn from(protocol: configs::Protocol) -> Self {
        match protocol {
            configs::Protocol::Grpc => Dialect::Grpc,
            configs::Protocol::Http => Dialect::Http,
        }
    }
}

impl Dialect {
    /// The dialect of a request no endpoint matched: gRPC when it says it is gRPC.
    pub fn of_request<B>(request: &http::Request<B>) -> Self {
        let grpc = request
            .headers()
            .get(CONTENT_TYPE)
            .is_some_and(|value| value.as_bytes().starts_with(b"application/grpc"));
        if grpc { Dialect::Grpc } else { Dialect::Http }
    }
}

/// The response for a request that failed with `err`.
pub fn error_response(err: &ProxyError, dialect: Dialect) -> Response<Body> {
    let (status, code, message): (StatusCode, u8, &str) = match err {
        ProxyError::ClientGone(_) => (client_closed(), grpc::CANCELLED, "Client Closed Request"),
        ProxyError::BodyTimeout(_) => (
            StatusCode::REQUEST_TIMEOUT,
            grpc::DEADLINE_EXCEEDED,
            "Request Timeout: the request body stopped arriving",
        ),
        ProxyError::NotFound => (StatusCode::NOT_FOUND, grpc::UNIMPLEMENTED, "page not found"),
        ProxyError::MethodNotAllowed => (
            StatusCode::METHOD_NOT_ALLOWED,
            grpc::UNIMPLEMENTED,
            "method not allowed",
        ),
        ProxyError::DotSegment => (
            StatusCode::BAD_REQUEST,
            grpc::INVALID_ARGUMENT,
            "bad request: dot segment in path",
        ),
        ProxyError::BadRequest(why) => {
            let message = format!("bad request: {why}");
            let (status, code) = (StatusCode::BAD_REQUEST, grpc::INVALID_ARGUMENT);
            return synthesize(status, code, &message, None, HeaderMap::new(), dialect);
        }
        ProxyError::Timeout => (
            StatusCode::GATEWAY_TIMEOUT,
            grpc::DEADLINE_EXCEEDED,
            "Gateway Timeout",
        ),
        ProxyError::NoNode => (
            StatusCode::SERVICE_UNAVAILABLE,
            grpc::UNAVAILABLE,
            "Service Unavailable",
        ),
        ProxyError::Connect(_) | ProxyError::Upstream(_) => {
            (StatusCode::BAD_GATEWAY, grpc::UNAVAILABLE, "Bad Gateway")
        }
        ProxyError::Panic => (StatusCode::BAD_GATEWAY, grpc::INTERNAL, "Bad Gateway"),
    };
    synthesize(status, code, message, None, HeaderMap::new(), dialect)
}

/// Renders `response` if a middleware refused the request with it; passes it on otherwise.
pub fn rendered(response: Response<Body>, dialect: Dialect) -> Response<Body> {
    if Rejection::of(&response).is_none() {
        return response;
    }
    let (mut parts, _empty) = response.into_parts();
    let Some(rejection) = parts.extensions.remove::<Rejection>() else {
        return Response::from_parts(parts, middleware::empty_body());
    };
    let code = match rejection.reason {
        Reason::RateLimited | Reason::PayloadTooLarge => grpc::RESOURCE_EXHAUSTED,
        Reason::Unauthenticated => grpc::UNAUTHENTICATED,
        Reason::Forbidden => grpc::PERMISSION_DENIED,
        Reason::BreakerOpen | Reason::Overloaded | Reason::Unavailable => grpc::UNAVAILABLE,
        Reason::BadRequest | Reason::UnsupportedMediaType => grpc::INVALID_ARGUMENT,
        Reason::BadUpstreamResponse => grpc::INTERNAL,
        _ => grpc::UNKNOWN,
    };
    // The status and headers as the outer middlewares left them (CORS headers, ...) stay.
    synthesize(
        parts.status,
        code,
        &rejection.message,
        rejection.body,
        parts.headers,
        dialect,
    )
}

fn synthesize(
    status: StatusCode,
    grpc_code: u8,
    message: &str,
    body: Option<Bytes>,
    mut headers: HeaderMap,
    dialect: Dialect,
) -> Response<Body> {
    headers.remove(http::header::CONTENT_LENGTH);
    let mut response = match dialect {
        Dialect::Grpc => {
            headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
            headers.insert("grpc-status", HeaderValue::from(u16::from(grpc_code)));
            if let Ok(value) = HeaderValue::from_str(&percent_encode(message)) {
                headers.insert("grpc-message", value);
            }
            Response::new(middleware::empty_body())
        }
        Dialect::Http => {
            let body = match body {
                Some(body) => body,
                None => {
                    headers.insert(
                        CONTENT_TYPE,
                        HeaderValue::from_static("text/plain; charset=utf-8"),
                    );
                    Bytes::from(format!("{} {message}\n", status.as_u16()))
                }
            };
            let mut response = Response::new(middleware::full_body(body));
            *response.status_mut() = status;
            response
        }
    };
    *response.headers_mut() = headers;
    response
}

/// 499, nginx's "client closed request".
fn client_closed() -> StatusCode {
    StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST)
}

/// `grpc-message` is percent-encoded: bytes outside printable ASCII, and `%`.
fn percent_encode(message: &str) -> String {
    let mut encoded = String::with_capacity(message.len());
    for byte in message.bytes() {
        if (0x20..=0x7e).contains(&byte) && byte != b'%' {
            encoded.push(byte as char);
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    async fn text(response: Response<Body>) -> String {
        let bytes = response.into_body().collect().await.map(|b| b.to_bytes());
        String::from_utf8(bytes.unwrap_or_default().to_vec()).unwrap_or_default()
    }

    #[tokio::test]
    async fn rejections_render_as_http_text_or_grpc_status() {
        let rejection = || {
            Rejection::new(Reason::RateLimited, "rate limited")
                .with_header(http::header::RETRY_AFTER, HeaderValue::from_static("1"))
                .into_response()
        };
        let http = rendered(rejection(), Dialect::Http);
        assert_eq!(http.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(http.headers()["retry-after"], "1");
        assert_eq!(text(http).await, "429 rate limited\n");

        let grpc = rendered(rejection(), Dialect::Grpc);
        assert_eq!(grpc.status(), StatusCode::OK);
        assert_eq!(grpc.headers()["grpc-status"], "8");
        assert_eq!(grpc.headers()["grpc-message"], "rate limited");
        assert_eq!(grpc.headers()["content-type"], "application/grpc");
        assert_eq!(grpc.headers()["retry-after"], "1");
    }

    #[tokio::test]
    async fn configured_body_and_status_win_for_http() {
        let response = Rejection::new(Reason::BreakerOpen, "breaker open")
            .with_status(StatusCode::IM_A_TEAPOT)
            .with_body(Bytes::from_static(b"{\"fallback\":true}"))
            .into_response();
        let response = rendered(response, Dialect::Http);
        assert_eq!(response.status(), StatusCode::IM_A_TEAPOT);
        assert_eq!(text(response).await, "{\"fallback\":true}");
    }

    #[test]
    fn ordinary_responses_pass_untouched() {
        let mut response = Response::new(middleware::full_body("ok"));
        *response.status_mut() = StatusCode::TOO_MANY_REQUESTS;
        let response = rendered(response, Dialect::Grpc);
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert!(response.headers().get("grpc-status").is_none());
    }

    #[test]
    fn errors_say_their_side_and_grpc_code() {
        let response = error_response(&ProxyError::NoNode, Dialect::Grpc);
        assert_eq!(response.headers()["grpc-status"], "14");
        assert_eq!(ProxyError::NoNode.side(), crate::Side::Upstream);
        assert!(!ProxyError::NoNode.is_retryable());
        assert!(ProxyError::Timeout.is_retryable());
        assert_eq!(
            error_response(&ProxyError::NotFound, Dialect::Http).status(),
            StatusCode::NOT_FOUND
        );
    }

    #[test]
    fn grpc_messages_are_percent_encoded() {
        assert_eq!(percent_encode("50% off ü"), "50%25 off %C3%BC");
    }
}

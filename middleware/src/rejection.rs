//! Typed rejections: how a middleware stops a request without writing a response itself.
//!
//! A middleware that refuses a request returns [`Rejection::into_response`]: a response
//! with the rejection's HTTP status, any headers it adds (`Retry-After`,
//! `WWW-Authenticate`, ...) and an empty body, marked with the [`Rejection`] as an
//! extension. Outer middlewares see an ordinary response (a logger logs the 429, CORS adds
//! its headers); the proxy's edge then renders the marked response once, in one function:
//! plain text for HTTP endpoints, a gRPC status (`grpc-status`, `grpc-message`) for
//! `protocol: GRPC` endpoints.

use std::borrow::Cow;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode};

use crate::{Body, empty_body};

/// Why a request was refused. Each reason has an HTTP status and a gRPC code; the edge
/// picks the one the endpoint's protocol speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Reason {
    /// Too many requests (429, `RESOURCE_EXHAUSTED`).
    RateLimited,
    /// No or bad credentials (401, `UNAUTHENTICATED`).
    Unauthenticated,
    /// Credentials or peer not allowed (403, `PERMISSION_DENIED`).
    Forbidden,
    /// The circuit breaker is open (503, `UNAVAILABLE`).
    BreakerOpen,
    /// Load was shed to protect the upstream (503, `UNAVAILABLE`).
    Overloaded,
    /// A body larger than allowed (413, `RESOURCE_EXHAUSTED`).
    PayloadTooLarge,
    /// A request that breaks the endpoint's rules (400, `INVALID_ARGUMENT`).
    BadRequest,
    /// A request body of a media type the endpoint does not take (415, `INVALID_ARGUMENT`).
    UnsupportedMediaType,
    /// The upstream's answer could not be used (502, `INTERNAL`).
    BadUpstreamResponse,
    /// A service the middleware needs to decide did not answer in time, e.g. an OAuth
    /// introspection endpoint (503, `UNAVAILABLE`).
    Unavailable,
}

impl Reason {
    /// The HTTP status a client of an HTTP endpoint sees (unless the middleware overrides it).
    pub fn http_status(self) -> StatusCode {
        match self {
            Reason::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            Reason::Unauthenticated => StatusCode::UNAUTHORIZED,
            Reason::Forbidden => StatusCode::FORBIDDEN,
            Reason::BreakerOpen | Reason::Overloaded | Reason::Unavailable => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Reason::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Reason::BadRequest => StatusCode::BAD_REQUEST,
            Reason::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Reason::BadUpstreamResponse => StatusCode::BAD_GATEWAY,
        }
    }
}

/// A refused request: the reason, the words for the client, and what else it carries.
#[derive(Debug, Clone)]
pub struct Rejection {
    /// Why.
    pub reason: Reason,
    /// HTTP status; [`Reason::http_status`] unless the middleware was configured otherwise.
    pub status: StatusCode,
    /// A short explanation (the HTTP body's text, or `grpc-message`).
    pub message: Cow<'static, str>,
    /// An operator-configured HTTP body that replaces the default text (gRPC endpoints
    /// still get the status and `message`).
    pub body: Option<Bytes>,
    /// Headers for the client (`Retry-After`, `WWW-Authenticate`, ...).
    pub headers: HeaderMap,
}

impl Rejection {
    /// A rejection for `reason` with its default status.
    pub fn new(reason: Reason, message: impl Into<Cow<'static, str>>) -> Self {
        Self {
            reason,
            status: reason.http_status(),
            message: message.into(),
            body: None,
            headers: HeaderMap::new(),
        }
    }

    /// Answers HTTP clients with `status` instead of the reason's default.
    pub fn with_status(mut self, status: StatusCode) -> Self {
        self.status = status;
        self
    }

    /// Answers HTTP clients with `body` instead of the default text.
    pub fn with_body(mut self, body: Bytes) -> Self {
        self.body = Some(body);
        self
    }

    /// Adds a header for the client.
    pub fn with_header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.headers.append(name, value);
        self
    }

    /// The marked response that travels back through the outer middlewares to the edge.
    pub fn into_response(mut self) -> Response<Body> {
        let mut response = Response::new(empty_body());
        *response.status_mut() = self.status;
        *response.headers_mut() = std::mem::take(&mut self.headers);
        response.extensions_mut().insert(self);
        response
    }

    /// The rejection a response carries, if a middleware refused the request.
    pub fn of<B>(response: &Response<B>) -> Option<&Rejection> {
        response.extensions().get::<Rejection>()
    }
}

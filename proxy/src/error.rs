//! The one place where failure causes become downstream statuses.

use http::{HeaderValue, Response, StatusCode};
use middleware::{Body, BoxError};

/// Why a request could not be answered by an upstream response.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The downstream client went away while sending its request (499).
    #[error("client closed the request: {0}")]
    ClientGone(BoxError),
    /// The endpoint timeout or the last per-try timeout passed (504).
    #[error("upstream timed out")]
    Timeout,
    /// No node to send to (503).
    #[error("no node available")]
    NoNode,
    /// Connect failure, reset or other upstream failure (502).
    #[error("upstream failed: {0}")]
    Upstream(BoxError),
    /// A handler panicked (502); the process keeps serving.
    #[error("internal error while proxying")]
    Panic,
}

impl ProxyError {
    /// Classifies an error that came out of the middleware chain / client.
    pub fn from_round_trip(err: BoxError) -> Self {
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(err.as_ref());
        while let Some(current) = cause {
            if let Some(client_error) = current.downcast_ref::<client::Error>() {
                if matches!(client_error, client::Error::NoNode) {
                    return ProxyError::NoNode;
                }
                break;
            }
            if current.is::<tokio::time::error::Elapsed>() {
                return ProxyError::Timeout;
            }
            cause = current.source();
        }
        ProxyError::Upstream(err)
    }

    /// Classifies an error of a direct client call.
    pub fn from_client(err: client::Error) -> Self {
        match err {
            client::Error::NoNode => ProxyError::NoNode,
            other => ProxyError::Upstream(Box::new(other)),
        }
    }

    /// The HTTP status a downstream client sees.
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::ClientGone(_) => {
                StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST)
            }
            ProxyError::Timeout => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::NoNode => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Upstream(_) | ProxyError::Panic => StatusCode::BAD_GATEWAY,
        }
    }

    fn grpc_status(&self) -> &'static str {
        match self {
            ProxyError::ClientGone(_) => "1",                     // CANCELLED
            ProxyError::Timeout => "4",                           // DEADLINE_EXCEEDED
            ProxyError::NoNode | ProxyError::Upstream(_) => "14", // UNAVAILABLE
            ProxyError::Panic => "13",                            // INTERNAL
        }
    }
}

/// The response for `err`: a plain-text status for HTTP endpoints; for gRPC endpoints a
/// `200` with `grpc-status` / `grpc-message` headers, as gRPC clients expect.
pub fn error_response(err: &ProxyError, protocol: configs::Protocol) -> Response<Body> {
    let status = err.status();
    if protocol == configs::Protocol::Grpc {
        let mut response = Response::new(middleware::empty_body());
        let headers = response.headers_mut();
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        headers.insert("grpc-status", HeaderValue::from_static(err.grpc_status()));
        if let Ok(message) = HeaderValue::from_str(&status.to_string()) {
            headers.insert("grpc-message", message);
        }
        return response;
    }
    let mut response = Response::new(middleware::full_body(format!(
        "{} {}\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or("Client Closed Request")
    )));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

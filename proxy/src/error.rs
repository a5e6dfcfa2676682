//! Why a request could not be answered by an upstream, which side failed, and whether
//! another attempt may help. [`crate::render`] turns these into what the client sees.

use std::error::Error as _;

use middleware::BoxError;

use crate::server::BodyReadTimeout;

/// Which side of the proxy a failure came from (as pingora tells them apart).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The downstream client: it went away or sent something unusable.
    Downstream,
    /// The upstream node, or the lack of one.
    Upstream,
    /// The gateway itself.
    Internal,
}

/// A request that ended without an upstream response.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The downstream client went away while sending its request (499).
    #[error("client closed the request: {0}")]
    ClientGone(BoxError),
    /// The client paused its request body for longer than the read timeout (408); the
    /// upstream call was aborted.
    #[error("request body read timed out: {0}")]
    BodyTimeout(BoxError),
    /// No route for the path (404).
    #[error("no endpoint for this path")]
    NotFound,
    /// The path has endpoints, none for this method (405).
    #[error("method not allowed on this path")]
    MethodNotAllowed,
    /// The path has a `.` or `..` segment (400).
    #[error("dot segment in path")]
    DotSegment,
    /// The request is malformed (400): its `Host`, a percent-escape of its path, or the
    /// framing of its body. Nothing of it was forwarded, or what was is cut off.
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    /// The endpoint timeout or the last per-try timeout passed (504).
    #[error("upstream timed out")]
    Timeout,
    /// No node to send to (503).
    #[error("no node available")]
    NoNode,
    /// Connecting to a node failed: nothing was sent (502).
    #[error("upstream connect failed: {0}")]
    Connect(BoxError),
    /// The node reset or broke the exchange (502).
    #[error("upstream failed: {0}")]
    Upstream(BoxError),
    /// A handler panicked (502); the process keeps serving.
    #[error("internal error while proxying")]
    Panic,
}

impl ProxyError {
    /// Classifies an error of reading the downstream request body: the body read timeout
    /// ran out (408); a malformed body (a bad chunk size line, ...) is the client's fault
    /// (400); anything else means the client went away mid-body (499).
    pub fn from_request_body(err: BoxError) -> Self {
        if BodyReadTimeout::is_cause_of(err.as_ref()) {
            ProxyError::BodyTimeout(err)
        } else if is_malformed(err.as_ref()) {
            ProxyError::BadRequest("malformed request body")
        } else {
            ProxyError::ClientGone(err)
        }
    }

    /// Classifies an error that came out of the middleware chain / client.
    pub fn from_round_trip(err: BoxError) -> Self {
        if BodyReadTimeout::is_cause_of(err.as_ref()) {
            return ProxyError::BodyTimeout(err);
        }
        let err = match err.downcast::<client::Error>() {
            Ok(client_error) => return Self::from_client(*client_error),
            Err(err) => err,
        };
        match request_body_failure(err.as_ref()) {
            Some(true) => return ProxyError::BadRequest("malformed request body"),
            Some(false) => return ProxyError::ClientGone(err),
            None => {}
        }
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(err.as_ref());
        while let Some(current) = cause {
            if let Some(client_error) = current.downcast_ref::<client::Error>() {
                return match client_error {
                    client::Error::NoNode => ProxyError::NoNode,
                    client::Error::Connect { .. } => ProxyError::Connect(err),
                    _ => ProxyError::Upstream(err),
                };
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
        if BodyReadTimeout::is_cause_of(&err) {
            return ProxyError::BodyTimeout(Box::new(err));
        }
        match request_body_failure(&err) {
            Some(true) => return ProxyError::BadRequest("malformed request body"),
            Some(false) => return ProxyError::ClientGone(Box::new(err)),
            None => {}
        }
        match err {
            client::Error::NoNode => ProxyError::NoNode,
            err @ client::Error::Connect { .. } => ProxyError::Connect(Box::new(err)),
            other => ProxyError::Upstream(Box::new(other)),
        }
    }

    /// Which side failed.
    pub fn side(&self) -> Side {
        match self {
            ProxyError::ClientGone(_)
            | ProxyError::BodyTimeout(_)
            | ProxyError::NotFound
            | ProxyError::MethodNotAllowed
            | ProxyError::DotSegment
            | ProxyError::BadRequest(_) => Side::Downstream,
            ProxyError::Timeout
            | ProxyError::NoNode
            | ProxyError::Connect(_)
            | ProxyError::Upstream(_) => Side::Upstream,
            ProxyError::Panic => Side::Internal,
        }
    }

    /// Whether another attempt (on another node, if there is one) may succeed: upstream
    /// failures and timeouts are, a client that left or a missing node set are not.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            ProxyError::Timeout | ProxyError::Connect(_) | ProxyError::Upstream(_)
        )
    }
}

/// When the upstream exchange failed because reading the request body failed (hyper
/// reports that as a "user" error caused by the body): whether the body was malformed.
/// `None` when the failure was not the request body's.
fn request_body_failure(err: &(dyn std::error::Error + 'static)) -> Option<bool> {
    let mut cause = Some(err);
    while let Some(current) = cause {
        if let Some(hyper_error) = current.downcast_ref::<hyper::Error>()
            && hyper_error.is_user()
        {
            return hyper_error.source().map(is_malformed);
        }
        cause = current.source();
    }
    None
}

/// Whether a body error is a framing error of the message (hyper's decoder reports those
/// as `InvalidInput`/`InvalidData` I/O errors; a body cut short is `UnexpectedEof`).
fn is_malformed(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(err);
    while let Some(current) = cause {
        if let Some(io) = current.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                std::io::ErrorKind::InvalidInput | std::io::ErrorKind::InvalidData
            );
        }
        cause = current.source();
    }
    false
}

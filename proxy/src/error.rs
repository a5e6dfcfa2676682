//! Why a request could not be answered by an upstream, which side failed, and whether
//! another attempt may help. [`crate::render`] turns these into what the client sees.

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
    /// Classifies an error that came out of the middleware chain / client.
    pub fn from_round_trip(err: BoxError) -> Self {
        if BodyReadTimeout::is_cause_of(err.as_ref()) {
            return ProxyError::BodyTimeout(err);
        }
        let err = match err.downcast::<client::Error>() {
            Ok(client_error) => return Self::from_client(*client_error),
            Err(err) => err,
        };
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
        match err {
            client::Error::NoNode => ProxyError::NoNode,
            err @ client::Error::Connect { .. } => ProxyError::Connect(Box::new(err)),
            other => ProxyError::Upstream(Box::new(other)),
        }
    }

    /// Classifies a failure to read the downstream request body: the read timeout, or the
    /// client went away.
    pub fn from_downstream_body(err: BoxError) -> Self {
        if BodyReadTimeout::is_cause_of(err.as_ref()) {
            ProxyError::BodyTimeout(err)
        } else {
            ProxyError::ClientGone(err)
        }
    }

    /// Which side failed.
    pub fn side(&self) -> Side {
        match self {
            ProxyError::ClientGone(_)
            | ProxyError::BodyTimeout(_)
            | ProxyError::NotFound
            | ProxyError::MethodNotAllowed
            | ProxyError::DotSegment => Side::Downstream,
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

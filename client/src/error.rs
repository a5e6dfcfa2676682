//! Errors of the client layer; the proxy edge maps them to status codes.

/// A round trip failed before a response arrived.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The selector had no node to offer (the endpoint answers 503).
    #[error("no node available")]
    NoNode,
    /// Connecting to the node failed (502).
    #[error("connect to {address}: {source}")]
    Connect {
        /// The node's address.
        address: String,
        /// The cause.
        #[source]
        source: middleware::BoxError,
    },
    /// The node reset or broke the exchange (502).
    #[error("upstream {address}: {source}")]
    Upstream {
        /// The node's address.
        address: String,
        /// The cause.
        #[source]
        source: middleware::BoxError,
    },
    /// The node's response head is larger than the limit (502); it is dropped unread.
    #[error("upstream {address}: response head larger than {limit} bytes")]
    ResponseHeadTooLarge {
        /// The node's address.
        address: String,
        /// The limit, `ClientOptions::max_response_header_size`.
        limit: usize,
    },
    /// The node's address is not a valid `host:port`.
    #[error("node address {address:?} is not a valid host:port")]
    BadAddress {
        /// The node's address.
        address: String,
    },
    /// The request could not be addressed to the node.
    #[error("invalid upstream uri for {address}: {source}")]
    InvalidUri {
        /// The node's address.
        address: String,
        /// The cause.
        #[source]
        source: http::Error,
    },
}

/// An endpoint's client could not be built from its backends.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BuildError {
    /// A target is not `host:port`, `http(s)://host:port` or `discovery:///name`.
    #[error("backend {target:?}: {reason}")]
    BadTarget {
        /// The configured target.
        target: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A `discovery:///` target without `--discovery`.
    #[error("backend {target:?} needs a registry: start the gateway with --discovery")]
    NoDiscovery {
        /// The configured target.
        target: String,
    },
    /// TLS settings could not be used.
    #[error("tls {name:?}: {reason}")]
    Tls {
        /// The tlsStore entry (or "backend").
        name: String,
        /// What is wrong.
        reason: String,
    },
}

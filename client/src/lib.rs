//! The innermost RoundTripper: picks a node with the endpoint's selector and sends the
//! request over that node's connection pool (the own HTTP/1.1 exchange of `h1` for
//! requests without a body, hyper's `client::conn` for the rest and for HTTP/2).
//!
//! - [`Factory`] builds one [`Client`] per endpoint. Connection pools are shared by every
//!   client the factory builds (one for HTTP/1.1, one for h2c), so a config reload keeps
//!   warm upstream connections; a backend with its own TLS settings gets its own pool.
//! - [`NodeApplier`] turns an endpoint's backends into selector nodes: direct `host:port`
//!   targets at once, `discovery:///name` targets through the shared [`ServiceWatcher`].

mod applier;
mod body;
mod error;
mod factory;
mod h1;
mod pool;
mod tls;
mod watcher;

pub use applier::NodeApplier;
pub use body::DoneBody;
pub use error::{BuildError, Error};
pub use factory::{Client, ClientOptions, ClientSpec, DEFAULT_CONNECT_TIMEOUT, Factory};
pub use watcher::{ApplierInfo, ServiceWatcher, Subscription};

//! The innermost RoundTripper: picks a node with the endpoint's selector and sends the
//! request over a pooled hyper-util client.
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
mod pool;
mod tls;
mod watcher;

pub use applier::NodeApplier;
pub use body::DoneBody;
pub use error::{BuildError, Error};
pub use factory::{Client, ClientOptions, ClientSpec, DEFAULT_CONNECT_TIMEOUT, Factory};
pub use watcher::{ApplierInfo, ServiceWatcher, Subscription};

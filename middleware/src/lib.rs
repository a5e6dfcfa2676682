//! Middleware v2: a middleware turns the next [`RoundTripper`] into a new one.
//!
//! In Rust a RoundTripper is a cloneable tower [`Service`](tower::Service) from `Request<Body>` to
//! `Response<Body>`; a middleware is built by a [`Factory`] from the YAML entry
//! `{name, options, required}` and wraps it like a tower `Layer`. The first middleware
//! listed is the outermost, so requests pass in listed order and responses in reverse.
//! Embedders add their own with [`Registry::register`]; the built-ins live in the
//! `middleware-builtin` crate beside this one. A middleware refuses a request with a typed
//! [`Rejection`], which the proxy's edge renders as HTTP or gRPC.

mod body;
mod context;
mod registry;
mod rejection;

pub mod denials;
pub mod hooks;

pub use body::{Body, BoxError, empty_body, full_body};
pub use context::{BackendSlot, ClientCertificate, EndpointInfo, RequestOptions, RequestScope};
pub use registry::{
    BuildContext, BuildError, Capabilities, Factory, Middleware, Registry, options,
};
pub use rejection::{Reason, Rejection};

use http::{Request, Response};
use tower::util::BoxCloneSyncService;

/// The service every layer of the request path implements: one HTTP round trip.
pub type RoundTripper = BoxCloneSyncService<Request<Body>, Response<Body>, BoxError>;

//! The proxy as a library, without the command: a [`Proxy`] built from a registry, fed
//! configs parsed from YAML text.

use std::path::Path;
use std::sync::Arc;

use middleware::Registry;
use proxy::{Metrics, Proxy};

/// A proxy with default client options, no discovery, and the middlewares of `registry`.
pub fn proxy_with(registry: Registry) -> Proxy {
    Proxy::new(clients(), registry, Arc::new(Metrics::new()))
}

/// A proxy with every built-in middleware registered, as the gateway command has.
pub fn builtin_proxy() -> Proxy {
    let mut registry = Registry::new();
    middleware_builtin::register_all(&mut registry, clients());
    proxy_with(registry)
}

/// Parses `yaml` as a gateway config; panics if it is not one.
pub fn parse(yaml: &str) -> configs::Gateway {
    configs::parse(yaml, Path::new("inline.yaml")).expect("valid config")
}

fn clients() -> client::Factory {
    client::Factory::new(client::ClientOptions::default(), None)
}

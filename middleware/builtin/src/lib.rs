//! The built-in middlewares, registered by name.
//!
//! Every built-in has the same anatomy, in one module (or a folder of them):
//!
//! - module docs saying what it does, what it refuses and what it counts;
//! - the service `Foo<S>` wrapping the next RoundTripper, with its `ResponseFuture`, or a
//!   [`Filter`](middleware::hooks::Filter) when the request and response phases suffice;
//! - its layer, `FooLayer` (or [`FilterLayer`](middleware::hooks::FilterLayer));
//! - its options struct: serde, `deny_unknown_fields`, one doc comment per field stating
//!   its default;
//! - a `factory` that decodes the options from the config entry and builds the middleware;
//! - unit tests beside it.
//!
//! Options are checked when the config is applied; a wrong field fails the update with a
//! message naming the endpoint, the middleware and the field. A built-in that refuses a
//! request never writes the error response itself: it returns a typed
//! [`Rejection`](middleware::Rejection), which the proxy renders as HTTP or gRPC, and counts
//! it with the denial counter of its [`BuildContext`](middleware::BuildContext) (the proxy's
//! `go_gateway_middleware_denied_total`).

pub mod analytics;
pub mod auth;
pub mod bbr;
pub mod cache;
pub mod circuitbreaker;
pub mod cors;
pub mod ipfilter;
pub mod logging;
pub mod quota;
pub mod ratelimit;
pub mod redis_store;
pub mod rewrite;
pub mod spikearrest;
pub mod support;
pub mod tracing;
pub mod transcoder;
pub mod transform;
pub mod validation;

use middleware::Registry;

/// Registers every built-in middleware in `registry`; `clients` builds the upstream
/// clients built-ins need (a circuit breaker's `backupService`).
///
/// The Redis-backed middlewares (`ratelimit`, `quota` and `spikearrest` with `redis`) share
/// one connection per Redis among every endpoint this registry builds.
pub fn register_all(registry: &mut Registry, clients: client::Factory) {
    let stores = std::sync::Arc::new(redis_store::RedisStores::default());
    registry.register("logging", logging::factory);
    registry.register("cors", cors::factory);
    registry.register("rewrite", rewrite::factory);
    registry.register("ratelimit", ratelimit::factory(stores.clone()));
    registry.register("bbr", bbr::factory);
    registry.register("validation", validation::factory);
    registry.register("transform", transform::factory);
    registry.register("circuitbreaker", circuitbreaker::factory(clients.clone()));
    registry.register("ipfilter", ipfilter::factory);
    registry.register("auth", auth::factory(clients.clone()));
    registry.register("cache", cache::factory);
    registry.register(transcoder::NAME, transcoder::factory);
    registry.register("tracing", tracing::factory);
    registry.register("analytics", analytics::AnalyticsFactory::new(clients));
    registry.register("spikearrest", spikearrest::factory(stores.clone()));
    registry.register("quota", quota::factory(stores.clone()));
}

//! The built-in middlewares, registered by name.
//!
//! Each module holds one middleware: its options struct (serde, unknown fields rejected),
//! its tower layer, and a `factory` that builds it from the config entry. Options are
//! checked when the config is applied; a wrong field fails the update with a message
//! naming the endpoint, the middleware and the field.

pub mod auth;
pub mod bbr;
pub mod cache;
pub mod circuitbreaker;
pub mod cors;
pub mod ipfilter;
pub mod logging;
pub mod ratelimit;
pub mod rewrite;
pub mod support;
pub mod transform;
pub mod validation;

use crate::Registry;

/// Registers every built-in middleware in `registry`.
pub fn register_all(registry: &mut Registry) {
    registry.register("logging", logging::factory);
    registry.register("cors", cors::factory);
    registry.register("rewrite", rewrite::factory);
    registry.register("ratelimit", ratelimit::factory);
    registry.register("bbr", bbr::factory);
    registry.register("validation", validation::factory);
    registry.register("transform", transform::factory);
    registry.register("circuitbreaker", circuitbreaker::factory);
    registry.register("ipfilter", ipfilter::factory);
    registry.register("auth", auth::factory);
    registry.register("cache", cache::factory);
}

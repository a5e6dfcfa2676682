//! The built-in middlewares, registered by name.

use crate::Registry;

/// Registers every built-in middleware in `registry`.
pub fn register_all(registry: &mut Registry) {
    let _ = registry;
}

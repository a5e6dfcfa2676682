//! Gateway configs for the end-to-end tests, as YAML text.
//!
//! Endpoint keys beyond `path` and `backends` are passed as YAML lines indented by four
//! spaces (`"    timeout: 2s\n"`); middleware list items by six (see [`middleware`]).

/// One item of `endpoints:`: `path` proxied to `target`, plus the `extra` endpoint keys.
pub fn endpoint(path: &str, target: &str, extra: &str) -> String {
    format!("  - path: {path}\n    backends:\n      - target: {target}\n{extra}")
}

/// A gateway config named `test` serving `endpoints` (items made by [`endpoint`]).
pub fn gateway(endpoints: &[String]) -> String {
    format!("name: test\nendpoints:\n{}", endpoints.concat())
}

/// A gateway config with one endpoint, `path` proxied to `target` (see [`endpoint`]).
pub fn single(path: &str, target: &str, extra: &str) -> String {
    gateway(&[endpoint(path, target, extra)])
}

/// A gateway config with one endpoint (timeout 5 s) whose `middlewares:` list is `items`
/// (made by [`middleware`], or YAML list items indented by six spaces).
pub fn with_middlewares(path: &str, target: &str, items: &str) -> String {
    single(
        path,
        target,
        &format!("    timeout: 5s\n{}", middlewares(items)),
    )
}

/// The endpoint key `middlewares:` with the list `items` (for [`endpoint`]'s `extra`).
pub fn middlewares(items: &str) -> String {
    format!("    middlewares:\n{items}")
}

/// One `middlewares:` item: `name` with `options` in YAML flow style, e.g.
/// `middleware("ratelimit", "{key: global, max: 2, window: 1m}")`.
pub fn middleware(name: &str, options: &str) -> String {
    format!("      - name: {name}\n        options: {options}\n")
}

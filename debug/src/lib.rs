//! The `/debug` mux of the gateway (served with `--debug`): liveness, CPU profiles, and
//! views into the config loader, the router, the service watcher and the control service.
//!
//! This crate depends on none of the gateway's other crates. Components show themselves
//! through [`Debuggable`] (a list of [`View`]s and a `serve` for them); the config, router,
//! watcher and control-service views are ready-made [`Debuggable`]s over small data-source
//! traits ([`ConfigSource`], [`RouterSource`], [`WatcherSource`], [`CtrlSource`]) that the
//! binary implements over the real components.
//!
//! | path | answer |
//! |------|--------|
//! | `/debug` | HTML index linking every view |
//! | `/debug/ping` | 200 `pong` |
//! | `/debug/pprof/profile?seconds=N` | CPU profile, pprof protobuf (uncompressed; `go tool pprof` reads it) |
//! | `/debug/pprof/flamegraph?seconds=N` | CPU flame graph, SVG |
//! | `/debug/pprof/` (or `/debug/pprof`) | HTML index of the profile views |
//! | `/debug/pprof/heap` | heap profile, gzipped pprof protobuf, from the [`HeapProfiler`] the binary installs (501 without one) |
//! | `/debug/runtime` | tokio's stable runtime metrics: `{flavor, workers, alive_tasks, global_queue_depth, per_worker}` |
//! | `/debug/config/inspect` | `{path, sha256, version, loaded_at, reloads, last_error, source, base?, store?, store_revision?}` |
//! | `/debug/config/load` | the config in force |
//! | `/debug/config/version` | `{"version": ...}` |
//! | `/debug/proxy/router/inspect` | `[{path, method, host, protocol, backends}]` |
//! | `/debug/watcher/nodes?service=NAME` | `[{id, name, version, metadata, endpoints}]` |
//! | `/debug/watcher/appliers?service=NAME` | `[{endpoint, nodes}]` |
//! | `/debug/ctrl/inspect` | control-service status: `{ctrl_service, url, last_version, last_fetch, last_error, features, ...}` |
//! | `/debug/ctrl/load` | the last release payload `{config, version, priorityConfigs}` (404 before one) |
//!
//! The heap profile needs a profiling allocator, which this crate does not choose: the
//! binary hands a [`HeapProfiler`] (a plain function) to
//! [`DebugMux::with_heap_profiler`]; without one the view answers 501.
//!
//! Choices: profiles last `seconds` (default 30, 1 to 60, else 400) and only one runs per
//! process (409 for a second one). The watcher views without `service` answer a map of
//! every watched service to its list (both views alike); an unwatched service is 404.
//! Query strings are form-decoded and an empty value counts as absent. Requests from
//! non-loopback peers or carrying `X-Forwarded-For`, `Forwarded` or `X-Real-IP` get 403;
//! methods other than GET and HEAD get 405; unknown paths 404. Errors are
//! `{"error": ...}` JSON, and no answer is cacheable.

mod heap;
mod mux;
mod profile;
mod query;
mod response;
mod runtime;
mod views;

pub use heap::HeapProfiler;
pub use mux::{DebugMux, Debuggable, PREFIX, View};
pub use profile::{DEFAULT_SECONDS, MAX_SECONDS};
pub use query::Query;
pub use response::{DebugResponse, JSON};
pub use views::{
    Applier, ConfigOrigin, ConfigSource, ConfigStatus, ConfigViews, CtrlSource, CtrlViews,
    Instance, Route, RouterSource, RouterViews, WatcherSource, WatcherViews,
};

#[cfg(test)]
mod tests;

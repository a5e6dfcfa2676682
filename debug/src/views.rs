//! The config, router and watcher views, over small data-source traits that the binary
//! implements for the real components (this crate depends on none of them).

use std::collections::BTreeMap;
use std::sync::Arc;

use http::StatusCode;
use serde::Serialize;

use crate::mux::{Debuggable, View};
use crate::query::Query;
use crate::response::DebugResponse;

/// What the config loader knows, shown by `/debug/config/inspect`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ConfigStatus {
    /// The main config file.
    pub path: String,
    /// Hex sha256 of the config in force ("" before the first load).
    pub sha256: String,
    /// `version` of the config in force.
    pub version: String,
    /// When the config in force was loaded (RFC 3339), if it was.
    pub loaded_at: Option<String>,
    /// How many times a changed config was applied since start-up.
    pub reloads: u64,
    /// The last load or apply failure; the config in force stayed.
    pub last_error: Option<String>,
    /// Where the config in force came from: `store` when endpoints of the config store
    /// (`--store`) are merged in, else the source of `base` (`file`, `remote`, `ctrl`).
    pub source: String,
    /// The config the store endpoints are merged into (the whole config without a store):
    /// where it came from and its version.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub base: Option<ConfigOrigin>,
    /// The config store's DSN (no credentials), when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store: Option<String>,
    /// The store revision merged into the config in force ("" without a store).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub store_revision: String,
}

/// Where a config came from and its version, in `/debug/config/inspect` (`base`) and the
/// admin API's `GET /admin/v1/config`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ConfigOrigin {
    /// `file` (`--conf PATH`), `remote` (`--conf http(s)://...`) or `ctrl` (a release of
    /// the control service, `--ctrl-service`, written to `--conf`).
    pub source: String,
    /// The config file (`file`, `ctrl`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// The config URL (`remote`) or the control service that sent the release (`ctrl`),
    /// without credentials and query values.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// The gateway name the control service knows (`ctrl`: `--ctrl-name`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The `ETag` the server sent with the config in force, as sent (`remote`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
    /// `file`: the first 12 hex digits of the sha256 of what was loaded; `remote`: the
    /// `ETag` without quotes (else as `file`); `ctrl`: the release version.
    pub version: String,
}

/// The config source: the loader's status and the config in force.
pub trait ConfigSource: Send + Sync {
    /// The loader's status now.
    fn status(&self) -> ConfigStatus;
    /// The config in force, as JSON.
    fn config(&self) -> serde_json::Value;
}

/// `/debug/config/inspect`, `/debug/config/load` and `/debug/config/version`.
pub struct ConfigViews {
    source: Arc<dyn ConfigSource>,
}

impl ConfigViews {
    /// Views over `source`.
    pub fn new(source: Arc<dyn ConfigSource>) -> Self {
        ConfigViews { source }
    }
}

impl Debuggable for ConfigViews {
    fn views(&self) -> Vec<View> {
        vec![
            View {
                path: "/debug/config/inspect",
                description: "config loader status: {path, sha256, version, loaded_at, reloads, last_error}",
            },
            View {
                path: "/debug/config/load",
                description: "the config in force, as JSON",
            },
            View {
                path: "/debug/config/version",
                description: "{\"version\": ...} of the config in force",
            },
        ]
    }

    fn serve(&self, path: &str, _query: &Query) -> DebugResponse {
        match path {
            "/debug/config/inspect" => DebugResponse::ok(&self.source.status()),
            "/debug/config/load" => DebugResponse::ok(&self.source.config()),
            "/debug/config/version" => {
                DebugResponse::ok(&serde_json::json!({ "version": self.source.status().version }))
            }
            _ => not_found(path),
        }
    }
}

/// One route of the router in force, shown by `/debug/proxy/router/inspect`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Route {
    /// Path pattern as configured.
    pub path: String,
    /// Method ("" = any).
    pub method: String,
    /// Host ("" = any).
    pub host: String,
    /// `HTTP` or `GRPC`.
    pub protocol: String,
    /// Configured backend targets.
    pub backends: Vec<String>,
    /// The endpoint timeout in force, as a Go duration (`1s` when the config sets none).
    pub timeout: String,
    /// Header matchers (`{name, value | regex | present}`), when the endpoint has some.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<serde_json::Value>,
    /// Query matchers, when the endpoint has some.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub query: Vec<serde_json::Value>,
}

/// The router source: the routes of the router in force.
pub trait RouterSource: Send + Sync {
    /// Every route, in the order they were configured.
    fn routes(&self) -> Vec<Route>;
}

/// `/debug/proxy/router/inspect`.
pub struct RouterViews {
    source: Arc<dyn RouterSource>,
}

impl RouterViews {
    /// Views over `source`.
    pub fn new(source: Arc<dyn RouterSource>) -> Self {
        RouterViews { source }
    }
}

impl Debuggable for RouterViews {
    fn views(&self) -> Vec<View> {
        vec![View {
            path: "/debug/proxy/router/inspect",
            description: "routes in force: [{path, method, host, protocol, backends, timeout}]",
        }]
    }

    fn serve(&self, path: &str, _query: &Query) -> DebugResponse {
        match path {
            "/debug/proxy/router/inspect" => DebugResponse::ok(&self.source.routes()),
            _ => not_found(path),
        }
    }
}

/// One registered instance of a service, in the Kratos `ServiceInstance` shape.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Instance {
    /// Instance id.
    pub id: String,
    /// Service name.
    pub name: String,
    /// Version the instance reports.
    pub version: String,
    /// Free-form metadata.
    pub metadata: BTreeMap<String, String>,
    /// Endpoint URLs (`http://host:port?isSecure=false`, `grpc://host:port`).
    pub endpoints: Vec<String>,
}

/// An endpoint subscribed to a watched service, shown by `/debug/watcher/appliers`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Applier {
    /// The endpoint ("GET /helloworld/*").
    pub endpoint: String,
    /// How many of the service's nodes it holds.
    pub nodes: usize,
}

/// The service watcher: watched services, their instances and subscribed appliers.
pub trait WatcherSource: Send + Sync {
    /// Names of the watched services.
    fn services(&self) -> Vec<String>;
    /// The latest instances of `service`; None when it is not watched.
    fn instances(&self, service: &str) -> Option<Vec<Instance>>;
    /// The appliers subscribed to `service`; None when it is not watched.
    fn appliers(&self, service: &str) -> Option<Vec<Applier>>;
}

/// `/debug/watcher/nodes` and `/debug/watcher/appliers`.
///
/// With `?service=NAME` each answers a list for that service (404 when it is not
/// watched); without it, a map of every watched service to its list.
pub struct WatcherViews {
    source: Result<Arc<dyn WatcherSource>, String>,
}

impl WatcherViews {
    /// Views over `source`.
    pub fn new(source: Arc<dyn WatcherSource>) -> Self {
        WatcherViews { source: Ok(source) }
    }

    /// Views for a gateway without a watcher: listed on the index, but every request gets
    /// 404 with `{"error": reason}`.
    pub fn unavailable(reason: impl Into<String>) -> Self {
        WatcherViews {
            source: Err(reason.into()),
        }
    }

    /// The list for `?service=`, or the map of every watched service.
    fn per_service<T: Serialize>(
        source: &dyn WatcherSource,
        query: &Query,
        list: impl Fn(&str) -> Option<Vec<T>>,
    ) -> DebugResponse {
        match query.get("service") {
            Some(service) => match list(service) {
                Some(items) => DebugResponse::ok(&items),
                None => DebugResponse::error(
                    StatusCode::NOT_FOUND,
                    format!("service {service:?} is not watched"),
                ),
            },
            None => {
                let all: BTreeMap<String, Vec<T>> = source
                    .services()
                    .into_iter()
                    .filter_map(|service| list(&service).map(|items| (service, items)))
                    .collect();
                DebugResponse::ok(&all)
            }
        }
    }
}

impl Debuggable for WatcherViews {
    fn views(&self) -> Vec<View> {
        vec![
            View {
                path: "/debug/watcher/nodes",
                description: "instances of a watched service: ?service=NAME gives [{id, name, version, metadata, endpoints}]; without it, every service",
            },
            View {
                path: "/debug/watcher/appliers",
                description: "endpoints subscribed to a watched service: ?service=NAME gives [{endpoint, nodes}]; without it, every service",
            },
        ]
    }

    fn serve(&self, path: &str, query: &Query) -> DebugResponse {
        let source = match &self.source {
            Ok(source) => source.as_ref(),
            Err(reason) => return DebugResponse::error(StatusCode::NOT_FOUND, reason.clone()),
        };
        match path {
            "/debug/watcher/nodes" => {
                Self::per_service(source, query, |service| source.instances(service))
            }
            "/debug/watcher/appliers" => {
                Self::per_service(source, query, |service| source.appliers(service))
            }
            _ => not_found(path),
        }
    }
}

fn not_found(path: &str) -> DebugResponse {
    DebugResponse::error(StatusCode::NOT_FOUND, format!("no debug view at {path}"))
}

/// The control-service loader (`--ctrl-service`): its status and the last release.
pub trait CtrlSource: Send + Sync {
    /// `{ctrl_service, url, last_version, last_error, last_fetch, features, ...}`.
    fn status(&self) -> serde_json::Value;
    /// The last release payload as the control service sent it; None before the first.
    fn release(&self) -> Option<serde_json::Value>;
}

/// `/debug/ctrl/inspect` and `/debug/ctrl/load`.
pub struct CtrlViews {
    source: Result<Arc<dyn CtrlSource>, String>,
}

impl CtrlViews {
    /// Views over `source`.
    pub fn new(source: Arc<dyn CtrlSource>) -> Self {
        CtrlViews { source: Ok(source) }
    }

    /// Views for a gateway without a control service: listed on the index, but every
    /// request gets 404 with `{"error": reason}`.
    pub fn unavailable(reason: impl Into<String>) -> Self {
        CtrlViews {
            source: Err(reason.into()),
        }
    }
}

impl Debuggable for CtrlViews {
    fn views(&self) -> Vec<View> {
        vec![
            View {
                path: "/debug/ctrl/inspect",
                description: "control service: {ctrl_service, url, last_version, last_fetch, last_success, last_error, features, ...}",
            },
            View {
                path: "/debug/ctrl/load",
                description: "the last release from the control service: {config, version, priorityConfigs}",
            },
        ]
    }

    fn serve(&self, path: &str, _query: &Query) -> DebugResponse {
        let source = match &self.source {
            Ok(source) => source.as_ref(),
            Err(reason) => return DebugResponse::error(StatusCode::NOT_FOUND, reason.clone()),
        };
        match path {
            "/debug/ctrl/inspect" => DebugResponse::ok(&source.status()),
            "/debug/ctrl/load" => match source.release() {
                Some(release) => DebugResponse::ok(&release),
                None => DebugResponse::error(
                    StatusCode::NOT_FOUND,
                    "no release received from the control service yet",
                ),
            },
            _ => not_found(path),
        }
    }
}

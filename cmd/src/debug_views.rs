//! The `/debug` mux over the real components: the config loader and the config in force,
//! the proxy's routes, the service watcher (when `--discovery` is set) and the control
//! service (when `--ctrl-service` is set).

use std::sync::Arc;

use arc_swap::ArcSwap;
use debug::{
    Applier, ConfigSource, ConfigStatus, ConfigViews, CtrlSource, CtrlViews, DebugMux, Instance,
    Route, RouterSource, RouterViews, WatcherSource, WatcherViews,
};
use proxy::Proxy;
use serde_json::Value;

/// What `/debug/config/load` shows instead of a TLS private key.
const REDACTED: &str = "(redacted)";

/// Builds the mux with the config, router, watcher and control-service views, and the heap
/// profile when the binary hands over its allocator's dump.
pub(crate) fn mux(
    loader: configs::ConfigLoader,
    composer: Arc<crate::admin::Composer>,
    current: Arc<ArcSwap<configs::Gateway>>,
    proxy: Arc<Proxy>,
    watcher: Option<Arc<client::ServiceWatcher>>,
    ctrl: Option<configs_ctrl::CtrlLoader>,
    heap_profiler: Option<debug::HeapProfiler>,
) -> DebugMux {
    let mut mux = DebugMux::new();
    if let Some(dump) = heap_profiler {
        mux = mux.with_heap_profiler(dump);
    }
    mux.register(Arc::new(ConfigViews::new(Arc::new(LoaderSource {
        loader,
        composer,
        current,
    }))));
    mux.register(Arc::new(RouterViews::new(Arc::new(ProxySource(proxy)))));
    let watcher_views = match watcher {
        Some(watcher) => WatcherViews::new(Arc::new(WatcherAdapter(watcher))),
        None => WatcherViews::unavailable("no registry configured (--discovery)"),
    };
    mux.register(Arc::new(watcher_views));
    let ctrl_views = match ctrl {
        Some(ctrl) => CtrlViews::new(Arc::new(CtrlAdapter(ctrl))),
        None => CtrlViews::unavailable("no control service configured (--ctrl-service)"),
    };
    mux.register(Arc::new(ctrl_views));
    mux
}

/// The control-service loader's status and last release.
struct CtrlAdapter(configs_ctrl::CtrlLoader);

impl CtrlSource for CtrlAdapter {
    fn status(&self) -> Value {
        serde_json::to_value(self.0.status()).unwrap_or_else(
            |error| serde_json::json!({ "error": format!("cannot encode the status: {error}") }),
        )
    }

    fn release(&self) -> Option<Value> {
        self.0.release()
    }
}

/// The file loader's status and the config in force (swapped in after each apply).
struct LoaderSource {
    loader: configs::ConfigLoader,
    composer: Arc<crate::admin::Composer>,
    current: Arc<ArcSwap<configs::Gateway>>,
}

impl ConfigSource for LoaderSource {
    fn status(&self) -> ConfigStatus {
        let status = self.loader.status();
        let provenance = self.composer.provenance();
        ConfigStatus {
            source: provenance.source,
            base: Some(provenance.base),
            store: provenance.store,
            store_revision: provenance.store_revision,
            path: status.path,
            sha256: status.sha256,
            version: status.version,
            loaded_at: status.loaded_at,
            reloads: status.reloads,
            last_error: status.last_error,
        }
    }

    fn config(&self) -> Value {
        let mut value = match serde_json::to_value(&**self.current.load()) {
            Ok(value) => value,
            Err(error) => {
                return serde_json::json!({ "error": format!("cannot encode the config: {error}") });
            }
        };
        redact_tls_keys(&mut value);
        value
    }
}

/// Replaces every non-empty `tlsStore.*.key` (a PEM private key) with a marker.
pub(crate) fn redact_tls_keys(config: &mut Value) {
    let Some(store) = config.get_mut("tlsStore").and_then(Value::as_object_mut) else {
        return;
    };
    for tls in store.values_mut() {
        if let Some(key) = tls.get_mut("key")
            && key.as_str().is_some_and(|key| !key.is_empty())
        {
            *key = Value::String(REDACTED.to_owned());
        }
    }
}

/// The routes of the router in force.
struct ProxySource(Arc<Proxy>);

impl RouterSource for ProxySource {
    fn routes(&self) -> Vec<Route> {
        self.0
            .routes()
            .into_iter()
            .map(|route| Route {
                path: route.path,
                method: route.method,
                host: route.host,
                protocol: route.protocol,
                backends: route.backends,
                timeout: route.timeout,
                headers: matchers_json(&route.headers),
                query: matchers_json(&route.query),
            })
            .collect()
    }
}

/// Matchers as the config file writes them.
fn matchers_json(matchers: &[configs::Matcher]) -> Vec<Value> {
    matchers
        .iter()
        .filter_map(|matcher| serde_json::to_value(matcher).ok())
        .collect()
}

/// The service watcher's services, instances and appliers.
struct WatcherAdapter(Arc<client::ServiceWatcher>);

impl WatcherSource for WatcherAdapter {
    fn services(&self) -> Vec<String> {
        self.0.services()
    }

    fn instances(&self, service: &str) -> Option<Vec<Instance>> {
        let instances = self.0.instances(service)?;
        Some(
            instances
                .into_iter()
                .map(|instance| Instance {
                    id: instance.id,
                    name: instance.name,
                    version: instance.version,
                    metadata: instance.metadata,
                    endpoints: instance.endpoints,
                })
                .collect(),
        )
    }

    fn appliers(&self, service: &str) -> Option<Vec<Applier>> {
        let appliers = self.0.appliers(service)?;
        Some(
            appliers
                .into_iter()
                .map(|applier| Applier {
                    endpoint: applier.endpoint,
                    nodes: applier.nodes,
                })
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_keys_are_redacted() {
        let mut gateway = configs::Gateway::default();
        gateway.tls_store.insert(
            "upstream".into(),
            configs::Tls {
                key: "-----BEGIN PRIVATE KEY-----\nsecret".into(),
                cert: "CERT".into(),
                ..configs::Tls::default()
            },
        );
        gateway
            .tls_store
            .insert("no-key".into(), configs::Tls::default());
        let mut value = serde_json::to_value(&gateway).unwrap();
        redact_tls_keys(&mut value);
        assert_eq!(value["tlsStore"]["upstream"]["key"], REDACTED);
        assert_eq!(value["tlsStore"]["upstream"]["cert"], "CERT");
        assert_eq!(value["tlsStore"]["no-key"]["key"], "");
    }
}

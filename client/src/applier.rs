//! Turning an endpoint's backends into selector nodes.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use discovery::ServiceInstance;
use selector::{DEFAULT_WEIGHT, Node, Selector};

use crate::error::BuildError;
use crate::factory::ClientSpec;
use crate::watcher::{ServiceWatcher, Subscription};

/// Keeps an endpoint's selector fed: static targets once, discovered services on every
/// snapshot. Nodes of every backend are merged into one set; the selector keeps the
/// statistics of nodes that survive an update.
pub struct NodeApplier {
    subscriptions: Mutex<Vec<Subscription>>,
}

struct State {
    selector: Arc<dyn Selector>,
    scheme: &'static str,
    static_nodes: Vec<Node>,
    /// Per discovered service: the backend's configured weight (overrides metadata) and its nodes.
    discovered: Mutex<BTreeMap<String, Vec<Node>>>,
    weights: BTreeMap<String, Option<i64>>,
}

enum Target {
    Direct { address: String, tls: bool },
    Discovery { service: String },
}

fn parse_target(target: &str) -> Result<Target, BuildError> {
    let bad = |reason: &str| BuildError::BadTarget {
        target: target.into(),
        reason: reason.into(),
    };
    if let Some(rest) = target.strip_prefix("discovery://") {
        let service = rest.rsplit('/').next().unwrap_or_default();
        if service.is_empty() {
            return Err(bad("missing service name (discovery:///NAME)"));
        }
        return Ok(Target::Discovery {
            service: service.to_owned(),
        });
    }
    let (tls, rest) = if let Some(rest) = target.strip_prefix("https://") {
        (true, rest)
    } else if let Some(rest) = target.strip_prefix("http://") {
        (false, rest)
    } else if target.contains("://") {
        return Err(bad("unsupported scheme (http, https or discovery)"));
    } else {
        (false, target)
    };
    let authority = rest.trim_end_matches('/');
    if authority.is_empty() || authority.contains('/') {
        return Err(bad("expected host:port"));
    }
    let authority: http::uri::Authority =
        authority.parse().map_err(|_| bad("expected host:port"))?;
    let port = authority.port_u16().unwrap_or(if tls { 443 } else { 80 });
    Ok(Target::Direct {
        address: format!("{}:{port}", authority.host()),
        tls,
    })
}

impl NodeApplier {
    /// Resolves the backends of `spec` into `selector`; `spec.name` names the endpoint in
    /// debug views.
    pub fn new(
        spec: &ClientSpec<'_>,
        selector: Arc<dyn Selector>,
        watcher: Option<Arc<ServiceWatcher>>,
    ) -> Result<Self, BuildError> {
        let mut static_nodes = Vec::new();
        let mut weights = BTreeMap::new();
        for backend in spec.backends {
            match parse_target(&backend.target)? {
                Target::Direct { address, tls } => static_nodes.push(Node {
                    address,
                    tls: tls || backend.tls,
                    weight: backend.weight,
                    metadata: backend.metadata.clone(),
                    ..Node::default()
                }),
                Target::Discovery { service } => {
                    if watcher.is_none() {
                        return Err(BuildError::NoDiscovery {
                            target: backend.target.clone(),
                        });
                    }
                    weights.insert(service, backend.weight);
                }
            }
        }
        let scheme = match spec.protocol {
            configs::Protocol::Grpc => "grpc",
            configs::Protocol::Http => "http",
        };
        let state = Arc::new(State {
            selector,
            scheme,
            static_nodes,
            discovered: Mutex::new(BTreeMap::new()),
            weights,
        });
        state.publish();
        let mut subscriptions = Vec::new();
        if let Some(watcher) = watcher {
            for service in state.weights.keys() {
                let callback_state = state.clone();
                let count_state = state.clone();
                let name = service.clone();
                let counted = service.clone();
                subscriptions.push(watcher.subscribe(
                    service,
                    spec.name.to_owned(),
                    Arc::new(move |instances: &[ServiceInstance]| {
                        callback_state.on_instances(&name, instances)
                    }),
                    Arc::new(move || count_state.node_count(&counted)),
                ));
            }
        }
        Ok(Self {
            subscriptions: Mutex::new(subscriptions),
        })
    }

    /// Unsubscribes from every watched service; the selector keeps its last nodes.
    pub fn close(&self) {
        if let Ok(mut subscriptions) = self.subscriptions.lock() {
            subscriptions.clear();
        }
    }
}

impl State {
    fn on_instances(&self, service: &str, instances: &[ServiceInstance]) {
        let weight = self.weights.get(service).copied().flatten();
        let nodes: Vec<Node> = instances
            .iter()
            .filter_map(|instance| {
                let (address, tls) = instance.endpoint(self.scheme)?;
                let weight = weight.or_else(|| {
                    instance
                        .metadata
                        .get("weight")
                        .and_then(|w| w.parse::<i64>().ok())
                });
                Some(Node {
                    address,
                    tls,
                    weight: Some(weight.unwrap_or(DEFAULT_WEIGHT)),
                    service_name: instance.name.clone(),
                    version: instance.version.clone(),
                    metadata: instance.metadata.clone(),
                    ..Node::default()
                })
            })
            .collect();
        if let Ok(mut discovered) = self.discovered.lock() {
            discovered.insert(service.to_owned(), nodes);
        }
        self.publish();
    }

    fn node_count(&self, service: &str) -> usize {
        self.discovered
            .lock()
            .map(|d| d.get(service).map_or(0, Vec::len))
            .unwrap_or(0)
    }

    fn publish(&self) {
        let mut nodes = self.static_nodes.clone();
        if let Ok(discovered) = self.discovered.lock() {
            for service_nodes in discovered.values() {
                nodes.extend(service_nodes.iter().cloned());
            }
        }
        self.selector.apply(nodes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        let direct = |t: &str| match parse_target(t) {
            Ok(Target::Direct { address, tls }) => Some((address, tls)),
            _ => None,
        };
        assert_eq!(
            direct("127.0.0.1:8000"),
            Some(("127.0.0.1:8000".into(), false))
        );
        assert_eq!(
            direct("http://localhost:81"),
            Some(("localhost:81".into(), false))
        );
        assert_eq!(
            direct("https://example.com"),
            Some(("example.com:443".into(), true))
        );
        assert_eq!(direct("localhost"), Some(("localhost:80".into(), false)));
        assert!(matches!(
            parse_target("discovery:///helloworld"),
            Ok(Target::Discovery { service }) if service == "helloworld"
        ));
        for bad in ["", "discovery:///", "ftp://x:1", "http://x:1/path", "a b:1"] {
            assert!(parse_target(bad).is_err(), "{bad:?} should be rejected");
        }
    }
}

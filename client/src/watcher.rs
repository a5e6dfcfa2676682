//! One watch per discovered service, shared by every endpoint that names it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use discovery::{Backoff, Discovery, ServiceInstance};
use serde::Serialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

type Callback = Arc<dyn Fn(&[ServiceInstance]) + Send + Sync>;
type Counter = Arc<dyn Fn() -> usize + Send + Sync>;

/// Watches services in the registry and fans each snapshot out to the node appliers that
/// subscribed. Watches outlive config reloads: a service is watched once for the life of
/// the gateway, whichever endpoints name it.
pub struct ServiceWatcher {
    discovery: Arc<dyn Discovery>,
    services: Mutex<BTreeMap<String, Arc<Watched>>>,
    shutdown: CancellationToken,
    next_id: AtomicU64,
}

struct Watched {
    instances: Mutex<Option<Arc<Vec<ServiceInstance>>>>,
    subscribers: Mutex<Vec<Subscriber>>,
    ready: watch::Sender<bool>,
}

struct Subscriber {
    id: u64,
    description: String,
    callback: Callback,
    node_count: Counter,
}

/// An applier subscribed to a service, as shown by `/debug/watcher/appliers`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ApplierInfo {
    /// The endpoint ("GET /helloworld/*").
    pub endpoint: String,
    /// How many nodes of this service the endpoint holds.
    pub nodes: usize,
}

/// Keeps an applier subscribed; dropping it unsubscribes.
pub struct Subscription {
    id: u64,
    watched: Weak<Watched>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if let Some(watched) = self.watched.upgrade() {
            if let Ok(mut subscribers) = watched.subscribers.lock() {
                subscribers.retain(|s| s.id != self.id);
            }
        }
    }
}

impl ServiceWatcher {
    /// A watcher over `discovery`; its watch tasks end when `shutdown` is cancelled.
    pub fn new(discovery: Arc<dyn Discovery>, shutdown: CancellationToken) -> Arc<Self> {
        Arc::new(Self {
            discovery,
            services: Mutex::new(BTreeMap::new()),
            shutdown,
            next_id: AtomicU64::new(1),
        })
    }

    /// Subscribes an applier to `service`, starting the watch on first use. `callback` gets
    /// the current snapshot at once (when there is one) and every later one.
    pub fn subscribe(
        self: &Arc<Self>,
        service: &str,
        description: String,
        callback: Callback,
        node_count: Counter,
    ) -> Subscription {
        let watched = self.watched(service);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let current = watched.instances.lock().ok().and_then(|i| i.clone());
        if let Ok(mut subscribers) = watched.subscribers.lock() {
            subscribers.push(Subscriber {
                id,
                description,
                callback: callback.clone(),
                node_count,
            });
        }
        if let Some(instances) = current {
            callback(&instances);
        }
        Subscription {
            id,
            watched: Arc::downgrade(&watched),
        }
    }

    fn watched(self: &Arc<Self>, service: &str) -> Arc<Watched> {
        let Ok(mut services) = self.services.lock() else {
            // A poisoned map only happens after a panic elsewhere; serve a detached entry.
            return Arc::new(Watched::new());
        };
        if let Some(watched) = services.get(service) {
            return watched.clone();
        }
        let watched = Arc::new(Watched::new());
        services.insert(service.to_owned(), watched.clone());
        tokio::spawn(run_watch(
            self.discovery.clone(),
            service.to_owned(),
            Arc::downgrade(&watched),
            self.shutdown.clone(),
        ));
        watched
    }

    /// Latest instances of a watched service; None when the service is not watched.
    pub fn instances(&self, service: &str) -> Option<Vec<ServiceInstance>> {
        let services = self.services.lock().ok()?;
        let watched = services.get(service)?;
        let instances = watched.instances.lock().ok()?.clone();
        Some(instances.map(|i| i.as_ref().clone()).unwrap_or_default())
    }

    /// Every watched service with its latest instances.
    pub fn all_instances(&self) -> BTreeMap<String, Vec<ServiceInstance>> {
        let names: Vec<String> = self
            .services
            .lock()
            .map(|s| s.keys().cloned().collect())
            .unwrap_or_default();
        names
            .into_iter()
            .filter_map(|name| self.instances(&name).map(|instances| (name, instances)))
            .collect()
    }

    /// The appliers subscribed to a watched service; None when the service is not watched.
    pub fn appliers(&self, service: &str) -> Option<Vec<ApplierInfo>> {
        let watched = self.services.lock().ok()?.get(service)?.clone();
        let subscribers = watched.subscribers.lock().ok()?;
        Some(
            subscribers
                .iter()
                .map(|s| ApplierInfo {
                    endpoint: s.description.clone(),
                    nodes: (s.node_count)(),
                })
                .collect(),
        )
    }

    /// Names of the watched services.
    pub fn services(&self) -> Vec<String> {
        self.services
            .lock()
            .map(|s| s.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Waits until every watched service has its first snapshot, or `timeout` passes.
    /// Returns the services still unresolved.
    pub async fn wait_ready(&self, timeout: Duration) -> Vec<String> {
        let pending: Vec<(String, watch::Receiver<bool>)> = self
            .services
            .lock()
            .map(|s| {
                s.iter()
                    .map(|(n, w)| (n.clone(), w.ready.subscribe()))
                    .collect()
            })
            .unwrap_or_default();
        let deadline = tokio::time::Instant::now() + timeout;
        let mut unresolved = Vec::new();
        for (name, mut ready) in pending {
            let wait = ready.wait_for(|ready| *ready);
            if !matches!(tokio::time::timeout_at(deadline, wait).await, Ok(Ok(_))) {
                unresolved.push(name);
            }
        }
        unresolved
    }
}

impl Watched {
    fn new() -> Self {
        Self {
            instances: Mutex::new(None),
            subscribers: Mutex::new(Vec::new()),
            ready: watch::channel(false).0,
        }
    }

    fn publish(&self, instances: Vec<ServiceInstance>) {
        let instances = Arc::new(instances);
        if let Ok(mut slot) = self.instances.lock() {
            *slot = Some(instances.clone());
        }
        let callbacks: Vec<Callback> = self
            .subscribers
            .lock()
            .map(|s| s.iter().map(|s| s.callback.clone()).collect())
            .unwrap_or_default();
        for callback in callbacks {
            callback(&instances);
        }
        self.ready.send_replace(true);
    }
}

/// Watches one service until `shutdown` or until nobody holds the `Watched` any more; a
/// failed start is retried with the project's jittered backoff (100 ms doubling to 5 s).
async fn run_watch(
    discovery: Arc<dyn Discovery>,
    service: String,
    watched: Weak<Watched>,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::default();
    'connect: loop {
        let watcher = tokio::select! {
            _ = shutdown.cancelled() => return,
            w = discovery.watch(&service) => w,
        };
        let mut watcher = match watcher {
            Ok(watcher) => watcher,
            Err(err) => {
                tracing::warn!(%service, %err, "starting watch failed; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(backoff.next_delay()) => {}
                }
                continue 'connect;
            }
        };
        backoff.reset();
        loop {
            let next = tokio::select! {
                _ = shutdown.cancelled() => { watcher.stop().await; return; }
                next = watcher.next() => next,
            };
            let Some(watched) = watched.upgrade() else {
                watcher.stop().await;
                return;
            };
            match next {
                Ok(instances) => {
                    tracing::info!(%service, instances = instances.len(), "service snapshot");
                    watched.publish(instances);
                }
                Err(err) => {
                    // Keep the last known nodes; the watcher reconnects with its own backoff.
                    tracing::warn!(%service, %err, "watch error; keeping last known nodes");
                }
            }
        }
    }
}

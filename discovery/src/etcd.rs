//! etcd v3 discovery in the Kratos layout.
//!
//! Each instance is one key `<namespace>/<service>/<id>` whose value is the JSON
//! [`ServiceInstance`]. A watcher lists the prefix `<namespace>/<service>/` (the trailing
//! slash keeps `helloworld2` out of `helloworld`), remembers the revision of that read, and
//! watches from the next revision, applying events to an in-memory map and emitting the
//! whole map after every watch response that carried events.
//!
//! Recovery: when the watch stream breaks or ends, the watcher re-watches from the last
//! revision it has applied + 1, so no event is lost and none is applied twice. If etcd has
//! compacted that revision away (the response carries `compact_revision`), the watcher lists
//! the prefix again and emits the fresh snapshot. A value that is not a valid instance is
//! skipped with a warning; the other instances stay.
//!
//! The client is created on first use (creating it needs a tokio runtime, parsing a DSN does
//! not) and re-created after a failure, so a restarted etcd is found again. Unary requests
//! and watch creation are bounded by [`REQUEST_TIMEOUT`]; an established watch stream has no
//! deadline and relies on HTTP/2 keep-alive pings to notice a dead peer.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    Client, ConnectOptions, EventType, GetOptions, KeyValue, WatchOptions, WatchStream,
};
use tokio::sync::Mutex;

use crate::backoff::Backoff;
use crate::{Discovery, Error, ServiceInstance, Watcher};

/// Kratos' default key prefix.
pub const DEFAULT_NAMESPACE: &str = "/microservices";

/// Bound on a unary request (range get) and on creating a watch.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Discovery over etcd v3, Kratos key layout `<namespace>/<service>/<id>`.
pub struct EtcdDiscovery {
    connection: Arc<Connection>,
    namespace: String,
}

impl EtcdDiscovery {
    /// A discovery over these `host:port` endpoints (an `http://` prefix is accepted too);
    /// connects on first use.
    pub fn new(endpoints: Vec<String>, namespace: String) -> Self {
        Self {
            connection: Arc::new(Connection {
                endpoints,
                client: Mutex::new(None),
            }),
            namespace,
        }
    }

    fn prefix(&self, name: &str) -> Result<String, Error> {
        if name.is_empty() {
            return Err(Error::InvalidName {
                name: name.to_owned(),
                reason: "the name is empty",
            });
        }
        if name.contains('/') {
            return Err(Error::InvalidName {
                name: name.to_owned(),
                reason: "a name cannot contain '/' in the etcd key layout",
            });
        }
        Ok(format!("{}/{}/", self.namespace, name))
    }
}

#[async_trait::async_trait]
impl Discovery for EtcdDiscovery {
    async fn get_service(&self, name: &str) -> Result<Vec<ServiceInstance>, Error> {
        let prefix = self.prefix(name)?;
        let (instances, _revision) = self.connection.list(&prefix).await?;
        Ok(instances.into_values().collect())
    }

    async fn watch(&self, name: &str) -> Result<Box<dyn Watcher>, Error> {
        let prefix = self.prefix(name)?;
        Ok(Box::new(EtcdWatcher {
            connection: Arc::clone(&self.connection),
            prefix,
            instances: BTreeMap::new(),
            revision: 0,
            phase: Phase::List,
            backoff: Backoff::default(),
            retry_pending: false,
        }))
    }

    fn describe(&self) -> String {
        format!(
            "{}?namespace={}",
            self.connection.describe(),
            self.namespace
        )
    }
}

/// The lazily created client, shared by a discovery and its watchers.
struct Connection {
    endpoints: Vec<String>,
    client: Mutex<Option<Client>>,
}

impl Connection {
    fn describe(&self) -> String {
        format!("etcd://{}", self.endpoints.join(","))
    }

    fn unreachable(&self, reason: impl std::fmt::Display) -> Error {
        Error::Unreachable {
            registry: self.describe(),
            reason: reason.to_string(),
        }
    }

    fn timeout(&self) -> Error {
        Error::Timeout {
            registry: self.describe(),
            after: REQUEST_TIMEOUT,
        }
    }

    /// The cached client, or a new one. Creating it sends nothing over the network.
    async fn client(&self) -> Result<Client, Error> {
        let mut cached = self.client.lock().await;
        if let Some(client) = cached.as_ref() {
            return Ok(client.clone());
        }
        let urls: Vec<String> = self
            .endpoints
            .iter()
            .map(|endpoint| {
                if endpoint.contains("://") {
                    endpoint.clone()
                } else {
                    format!("http://{endpoint}")
                }
            })
            .collect();
        let options = ConnectOptions::new()
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_keep_alive(KEEP_ALIVE_INTERVAL, KEEP_ALIVE_TIMEOUT)
            .with_keep_alive_while_idle(true);
        let client = tokio::time::timeout(REQUEST_TIMEOUT, Client::connect(urls, Some(options)))
            .await
            .map_err(|_| self.timeout())?
            .map_err(|error| self.unreachable(error))?;
        *cached = Some(client.clone());
        Ok(client)
    }

    /// Drops the cached client so the next use connects afresh (after a failure).
    async fn forget_client(&self) {
        *self.client.lock().await = None;
    }

    /// Reads every instance under `prefix`, keyed by etcd key, and the revision of the read.
    async fn list(&self, prefix: &str) -> Result<(BTreeMap<String, ServiceInstance>, i64), Error> {
        let mut client = self.client().await?;
        let response = tokio::time::timeout(
            REQUEST_TIMEOUT,
            client.get(prefix, Some(GetOptions::new().with_prefix())),
        )
        .await;
        let response = match response {
            Ok(Ok(response)) => response,
            Ok(Err(error)) => {
                self.forget_client().await;
                return Err(self.unreachable(error));
            }
            Err(_) => {
                self.forget_client().await;
                return Err(self.timeout());
            }
        };
        let revision = response
            .header()
            .map(|header| header.revision())
            .ok_or_else(|| Error::BadResponse {
                registry: self.describe(),
                reason: "range response without a header".to_owned(),
            })?;
        let instances = response
            .kvs()
            .iter()
            .filter_map(|kv| decode(kv).and_then(|(key, instance)| Some((key, instance?))))
            .collect();
        Ok((instances, revision))
    }
}

/// Decodes one key-value pair into (key, instance); `None` instance = a value we skip
/// (logged). `None` overall = a key that is not UTF-8.
fn decode(kv: &KeyValue) -> Option<(String, Option<ServiceInstance>)> {
    let Ok(key) = kv.key_str() else {
        tracing::warn!(key = ?kv.key(), "skipping etcd key that is not UTF-8");
        return None;
    };
    match serde_json::from_slice::<ServiceInstance>(kv.value()) {
        Ok(instance) => Some((key.to_owned(), Some(instance))),
        Err(error) => {
            tracing::warn!(key, %error, "skipping etcd value that is not a service instance");
            Some((key.to_owned(), None))
        }
    }
}

/// Where a watcher is in its list → watch → stream cycle.
enum Phase {
    /// The map must be (re)built by listing the prefix.
    List,
    /// The map is current up to `revision`; a watch from `revision + 1` must be opened.
    Watch,
    /// A watch stream is open.
    Streaming(Box<OpenWatch>),
    /// `stop()` was called.
    Stopped,
}

/// An open watch stream; `handle` keeps its request side (and so the stream) alive.
struct OpenWatch {
    handle: etcd_client::Watcher,
    stream: WatchStream,
}

/// A watch of one service prefix, created by [`EtcdDiscovery::watch`].
///
/// `next()` is cancel-safe: dropping its future (for example in `tokio::select!`) leaves the
/// watcher consistent, and the following call carries on.
pub struct EtcdWatcher {
    connection: Arc<Connection>,
    prefix: String,
    /// Instances by etcd key, as of `revision`.
    instances: BTreeMap<String, ServiceInstance>,
    /// The last revision applied to `instances`.
    revision: i64,
    phase: Phase,
    backoff: Backoff,
    /// Set after a failure: the next call sleeps a backoff delay before trying again.
    retry_pending: bool,
}

impl EtcdWatcher {
    fn snapshot(&self) -> Vec<ServiceInstance> {
        self.instances.values().cloned().collect()
    }

    /// Records a failure: back off before the next attempt, reconnect, and return it.
    async fn fail(&mut self, error: Error, phase: Phase) -> Error {
        tracing::warn!(prefix = %self.prefix, %error, "etcd watch failed; will retry");
        self.phase = phase;
        self.retry_pending = true;
        self.connection.forget_client().await;
        error
    }

    fn apply(&mut self, response: &etcd_client::WatchResponse) {
        for event in response.events() {
            let Some(kv) = event.kv() else { continue };
            self.revision = self.revision.max(kv.mod_revision());
            match event.event_type() {
                EventType::Put => match decode(kv) {
                    Some((key, Some(instance))) => {
                        self.instances.insert(key, instance);
                    }
                    Some((key, None)) => {
                        self.instances.remove(&key);
                    }
                    None => {}
                },
                EventType::Delete => {
                    if let Ok(key) = kv.key_str() {
                        self.instances.remove(key);
                    }
                }
            }
        }
    }

    async fn open_watch(&mut self) -> Result<(), Error> {
        let mut watch_client = self.connection.client().await?.watch_client();
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(self.revision + 1);
        let created = tokio::time::timeout(
            REQUEST_TIMEOUT,
            watch_client.watch(self.prefix.clone(), Some(options)),
        )
        .await;
        match created {
            Ok(Ok((handle, stream))) => {
                self.phase = Phase::Streaming(Box::new(OpenWatch { handle, stream }));
                Ok(())
            }
            Ok(Err(error)) => Err(self.connection.unreachable(error)),
            Err(_) => Err(self.connection.timeout()),
        }
    }
}

#[async_trait::async_trait]
impl Watcher for EtcdWatcher {
    async fn next(&mut self) -> Result<Vec<ServiceInstance>, Error> {
        loop {
            if matches!(self.phase, Phase::Stopped) {
                return Err(Error::Stopped);
            }
            if self.retry_pending {
                tokio::time::sleep(self.backoff.next_delay()).await;
                self.retry_pending = false;
            }
            match &mut self.phase {
                Phase::Stopped => return Err(Error::Stopped),
                Phase::List => match self.connection.list(&self.prefix).await {
                    Ok((instances, revision)) => {
                        self.instances = instances;
                        self.revision = revision;
                        self.phase = Phase::Watch;
                        self.backoff.reset();
                        return Ok(self.snapshot());
                    }
                    Err(error) => return Err(self.fail(error, Phase::List).await),
                },
                Phase::Watch => {
                    if let Err(error) = self.open_watch().await {
                        return Err(self.fail(error, Phase::Watch).await);
                    }
                }
                Phase::Streaming(open) => {
                    let message = open.stream.message().await;
                    match message {
                        Ok(Some(response)) => {
                            if response.compact_revision() != 0 {
                                tracing::info!(
                                    prefix = %self.prefix,
                                    compact_revision = response.compact_revision(),
                                    "etcd compacted past our revision; listing again"
                                );
                                self.phase = Phase::List;
                                continue;
                            }
                            if response.canceled() {
                                let error = Error::BadResponse {
                                    registry: self.connection.describe(),
                                    reason: format!(
                                        "watch canceled by the server: {}",
                                        response.cancel_reason()
                                    ),
                                };
                                return Err(self.fail(error, Phase::Watch).await);
                            }
                            self.backoff.reset();
                            if response.events().is_empty() {
                                continue;
                            }
                            self.apply(&response);
                            return Ok(self.snapshot());
                        }
                        Ok(None) => {
                            let error = self.connection.unreachable("the watch stream ended");
                            return Err(self.fail(error, Phase::Watch).await);
                        }
                        Err(error) => {
                            let error = self.connection.unreachable(error);
                            return Err(self.fail(error, Phase::Watch).await);
                        }
                    }
                }
            }
        }
    }

    async fn stop(&mut self) {
        if let Phase::Streaming(mut open) = std::mem::replace(&mut self.phase, Phase::Stopped) {
            // Best effort: dropping the handle closes the stream anyway.
            let _ = open.handle.cancel().await;
        }
    }
}

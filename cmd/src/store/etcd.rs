//! `etcd://HOST:PORT[,HOST:PORT...]/PREFIX` (optionally `etcd://USER:PASSWORD@...`).
//!
//! Keys: `PREFIX/endpoints/<id>` holds `{"id","endpoint"}` as JSON; the version of an
//! endpoint is the key's `mod_revision`, so `If-Match` is a transaction comparing it.
//! `PREFIX/instances/<id>` holds each gateway's [`InstanceInfo`], attached to a lease
//! (kept alive every third of its TTL) so a killed gateway disappears when the lease ends.
//!
//! One task lists the endpoint prefix and then watches it from the listed revision + 1;
//! after a disconnect it watches again from the last revision seen + 1, and lists again only
//! when etcd compacted that revision away. Failures back off (`discovery::Backoff`); the
//! last snapshot stays published meanwhile, so the gateway keeps its config.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use configs::Endpoint;
use discovery::Backoff;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, KeyValue, PutOptions, Txn,
    TxnOp, TxnOpResponse, WatchOptions,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use super::{ConfigStore, InstanceInfo, Snapshot, StoreError, StoredEndpoint};

/// Bound on each unary call.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

/// The value under `PREFIX/endpoints/<id>`.
#[derive(Serialize, Deserialize)]
struct Value {
    id: String,
    endpoint: Endpoint,
}

/// The etcd store. Cheap to share; its tasks end with the shutdown token.
pub(crate) struct EtcdStore {
    inner: Arc<Inner>,
}

struct Inner {
    urls: Vec<String>,
    user: Option<(String, String)>,
    prefix: String,
    client: tokio::sync::Mutex<Option<Client>>,
    snapshot: watch::Sender<Arc<Snapshot>>,
    instance: Mutex<Option<InstanceInfo>>,
    instance_changed: Notify,
    lease_ttl: Duration,
    shutdown: CancellationToken,
}

impl EtcdStore {
    /// Parses `HOST:PORT[,...]/PREFIX` (after `etcd://`) and starts the watch task.
    pub(crate) fn open(
        rest: &str,
        lease_ttl: Duration,
        shutdown: CancellationToken,
    ) -> Result<EtcdStore, String> {
        let bad = |why: &str| format!("--store etcd://...: {why}");
        let (hosts, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let (user, hosts) = match hosts.rsplit_once('@') {
            Some((userinfo, hosts)) => {
                let (name, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
                (Some((name.to_owned(), password.to_owned())), hosts)
            }
            None => (None, hosts),
        };
        let urls: Vec<String> = hosts
            .split(',')
            .filter(|h| !h.is_empty())
            .map(|h| format!("http://{h}"))
            .collect();
        if urls.is_empty() {
            return Err(bad("no HOST:PORT"));
        }
        let prefix = format!("/{}", prefix.trim_matches('/'));
        if prefix == "/" {
            return Err(bad("needs a /PREFIX, e.g. etcd://127.0.0.1:2379/gateway"));
        }
        let (snapshot, _) = watch::channel(Arc::new(Snapshot::default()));
        let inner = Arc::new(Inner {
            urls,
            user,
            prefix,
            client: tokio::sync::Mutex::new(None),
            snapshot,
            instance: Mutex::new(None),
            instance_changed: Notify::new(),
            lease_ttl,
            shutdown,
        });
        tokio::spawn(inner.clone().watch_endpoints());
        tokio::spawn(inner.clone().keep_instance());
        Ok(EtcdStore { inner })
    }
}

impl Inner {
    fn endpoints_prefix(&self) -> String {
        format!("{}/endpoints/", self.prefix)
    }

    fn instances_prefix(&self) -> String {
        format!("{}/instances/", self.prefix)
    }

    fn describe(&self) -> String {
        let hosts: Vec<&str> = self
            .urls
            .iter()
            .map(|u| u.trim_start_matches("http://"))
            .collect();
        format!("etcd://{}{}", hosts.join(","), self.prefix)
    }

    async fn client(&self) -> Result<Client, StoreError> {
        let mut cached = self.client.lock().await;
        if let Some(client) = cached.as_ref() {
            return Ok(client.clone());
        }
        let mut options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
            .with_keep_alive_while_idle(true);
        if let Some((name, password)) = &self.user {
            options = options.with_user(name.clone(), password.clone());
        }
        let client = timed(Client::connect(self.urls.clone(), Some(options))).await?;
        *cached = Some(client.clone());
        Ok(client)
    }

    async fn forget_client(&self) {
        *self.client.lock().await = None;
    }

    /// Runs one call with a fresh-or-cached client; a failure drops the client.
    async fn call<T, F, Fut>(&self, call: F) -> Result<T, StoreError>
    where
        F: FnOnce(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let client = self.client().await?;
        let result = timed(call(client)).await;
        if result.is_err() {
            self.forget_client().await;
        }
        result
    }

    /// List, then watch from the listed revision + 1; re-watch after a failure from the
    /// last revision + 1, re-list after compaction. Publishes every change.
    async fn watch_endpoints(self: Arc<Self>) {
        let prefix = self.endpoints_prefix();
        let mut endpoints: BTreeMap<String, StoredEndpoint> = BTreeMap::new();
        let mut revision = 0_i64;
        let mut listed = false;
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(3));
        loop {
            let cycle = async {
                if !listed {
                    let key = prefix.clone();
                    let response = self
                        .call(|mut c| async move {
                            c.get(key, Some(GetOptions::new().with_prefix())).await
                        })
                        .await?;
                    endpoints = response
                        .kvs()
                        .iter()
                        .filter_map(decode)
                        .map(|e| (e.id.clone(), e))
                        .collect();
                    revision = response.header().map_or(0, |h| h.revision());
                    listed = true;
                    self.publish(&endpoints, revision);
                }
                let mut watch_client = self.client().await?.watch_client();
                let options = WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(revision + 1);
                let (_handle, mut stream) =
                    timed(watch_client.watch(prefix.clone(), Some(options))).await?;
                backoff.reset();
                loop {
                    let response = stream
                        .message()
                        .await
                        .map_err(|err| StoreError::Unavailable(err.to_string()))?
                        .ok_or_else(|| {
                            StoreError::Unavailable("the watch stream ended".to_owned())
                        })?;
                    if response.compact_revision() != 0 {
                        tracing::info!(
                            compact_revision = response.compact_revision(),
                            "etcd compacted past our revision; listing the store again"
                        );
                        listed = false;
                        return Ok(());
                    }
                    if response.canceled() {
                        return Err(StoreError::Unavailable(format!(
                            "watch canceled: {}",
                            response.cancel_reason()
                        )));
                    }
                    for event in response.events() {
                        let Some(kv) = event.kv() else { continue };
                        revision = revision.max(kv.mod_revision());
                        let Ok(key) = kv.key_str() else { continue };
                        let id = key.trim_start_matches(&prefix).to_owned();
                        match event.event_type() {
                            EventType::Put => match decode(kv) {
                                Some(stored) => {
                                    endpoints.insert(id, stored);
                                }
                                None => {
                                    endpoints.remove(&id);
                                }
                            },
                            EventType::Delete => {
                                endpoints.remove(&id);
                            }
                        }
                    }
                    if let Some(header) = response.header() {
                        revision = revision.max(header.revision());
                    }
                    self.publish(&endpoints, revision);
                }
            };
            let result: Result<(), StoreError> = tokio::select! {
                () = self.shutdown.cancelled() => return,
                result = cycle => result,
            };
            if let Err(error) = result {
                tracing::warn!(store = %self.describe(), %error, "config store watch failed; serving the last config, will retry");
                self.forget_client().await;
                tokio::select! {
                    () = self.shutdown.cancelled() => return,
                    () = tokio::time::sleep(backoff.next_delay()) => {}
                }
            }
        }
    }

    fn publish(&self, endpoints: &BTreeMap<String, StoredEndpoint>, revision: i64) {
        super::publish(
            &self.snapshot,
            Snapshot {
                revision: revision.to_string(),
                endpoints: endpoints.values().cloned().collect(),
            },
        );
    }

    /// Keeps `PREFIX/instances/<id>` under a lease: grant, put, then every third of the TTL
    /// renew the lease and rewrite the value (`seen`); a lost lease is granted again.
    async fn keep_instance(self: Arc<Self>) {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(3));
        let ttl = self.lease_ttl.as_secs().max(1) as i64;
        let tick = (self.lease_ttl / 3).max(Duration::from_millis(200));
        let mut lease = None;
        loop {
            let instance = self
                .instance
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            let Some(mut instance) = instance else {
                tokio::select! {
                    () = self.shutdown.cancelled() => return,
                    () = self.instance_changed.notified() => continue,
                }
            };
            let cycle = async {
                let granted = self
                    .call(|mut c| async move { c.lease_grant(ttl, None).await })
                    .await?;
                let id = granted.id();
                lease = Some(id);
                let (mut keeper, mut stream) = self
                    .call(|mut c| async move { c.lease_keep_alive(id).await })
                    .await?;
                backoff.reset();
                loop {
                    instance.seen = super::rfc3339(SystemTime::now());
                    let key = format!("{}{}", self.instances_prefix(), instance.id);
                    let value = serde_json::to_string(&instance).unwrap_or_default();
                    self.call(|mut c| async move {
                        c.put(key, value, Some(PutOptions::new().with_lease(id)))
                            .await
                    })
                    .await?;
                    tokio::select! {
                        () = self.shutdown.cancelled() => return Ok(()),
                        () = self.instance_changed.notified() => {
                            if let Some(latest) = self.instance.lock().unwrap_or_else(|p| p.into_inner()).clone() {
                                instance = latest;
                            }
                            continue;
                        }
                        () = tokio::time::sleep(tick) => {}
                    }
                    timed(keeper.keep_alive()).await?;
                    let alive = timed(stream.message()).await?;
                    if alive.is_none_or(|response| response.ttl() <= 0) {
                        return Err(StoreError::Unavailable(
                            "the instance lease expired".to_owned(),
                        ));
                    }
                }
            };
            match cycle.await {
                Ok(()) => break,
                Err(error) => {
                    tracing::warn!(store = %self.describe(), %error, "cannot keep this gateway registered; will retry");
                    self.forget_client().await;
                    tokio::select! {
                        () = self.shutdown.cancelled() => break,
                        () = tokio::time::sleep(backoff.next_delay()) => {}
                    }
                }
            }
        }
        // Leaving cleanly: drop the instance at once rather than at the lease's end.
        if let Some(id) = lease {
            let _ = self
                .call(|mut c| async move { c.lease_revoke(id).await })
                .await;
        }
    }
}

/// `StoredEndpoint` from a key-value pair; `None` (logged) for a value that is not ours.
fn decode(kv: &KeyValue) -> Option<StoredEndpoint> {
    match serde_json::from_slice::<Value>(kv.value()) {
        Ok(value) => Some(StoredEndpoint {
            id: value.id,
            version: kv.mod_revision().to_string(),
            endpoint: value.endpoint,
        }),
        Err(error) => {
            tracing::warn!(key = ?kv.key_str(), %error, "skipping an etcd value that is not a stored endpoint");
            None
        }
    }
}

async fn timed<T>(
    call: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(REQUEST_TIMEOUT, call).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(StoreError::Unavailable(error.to_string())),
        Err(_) => Err(StoreError::Unavailable(format!(
            "no answer within {REQUEST_TIMEOUT:?}"
        ))),
    }
}

/// `If-Match` as a mod revision; anything else matches nothing.
fn revision(if_match: &str) -> i64 {
    if_match.parse().unwrap_or(-1)
}

#[async_trait::async_trait]
impl ConfigStore for EtcdStore {
    fn describe(&self) -> String {
        self.inner.describe()
    }

    async fn list(&self) -> Result<Vec<StoredEndpoint>, StoreError> {
        let key = self.inner.endpoints_prefix();
        let response = self
            .inner
            .call(|mut c| async move { c.get(key, Some(GetOptions::new().with_prefix())).await })
            .await?;
        let mut list: Vec<StoredEndpoint> = response.kvs().iter().filter_map(decode).collect();
        list.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(list)
    }

    async fn get(&self, id: &str) -> Result<StoredEndpoint, StoreError> {
        let key = format!("{}{id}", self.inner.endpoints_prefix());
        let response = self
            .inner
            .call(|mut c| async move { c.get(key, None).await })
            .await?;
        response
            .kvs()
            .first()
            .and_then(decode)
            .ok_or_else(|| StoreError::NotFound(id.to_owned()))
    }

    async fn put(
        &self,
        id: &str,
        endpoint: &Endpoint,
        if_match: Option<&str>,
    ) -> Result<StoredEndpoint, StoreError> {
        let key = format!("{}{id}", self.inner.endpoints_prefix());
        let value = serde_json::to_string(&Value {
            id: id.to_owned(),
            endpoint: endpoint.clone(),
        })
        .map_err(|err| StoreError::Unavailable(format!("encode: {err}")))?;
        let mut txn = Txn::new();
        if let Some(expected) = if_match {
            txn = txn.when([Compare::mod_revision(
                key.clone(),
                CompareOp::Equal,
                revision(expected),
            )]);
        }
        let txn = txn
            .and_then([TxnOp::put(key.clone(), value, None)])
            .or_else([TxnOp::get(key, None)]);
        let response = self
            .inner
            .call(|mut c| async move { c.txn(txn).await })
            .await?;
        if !response.succeeded() {
            return Err(conflict(
                if_match.unwrap_or_default(),
                &response.op_responses(),
            ));
        }
        let version = response.header().map_or(0, |h| h.revision());
        Ok(StoredEndpoint {
            id: id.to_owned(),
            version: version.to_string(),
            endpoint: endpoint.clone(),
        })
    }

    async fn delete(&self, id: &str, if_match: Option<&str>) -> Result<(), StoreError> {
        let key = format!("{}{id}", self.inner.endpoints_prefix());
        let mut txn = Txn::new();
        if let Some(expected) = if_match {
            txn = txn.when([Compare::mod_revision(
                key.clone(),
                CompareOp::Equal,
                revision(expected),
            )]);
        }
        let txn = txn
            .and_then([TxnOp::delete(key.clone(), None)])
            .or_else([TxnOp::get(key, None)]);
        let response = self
            .inner
            .call(|mut c| async move { c.txn(txn).await })
            .await?;
        if !response.succeeded() {
            let error = conflict(if_match.unwrap_or_default(), &response.op_responses());
            return Err(match error {
                StoreError::Conflict { current, .. } if current == "none" => {
                    StoreError::NotFound(id.to_owned())
                }
                other => other,
            });
        }
        let deleted = response.op_responses().iter().any(|op| match op {
            TxnOpResponse::Delete(delete) => delete.deleted() > 0,
            _ => false,
        });
        if deleted {
            Ok(())
        } else {
            Err(StoreError::NotFound(id.to_owned()))
        }
    }

    fn watch(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.inner.snapshot.subscribe()
    }

    async fn register_instance(&self, instance: InstanceInfo) {
        *self
            .inner
            .instance
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(instance);
        self.inner.instance_changed.notify_one();
    }

    async fn instances(&self) -> Result<Vec<InstanceInfo>, StoreError> {
        let key = self.inner.instances_prefix();
        let response = self
            .inner
            .call(|mut c| async move { c.get(key, Some(GetOptions::new().with_prefix())).await })
            .await?;
        let mut list: Vec<InstanceInfo> = response
            .kvs()
            .iter()
            .filter_map(|kv| serde_json::from_slice(kv.value()).ok())
            .collect();
        list.sort_by(|a, b: &InstanceInfo| a.id.cmp(&b.id));
        Ok(list)
    }
}

/// The 412 of a failed compare, naming the stored version (from the `or_else` get).
fn conflict(expected: &str, ops: &[TxnOpResponse]) -> StoreError {
    let current = ops
        .iter()
        .find_map(|op| match op {
            TxnOpResponse::Get(get) => get.kvs().first().map(|kv| kv.mod_revision().to_string()),
            _ => None,
        })
        .unwrap_or_else(|| "none".to_owned());
    StoreError::Conflict {
        expected: expected.to_owned(),
        current,
    }
}

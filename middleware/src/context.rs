//! Per-endpoint and per-request facts that travel with a request as extensions.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};

use selector::{Node, NodeFilter};

/// Static facts about the endpoint a request matched, built once per config update.
#[derive(Debug, Clone, Default)]
pub struct EndpointInfo {
    /// The endpoint's path pattern as configured (used as the `path` metric label).
    pub path: String,
    /// Configured method; empty means any.
    pub method: String,
    /// Configured host; empty means any.
    pub host: String,
    /// Upstream protocol.
    pub protocol: configs::Protocol,
    /// Endpoint metadata from the config (`service`, `basePath`, ...).
    pub metadata: BTreeMap<String, String>,
}

impl EndpointInfo {
    /// Builds the facts for one configured endpoint.
    pub fn from_config(endpoint: &configs::Endpoint) -> Self {
        Self {
            path: endpoint.path.clone(),
            method: endpoint.method.clone(),
            host: endpoint.host.clone(),
            protocol: endpoint.protocol,
            metadata: endpoint.metadata.clone(),
        }
    }

    /// `"GRPC"` or `"HTTP"`, as the protocol metric label.
    pub fn protocol_label(&self) -> &'static str {
        match self.protocol {
            configs::Protocol::Grpc => "GRPC",
            configs::Protocol::Http => "HTTP",
        }
    }
}

/// Where the client records the node it picked, so outer layers (retry, logging) can see it.
#[derive(Debug, Default)]
pub struct BackendSlot(Mutex<Option<Arc<Node>>>);

impl BackendSlot {
    /// Records the node the current attempt goes to.
    pub fn set(&self, node: Arc<Node>) {
        if let Ok(mut slot) = self.0.lock() {
            *slot = Some(node);
        }
    }

    /// The node of the latest attempt, if one was picked.
    pub fn get(&self) -> Option<Arc<Node>> {
        self.0.lock().ok().and_then(|slot| slot.clone())
    }
}

/// Options the proxy attaches to each attempt as a request extension.
#[derive(Clone)]
pub struct RequestOptions {
    /// The endpoint the request matched.
    pub endpoint: Arc<EndpointInfo>,
    /// The downstream peer's address.
    pub client_addr: Option<SocketAddr>,
    /// 1 for the first attempt, 2 for the first retry, ...
    pub attempt: u32,
    /// Node filters every pick must pass (middlewares may add some).
    pub filters: Vec<NodeFilter>,
    /// Addresses of nodes already tried; avoided while another node is available.
    pub tried: Vec<String>,
    /// The node picked by the latest attempt.
    pub backend: Arc<BackendSlot>,
    /// The client's certificate, on an HTTPS listener that verifies them (`--tls-client-ca`).
    pub client_certificate: Option<Arc<ClientCertificate>>,
    /// State shared by every attempt of this request, and what runs when it finishes.
    pub scope: Arc<RequestScope>,
}

/// What one request's attempts share: the middleware chain runs once per attempt, so a
/// middleware that needs a per-request fact (the tracing middleware's server span) keeps
/// it here, and learns the final status through [`RequestScope::on_finish`].
#[derive(Default)]
pub struct RequestScope {
    values: Mutex<http::Extensions>,
    on_finish: Mutex<Vec<FinishFn>>,
    /// The authenticated client's id, set once by the middleware that let the request in
    /// (`auth`: the OAuth token's `client_id`, a JWT's `client_id`/`azp`/`sub`), for the
    /// middlewares around it (`analytics`). It lives in the scope (one allocation per
    /// request for both) because every attempt of the request shares it.
    pub client_id: OnceLock<String>,
}

type FinishFn = Box<dyn FnOnce(u16) + Send>;

impl RequestScope {
    /// The value of type `T` kept for this request, made by `make` on first use.
    pub fn get_or_insert_with<T, F>(&self, make: F) -> T
    where
        T: Clone + Send + Sync + 'static,
        F: FnOnce() -> T,
    {
        let mut values = self
            .values
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(value) = values.get::<T>() {
            return value.clone();
        }
        let value = make();
        values.insert(value.clone());
        value
    }

    /// Runs `callback` with the status the client got, once the request finished (its
    /// response head went back, or 499 when the client went away first).
    pub fn on_finish(&self, callback: impl FnOnce(u16) + Send + 'static) {
        let mut callbacks = self
            .on_finish
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        callbacks.push(Box::new(callback));
    }

    /// Called by the proxy when the request finished with `status`; runs the callbacks once.
    pub fn finish(&self, status: u16) {
        let callbacks = {
            let mut callbacks = self
                .on_finish
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if callbacks.is_empty() {
                return;
            }
            std::mem::take(&mut *callbacks)
        };
        for callback in callbacks {
            callback(status);
        }
    }
}

/// The certificate a client presented on an HTTPS listener with client authentication,
/// already verified against the configured CA. The server puts it in each request's
/// extensions (as `Arc<ClientCertificate>`); the proxy copies it into [`RequestOptions`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCertificate {
    /// The subject distinguished name, RFC 4514 style (`CN=alice,O=Example`).
    pub subject: String,
    /// The leaf certificate, DER, for middlewares that need more of it.
    pub der: bytes::Bytes,
}

impl RequestOptions {
    /// Options for the first attempt of a request to `endpoint`.
    pub fn new(endpoint: Arc<EndpointInfo>, client_addr: Option<SocketAddr>) -> Self {
        Self {
            endpoint,
            client_addr,
            attempt: 1,
            filters: Vec::new(),
            tried: Vec::new(),
            backend: Arc::new(BackendSlot::default()),
            client_certificate: None,
            scope: Arc::new(RequestScope::default()),
        }
    }

    /// Takes the verified client certificate from a downstream request's `extensions`, if
    /// the connection carried one.
    pub fn with_client_certificate(mut self, extensions: &http::Extensions) -> Self {
        self.client_certificate = extensions.get::<Arc<ClientCertificate>>().cloned();
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scope_keeps_one_value_per_type_and_finishes_once() {
        let scope = RequestScope::default();
        assert_eq!(scope.get_or_insert_with(|| 7u32), 7);
        assert_eq!(scope.get_or_insert_with(|| 8u32), 7, "made once");
        let statuses = Arc::new(Mutex::new(Vec::new()));
        let seen = statuses.clone();
        scope.on_finish(move |status| seen.lock().expect("lock").push(status));
        scope.finish(502);
        scope.finish(200);
        assert_eq!(*statuses.lock().expect("lock"), [502]);
    }
}

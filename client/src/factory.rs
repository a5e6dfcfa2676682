//! Building per-endpoint clients over shared connection pools.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::future::BoxFuture;
use http::header::{CONTENT_LENGTH, HOST, TRANSFER_ENCODING};
use http::uri::PathAndQuery;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use middleware::{Body, BoxError, RequestOptions};
use selector::{Algorithm, DoneInfo, Node, NodeFilter, SelectError, Selector};

use crate::applier::NodeApplier;
use crate::body::DoneBody;
use crate::error::{BuildError, Error};
use crate::pool::{NodePool, PoolSettings, Pools, Transport};
use crate::tls;
use crate::watcher::ServiceWatcher;

/// Default of [`ClientOptions::connect_timeout`].
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// Upstream connection settings shared by every client of a factory.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// TCP connect timeout per attempt (default [`DEFAULT_CONNECT_TIMEOUT`], 500 ms: below
    /// the 1 s default endpoint timeout, so a node that does not answer leaves time for a
    /// retry on another one; Kratos uses 200 ms).
    pub connect_timeout: Duration,
    /// How long an idle pooled connection is kept (default 90 s).
    pub pool_idle_timeout: Duration,
    /// Idle connections kept per node (default 256).
    pub pool_max_idle_per_host: usize,
    /// Largest response head accepted from a node, in bytes (default 64 KiB, as the
    /// downstream request side): status line and header lines as HTTP/1.1 writes them. A
    /// larger one fails the attempt (502) and is never passed on. (HTTP/2 nodes are also
    /// held to hyper's 16 KiB header-list limit.)
    pub max_response_header_size: usize,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            pool_idle_timeout: Duration::from_secs(90),
            pool_max_idle_per_host: 256,
            max_response_header_size: 64 * 1024,
        }
    }
}

/// What a client needs to know about the endpoint it serves: narrower than the whole
/// `configs::Endpoint`, so other users (a circuit breaker's backup service) can build one.
#[derive(Debug, Clone, Copy)]
pub struct ClientSpec<'a> {
    /// Names the client in logs and debug views, e.g. `GET /api/*`.
    pub name: &'a str,
    /// HTTP/1.1 or h2c (gRPC) towards the nodes; also picks the registry endpoint's scheme.
    pub protocol: configs::Protocol,
    /// Balancing algorithm: `p2c` (default when empty), `wrr` or `random`.
    pub selector: &'a str,
    /// The targets: `host:port`, `http(s)://host:port` or `discovery:///name`.
    pub backends: &'a [configs::Backend],
    /// Named TLS settings that backends refer to with `tlsConfigName`.
    pub tls_store: &'a BTreeMap<String, configs::Tls>,
}

/// Builds a [`Client`] per endpoint; owns the shared pools and the service watcher.
/// Cheap to clone: clones share the pools.
#[derive(Clone)]
pub struct Factory {
    options: ClientOptions,
    pools: Arc<Pools>,
    http1: Arc<Transport>,
    h2: Arc<Transport>,
    watcher: Option<Arc<ServiceWatcher>>,
}

impl Factory {
    /// A factory; `watcher` resolves `discovery:///` targets (None = no registry configured).
    /// Made inside a tokio runtime, it also sweeps idle connections out of its pools.
    pub fn new(options: ClientOptions, watcher: Option<Arc<ServiceWatcher>>) -> Self {
        let default_tls = tls::default_client_config();
        let pools = Pools::new(PoolSettings {
            connect_timeout: options.connect_timeout,
            idle_timeout: options.pool_idle_timeout,
            max_idle: options.pool_max_idle_per_host,
            max_buf_size: options.max_response_header_size.max(8192),
        });
        Self {
            options,
            pools,
            http1: Transport::new(default_tls.clone(), false),
            h2: Transport::new(default_tls, true),
            watcher,
        }
    }

    /// The service watcher, when a registry is configured.
    pub fn watcher(&self) -> Option<&Arc<ServiceWatcher>> {
        self.watcher.as_ref()
    }

    /// Builds the client of one endpoint: its selector, node applier and pool.
    pub fn build(&self, spec: &ClientSpec<'_>) -> Result<Client, BuildError> {
        let algorithm: Algorithm = spec.selector.parse().map_err(|_| BuildError::BadTarget {
            target: spec.selector.to_owned(),
            reason: "unknown selector (p2c, wrr or random)".into(),
        })?;
        let selector = selector::build(algorithm);
        let grpc = spec.protocol == configs::Protocol::Grpc;
        let custom_tls = spec.backends.iter().find(|b| !b.tls_config_name.is_empty());
        let transport = match custom_tls {
            Some(backend) => {
                let name = &backend.tls_config_name;
                let settings = spec.tls_store.get(name).ok_or_else(|| BuildError::Tls {
                    name: name.clone(),
                    reason: "not found in tlsStore".into(),
                })?;
                let config = tls::client_config(settings).map_err(|reason| BuildError::Tls {
                    name: name.clone(),
                    reason,
                })?;
                Transport::new(config, grpc)
            }
            None if grpc => self.h2.clone(),
            None => self.http1.clone(),
        };
        let applier = NodeApplier::new(spec, selector.clone(), self.watcher.clone())?;
        let version = if grpc {
            Version::HTTP_2
        } else {
            Version::HTTP_11
        };
        Ok(Client {
            inner: Arc::new(Inner {
                selector,
                pools: self.pools.clone(),
                transport,
                applier,
                version,
                max_response_header_size: self.options.max_response_header_size,
            }),
        })
    }
}

/// One endpoint's innermost RoundTripper. Cheap to clone.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    selector: Arc<dyn Selector>,
    pools: Arc<Pools>,
    transport: Arc<Transport>,
    applier: NodeApplier,
    version: Version,
    max_response_header_size: usize,
}

/// In one pass over a response's headers: the size of its head as HTTP/1.1 writes it (a
/// status line of at most 32 bytes, `name: value\r\n` per header; hyper's `max_buf_size`
/// alone does not bound it, since one read may bring in more than the buffer limit), and
/// whether it has a `Transfer-Encoding`.
fn head_facts(headers: &HeaderMap) -> (usize, bool) {
    const STATUS_LINE: usize = 32;
    let mut size = STATUS_LINE;
    let mut transfer_encoding = false;
    for (name, value) in headers {
        size += name.as_str().len() + value.len() + 4;
        transfer_encoding |= name == TRANSFER_ENCODING;
    }
    (size, transfer_encoding)
}

impl Client {
    /// The endpoint's selector (for debug views).
    pub fn selector(&self) -> &Arc<dyn Selector> {
        &self.inner.selector
    }

    /// Sends one attempt without a middleware chain: `options` supplies the filters and
    /// tried nodes and receives the picked node. The tower `Service` impl does the same with
    /// the options found in the request's extensions.
    ///
    /// The response keeps hyper's extensions: after a `101 Switching Protocols` it carries
    /// the upstream connection's `hyper::upgrade::OnUpgrade` (the HTTP/1.1 pools serve their
    /// connections with upgrades), so the caller can take the connection over for a tunnel.
    /// Such a response has an empty body, so the pick's `Done` is reported at once.
    pub async fn send(
        &self,
        req: Request<Body>,
        options: &RequestOptions,
    ) -> Result<Response<Body>, Error> {
        self.inner.round_trip(req, Some(options)).await
    }

    /// Stops the node applier (unsubscribes from the service watcher).
    pub fn close(&self) {
        self.inner.applier.close();
    }
}

impl tower::Service<Request<Body>> for Client {
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<Response<Body>, BoxError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        let inner = self.inner.clone();
        let options = req.extensions_mut().remove::<RequestOptions>();
        Box::pin(async move {
            inner
                .round_trip(req, options.as_ref())
                .await
                .map_err(BoxError::from)
        })
    }
}

impl Inner {
    fn pick(&self, options: Option<&RequestOptions>) -> Result<(Arc<Node>, selector::Done), Error> {
        let Some(options) = options else {
            return self.selector.select(&[]).map_err(|_| Error::NoNode);
        };
        if options.tried.is_empty() {
            return self
                .selector
                .select(&options.filters)
                .map_err(|_| Error::NoNode);
        }
        // Avoid nodes already tried while another one is available.
        let tried = options.tried.clone();
        let mut filters: Vec<NodeFilter> = options.filters.clone();
        filters.push(Arc::new(move |node: &Node| !tried.contains(&node.address)));
        match self.selector.select(&filters) {
            Ok(pick) => Ok(pick),
            Err(SelectError::NoAvailable) => self
                .selector
                .select(&options.filters)
                .map_err(|_| Error::NoNode),
        }
    }

    async fn round_trip(
        &self,
        mut req: Request<Body>,
        options: Option<&RequestOptions>,
    ) -> Result<Response<Body>, Error> {
        let (node, done) = self.pick(options)?;
        if let Some(options) = options {
            options.backend.set(node.clone());
        }
        // An HTTP/2 request carries its host in the URI (`:authority`); keep it as `Host`
        // before the URI is re-addressed. (Origin-form HTTP/1.1 URIs have no authority.)
        if let Some(authority) = req.uri().authority()
            && !req.headers().contains_key(HOST)
            && let Ok(value) = HeaderValue::from_str(authority.as_str())
        {
            req.headers_mut().insert(HOST, value);
        }
        // As in Kratos, a node's `metadata.host` is the Host the upstream sees (virtual hosts
        // behind one address).
        if let Some(host) = node.metadata.get("host").filter(|host| !host.is_empty())
            && let Ok(value) = HeaderValue::from_str(host)
        {
            req.headers_mut().insert(HOST, value);
        }
        let pool: Arc<NodePool> = node
            .transport
            .get_or_try_init(|| {
                self.pools
                    .node_pool(&node.address, node.tls, &self.transport)
            })
            .cloned()
            .ok_or_else(|| Error::BadAddress {
                address: node.address.clone(),
            })?;
        // Re-address the request, keeping its path and query (no copy of them): origin-form
        // for HTTP/1.1 (with a Host when the request had none), absolute for HTTP/2.
        let mut parts = std::mem::take(req.uri_mut()).into_parts();
        if pool.is_h2() {
            parts.scheme = Some(pool.scheme.clone());
            parts.authority = Some(pool.authority.clone());
        } else {
            parts.scheme = None;
            parts.authority = None;
            if !req.headers().contains_key(HOST)
                && let Ok(value) = HeaderValue::from_str(pool.authority.as_str())
            {
                req.headers_mut().insert(HOST, value);
            }
        }
        if parts.path_and_query.is_none() {
            parts.path_and_query = Some(PathAndQuery::from_static("/"));
        }
        *req.uri_mut() = Uri::from_parts(parts).map_err(|source| Error::InvalidUri {
            address: node.address.clone(),
            source: source.into(),
        })?;
        *req.version_mut() = self.version;
        match pool.send(req).await {
            Ok((response, lease)) => {
                let (head_size, has_transfer_encoding) = head_facts(response.headers());
                if head_size > self.max_response_header_size {
                    done.done(DoneInfo { success: false });
                    return Err(Error::ResponseHeadTooLarge {
                        address: node.address.clone(),
                        limit: self.max_response_header_size,
                    });
                }
                let success = !response.status().is_server_error();
                // `parts` keeps the extensions (an upgrade's `OnUpgrade` among them).
                let (mut parts, body) = response.into_parts();
                // Both framings: hyper reads the body by `Transfer-Encoding`, so the
                // `Content-Length` is a lie that would frame a truncated body as complete
                // downstream (RFC 9112 §6.3: Transfer-Encoding overrides it).
                if has_transfer_encoding {
                    parts.headers.remove(CONTENT_LENGTH);
                }
                // After a 101 the connection belongs to the upgrade, never to the pool.
                let lease = lease.filter(|_| parts.status != StatusCode::SWITCHING_PROTOCOLS);
                let body = if http_body::Body::is_end_stream(&body) {
                    if let Some(lease) = lease {
                        lease.release();
                    }
                    done.done(DoneInfo { success });
                    body.map_err(BoxError::from).boxed_unsync()
                } else {
                    DoneBody::with_lease(body, done, success, lease).boxed_unsync()
                };
                Ok(Response::from_parts(parts, body))
            }
            Err(error) => {
                done.done(DoneInfo { success: false });
                Err(error)
            }
        }
    }
}

//! Upstream connections, pooled per node, over hyper's `client::conn` APIs.
//!
//! # Why not hyper-util's pooled client
//! hyper-util's legacy `Client` keys one pool by `(scheme, authority)` in a SipHash map,
//! checks a connection out and back in through that map on every request, and moves the
//! request's future several times through boxed and `select`ed layers. In callgrind on the
//! benchmark (one keep-alive HTTP/1.1 request through the gateway) that was about 6k of the
//! ~41k instructions of a request: the checkout and return (map lookups, hashing, a spawned
//! task per response waiting for the connection to be reusable) and the copies of the
//! future. Here a node finds its pool once, when the node is first used (the pool is cached
//! in the node's `TransportCache`), and a request pops a ready sender from a short `Vec`.
//!
//! # What a pool does
//! - HTTP/1.1 requests without a body (and not upgrades) go through the gateway's own
//!   exchange ([`crate::h1`]) on connections of their own list: LIFO, the warmest first; a
//!   connection goes back when its response body has been read to the end. A GET or
//!   another idempotent request that finds its reused connection closed by the node before
//!   any byte of a response is sent again on a new connection; other methods first check
//!   that the idle connection is still open.
//! - Other HTTP/1.1 requests: hyper's connections, idle in a LIFO list; a sender whose
//!   connection closed, or that is not yet ready for another request, is passed over. The
//!   sender goes back to the list when the response body has been read to its end
//!   ([`Lease`]); a body dropped early closes the connection (hyper cannot reuse it). A
//!   request refused by a pooled connection before anything was written (the node closed it
//!   while idle) is sent again on a new connection. Connections serve upgrades (WebSocket).
//! - HTTP/2 (gRPC, h2c or TLS with ALPN `h2`): one shared connection per node, replaced when
//!   it closes.
//! - Dialing: `connect_timeout` per attempt, `TCP_NODELAY`, TCP keep-alive after 60 s, then
//!   TLS (rustls, ALPN `http/1.1` or `h2`) for secure nodes. Failures are `Error::Connect`.
//! - Pools are shared by every endpoint that reaches the same node through the same
//!   transport. The factory keeps every pool that is in use or still holds idle
//!   connections, so neither a reload nor a registry update (both make new `Node`s) drops
//!   warm connections. A sweeper closes connections idle longer than `pool_idle_timeout`
//!   and forgets pools nobody uses that hold none.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::header::{TRANSFER_ENCODING, UPGRADE};
use http::uri::{Authority, Scheme};
use http::{Method, Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use middleware::{Body, BoxError};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::body::UpstreamBody;
use crate::error::Error;
use crate::h1;

/// How upstream connections are made: plain or TLS settings, HTTP/1.1 or HTTP/2. A factory
/// has one for HTTP/1.1 and one for HTTP/2, and an endpoint with its own `tlsConfigName`
/// gets its own.
pub(crate) struct Transport {
    id: usize,
    h2: bool,
    tls: TlsConnector,
}

impl Transport {
    pub(crate) fn new(mut tls: rustls::ClientConfig, h2: bool) -> Arc<Self> {
        static NEXT_ID: AtomicUsize = AtomicUsize::new(0);
        tls.alpn_protocols = vec![if h2 {
            b"h2".to_vec()
        } else {
            b"http/1.1".to_vec()
        }];
        Arc::new(Self {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            h2,
            tls: TlsConnector::from(Arc::new(tls)),
        })
    }
}

/// Settings of every pool of a factory.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PoolSettings {
    pub(crate) connect_timeout: Duration,
    pub(crate) idle_timeout: Duration,
    pub(crate) max_idle: usize,
    pub(crate) max_buf_size: usize,
}

type PoolKey = (String, bool, usize);

/// The pools of one factory, by node address, security and transport.
pub(crate) struct Pools {
    settings: PoolSettings,
    /// Every pool in use (a node holds it) or holding idle connections.
    map: Mutex<HashMap<PoolKey, Arc<NodePool>>>,
}

impl Pools {
    /// The pools, with a sweeper task when a tokio runtime is running (it ends with the
    /// last clone of the returned `Arc`).
    pub(crate) fn new(settings: PoolSettings) -> Arc<Self> {
        let pools = Arc::new(Self {
            settings,
            map: Mutex::new(HashMap::new()),
        });
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let weak = Arc::downgrade(&pools);
            let period = (settings.idle_timeout / 4).max(Duration::from_millis(250));
            runtime.spawn(async move {
                let mut tick = tokio::time::interval(period);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                tick.tick().await;
                loop {
                    tick.tick().await;
                    let Some(pools) = weak.upgrade() else { return };
                    pools.sweep();
                }
            });
        }
        pools
    }

    /// The pool of `address` (`host:port`) through `transport`, shared with every other
    /// user of the same node and transport.
    pub(crate) fn node_pool(
        &self,
        address: &str,
        tls: bool,
        transport: &Arc<Transport>,
    ) -> Option<Arc<NodePool>> {
        let key = (address.to_owned(), tls, transport.id);
        let mut map = lock(&self.map);
        if let Some(pool) = map.get(&key) {
            return Some(pool.clone());
        }
        let pool = Arc::new(NodePool::new(
            address,
            tls,
            transport.clone(),
            self.settings,
        )?);
        // Without a sweeper (no runtime at start), forget unused pools here.
        map.retain(|_, pool| !pool.forgettable());
        map.insert(key, pool.clone());
        Some(pool)
    }

    fn sweep(&self) {
        lock(&self.map).retain(|_, pool| {
            pool.sweep(Arc::strong_count(pool) == 1);
            !pool.forgettable()
        });
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        lock(&self.map).len()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A connection waiting in a pool, and since when.
struct Idle<C> {
    conn: C,
    since: Instant,
}

/// Pushes `conn` on top of `list` (the warmest is taken first), dropping the coldest when
/// `max` are already waiting; nothing is kept with `max` 0.
fn push_idle<C>(list: &Mutex<Vec<Idle<C>>>, max: usize, conn: C) {
    if max == 0 {
        return;
    }
    let mut idle = lock(list);
    if idle.len() >= max {
        idle.remove(0);
    }
    idle.push(Idle {
        conn,
        since: Instant::now(),
    });
}

/// The connections to one node through one transport.
pub(crate) struct NodePool {
    /// `host:port` as configured (dialed through the resolver when it is not an IP).
    address: String,
    /// `address` when it is an IP literal.
    socket_addr: Option<SocketAddr>,
    pub(crate) authority: Authority,
    pub(crate) scheme: Scheme,
    server_name: Option<ServerName<'static>>,
    transport: Arc<Transport>,
    settings: PoolSettings,
    idle: Mutex<Vec<Idle<http1::SendRequest<Body>>>>,
    idle_raw: Mutex<Vec<Idle<h1::Conn>>>,
    shared_h2: Mutex<Option<http2::SendRequest<Body>>>,
}

impl NodePool {
    fn new(
        address: &str,
        tls: bool,
        transport: Arc<Transport>,
        settings: PoolSettings,
    ) -> Option<Self> {
        let authority: Authority = address.parse().ok()?;
        authority.port_u16()?;
        let host = authority.host();
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        let server_name = if tls {
            Some(ServerName::try_from(host.to_owned()).ok()?)
        } else {
            None
        };
        Some(Self {
            address: address.to_owned(),
            socket_addr: address.parse().ok(),
            authority,
            scheme: if tls { Scheme::HTTPS } else { Scheme::HTTP },
            server_name,
            transport,
            settings,
            idle: Mutex::new(Vec::new()),
            idle_raw: Mutex::new(Vec::new()),
            shared_h2: Mutex::new(None),
        })
    }

    /// Whether requests through this pool go out as HTTP/2.
    pub(crate) fn is_h2(&self) -> bool {
        self.transport.h2
    }

    /// Sends `req` (its URI already in the form the protocol wants) on a pooled or a new
    /// connection. An HTTP/1.1 response comes with the [`Lease`] that returns the connection
    /// once its body is read.
    pub(crate) async fn send(
        self: &Arc<Self>,
        mut req: Request<Body>,
    ) -> Result<(Response<UpstreamBody>, Option<Lease>), Error> {
        // The dialing futures (TCP, TLS, handshake) are boxed: inline, they would make every
        // request's future several KiB larger, copied on each move.
        if self.transport.h2 {
            return Box::pin(self.send_h2(req))
                .await
                .map(|response| (response.map(UpstreamBody::Left), None));
        }
        if own_exchange(&req) {
            return self.send_raw(req).await.map(|response| (response, None));
        }
        loop {
            let (mut sender, reused) = match self.take_idle() {
                Some(sender) => (sender, true),
                None => (Box::pin(self.dial_h1()).await?, false),
            };
            match sender.try_send_request(req).await {
                Ok(response) => {
                    let lease = Lease {
                        pool: self.clone(),
                        sender,
                    };
                    return Ok((response.map(UpstreamBody::Left), Some(lease)));
                }
                Err(mut refused) => match refused.take_message() {
                    // Never written: the pooled connection closed while idle. Try again.
                    Some(unsent) if reused => req = unsent,
                    _ => return Err(self.upstream_error(refused.into_error())),
                },
            }
        }
    }

    /// A request without a body through the gateway's own exchange.
    async fn send_raw(
        self: &Arc<Self>,
        req: Request<Body>,
    ) -> Result<Response<UpstreamBody>, Error> {
        let (head, _empty) = req.into_parts();
        let idempotent = head.method.is_idempotent();
        loop {
            let (conn, reused) = match self.take_raw(!idempotent) {
                Some(conn) => (conn, true),
                None => (h1::Conn::new(Box::pin(self.connect()).await?), false),
            };
            match conn.exchange(&head, self.settings.max_buf_size).await {
                Ok((response, framing, conn)) => {
                    let home: Arc<dyn h1::Release> = self.clone();
                    let body = h1::RawBody::new(conn, framing, home);
                    return Ok(response.map(|()| UpstreamBody::Right(body)));
                }
                Err(h1::Failure::Closed(_)) if reused && idempotent => {}
                Err(h1::Failure::Closed(error)) => return Err(self.upstream_error(error)),
                Err(h1::Failure::Broken(error)) => return Err(self.upstream_error(error)),
                Err(h1::Failure::HeadTooLarge) => {
                    return Err(Error::ResponseHeadTooLarge {
                        address: self.address.clone(),
                        limit: self.settings.max_buf_size,
                    });
                }
            }
        }
    }

    /// The most recently used idle connection of the own exchange; with `check`, only one
    /// that is still open.
    fn take_raw(&self, check: bool) -> Option<h1::Conn> {
        let mut idle = lock(&self.idle_raw);
        while let Some(mut idle_conn) = idle.pop() {
            if !check || idle_conn.conn.is_open() {
                return Some(idle_conn.conn);
            }
        }
        None
    }

    async fn send_h2(&self, req: Request<Body>) -> Result<Response<Incoming>, Error> {
        let pooled = lock(&self.shared_h2)
            .as_ref()
            .filter(|sender| !sender.is_closed())
            .cloned();
        let (mut sender, reused) = match pooled {
            Some(sender) => (sender, true),
            None => {
                let sender = self.dial_h2().await?;
                *lock(&self.shared_h2) = Some(sender.clone());
                (sender, false)
            }
        };
        match sender.try_send_request(req).await {
            Ok(response) => Ok(response),
            Err(mut refused) => match refused.take_message() {
                Some(unsent) if reused => {
                    let mut sender = self.dial_h2().await?;
                    *lock(&self.shared_h2) = Some(sender.clone());
                    sender
                        .send_request(unsent)
                        .await
                        .map_err(|error| self.upstream_error(error))
                }
                _ => Err(self.upstream_error(refused.into_error())),
            },
        }
    }

    fn upstream_error(&self, source: impl Into<BoxError>) -> Error {
        Error::Upstream {
            address: self.address.clone(),
            source: source.into(),
        }
    }

    fn connect_error(&self, source: impl Into<BoxError>) -> Error {
        Error::Connect {
            address: self.address.clone(),
            source: source.into(),
        }
    }

    /// A ready idle sender, the most recently used first.
    fn take_idle(&self) -> Option<http1::SendRequest<Body>> {
        let mut idle = lock(&self.idle);
        let mut i = idle.len();
        while i > 0 {
            i -= 1;
            if idle[i].conn.is_closed() {
                idle.remove(i);
            } else if idle[i].conn.is_ready() {
                return Some(idle.remove(i).conn);
            }
        }
        None
    }

    fn put_idle(&self, sender: http1::SendRequest<Body>) {
        if !sender.is_closed() {
            push_idle(&self.idle, self.settings.max_idle, sender);
        }
    }

    #[cfg(test)]
    pub(crate) fn idle_raw_len(&self) -> usize {
        lock(&self.idle_raw).len()
    }

    /// Nobody but the factory holds it and it has no connection to keep.
    fn forgettable(self: &Arc<Self>) -> bool {
        Arc::strong_count(self) == 1
            && lock(&self.idle).is_empty()
            && lock(&self.idle_raw).is_empty()
            && lock(&self.shared_h2).is_none()
    }

    /// Closes idle HTTP/1.1 connections past the idle timeout, forgets closed ones, and
    /// closes the HTTP/2 connection of a pool no node uses any more.
    fn sweep(&self, unused: bool) {
        let timeout = self.settings.idle_timeout;
        lock(&self.idle).retain(|idle| !idle.conn.is_closed() && idle.since.elapsed() < timeout);
        lock(&self.idle_raw)
            .retain_mut(|idle| idle.since.elapsed() < timeout && idle.conn.is_open());
        let mut h2 = lock(&self.shared_h2);
        if unused || h2.as_ref().is_some_and(http2::SendRequest::is_closed) {
            *h2 = None;
        }
    }

    async fn dial_h1(&self) -> Result<http1::SendRequest<Body>, Error> {
        let io = self.connect().await?;
        let (sender, connection) = http1::Builder::new()
            .max_buf_size(self.settings.max_buf_size)
            .handshake(TokioIo::new(io))
            .await
            .map_err(|error| self.connect_error(error))?;
        tokio::spawn(async move {
            if let Err(error) = connection.with_upgrades().await {
                tracing::debug!(%error, "upstream connection ended");
            }
        });
        Ok(sender)
    }

    async fn dial_h2(&self) -> Result<http2::SendRequest<Body>, Error> {
        let io = self.connect().await?;
        let (sender, connection) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(TokioIo::new(io))
            .await
            .map_err(|error| self.connect_error(error))?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "upstream connection ended");
            }
        });
        Ok(sender)
    }

    /// TCP (bounded by the connect timeout), then TLS for a secure node.
    async fn connect(&self) -> Result<Stream, Error> {
        let timeout = self.settings.connect_timeout;
        let tcp = match self.socket_addr {
            Some(addr) => tokio::time::timeout(timeout, TcpStream::connect(addr)).await,
            None => tokio::time::timeout(timeout, TcpStream::connect(self.address.as_str())).await,
        };
        let tcp = match tcp {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(error)) => return Err(self.connect_error(error)),
            Err(_) => {
                return Err(self.connect_error(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no connection within {timeout:?}"),
                )));
            }
        };
        tcp.set_nodelay(true)
            .map_err(|error| self.connect_error(error))?;
        let keepalive = socket2::TcpKeepalive::new().with_time(Duration::from_secs(60));
        socket2::SockRef::from(&tcp)
            .set_tcp_keepalive(&keepalive)
            .map_err(|error| self.connect_error(error))?;
        match &self.server_name {
            None => Ok(Stream::Plain(tcp)),
            Some(name) => {
                let tls = self
                    .transport
                    .tls
                    .connect(name.clone(), tcp)
                    .await
                    .map_err(|error| self.connect_error(error))?;
                Ok(Stream::Tls(Box::new(tls)))
            }
        }
    }
}

/// An HTTP/1.1 connection lent to one response: back to its pool when the body has been
/// read to the end ([`Lease::release`]); dropped otherwise.
pub(crate) struct Lease {
    pool: Arc<NodePool>,
    sender: http1::SendRequest<Body>,
}

impl Lease {
    pub(crate) fn release(self) {
        self.pool.put_idle(self.sender);
    }
}

impl h1::Release for NodePool {
    fn release(&self, conn: h1::Conn) {
        push_idle(&self.idle_raw, self.settings.max_idle, conn);
    }
}

/// Whether `req` goes through the gateway's own exchange: HTTP/1.1 without a body and
/// without an upgrade (hyper hands upgraded connections over; [`crate::h1`] does not).
fn own_exchange(req: &Request<Body>) -> bool {
    http_body::Body::is_end_stream(req.body())
        && req.method() != Method::CONNECT
        // One walk over the few fields of a request instead of two hashed lookups.
        && !req
            .headers()
            .keys()
            .any(|name| name == UPGRADE || name == TRANSFER_ENCODING)
}

/// A plain or TLS upstream connection.
pub(crate) enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(tcp) => Pin::new(tcp).poll_read(cx, buf),
            Stream::Tls(tls) => Pin::new(tls).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(tcp) => Pin::new(tcp).poll_write(cx, buf),
            Stream::Tls(tls) => Pin::new(tls).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(tcp) => Pin::new(tcp).poll_write_vectored(cx, bufs),
            Stream::Tls(tls) => Pin::new(tls).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(tcp) => tcp.is_write_vectored(),
            Stream::Tls(tls) => tls.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(tcp) => Pin::new(tcp).poll_flush(cx),
            Stream::Tls(tls) => Pin::new(tls).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(tcp) => Pin::new(tcp).poll_shutdown(cx),
            Stream::Tls(tls) => Pin::new(tls).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> PoolSettings {
        PoolSettings {
            connect_timeout: Duration::from_millis(500),
            idle_timeout: Duration::from_secs(90),
            max_idle: 4,
            max_buf_size: 64 * 1024,
        }
    }

    #[tokio::test]
    async fn a_node_shares_its_pool_until_the_last_user_drops_it() {
        let pools = Pools::new(settings());
        let http1 = Transport::new(crate::tls::default_client_config(), false);
        let h2 = Transport::new(crate::tls::default_client_config(), true);
        let a = pools.node_pool("127.0.0.1:80", false, &http1).unwrap();
        let b = pools.node_pool("127.0.0.1:80", false, &http1).unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        let other = pools.node_pool("127.0.0.1:80", false, &h2).unwrap();
        assert!(!Arc::ptr_eq(&a, &other));
        let secure = pools.node_pool("127.0.0.1:80", true, &http1).unwrap();
        assert_eq!(secure.scheme, Scheme::HTTPS);
        assert!(pools.node_pool("no-port", false, &http1).is_none());
        drop((a, b, other, secure));
        pools.sweep();
        assert_eq!(pools.len(), 0);
    }

    /// An HTTP/1.1 server answering `ok`, counting the connections it accepts.
    async fn counting_server() -> (String, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let service = hyper::service::service_fn(|_| async {
                    Ok::<_, std::convert::Infallible>(Response::new(http_body_util::Full::new(
                        bytes::Bytes::from_static(b"ok"),
                    )))
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service),
                );
            }
        });
        (address, accepted)
    }

    /// One GET through `pool`, its body read to the end.
    async fn get(pool: &Arc<NodePool>) {
        use http_body_util::BodyExt;
        let body = http_body_util::Empty::new()
            .map_err(|never| match never {})
            .boxed_unsync();
        let request = Request::builder()
            .uri("/")
            .header(http::header::HOST, "node")
            .body(body)
            .unwrap();
        let (response, lease) = pool.send(request).await.unwrap();
        assert!(lease.is_none(), "a GET goes through the own exchange");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "ok");
        assert_eq!(
            lock(&pool.idle_raw).len(),
            1,
            "the connection is back in the pool once its body was read"
        );
    }

    #[tokio::test]
    async fn idle_connections_outlive_the_nodes_that_made_them_until_the_idle_timeout() {
        let (address, accepted) = counting_server().await;
        let pools = Pools::new(PoolSettings {
            idle_timeout: Duration::from_millis(200),
            ..settings()
        });
        let http1 = Transport::new(crate::tls::default_client_config(), false);
        let pool = pools.node_pool(&address, false, &http1).unwrap();
        get(&pool).await;
        get(&pool).await;
        // A reload or a registry update replaces the node: its pool and connection stay.
        drop(pool);
        pools.sweep();
        let pool = pools.node_pool(&address, false, &http1).unwrap();
        get(&pool).await;
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            1,
            "one connection for all three"
        );
        // Unused past the idle timeout: the connection is closed, the pool forgotten.
        drop(pool);
        std::thread::sleep(Duration::from_millis(250));
        pools.sweep();
        assert_eq!(pools.len(), 0);
        let pool = pools.node_pool(&address, false, &http1).unwrap();
        get(&pool).await;
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }
}

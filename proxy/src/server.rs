//! The downstream HTTP server: HTTP/1.1 and h2c on one port (or HTTP/1.1 and h2 over TLS on
//! an HTTPS listener), with bounded limits and graceful shutdown. Both listener kinds share
//! the per-connection serving, so a request is served the same way on either.
//!
//! No wait is unbounded: a connection has `header_read_timeout` to send a request head (the
//! HTTP/2 preface included, see `clock`), `idle_timeout` between requests, a request body
//! may pause for at most `read_timeout`, a write may make no progress for at most
//! `write_timeout`, and at most `max_connections` connections are open at once.
//!
//! An idle HTTP/1.1 connection holds no buffers: hyper keeps a read buffer and a write
//! buffer per connection for its whole life (24 KiB here, never shrunk), so once a
//! connection has been idle for `clock::PARK_AFTER` with its last response written, the
//! server takes the stream back from hyper (`poll_without_shutdown`, `into_parts`, with any
//! bytes hyper had read ahead), waits for the socket to become readable, and serves the next
//! request with a new hyper connection. A parked connection costs its socket, its clock and
//! a small task. Driving hyper this way leaves upgrades to the server (see `upgrade`).

mod clock;
mod io;
mod limit;
mod read_timeout;
pub(crate) mod upgrade;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use std::pin::Pin;

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::{HttpService, service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::task::TaskTracker;

use crate::edge::Edge;
use crate::metrics::Metrics;
use crate::tls::{TlsAcceptor, client_certificate};
use clock::{Activity, ConnectionClock, Expiry, ExpiryCounters, Settings, TrackedBody, Wake};
use io::{Park, Prefixed, WatchedIo};
use limit::ConnectionSlot;
pub use limit::{ConnectionLimit, DEFAULT_MAX_CONNECTIONS};
pub use read_timeout::BodyReadTimeout;
use read_timeout::ReadTimeoutBody;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use upgrade::UpgradeSlot;

/// Limits of the downstream server; none is left unbounded.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Time a client has to send a complete request head, counted from the connection's
    /// start (after the TLS handshake on HTTPS listeners) or from the first byte of the
    /// next request on a keep-alive connection; also bounds the HTTP/2 preface (default
    /// 15 s). A connection that runs out is closed.
    pub header_read_timeout: Duration,
    /// Time a connection with no request open may wait for the next one (HTTP/1.1
    /// keep-alive, or an HTTP/2 connection without streams) before it is closed
    /// (default 120 s, Kratos' `PROXY_IDLE_TIMEOUT`).
    pub idle_timeout: Duration,
    /// Longest pause while a request body is being read; a client that stops sending
    /// mid-body gets 408 and the upstream call is aborted (default 15 s).
    pub read_timeout: Duration,
    /// Longest time a write to the client may make no progress; a client that stops
    /// reading is disconnected. A response that keeps flowing is never cut (default 15 s).
    pub write_timeout: Duration,
    /// Largest request head accepted, in bytes (default 64 KiB); larger gets 431.
    pub max_header_size: usize,
    /// Concurrent streams per HTTP/2 connection (default 100, as nginx and Go): with the
    /// read timeout, it bounds the upstream connections one client connection can hold.
    pub max_concurrent_streams: u32,
    /// HTTP/2 keep-alive ping interval; a peer that does not answer within the same time
    /// is dropped (default 30 s).
    pub h2_keep_alive: Duration,
    /// How long shutdown waits for in-flight requests (default 30 s).
    pub shutdown_grace: Duration,
    /// Open downstream connections allowed at once, shared by every listener given a
    /// clone of these options (default [`DEFAULT_MAX_CONNECTIONS`]).
    pub max_connections: ConnectionLimit,
}

/// Default of [`ServerOptions::header_read_timeout`].
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(15);
/// Default of [`ServerOptions::idle_timeout`].
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// Default of [`ServerOptions::read_timeout`].
pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(15);
/// Default of [`ServerOptions::write_timeout`].
pub const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_secs(15);
/// Default of [`ServerOptions::max_concurrent_streams`].
pub const DEFAULT_MAX_CONCURRENT_STREAMS: u32 = 100;

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            read_timeout: DEFAULT_READ_TIMEOUT,
            write_timeout: DEFAULT_WRITE_TIMEOUT,
            max_header_size: 64 * 1024,
            max_concurrent_streams: DEFAULT_MAX_CONCURRENT_STREAMS,
            h2_keep_alive: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(30),
            max_connections: ConnectionLimit::default(),
        }
    }
}

impl ServerOptions {
    /// The timeouts every connection of a listener shares, with their counters.
    fn settings(&self, metrics: &Metrics) -> Arc<Settings> {
        let counter = |kind: &str| metrics.downstream_timeouts.with_label_values(&[kind]);
        Arc::new(Settings {
            header_read_timeout: self.header_read_timeout,
            idle_timeout: self.idle_timeout,
            read_timeout: self.read_timeout,
            write_timeout: self.write_timeout,
            expired: ExpiryCounters {
                header: counter("header"),
                idle: counter("idle"),
                body: counter("body"),
                write: counter("write"),
            },
        })
    }
}

/// Takes a place under the connection cap for a connection just accepted; beyond the cap
/// the connection is closed at once (dropping the socket) and counted.
fn admit(options: &ServerOptions, metrics: &Metrics, remote: SocketAddr) -> Option<ConnectionSlot> {
    let slot = options
        .max_connections
        .admit(&metrics.connections, &metrics.connections_refused);
    if slot.is_none() {
        tracing::debug!(%remote, "connection refused: too many open connections");
    }
    slot
}

/// Accepts connections on `listener` until `shutdown`, then stops accepting and waits up to
/// `shutdown_grace` for open requests to finish. Every request enters `edge`.
pub async fn serve(
    listener: TcpListener,
    options: ServerOptions,
    edge: Arc<Edge>,
    shutdown: CancellationToken,
) {
    let builders = Arc::new(Builders::new(&options));
    let settings = options.settings(edge.metrics());
    let connections = TaskTracker::new();
    while let Some((stream, remote)) = accept(&listener, &shutdown).await {
        let Some(slot) = admit(&options, edge.metrics(), remote) else {
            continue;
        };
        connections.spawn(serve_connection(
            builders.clone(),
            shutdown.clone(),
            stream,
            slot,
            &settings,
            &edge,
            remote,
            |_: &mut Request<Incoming>| {},
        ));
    }
    drop(listener);
    drain(connections, options.shutdown_grace).await;
}

/// [`serve`] for an HTTPS listener: each accepted connection first completes a TLS
/// handshake (bounded by the acceptor's handshake timeout, and abandoned at shutdown), then
/// is served exactly as a plain one. A connection is counted open (and under the cap) from
/// its accept.
pub async fn serve_tls(
    listener: TcpListener,
    options: ServerOptions,
    tls: TlsAcceptor,
    edge: Arc<Edge>,
    shutdown: CancellationToken,
) {
    let builders = Arc::new(Builders::new(&options));
    let settings = options.settings(edge.metrics());
    let connections = TaskTracker::new();
    while let Some((stream, remote)) = accept(&listener, &shutdown).await {
        let Some(slot) = admit(&options, edge.metrics(), remote) else {
            continue;
        };
        let (tls, builders, edge, shutdown, settings) = (
            tls.clone(),
            builders.clone(),
            edge.clone(),
            shutdown.clone(),
            settings.clone(),
        );
        connections.spawn(async move {
            let handshake = tokio::select! {
                () = shutdown.cancelled() => return,
                handshake = tls.accept(stream) => handshake,
            };
            match handshake {
                Ok(stream) => {
                    let certificate = client_certificate(&stream);
                    let tag = move |req: &mut Request<Incoming>| {
                        if let Some(certificate) = &certificate {
                            req.extensions_mut().insert(certificate.clone());
                        }
                    };
                    serve_connection(
                        builders, shutdown, stream, slot, &settings, &edge, remote, tag,
                    )
                    .await;
                }
                Err(err) => tracing::debug!(%remote, %err, "tls connection dropped"),
            }
        });
    }
    drop(listener);
    drain(connections, options.shutdown_grace).await;
}

/// The HTTP server settings shared by every connection of a listener.
struct Builders {
    http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
}

impl Builders {
    fn new(options: &ServerOptions) -> Self {
        let mut http1 = http1::Builder::new();
        // hyper's own header timer would also cut idle keep-alive connections at the header
        // timeout; the connection clock runs both waits instead (see `clock`).
        http1
            .header_read_timeout(None)
            .max_buf_size(options.max_header_size.max(8192));
        let mut http2 = http2::Builder::new(TokioExecutor::new());
        http2
            .timer(TokioTimer::new())
            .max_concurrent_streams(options.max_concurrent_streams)
            .max_header_list_size(options.max_header_size as u32)
            .keep_alive_interval(options.h2_keep_alive)
            .keep_alive_timeout(options.h2_keep_alive);
        Self { http1, http2 }
    }
}

/// The next connection, or `None` once `shutdown` is cancelled.
async fn accept(
    listener: &TcpListener,
    shutdown: &CancellationToken,
) -> Option<(TcpStream, SocketAddr)> {
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => return None,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, remote)) => {
                let _ = stream.set_nodelay(true);
                return Some((stream, remote));
            }
            Err(err) => {
                // Out of descriptors and similar: back off briefly instead of spinning.
                tracing::warn!(%err, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Serves HTTP/1.1 or HTTP/2 on one connection (plain or TLS), every request through
/// `edge`, until the client leaves, `shutdown` completes it gracefully, or the connection's
/// clock runs out (no head within the header timeout, or idle too long). `tag` adds what the
/// connection knows to each request (a TLS client certificate); a plain listener passes a
/// no-op, which compiles away.
#[allow(clippy::too_many_arguments)]
fn serve_connection<S, Tag>(
    builders: Arc<Builders>,
    shutdown: CancellationToken,
    stream: S,
    slot: ConnectionSlot,
    settings: &Arc<Settings>,
    edge: &Arc<Edge>,
    remote: SocketAddr,
    tag: Tag,
) -> impl Future<Output = ()> + Send + 'static
where
    S: AsyncRead + AsyncWrite + Park + Unpin + Send + 'static,
    Tag: Fn(&mut Request<Incoming>) + Clone + Unpin + Send + Sync + 'static,
{
    let activity = Arc::new(Activity::new(settings.clone()));
    let io = WatchedIo::new(stream, activity.clone(), slot);
    let upgrades = Arc::new(UpgradeSlot::default());
    let service_edge = edge.clone();
    let service_activity = activity.clone();
    let service_upgrades = upgrades.clone();
    let service = service_fn(move |mut req: Request<Incoming>| {
        tag(&mut req);
        if req.version() != http::Version::HTTP_2 {
            service_upgrades.offer(&mut req);
        }
        // Open from here until the response body ends (or the request is dropped).
        let open = service_activity.request_opened();
        let settings = service_activity.settings().clone();
        let req = req.map(|body| ReadTimeoutBody::new(body, settings));
        let edge = service_edge.clone();
        // Boxed: hyper's `poll_without_shutdown` wants an `Unpin` future (and a pending
        // request then costs its connection's task nothing). Built in its box, and the
        // edge's future is made inside it, so neither is copied.
        crate::boxed_with(move || async move {
            let response: Response<_> = match edge.call(req, remote).await {
                Ok(response) => response,
                Err(never) => match never {},
            };
            Ok::<_, std::convert::Infallible>(response.map(|body| TrackedBody::new(body, open)))
        })
    });
    let mut connection = Connection {
        clock: ConnectionClock::new(activity.clone()),
        builders,
        shutdown,
        upgrades,
    };
    async move {
        match connection.serve(io, service).await {
            Ok(Ended::Done) => {}
            Ok(Ended::Expired(expiry)) => {
                let counters = &activity.settings().expired;
                match expiry {
                    Expiry::Header => counters.header.inc(),
                    Expiry::Idle => counters.idle.inc(),
                }
                tracing::debug!(%remote, ?expiry, "connection closed by its timeout");
            }
            Err(err) => tracing::debug!(%remote, %err, "connection ended with an error"),
        }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A downstream stream the server can serve: TCP, or TLS over TCP.
trait Stream: AsyncRead + AsyncWrite + Park + Unpin + Send + 'static {}

impl<S: AsyncRead + AsyncWrite + Park + Unpin + Send + 'static> Stream for S {}

/// The service of a connection: the edge behind hyper's `service_fn`, cloned into every
/// hyper connection an HTTP/1.1 connection goes through, its future boxed (`Unpin`).
trait EdgeService:
    HttpService<
        Incoming,
        ResBody = TrackedBody<middleware::Body>,
        Future: Unpin + Send + 'static,
        Error: Into<BoxError>,
    > + Clone
    + Unpin
{
}

impl<T> EdgeService for T where
    T: HttpService<
            Incoming,
            ResBody = TrackedBody<middleware::Body>,
            Future: Unpin + Send + 'static,
            Error: Into<BoxError>,
        > + Clone
        + Unpin
{
}

/// How a connection ended, when it did not fail.
enum Ended {
    /// The client left, the connection was upgraded, or a graceful shutdown completed it.
    Done,
    /// Its clock ran out.
    Expired(Expiry),
}

/// What one connection's serving needs besides its stream and service.
struct Connection {
    clock: ConnectionClock,
    builders: Arc<Builders>,
    shutdown: CancellationToken,
    upgrades: Arc<UpgradeSlot>,
}

impl Connection {
    /// Tells HTTP/2 (its preface) from HTTP/1.1 and serves the connection in that protocol.
    /// The connection is polled before the clock everywhere, so the clock sees what its
    /// last read changed.
    async fn serve<S: Stream, Svc: EdgeService>(
        &mut self,
        mut io: WatchedIo<S>,
        service: Svc,
    ) -> Result<Ended, BoxError> {
        // What hyper-util's auto server does: read until the bytes are or are not the
        // HTTP/2 preface (24 bytes at most), then put them back in front.
        let mut first = [0; 24];
        let mut filled = 0;
        let http2 = loop {
            if let Some(http2) = io.http2() {
                break http2;
            }
            tokio::select! {
                biased;
                read = io.read(&mut first[filled..]) => match read? {
                    0 => return Ok(Ended::Done),
                    n => filled += n,
                },
                wake = self.clock.wake(false) => return Ok(ended(wake)),
                () = self.shutdown.cancelled() => return Ok(Ended::Done),
            }
        };
        let prefix = Bytes::copy_from_slice(&first[..filled]);
        if http2 {
            self.serve_http2(Prefixed::new(io, prefix), service).await
        } else {
            self.serve_http1(io, prefix, service).await
        }
    }

    async fn serve_http2<S: Stream, Svc: EdgeService>(
        &mut self,
        io: Prefixed<WatchedIo<S>>,
        service: Svc,
    ) -> Result<Ended, BoxError> {
        // Boxed, so that the connection's task is sized for HTTP/1.1.
        let mut connection = Box::pin(
            self.builders
                .http2
                .serve_connection(TokioIo::new(io), service),
        );
        let mut draining = false;
        loop {
            tokio::select! {
                biased;
                ended = connection.as_mut() => return ended.map(|()| Ended::Done).map_err(Into::into),
                wake = self.clock.wake(false) => return Ok(ended(wake)),
                () = self.shutdown.cancelled(), if !draining => {
                    draining = true;
                    connection.as_mut().graceful_shutdown();
                }
            }
        }
    }

    /// Serves HTTP/1.1 with hyper, taking the stream back (with what hyper had read ahead)
    /// whenever the connection parks, and waiting for the next request without any of
    /// hyper's buffers.
    async fn serve_http1<S: Stream, Svc: EdgeService>(
        &mut self,
        mut io: WatchedIo<S>,
        mut ahead: Bytes,
        service: Svc,
    ) -> Result<Ended, BoxError> {
        loop {
            // Boxed, so that a parked connection's task holds none of it.
            let mut connection = Box::new(
                self.builders
                    .http1
                    .serve_connection(TokioIo::new(Prefixed::new(io, ahead)), service.clone()),
            );
            let mut draining = self.shutdown.is_cancelled();
            if draining {
                Pin::new(&mut *connection).graceful_shutdown();
            }
            loop {
                tokio::select! {
                    biased;
                    ended = std::future::poll_fn(|cx| connection.poll_without_shutdown(cx)) => {
                        ended?;
                        // After an upgrade, what hyper read past the request head is the
                        // client's first bytes of the new protocol.
                        let (io, ahead) = take_back(connection);
                        return Ok(self.finish_http1(Prefixed::new(io, ahead)).await);
                    }
                    wake = self.clock.wake(!draining) => match wake {
                        Wake::Park => break,
                        expired => return Ok(ended(expired)),
                    },
                    () = self.shutdown.cancelled(), if !draining => {
                        draining = true;
                        Pin::new(&mut *connection).graceful_shutdown();
                    }
                }
            }
            // Idle, with every response written: nothing of hyper's is needed until the
            // client sends again.
            self.clock.parked();
            (io, ahead) = take_back(connection);
            tracing::trace!(ahead = ahead.len(), "connection parked");
            if ahead.is_empty() {
                tokio::select! {
                    biased;
                    ready = io.parked() => ready?,
                    wake = self.clock.wake(false) => return Ok(ended(wake)),
                    () = self.shutdown.cancelled() => return Ok(Ended::Done),
                }
            }
        }
    }

    /// An HTTP/1.1 connection hyper is done with: upgraded (the stream goes to the request
    /// that asked), or finished (its stream is shut down).
    async fn finish_http1<S: Stream>(&self, io: Prefixed<WatchedIo<S>>) -> Ended {
        if let Err(mut io) = self.upgrades.fulfil(Box::new(io)) {
            let _ = io.shutdown().await;
        }
        Ended::Done
    }
}

/// How a connection whose clock woke it ends.
fn ended(wake: Wake) -> Ended {
    match wake {
        Wake::Expired(expiry) => Ended::Expired(expiry),
        // Only asked for where the caller parks.
        Wake::Park => Ended::Done,
    }
}

/// The stream of an HTTP/1.1 connection hyper is done with for now, and the bytes it had
/// read ahead (a pipelined request). Everything of hyper's is dropped here, its read buffer
/// included: the bytes ahead are copied out, since they share its whole allocation.
#[allow(
    clippy::boxed_local,
    reason = "taking the box frees it here, not when the caller's loop body ends"
)]
fn take_back<S: Stream, Svc: EdgeService>(
    connection: Box<http1::Connection<TokioIo<Prefixed<WatchedIo<S>>>, Svc>>,
) -> (WatchedIo<S>, Bytes) {
    let parts = (*connection).into_parts();
    let (io, unread) = parts.io.into_inner().into_parts();
    let ahead = match (parts.read_buf.is_empty(), unread.is_empty()) {
        (true, true) => Bytes::new(),
        (false, true) => Bytes::copy_from_slice(&parts.read_buf),
        _ => [parts.read_buf, unread].concat().into(),
    };
    (io, ahead)
}

/// Waits up to `grace` for the connections to finish their requests.
async fn drain(connections: TaskTracker, grace: Duration) {
    connections.close();
    tokio::select! {
        () = connections.wait() => {}
        () = tokio::time::sleep(grace) => {
            tracing::warn!("shutdown grace elapsed with requests still open");
        }
    }
}

//! The downstream HTTP server: HTTP/1.1 and h2c on one port (or HTTP/1.1 and h2 over TLS on
//! an HTTPS listener), with bounded limits and graceful shutdown. Both listener kinds share
//! the per-connection serving, so a request is served the same way on either.
//!
//! No wait is unbounded: a connection has `header_read_timeout` to send a request head (the
//! HTTP/2 preface included, see [`clock`]), `idle_timeout` between requests, a request body
//! may pause for at most `read_timeout`, a write may make no progress for at most
//! `write_timeout`, and at most `max_connections` connections are open at once.

mod clock;
mod io;
mod limit;
mod read_timeout;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::edge::Edge;
use crate::metrics::Metrics;
use crate::tls::{TlsAcceptor, client_certificate};
use clock::{Activity, ConnectionClock, Expiry, ExpiryCounters, Settings, TrackedBody};
use io::WatchedIo;
use limit::ConnectionSlot;
pub use limit::{ConnectionLimit, DEFAULT_MAX_CONNECTIONS};
pub use read_timeout::BodyReadTimeout;
use read_timeout::ReadTimeoutBody;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

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
    let builder = http_builder(&options);
    let settings = options.settings(edge.metrics());
    let graceful = GracefulShutdown::new();
    while let Some((stream, remote)) = accept(&listener, &shutdown).await {
        let Some(slot) = admit(&options, edge.metrics(), remote) else {
            continue;
        };
        tokio::spawn(serve_connection(
            &builder,
            graceful.watcher(),
            stream,
            slot,
            &settings,
            &edge,
            remote,
            |_: &mut Request<Incoming>| {},
        ));
    }
    drop(listener);
    drain(graceful, options.shutdown_grace).await;
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
    let builder = Arc::new(http_builder(&options));
    let settings = options.settings(edge.metrics());
    let graceful = GracefulShutdown::new();
    while let Some((stream, remote)) = accept(&listener, &shutdown).await {
        let Some(slot) = admit(&options, edge.metrics(), remote) else {
            continue;
        };
        let (tls, builder, edge, shutdown, settings) = (
            tls.clone(),
            builder.clone(),
            edge.clone(),
            shutdown.clone(),
            settings.clone(),
        );
        let watcher = graceful.watcher();
        tokio::spawn(async move {
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
                        &builder, watcher, stream, slot, &settings, &edge, remote, tag,
                    )
                    .await;
                }
                Err(err) => tracing::debug!(%remote, %err, "tls connection dropped"),
            }
        });
    }
    drop(listener);
    drain(graceful, options.shutdown_grace).await;
}

/// The HTTP server settings shared by every listener kind.
fn http_builder(options: &ServerOptions) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // hyper's own header timer would also cut idle keep-alive connections at the header
    // timeout; the connection clock runs both waits instead (see `clock`).
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(None)
        .max_buf_size(options.max_header_size.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(options.max_concurrent_streams)
        .max_header_list_size(options.max_header_size as u32)
        .keep_alive_interval(options.h2_keep_alive)
        .keep_alive_timeout(options.h2_keep_alive);
    builder
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
/// `edge`, until the client leaves, a graceful shutdown completes it, or the connection's
/// clock runs out (no head within the header timeout, or idle too long). `tag` adds what the
/// connection knows to each request (a TLS client certificate); a plain listener passes a
/// no-op, which compiles away.
#[allow(clippy::too_many_arguments)]
fn serve_connection<S, Tag>(
    builder: &auto::Builder<TokioExecutor>,
    watcher: Watcher,
    stream: S,
    slot: ConnectionSlot,
    settings: &Arc<Settings>,
    edge: &Arc<Edge>,
    remote: SocketAddr,
    tag: Tag,
) -> impl Future<Output = ()> + Send + 'static
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    Tag: Fn(&mut Request<Incoming>) + Send + Sync + 'static,
{
    let activity = Arc::new(Activity::new(settings.clone()));
    let io = TokioIo::new(WatchedIo::new(stream, activity.clone(), slot));
    let service_edge = edge.clone();
    let service_activity = activity.clone();
    let service = service_fn(move |mut req: Request<Incoming>| {
        tag(&mut req);
        // Open from here until the response body ends (or the request is dropped).
        let open = service_activity.request_opened();
        let settings = service_activity.settings().clone();
        let req = req.map(|body| ReadTimeoutBody::new(body, settings));
        let call = service_edge.clone().call(req, remote);
        async move {
            let response: Response<_> = match call.await {
                Ok(response) => response,
                Err(never) => match never {},
            };
            Ok::<_, std::convert::Infallible>(response.map(|body| TrackedBody::new(body, open)))
        }
    });
    let connection = builder
        .serve_connection_with_upgrades(io, service)
        .into_owned();
    let connection = watcher.watch(connection);
    let clock = ConnectionClock::new(activity.clone());
    async move {
        tokio::select! {
            // The connection first, so the clock sees what its last read changed.
            biased;
            ended = connection => {
                if let Err(err) = ended {
                    tracing::debug!(%remote, %err, "connection ended with an error");
                }
            }
            expiry = clock => {
                let counters = &activity.settings().expired;
                match expiry {
                    Expiry::Header => counters.header.inc(),
                    Expiry::Idle => counters.idle.inc(),
                }
                tracing::debug!(%remote, ?expiry, "connection closed by its timeout");
            }
        }
    }
}

/// Waits up to `grace` for the watched connections to finish their requests.
async fn drain(graceful: GracefulShutdown, grace: Duration) {
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(grace) => {
            tracing::warn!("shutdown grace elapsed with requests still open");
        }
    }
}

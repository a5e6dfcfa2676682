//! The downstream HTTP server: HTTP/1.1 and h2c on one port (or HTTP/1.1 and h2 over TLS on
//! an HTTPS listener), with bounded limits and graceful shutdown. Both listener kinds share
//! the per-connection serving, so a request is served the same way on either.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::Request;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use prometheus::IntGauge;

use crate::edge::Edge;
use crate::tls::{TlsAcceptor, client_certificate};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Limits of the downstream server; none is left unbounded.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Time a client has to send a complete request head (default 15 s). hyper also applies
    /// it while an HTTP/1.1 keep-alive connection waits for its next request, so it is the
    /// idle keep-alive timeout too.
    pub header_read_timeout: Duration,
    /// Largest request head accepted, in bytes (default 64 KiB); larger gets 431.
    pub max_header_size: usize,
    /// Concurrent streams per HTTP/2 connection (default 256).
    pub max_concurrent_streams: u32,
    /// HTTP/2 keep-alive ping interval; a peer that does not answer within the same time
    /// is dropped (default 30 s).
    pub h2_keep_alive: Duration,
    /// How long shutdown waits for in-flight requests (default 30 s).
    pub shutdown_grace: Duration,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(15),
            max_header_size: 64 * 1024,
            max_concurrent_streams: 256,
            h2_keep_alive: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(30),
        }
    }
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
    let graceful = GracefulShutdown::new();
    while let Some((stream, remote)) = accept(&listener, &shutdown).await {
        let serving = serve_connection(
            &builder,
            graceful.watcher(),
            TokioIo::new(stream),
            &edge,
            remote,
            |_: &mut Request<Incoming>| {},
        );
        let connections = edge.metrics().connections.clone();
        tokio::spawn(async move {
            let _open = OpenConnection::count(connections);
            serving.await;
        });
    }
    drop(listener);
    drain(graceful, options.shutdown_grace).await;
}

/// [`serve`] for an HTTPS listener: each accepted connection first completes a TLS
/// handshake (bounded by the acceptor's handshake timeout, and abandoned at shutdown), then
/// is served exactly as a plain one. A connection is counted open from its accept.
pub async fn serve_tls(
    listener: TcpListener,
    options: ServerOptions,
    tls: TlsAcceptor,
    edge: Arc<Edge>,
    shutdown: CancellationToken,
) {
    let builder = Arc::new(http_builder(&options));
    let graceful = GracefulShutdown::new();
    while let Some((stream, remote)) = accept(&listener, &shutdown).await {
        let open = OpenConnection::count(edge.metrics().connections.clone());
        let (tls, builder, edge, shutdown) =
            (tls.clone(), builder.clone(), edge.clone(), shutdown.clone());
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let _open = open;
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
                    let io = TokioIo::new(stream);
                    serve_connection(&builder, watcher, io, &edge, remote, tag).await;
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
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(options.header_read_timeout)
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
/// `edge`, until the client leaves or a graceful shutdown completes it. `tag` adds what the
/// connection knows to each request (a TLS client certificate); a plain listener passes a
/// no-op, which compiles away.
fn serve_connection<IO, Tag>(
    builder: &auto::Builder<TokioExecutor>,
    watcher: Watcher,
    io: IO,
    edge: &Arc<Edge>,
    remote: SocketAddr,
    tag: Tag,
) -> impl Future<Output = ()> + Send + 'static
where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    Tag: Fn(&mut Request<Incoming>) + Send + Sync + 'static,
{
    let service_edge = edge.clone();
    let service = service_fn(move |mut req: Request<Incoming>| {
        tag(&mut req);
        service_edge.clone().call(req, remote)
    });
    let connection = builder
        .serve_connection_with_upgrades(io, service)
        .into_owned();
    let connection = watcher.watch(connection);
    async move {
        if let Err(err) = connection.await {
            tracing::debug!(%remote, %err, "connection ended with an error");
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

/// One open downstream connection in the `go_gateway_connections` gauge, for as long as it
/// lives (also when its task is dropped).
struct OpenConnection(IntGauge);

impl OpenConnection {
    fn count(gauge: IntGauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.dec();
    }
}

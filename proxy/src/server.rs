//! The downstream HTTP server: HTTP/1.1 and h2c on one port, with bounded limits and
//! graceful shutdown.

use std::sync::Arc;
use std::time::Duration;

use http::Request;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;

use crate::edge::Edge;
use tokio::net::TcpListener;
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
    let graceful = GracefulShutdown::new();
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, remote) = match accepted {
            Ok(accepted) => accepted,
            Err(err) => {
                // Out of descriptors and similar: back off briefly instead of spinning.
                tracing::warn!(%err, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let service_edge = edge.clone();
        let service =
            service_fn(move |req: Request<Incoming>| service_edge.clone().call(req, remote));
        let connection = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        let connection = graceful.watch(connection);
        let connections = edge.metrics().connections.clone();
        tokio::spawn(async move {
            connections.inc();
            if let Err(err) = connection.await {
                tracing::debug!(%remote, %err, "connection ended with an error");
            }
            connections.dec();
        });
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(options.shutdown_grace) => {
            tracing::warn!("shutdown grace elapsed with requests still open");
        }
    }
}

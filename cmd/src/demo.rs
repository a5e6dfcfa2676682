//! DEMO ONLY (`--demo`): a toy upstream so the example config answers a first `curl`.
//! It is not part of the gateway; real deployments point at real services.

use std::convert::Infallible;

use http::{Request, Response};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

/// Binds `addr` and answers every request with a short text naming what it received.
pub(crate) async fn start(addr: &str) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    tracing::warn!(%addr, "DEMO upstream started (--demo): for trying the gateway only");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let service = service_fn(|req: Request<Incoming>| async move {
                    let forwarded = req
                        .headers()
                        .get("x-forwarded-for")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("-")
                        .to_owned();
                    let text = format!(
                        "hello from the demo upstream\nmethod: {}\npath: {}\nx-forwarded-for: {}\n",
                        req.method(),
                        req.uri(),
                        forwarded
                    );
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(text))))
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(())
}

//! `bench-floor`: the smallest reverse proxy hyper can make. It forwards every request to one
//! upstream through a pooled keep-alive client and adds nothing else, so its cost is what the
//! HTTP stack alone costs; the gateway is measured against it by `tests/bench/run`.
//! With `--origin-sleep-ms MS` it is instead an origin that answers `hello` after MS ms (the
//! slow upstream of the selector scenario).

use std::{convert::Infallible, net::SocketAddr, time::Duration};

use bytes::Bytes;
use clap::{ArgGroup, Parser};
use http::{Request, Response, StatusCode, Uri, uri::Authority};
use http_body_util::{Either, Full};
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioIo},
};

type Body = Either<Incoming, Full<Bytes>>;
type Pool = Client<HttpConnector, Incoming>;

/// Command line of the floor proxy.
#[derive(Parser)]
#[command(group(ArgGroup::new("mode").required(true).args(["upstream", "origin_sleep_ms"])))]
struct Args {
    /// Address to listen on, e.g. 127.0.0.1:8080.
    #[arg(long)]
    listen: SocketAddr,
    /// Upstream every request is forwarded to (proxy mode).
    #[arg(long)]
    upstream: Option<Authority>,
    /// Be an origin that answers `hello` after this many milliseconds (origin mode).
    #[arg(long)]
    origin_sleep_ms: Option<u64>,
    /// Tokio worker threads; absent means a current_thread runtime.
    #[arg(long)]
    workers: Option<usize>,
}

async fn handle(args: &Args, pool: &Pool, mut req: Request<Incoming>) -> Response<Body> {
    let Some(upstream) = &args.upstream else {
        tokio::time::sleep(Duration::from_millis(args.origin_sleep_ms.unwrap_or(0))).await;
        return Response::new(Either::Right(Full::from("hello")));
    };
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let uri = Uri::builder()
        .scheme("http")
        .authority(upstream.clone())
        .path_and_query(path);
    *req.uri_mut() = uri.build().unwrap_or_default();
    match pool.request(req).await {
        Ok(response) => response.map(Either::Left),
        Err(_) => {
            let mut response = Response::new(Either::Right(Full::default()));
            *response.status_mut() = StatusCode::BAD_GATEWAY;
            response
        }
    }
}

async fn serve(args: &'static Args) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let pool: Pool = Client::builder(TokioExecutor::new()).build(connector);
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await; // out of file descriptors
            continue;
        };
        let _ = stream.set_nodelay(true);
        let pool = pool.clone();
        let service = service_fn(move |req| {
            let pool = pool.clone();
            async move { Ok::<_, Infallible>(handle(args, &pool, req).await) }
        });
        tokio::spawn(http1::Builder::new().serve_connection(TokioIo::new(stream), service));
    }
}

fn main() -> std::io::Result<()> {
    let args: &'static Args = Box::leak(Box::new(Args::parse()));
    let mut runtime = match args.workers {
        Some(workers) => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder.worker_threads(workers);
            builder
        }
        None => tokio::runtime::Builder::new_current_thread(),
    };
    runtime.enable_all().build()?.block_on(serve(args))
}

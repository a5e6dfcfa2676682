//! Real servers on 127.0.0.1 for end-to-end tests: upstreams, an in-process gateway
//! started through its real flags, and a small HTTP client.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use http::{HeaderMap, Request, Response};
use http_body_util::{BodyExt, Full, combinators::UnsyncBoxBody};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Body type upstream handlers answer with.
pub type UpstreamBody = UnsyncBoxBody<Bytes, Infallible>;

/// A body holding `text`.
pub fn text(text: impl Into<Bytes>) -> UpstreamBody {
    Full::new(text.into()).boxed_unsync()
}

/// A real upstream HTTP server on 127.0.0.1:0; stops when dropped.
pub struct Upstream {
    /// Where it listens.
    pub addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    shutdown: CancellationToken,
}

impl Upstream {
    /// Starts a server answering every request with `handler`.
    pub async fn start<F, Fut>(handler: F) -> Upstream
    where
        F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Response<UpstreamBody>> + Send + 'static,
    {
        Upstream::start_at("127.0.0.1:0".parse().expect("address"), handler).await
    }

    /// [`Upstream::start`] on a given address (e.g. the one of a stopped upstream, to bring
    /// it back).
    pub async fn start_at<F, Fut>(addr: SocketAddr, handler: F) -> Upstream
    where
        F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Response<UpstreamBody>> + Send + 'static,
    {
        let listener = TcpListener::bind(addr).await.expect("bind upstream");
        let addr = listener.local_addr().expect("local addr");
        let hits = Arc::new(AtomicUsize::new(0));
        let shutdown = CancellationToken::new();
        let (task_hits, task_shutdown) = (hits.clone(), shutdown.clone());
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = task_shutdown.cancelled() => return,
                    accepted = listener.accept() => accepted,
                };
                let Ok((stream, _)) = accepted else { continue };
                let handler = handler.clone();
                let hits = task_hits.clone();
                let conn_shutdown = task_shutdown.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        hits.fetch_add(1, Ordering::SeqCst);
                        let response = handler(req);
                        async move { Ok::<_, Infallible>(response.await) }
                    });
                    let builder = auto::Builder::new(TokioExecutor::new());
                    let conn = builder.serve_connection(TokioIo::new(stream), service);
                    tokio::select! {
                        _ = conn => {}
                        _ = conn_shutdown.cancelled() => {}
                    }
                });
            }
        });
        Upstream {
            addr,
            hits,
            shutdown,
        }
    }

    /// An upstream answering 200 with body `name` and header `x-upstream: name` that
    /// reports the path and query it saw (`x-seen-path`), `Host` (`x-seen-host`) and
    /// `X-Forwarded-For` (`x-seen-x-forwarded-for`).
    pub async fn named(name: &str) -> Upstream {
        Upstream::reporting(name, &["host", "x-forwarded-for"]).await
    }

    /// An upstream answering 200 with body `name` and header `x-upstream: name` that
    /// reports what it saw: `x-seen-path` (path and query) and, for each header in
    /// `headers`, `x-seen-{header}` with all its values joined by `,` (`-` when absent).
    pub async fn reporting(name: &str, headers: &[&str]) -> Upstream {
        let name = name.to_owned();
        let headers: Arc<[String]> = headers.iter().map(|h| h.to_ascii_lowercase()).collect();
        Upstream::start(move |req: Request<Incoming>| {
            let (name, headers) = (name.clone(), headers.clone());
            async move {
                let mut response = Response::builder().header("x-upstream", &name).header(
                    "x-seen-path",
                    req.uri().path_and_query().map_or("", |p| p.as_str()),
                );
                for header in headers.iter() {
                    let seen = match header_values(req.headers(), header) {
                        values if values.is_empty() => "-".to_owned(),
                        values => values,
                    };
                    response = response.header(format!("x-seen-{header}"), seen);
                }
                response.body(text(name)).expect("response")
            }
        })
        .await
    }

    /// `127.0.0.1:PORT`, for a backend target.
    pub fn target(&self) -> String {
        self.addr.to_string()
    }

    /// Requests served so far.
    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    /// Stops accepting and closes open connections.
    pub fn stop(&self) {
        self.shutdown.cancel();
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// The gateway running in this process, started through its real flags
/// (`--addr 127.0.0.1:0 --debug --reload-interval 100ms` plus any extra flags).
pub struct TestGateway {
    /// The first listening address.
    pub addr: SocketAddr,
    /// The HTTPS listeners' addresses (`--tls-addr`), in flag order.
    pub tls_addrs: Vec<SocketAddr>,
    /// The `--metrics-addr` listener, when started with one.
    pub metrics_addr: Option<SocketAddr>,
    /// The `--admin-addr` listener, when started with one.
    pub admin_addr: Option<SocketAddr>,
    /// The config file it watches.
    pub conf: PathBuf,
    /// Scratch directory holding the config (and anything a test adds).
    pub dir: tempfile::TempDir,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<Result<(), String>>>,
}

impl TestGateway {
    /// Starts a gateway on `yaml`; panics if it does not start.
    pub async fn start(yaml: &str) -> TestGateway {
        Self::start_with(yaml, &[]).await.expect("gateway starts")
    }

    /// Starts a gateway on `yaml` with extra command-line flags; returns the start-up error.
    pub async fn start_with(yaml: &str, extra_flags: &[&str]) -> Result<TestGateway, String> {
        Self::start_in(tempfile::tempdir().expect("tempdir"), yaml, extra_flags).await
    }

    /// [`TestGateway::start_with`] in a scratch directory the test has already filled (with
    /// files its flags name, such as certificates); it becomes [`TestGateway::dir`].
    pub async fn start_in(
        dir: tempfile::TempDir,
        yaml: &str,
        extra_flags: &[&str],
    ) -> Result<TestGateway, String> {
        let conf = dir.path().join("gateway.yaml");
        std::fs::write(&conf, yaml).expect("write config");
        let conf_arg = conf.to_str().expect("utf-8 path").to_owned();
        Self::launch(dir, conf, &conf_arg, extra_flags).await
    }

    /// Starts a gateway whose `--conf` is `conf_arg` (a file or an `http(s)://` URL); its
    /// [`TestGateway::conf`] is an unused path in a fresh scratch directory.
    pub async fn start_conf(conf_arg: &str, extra_flags: &[&str]) -> Result<TestGateway, String> {
        let dir = tempfile::tempdir().expect("tempdir");
        let conf = dir.path().join("gateway.yaml");
        Self::launch(dir, conf, conf_arg, extra_flags).await
    }

    async fn launch(
        dir: tempfile::TempDir,
        conf: PathBuf,
        conf_arg: &str,
        extra_flags: &[&str],
    ) -> Result<TestGateway, String> {
        let mut args: Vec<String> = [
            "gateway",
            "--conf",
            conf_arg,
            "--addr",
            "127.0.0.1:0",
            "--debug",
            "--reload-interval",
            "100ms",
            "--shutdown-grace",
            "5s",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra_flags.iter().map(|s| s.to_string()));
        let cli = cmd::Cli::try_parse_from(args).map_err(|e| e.to_string())?;
        let shutdown = CancellationToken::new();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(cmd::run(cli, shutdown.clone(), move |listening| {
            let _ = ready_tx.send(listening);
        }));
        match ready_rx.await {
            Ok(listening) => Ok(TestGateway {
                addr: listening.addrs[0],
                tls_addrs: listening.tls_addrs,
                metrics_addr: listening.metrics_addr,
                admin_addr: listening.admin_addr,
                conf,
                dir,
                shutdown,
                task: Some(task),
            }),
            Err(_) => match task.await {
                Ok(Err(message)) => Err(message),
                other => Err(format!("gateway ended before it was ready: {other:?}")),
            },
        }
    }

    /// The first HTTPS listener's address; panics when started without `--tls-addr`.
    pub fn tls_addr(&self) -> SocketAddr {
        *self.tls_addrs.first().expect("started with --tls-addr")
    }

    /// `http://127.0.0.1:PORT{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// The `/metrics` page (see [`crate::metrics`] to read values from it).
    pub async fn metrics(&self) -> String {
        get(&self.url("/metrics")).await.body
    }

    /// Replaces the config file (the gateway picks it up at its next poll).
    pub fn write_config(&self, yaml: &str) {
        let tmp = self.dir.path().join(".gateway.yaml.tmp");
        std::fs::write(&tmp, yaml).expect("write config");
        std::fs::rename(&tmp, &self.conf).expect("replace config");
    }

    /// Shuts down gracefully and returns what `run` returned.
    pub async fn stop(mut self) -> Result<(), String> {
        self.shutdown.cancel();
        match self.task.take() {
            Some(task) => task.await.map_err(|e| e.to_string())?,
            None => Ok(()),
        }
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// What a test sees of a response.
#[derive(Debug, Clone)]
pub struct Reply {
    /// Status code.
    pub status: u16,
    /// Response headers.
    pub headers: HeaderMap,
    /// Body as text (lossy).
    pub body: String,
}

impl Reply {
    /// A header's value as text ("" when absent).
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    /// Every value of header `name`, joined by `,` ("" when absent).
    pub fn header_values(&self, name: &str) -> String {
        header_values(&self.headers, name)
    }
}

/// Every value of header `name` in `headers`, joined by `,` ("" when absent).
pub fn header_values(headers: &HeaderMap, name: &str) -> String {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect::<Vec<_>>()
        .join(",")
}

/// A port on 127.0.0.1 that nothing listens on (bound, then released).
pub fn unused_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// A plain HTTP/1.1 client with a connection pool.
pub fn http_client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build(HttpConnector::new())
}

/// Sends `req` and reads the whole response (10 s limit for both).
pub async fn send(req: Request<Full<Bytes>>) -> Reply {
    let client = http_client();
    let exchange = async {
        let response = client.request(req).await.expect("request sent");
        let (parts, body) = response.into_parts();
        let body = body.collect().await.expect("body read").to_bytes();
        Reply {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        }
    };
    tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .expect("whole response within 10 s")
}

/// GET `url`.
pub async fn get(url: &str) -> Reply {
    send(Request::get(url).body(Full::default()).expect("request")).await
}

/// GET `url` with extra headers.
pub async fn get_with(url: &str, headers: &[(&str, &str)]) -> Reply {
    let mut req = Request::get(url);
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    send(req.body(Full::default()).expect("request")).await
}

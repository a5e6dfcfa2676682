//! Wiring of the `gateway` binary: flags, start-up and shutdown. `main.rs` only parses
//! flags, sets up logging and signals, and calls [`run`].

mod debug_views;
mod demo;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use proxy::server::{ServerOptions, serve};
use proxy::{Edge, Metrics, Proxy};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// A service-discovery-driven API gateway.
#[derive(Debug, Parser)]
#[command(name = "gateway", version, about)]
pub struct Cli {
    /// Config file (YAML, go-kratos/gateway format).
    #[arg(long, default_value = "configs/gateway.yaml")]
    pub conf: PathBuf,
    /// Address to listen on; repeat for several.
    #[arg(long = "addr", default_value = "0.0.0.0:8080")]
    pub addrs: Vec<SocketAddr>,
    /// Registry for discovery:/// backends: consul://HOST:PORT?token=T&datacenter=DC or
    /// etcd://HOST:PORT[,HOST:PORT]?namespace=/microservices.
    #[arg(long)]
    pub discovery: Option<String>,
    /// Serve the /debug/* views (loopback peers without X-Forwarded-For only).
    #[arg(long)]
    pub debug: bool,
    /// How often the config file (and priority dir) is re-hashed, e.g. 5s, 500ms.
    #[arg(long, default_value = "5s", value_parser = duration)]
    pub reload_interval: Duration,
    /// Directory of *.yaml endpoint files that replace or are prepended to the main list.
    #[arg(long)]
    pub priority_dir: Option<PathBuf>,
    /// Worker threads of the runtime (default: one per core).
    #[arg(long, env = "GATEWAY_WORKERS")]
    pub workers: Option<usize>,
    /// Time allowed for in-flight requests at shutdown and when a router is replaced.
    #[arg(long, default_value = "30s", value_parser = duration)]
    pub shutdown_grace: Duration,
    /// Time a client has to send a request head; also the idle keep-alive timeout.
    #[arg(long, default_value = "15s", value_parser = duration)]
    pub header_read_timeout: Duration,
    /// How long start-up waits for the registry's first snapshot of each service.
    #[arg(long, default_value = "5s", value_parser = duration)]
    pub initial_resolve_timeout: Duration,
    /// DEMO ONLY: also start a toy upstream on 127.0.0.1:8000 so the example config answers.
    #[arg(long)]
    pub demo: bool,
}

fn duration(text: &str) -> Result<Duration, String> {
    configs::parse_duration(text).map_err(|err| err.to_string())
}

/// Start-up failures are returned as one line; after start-up, errors are logged. A failed
/// start cancels `shutdown`, so whatever it had started (registry watches) ends with it.
pub async fn run(
    cli: Cli,
    shutdown: CancellationToken,
    on_ready: impl FnOnce(Vec<SocketAddr>),
) -> Result<(), String> {
    let result = serve_until_shutdown(cli, shutdown.clone(), on_ready).await;
    if result.is_err() {
        shutdown.cancel();
    }
    result
}

async fn serve_until_shutdown(
    cli: Cli,
    shutdown: CancellationToken,
    on_ready: impl FnOnce(Vec<SocketAddr>),
) -> Result<(), String> {
    let loader = configs::FileLoader::new(cli.conf.clone(), cli.priority_dir.clone());
    // The first load waits for the file to settle (two equal reads), so off the runtime.
    let first_load = loader.clone();
    let loaded = tokio::task::spawn_blocking(move || first_load.load())
        .await
        .map_err(|err| format!("config: {err}"))?
        .map_err(|err| format!("config: {err}"))?;
    let watcher = match &cli.discovery {
        Some(dsn) => {
            let registry = discovery::from_dsn(dsn).map_err(|err| format!("--discovery: {err}"))?;
            Some(client::ServiceWatcher::new(registry, shutdown.clone()))
        }
        None => None,
    };
    let mut listeners = Vec::new();
    for addr in &cli.addrs {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|err| format!("listen on {addr}: {err}"))?;
        listeners.push(listener);
    }
    if cli.demo {
        demo::start("127.0.0.1:8000")
            .await
            .map_err(|err| format!("demo upstream: {err}"))?;
    }
    let metrics = Arc::new(Metrics::new());
    let clients = client::Factory::new(client::ClientOptions::default(), watcher.clone());
    let mut registry = middleware::Registry::new();
    middleware_builtin::register_all(&mut registry, clients.clone());
    let proxy = Arc::new(
        Proxy::new(clients, registry, metrics.clone()).with_close_grace(cli.shutdown_grace),
    );
    proxy
        .update(&loaded.gateway)
        .map_err(|err| format!("config: {err}"))?;
    if let Some(watcher) = &watcher {
        let unresolved = watcher.wait_ready(cli.initial_resolve_timeout).await;
        if !unresolved.is_empty() {
            tracing::warn!(
                ?unresolved,
                "no snapshot yet from the registry; serving anyway"
            );
        }
    }
    let current = Arc::new(arc_swap::ArcSwap::from_pointee(loaded.gateway.clone()));
    let reload_proxy = proxy.clone();
    let reload_current = current.clone();
    let reloads = loader.watch(cli.reload_interval, shutdown.clone(), move |loaded| {
        let started = std::time::Instant::now();
        reload_proxy
            .update(&loaded.gateway)
            .map_err(|err| err.to_string())?;
        reload_current.store(Arc::new(loaded.gateway.clone()));
        tracing::info!(
            sha256 = %loaded.sha256,
            endpoints = loaded.gateway.endpoints.len(),
            build_ms = started.elapsed().as_secs_f64() * 1000.0,
            "config applied"
        );
        Ok(())
    });
    let debug = cli.debug.then(|| {
        Arc::new(debug_views::mux(
            loader.clone(),
            current,
            proxy.clone(),
            watcher.clone(),
        ))
    });
    let options = ServerOptions {
        header_read_timeout: cli.header_read_timeout,
        shutdown_grace: cli.shutdown_grace,
        ..ServerOptions::default()
    };
    let edge = Arc::new(Edge::new(proxy.clone(), debug));
    let mut servers = Vec::new();
    let mut local_addrs = Vec::new();
    for listener in listeners {
        let local = listener.local_addr().map_err(|err| err.to_string())?;
        local_addrs.push(local);
        tracing::info!(addr = %local, endpoints = loaded.gateway.endpoints.len(), "listening");
        servers.push(tokio::spawn(serve(
            listener,
            options.clone(),
            edge.clone(),
            shutdown.clone(),
        )));
    }
    on_ready(local_addrs);
    shutdown.cancelled().await;
    tracing::info!("shutting down: draining in-flight requests");
    for server in servers {
        let _ = server.await;
    }
    let _ = reloads.await;
    Ok(())
}

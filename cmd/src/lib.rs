//! Wiring of the `gateway` binary: flags, start-up and shutdown. `main.rs` only parses
//! flags, sets up logging and signals, and calls [`run`].

mod admin;
mod debug_views;
mod demo;
pub mod kratos_flags;
pub mod limits;
pub mod log_fields;
pub mod log_time;
mod store;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use proxy::server::{self, ConnectionLimit, ServerOptions, serve, serve_tls};
use proxy::tls::TlsAcceptor;
use proxy::{Edge, Metrics, Proxy};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// A service-discovery-driven API gateway.
#[derive(Debug, Parser)]
#[command(name = "gateway", version, about)]
pub struct Cli {
    /// Config file (YAML, go-kratos/gateway format), or an http(s):// URL polled with
    /// If-None-Match every --reload-interval.
    #[arg(long, default_value = "configs/gateway.yaml")]
    pub conf: PathBuf,
    /// Address to listen on; repeat for several.
    #[arg(long = "addr", default_value = "0.0.0.0:8080")]
    pub addrs: Vec<SocketAddr>,
    /// HTTPS address to listen on; repeat for several. Needs --tls-cert and --tls-key.
    #[arg(long = "tls-addr", value_name = "HOST:PORT")]
    pub tls_addrs: Vec<SocketAddr>,
    /// PEM certificate chain (leaf first) for the HTTPS listeners; repeatable, paired in
    /// order with --tls-key. Picked by SNI; the first pair is the default.
    #[arg(long = "tls-cert", value_name = "FILE")]
    pub tls_certs: Vec<PathBuf>,
    /// PEM private key of the --tls-cert at the same position; repeatable.
    #[arg(long = "tls-key", value_name = "FILE")]
    pub tls_keys: Vec<PathBuf>,
    /// Time a client has to complete the TLS handshake on an HTTPS listener.
    #[arg(long, default_value = "10s", value_parser = duration)]
    pub tls_handshake_timeout: Duration,
    /// PEM file of CA certificates: HTTPS clients must present a certificate issued by one
    /// of them (mTLS); middlewares see the verified subject.
    #[arg(long, value_name = "FILE")]
    pub tls_client_ca: Option<PathBuf>,
    /// Registry for discovery:/// backends: consul://HOST:PORT?token=T&datacenter=DC or
    /// etcd://HOST:PORT[,HOST:PORT]?namespace=/microservices.
    #[arg(long)]
    pub discovery: Option<String>,
    /// Redis for counters shared by every gateway using it: redis://HOST:PORT[/DB]; the
    /// default of the `redis` option of ratelimit, quota and spikearrest.
    #[arg(long, value_name = "DSN")]
    pub redis: Option<String>,
    /// Serve the /debug/* views (loopback peers without X-Forwarded-For only).
    #[arg(long)]
    pub debug: bool,
    /// What serves `/debug/pprof/heap` (not a flag: the `gateway` binary sets it to its
    /// jemalloc dump; without one, embedders and in-process tests, the view answers 501).
    #[arg(skip)]
    pub heap_profiler: Option<debug::HeapProfiler>,
    /// Also serve /metrics on this address (only /metrics; it stays on --addr too).
    #[arg(long, value_name = "HOST:PORT")]
    pub metrics_addr: Option<SocketAddr>,
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
    /// Time a client has to send a complete request head (and a new connection its first
    /// one, the HTTP/2 preface included); a connection that runs out is closed.
    #[arg(long, env = "PROXY_READ_HEADER_TIMEOUT", default_value = "15s", value_parser = timeout_or(server::DEFAULT_HEADER_READ_TIMEOUT))]
    pub header_read_timeout: Duration,
    /// Longest pause while a request body is being read: a client that stops sending
    /// mid-body gets 408 and the upstream call is aborted.
    #[arg(long, env = "PROXY_READ_TIMEOUT", default_value = "15s", value_parser = timeout_or(server::DEFAULT_READ_TIMEOUT))]
    pub read_timeout: Duration,
    /// Longest time a write to a client may make no progress (the client reads nothing);
    /// a response that keeps flowing is never cut.
    #[arg(long, env = "PROXY_WRITE_TIMEOUT", default_value = "15s", value_parser = timeout_or(server::DEFAULT_WRITE_TIMEOUT))]
    pub write_timeout: Duration,
    /// Time a connection with no request open may wait for its next request (HTTP/1.1
    /// keep-alive, HTTP/2 without streams) before it is closed.
    #[arg(long, env = "PROXY_IDLE_TIMEOUT", default_value = "120s", value_parser = timeout_or(server::DEFAULT_IDLE_TIMEOUT))]
    pub idle_timeout: Duration,
    /// Upstream TCP connect timeout, per attempt: a node that does not answer costs at most
    /// this, then a retry may go to another node.
    #[arg(long, env = "PROXY_DIAL_TIMEOUT", default_value = "500ms", value_parser = timeout_or(client::DEFAULT_CONNECT_TIMEOUT))]
    pub dial_timeout: Duration,
    /// Open downstream connections allowed at once (all listeners); beyond it a new
    /// connection is closed at once. Default: half the open-file limit, at most 10000.
    #[arg(long, env = "GATEWAY_MAX_CONNECTIONS", value_parser = clap::value_parser!(u64).range(1..))]
    pub max_connections: Option<u64>,
    /// Concurrent streams allowed per HTTP/2 client connection.
    #[arg(long, env = "GATEWAY_MAX_CONCURRENT_STREAMS", default_value_t = proxy::server::DEFAULT_MAX_CONCURRENT_STREAMS, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_concurrent_streams: u32,
    /// A WebSocket (or other upgrade) tunnel with no bytes either way for this long is closed.
    #[arg(long, default_value = "60s", value_parser = duration)]
    pub tunnel_idle_timeout: Duration,
    /// How long start-up waits for the registry's first snapshot of each service.
    #[arg(long, env = "INITIAL_RESOLVE_TIMEOUT", default_value = "5s", value_parser = duration_or(DEFAULT_INITIAL_RESOLVE_TIMEOUT))]
    pub initial_resolve_timeout: Duration,
    /// Control service URL(s) to fetch the config from (go-kratos/gateway's protocol);
    /// comma-separated or repeated; tried in order, failing over to the next.
    #[arg(long = "ctrl-service", value_name = "URL[,URL...]")]
    pub ctrl_service: Vec<String>,
    /// This gateway's name for the control service.
    #[arg(long = "ctrl-name", env = "ADVERTISE_NAME", default_value = "")]
    pub ctrl_name: String,
    /// Address reported to the control service (default: the first IPv4 of
    /// --advertise-device, else the first non-loopback address).
    #[arg(long, env = "ADVERTISE_ADDR", value_name = "IP")]
    pub advertise_addr: Option<String>,
    /// Network interface whose first IPv4 address is reported (default eth0).
    #[arg(long, env = "ADVERTISE_DEVICE", value_name = "NAME")]
    pub advertise_device: Option<String>,
    /// How often the control service is asked for a new release.
    #[arg(long, default_value = "5s", value_parser = duration)]
    pub ctrl_interval: Duration,
    /// Bound of each call to the control service (start-up waits at most one round).
    #[arg(long, default_value = "5s", value_parser = duration)]
    pub ctrl_timeout: Duration,
    /// Serve the admin API on this address (needs --admin-token or GATEWAY_ADMIN_TOKEN).
    #[arg(long, value_name = "HOST:PORT")]
    pub admin_addr: Option<SocketAddr>,
    /// Bearer token every admin API call must carry.
    #[arg(long, env = "GATEWAY_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Where admin-managed endpoints live: file://DIR (default: --priority-dir, else
    /// ./gateway-store), etcd://HOST:PORT[,HOST:PORT]/PREFIX or consul://HOST:PORT/PREFIX
    /// (shared by a fleet).
    #[arg(long, value_name = "DSN")]
    pub store: Option<String>,
    /// TTL of this gateway's entry in a shared store's instance list.
    #[arg(long, default_value = "10s", value_parser = duration, hide = true)]
    pub store_lease_ttl: Duration,
    /// DEMO ONLY: also start a toy upstream on 127.0.0.1:8000 so the example config answers.
    #[arg(long)]
    pub demo: bool,
}

/// The `--tls-cert`/`--tls-key` pairs, checked against `--tls-addr` (`None`: no HTTPS).
fn tls_pairs(cli: &Cli) -> Result<Option<Vec<proxy::tls::CertPair>>, String> {
    let (certs, keys) = (cli.tls_certs.len(), cli.tls_keys.len());
    if cli.tls_addrs.is_empty() {
        if certs + keys > 0 || cli.tls_client_ca.is_some() {
            return Err("--tls-cert/--tls-key/--tls-client-ca given without --tls-addr".to_owned());
        }
        return Ok(None);
    }
    if certs == 0 && keys == 0 {
        return Err("--tls-addr needs at least one --tls-cert and --tls-key pair".to_owned());
    }
    if certs != keys {
        return Err(format!(
            "--tls-cert given {certs} time(s) but --tls-key {keys} time(s): they are paired in order"
        ));
    }
    Ok(Some(
        cli.tls_certs
            .iter()
            .zip(&cli.tls_keys)
            .map(|(cert, key)| proxy::tls::CertPair {
                cert: cert.clone(),
                key: key.clone(),
            })
            .collect(),
    ))
}

/// The control-service loader of `--ctrl-service`, if given.
fn control_service(cli: &Cli) -> Result<Option<configs_ctrl::CtrlLoader>, String> {
    if cli.ctrl_service.iter().all(|list| list.trim().is_empty()) {
        return Ok(None);
    }
    let advertise_addr = configs_ctrl::advertise_addr(
        cli.advertise_addr.as_deref(),
        cli.advertise_device.as_deref(),
    );
    let options = configs_ctrl::CtrlOptions {
        services: cli.ctrl_service.clone(),
        name: cli.ctrl_name.clone(),
        advertise_addr,
        conf: cli.conf.clone(),
        priority_dir: cli.priority_dir.clone(),
        interval: cli.ctrl_interval,
        timeout: cli.ctrl_timeout,
    };
    let ctrl = configs_ctrl::CtrlLoader::new(options).map_err(|err| err.to_string())?;
    if cli.ctrl_name.is_empty() {
        tracing::warn!(
            "--ctrl-name (or ADVERTISE_NAME) is not set; the control service gets an empty gateway name"
        );
    }
    Ok(Some(ctrl))
}

fn duration(text: &str) -> Result<Duration, String> {
    configs::parse_duration(text).map_err(|err| err.to_string())
}

/// A duration for a timeout that must not be unbounded: zero is refused (in Kratos, zero
/// means "no timeout").
fn positive_duration(text: &str) -> Result<Duration, String> {
    match duration(text)? {
        zero if zero.is_zero() => Err("must be above zero: no timeout may be unbounded".to_owned()),
        positive => Ok(positive),
    }
}

/// The parser of a timeout that Kratos reads from the environment: a positive duration, or
/// `default` for an empty value (a variable set to "", which Kratos ignores).
fn timeout_or(
    default: Duration,
) -> impl Fn(&str) -> Result<Duration, String> + Clone + Send + Sync + 'static {
    move |text| match text {
        "" => Ok(default),
        text => positive_duration(text),
    }
}

/// As [`timeout_or`] for a wait that may be zero (`INITIAL_RESOLVE_TIMEOUT=0s`: do not wait).
fn duration_or(
    default: Duration,
) -> impl Fn(&str) -> Result<Duration, String> + Clone + Send + Sync + 'static {
    move |text| match text {
        "" => Ok(default),
        text => duration(text),
    }
}

/// Default of `--initial-resolve-timeout`.
const DEFAULT_INITIAL_RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Where a started gateway listens (the bound addresses, so port 0 is resolved).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listening {
    /// The plain HTTP listeners, in `--addr` order.
    pub addrs: Vec<SocketAddr>,
    /// The HTTPS listeners, in `--tls-addr` order.
    pub tls_addrs: Vec<SocketAddr>,
    /// The `--metrics-addr` listener.
    pub metrics_addr: Option<SocketAddr>,
    /// The `--admin-addr` listener.
    pub admin_addr: Option<SocketAddr>,
}

/// Start-up failures are returned as one line; after start-up, errors are logged. A failed
/// start cancels `shutdown`, so whatever it had started (registry watches) ends with it.
/// `on_ready` is called once every listener is bound and serving.
pub async fn run(
    cli: Cli,
    shutdown: CancellationToken,
    on_ready: impl FnOnce(Listening),
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
    on_ready: impl FnOnce(Listening),
) -> Result<(), String> {
    let tls_pairs = tls_pairs(&cli)?;
    if let Some(dsn) = &cli.redis {
        middleware_builtin::redis_store::check_dsn(dsn).map_err(|err| format!("--redis: {err}"))?;
    }
    let admin_token = match (&cli.admin_addr, &cli.admin_token) {
        (Some(_), Some(token)) if !token.is_empty() => Some(token.clone()),
        (Some(_), _) => {
            return Err(
                "--admin-addr needs a token: set --admin-token or GATEWAY_ADMIN_TOKEN".to_owned(),
            );
        }
        (None, _) => None,
    };
    // The --redis and admin-token checks come first, so a bad one stops start-up before the
    // control service is asked for anything (and before it writes --conf).
    // With a control service, its release is written before the first load (if it answers
    // within one round), so the gateway starts on it.
    let ctrl = match control_service(&cli)? {
        Some(ctrl) => {
            match ctrl.initial().await {
                Ok(outcome) => tracing::info!(?outcome, "control service: first release fetched"),
                Err(error) => tracing::warn!(
                    %error,
                    "control service: no release at start-up; starting from the file on disk"
                ),
            }
            Some(ctrl)
        }
        None => None,
    };
    // The admin API always has a store; without one, a gateway only follows --store if set.
    let store_dsn = cli.store.clone().or_else(|| {
        cli.admin_addr.map(|_| {
            let dir = cli
                .priority_dir
                .clone()
                .unwrap_or_else(|| "gateway-store".into());
            format!("file://{}", dir.display())
        })
    });
    let store = match &store_dsn {
        Some(dsn) => Some(store::open(dsn, cli.store_lease_ttl, shutdown.clone())?),
        None => None,
    };
    // A file, or an http(s):// URL (fetched now, then polled).
    let loader = configs::ConfigLoader::new(&cli.conf.to_string_lossy(), cli.priority_dir.clone());
    let loaded = loader
        .load()
        .await
        .map_err(|err| format!("config: {err}"))?;
    let certificates = match tls_pairs {
        Some(pairs) => Some(
            tokio::task::spawn_blocking(move || proxy::tls::CertStore::load(pairs))
                .await
                .map_err(|err| format!("tls: {err}"))?
                .map_err(|err| format!("tls: {err}"))?,
        ),
        None => None,
    };
    let metrics = Arc::new(Metrics::new());
    let https = match certificates {
        Some(certificates) => {
            let tls_metrics = proxy::tls::TlsMetrics::register(metrics.registry())
                .map_err(|err| format!("tls metrics: {err}"))?;
            let acceptor = TlsAcceptor::new(
                &certificates,
                cli.tls_client_ca.as_deref(),
                cli.tls_handshake_timeout,
                tls_metrics.clone(),
            )
            .map_err(|err| format!("tls: {err}"))?;
            Some((certificates, acceptor, tls_metrics))
        }
        None => None,
    };
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
    let mut tls_listeners = Vec::new();
    for addr in &cli.tls_addrs {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|err| format!("listen on {addr} (--tls-addr): {err}"))?;
        tls_listeners.push(listener);
    }
    let admin_listener = match cli.admin_addr {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(|err| format!("listen on {addr} (--admin-addr): {err}"))?,
        ),
        None => None,
    };
    let metrics_listener = match cli.metrics_addr {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(|err| format!("listen on {addr} (--metrics-addr): {err}"))?,
        ),
        None => None,
    };
    if cli.demo {
        demo::start("127.0.0.1:8000")
            .await
            .map_err(|err| format!("demo upstream: {err}"))?;
    }
    let client_options = client::ClientOptions {
        connect_timeout: cli.dial_timeout,
        ..client::ClientOptions::default()
    };
    let clients = client::Factory::new(client_options, watcher.clone());
    let mut registry = middleware::Registry::new();
    middleware_builtin::register_all(&mut registry, clients.clone());
    let proxy = Arc::new(
        Proxy::new(clients, registry, metrics.clone())
            .with_close_grace(cli.shutdown_grace)
            .with_redis(cli.redis.clone())
            .with_tunnel_idle_timeout(cli.tunnel_idle_timeout),
    );
    proxy
        .update(&loaded.gateway)
        .map_err(|err| format!("config: {err}"))?;
    if let Some(ctrl) = &ctrl {
        let retries = proxy.retries().clone();
        ctrl.on_features(move |features| {
            retries.set(features.get(configs_ctrl::FEATURE_RETRY) != Some(&false));
        });
    }
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
    let base_source = match &loader {
        configs::ConfigLoader::Remote(remote) => admin::BaseSource::Remote {
            url: remote.status().path,
        },
        configs::ConfigLoader::File(_) => admin::BaseSource::File {
            path: cli.conf.display().to_string(),
            ctrl: ctrl.clone(),
        },
    };
    let composer = admin::Composer::new(
        proxy.clone(),
        current.clone(),
        store.clone(),
        base_source,
        &loaded,
    );
    let mut store_tasks = Vec::new();
    if let Some(store) = &store {
        let mut snapshots = store.watch();
        let first = tokio::time::timeout(
            cli.initial_resolve_timeout,
            snapshots.wait_for(|snapshot| !snapshot.revision.is_empty()),
        )
        .await;
        if first.is_err() {
            tracing::warn!(store = %store.describe(), "config store not read yet; serving the file config");
        }
        store_tasks.push(admin::follow_store(
            composer.clone(),
            store.clone(),
            shutdown.clone(),
        ));
    }
    let reload_composer = composer.clone();
    let reloads = loader.watch(cli.reload_interval, shutdown.clone(), move |loaded| {
        reload_composer.set_base(loaded)
    });
    let ctrl_polling = ctrl.as_ref().map(|ctrl| ctrl.run(shutdown.clone()));
    let debug = cli.debug.then(|| {
        Arc::new(debug_views::mux(
            loader.clone(),
            composer.clone(),
            current,
            proxy.clone(),
            watcher.clone(),
            ctrl.clone(),
            cli.heap_profiler,
        ))
    });
    let max_connections = cli
        .max_connections
        .map_or_else(limits::default_max_connections, |max| {
            usize::try_from(max).unwrap_or(usize::MAX)
        });
    let options = ServerOptions {
        header_read_timeout: cli.header_read_timeout,
        idle_timeout: cli.idle_timeout,
        read_timeout: cli.read_timeout,
        write_timeout: cli.write_timeout,
        max_concurrent_streams: cli.max_concurrent_streams,
        shutdown_grace: cli.shutdown_grace,
        max_connections: ConnectionLimit::new(max_connections),
        ..ServerOptions::default()
    };
    tracing::info!(
        header_read_timeout = ?options.header_read_timeout,
        read_timeout = ?options.read_timeout,
        write_timeout = ?options.write_timeout,
        idle_timeout = ?options.idle_timeout,
        dial_timeout = ?cli.dial_timeout,
        initial_resolve_timeout = ?cli.initial_resolve_timeout,
        max_connections = options.max_connections.max(),
        max_concurrent_streams = options.max_concurrent_streams,
        "downstream and upstream limits"
    );
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
    let mut metrics_addr = None;
    if let Some(listener) = metrics_listener {
        let local = listener.local_addr().map_err(|err| err.to_string())?;
        metrics_addr = Some(local);
        tracing::info!(addr = %local, "listening (/metrics only)");
        servers.push(tokio::spawn(serve(
            listener,
            options.clone(),
            Arc::new(Edge::metrics_only(proxy.clone())),
            shutdown.clone(),
        )));
    }
    let mut tls_addrs = Vec::new();
    let mut certificate_reloads = None;
    if let Some((certificates, acceptor, tls_metrics)) = https {
        for listener in tls_listeners {
            let local = listener.local_addr().map_err(|err| err.to_string())?;
            tls_addrs.push(local);
            tracing::info!(addr = %local, names = ?certificates.names(), "listening (https)");
            servers.push(tokio::spawn(serve_tls(
                listener,
                options.clone(),
                acceptor.clone(),
                edge.clone(),
                shutdown.clone(),
            )));
        }
        certificate_reloads =
            Some(certificates.watch(cli.reload_interval, shutdown.clone(), tls_metrics));
    }
    let mut admin_addr = None;
    if let (Some(listener), Some(token), Some(store)) = (admin_listener, admin_token, &store) {
        let local = listener.local_addr().map_err(|err| err.to_string())?;
        admin_addr = Some(local);
        tracing::info!(addr = %local, store = %store.describe(), "listening (admin API)");
        let admin = Arc::new(admin::Admin::new(token, composer.clone(), store.clone()));
        servers.push(tokio::spawn(admin.serve(
            listener,
            shutdown.clone(),
            cli.shutdown_grace,
        )));
    }
    if let Some(store) = &store {
        let addr = admin_addr.or(local_addrs.first().copied());
        let addr = addr.map(|a| a.to_string()).unwrap_or_default();
        let started = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let id = format!(
            "{}-{}-{:x}",
            std::process::id(),
            addr.replace([':', '.'], "_"),
            started % 0xffff_ffff
        );
        store_tasks.push(admin::announce(
            &composer,
            store.clone(),
            id,
            addr,
            shutdown.clone(),
        ));
    }
    on_ready(Listening {
        addrs: local_addrs,
        tls_addrs,
        metrics_addr,
        admin_addr,
    });
    shutdown.cancelled().await;
    tracing::info!("shutting down: draining in-flight requests");
    for server in servers {
        let _ = server.await;
    }
    // Requests have drained (or the grace ran out); tunnels are not requests, close them now.
    proxy.close_tunnels();
    let _ = reloads.await;
    if let Some(ctrl_polling) = ctrl_polling {
        let _ = ctrl_polling.await;
    }
    for task in store_tasks {
        let _ = task.await;
    }
    if let Some(certificate_reloads) = certificate_reloads {
        let _ = certificate_reloads.await;
    }
    Ok(())
}

//! Helpers of the fleet tests: gateways sharing a config store, and one that can die as a
//! killed process does, inside a test process.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::harness::{TestGateway, get};

const PATIENCE: Duration = Duration::from_secs(10);

/// The flags of a gateway sharing the store `dsn` with an admin listener, its instance lease
/// (or Consul session) lasting `lease_ttl`.
pub fn store_flags(dsn: &str, lease_ttl: &str) -> Vec<String> {
    let mut flags = crate::admin::flags(dsn);
    flags.extend(["--store-lease-ttl".to_owned(), lease_ttl.to_owned()]);
    flags
}

/// A gateway whose file config routes only `/file/*`, sharing the store `dsn`.
pub async fn member(dsn: &str, lease_ttl: &str, file_target: &str) -> TestGateway {
    let flags = store_flags(dsn, lease_ttl);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    TestGateway::start_with(&crate::config::single("/file/*", file_target, ""), &flags)
        .await
        .expect("gateway starts")
}

/// Polls `url` every 2 ms (at most 10 s) until it answers 200; the time that took.
pub async fn first_200(url: &str) -> Duration {
    let started = Instant::now();
    while started.elapsed() < PATIENCE {
        if get(url).await.status == 200 {
            return started.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    panic!("{url} did not answer 200 within {PATIENCE:?}");
}

/// The `addr` of every instance `GET /admin/v1/instances` lists, sorted (or the status).
pub async fn instance_addrs(admin_addr: SocketAddr) -> Vec<String> {
    let reply = crate::admin::get(admin_addr, "/admin/v1/instances").await;
    if reply.status != 200 {
        return vec![format!("status {}", reply.status)];
    }
    let mut addrs: Vec<String> = crate::admin::json(&reply)
        .as_array()
        .expect("a list")
        .iter()
        .map(|instance| instance["addr"].as_str().unwrap_or_default().to_owned())
        .collect();
    addrs.sort();
    addrs
}

/// A gateway on its own runtime and thread; `die()` drops that runtime, so every task of
/// the gateway stops where it is (no deregistration, no session destroyed), as a killed
/// process would.
pub struct Doomed {
    /// Its admin listener.
    pub admin_addr: SocketAddr,
    die: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Doomed {
    /// Starts a gateway with `yaml` and `flags` (which must include `--admin-addr`) on a
    /// runtime of its own thread.
    pub fn start(flags: Vec<String>, yaml: String) -> Doomed {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (die, die_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("runtime");
            let gateway = runtime.block_on(async move {
                let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
                let gateway = TestGateway::start_with(&yaml, &flags)
                    .await
                    .expect("gateway starts");
                ready_tx.send(gateway.admin_addr.unwrap()).expect("report");
                let _ = die_rx.await;
                gateway
            });
            // Every task (watch, lease keep-alive, servers) is dropped mid-flight.
            runtime.shutdown_background();
            drop(gateway);
        });
        let admin_addr = ready_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the doomed gateway started");
        Doomed {
            admin_addr,
            die: Some(die),
            thread: Some(thread),
        }
    }

    /// Drops the gateway's runtime: every task stops where it is.
    pub fn die(&mut self) {
        if let Some(die) = self.die.take() {
            let _ = die.send(());
        }
        if let Some(thread) = self.thread.take() {
            thread.join().expect("gateway thread");
        }
    }
}

impl Drop for Doomed {
    fn drop(&mut self) {
        self.die();
    }
}

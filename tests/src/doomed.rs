//! A gateway that can die as a killed process does, inside a test process.

use std::net::SocketAddr;
use std::time::Duration;

use crate::harness::TestGateway;

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

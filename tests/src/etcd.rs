//! A private etcd server for tests: the real `etcd` binary (Debian's 3.4 here) on loopback
//! ports with a temporary data dir, plus helpers to write Kratos-style instances into it.
//!
//! ```no_run
//! # async fn demo() {
//! let etcd = tests::etcd::EtcdServer::start().await;
//! etcd.put_instance("/microservices", &tests::etcd::instance("helloworld", "a", "127.0.0.1:8000")).await;
//! # }
//! ```
//!
//! The server writes its log to `etcd.log` beside the data dir; a failed start panics with
//! the tail of that log.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use discovery::ServiceInstance;
use etcd_client::{Client, CompactionOptions, ConnectOptions};

/// How to get the binary when it is missing.
pub const INSTALL_HINT: &str = "apt-get install -y etcd-server";

/// Bound on waiting for a (re)started server to answer.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// Start-up attempts on fresh ports before giving up.
const START_ATTEMPTS: u32 = 3;

/// A running etcd process on 127.0.0.1; killed on drop, its data dir removed with it.
pub struct EtcdServer {
    binary: PathBuf,
    dir: tempfile::TempDir,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
}

impl EtcdServer {
    /// Starts etcd on free loopback ports and waits (at most 10 s) until it serves reads.
    /// If a port was taken in the meantime (another test's server), it retries on new ports.
    ///
    /// Panics with the install command if no `etcd` binary is found.
    pub async fn start() -> EtcdServer {
        let binary = find_binary().unwrap_or_else(|| {
            panic!("etcd is not installed (looked for /usr/bin/etcd and `etcd` on PATH); install it with: {INSTALL_HINT}")
        });
        let dir = tempfile::tempdir().expect("create a temp dir for etcd");
        let mut server = EtcdServer {
            binary,
            dir,
            client_port: free_port(),
            peer_port: free_port(),
            child: None,
        };
        let mut attempts = 0;
        loop {
            attempts += 1;
            match server.spawn().await {
                Ok(()) => return server,
                Err(error) if attempts >= START_ATTEMPTS => panic!("{error}"),
                Err(_) => {
                    server.kill();
                    let _ = std::fs::remove_dir_all(server.data_dir());
                    server.client_port = free_port();
                    server.peer_port = free_port();
                }
            }
        }
    }

    /// `127.0.0.1:PORT` of the client API.
    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }

    /// Stops the process at once (SIGKILL); the data dir is kept for [`EtcdServer::restart`].
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the process again on the same ports and data dir, waiting until it serves.
    pub async fn restart(&mut self) {
        self.kill();
        if let Err(error) = self.spawn().await {
            panic!("{error}");
        }
    }

    /// A fresh client for this server.
    pub async fn client(&self) -> Client {
        let options = ConnectOptions::new().with_connect_timeout(Duration::from_secs(2));
        Client::connect([format!("http://{}", self.endpoint())], Some(options))
            .await
            .expect("create an etcd client")
    }

    /// Writes `instance` as Kratos does: key `<namespace>/<name>/<id>`, JSON value. Returns
    /// the revision of the write.
    pub async fn put_instance(&self, namespace: &str, instance: &ServiceInstance) -> i64 {
        let value = serde_json::to_string(instance).expect("serialise the instance");
        self.put_raw(
            &instance_key(namespace, &instance.name, &instance.id),
            &value,
        )
        .await
    }

    /// Writes any value under any key (for malformed entries). Returns the revision.
    pub async fn put_raw(&self, key: &str, value: &str) -> i64 {
        let response = tokio::time::timeout(
            Duration::from_secs(5),
            self.client().await.put(key, value, None),
        )
        .await
        .expect("etcd put timed out")
        .expect("etcd put");
        response.header().map_or(0, |header| header.revision())
    }

    /// Deletes the instance key `<namespace>/<name>/<id>`. Returns the revision.
    pub async fn delete_instance(&self, namespace: &str, name: &str, id: &str) -> i64 {
        let response = tokio::time::timeout(
            Duration::from_secs(5),
            self.client()
                .await
                .delete(instance_key(namespace, name, id), None),
        )
        .await
        .expect("etcd delete timed out")
        .expect("etcd delete");
        response.header().map_or(0, |header| header.revision())
    }

    /// Compacts the history up to the current revision (physically), so older revisions can
    /// no longer be watched. Returns that revision.
    pub async fn compact(&self) -> i64 {
        let mut client = self.client().await;
        let revision = client
            .get("compact-probe", None)
            .await
            .expect("etcd get")
            .header()
            .map_or(0, |header| header.revision());
        client
            .compact(revision, Some(CompactionOptions::new().with_physical()))
            .await
            .expect("etcd compact");
        revision
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    async fn spawn(&mut self) -> Result<(), String> {
        let client_url = format!("http://127.0.0.1:{}", self.client_port);
        let peer_url = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("open the etcd log file");
        let log_err = log.try_clone().expect("clone the etcd log handle");
        let child = Command::new(&self.binary)
            .arg("--name")
            .arg("default")
            .arg("--data-dir")
            .arg(self.data_dir())
            .arg("--listen-client-urls")
            .arg(&client_url)
            .arg("--advertise-client-urls")
            .arg(&client_url)
            .arg("--listen-peer-urls")
            .arg(&peer_url)
            .arg("--initial-advertise-peer-urls")
            .arg(&peer_url)
            .arg("--initial-cluster")
            .arg(format!("default={peer_url}"))
            .arg("--initial-cluster-state")
            .arg("new")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err))
            .spawn()
            .unwrap_or_else(|error| panic!("spawn {}: {error}", self.binary.display()));
        self.child = Some(child);
        self.wait_ready(&client_url, &peer_url).await
    }

    /// Polls until the server answers as *our* member (a port taken by another test's
    /// server must not pass); gives up after [`START_TIMEOUT`] with the log tail.
    async fn wait_ready(&mut self, client_url: &str, peer_url: &str) -> Result<(), String> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                return Err(format!(
                    "etcd exited during start-up with {status}; log tail:\n{}",
                    log_tail(&self.log_path())
                ));
            }
            let attempt = async {
                let options =
                    ConnectOptions::new().with_connect_timeout(Duration::from_millis(500));
                let mut client = Client::connect([client_url], Some(options)).await?;
                let members = client.member_list().await?;
                let ours = members
                    .members()
                    .iter()
                    .any(|member| member.peer_urls().iter().any(|url| url == peer_url));
                client.get("health-probe", None).await?;
                Ok::<_, etcd_client::Error>(ours)
            };
            match tokio::time::timeout(Duration::from_secs(1), attempt).await {
                Ok(Ok(true)) => return Ok(()),
                Ok(Ok(false)) => {
                    return Err(format!(
                        "another etcd answers on {client_url}; ours did not start"
                    ));
                }
                _ => {}
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "etcd did not become ready on {client_url} within {START_TIMEOUT:?}; log tail:\n{}",
                    log_tail(&self.log_path())
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The Kratos key of an instance.
pub fn instance_key(namespace: &str, name: &str, id: &str) -> String {
    format!("{namespace}/{name}/{id}")
}

/// A Kratos-style instance of `name` with one plain HTTP endpoint at `address`.
pub fn instance(name: &str, id: &str, address: &str) -> ServiceInstance {
    ServiceInstance {
        id: id.to_owned(),
        name: name.to_owned(),
        version: "v1".to_owned(),
        metadata: Default::default(),
        endpoints: vec![format!("http://{address}?isSecure=false")],
    }
}

fn find_binary() -> Option<PathBuf> {
    let system = Path::new("/usr/bin/etcd");
    if system.is_file() {
        return Some(system.to_path_buf());
    }
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join("etcd"))
            .find(|candidate| candidate.is_file())
    })
}

/// A port that was free a moment ago (bind to :0, read, release).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .expect("find a free loopback port")
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

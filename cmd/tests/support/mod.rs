//! Helpers for the tests that run `gateway` processes: spawning one and reading the
//! addresses it logs, a blocking HTTP/1.1 client, a named upstream, and a bounded wait.
//! Everything blocks (threads, std sockets): these tests drive separate processes.

#![allow(dead_code, unreachable_pub)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant};

/// The binary under test.
pub const GATEWAY: &str = env!("CARGO_BIN_EXE_gateway");

/// The admin token the tests start gateways with.
pub const TOKEN: &str = "fleet-test-token";

/// Bound on a gateway's start-up.
const START_TIMEOUT: Duration = Duration::from_secs(15);

/// A `gateway` process; killed (SIGKILL) on drop. When a test fails while one runs, the
/// tail of its log is printed.
pub struct Gateway {
    child: Option<Child>,
    /// The first `--addr` listener.
    pub addr: SocketAddr,
    /// The `--admin-addr` listener, when there is one.
    pub admin_addr: Option<SocketAddr>,
    log: Arc<Mutex<Vec<String>>>,
}

impl Gateway {
    /// Starts `gateway ARGS` (with `RUST_LOG=info`) and waits until it logs its proxy
    /// listener and, when `--admin-addr` is among `args`, its admin listener.
    pub fn start(args: &[&str]) -> Gateway {
        let mut child = Command::new(GATEWAY)
            .args(args)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn the gateway");
        let stderr = child.stderr.take().expect("piped stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let kept = log.clone();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("listening")
                    && let Some(addr) = line.split("addr=").nth(1)
                {
                    let addr = addr.split_whitespace().next().unwrap_or("").to_owned();
                    let admin = line.contains("(admin API)");
                    let plain = !line.contains("listening (");
                    if admin || plain {
                        let _ = tx.send((admin, addr));
                    }
                }
                kept.lock().unwrap().push(line);
            }
        });
        let wants_admin = args.contains(&"--admin-addr");
        let (mut addr, mut admin_addr) = (None, None);
        let deadline = Instant::now() + START_TIMEOUT;
        while addr.is_none() || (wants_admin && admin_addr.is_none()) {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok((admin, text)) => {
                    let parsed: SocketAddr = text.parse().expect("a logged address");
                    if admin {
                        admin_addr = Some(parsed);
                    } else if addr.is_none() {
                        addr = Some(parsed);
                    }
                }
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "the gateway did not log its listeners within {START_TIMEOUT:?}; log:\n{}",
                        log.lock().unwrap().join("\n")
                    );
                }
            }
        }
        Gateway {
            child: Some(child),
            addr: addr.expect("a proxy address"),
            admin_addr,
            log,
        }
    }

    /// `http://ADDR{path}` is reached with [`get`]`(gw.addr, path)`; this is the admin one.
    pub fn admin(&self) -> SocketAddr {
        self.admin_addr.expect("started with --admin-addr")
    }

    /// Stops the process at once (SIGKILL): nothing of it runs after this returns.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The last `lines` log lines.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = self.log.lock().unwrap();
        log[log.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if thread::panicking() && self.child.is_some() {
            eprintln!(
                "--- gateway {} log tail ---\n{}",
                self.addr,
                self.log_tail(40)
            );
        }
        self.kill();
    }
}

/// An HTTP answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// 0 when there was no (complete) answer.
    pub status: u16,
    /// The body (chunked transfer decoded).
    pub body: String,
}

impl Reply {
    /// The body as JSON (panics with the body otherwise).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|err| panic!("not JSON ({err}): {} {}", self.status, self.body))
    }
}

/// One request on a fresh connection (`Connection: close`), bounded by 5 s.
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Reply {
    let failed = Reply {
        status: 0,
        body: String::new(),
    };
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
        return failed;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = stream.set_nodelay(true);
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    head.push_str(body);
    if stream.write_all(head.as_bytes()).is_err() {
        return failed;
    }
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw);
    parse_reply(&raw).unwrap_or(failed)
}

fn parse_reply(raw: &[u8]) -> Option<Reply> {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..split]).ok()?;
    let status = head.get(9..12)?.parse().ok()?;
    let rest = &raw[split + 4..];
    let chunked = head.lines().any(|line| {
        let line = line.to_ascii_lowercase();
        line.starts_with("transfer-encoding:") && line.contains("chunked")
    });
    let body = if chunked {
        dechunk(rest)?
    } else {
        rest.to_vec()
    };
    Some(Reply {
        status,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

fn dechunk(mut rest: &[u8]) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let end = rest.windows(2).position(|w| w == b"\r\n")?;
        let size = std::str::from_utf8(&rest[..end]).ok()?;
        let size = usize::from_str_radix(size.split(';').next()?.trim(), 16).ok()?;
        rest = &rest[end + 2..];
        if size == 0 {
            return Some(body);
        }
        body.extend_from_slice(rest.get(..size)?);
        rest = rest.get(size + 2..)?;
    }
}

/// `GET path`.
pub fn get(addr: SocketAddr, path: &str) -> Reply {
    request(addr, "GET", path, &[], "")
}

/// An admin `GET path` with [`TOKEN`].
pub fn admin_get(addr: SocketAddr, path: &str) -> Reply {
    let auth = format!("Bearer {TOKEN}");
    request(addr, "GET", path, &[("Authorization", &auth)], "")
}

/// An admin `PUT /admin/v1/endpoints/{id}` of `endpoint` (JSON) with [`TOKEN`].
pub fn admin_put(addr: SocketAddr, id: &str, endpoint: &serde_json::Value) -> Reply {
    let auth = format!("Bearer {TOKEN}");
    request(
        addr,
        "PUT",
        &format!("/admin/v1/endpoints/{id}"),
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/json"),
        ],
        &endpoint.to_string(),
    )
}

/// An endpoint routing `path` to `target`, in the admin API's JSON.
pub fn endpoint(path: &str, target: &str) -> serde_json::Value {
    serde_json::json!({ "path": path, "backends": [{ "target": target }] })
}

/// An upstream answering `200 <name>` to every request, on its own threads; its
/// `127.0.0.1:PORT`.
pub fn upstream(name: &str) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an upstream");
    let addr = listener.local_addr().expect("its address");
    let answer = format!(
        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{name}",
        name.len()
    );
    thread::spawn(move || {
        for stream in listener.incoming().take(1_000_000) {
            let Ok(mut stream) = stream else { continue };
            let answer = answer.clone();
            thread::spawn(move || {
                let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                let mut buf = [0u8; 4096];
                let _ = stream.read(&mut buf);
                let _ = stream.write_all(answer.as_bytes());
            });
        }
    });
    addr.to_string()
}

/// Calls `check` every 10 ms until it returns `Ok`, at most `patience`; panics with what
/// was awaited and the last thing seen.
pub fn eventually<T>(
    patience: Duration,
    what: &str,
    mut check: impl FnMut() -> Result<T, String>,
) -> T {
    let deadline = Instant::now() + patience;
    loop {
        match check() {
            Ok(value) => return value,
            Err(seen) if Instant::now() >= deadline => {
                panic!("timed out after {patience:?} waiting for: {what} (last: {seen})")
            }
            Err(_) => thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// Writes `gateway.yaml` routing `/file/*` to `target` into `dir`; its path.
pub fn file_config(dir: &std::path::Path, target: &str) -> String {
    let path = dir.join("gateway.yaml");
    std::fs::write(
        &path,
        format!(
            "name: fleet\nendpoints:\n  - path: /file/*\n    backends:\n      - target: {target}\n"
        ),
    )
    .expect("write the config");
    path.to_str().expect("a UTF-8 path").to_owned()
}

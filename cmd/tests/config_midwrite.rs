//! The `gateway` process keeps serving when its config file is caught mid-write: a truncated
//! (empty) file is refused and reported, a half-written file is never applied, and the
//! complete new version is.

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant};

const GATEWAY: &str = env!("CARGO_BIN_EXE_gateway");
/// How long to wait for something that should happen within a few reload intervals.
const DEADLINE: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(20);
const RELOAD_INTERVAL: &str = "100ms";
const INTERVAL: Duration = Duration::from_millis(100);

/// Polls `probe` every 20 ms until it returns `Some`, for at most `DEADLINE`.
fn eventually<T>(what: &str, probe: impl FnMut() -> Option<T>) -> T {
    eventually_or_none(probe).unwrap_or_else(|| panic!("{what}: not within {DEADLINE:?}"))
}

/// Like [`eventually`], but `None` when the deadline passes.
fn eventually_or_none<T>(mut probe: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(value) = probe() {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(POLL);
    }
}

/// An upstream on 127.0.0.1:0 that answers every request with `upstream saw <path>`.
fn echo_upstream() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind upstream");
    let port = listener.local_addr().expect("upstream address").port();
    thread::spawn(move || {
        // Bounded: far more than the test sends.
        for stream in listener.incoming().take(1_000) {
            let Ok(mut stream) = stream else { continue };
            thread::spawn(move || {
                let mut buf = [0u8; 4096];
                let n = stream.read(&mut buf).unwrap_or(0);
                let head = String::from_utf8_lossy(&buf[..n]);
                let path = head.split_whitespace().nth(1).unwrap_or("?").to_owned();
                let body = format!("upstream saw {path}");
                let _ = write!(
                    stream,
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
            });
        }
    });
    port
}

/// The gateway process; killed when dropped so a failed assertion leaves nothing running.
struct Gateway {
    child: Child,
    addr: String,
    log: Arc<Mutex<Vec<String>>>,
}

impl Gateway {
    /// Starts the gateway with `args` and waits for the address it logs; keeps every
    /// stderr line for [`Gateway::log_lines`].
    fn start(args: &[&str]) -> Self {
        let mut child = Command::new(GATEWAY)
            .args(args)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stderr(Stdio::piped())
            .spawn()
            .expect("gateway starts");
        let stderr = child.stderr.take().expect("piped stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (addr_tx, addr_rx) = mpsc::channel();
        let lines = log.clone();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(addr) = line
                    .split("addr=")
                    .nth(1)
                    .filter(|_| line.contains("listening"))
                {
                    let _ = addr_tx.send(addr.split_whitespace().next().unwrap_or("").to_owned());
                }
                lines.lock().expect("log lock").push(line);
            }
        });
        let addr = match addr_rx.recv_timeout(Duration::from_secs(10)) {
            Ok(addr) => addr,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("gateway did not log its address: {:?}", log.lock());
            }
        };
        Gateway { child, addr, log }
    }

    /// The stderr lines so far that contain `needle`.
    fn log_lines(&self, needle: &str) -> Vec<String> {
        let log = self.log.lock().expect("log lock");
        log.iter().filter(|l| l.contains(needle)).cloned().collect()
    }

    /// `GET path` through the gateway: status and body.
    fn get(&self, path: &str) -> (u16, String) {
        let mut stream = TcpStream::connect(&self.addr).expect("connect to the gateway");
        stream
            .set_read_timeout(Some(DEADLINE))
            .expect("read timeout");
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
        )
        .expect("send request");
        let mut response = String::new();
        let _ = stream.read_to_string(&mut response);
        let status = response
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .unwrap_or_else(|| panic!("no status line in {response:?}"));
        let body = response
            .split_once("\r\n\r\n")
            .map(|(_, body)| body.to_owned())
            .unwrap_or_default();
        (status, body)
    }

    /// Asserts `path` reaches the upstream: 200 and the upstream's own body.
    #[track_caller]
    fn assert_routed(&self, path: &str) {
        let (status, body) = self.get(path);
        assert_eq!(status, 200, "{path}: {body}");
        assert!(
            body.contains(&format!("upstream saw {path}")),
            "{path}: {body}"
        );
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes the whole file at once: a temp file beside it, then a rename.
fn write_atomically(path: &Path, text: &str) {
    let temp = path.with_extension("yaml.tmp");
    fs::write(&temp, text).expect("write temp file");
    fs::rename(&temp, path).expect("rename over the config");
}

fn config(version: &str, port: u16, paths: &[&str]) -> String {
    let mut text = format!("name: midwrite\nversion: {version}\nendpoints:\n");
    for path in paths {
        text.push_str(&format!(
            "  - path: {path}\n    backends:\n      - target: 127.0.0.1:{port}\n"
        ));
    }
    text
}

#[test]
fn config_caught_mid_write_is_refused_and_the_running_routes_stay() {
    let port = echo_upstream();
    let dir = tempfile::tempdir().expect("tempdir");
    let conf = dir.path().join("gateway.yaml");
    write_atomically(&conf, &config("v1", port, &["/old"]));
    let conf_arg = conf.to_str().expect("UTF-8 temp path");
    let gateway = Gateway::start(&[
        "--conf",
        conf_arg,
        "--addr",
        "127.0.0.1:0",
        "--reload-interval",
        RELOAD_INTERVAL,
    ]);
    gateway.assert_routed("/old");

    // `: > gateway.yaml`: truncated, and nothing written after it.
    fs::File::create(&conf).expect("truncate the config");
    let refused = format!("config file is empty (caught mid-write?): {conf_arg}");
    eventually("the empty file is reported", || {
        (!gateway.log_lines(&refused).is_empty()).then_some(())
    });
    // Several intervals later the old routes still answer, and the file was reported once.
    let quiet_until = Instant::now() + INTERVAL * 4;
    while Instant::now() < quiet_until {
        gateway.assert_routed("/old");
        thread::sleep(POLL);
    }
    assert_eq!(gateway.log_lines(&refused).len(), 1, "reported once");
    assert!(gateway.log_lines("config applied").is_empty());

    // An editor's save: a first part (itself a valid config with only /new), then the
    // complete version. The first part must never be applied.
    let full = config("v2", port, &["/new", "/also"]);
    let cut = full.find("  - path: /also").expect("second endpoint");
    let mut file = fs::File::create(&conf).expect("truncate");
    file.write_all(&full.as_bytes()[..cut]).expect("first part");
    file.flush().expect("flush");
    thread::sleep(Duration::from_millis(10));
    drop(file);
    write_atomically(&conf, &full);

    eventually("the new version is applied", || {
        (gateway.get("/new").0 == 200).then_some(())
    });
    gateway.assert_routed("/new");
    gateway.assert_routed("/also");
    assert_eq!(gateway.get("/old").0, 404, "the old route is gone");
    let applied = gateway.log_lines("config applied");
    assert_eq!(applied.len(), 1, "only the full version: {applied:?}");
    assert!(applied[0].contains("endpoints=2"), "{}", applied[0]);
}

#[test]
fn empty_config_file_fails_the_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let conf = dir.path().join("gateway.yaml");
    fs::write(&conf, "# nothing yet\n").expect("write");
    let conf_arg = conf.to_str().expect("UTF-8 temp path");
    let mut child = Command::new(GATEWAY)
        .args(["--conf", conf_arg, "--addr", "127.0.0.1:0"])
        .stderr(Stdio::piped())
        .spawn()
        .expect("gateway runs");
    // Poll for the exit rather than wait: a gateway that starts anyway must not hang the test.
    let exited = eventually_or_none(|| child.try_wait().ok().flatten());
    if exited.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        let _ = pipe.read_to_string(&mut stderr);
    }
    let status = exited.unwrap_or_else(|| panic!("the gateway started on an empty file: {stderr}"));
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "config file is empty (caught mid-write?): {conf_arg}"
        )),
        "{stderr}"
    );
}

//! The `gateway` process itself: exit codes, one-line start-up errors, SIGTERM draining.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

const GATEWAY: &str = env!("CARGO_BIN_EXE_gateway");

fn run_to_exit(args: &[&str]) -> (i32, String) {
    let output = Command::new(GATEWAY)
        .args(args)
        .output()
        .expect("gateway runs");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn write_temp(name: &str, text: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    let path = path.to_str().unwrap().to_owned();
    (dir, path)
}

#[test]
fn bad_flags_exit_2_with_one_line() {
    let (code, stderr) = run_to_exit(&["--no-such-flag"]);
    assert_eq!(code, 2);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("--no-such-flag"), "{stderr}");
    let (code, stderr) = run_to_exit(&["--reload-interval", "soon"]);
    assert_eq!(code, 2);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
}

#[test]
fn invalid_config_exits_2_naming_file_and_line() {
    let (_dir, path) = write_temp(
        "bad.yaml",
        "name: t\nendpoints:\n  - path: /a\n    timeout: fast\n    backends:\n      - target: 127.0.0.1:1\n",
    );
    let (code, stderr) = run_to_exit(&["--conf", &path, "--addr", "127.0.0.1:0"]);
    assert_eq!(code, 2);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("bad.yaml:4:"), "{stderr}");
    let (code, stderr) = run_to_exit(&[
        "--conf",
        "/nonexistent/gateway.yaml",
        "--addr",
        "127.0.0.1:0",
    ]);
    assert_eq!(code, 2);
    assert!(stderr.contains("/nonexistent/gateway.yaml"), "{stderr}");
}

#[test]
fn unreachable_remote_config_exits_2_naming_the_url() {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("free port")
        .port();
    let url = format!("http://127.0.0.1:{port}/gateway.yaml");
    let (code, stderr) = run_to_exit(&["--conf", &url, "--addr", "127.0.0.1:0"]);
    assert_eq!(code, 2, "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with(&format!("gateway: config: {url}: cannot fetch")),
        "{stderr}"
    );
}

#[test]
fn admin_api_without_a_token_or_with_a_bad_store_exits_2() {
    let (_dir, path) = write_temp("ok.yaml", "name: t\nendpoints: []\n");
    let base = [
        "--conf",
        &path,
        "--addr",
        "127.0.0.1:0",
        "--admin-addr",
        "127.0.0.1:0",
    ];
    let output = Command::new(GATEWAY)
        .args(base)
        .env_remove("GATEWAY_ADMIN_TOKEN")
        .output()
        .expect("gateway runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("--admin-token"), "{stderr}");
    let mut args = base.to_vec();
    args.extend(["--admin-token", "t", "--store", "redis://x:1/p"]);
    let (code, stderr) = run_to_exit(&args);
    assert_eq!(code, 2);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("--store"), "{stderr}");
}

#[test]
fn unparsable_dsn_exits_2() {
    let (_dir, path) = write_temp("ok.yaml", "name: t\nendpoints: []\n");
    let (code, stderr) = run_to_exit(&[
        "--conf",
        &path,
        "--addr",
        "127.0.0.1:0",
        "--discovery",
        "zookeeper://x:1",
    ]);
    assert_eq!(code, 2);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("--discovery"), "{stderr}");
}

#[test]
fn unusable_tls_flags_exit_2_with_one_line() {
    let (_dir, path) = write_temp("ok.yaml", "name: t\nendpoints: []\n");
    let base = [
        "--conf",
        &path,
        "--addr",
        "127.0.0.1:0",
        "--tls-addr",
        "127.0.0.1:0",
    ];
    let (code, stderr) = run_to_exit(&base);
    assert_eq!(code, 2);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("--tls-addr needs"), "{stderr}");
    let missing = [
        "--tls-cert",
        "/nonexistent/server.crt",
        "--tls-key",
        "/nonexistent/server.key",
    ];
    let (code, stderr) = run_to_exit(&[&base[..], &missing[..]].concat());
    assert_eq!(code, 2);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("/nonexistent/server.crt"), "{stderr}");
}

/// An upstream that answers after `delay`, on its own thread.
fn slow_upstream(delay: Duration) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    thread::spawn(move || {
        for stream in listener.incoming().take(16) {
            let Ok(mut stream) = stream else { continue };
            thread::spawn(move || {
                let mut buf = [0u8; 4096];
                let _ = stream.read(&mut buf);
                thread::sleep(delay);
                let _ = stream.write_all(
                    b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\nconnection: close\r\n\r\nslow",
                );
            });
        }
    });
    port
}

/// Starts the gateway with `args` and waits (10 s at most) for the address it logs.
fn spawn_gateway(args: &[&str]) -> (std::process::Child, String) {
    let mut child = Command::new(GATEWAY)
        .args(args)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (addr_tx, addr_rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(addr) = line
                .split("addr=")
                .nth(1)
                .filter(|_| line.contains("listening"))
            {
                let _ = addr_tx.send(addr.split_whitespace().next().unwrap_or("").to_owned());
            }
        }
    });
    let addr = addr_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("gateway logs its address");
    (child, addr)
}

#[test]
fn sigterm_drains_in_flight_requests_then_exits_0() {
    let upstream = slow_upstream(Duration::from_millis(800));
    let (_dir, path) = write_temp(
        "gw.yaml",
        &format!(
            "name: t\nendpoints:\n  - path: /slow\n    timeout: 5s\n    backends:\n      - target: 127.0.0.1:{upstream}\n"
        ),
    );
    let (mut child, addr) = spawn_gateway(&["--conf", &path, "--addr", "127.0.0.1:0"]);
    let mut stream = TcpStream::connect(&addr).unwrap();
    stream
        .write_all(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    thread::sleep(Duration::from_millis(200));
    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    assert!(
        response.starts_with("HTTP/1.1 200"),
        "in-flight request completed: {response:?}"
    );
    assert!(response.ends_with("slow"), "{response:?}");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "gateway did not exit after SIGTERM"
        );
        thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(0));
    // After shutdown nothing listens any more.
    assert!(TcpStream::connect(&addr).is_err());
}

#[test]
fn demo_mode_answers_the_example_config() {
    let example = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../configs/examples/gateway.yaml"
    );
    // The demo upstream needs 127.0.0.1:8000; skip quietly only if something else holds it.
    if TcpListener::bind("127.0.0.1:8000").is_err() {
        eprintln!("127.0.0.1:8000 is busy; skipping the demo check");
        return;
    }
    let (mut child, addr) = spawn_gateway(&["--conf", example, "--addr", "127.0.0.1:0", "--demo"]);
    let mut stream = TcpStream::connect(&addr).unwrap();
    stream
        .write_all(b"GET /hello/world HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(
        response.contains("hello from the demo upstream"),
        "{response}"
    );
}

/// A go-kratos/gateway command line (single-dash flags, `-name=value`) starts this gateway
/// unchanged: the config and priority directory are loaded, and `-debug` mounts `/debug`.
#[test]
fn kratos_single_dash_flags_start_the_gateway() {
    let upstream = slow_upstream(Duration::ZERO);
    let (dir, path) = write_temp(
        "config.yaml",
        &format!(
            "name: t\nendpoints:\n  - path: /main\n    backends:\n      - target: 127.0.0.1:{upstream}\n"
        ),
    );
    let priority = dir.path().join("canary");
    std::fs::create_dir(&priority).unwrap();
    std::fs::write(
        priority.join("p.yaml"),
        format!(
            "endpoints:\n  - path: /canary\n    backends:\n      - target: 127.0.0.1:{upstream}\n"
        ),
    )
    .unwrap();
    let priority_flag = format!("-conf.priority={}", priority.display());
    let (mut child, addr) = spawn_gateway(&[
        "-conf",
        &path,
        &priority_flag,
        "-addr",
        "127.0.0.1:0",
        "-debug",
    ]);
    let status_of = |path: &str| {
        let mut stream = TcpStream::connect(&addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut response = String::new();
        let _ = stream.read_to_string(&mut response);
        response.get(9..12).unwrap_or("").to_owned()
    };
    let (main, canary, debug) = (
        status_of("/main"),
        status_of("/canary"),
        status_of("/debug/ping"),
    );
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    assert_eq!(
        (main.as_str(), canary.as_str(), debug.as_str()),
        ("200", "200", "200")
    );
}

/// An OTLP/HTTP collector on its own thread: answers every `POST /v1/traces` with 200 and
/// sends each request's content type and body.
fn otlp_receiver() -> (u16, mpsc::Receiver<(String, Vec<u8>)>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for stream in listener.incoming().take(16) {
            let Ok(stream) = stream else { continue };
            let tx = tx.clone();
            thread::spawn(move || {
                let mut reader = BufReader::new(stream);
                loop {
                    let (mut length, mut content_type, mut line) =
                        (0, String::new(), String::new());
                    let mut post = false;
                    loop {
                        line.clear();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        let lower = line.trim().to_ascii_lowercase();
                        if lower.is_empty() {
                            break;
                        }
                        post |= lower.starts_with("post /v1/traces ");
                        if let Some(value) = lower.strip_prefix("content-length:") {
                            length = value.trim().parse().unwrap_or(0);
                        }
                        if let Some(value) = lower.strip_prefix("content-type:") {
                            content_type = value.trim().to_owned();
                        }
                    }
                    let mut body = vec![0; length];
                    if reader.read_exact(&mut body).is_err() {
                        return;
                    }
                    let answer: &[u8] = if post {
                        let _ = tx.send((content_type, body));
                        b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"
                    } else {
                        b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n"
                    };
                    if reader.get_mut().write_all(answer).is_err() {
                        return;
                    }
                }
            });
        }
    });
    (port, rx)
}

#[test]
fn sigterm_flushes_the_spans_still_queued_for_the_collector() {
    let upstream = slow_upstream(Duration::ZERO);
    let (collector, exports) = otlp_receiver();
    let (_dir, path) = write_temp(
        "gw.yaml",
        &format!(
            "name: t\nmiddlewares:\n  - name: tracing\n    options: {{httpEndpoint: '127.0.0.1:{collector}'}}\nendpoints:\n  - path: /traced\n    backends:\n      - target: 127.0.0.1:{upstream}\n"
        ),
    );
    let (mut child, addr) = spawn_gateway(&["--conf", &path, "--addr", "127.0.0.1:0"]);
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let mut stream = TcpStream::connect(&addr).unwrap();
    stream
        .write_all(
            format!("GET /traced HTTP/1.1\r\nHost: x\r\nConnection: close\r\ntraceparent: 00-{trace}-00f067aa0ba902b7-01\r\n\r\n")
                .as_bytes(),
        )
        .unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    assert!(response.starts_with("HTTP/1.1 200"), "{response:?}");
    // The batch would wait 5 s: the spans are still queued when the signal comes.
    assert!(
        exports.try_recv().is_err(),
        "nothing exported before the signal"
    );
    assert!(
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "gateway did not exit after SIGTERM"
        );
        thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(0));
    let (content_type, body) = exports
        .recv_timeout(Duration::from_secs(1))
        .expect("the queued spans were exported before exit");
    assert_eq!(content_type, "application/x-protobuf");
    // Both spans carry the incoming trace id, as 16 raw bytes in the protobuf.
    let trace_bytes: Vec<u8> = (0..16)
        .map(|i| u8::from_str_radix(&trace[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    let found = body
        .windows(16)
        .filter(|w| *w == trace_bytes.as_slice())
        .count();
    assert!(
        found >= 2,
        "server and client span of the trace: found {found}"
    );
}

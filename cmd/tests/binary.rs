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

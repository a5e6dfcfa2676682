//! The control-service flags of the `gateway` process: Kratos' environment variables reach
//! the control service, and a bad URL is a start-up error.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

const GATEWAY: &str = env!("CARGO_BIN_EXE_gateway");

#[test]
fn a_bad_ctrl_service_url_exits_2_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("gateway.yaml");
    std::fs::write(&conf, "name: t\nendpoints: []\n").unwrap();
    let output = Command::new(GATEWAY)
        .args(["--conf", conf.to_str().unwrap(), "--addr", "127.0.0.1:0"])
        .args(["--ctrl-service", "http://127.0.0.1:1,ctrl:8000"])
        .output()
        .expect("gateway runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("--ctrl-service") && stderr.contains("ctrl:8000"),
        "{stderr}"
    );
}

#[test]
fn advertise_variables_reach_the_control_service() {
    // A one-shot control service: records the first request line, answers 304.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (seen_tx, seen_rx) = mpsc::channel();
    thread::spawn(move || {
        if let Ok((stream, _)) = listener.accept() {
            let mut reader = BufReader::new(stream.try_clone().expect("clone"));
            let mut line = String::new();
            let _ = reader.read_line(&mut line);
            let _ = seen_tx.send(line);
            let mut stream = stream;
            let _ = stream.write_all(b"HTTP/1.1 304 Not Modified\r\nConnection: close\r\n\r\n");
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("gateway.yaml");
    std::fs::write(&conf, "name: t\nendpoints: []\n").unwrap();
    let mut child = Command::new(GATEWAY)
        .args(["--conf", conf.to_str().unwrap(), "--addr", "127.0.0.1:0"])
        .args(["--ctrl-service", &url, "--ctrl-timeout", "2s"])
        .env("ADVERTISE_NAME", "edge-1")
        .env("ADVERTISE_ADDR", "10.9.8.7")
        .env_remove("ADVERTISE_DEVICE")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("gateway starts");
    let line = seen_rx.recv_timeout(Duration::from_secs(10));
    let _ = child.kill();
    let _ = child.wait();
    let line = line.expect("the control service is called");
    assert!(
        line.starts_with("GET /v1/control/gateway/release?"),
        "{line}"
    );
    assert!(line.contains("gateway=edge-1"), "{line}");
    assert!(line.contains("ip_addr=10.9.8.7"), "{line}");
    assert!(line.contains("last_version="), "{line}");
}

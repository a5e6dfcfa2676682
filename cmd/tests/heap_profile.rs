//! `/debug/pprof/heap` with the real binary (jemalloc with profiling on from the start):
//! a gzipped pprof protobuf that `go tool pprof` reads, holding sampled live allocations.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use pprof::protos::Message;

const GATEWAY: &str = env!("CARGO_BIN_EXE_gateway");

/// Kills the gateway when the test ends, passed or not.
struct Gateway(Child);

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the gateway with `--debug` and waits (10 s at most) for the address it logs.
fn spawn_gateway(config: &str) -> (Gateway, String) {
    let mut child = Command::new(GATEWAY)
        .args(["--conf", config, "--addr", "127.0.0.1:0", "--debug"])
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        // jemalloc (built with the `_rjem_` prefix) merges this over its build-time
        // options: a sample per 4 KiB instead of per 8 MiB, so a fresh gateway's few MiB
        // of live memory surely hold samples. Profiling itself (prof:true) still has to come
        // from the build (.cargo/config.toml).
        .env("_RJEM_MALLOC_CONF", "lg_prof_sample:12")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let gateway = Gateway(child);
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
    (gateway, addr)
}

/// GETs `path` over HTTP/1.1 and returns the status, the headers (lowercase) and the body.
fn get(addr: &str, path: &str) -> (u16, String, Vec<u8>) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).unwrap();
    let split = response
        .windows(4)
        .position(|window| window == b"\r\n\r\n")
        .expect("end of the head");
    let head = String::from_utf8_lossy(&response[..split]).to_lowercase();
    let status = head[9..12].parse().unwrap();
    assert!(!head.contains("transfer-encoding: chunked"), "{head}");
    (status, head, response[split + 4..].to_vec())
}

#[test]
fn heap_profile_is_gzipped_pprof_with_samples() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gw.yaml");
    std::fs::write(&config, "name: t\nendpoints: []\n").unwrap();
    let (_gateway, addr) = spawn_gateway(config.to_str().unwrap());

    let (status, head, body) = get(&addr, "/debug/pprof/heap");
    assert_eq!(status, 200, "{head}\n{}", String::from_utf8_lossy(&body));
    assert!(
        head.contains("content-type: application/octet-stream"),
        "{head}"
    );
    assert_eq!(&body[..2], [0x1f, 0x8b], "not gzip");
    let mut protobuf = Vec::new();
    flate2::read::GzDecoder::new(&body[..])
        .read_to_end(&mut protobuf)
        .expect("the body gunzips");
    let profile = pprof::protos::Profile::decode(&protobuf[..]).expect("a pprof Profile");
    assert!(!profile.sample_type.is_empty(), "{profile:?}");
    assert!(!profile.sample.is_empty(), "no sampled allocation");
    assert!(
        profile
            .sample
            .iter()
            .any(|sample| sample.value.iter().any(|value| *value > 0)
                && !sample.location_id.is_empty()),
        "no sample with a value and a stack"
    );
    // The index at /debug/pprof/ links it.
    let (status, _, index) = get(&addr, "/debug/pprof/");
    assert_eq!(status, 200);
    assert!(String::from_utf8_lossy(&index).contains("<a href=\"/debug/pprof/heap\">"));
}

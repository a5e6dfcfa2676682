//! Two `gateway` processes sharing one real Redis (`--redis`): a limit of 10 per second
//! holds across both, not 10 per gateway.

#[path = "../../tests/src/redis.rs"]
#[allow(dead_code, unreachable_pub)]
mod redis;
mod support;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use support::{GATEWAY, Gateway};

/// An upstream answering `200 ok` to every request, on its own threads.
fn upstream() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    thread::spawn(move || {
        for stream in listener.incoming().take(100_000) {
            let Ok(mut stream) = stream else { continue };
            thread::spawn(move || {
                let mut buf = [0u8; 4096];
                let _ = stream.read(&mut buf);
                let _ = stream.write_all(
                    b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
                );
            });
        }
    });
    port
}

/// One `GET path` on a fresh connection; the status code (0 when there was no answer).
fn status(addr: &str, path: &str) -> u16 {
    let Ok(mut stream) = TcpStream::connect(addr) else {
        return 0;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return 0;
    }
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response
        .get(9..12)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0)
}

#[test]
fn a_limit_in_redis_holds_across_two_gateway_processes() {
    let redis = redis::RedisServer::start();
    let upstream = upstream();
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("gateway.yaml");
    std::fs::write(
        &conf,
        format!(
            "name: fleet\nendpoints:\n  - path: /limited\n    backends:\n      - target: 127.0.0.1:{upstream}\n    middlewares:\n      - name: ratelimit\n        options: {{key: global, rate: 10, burst: 10}}\n"
        ),
    )
    .unwrap();
    let conf = conf.to_str().unwrap();
    let dsn = redis.dsn();
    let args = ["--conf", conf, "--addr", "127.0.0.1:0", "--redis", &dsn];
    let gateways = [Gateway::start(&args), Gateway::start(&args)];

    // Two clients per gateway hammer it for the window; every answer is counted.
    let window = Duration::from_secs(3);
    let started = Instant::now();
    let clients: Vec<_> = gateways
        .iter()
        .enumerate()
        .flat_map(|(gateway, gw)| {
            (0..2).map(move |_| {
                let addr = gw.addr.to_string();
                thread::spawn(move || {
                    let mut counts = [0u32; 3]; // 200, 429, other
                    for _ in 0..20_000 {
                        if started.elapsed() >= window {
                            break;
                        }
                        match status(&addr, "/limited") {
                            200 => counts[0] += 1,
                            429 => counts[1] += 1,
                            _ => counts[2] += 1,
                        }
                    }
                    (gateway, counts)
                })
            })
        })
        .collect();
    let mut per_gateway = [[0u32; 3]; 2];
    for client in clients {
        let (gateway, counts) = client.join().unwrap();
        for (total, count) in per_gateway[gateway].iter_mut().zip(counts) {
            *total += count;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let admitted: u32 = per_gateway.iter().map(|counts| counts[0]).sum();
    // A bucket of 10 refilled at 10/s over the window, whichever gateway asks.
    let expected = 10.0 + 10.0 * elapsed;
    eprintln!(
        "shared limit 10/s (burst 10) over {elapsed:.2}s: admitted {admitted} (expected about {expected:.0}; \
         not shared it would be about {:.0}); gateway A {:?}, gateway B {:?} as [200, 429, other]",
        2.0 * expected,
        per_gateway[0],
        per_gateway[1]
    );
    assert_eq!(
        per_gateway[0][2] + per_gateway[1][2],
        0,
        "only 200s and 429s"
    );
    assert!(
        per_gateway[0][1] > 0 && per_gateway[1][1] > 0,
        "both gateways were pushed past the limit: {per_gateway:?}"
    );
    assert!(
        f64::from(admitted) <= expected + 8.0,
        "admitted {admitted}, want about {expected:.0}"
    );
    assert!(
        f64::from(admitted) >= expected - 8.0,
        "admitted {admitted}, want about {expected:.0}"
    );
    // The bucket really lives in Redis.
    let keys = redis.command(&["KEYS", "gateway:ratelimit:*"]);
    assert!(keys.contains("/limited"), "keys: {keys:?}");
}

#[test]
fn an_unusable_redis_dsn_exits_2_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("gateway.yaml");
    std::fs::write(&conf, "name: t\nendpoints: []\n").unwrap();
    for dsn in ["127.0.0.1:6379", "redis://127.0.0.1:6379/x"] {
        let output = Command::new(GATEWAY)
            .args(["--conf", conf.to_str().unwrap(), "--addr", "127.0.0.1:0"])
            .args(["--redis", dsn])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
        assert!(stderr.contains("--redis"), "{stderr}");
    }
}

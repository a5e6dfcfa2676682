//! Kratos' timeout environment variables with the real binary: each sets its timeout, a flag
//! on the command line wins over its variable, unset leaves the gateway's own defaults, and
//! a bad or zero value stops start-up with exit code 2.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

const GATEWAY: &str = env!("CARGO_BIN_EXE_gateway");

/// Every variable the gateway reads for its timeouts and limits.
const VARIABLES: [&str; 8] = [
    "PROXY_READ_HEADER_TIMEOUT",
    "PROXY_READ_TIMEOUT",
    "PROXY_WRITE_TIMEOUT",
    "PROXY_IDLE_TIMEOUT",
    "PROXY_DIAL_TIMEOUT",
    "INITIAL_RESOLVE_TIMEOUT",
    "GATEWAY_MAX_CONNECTIONS",
    "GATEWAY_MAX_CONCURRENT_STREAMS",
];

fn config() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gw.yaml");
    std::fs::write(&path, "name: t\nendpoints: []\n").unwrap();
    let path = path.to_str().unwrap().to_owned();
    (dir, path)
}

/// The gateway command with exactly `env` among the variables above (the others removed,
/// whatever the test process has).
fn gateway(env: &[(&str, &str)], args: &[&str]) -> Command {
    let mut command = Command::new(GATEWAY);
    for variable in VARIABLES {
        command.env_remove(variable);
    }
    command
        .args(args)
        .envs(env.iter().copied())
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1");
    command
}

/// A started gateway: its address and the `downstream and upstream limits` log line.
struct Running {
    child: Child,
    addr: String,
    limits: String,
}

impl Running {
    fn start(env: &[(&str, &str)], args: &[&str]) -> Self {
        let mut child = gateway(env, args).stderr(Stdio::piped()).spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let (lines_tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = lines_tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        let (mut addr, mut limits) = (None, None);
        while addr.is_none() || limits.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = lines
                .recv_timeout(left)
                .expect("the gateway logs its limits and address within 10 s");
            if line.contains("downstream and upstream limits") {
                limits = Some(line);
            } else if line.contains("listening") {
                addr = line
                    .split("addr=")
                    .nth(1)
                    .and_then(|rest| rest.split_whitespace().next())
                    .map(str::to_owned);
            }
        }
        Self {
            child,
            addr: addr.unwrap_or_default(),
            limits: limits.unwrap_or_default(),
        }
    }

    /// The value logged for `field` (`header_read_timeout=15s` → `15s`).
    fn limit(&self, field: &str) -> &str {
        self.limits
            .split_whitespace()
            .find_map(|pair| pair.strip_prefix(&format!("{field}=")))
            .unwrap_or_else(|| panic!("{field} not in {:?}", self.limits))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn each_variable_sets_its_timeout_and_a_flag_wins_over_it() {
    let (_dir, conf) = config();
    let env = [
        ("PROXY_READ_HEADER_TIMEOUT", "1.5s"),
        ("PROXY_READ_TIMEOUT", "2s"),
        ("PROXY_WRITE_TIMEOUT", "3s"),
        ("PROXY_IDLE_TIMEOUT", "4s"),
        ("PROXY_DIAL_TIMEOUT", "250ms"),
        ("INITIAL_RESOLVE_TIMEOUT", "6s"),
        ("GATEWAY_MAX_CONNECTIONS", "77"),
    ];
    let gw = Running::start(
        &env,
        &[
            "--conf",
            &conf,
            "--addr",
            "127.0.0.1:0",
            "--idle-timeout",
            "9s",
            "--dial-timeout",
            "1m",
        ],
    );
    assert_eq!(gw.limit("header_read_timeout"), "1.5s");
    assert_eq!(gw.limit("read_timeout"), "2s");
    assert_eq!(gw.limit("write_timeout"), "3s");
    assert_eq!(gw.limit("idle_timeout"), "9s", "the flag wins");
    assert_eq!(gw.limit("dial_timeout"), "60s", "the flag wins");
    assert_eq!(gw.limit("initial_resolve_timeout"), "6s");
    assert_eq!(gw.limit("max_connections"), "77");
}

/// Unset, or set to "" (which Kratos ignores too).
#[test]
fn unset_or_empty_variables_leave_the_gateway_defaults() {
    let (_dir, conf) = config();
    let args = ["--conf", conf.as_str(), "--addr", "127.0.0.1:0"];
    let empty = [
        ("PROXY_READ_HEADER_TIMEOUT", ""),
        ("PROXY_READ_TIMEOUT", ""),
        ("PROXY_WRITE_TIMEOUT", ""),
        ("PROXY_IDLE_TIMEOUT", ""),
        ("PROXY_DIAL_TIMEOUT", ""),
        ("INITIAL_RESOLVE_TIMEOUT", ""),
    ];
    let empties = Running::start(&empty, &args);
    let unset = Running::start(&[], &args);
    assert_eq!(
        empties
            .limits
            .split_once("limits")
            .map(|(_, fields)| fields),
        unset.limits.split_once("limits").map(|(_, fields)| fields)
    );
    let gw = unset;
    assert_eq!(gw.limit("header_read_timeout"), "15s");
    assert_eq!(gw.limit("read_timeout"), "15s");
    assert_eq!(gw.limit("write_timeout"), "15s");
    assert_eq!(gw.limit("idle_timeout"), "120s");
    assert_eq!(gw.limit("dial_timeout"), "500ms");
    assert_eq!(gw.limit("initial_resolve_timeout"), "5s");
    assert_eq!(gw.limit("max_concurrent_streams"), "100");
    let max: u64 = gw.limit("max_connections").parse().unwrap();
    assert!((64..=10_000).contains(&max), "{max}");
}

/// The variable changes what the server does, not only what it logs: a silent socket is
/// closed after `PROXY_READ_HEADER_TIMEOUT`, unless the flag says otherwise.
#[test]
fn the_header_timeout_variable_closes_silent_sockets_unless_the_flag_overrides_it() {
    let (_dir, conf) = config();
    let env = [("PROXY_READ_HEADER_TIMEOUT", "300ms")];
    let args = ["--conf", conf.as_str(), "--addr", "127.0.0.1:0"];
    let from_env = Running::start(&env, &args);
    let mut silent = TcpStream::connect(&from_env.addr).unwrap();
    silent
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let start = Instant::now();
    let mut buf = [0u8; 64];
    let read = silent.read(&mut buf);
    let took = start.elapsed();
    assert!(
        matches!(read, Ok(0))
            || read
                .as_ref()
                .is_err_and(|err| err.kind() != std::io::ErrorKind::WouldBlock),
        "closed by the gateway: {read:?}"
    );
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_millis(2500),
        "closed after {took:?}, want about 300 ms"
    );

    let mut args = args.to_vec();
    args.extend(["--header-read-timeout", "30s"]);
    let from_flag = Running::start(&env, &args);
    let mut silent = TcpStream::connect(&from_flag.addr).unwrap();
    silent
        .set_read_timeout(Some(Duration::from_millis(1500)))
        .unwrap();
    let read = silent.read(&mut buf);
    assert!(
        read.as_ref().is_err_and(|err| matches!(
            err.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        )),
        "still open after 1.5 s with the flag's 30 s: {read:?}"
    );
    // And it is a working connection.
    silent
        .write_all(b"GET /nothing HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    silent
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut answer = String::new();
    let _ = silent.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer:?}");
}

#[test]
fn a_bad_or_zero_value_exits_2_unless_a_flag_replaces_it() {
    let (_dir, conf) = config();
    let args = ["--conf", conf.as_str(), "--addr", "127.0.0.1:0"];
    for (variable, value) in [
        ("PROXY_READ_TIMEOUT", "soon"),
        ("PROXY_IDLE_TIMEOUT", "0s"),
        ("PROXY_DIAL_TIMEOUT", "0"),
        ("GATEWAY_MAX_CONNECTIONS", "0"),
    ] {
        let output = gateway(&[(variable, value)], &args).output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(
            output.status.code(),
            Some(2),
            "{variable}={value}: {stderr}"
        );
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
        assert!(stderr.contains(value), "{variable}={value}: {stderr}");
    }
    // The flag wins: the variable's bad value is never read.
    let mut with_flag = args.to_vec();
    with_flag.extend(["--read-timeout", "1s"]);
    let gw = Running::start(&[("PROXY_READ_TIMEOUT", "soon")], &with_flag);
    assert_eq!(gw.limit("read_timeout"), "1s");
    // A zero flag is refused the same way.
    let mut zero_flag = args.to_vec();
    zero_flag.extend(["--write-timeout", "0s"]);
    let output = gateway(&[], &zero_flag).output().unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("--write-timeout"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

//! A private Redis for tests: the real `redis-server` (Debian's package) on a loopback port,
//! no persistence (`--save '' --appendonly no`), killed on drop, and able to stop and come
//! back on the same port (outage tests).
//!
//! ```no_run
//! let mut redis = tests::redis::RedisServer::start();
//! let dsn = redis.dsn(); // redis://127.0.0.1:PORT
//! redis.kill();
//! redis.restart();
//! assert_eq!(redis.command(&["DBSIZE"]), "0");
//! ```
//!
//! This file uses only `std`, so the binary's own tests (`cmd/tests`) include it by path.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How to get the binary when it is missing.
pub const INSTALL_HINT: &str = "apt-get install -y redis-server";

/// Bound on waiting for a (re)started server to answer.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// Start-up attempts on fresh ports before giving up (a port picked free may be taken by
/// the time the server binds it).
const START_ATTEMPTS: u32 = 3;

/// A running `redis-server` on 127.0.0.1; killed on drop.
pub struct RedisServer {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts redis-server on a free loopback port and waits (at most 10 s) until it answers
    /// as itself (its `process_id`); retries on a new port if the port was taken.
    ///
    /// Panics with the install command if `redis-server` is not installed.
    pub fn start() -> RedisServer {
        let dir = std::env::temp_dir().join(format!(
            "gateway-test-redis-{}-{}",
            std::process::id(),
            unique()
        ));
        std::fs::create_dir_all(&dir).expect("create a dir for redis");
        let mut server = RedisServer {
            port: free_port(),
            dir,
            child: None,
        };
        let mut attempts = 0;
        loop {
            attempts += 1;
            match server.spawn() {
                Ok(()) => return server,
                Err(error) if attempts >= START_ATTEMPTS => panic!("{error}"),
                Err(_) => {
                    server.kill();
                    server.port = free_port();
                }
            }
        }
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn dsn(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The port it listens on (the same across [`RedisServer::restart`]).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Stops the process at once (SIGKILL); its data is gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-CONT", &child.id().to_string()])
                .status();
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Freezes the process (SIGSTOP): connections stay open but nothing answers, as with
    /// a hung server. [`RedisServer::resume`] undoes it.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Lets a paused process run again (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        if let Some(child) = &self.child {
            let status = Command::new("kill")
                .args([signal, &child.id().to_string()])
                .status()
                .expect("run kill");
            assert!(status.success(), "kill {signal} failed");
        }
    }

    /// Starts the process again on the same port, waiting until it answers.
    pub fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + START_TIMEOUT;
        // The old socket may linger for a moment; retry the bind until the deadline.
        loop {
            match self.spawn() {
                Ok(()) => return,
                Err(error) if Instant::now() >= deadline => panic!("{error}"),
                Err(_) => {
                    self.kill();
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    }

    /// Runs one command and returns its reply as text (an integer, a status, a bulk
    /// string, or the elements of an array joined by `\n`). Panics on an error reply.
    pub fn command(&self, args: &[&str]) -> String {
        command(self.port, args).unwrap_or_else(|error| panic!("redis {args:?}: {error}"))
    }

    fn spawn(&mut self) -> Result<(), String> {
        let binary = find_binary().unwrap_or_else(|| {
            panic!("redis-server is not installed; install it with: {INSTALL_HINT}")
        });
        let log = self.dir.join("redis.log");
        let child = Command::new(&binary)
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .args(["--dir", self.dir.to_str().expect("utf-8 temp dir")])
            .args(["--logfile", log.to_str().expect("utf-8 temp dir")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|error| panic!("spawn {}: {error}", binary.display()));
        let pid = child.id();
        self.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                return Err(format!(
                    "redis-server exited during start-up with {status}; log tail:\n{}",
                    log_tail(&log)
                ));
            }
            if let Ok(info) = command(self.port, &["INFO", "server"]) {
                if info.contains(&format!("process_id:{pid}\r")) {
                    return Ok(());
                }
                return Err(format!(
                    "another redis answers on port {}; ours did not start",
                    self.port
                ));
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "redis-server did not answer on port {} within {START_TIMEOUT:?}; log tail:\n{}",
                    self.port,
                    log_tail(&log)
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One command over a fresh connection (RESP2), with a 2 s bound.
fn command(port: u16, args: &[&str]) -> Result<String, String> {
    let address = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(2))
        .map_err(|error| error.to_string())?;
    stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(|error| error.to_string())?;
    let mut request = format!("*{}\r\n", args.len());
    for arg in args {
        request.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
    }
    stream
        .write_all(request.as_bytes())
        .map_err(|error| error.to_string())?;
    read_reply(&mut BufReader::new(stream))
}

fn read_reply(reader: &mut BufReader<TcpStream>) -> Result<String, String> {
    let mut line = String::new();
    reader
        .read_line(&mut line)
        .map_err(|error| error.to_string())?;
    let line = line.trim_end_matches("\r\n");
    let (kind, rest) = line.split_at_checked(1).ok_or("empty reply")?;
    match kind {
        "+" | ":" => Ok(rest.to_owned()),
        "-" => Err(rest.to_owned()),
        "$" => {
            let Ok(length) = usize::try_from(rest.parse::<i64>().map_err(|e| e.to_string())?)
            else {
                return Ok(String::new());
            };
            let mut body = vec![0; length + 2];
            reader
                .read_exact(&mut body)
                .map_err(|error| error.to_string())?;
            body.truncate(length);
            Ok(String::from_utf8_lossy(&body).into_owned())
        }
        "*" => {
            let count = rest.parse::<i64>().map_err(|e| e.to_string())?.max(0);
            let items = (0..count)
                .map(|_| read_reply(reader))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(items.join("\n"))
        }
        _ => Err(format!("unexpected reply {line:?}")),
    }
}

fn find_binary() -> Option<PathBuf> {
    let system = PathBuf::from("/usr/bin/redis-server");
    if system.is_file() {
        return Some(system);
    }
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join("redis-server"))
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

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

fn log_tail(path: &std::path::Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

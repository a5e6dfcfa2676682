//! Timeouts that are never unbounded (issue 9, item 3): the endpoint timeout's default, the
//! downstream header, idle, body-read and write timeouts, the upstream dial timeout per
//! attempt, the connection cap, and the HTTP/2 stream bound. Real sockets on 127.0.0.1;
//! every timeout is configured short (a few hundred ms) and asserted with generous slack.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::Value;
use tests::assert_eventually;
use tests::config::{endpoint, gateway, single};
use tests::eventually::expect_eq;
use tests::harness::{TestGateway, Upstream, UpstreamBody, get, text};
use tests::metrics::{sum, value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::mpsc;

const PATIENCE: Duration = Duration::from_secs(5);

/// What the short timeouts of these tests are set to.
const SHORT: Duration = Duration::from_millis(300);
const SHORT_FLAG: &str = "300ms";

/// An upstream answering 200 with body `name` after `delay`.
async fn delayed(delay: Duration, name: &'static str) -> Upstream {
    Upstream::start(move |_req: Request<Incoming>| async move {
        tokio::time::sleep(delay).await;
        Response::new(text(name))
    })
    .await
}

/// Waits until the peer closes `stream` (EOF or reset), at most `limit`; returns how long
/// it took. Whatever the gateway still sends before closing is read and discarded.
async fn closed_within(stream: &mut TcpStream, limit: Duration) -> Duration {
    let start = Instant::now();
    let mut buf = [0u8; 16 * 1024];
    loop {
        match tokio::time::timeout_at((start + limit).into(), stream.read(&mut buf)).await {
            Err(_) => panic!("the connection was still open after {limit:?}"),
            Ok(Ok(0) | Err(_)) => return start.elapsed(),
            Ok(Ok(_)) => {}
        }
    }
}

/// Reads one HTTP/1.1 response with a `content-length` from `stream`: `(head, body)`.
async fn read_response(stream: &mut TcpStream) -> (String, String) {
    read_responses(stream, 1).await.remove(0)
}

/// Reads `count` pipelined HTTP/1.1 responses, each with a `content-length`, from
/// `stream`: `(head, body)` of each, in order.
async fn read_responses(stream: &mut TcpStream, count: usize) -> Vec<(String, String)> {
    let mut data = Vec::new();
    let mut answers = Vec::new();
    let mut buf = [0u8; 4096];
    let exchange = async {
        loop {
            while let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&data[..end]).into_owned();
                let length: usize = head
                    .lines()
                    .find_map(|line| {
                        let (name, value) = line.split_once(':')?;
                        name.eq_ignore_ascii_case("content-length")
                            .then(|| value.trim().parse().ok())?
                    })
                    .unwrap_or(0);
                if data.len() < end + 4 + length {
                    break;
                }
                let body = String::from_utf8_lossy(&data[end + 4..end + 4 + length]).into_owned();
                data.drain(..end + 4 + length);
                answers.push((head, body));
            }
            if answers.len() >= count {
                return;
            }
            let n = stream.read(&mut buf).await.expect("read the responses");
            assert!(
                n > 0,
                "connection closed after {} responses: {data:?}",
                answers.len()
            );
            data.extend_from_slice(&buf[..n]);
        }
    };
    tokio::time::timeout(PATIENCE, exchange)
        .await
        .expect("the responses within 5 s");
    answers
}

/// An upstream HTTP server that counts its open connections and open requests (and the
/// most of each at once).
struct CountingUpstream {
    addr: SocketAddr,
    connections: Arc<Gauge>,
    requests: Arc<Gauge>,
}

#[derive(Default)]
struct Gauge {
    now: AtomicUsize,
    max: AtomicUsize,
}

impl Gauge {
    fn enter(self: &Arc<Self>) -> GaugeGuard {
        let now = self.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.max.fetch_max(now, Ordering::SeqCst);
        GaugeGuard(self.clone())
    }
    fn now(&self) -> usize {
        self.now.load(Ordering::SeqCst)
    }
    fn max(&self) -> usize {
        self.max.load(Ordering::SeqCst)
    }
}

struct GaugeGuard(Arc<Gauge>);

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.now.fetch_sub(1, Ordering::SeqCst);
    }
}

impl CountingUpstream {
    async fn start<F, Fut>(handler: F) -> Self
    where
        F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Response<UpstreamBody>> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(Gauge::default());
        let requests = Arc::new(Gauge::default());
        let (task_connections, task_requests) = (connections.clone(), requests.clone());
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let open = task_connections.enter();
                let (handler, requests) = (handler.clone(), task_requests.clone());
                tokio::spawn(async move {
                    let _open = open;
                    let service = service_fn(move |req| {
                        let busy = requests.enter();
                        let response = handler(req);
                        async move {
                            let response = response.await;
                            drop(busy);
                            Ok::<_, Infallible>(response)
                        }
                    });
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self {
            addr,
            connections,
            requests,
        }
    }

    fn target(&self) -> String {
        self.addr.to_string()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_without_a_timeout_gets_the_one_second_default() {
    let hung = delayed(Duration::from_secs(4), "late").await;
    let yaml = gateway(&[
        endpoint("/unset", &hung.target(), ""),
        endpoint("/zero", &hung.target(), "    timeout: 0s\n"),
    ]);
    let gw = TestGateway::start(&yaml).await;
    let timed = |path: &'static str| {
        let url = gw.url(path);
        async move {
            let start = Instant::now();
            let reply = get(&url).await;
            (reply.status, start.elapsed())
        }
    };
    let ((unset, unset_took), (zero, zero_took)) = tokio::join!(timed("/unset"), timed("/zero"));
    for (status, took) in [(unset, unset_took), (zero, zero_took)] {
        assert_eq!(status, 504);
        assert!(
            took >= Duration::from_millis(900) && took < Duration::from_millis(3000),
            "answered after {took:?}, want about 1 s"
        );
    }
    let routes: Value =
        serde_json::from_str(&get(&gw.url("/debug/proxy/router/inspect")).await.body)
            .expect("json");
    let timeouts: Vec<&str> = routes
        .as_array()
        .expect("a list")
        .iter()
        .map(|route| route["timeout"].as_str().unwrap_or("?"))
        .collect();
    assert_eq!(timeouts, ["1s", "1s"], "the effective timeout is shown");
}

/// Neither the endpoint timeout (here its 1 s default), the read timeout nor the write
/// timeout cuts a response whose body is still streaming.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_streaming_response_outlives_every_timeout() {
    let upstream = Upstream::start(|_req: Request<Incoming>| async {
        let chunks = futures_util::stream::unfold(0u8, |sent| async move {
            if sent == 4 {
                return None;
            }
            if sent > 0 {
                tokio::time::sleep(Duration::from_millis(450)).await;
            }
            let chunk = Bytes::from(vec![b'a' + sent]);
            Some((Ok::<_, Infallible>(Frame::data(chunk)), sent + 1))
        });
        Response::new(StreamBody::new(chunks).boxed_unsync())
    })
    .await;
    let gw = TestGateway::start_with(
        &single("/stream", &upstream.target(), ""),
        &[
            "--read-timeout",
            SHORT_FLAG,
            "--write-timeout",
            SHORT_FLAG,
            "--header-read-timeout",
            SHORT_FLAG,
        ],
    )
    .await
    .unwrap();
    let start = Instant::now();
    let reply = get(&gw.url("/stream")).await;
    assert_eq!((reply.status, reply.body.as_str()), (200, "abcd"));
    assert!(
        start.elapsed() > Duration::from_millis(1300),
        "the body took {:?}: it was streamed past the 1 s endpoint timeout",
        start.elapsed()
    );
}

/// The finding "a connection that never sends a byte is never timed out": the step that
/// tells HTTP/1.1 from HTTP/2 is bounded by the header-read timeout, and so is a partial
/// HTTP/2 preface and a partial request head.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_partial_connections_are_closed_after_the_header_read_timeout() {
    let a = Upstream::named("a").await;
    let gw = TestGateway::start_with(
        &single("/a", &a.target(), ""),
        &["--header-read-timeout", SHORT_FLAG],
    )
    .await
    .unwrap();
    let cases: [&[u8]; 3] = [
        b"",
        b"PRI * HTTP/2.0\r\n",
        b"GET /a HTTP/1.1\r\nHost: x\r\n",
    ];
    let close = |sent: &'static [u8]| {
        let addr = gw.addr;
        async move {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            stream.write_all(sent).await.unwrap();
            let took = closed_within(&mut stream, PATIENCE).await;
            (String::from_utf8_lossy(sent).into_owned(), took)
        }
    };
    let (silent, preface, head) = tokio::join!(close(cases[0]), close(cases[1]), close(cases[2]));
    for (sent, took) in [silent, preface, head] {
        assert!(
            took >= SHORT - Duration::from_millis(50) && took < Duration::from_millis(2500),
            "after sending {sent:?} the connection closed after {took:?}, want about {SHORT:?}"
        );
    }
    assert_eq!(a.hits(), 0);
    let page = gw.metrics().await;
    assert_eq!(
        value(
            &page,
            "go_gateway_downstream_timeouts_total{kind=\"header\"}"
        ),
        Some(3.0),
        "{page}"
    );
}

/// A keep-alive connection may stay idle longer than the header-read timeout (the two are
/// separate now) and is closed once the idle timeout passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connections_wait_the_idle_timeout_not_the_header_timeout() {
    let a = Upstream::named("a").await;
    let gw = TestGateway::start_with(
        &single("/a", &a.target(), ""),
        &[
            "--header-read-timeout",
            SHORT_FLAG,
            "--idle-timeout",
            "1200ms",
        ],
    )
    .await
    .unwrap();
    let mut stream = TcpStream::connect(gw.addr).await.unwrap();
    let request = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n";
    stream.write_all(request).await.unwrap();
    let (head, body) = read_response(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(body, "a");
    // Idle for more than twice the header timeout: the connection is still usable.
    tokio::time::sleep(Duration::from_millis(700)).await;
    stream.write_all(request).await.unwrap();
    let (head, _) = read_response(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let idle = closed_within(&mut stream, PATIENCE).await;
    assert!(
        idle >= Duration::from_millis(1100) && idle < Duration::from_millis(3500),
        "closed after {idle:?} idle, want about 1.2 s"
    );
    let page = gw.metrics().await;
    assert_eq!(
        value(&page, "go_gateway_downstream_timeouts_total{kind=\"idle\"}"),
        Some(1.0),
        "{page}"
    );
}

/// After an idle pause long enough for the server to park the connection (give hyper's
/// buffers back, see `proxy::server`), the same connection serves pipelined requests in
/// order, a request whose head arrives in pieces, and a request with a body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_connection_serves_pipelined_split_and_body_requests() {
    let echo = Upstream::start(|req: Request<Incoming>| async move {
        let path = req.uri().path().to_owned();
        let body = req.into_body().collect().await.unwrap().to_bytes();
        Response::new(text(format!("{path}:{}", String::from_utf8_lossy(&body))))
    })
    .await;
    let gw = TestGateway::start(&single("/*", &echo.target(), "")).await;
    let mut stream = TcpStream::connect(gw.addr).await.unwrap();
    // Longer than the server's 200 ms park each time.
    let pause = Duration::from_millis(400);
    for round in 0..2 {
        tokio::time::sleep(pause).await;
        let pipelined = format!(
            "GET /one{round} HTTP/1.1\r\nHost: x\r\n\r\nGET /two{round} HTTP/1.1\r\nHost: x\r\n\r\n"
        );
        stream.write_all(pipelined.as_bytes()).await.unwrap();
        // Both answers may come in one read: read them from one buffer.
        let answers = read_responses(&mut stream, 2).await;
        for ((head, body), path) in answers
            .iter()
            .zip([format!("/one{round}"), format!("/two{round}")])
        {
            assert!(head.starts_with("HTTP/1.1 200"), "{head}");
            assert_eq!(*body, format!("{path}:"));
        }
    }
    tokio::time::sleep(pause).await;
    stream
        .write_all(b"POST /split HTTP/1.1\r\nHo")
        .await
        .unwrap();
    stream.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    stream
        .write_all(b"st: x\r\nContent-Length: 5\r\n\r\nhello")
        .await
        .unwrap();
    let (head, body) = read_response(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(body, "/split:hello");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_http2_connection_is_closed_after_the_idle_timeout() {
    let a = Upstream::named("a").await;
    let gw = TestGateway::start_with(
        &single("/a", &a.target(), ""),
        &["--header-read-timeout", "200ms", "--idle-timeout", "800ms"],
    )
    .await
    .unwrap();
    let stream = TcpStream::connect(gw.addr).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2c handshake");
    let connection = tokio::spawn(connection);
    let response = sender
        .send_request(
            Request::get(format!("http://{}/a", gw.addr))
                .body(Full::<Bytes>::default())
                .unwrap(),
        )
        .await
        .expect("h2 response");
    assert_eq!(response.status(), 200);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "a");
    let idle = Instant::now();
    tokio::time::timeout(PATIENCE, connection)
        .await
        .expect("the gateway closes the idle h2 connection")
        .unwrap()
        .ok();
    let idle = idle.elapsed();
    assert!(
        idle >= Duration::from_millis(700) && idle < Duration::from_millis(3000),
        "closed after {idle:?} idle, want about 800 ms (not the 200 ms header timeout)"
    );
}

/// The finding "slow bodies": a client that stops sending its upload mid-body gets 408
/// within the read timeout, its connection is closed, and the upstream connection that was
/// receiving the body is released (its read of the body fails).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_upload_gets_408_and_releases_the_upstream() {
    let (aborted_tx, mut aborted) = mpsc::unbounded_channel::<String>();
    let upstream = CountingUpstream::start(move |req: Request<Incoming>| {
        let aborted_tx = aborted_tx.clone();
        async move {
            match req.into_body().collect().await {
                Ok(body) => Response::new(text(format!("got {}", body.to_bytes().len()))),
                Err(err) => {
                    let _ = aborted_tx.send(err.to_string());
                    Response::new(text("aborted"))
                }
            }
        }
    })
    .await;
    let yaml = gateway(&[
        endpoint("/single", &upstream.target(), "    timeout: 10s\n"),
        endpoint(
            "/retry",
            &upstream.target(),
            "    timeout: 10s\n    retry:\n      attempts: 2\n",
        ),
    ]);
    let gw = TestGateway::start_with(&yaml, &["--read-timeout", SHORT_FLAG])
        .await
        .unwrap();

    for path in ["/single", "/retry"] {
        let mut stream = TcpStream::connect(gw.addr).await.unwrap();
        let head = format!("POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n");
        stream.write_all(head.as_bytes()).await.unwrap();
        stream.write_all(b"0123456789").await.unwrap();
        let start = Instant::now();
        let (head, body) = read_response(&mut stream).await;
        let took = start.elapsed();
        assert!(head.starts_with("HTTP/1.1 408"), "{path}: {head}\n{body}");
        assert!(
            took >= SHORT - Duration::from_millis(50) && took < Duration::from_millis(2500),
            "{path}: 408 after {took:?}, want about {SHORT:?}"
        );
        closed_within(&mut stream, PATIENCE).await;
    }
    // The streamed upload (no retry) had reached the upstream, whose read was aborted; the
    // buffered one (retry) never left the gateway.
    let error = tokio::time::timeout(PATIENCE, aborted.recv())
        .await
        .expect("the upstream's body read fails")
        .unwrap();
    assert!(!error.is_empty());
    assert_eventually!(PATIENCE, "the upstream connection is released", || async {
        expect_eq(upstream.connections.now(), 0)
    });
    assert_eq!(upstream.requests.max(), 1);
    let page = gw.metrics().await;
    assert_eq!(
        value(&page, "go_gateway_downstream_timeouts_total{kind=\"body\"}"),
        Some(2.0),
        "{page}"
    );

    // A body that keeps arriving, however slowly, is never cut: the timeout is the longest
    // pause, not the whole upload.
    let mut stream = TcpStream::connect(gw.addr).await.unwrap();
    stream
        .write_all(b"POST /single HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n")
        .await
        .unwrap();
    for _ in 0..5 {
        stream.write_all(b"0123456789").await.unwrap();
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let (head, body) = read_response(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(body, "got 50");
}

/// The finding "slow bodies" over HTTP/2: one TCP connection opening 1,000 POST streams
/// that send headers and then nothing holds at most 100 upstream requests at a time (the
/// stream limit), and each is released by the read timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_stalled_http2_uploads_hold_at_most_a_hundred_upstream_connections() {
    let upstream = CountingUpstream::start(|req: Request<Incoming>| async move {
        let _ = req.into_body().collect().await;
        Response::new(text("done"))
    })
    .await;
    let gw = TestGateway::start_with(
        &single("/upload", &upstream.target(), "    timeout: 30s\n"),
        &["--read-timeout", "800ms"],
    )
    .await
    .unwrap();
    let stream = TcpStream::connect(gw.addr).await.unwrap();
    let (sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2c handshake");
    tokio::spawn(connection);
    let mut uploads = tokio::task::JoinSet::new();
    for _ in 0..1000 {
        let mut sender = sender.clone();
        let url = format!("http://{}/upload", gw.addr);
        uploads.spawn(async move {
            // Headers, then a body that never sends a byte.
            let silent = futures_util::stream::pending::<Result<Frame<Bytes>, Infallible>>();
            let request = Request::post(url).body(StreamBody::new(silent)).unwrap();
            match sender.send_request(request).await {
                Ok(response) => response.status().as_u16(),
                Err(_) => 0,
            }
        });
    }
    // The first wave fills the stream limit, and no more reaches the upstream while it
    // waits (well before its read timeout, so no connection is closing yet).
    assert_eventually!(PATIENCE, "100 uploads reach the upstream", || async {
        expect_eq(upstream.requests.now(), 100)
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(
        (upstream.requests.now(), upstream.connections.max()),
        (100, 100),
        "one client connection holds exactly 100 upstream connections"
    );
    let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
    let all = async {
        while let Some(status) = uploads.join_next().await {
            *statuses.entry(status.unwrap()).or_default() += 1;
        }
    };
    tokio::time::timeout(Duration::from_secs(30), all)
        .await
        .expect("every stream is answered within 30 s");
    assert_eq!(statuses, [(408, 1000)].into(), "{statuses:?}");
    // Over all ten waves: a connection the gateway aborted is still counted here until the
    // upstream reads its end while the next wave connects, hence the slack over 100 (the
    // old limit would show 256, none 1000).
    let most = upstream.connections.max();
    assert!(
        most <= 150,
        "{most} upstream connections open at once, want about 100 (not 256 or 1000)"
    );
    assert_eventually!(
        PATIENCE,
        "every upstream connection is released",
        || async { expect_eq(upstream.connections.now(), 0) }
    );
}

/// A client that stops reading a response has its connection closed once a write has made
/// no progress for the write timeout; the upstream stream feeding it is released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_cut_after_the_write_timeout() {
    let upstream = CountingUpstream::start(|_req: Request<Incoming>| async {
        let endless = futures_util::stream::repeat_with(|| {
            Ok::<_, Infallible>(Frame::data(Bytes::from(vec![b'x'; 64 * 1024])))
        });
        Response::new(StreamBody::new(endless).boxed_unsync())
    })
    .await;
    let gw = TestGateway::start_with(
        &single("/endless", &upstream.target(), ""),
        &["--write-timeout", SHORT_FLAG],
    )
    .await
    .unwrap();
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket.connect(gw.addr).await.unwrap();
    stream
        .write_all(b"GET /endless HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    // Read nothing: the gateway's writes block once the socket buffers are full.
    let write_timeouts = |page: String| {
        value(
            &page,
            "go_gateway_downstream_timeouts_total{kind=\"write\"}",
        )
        .unwrap_or(0.0)
    };
    assert_eventually!(PATIENCE, "the blocked write times out", || async {
        expect_eq(write_timeouts(gw.metrics().await), 1.0)
    });
    closed_within(&mut stream, PATIENCE).await;
    assert_eventually!(PATIENCE, "the upstream stream is released", || async {
        expect_eq(upstream.connections.now(), 0)
    });
}

/// A listener whose connects hang: backlog one, filled, never accepted (the kernel drops
/// further SYNs), as a node that blackholes SYNs would, while staying on loopback.
struct Blackhole {
    addr: SocketAddr,
    _listener: TcpListener,
    _fillers: Vec<TcpStream>,
}

impl Blackhole {
    async fn start() -> Self {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(0).unwrap();
        let addr = listener.local_addr().unwrap();
        let mut fillers = Vec::new();
        for _ in 0..16 {
            match tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(addr)).await {
                Ok(Ok(filler)) => fillers.push(filler),
                Ok(Err(err)) => panic!("connect to the backlog listener: {err}"),
                // This connect hangs: the accept queue is full.
                Err(_) => {
                    return Self {
                        addr,
                        _listener: listener,
                        _fillers: fillers,
                    };
                }
            }
        }
        panic!("the accept queue never filled");
    }
}

/// A node that never answers the connect costs one dial timeout per attempt, after which
/// the retry goes to another node; alone, it is a 502 after the dial timeout, well before
/// the endpoint timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_drops_syns_costs_the_dial_timeout_then_the_retry_goes_elsewhere() {
    let blackhole = Blackhole::start().await;
    let healthy = Upstream::named("healthy").await;
    let yaml = format!(
        "name: t\nendpoints:\n  - path: /pair\n    selector: wrr\n    timeout: 5s\n    retry:\n      attempts: 2\n    backends:\n      - target: {}\n      - target: {}\n  - path: /lone\n    timeout: 5s\n    backends:\n      - target: {}\n",
        blackhole.addr,
        healthy.target(),
        blackhole.addr,
    );
    let gw = TestGateway::start_with(&yaml, &["--dial-timeout", SHORT_FLAG])
        .await
        .unwrap();
    let mut slowest = Duration::ZERO;
    for i in 0..4 {
        let start = Instant::now();
        let reply = get(&gw.url("/pair")).await;
        let took = start.elapsed();
        assert_eq!((reply.status, reply.body.as_str()), (200, "healthy"), "{i}");
        assert!(
            took < Duration::from_millis(2000),
            "request {i} took {took:?}: at most one dial timeout"
        );
        slowest = slowest.max(took);
    }
    assert!(
        slowest >= SHORT - Duration::from_millis(50),
        "wrr sends some first attempt to the blackhole, which costs the dial timeout ({slowest:?})"
    );

    let start = Instant::now();
    let reply = get(&gw.url("/lone")).await;
    let took = start.elapsed();
    assert_eq!(reply.status, 502, "{reply:?}");
    assert!(
        took >= SHORT - Duration::from_millis(50) && took < Duration::from_millis(2000),
        "502 after {took:?}, want about the {SHORT:?} dial timeout"
    );
}

/// Beyond `--max-connections`, a new connection is closed at once; the open ones keep
/// being served, a freed slot is usable again, and refusals are counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_the_connection_cap_new_connections_are_closed_at_once() {
    let a = Upstream::named("a").await;
    let gw = TestGateway::start_with(&single("/a", &a.target(), ""), &["--max-connections", "3"])
        .await
        .unwrap();
    let request = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n";
    let mut open = Vec::new();
    for _ in 0..3 {
        let mut stream = TcpStream::connect(gw.addr).await.unwrap();
        stream.write_all(request).await.unwrap();
        let (head, _) = read_response(&mut stream).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        open.push(stream);
    }
    let mut refused = TcpStream::connect(gw.addr).await.unwrap();
    let _ = refused.write_all(request).await;
    let took = closed_within(&mut refused, PATIENCE).await;
    assert!(took < Duration::from_secs(2), "closed after {took:?}");

    // The open connections are still served.
    for stream in &mut open {
        stream.write_all(request).await.unwrap();
        let (head, body) = read_response(stream).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert_eq!(body, "a");
    }
    // A slot freed is a connection accepted again; the refusal was counted.
    drop(open.pop());
    let addr = gw.addr;
    assert_eventually!(
        PATIENCE,
        "a new connection is served again",
        || async move { expect_eq(fetch_once(addr, "/a").await, Some("a".to_owned())) }
    );
    // At least the one above (a retry of the wait may have been refused too, before the
    // freed slot was released).
    let page = fetch_once(addr, "/metrics").await.expect("metrics");
    let refusals = sum(&page, "go_gateway_connections_refused_total", &[]).unwrap_or(0.0);
    assert!(refusals >= 1.0, "{page}");
}

/// One `Connection: close` GET on a new connection: the body of a 200, `None` for anything
/// else (refused, closed, another status).
async fn fetch_once(addr: SocketAddr, path: &str) -> Option<String> {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await.ok()?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut all = Vec::new();
        stream.read_to_end(&mut all).await.ok()?;
        let all = String::from_utf8_lossy(&all).into_owned();
        let (head, body) = all.split_once("\r\n\r\n")?;
        head.starts_with("HTTP/1.1 200").then(|| body.to_owned())
    };
    tokio::time::timeout(PATIENCE, exchange)
        .await
        .ok()
        .flatten()
}

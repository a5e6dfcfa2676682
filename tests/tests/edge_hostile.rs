//! Hostile input at the edge (issue 9, item 4): each finding of the hostile-input run sent
//! as the exact bytes over a raw TCP socket to the real gateway on 127.0.0.1, with a real
//! upstream behind it that reports what it received (or, for upstream faults, a raw one
//! that writes the exact bytes of a broken response).

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tests::config::{self, middleware, middlewares};
use tests::harness::{TestGateway, Upstream, text};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// Every wait in these tests is bounded by this.
const WAIT: Duration = Duration::from_secs(10);

/// An endpoint with a generous timeout (the request-body cases wait on the test).
fn endpoint(path: &str, host: &str, target: &str, extra: &str) -> String {
    config::endpoint(
        path,
        target,
        &format!("    host: {host:?}\n    timeout: 10s\n{extra}"),
    )
}

/// An `ipfilter` that refuses the test's own address.
fn deny_loopback() -> String {
    middlewares(&middleware("ipfilter", "{deny: [127.0.0.0/8]}"))
}

/// A response as the client socket read it.
#[derive(Debug)]
struct RawResponse {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl RawResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One client connection that writes exact bytes and reads responses strictly by their
/// framing (`Content-Length`, chunked, or until the close), so a mis-framed response shows.
struct RawClient {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl RawClient {
    async fn connect(addr: SocketAddr) -> RawClient {
        let stream = TcpStream::connect(addr).await.expect("connect to gateway");
        RawClient {
            stream,
            buf: Vec::new(),
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write request");
    }

    /// Sends `request` and reads one response.
    async fn exchange(&mut self, request: &[u8]) -> RawResponse {
        self.send(request).await;
        self.response().await
    }

    /// Reads more bytes; false at the end of the stream.
    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 16 * 1024];
        let read = tokio::time::timeout(WAIT, self.stream.read(&mut chunk))
            .await
            .expect("gateway answers within the wait")
            .unwrap_or(0);
        self.buf.extend_from_slice(&chunk[..read]);
        read > 0
    }

    /// `\r\n`-terminated line, without the terminator.
    async fn line(&mut self) -> String {
        loop {
            if let Some(end) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = String::from_utf8_lossy(&self.buf[..end]).into_owned();
                self.buf.drain(..end + 2);
                return line;
            }
            assert!(
                self.fill().await,
                "connection closed mid-line: {:?}",
                self.buf
            );
        }
    }

    async fn exactly(&mut self, len: usize) -> Vec<u8> {
        while self.buf.len() < len {
            assert!(
                self.fill().await,
                "connection closed after {} of {len} body bytes",
                self.buf.len()
            );
        }
        self.buf.drain(..len).collect()
    }

    async fn response(&mut self) -> RawResponse {
        let status_line = self.line().await;
        let status = status_line
            .split(' ')
            .nth(1)
            .and_then(|code| code.parse().ok())
            .unwrap_or_else(|| panic!("status line {status_line:?}"));
        let mut headers = Vec::new();
        loop {
            let line = self.line().await;
            if line.is_empty() {
                break;
            }
            let (name, value) = line.split_once(':').expect("header line");
            headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
        }
        let mut response = RawResponse {
            status,
            headers,
            body: Vec::new(),
        };
        if response.header("transfer-encoding") == Some("chunked") {
            assert_eq!(
                response.header("content-length"),
                None,
                "a chunked response must carry no Content-Length"
            );
            loop {
                let size_line = self.line().await;
                let size = usize::from_str_radix(size_line.split(';').next().unwrap_or(""), 16)
                    .unwrap_or_else(|_| panic!("chunk size line {size_line:?}"));
                if size == 0 {
                    while !self.line().await.is_empty() {}
                    break;
                }
                let data = self.exactly(size).await;
                response.body.extend_from_slice(&data);
                assert_eq!(self.line().await, "", "CRLF after a chunk");
            }
        } else if let Some(length) = response.header("content-length") {
            let length = length.parse().expect("numeric Content-Length");
            response.body = self.exactly(length).await;
        } else if status >= 200 && status != 204 && status != 304 {
            while self.fill().await {}
            response.body = std::mem::take(&mut self.buf);
        }
        response
    }
}

/// What a raw upstream connection received.
#[derive(Debug)]
enum Received {
    /// A complete request head arrived (these bytes so far).
    Head(Vec<u8>),
    /// The connection ended; everything it carried.
    Closed(Vec<u8>),
}

/// An upstream on 127.0.0.1 that answers each request head with fixed raw bytes (or not at
/// all) and reports every byte it received.
struct RawUpstream {
    addr: SocketAddr,
    received: mpsc::UnboundedReceiver<Received>,
}

impl RawUpstream {
    async fn start(response: Option<Vec<u8>>) -> RawUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (tx, received) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let (tx, response) = (tx.clone(), response.clone());
                tokio::spawn(async move {
                    let mut seen = Vec::new();
                    // Bytes up to here are judged: each blank line ends one request head
                    // (only bodiless requests are sent to an answering one).
                    let mut judged = 0;
                    let mut chunk = [0u8; 16 * 1024];
                    loop {
                        let read = tokio::time::timeout(WAIT, stream.read(&mut chunk)).await;
                        let Ok(Ok(read @ 1..)) = read else { break };
                        seen.extend_from_slice(&chunk[..read]);
                        while let Some(end) =
                            seen[judged..].windows(4).position(|w| w == b"\r\n\r\n")
                        {
                            judged += end + 4;
                            let _ = tx.send(Received::Head(seen[..judged].to_vec()));
                            if let Some(response) = &response {
                                let _ = stream.write_all(response).await;
                            }
                        }
                    }
                    let _ = tx.send(Received::Closed(seen));
                });
            }
        });
        RawUpstream { addr, received }
    }

    async fn next(&mut self) -> Received {
        tokio::time::timeout(WAIT, self.received.recv())
            .await
            .expect("upstream event within the wait")
            .expect("upstream running")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encoded_and_doubled_paths_cannot_bypass_a_route_deny() {
    let admin = Upstream::named("admin").await;
    let catchall = Upstream::named("catchall").await;
    let gw = TestGateway::start(&config::gateway(&[
        endpoint("/admin/*", "", &admin.target(), &deny_loopback()),
        endpoint("/*", "", &catchall.target(), ""),
    ]))
    .await;
    let mut client = RawClient::connect(gw.addr).await;

    for path in [
        "/admin/x",
        "/%61dmin/x",
        "/admi%6E/secret",
        "//admin/x",
        "/%61%64min",
    ] {
        let request = format!("GET {path} HTTP/1.1\r\nHost: gw.test\r\n\r\n");
        let response = client.exchange(request.as_bytes()).await;
        assert_eq!(response.status, 403, "{path}: {}", response.body_text());
    }
    assert_eq!((admin.hits(), catchall.hits()), (0, 0));

    // The upstream receives the path the router judged: unreserved escapes decoded, `//`
    // collapsed (one trailing slash kept), reserved escapes still encoded, query as sent.
    for (path, seen) in [
        (
            "/public//a/%7Euser/b%2fc//?q=%61//",
            "/public/a/~user/b%2Fc/?q=%61//",
        ),
        ("//a/b", "/a/b"),
        ("/a//b/c//", "/a/b/c/"),
        ("/x/%41.b/..c", "/x/A.b/..c"),
    ] {
        let request = format!("GET {path} HTTP/1.1\r\nHost: gw.test\r\n\r\n");
        let response = client.exchange(request.as_bytes()).await;
        assert_eq!(response.status, 200, "{path}");
        assert_eq!(response.header("x-upstream"), Some("catchall"));
        assert_eq!(response.header("x-seen-path"), Some(seen), "{path}");
    }

    // Dot segments (also encoded) and broken escapes are refused, never forwarded.
    let before = catchall.hits();
    for path in [
        "/public/%2e%2e/admin/x",
        "/x/.%2E//admin",
        "/a/./b",
        "/%zz",
        "/a%2",
    ] {
        let mut client = RawClient::connect(gw.addr).await;
        let request = format!("GET {path} HTTP/1.1\r\nHost: gw.test\r\n\r\n");
        let response = client.exchange(request.as_bytes()).await;
        assert_eq!(response.status, 400, "{path}");
    }
    assert_eq!(catchall.hits(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_must_be_one_valid_header() {
    let admin = Upstream::named("admin").await;
    let catchall = Upstream::named("catchall").await;
    let gw = TestGateway::start(&config::gateway(&[
        endpoint("/secret", "admin.test", &admin.target(), &deny_loopback()),
        endpoint("/secret", "", &catchall.target(), ""),
    ]))
    .await;

    // The deny holds for the admin host, and other hosts reach the catch-all.
    let mut client = RawClient::connect(gw.addr).await;
    let denied = b"GET /secret HTTP/1.1\r\nHost: admin.test\r\n\r\n";
    assert_eq!(client.exchange(denied).await.status, 403);
    let public = b"GET /secret HTTP/1.1\r\nHost: public.test\r\n\r\n";
    let response = client.exchange(public).await;
    assert_eq!(response.status, 200);
    assert_eq!(response.header("x-seen-host"), Some("public.test"));

    for request in [
        // Two Host headers: routed by the first, the second reached the upstream.
        &b"GET /secret HTTP/1.1\r\nHost: public.test\r\nHost: admin.test\r\n\r\n"[..],
        b"GET /secret HTTP/1.1\r\nHost: admin.test\r\nHost: public.test\r\n\r\n",
        b"GET /secret HTTP/1.1\r\nHost: public.test\r\nhost: public.test\r\n\r\n",
        // None on HTTP/1.1.
        b"GET /secret HTTP/1.1\r\nAccept: */*\r\n\r\n",
        // Not host[:port].
        b"GET /secret HTTP/1.1\r\nHost: a b/c@d\r\n\r\n",
        b"GET /secret HTTP/1.1\r\nHost: admin.test@public.test\r\n\r\n",
        b"GET /secret HTTP/1.1\r\nHost: public.test:80x\r\n\r\n",
    ] {
        let mut client = RawClient::connect(gw.addr).await;
        let response = client.exchange(request).await;
        assert_eq!(response.status, 400, "{}", String::from_utf8_lossy(request));
        assert!(response.body_text().contains("Host"), "{response:?}");
    }
    assert_eq!((admin.hits(), catchall.hits()), (0, 1));

    // HTTP/1.0 may leave Host out.
    let mut client = RawClient::connect(gw.addr).await;
    let response = client.exchange(b"GET /secret HTTP/1.0\r\n\r\n").await;
    assert_eq!(response.status, 200);
    assert_eq!(response.header("x-upstream"), Some("catchall"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_authority_routes_by_host() {
    let api = Upstream::named("api").await;
    let other = Upstream::named("other").await;
    let gw = TestGateway::start(&config::gateway(&[
        endpoint("/whoami", "api.test", &api.target(), ""),
        endpoint("/whoami", "", &other.target(), ""),
    ]))
    .await;
    let stream = TcpStream::connect(gw.addr).await.expect("connect");
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2c handshake");
    tokio::spawn(connection);
    for (uri, want) in [
        ("http://api.test/whoami", "api"),
        ("http://other.test/whoami", "other"),
    ] {
        let request = http::Request::get(uri)
            .body(Empty::<Bytes>::new())
            .expect("request");
        let response = tokio::time::timeout(WAIT, sender.send_request(request))
            .await
            .expect("answer within the wait")
            .expect("h2 response");
        assert_eq!(response.status(), 200, "{uri}");
        let body = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        assert_eq!(body, want, "{uri}");
    }
    // A Host header naming another authority than `:authority` is refused.
    let request = http::Request::get("http://other.test/whoami")
        .header("host", "api.test")
        .body(Empty::<Bytes>::new())
        .expect("request");
    let response = sender.send_request(request).await.expect("h2 response");
    assert_eq!(response.status(), 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_content_length_with_chunked_is_reframed() {
    // Content-Length: 2 beside a chunked body of 11 bytes (RFC 9112 §6.3: chunked wins).
    let mut upstream = RawUpstream::start(Some(
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n\
          5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
            .to_vec(),
    ))
    .await;
    let gw = TestGateway::start(&config::gateway(&[endpoint(
        "/*",
        "",
        &upstream.addr.to_string(),
        "",
    )]))
    .await;
    let mut client = RawClient::connect(gw.addr).await;
    for _ in 0..2 {
        // The second exchange on the same connection proves the first was framed exactly.
        let response = client
            .exchange(b"GET /framing HTTP/1.1\r\nHost: gw.test\r\n\r\n")
            .await;
        assert_eq!(response.status, 200);
        assert_ne!(response.header("content-length"), Some("2"));
        assert_eq!(response.body_text(), "hello world");
        assert!(matches!(upstream.next().await, Received::Head(_)));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_upstream_response_head_is_502() {
    let big = |size: usize| {
        let mut response = b"HTTP/1.1 200 OK\r\nX-Big: ".to_vec();
        response.extend(std::iter::repeat_n(b'a', size));
        response.extend_from_slice(b"\r\nContent-Length: 2\r\n\r\nok");
        response
    };
    let huge = RawUpstream::start(Some(big(100 * 1024))).await;
    let fair = RawUpstream::start(Some(big(32 * 1024))).await;
    let gw = TestGateway::start(&config::gateway(&[
        endpoint("/huge", "", &huge.addr.to_string(), ""),
        endpoint("/fair", "", &fair.addr.to_string(), ""),
    ]))
    .await;
    let mut client = RawClient::connect(gw.addr).await;
    let response = client
        .exchange(b"GET /huge HTTP/1.1\r\nHost: gw.test\r\n\r\n")
        .await;
    assert_eq!(response.status, 502);
    assert_eq!(response.header("x-big"), None);
    let response = client
        .exchange(b"GET /fair HTTP/1.1\r\nHost: gw.test\r\n\r\n")
        .await;
    assert_eq!(response.status, 200, "a 32 KiB header still passes");
    assert_eq!(response.header("x-big").map(str::len), Some(32 * 1024));
    assert_eq!(response.body_text(), "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_request_chunks_are_400_and_never_complete_upstream() {
    // An upstream that echoes the request body, to show chunked uploads still stream.
    let echo = Upstream::start(|req: http::Request<hyper::body::Incoming>| async move {
        let body = req.into_body().collect().await.map(|b| b.to_bytes());
        http::Response::new(text(body.unwrap_or_default()))
    })
    .await;
    let mut raw = RawUpstream::start(None).await;
    let gw = TestGateway::start(&config::gateway(&[
        endpoint("/echo", "", &echo.target(), ""),
        endpoint("/raw", "", &raw.addr.to_string(), ""),
    ]))
    .await;

    let mut client = RawClient::connect(gw.addr).await;
    let good = b"POST /echo HTTP/1.1\r\nHost: gw.test\r\nTransfer-Encoding: chunked\r\n\r\n\
                 5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n";
    let response = client.exchange(good).await;
    assert_eq!(response.status, 200);
    assert_eq!(response.body_text(), "hello world");

    // A bad chunk size in the first chunk: 400, and nothing reaches the upstream.
    for request in [
        &b"POST /echo HTTP/1.1\r\nHost: gw.test\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n"[..],
        b"POST /echo HTTP/1.1\r\nHost: gw.test\r\nTransfer-Encoding: chunked\r\n\r\n-5\r\nhello\r\n0\r\n\r\n",
        b"POST /echo HTTP/1.1\r\nHost: gw.test\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffffff\r\nx\r\n0\r\n\r\n",
    ] {
        let mut client = RawClient::connect(gw.addr).await;
        let response = client.exchange(request).await;
        assert_eq!(response.status, 400, "{}", String::from_utf8_lossy(request));
    }
    assert_eq!(echo.hits(), 1, "only the good upload reached the upstream");

    // A bad chunk after a good one, once the upstream has the head: the client gets 400 and
    // the upstream's request is cut off before its last chunk, never complete-looking.
    let mut client = RawClient::connect(gw.addr).await;
    client
        .send(b"POST /raw HTTP/1.1\r\nHost: gw.test\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        .await;
    let Received::Head(head) = raw.next().await else {
        panic!("the upstream should see the head first")
    };
    assert!(head.starts_with(b"POST /raw HTTP/1.1\r\n"));
    client.send(b"zz\r\nworld\r\n0\r\n\r\n").await;
    let response = client.response().await;
    assert_eq!(response.status, 400, "{}", response.body_text());
    let Received::Closed(all) = raw.next().await else {
        panic!("the upstream connection should be closed")
    };
    let all = String::from_utf8_lossy(&all);
    assert!(all.contains("hello"), "{all:?}");
    assert!(!all.contains("world"), "{all:?}");
    assert!(
        !all.ends_with("0\r\n\r\n"),
        "a complete-looking request: {all:?}"
    );
}

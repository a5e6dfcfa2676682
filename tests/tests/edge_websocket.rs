//! WebSocket and HTTP/1.1 Upgrade tunnels through the gateway (DESIGN §8): a real
//! tokio-tungstenite server behind the gateway and a real client in front of it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use middleware::Registry;
use proxy::Edge;
use proxy::server::{ServerOptions, serve};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tests::assert_eventually;
use tests::config::{endpoint, gateway, middleware, middlewares, single};
use tests::embedded::{parse, proxy_with};
use tests::eventually::expect_eq;
use tests::harness::{TestGateway, Upstream, get, get_with};
use tests::metrics::sum;
use tests::tls::TestCa;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Mutex, mpsc};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;

/// Every wait in these tests is bounded by this.
const WAIT: Duration = Duration::from_secs(5);

type Client = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// What the server side of one WebSocket connection saw.
#[derive(Debug, PartialEq)]
enum Seen {
    /// The client's close frame arrived.
    CloseFrame,
    /// The connection ended (the stream has no more messages).
    Ended,
}

/// A real WebSocket echo server on 127.0.0.1:0: echoes text and binary messages; on the
/// text `close-me` it closes the connection itself.
struct WsUpstream {
    addr: SocketAddr,
    /// TCP connections accepted.
    connections: Arc<AtomicUsize>,
    /// WebSocket handshakes completed.
    handshakes: Arc<AtomicUsize>,
    seen: Mutex<mpsc::UnboundedReceiver<Seen>>,
    shutdown: CancellationToken,
}

impl WsUpstream {
    async fn start() -> WsUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let connections = Arc::new(AtomicUsize::new(0));
        let handshakes = Arc::new(AtomicUsize::new(0));
        let (seen_tx, seen) = mpsc::unbounded_channel();
        let shutdown = CancellationToken::new();
        let (task_connections, task_handshakes, task_shutdown) =
            (connections.clone(), handshakes.clone(), shutdown.clone());
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    () = task_shutdown.cancelled() => return,
                    accepted = listener.accept() => accepted,
                };
                let Ok((stream, _)) = accepted else { continue };
                task_connections.fetch_add(1, Ordering::SeqCst);
                let (handshakes, seen, shutdown) = (
                    task_handshakes.clone(),
                    seen_tx.clone(),
                    task_shutdown.clone(),
                );
                tokio::spawn(async move {
                    tokio::select! {
                        () = echo(stream, handshakes, seen) => {}
                        () = shutdown.cancelled() => {}
                    }
                });
            }
        });
        WsUpstream {
            addr,
            connections,
            handshakes,
            seen: Mutex::new(seen),
            shutdown,
        }
    }

    fn target(&self) -> String {
        self.addr.to_string()
    }

    /// The next thing a connection of this server saw, within [`WAIT`].
    async fn next_seen(&self) -> Seen {
        let mut seen = self.seen.lock().await;
        tokio::time::timeout(WAIT, seen.recv())
            .await
            .expect("the upstream saw something within 5 s")
            .expect("the upstream is running")
    }
}

impl Drop for WsUpstream {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// The upstream's handshake answer: `x-upstream: ws`, and the `X-Forwarded-For` it saw as
/// `x-seen-forwarded-for`. (tungstenite's callback type fixes the large error type.)
#[allow(clippy::result_large_err)]
fn answer(request: &Request, mut response: Response) -> Result<Response, ErrorResponse> {
    let forwarded = request
        .headers()
        .get("x-forwarded-for")
        .cloned()
        .unwrap_or_else(|| http::HeaderValue::from_static("-"));
    response
        .headers_mut()
        .insert("x-upstream", http::HeaderValue::from_static("ws"));
    response
        .headers_mut()
        .insert("x-seen-forwarded-for", forwarded);
    Ok(response)
}

/// Serves one WebSocket connection (see [`WsUpstream`]).
async fn echo(stream: TcpStream, handshakes: Arc<AtomicUsize>, seen: mpsc::UnboundedSender<Seen>) {
    let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(stream, answer).await else {
        return;
    };
    handshakes.fetch_add(1, Ordering::SeqCst);
    while let Some(message) = ws.next().await {
        match message {
            Ok(Message::Text(text)) if text.as_str() == "close-me" => {
                let frame = CloseFrame {
                    code: CloseCode::Normal,
                    reason: "bye".into(),
                };
                if ws.close(Some(frame)).await.is_err() {
                    break;
                }
            }
            Ok(message @ (Message::Text(_) | Message::Binary(_))) => {
                if ws.send(message).await.is_err() {
                    break;
                }
            }
            // tungstenite answers the close frame itself; the stream then ends.
            Ok(Message::Close(_)) => {
                let _ = seen.send(Seen::CloseFrame);
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    let _ = seen.send(Seen::Ended);
}

/// Opens a WebSocket to `url` with extra request headers, within [`WAIT`].
async fn connect(
    url: &str,
    headers: &[(&'static str, &'static str)],
) -> Result<(Client, http::Response<Option<Vec<u8>>>), WsError> {
    let mut request = url.into_client_request()?;
    for (name, value) in headers {
        request
            .headers_mut()
            .insert(*name, http::HeaderValue::from_static(value));
    }
    tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(request))
        .await
        .expect("the handshake ends within 5 s")
}

/// The next message from the peer, within [`WAIT`] (`None` when the stream ended).
async fn next<S: AsyncRead + AsyncWrite + Unpin>(
    ws: &mut WebSocketStream<S>,
) -> Option<Result<Message, WsError>> {
    tokio::time::timeout(WAIT, ws.next())
        .await
        .expect("a message or the end within 5 s")
}

/// Sends `message` and expects it back.
async fn round_trip<S: AsyncRead + AsyncWrite + Unpin>(
    ws: &mut WebSocketStream<S>,
    message: Message,
) {
    ws.send(message.clone()).await.expect("sent");
    let echoed = next(ws).await.expect("open").expect("a message");
    assert_eq!(echoed, message);
}

fn ws_url(addr: SocketAddr, path: &str) -> String {
    format!("ws://{addr}{path}")
}

/// The number of open tunnels the gateway reports.
async fn open_tunnels(gw: &TestGateway) -> f64 {
    sum(&gw.metrics().await, "go_gateway_tunnels_open", &[]).unwrap_or(0.0)
}

/// An HTTP/1.1 connection idle past the server's park (it gives hyper's buffers back and
/// waits for the socket alone) still upgrades: the server hands the socket to the tunnel
/// itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_idle_long_enough_to_park_still_upgrades() {
    let upstream = WsUpstream::start().await;
    let plain = Upstream::named("plain").await;
    let gw = TestGateway::start(&gateway(&[
        endpoint("/ws/*", &upstream.target(), ""),
        endpoint("/plain", &plain.target(), ""),
    ]))
    .await;
    let mut stream = TcpStream::connect(gw.addr).await.unwrap();
    stream
        .write_all(b"GET /plain HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\nplain") {
        let mut byte = [0; 1];
        let n = tokio::time::timeout(WAIT, stream.read(&mut byte))
            .await
            .expect("the first response in time")
            .unwrap();
        assert_eq!(n, 1, "closed after {:?}", String::from_utf8_lossy(&head));
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 200"), "{head:?}");
    // Past the server's 200 ms park.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let request = ws_url(gw.addr, "/ws/echo").into_client_request().unwrap();
    let (mut ws, response) =
        tokio::time::timeout(WAIT, tokio_tungstenite::client_async(request, stream))
            .await
            .expect("a handshake in time")
            .expect("a handshake on the same connection");
    assert_eq!(response.status(), 101);
    for i in 0..3 {
        round_trip(&mut ws, Message::text(format!("after the park {i}"))).await;
    }
    assert_eq!(upstream.handshakes.load(Ordering::SeqCst), 1);
}

/// A client may send its first WebSocket frame right behind the upgrade request, before
/// the `101` comes back: those bytes reach the upstream first thing in the tunnel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_sent_with_the_upgrade_request_reaches_the_upstream() {
    let upstream = WsUpstream::start().await;
    let gw = TestGateway::start(&single("/ws/*", &upstream.target(), "")).await;
    let mut stream = TcpStream::connect(gw.addr).await.unwrap();
    let mut bytes =
        b"GET /ws/echo HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
        Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
            .to_vec();
    // A masked text frame "early" (RFC 6455 §5.2), in the same write as the request.
    let mask = [1u8, 2, 3, 4];
    bytes.extend_from_slice(&[0x81, 0x80 | 5]);
    bytes.extend_from_slice(&mask);
    bytes.extend(b"early".iter().zip(mask.iter().cycle()).map(|(b, m)| b ^ m));
    stream.write_all(&bytes).await.unwrap();
    // The 101 head, then the echo as an unmasked text frame.
    let mut received = Vec::new();
    let echo = [&[0x81u8, 5][..], b"early"].concat();
    while !received.windows(echo.len()).any(|w| w == echo.as_slice()) {
        let mut chunk = [0; 1024];
        let n = tokio::time::timeout(WAIT, stream.read(&mut chunk))
            .await
            .expect("the echo in time")
            .unwrap();
        assert!(n > 0, "closed: {:?}", String::from_utf8_lossy(&received));
        received.extend_from_slice(&chunk[..n]);
    }
    assert!(received.starts_with(b"HTTP/1.1 101"), "{received:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_messages_echo_through_the_gateway() {
    let upstream = WsUpstream::start().await;
    let gw = TestGateway::start(&single("/ws/*", &upstream.target(), "")).await;
    let (mut ws, response) = connect(&ws_url(gw.addr, "/ws/echo"), &[])
        .await
        .expect("handshake through the gateway");
    assert_eq!(response.status(), 101);
    // The upstream's own 101 headers come back; the gateway added X-Forwarded-For.
    assert_eq!(response.headers()["x-upstream"], "ws");
    assert_eq!(response.headers()["x-seen-forwarded-for"], "127.0.0.1");
    assert!(response.headers().contains_key("sec-websocket-accept"));
    for i in 0..5 {
        round_trip(&mut ws, Message::text(format!("hello {i}"))).await;
    }
    // Several in flight at once, answered in order.
    for i in 0..3 {
        ws.send(Message::text(format!("burst {i}"))).await.unwrap();
    }
    for i in 0..3 {
        let echoed = next(&mut ws).await.unwrap().unwrap();
        assert_eq!(echoed, Message::text(format!("burst {i}")));
    }
    let page = gw.metrics().await;
    let labels = [("path", "/ws/*")];
    assert_eq!(sum(&page, "go_gateway_tunnels_open", &labels), Some(1.0));
    assert_eq!(
        sum(&page, "go_gateway_tunnels_opened_total", &labels),
        Some(1.0)
    );
    assert_eq!(
        sum(
            &page,
            "go_gateway_requests_code_total",
            &[("path", "/ws/*"), ("code", "101")]
        ),
        Some(1.0)
    );
    assert_eq!(upstream.handshakes.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_mebibyte_binary_message_arrives_intact() {
    let upstream = WsUpstream::start().await;
    let gw = TestGateway::start(&single("/ws", &upstream.target(), "")).await;
    let (mut ws, _) = connect(&ws_url(gw.addr, "/ws"), &[]).await.unwrap();
    let payload: Vec<u8> = (0..1024 * 1024).map(|i| (i % 251) as u8).collect();
    ws.send(Message::binary(payload.clone())).await.unwrap();
    match next(&mut ws).await {
        Some(Ok(Message::Binary(echoed))) => {
            assert_eq!(echoed.len(), payload.len());
            assert!(echoed == payload, "the echoed bytes differ");
        }
        other => panic!("expected the binary echo, got {other:?}"),
    }
    // The tunnel still works after the big message.
    round_trip(&mut ws, Message::text("after")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_from_either_side_reaches_the_other() {
    let upstream = WsUpstream::start().await;
    let gw = TestGateway::start(&single("/ws", &upstream.target(), "")).await;
    let url = ws_url(gw.addr, "/ws");

    // The client closes: the upstream gets the close frame, then its connection ends.
    let (mut ws, _) = connect(&url, &[]).await.unwrap();
    round_trip(&mut ws, Message::text("one")).await;
    tokio::time::timeout(WAIT, ws.close(None))
        .await
        .expect("close sent within 5 s")
        .unwrap();
    assert_eq!(upstream.next_seen().await, Seen::CloseFrame);
    assert_eq!(upstream.next_seen().await, Seen::Ended);
    // The client sees the server's answer to its close, then the end.
    loop {
        match next(&mut ws).await {
            Some(Ok(Message::Close(_))) => {}
            None | Some(Err(WsError::ConnectionClosed)) => break,
            other => panic!("expected the end of the stream, got {other:?}"),
        }
    }
    drop(ws);

    // The server closes: the client gets its close frame, then the end.
    let (mut ws, _) = connect(&url, &[]).await.unwrap();
    ws.send(Message::text("close-me")).await.unwrap();
    match next(&mut ws).await {
        Some(Ok(Message::Close(Some(frame)))) => {
            assert_eq!(frame.code, CloseCode::Normal);
            assert_eq!(frame.reason.as_str(), "bye");
        }
        other => panic!("expected the server's close frame, got {other:?}"),
    }
    assert!(
        matches!(
            next(&mut ws).await,
            None | Some(Err(WsError::ConnectionClosed))
        ),
        "the stream ends after the close handshake"
    );
    // The client's answer to the close reaches the upstream, then its connection ends.
    assert_eq!(upstream.next_seen().await, Seen::CloseFrame);
    assert_eq!(upstream.next_seen().await, Seen::Ended);
    drop(ws);

    // The gateway let go of both tunnels.
    assert_eventually!(WAIT, "no tunnel open", || async {
        expect_eq(open_tunnels(&gw).await, 0.0)
    });
    let page = gw.metrics().await;
    assert_eq!(
        sum(&page, "go_gateway_tunnels_opened_total", &[]),
        Some(2.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_refuses_an_upgrade_before_the_upstream_sees_it() {
    let upstream = WsUpstream::start().await;
    let gw = TestGateway::start(&single(
        "/ws",
        &upstream.target(),
        &middlewares(&middleware("auth", "{apikey: {keys: [k-1]}}")),
    ))
    .await;
    let url = ws_url(gw.addr, "/ws");
    match connect(&url, &[]).await {
        Err(WsError::Http(response)) => assert_eq!(response.status(), 401),
        other => panic!("expected 401, got {:?}", other.map(|(_, r)| r.status())),
    }
    match connect(&url, &[("x-api-key", "wrong")]).await {
        Err(WsError::Http(response)) => assert_eq!(response.status(), 401),
        other => panic!("expected 401, got {:?}", other.map(|(_, r)| r.status())),
    }
    assert_eq!(upstream.connections.load(Ordering::SeqCst), 0);
    assert_eq!(upstream.handshakes.load(Ordering::SeqCst), 0);

    // With the key the same upgrade goes through the chain to the upstream.
    let (mut ws, _) = connect(&url, &[("x-api-key", "k-1")]).await.unwrap();
    round_trip(&mut ws, Message::text("let in")).await;
    assert_eq!(upstream.handshakes.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_survives_a_config_reload() {
    let upstream = WsUpstream::start().await;
    let other = Upstream::named("other").await;
    let ws_endpoint = endpoint("/ws", &upstream.target(), "");
    let gw = TestGateway::start(&gateway(std::slice::from_ref(&ws_endpoint))).await;
    let (mut ws, _) = connect(&ws_url(gw.addr, "/ws"), &[]).await.unwrap();
    round_trip(&mut ws, Message::text("before the reload")).await;

    // The reload swaps the router and closes the old one (its clients, its handlers).
    gw.write_config(&gateway(&[
        ws_endpoint,
        endpoint("/other", &other.target(), ""),
    ]));
    let other_url = gw.url("/other");
    assert_eventually!(WAIT, "the reloaded route answers", || {
        let url = other_url.clone();
        async move { expect_eq(get(&url).await.status, 200) }
    });
    for i in 0..5 {
        round_trip(&mut ws, Message::text(format!("after the reload {i}"))).await;
    }
    round_trip(&mut ws, Message::binary(vec![7u8; 64 * 1024])).await;
    // A new tunnel goes through the new router.
    let (mut second, _) = connect(&ws_url(gw.addr, "/ws"), &[]).await.unwrap();
    round_trip(&mut second, Message::text("new router")).await;
    assert_eq!(open_tunnels(&gw).await, 2.0);
}

/// The idle timeout is a proxy setting (no flag yet), so this runs the library's server and
/// proxy with a 400 ms timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_tunnel_is_closed_after_the_idle_timeout() {
    const IDLE: Duration = Duration::from_millis(400);
    let upstream = WsUpstream::start().await;
    let proxy = Arc::new(proxy_with(Registry::new()).with_tunnel_idle_timeout(IDLE));
    proxy
        .update(&parse(&single("/ws", &upstream.target(), "")))
        .expect("config applies");
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let _stop = shutdown.clone().drop_guard();
    let edge = Arc::new(Edge::new(proxy.clone(), None));
    tokio::spawn(serve(listener, ServerOptions::default(), edge, shutdown));

    let (mut ws, _) = connect(&ws_url(addr, "/ws"), &[]).await.unwrap();
    // Traffic more often than the idle timeout keeps the tunnel open well past it.
    for i in 0..8 {
        tokio::time::sleep(IDLE / 4).await;
        round_trip(&mut ws, Message::text(format!("tick {i}"))).await;
    }
    // Then silence: both sides are closed once the idle timeout has passed.
    let silent = tokio::time::Instant::now();
    match next(&mut ws).await {
        None | Some(Err(_)) => {}
        Some(Ok(message)) => panic!("expected the tunnel to close, got {message:?}"),
    }
    let waited = silent.elapsed();
    assert!(
        waited >= IDLE - Duration::from_millis(50),
        "closed after {waited:?}, before the idle timeout"
    );
    assert!(waited < WAIT, "closed after {waited:?}");
    assert_eq!(upstream.next_seen().await, Seen::Ended);
    let metrics = proxy.metrics().clone();
    assert_eventually!(WAIT, "no tunnel open", || {
        let metrics = metrics.clone();
        async move {
            expect_eq(
                sum(&metrics.encode(), "go_gateway_tunnels_open", &[]),
                Some(0.0),
            )
        }
    });
}

/// A raw upstream for any upgrade protocol: answers the first request head with a 101 to
/// `echo/1` and then echoes bytes; hands the request head it read to `heads`.
async fn raw_upgrade_upstream(heads: mpsc::UnboundedSender<String>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let heads = heads.clone();
            tokio::spawn(async move {
                let Some(head) = read_head(&mut stream).await else {
                    return;
                };
                let _ = heads.send(head);
                let answer = "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: echo/1\r\nX-Upstream: raw\r\n\r\n";
                if stream.write_all(answer.as_bytes()).await.is_err() {
                    return;
                }
                let (mut read, mut write) = stream.split();
                let _ = tokio::io::copy(&mut read, &mut write).await;
            });
        }
    });
    addr
}

/// Reads an HTTP head byte by byte (nothing past it), within [`WAIT`].
async fn read_head(stream: &mut TcpStream) -> Option<String> {
    let read = async {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if stream.read(&mut byte).await.ok()? == 0 {
                return None;
            }
            head.push(byte[0]);
        }
        Some(String::from_utf8_lossy(&head).into_owned())
    };
    tokio::time::timeout(WAIT, read).await.ok().flatten()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_upgrade_protocol_is_tunnelled_without_other_hop_by_hop_headers() {
    let (heads_tx, mut heads) = mpsc::unbounded_channel();
    let upstream = raw_upgrade_upstream(heads_tx).await;
    let gw = TestGateway::start(&single("/raw", &upstream.to_string(), "")).await;
    let mut stream = TcpStream::connect(gw.addr).await.unwrap();
    let request = "GET /raw HTTP/1.1\r\nHost: example.test\r\nConnection: keep-alive, Upgrade, X-Private\r\nUpgrade: echo/1\r\nKeep-Alive: timeout=5\r\nX-Private: secret\r\nX-Kept: yes\r\n\r\n";
    stream.write_all(request.as_bytes()).await.unwrap();
    let answer = read_head(&mut stream).await.expect("the 101 head");
    let lower = answer.to_ascii_lowercase();
    assert!(lower.starts_with("http/1.1 101"), "{answer}");
    assert!(lower.contains("upgrade: echo/1\r\n"), "{answer}");
    assert!(lower.contains("connection: upgrade\r\n"), "{answer}");
    assert!(lower.contains("x-upstream: raw\r\n"), "{answer}");
    // A 1xx carries no framing headers (RFC 9110 §8.6, RFC 9112 §6.1).
    assert!(!lower.contains("content-length"), "{answer}");
    assert!(!lower.contains("transfer-encoding"), "{answer}");

    let seen = tokio::time::timeout(WAIT, heads.recv())
        .await
        .unwrap()
        .expect("the upstream read a head")
        .to_ascii_lowercase();
    assert!(seen.contains("connection: upgrade\r\n"), "{seen}");
    assert!(seen.contains("upgrade: echo/1\r\n"), "{seen}");
    assert!(seen.contains("x-kept: yes\r\n"), "{seen}");
    assert!(seen.contains("x-forwarded-for: 127.0.0.1\r\n"), "{seen}");
    assert!(!seen.contains("keep-alive"), "{seen}");
    assert!(!seen.contains("x-private"), "{seen}");

    for chunk in ["raw bytes ", "both ways"] {
        stream.write_all(chunk.as_bytes()).await.unwrap();
        let mut echoed = vec![0u8; chunk.len()];
        tokio::time::timeout(WAIT, stream.read_exact(&mut echoed))
            .await
            .expect("the echo within 5 s")
            .unwrap();
        assert_eq!(echoed, chunk.as_bytes());
    }
    // Closing our write side ends the tunnel: the echo upstream closes, so do we.
    stream.shutdown().await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut rest))
        .await
        .expect("the gateway closes the connection within 5 s")
        .unwrap();
    assert!(rest.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_the_upstream_declines_is_an_ordinary_response() {
    let upstream = Upstream::reporting("plain", &["connection", "upgrade"]).await;
    let gw = TestGateway::start(&single("/plain", &upstream.target(), "")).await;
    let reply = get_with(
        &gw.url("/plain"),
        &[("connection", "Upgrade"), ("upgrade", "websocket")],
    )
    .await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.body, "plain");
    assert_eq!(reply.header("x-seen-connection"), "upgrade");
    assert_eq!(reply.header("x-seen-upgrade"), "websocket");
    // The connection stays usable for ordinary requests.
    assert_eq!(get(&gw.url("/plain")).await.status, 200);
    assert_eq!(upstream.hits(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2c_upgrade_is_served_as_an_ordinary_request() {
    // Tunnelled, an h2c upgrade would let the client speak HTTP/2 to the node directly,
    // past routing and middlewares; the gateway strips it instead.
    let upstream = Upstream::reporting("plain", &["connection", "upgrade", "http2-settings"]).await;
    let gw = TestGateway::start(&single("/plain", &upstream.target(), "")).await;
    let reply = get_with(
        &gw.url("/plain"),
        &[
            ("connection", "Upgrade, HTTP2-Settings"),
            ("upgrade", "h2c"),
            ("http2-settings", "AAMAAABkAARAAAAAAAIAAAAA"),
        ],
    )
    .await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.body, "plain");
    assert_eq!(reply.header("x-seen-connection"), "-");
    assert_eq!(reply.header("x-seen-upgrade"), "-");
    assert_eq!(reply.header("x-seen-http2-settings"), "-");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_works_over_an_https_listener() {
    let upstream = WsUpstream::start().await;
    let ca = TestCa::new("wss test CA");
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key) = ca.issue(&["localhost"]).write(dir.path(), "localhost");
    let flags = [
        "--tls-addr",
        "127.0.0.1:0",
        "--tls-cert",
        cert.to_str().expect("utf-8 path"),
        "--tls-key",
        key.to_str().expect("utf-8 path"),
    ];
    let gw = TestGateway::start_in(dir, &single("/ws", &upstream.target(), ""), &flags)
        .await
        .expect("gateway starts");

    // A client trusting the test CA, offering only HTTP/1.1 (a WebSocket needs it).
    let mut roots = rustls::RootCertStore::empty();
    for der in CertificateDer::pem_slice_iter(ca.pem().as_bytes()) {
        roots
            .add(der.expect("CA certificate"))
            .expect("CA is a root");
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let handshake = async {
        let tcp = TcpStream::connect(gw.tls_addr()).await?;
        let name = ServerName::try_from("localhost").expect("DNS name");
        tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
    };
    let tls = tokio::time::timeout(WAIT, handshake)
        .await
        .expect("TLS handshake within 5 s")
        .expect("TLS handshake");
    let (mut ws, response) = tokio::time::timeout(
        WAIT,
        tokio_tungstenite::client_async("wss://localhost/ws", tls),
    )
    .await
    .expect("the upgrade within 5 s")
    .expect("upgrade over TLS");
    assert_eq!(response.status(), 101);
    assert_eq!(response.headers()["x-upstream"], "ws");
    for i in 0..3 {
        round_trip(&mut ws, Message::text(format!("secure {i}"))).await;
    }
    round_trip(&mut ws, Message::binary(vec![42u8; 256 * 1024])).await;
    ws.close(None).await.expect("close sent");
    assert_eq!(upstream.next_seen().await, Seen::CloseFrame);
    assert_eq!(upstream.next_seen().await, Seen::Ended);
}

//! The request path end to end: retries, timeouts, errors, streaming, header rules,
//! hot reload and server limits.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use tests::assert_eventually;
use tests::config::{endpoint, gateway, single};
use tests::eventually::expect_eq;
use tests::harness::{TestGateway, Upstream, get, get_with, http_client, send, text, unused_port};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn status_upstream(status: u16, name: &'static str) -> Upstream {
    Upstream::start(move |_req: Request<Incoming>| async move {
        Response::builder()
            .status(status)
            .header("x-upstream", name)
            .body(text(name))
            .unwrap()
    })
    .await
}

async fn slow_upstream(delay: Duration, name: &'static str) -> Upstream {
    Upstream::start(move |_req: Request<Incoming>| async move {
        tokio::time::sleep(delay).await;
        Response::builder()
            .header("x-upstream", name)
            .body(text(name))
            .unwrap()
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_moves_to_another_node() {
    let failing = status_upstream(503, "failing").await;
    let healthy = status_upstream(200, "healthy").await;
    let yaml = format!(
        "name: t\nendpoints:\n  - path: /r\n    selector: wrr\n    retry:\n      attempts: 3\n      conditions:\n        - byStatusCode: \"502-504\"\n    backends:\n      - target: {}\n      - target: {}\n",
        failing.target(),
        healthy.target()
    );
    let gw = TestGateway::start(&yaml).await;
    for i in 0..6 {
        let before = (failing.hits(), healthy.hits());
        let reply = get(&gw.url("/r")).await;
        assert_eq!(reply.status, 200, "request {i}");
        assert_eq!(reply.body, "healthy");
        let failing_hits = failing.hits() - before.0;
        assert!(
            failing_hits <= 1,
            "a retry never returns to the node already tried"
        );
        assert_eq!(healthy.hits() - before.1, 1);
    }
    assert!(
        failing.hits() >= 1,
        "wrr sends the first attempt of some request to the failing node"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_on_header_condition_with_json_list() {
    let unavailable = Upstream::start(|_req: Request<Incoming>| async {
        Response::builder()
            .header("grpc-status", "14")
            .body(text("down"))
            .unwrap()
    })
    .await;
    let healthy = status_upstream(200, "healthy").await;
    let yaml = format!(
        "name: t\nendpoints:\n  - path: /h\n    selector: wrr\n    retry:\n      attempts: 2\n      conditions:\n        - byHeader: {{name: Grpc-Status, value: '[\"13\", \"14\"]'}}\n    backends:\n      - target: {}\n      - target: {}\n",
        unavailable.target(),
        healthy.target()
    );
    let gw = TestGateway::start(&yaml).await;
    for _ in 0..4 {
        assert_eq!(get(&gw.url("/h")).await.body, "healthy");
    }
    assert!(unavailable.hits() >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_try_timeout_then_retry_elsewhere() {
    let slow = slow_upstream(Duration::from_secs(3), "slow").await;
    let fast = slow_upstream(Duration::ZERO, "fast").await;
    let yaml = format!(
        "name: t\nendpoints:\n  - path: /p\n    selector: wrr\n    timeout: 2s\n    retry:\n      attempts: 2\n      perTryTimeout: 0.2s\n    backends:\n      - target: {}\n      - target: {}\n",
        slow.target(),
        fast.target()
    );
    let gw = TestGateway::start(&yaml).await;
    for _ in 0..4 {
        let start = Instant::now();
        let reply = get(&gw.url("/p")).await;
        assert_eq!((reply.status, reply.body.as_str()), (200, "fast"));
        assert!(
            start.elapsed() < Duration::from_millis(1500),
            "took {:?}",
            start.elapsed()
        );
    }
    assert!(slow.hits() >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_timeout_is_504() {
    let slow = slow_upstream(Duration::from_secs(3), "slow").await;
    let gw = TestGateway::start(&single("/slow", &slow.target(), "    timeout: 300ms\n")).await;
    let start = Instant::now();
    let reply = get(&gw.url("/slow")).await;
    assert_eq!(reply.status, 504);
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_millis(2000),
        "{took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_backend_is_502() {
    let gw = TestGateway::start(&single(
        "/dead",
        &format!("127.0.0.1:{}", unused_port()),
        "",
    ))
    .await;
    let reply = get(&gw.url("/dead")).await;
    assert_eq!(reply.status, 502, "{reply:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_errors_carry_grpc_status() {
    let gw = TestGateway::start(&single(
        "/helloworld.Greeter/*",
        &format!("127.0.0.1:{}", unused_port()),
        "    protocol: GRPC\n",
    ))
    .await;
    let reply = send(
        Request::post(gw.url("/helloworld.Greeter/SayHello"))
            .header("content-type", "application/grpc")
            .body(Full::default())
            .unwrap(),
    )
    .await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("grpc-status"), "14");
    assert_eq!(reply.header("content-type"), "application/grpc");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_stream_chunk_by_chunk() {
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
    let rx = Arc::new(tokio::sync::Mutex::new(Some(rx)));
    let upstream = Upstream::start(move |_req: Request<Incoming>| {
        let rx = rx.clone();
        async move {
            let rx = rx.lock().await.take().expect("one streaming request");
            let stream = futures_util::stream::unfold(rx, |mut rx| async move {
                rx.recv()
                    .await
                    .map(|chunk| (Ok::<_, Infallible>(Frame::data(chunk)), rx))
            });
            Response::new(StreamBody::new(stream).boxed_unsync())
        }
    })
    .await;
    let gw = TestGateway::start(&single("/stream", &upstream.target(), "")).await;
    let response = http_client()
        .request(
            Request::get(gw.url("/stream"))
                .body(Full::default())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    tx.send(Bytes::from_static(b"first")).await.unwrap();
    let frame = tokio::time::timeout(Duration::from_secs(2), body.frame())
        .await
        .expect("the first chunk arrives while the upstream is still sending")
        .unwrap()
        .unwrap();
    assert_eq!(frame.into_data().unwrap(), "first");
    tx.send(Bytes::from_static(b"second")).await.unwrap();
    drop(tx);
    let rest = body.collect().await.unwrap().to_bytes();
    assert_eq!(rest, "second");
}

/// A download in progress is not cut by a reload (the old router is closed under it) nor by a
/// graceful shutdown: both wait for the body to end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streaming_download_survives_a_reload_and_a_shutdown() {
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
    let rx = Arc::new(tokio::sync::Mutex::new(Some(rx)));
    let upstream = Upstream::start(move |_req: Request<Incoming>| {
        let rx = rx.clone();
        async move {
            let rx = rx.lock().await.take().expect("one streaming request");
            let stream = futures_util::stream::unfold(rx, |mut rx| async move {
                rx.recv()
                    .await
                    .map(|chunk| (Ok::<_, Infallible>(Frame::data(chunk)), rx))
            });
            Response::new(StreamBody::new(stream).boxed_unsync())
        }
    })
    .await;
    let other = Upstream::named("other").await;
    let stream_endpoint = endpoint("/stream", &upstream.target(), "");
    let gw = TestGateway::start(&gateway(std::slice::from_ref(&stream_endpoint))).await;
    let response = tokio::time::timeout(
        Duration::from_secs(5),
        http_client().request(
            Request::get(gw.url("/stream"))
                .body(Full::default())
                .unwrap(),
        ),
    )
    .await
    .expect("response head within 5 s")
    .unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    tx.send(Bytes::from_static(b"before-reload "))
        .await
        .unwrap();
    let first = tokio::time::timeout(Duration::from_secs(2), body.frame())
        .await
        .expect("the first chunk arrives")
        .unwrap()
        .unwrap();
    assert_eq!(first.into_data().unwrap(), "before-reload ");

    // A reload swaps the router and closes the old one while the body is still streaming.
    gw.write_config(&gateway(&[
        stream_endpoint,
        endpoint("/other", &other.target(), ""),
    ]));
    let other_url = gw.url("/other");
    assert_eventually!(Duration::from_secs(5), "the reloaded route answers", || {
        let url = other_url.clone();
        async move { expect_eq(get(&url).await.status, 200) }
    });
    tx.send(Bytes::from_static(b"after-reload ")).await.unwrap();

    // A graceful shutdown (what SIGTERM starts) waits for the download too.
    let stopping = tokio::spawn(gw.stop());
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !stopping.is_finished(),
        "shutdown waits for the open download"
    );
    tx.send(Bytes::from_static(b"after-shutdown"))
        .await
        .unwrap();
    drop(tx);
    let rest = tokio::time::timeout(Duration::from_secs(5), body.collect())
        .await
        .expect("the body ends within 5 s")
        .unwrap()
        .to_bytes();
    assert_eq!(rest, "after-reload after-shutdown");
    let stopped = tokio::time::timeout(Duration::from_secs(5), stopping)
        .await
        .expect("shutdown ends once the download ended");
    assert_eq!(stopped.unwrap(), Ok(()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_headers_are_stripped_both_ways() {
    let seen = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let record = seen.clone();
    let upstream = Upstream::start(move |req: Request<Incoming>| {
        let record = record.clone();
        async move {
            let names: Vec<String> = req
                .headers()
                .keys()
                .map(|k| k.as_str().to_owned())
                .collect();
            *record.lock().unwrap() = names;
            Response::builder()
                .header("connection", "x-upstream-private")
                .header("x-upstream-private", "secret")
                .header("proxy-authenticate", "Basic")
                .header("x-public", "yes")
                .body(text("ok"))
                .unwrap()
        }
    })
    .await;
    let gw = TestGateway::start(&single("/h", &upstream.target(), "")).await;
    let reply = get_with(
        &gw.url("/h"),
        &[
            ("connection", "keep-alive, x-client-private"),
            ("x-client-private", "secret"),
            ("keep-alive", "timeout=5"),
            ("proxy-authorization", "Basic abc"),
            ("te", "gzip"),
            ("x-kept", "1"),
        ],
    )
    .await;
    assert_eq!(reply.status, 200);
    let seen = seen.lock().unwrap().clone();
    for gone in [
        "x-client-private",
        "keep-alive",
        "proxy-authorization",
        "te",
    ] {
        assert!(
            !seen.contains(&gone.to_owned()),
            "{gone} reached the upstream: {seen:?}"
        );
    }
    assert!(seen.contains(&"x-kept".to_owned()));
    assert_eq!(reply.header("x-public"), "yes");
    assert_eq!(
        reply.header("x-upstream-private"),
        "",
        "Connection-named response header stripped"
    );
    assert_eq!(reply.header("proxy-authenticate"), "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_for_is_appended() {
    let upstream = Upstream::named("u").await;
    let gw = TestGateway::start(&single("/x", &upstream.target(), "")).await;
    let xff = "x-seen-x-forwarded-for";
    assert_eq!(get(&gw.url("/x")).await.header(xff), "127.0.0.1");
    let reply = get_with(&gw.url("/x"), &[("x-forwarded-for", "10.1.1.1")]).await;
    assert_eq!(reply.header(xff), "10.1.1.1, 127.0.0.1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_reload_applies_good_files_and_keeps_serving_on_broken_ones() {
    let a = Upstream::named("a").await;
    let b = Upstream::named("b").await;
    let gw = TestGateway::start(&single("/a", &a.target(), "")).await;
    assert_eq!(get(&gw.url("/b")).await.status, 404);
    gw.write_config(&format!(
        "name: t\nendpoints:\n  - path: /a\n    backends:\n      - target: {}\n  - path: /b\n    backends:\n      - target: {}\n",
        a.target(),
        b.target()
    ));
    // The interval is 100 ms: the new route serves within two intervals (with slack).
    let url = gw.url("/b");
    assert_eventually!(
        Duration::from_millis(800),
        "the new route /b serves after the reload",
        || async { expect_eq(get(&url).await.body, "b") }
    );
    gw.write_config("name: t\nendpoints:\n  - path: /a\n    bakends: []\n");
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        get(&gw.url("/a")).await.body,
        "a",
        "old config keeps serving"
    );
    assert_eq!(get(&gw.url("/b")).await.body, "b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_under_steady_traffic_loses_no_request() {
    let a = Upstream::named("a").await;
    let gw = TestGateway::start(&single("/a", &a.target(), "")).await;
    let failures = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..4 {
        let (url, failures, done) = (gw.url("/a"), failures.clone(), done.clone());
        workers.push(tokio::spawn(async move {
            let client = http_client();
            let deadline = Instant::now() + Duration::from_secs(3);
            for _ in 0..300 {
                if Instant::now() > deadline {
                    break;
                }
                let req = Request::get(url.as_str()).body(Full::default()).unwrap();
                match client.request(req).await {
                    Ok(r) if r.status() == 200 => {}
                    _ => {
                        failures.fetch_add(1, Ordering::SeqCst);
                    }
                }
                done.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }
    for i in 0..6 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        gw.write_config(&format!(
            "name: t\nversion: v{i}\nendpoints:\n  - path: /a\n    description: reload {i}\n    backends:\n      - target: {}\n",
            a.target()
        ));
    }
    for worker in workers {
        worker.await.unwrap();
    }
    assert!(done.load(Ordering::SeqCst) > 100, "enough traffic was sent");
    assert_eq!(
        failures.load(Ordering::SeqCst),
        0,
        "no request lost across reloads"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_header_is_431() {
    let a = Upstream::named("a").await;
    let gw = TestGateway::start(&single("/a", &a.target(), "")).await;
    let big = "x".repeat(100 * 1024);
    let mut stream = TcpStream::connect(gw.addr).await.unwrap();
    let request = format!("GET /a HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n");
    let _ = stream.write_all(request.as_bytes()).await;
    let head = read_head(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 431"), "{head}");
    assert_eq!(a.hits(), 0);
}

async fn read_head(stream: &mut TcpStream) -> String {
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
        .await
        .expect("answer within 5 s")
        .unwrap_or(0);
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggling_attempts_are_rejected() {
    let paths = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let record = paths.clone();
    let upstream = Upstream::start(move |req: Request<Incoming>| {
        record.lock().unwrap().push(req.uri().path().to_owned());
        async { Response::new(text("ok")) }
    })
    .await;
    let gw = TestGateway::start(&single("/*", &upstream.target(), "")).await;
    // Ambiguous framing that hyper refuses outright.
    let rejected = [
        "POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 40\r\n\r\nabcd",
        "POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
        "POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
        "POST /a HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    ];
    for attempt in rejected {
        let mut stream = TcpStream::connect(gw.addr).await.unwrap();
        stream.write_all(attempt.as_bytes()).await.unwrap();
        let head = read_head(&mut stream).await;
        assert!(head.starts_with("HTTP/1.1 400"), "{attempt:?} -> {head:?}");
    }
    assert!(
        paths.lock().unwrap().is_empty(),
        "nothing reached the upstream"
    );
    // Content-Length with Transfer-Encoding: framing follows Transfer-Encoding and the
    // connection is closed after the response (RFC 9112 6.3), so the request hidden in the
    // body is never parsed as a second request.
    let mut stream = TcpStream::connect(gw.addr).await.unwrap();
    let attempt = "POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n";
    stream.write_all(attempt.as_bytes()).await.unwrap();
    let mut all = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut all))
        .await
        .expect("the gateway closes the connection")
        .unwrap();
    let all = String::from_utf8_lossy(&all);
    assert_eq!(
        all.matches("HTTP/1.1 ").count(),
        1,
        "one response only: {all}"
    );
    assert!(
        all.to_ascii_lowercase().contains("connection: close"),
        "{all}"
    );
    assert_eq!(
        *paths.lock().unwrap(),
        vec!["/a".to_owned()],
        "the smuggled request never reached the upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_header_senders_are_cut_off() {
    let a = Upstream::named("a").await;
    let gw = TestGateway::start_with(
        &single("/a", &a.target(), ""),
        &["--header-read-timeout", "300ms"],
    )
    .await
    .unwrap();
    let mut stream = TcpStream::connect(gw.addr).await.unwrap();
    stream
        .write_all(b"GET /a HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let start = Instant::now();
    let mut closed = false;
    for _ in 0..30 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if stream.write_all(b"X-Slow: 1\r\n").await.is_err() {
            closed = true;
            break;
        }
        let mut buf = [0u8; 512];
        if let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_millis(1), stream.read(&mut buf)).await
        {
            closed = true;
            let head = String::from_utf8_lossy(&buf[..n]).into_owned();
            assert!(n == 0 || head.starts_with("HTTP/1.1 408"), "{head}");
            break;
        }
    }
    assert!(closed, "connection was cut off");
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(a.hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_bodies_are_replayed_on_retry() {
    let failing = status_upstream(503, "failing").await;
    let echo = Upstream::start(|req: Request<Incoming>| async move {
        let body = req.into_body().collect().await.unwrap().to_bytes();
        Response::new(text(body))
    })
    .await;
    let yaml = format!(
        "name: t\nendpoints:\n  - path: /post\n    selector: wrr\n    retry:\n      attempts: 2\n      conditions:\n        - byStatusCode: \"503\"\n    backends:\n      - target: {}\n      - target: {}\n",
        failing.target(),
        echo.target()
    );
    let gw = TestGateway::start(&yaml).await;
    for i in 0..4 {
        let payload = format!("payload {i}");
        let reply = send(
            Request::post(gw.url("/post"))
                .body(Full::new(Bytes::from(payload.clone())))
                .unwrap(),
        )
        .await;
        assert_eq!((reply.status, reply.body), (200, payload));
    }
    assert!(failing.hits() >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_endpoints_speak_h2c_to_the_upstream() {
    let upstream = Upstream::start(|req: Request<Incoming>| async move {
        let version = format!("{:?}", req.version());
        let te = req
            .headers()
            .get("te")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        Response::builder()
            .header("content-type", "application/grpc")
            .header("x-seen-version", version)
            .header("x-seen-te", te)
            .header("grpc-status", "0")
            .body(text(""))
            .unwrap()
    })
    .await;
    let gw = TestGateway::start(&single(
        "/helloworld.Greeter/*",
        &upstream.target(),
        "    protocol: GRPC\n",
    ))
    .await;
    let reply = send(
        Request::post(gw.url("/helloworld.Greeter/SayHello"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(Full::new(Bytes::from_static(b"\0\0\0\0\0")))
            .unwrap(),
    )
    .await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(
        reply.header("x-seen-version"),
        "HTTP/2.0",
        "h2c to the upstream"
    );
    assert_eq!(
        reply.header("x-seen-te"),
        "trailers",
        "gRPC's TE: trailers survives"
    );
    assert_eq!(reply.header("grpc-status"), "0");
}

//! Middlewares that change or serve what passes, through the real gateway and real
//! upstreams: `rewrite` (paths, hosts, headers), `transform` (streaming and accumulated
//! bodies) and `cache`.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use http::{Request, Response};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tests::config::{middleware, with_middlewares};
use tests::harness::{TestGateway, Upstream, UpstreamBody, get, get_with, text};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewrite_path_host_and_headers() {
    let upstream = Upstream::reporting("ok", &["host", "x-order", "x-secret"]).await;
    let rewrite = middleware(
        "rewrite",
        "{stripPrefix: /api, hostRewrite: backend.internal, requestHeadersRewrite: {set: {x-order: set}, remove: [x-secret]}, responseHeadersRewrite: {set: {server: gateway}, remove: [x-upstream]}}",
    );
    let gw = TestGateway::start(&with_middlewares("/api/*", &upstream.target(), &rewrite)).await;
    let reply = get_with(
        &gw.url("/api/users?id=7"),
        &[("x-order", "client"), ("x-secret", "s")],
    )
    .await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("x-seen-path"), "/users?id=7");
    assert_eq!(reply.header("x-seen-x-order"), "set");
    assert_eq!(
        reply.header("x-seen-x-secret"),
        "-",
        "request header removed"
    );
    assert_eq!(reply.header("server"), "gateway");
    assert_eq!(reply.header("x-seen-host"), "backend.internal");
    assert!(
        !reply.headers.contains_key("x-upstream"),
        "response header removed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transform_streams_uppercased_chunks_before_the_upstream_finishes() {
    let finished = Arc::new(AtomicBool::new(false));
    let upstream_finished = finished.clone();
    let upstream = Upstream::start(move |_req: Request<Incoming>| {
        let finished = upstream_finished.clone();
        async move {
            let chunks = futures_util::stream::iter(["alpha ", "beta ", "gamma"])
                .enumerate()
                .then(move |(index, chunk)| {
                    let finished = finished.clone();
                    async move {
                        if index > 0 {
                            tokio::time::sleep(Duration::from_millis(300)).await;
                        }
                        if index == 2 {
                            finished.store(true, Ordering::SeqCst);
                        }
                        Ok::<_, Infallible>(Frame::data(Bytes::from(chunk)))
                    }
                });
            let body: UpstreamBody = StreamBody::new(chunks).boxed_unsync();
            Response::new(body)
        }
    })
    .await;
    let transform = middleware("transform", "{response: {uppercase: true}}");
    let gw = TestGateway::start(&with_middlewares("/stream", &upstream.target(), &transform)).await;

    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let start = Instant::now();
    let response = client
        .request(
            Request::get(gw.url("/stream"))
                .body(Full::default())
                .expect("request"),
        )
        .await
        .expect("response");
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let mut received = Vec::new();
    let mut first_at = None;
    while let Some(frame) = tokio::time::timeout(Duration::from_secs(5), body.frame())
        .await
        .expect("in time")
    {
        if let Ok(data) = frame.expect("frame").into_data() {
            if first_at.is_none() {
                first_at = Some(start.elapsed());
                assert!(
                    !finished.load(Ordering::SeqCst),
                    "first chunk arrived before the upstream finished"
                );
            }
            received.extend_from_slice(&data);
        }
    }
    assert_eq!(String::from_utf8_lossy(&received), "ALPHA BETA GAMMA");
    let first_at = first_at.expect("some data");
    assert!(
        start.elapsed() - first_at >= Duration::from_millis(450),
        "chunks streamed, not buffered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transform_accumulate_replaces_text() {
    let upstream = Upstream::named("the cat sat").await;
    let transform = middleware(
        "transform",
        "{response: {mode: accumulate, replace: [{from: cat, to: tiger}], limit: 1024}}",
    );
    let gw = TestGateway::start(&with_middlewares("/acc", &upstream.target(), &transform)).await;
    let reply = get(&gw.url("/acc")).await;
    assert_eq!((reply.status, reply.body.as_str()), (200, "the tiger sat"));
    assert_eq!(reply.header("content-length"), "13");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_hits_misses_expiry_vary_and_no_store() {
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    let upstream = Upstream::start(move |req: Request<Incoming>| {
        let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
        async move {
            let mut response = Response::builder();
            let language = req
                .headers()
                .get("accept-language")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned();
            match req.uri().path() {
                "/vary" => response = response.header("vary", "Accept-Language"),
                "/nostore" => response = response.header("cache-control", "no-store"),
                _ => {}
            }
            response
                .body(text(format!("{n} {language}")))
                .expect("response")
        }
    })
    .await;
    let cache = middleware("cache", "{defaultTtl: 400ms, maxBytes: \"1048576\"}");
    let gw = TestGateway::start(&with_middlewares("/*", &upstream.target(), &cache)).await;

    let miss = get(&gw.url("/plain")).await;
    assert_eq!(
        (miss.status, miss.header("x-cache"), miss.body.as_str()),
        (200, "MISS", "1 ")
    );
    let hit = get(&gw.url("/plain")).await;
    assert_eq!(
        (hit.header("x-cache"), hit.body.as_str(), hit.header("age")),
        ("HIT", "1 ", "0")
    );
    assert_eq!(upstream.hits(), 1, "a hit does not touch the upstream");
    tokio::time::sleep(Duration::from_millis(450)).await;
    let expired = get(&gw.url("/plain")).await;
    assert_eq!(
        (expired.header("x-cache"), expired.body.as_str()),
        ("MISS", "2 ")
    );

    let en = [("accept-language", "en")];
    let fr = [("accept-language", "fr")];
    assert_eq!(
        get_with(&gw.url("/vary"), &en).await.header("x-cache"),
        "MISS"
    );
    assert_eq!(
        get_with(&gw.url("/vary"), &fr).await.header("x-cache"),
        "MISS"
    );
    let en_hit = get_with(&gw.url("/vary"), &en).await;
    let fr_hit = get_with(&gw.url("/vary"), &fr).await;
    assert_eq!(
        (en_hit.header("x-cache"), en_hit.body.as_str()),
        ("HIT", "3 en")
    );
    assert_eq!(
        (fr_hit.header("x-cache"), fr_hit.body.as_str()),
        ("HIT", "4 fr")
    );

    get(&gw.url("/nostore")).await;
    assert_eq!(get(&gw.url("/nostore")).await.header("x-cache"), "MISS");
    assert_eq!(upstream.hits(), 6);
}

//! End-to-end tests of the first half of the middleware catalogue (logging, cors, rewrite,
//! ratelimit, bbr, validation, transform) through the real gateway and real upstreams.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use http::{Request, Response};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tests::harness::{TestGateway, Upstream, UpstreamBody, eventually, get, get_with, send, text};

/// A gateway config with one endpoint `path` to `target` and the given middleware YAML
/// (already indented as list items under `middlewares:`).
fn config(path: &str, target: &str, middlewares: &str) -> String {
    format!(
        "name: part1\nendpoints:\n  - path: {path}\n    timeout: 5s\n    backends:\n      - target: {target}\n    middlewares:\n{middlewares}"
    )
}

/// Joins every value of header `name`.
fn all_values(headers: &http::HeaderMap, name: &str) -> String {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect::<Vec<_>>()
        .join(",")
}

/// An upstream reporting the `x-order` values it received in `x-seen-order`.
async fn order_upstream() -> Upstream {
    Upstream::start(|req: Request<Incoming>| async move {
        Response::builder()
            .header("x-internal", "upstream detail")
            .header("x-seen-order", all_values(req.headers(), "x-order"))
            .header(
                "x-seen-host",
                req.headers()
                    .get("host")
                    .cloned()
                    .unwrap_or(http::HeaderValue::from_static("")),
            )
            .header(
                "x-seen-path",
                req.uri().path_and_query().map_or("", |p| p.as_str()),
            )
            .body(text("ok"))
            .expect("response")
    })
    .await
}

async fn metrics(gw: &TestGateway) -> String {
    get(&gw.url("/metrics")).await.body
}

fn metric_value(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|line| line.starts_with(prefix))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_pass_in_list_order_and_responses_in_reverse() {
    let upstream = order_upstream().await;
    let rewrite = |n: &str| {
        format!(
            "      - name: rewrite\n        options:\n          requestHeadersRewrite: {{add: {{x-order: \"{n}\"}}}}\n          responseHeadersRewrite: {{add: {{x-response-order: \"{n}\"}}}}\n"
        )
    };
    let mut middlewares = String::from("      - name: logging\n");
    middlewares.push_str(&rewrite("1"));
    middlewares.push_str(&rewrite("2"));
    middlewares.push_str(&rewrite("3"));
    // A global middleware wraps the endpoint's: first on the way in, last on the way out.
    let yaml = format!(
        "middlewares:\n  - name: rewrite\n    options:\n      requestHeadersRewrite: {{add: {{x-order: global}}}}\n      responseHeadersRewrite: {{add: {{x-response-order: global}}}}\n{}",
        config("/order/*", &upstream.target(), &middlewares)
    );
    let gw = TestGateway::start(&yaml).await;
    let reply = get(&gw.url("/order/x")).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.header("x-seen-order"), "global,1,2,3");
    assert_eq!(
        all_values(&reply.headers, "x-response-order"),
        "3,2,1,global"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewrite_path_host_and_headers() {
    let upstream = order_upstream().await;
    let middlewares = "      - name: rewrite\n        options:\n          stripPrefix: /api\n          hostRewrite: backend.internal\n          requestHeadersRewrite: {set: {x-order: set}, remove: [x-secret]}\n          responseHeadersRewrite: {set: {server: gateway}, remove: [x-internal]}\n";
    let gw = TestGateway::start(&config("/api/*", &upstream.target(), middlewares)).await;
    let reply = get_with(
        &gw.url("/api/users?id=7"),
        &[("x-order", "client"), ("x-secret", "s")],
    )
    .await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("x-seen-path"), "/users?id=7");
    assert_eq!(reply.header("x-seen-order"), "set");
    assert_eq!(reply.header("server"), "gateway");
    assert_eq!(reply.header("x-seen-host"), "backend.internal");
    assert!(
        !reply.headers.contains_key("x-internal"),
        "response header removed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_preflight_actual_and_refused_origins() {
    let upstream = Upstream::named("cors").await;
    let middlewares = "      - name: cors\n        options:\n          allowOrigins: [\"*.example.com\"]\n          allowMethods: [GET, PATCH]\n          allowHeaders: [x-token]\n          exposeHeaders: [x-upstream]\n          maxAge: 1m\n";
    let gw = TestGateway::start(&config("/cors", &upstream.target(), middlewares)).await;

    let preflight = send(
        Request::options(gw.url("/cors"))
            .header("origin", "https://app.example.com")
            .header("access-control-request-method", "PATCH")
            .body(Full::default())
            .expect("request"),
    )
    .await;
    assert_eq!(preflight.status, 204);
    assert_eq!(
        preflight.header("access-control-allow-origin"),
        "https://app.example.com"
    );
    assert_eq!(
        preflight.header("access-control-allow-methods"),
        "GET,PATCH"
    );
    assert_eq!(preflight.header("access-control-allow-headers"), "X-Token");
    assert_eq!(preflight.header("access-control-max-age"), "60");
    assert_eq!(preflight.header("access-control-allow-credentials"), "true");
    assert_eq!(upstream.hits(), 0, "preflight answered by the gateway");

    let actual = get_with(&gw.url("/cors"), &[("origin", "https://app.example.com")]).await;
    assert_eq!((actual.status, actual.body.as_str()), (200, "cors"));
    assert_eq!(
        actual.header("access-control-allow-origin"),
        "https://app.example.com"
    );
    assert_eq!(actual.header("access-control-expose-headers"), "X-Upstream");
    assert!(all_values(&actual.headers, "vary").contains("Origin"));
    assert_eq!(upstream.hits(), 1);

    let refused = get_with(&gw.url("/cors"), &[("origin", "https://evil.com")]).await;
    assert_eq!(refused.status, 403);
    assert_eq!(
        upstream.hits(),
        1,
        "refused origin never reaches the upstream"
    );

    let plain = get(&gw.url("/cors")).await;
    assert_eq!(plain.status, 200);
    assert!(!plain.headers.contains_key("access-control-allow-origin"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ratelimit_is_exact_over_a_window() {
    let upstream = Upstream::named("limited").await;
    let middlewares =
        "      - name: ratelimit\n        options: {key: global, max: 3, window: 3s}\n";
    let gw = TestGateway::start(&config("/limited", &upstream.target(), middlewares)).await;
    let mut statuses = Vec::new();
    let mut last = None;
    for _ in 0..6 {
        let reply = get(&gw.url("/limited")).await;
        statuses.push(reply.status);
        last = Some(reply);
    }
    assert_eq!(statuses, [200, 200, 200, 429, 429, 429]);
    let denied = last.expect("replies");
    assert_eq!(denied.header("retry-after"), "1");
    assert_eq!(denied.header("ratelimit-limit"), "3");
    assert_eq!(denied.header("ratelimit-remaining"), "0");
    assert_eq!(upstream.hits(), 3);

    // One token per second: after a little more than a second exactly one more passes.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(get(&gw.url("/limited")).await.status, 200);
    assert_eq!(get(&gw.url("/limited")).await.status, 429);
    assert_eq!(upstream.hits(), 4);

    let text = metrics(&gw).await;
    let denied = metric_value(
        &text,
        "gateway_middleware_denied_total{middleware=\"ratelimit\",path=\"/limited\",reason=\"rate_limited\"}",
    );
    assert_eq!(denied, Some(4.0), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ratelimit_per_client_header() {
    let upstream = Upstream::named("keyed").await;
    let middlewares = "      - name: ratelimit\n        options: {key: header, header: x-api-key, rate: 1, burst: 2}\n";
    let gw = TestGateway::start(&config("/keyed", &upstream.target(), middlewares)).await;
    let with = |key: &'static str| {
        let url = gw.url("/keyed");
        async move { get_with(&url, &[("x-api-key", key)]).await.status }
    };
    assert_eq!(
        [with("a").await, with("a").await, with("a").await],
        [200, 200, 429]
    );
    assert_eq!(with("b").await, 200, "another key has its own bucket");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bbr_sheds_when_the_upstream_queues() {
    // An upstream serving 2 requests at a time, 100 ms each: more queue up.
    let slots = Arc::new(tokio::sync::Semaphore::new(2));
    let upstream = Upstream::start(move |_req: Request<Incoming>| {
        let slots = slots.clone();
        async move {
            let _slot = slots.acquire().await.expect("semaphore");
            tokio::time::sleep(Duration::from_millis(100)).await;
            Response::new(text("ok"))
        }
    })
    .await;
    let middlewares =
        "      - name: bbr\n        options: {window: 1s, buckets: 10, minInFlight: 1}\n";
    let gw = TestGateway::start(&config("/busy", &upstream.target(), middlewares)).await;
    let burst = |n: usize| {
        let url = gw.url("/busy");
        async move {
            let calls = (0..n).map(|_| {
                let url = url.clone();
                async move { get(&url).await.status }
            });
            futures_util::future::join_all(calls).await
        }
    };
    // Light load: everything passes and teaches the limiter the normal latency.
    for _ in 0..4 {
        assert_eq!(burst(1).await, [200]);
    }
    // A burst well over the upstream's 2 slots is admitted (latency still normal)...
    let first = burst(12).await;
    assert!(first.iter().all(|s| *s == 200), "{first:?}");
    // ...and queues: latency climbs, so the next burst is shed down to the capacity seen.
    let second = burst(10).await;
    let shed = second.iter().filter(|s| **s == 503).count();
    let passed = second.iter().filter(|s| **s == 200).count();
    assert!(
        shed >= 4 && passed >= 1 && shed + passed == 10,
        "{second:?}"
    );
    let text = metrics(&gw).await;
    let counted = metric_value(
        &text,
        "gateway_middleware_denied_total{middleware=\"bbr\",path=\"/busy\",reason=\"shed\"}",
    );
    assert_eq!(counted, Some(shed as f64), "{text}");
}

/// A client that can send streaming (chunked) bodies.
async fn send_stream(url: &str, chunks: Vec<&'static str>) -> u16 {
    let client = Client::builder(TokioExecutor::new()).build_http();
    let stream = futures_util::stream::iter(chunks)
        .map(|chunk| Ok::<_, Infallible>(Frame::data(Bytes::from(chunk))));
    let request = Request::post(url)
        .header("x-request-id", "1")
        .header("content-type", "application/json")
        .body(StreamBody::new(stream).boxed_unsync())
        .expect("request");
    let response = tokio::time::timeout(Duration::from_secs(5), client.request(request))
        .await
        .expect("answer within 5 s")
        .expect("response");
    response.status().as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validation_allows_and_refuses() {
    let upstream = Upstream::start(|req: Request<Incoming>| async move {
        let body = req
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        Response::new(text(format!("read {}", body.len())))
    })
    .await;
    let middlewares = "      - name: validation\n        options:\n          maxBodyBytes: 16\n          requiredHeaders: [x-request-id]\n          requiredQuery: [v]\n          allowedContentTypes: [application/json]\n";
    let gw = TestGateway::start(&config("/valid", &upstream.target(), middlewares)).await;
    let post = |query: &str, headers: &[(&str, &str)], body: &'static str| {
        let mut request = Request::post(gw.url(&format!("/valid{query}")));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        send(request.body(Full::new(Bytes::from(body))).expect("request"))
    };
    let json = [("x-request-id", "1"), ("content-type", "application/json")];
    let ok = post("?v=1", &json, "{\"a\":1}").await;
    assert_eq!((ok.status, ok.body.as_str()), (200, "read 7"));

    let missing = post("?v=1", &[("content-type", "application/json")], "{}").await;
    assert_eq!(
        (missing.status, missing.body.as_str()),
        (400, "400 missing header x-request-id\n")
    );
    let no_query = post("", &json, "{}").await;
    assert_eq!(
        (no_query.status, no_query.body.as_str()),
        (400, "400 missing query parameter v\n")
    );
    let xml = post(
        "?v=1",
        &[("x-request-id", "1"), ("content-type", "text/xml")],
        "<a/>",
    )
    .await;
    assert_eq!(xml.status, 415);
    let large = post("?v=1", &json, "{\"a\":\"0123456789abcdef\"}").await;
    assert_eq!(large.status, 413);
    assert_eq!(
        upstream.hits(),
        1,
        "refused requests never reach the upstream"
    );

    // No Content-Length: the limit is enforced while the body streams.
    let url = gw.url("/valid?v=1");
    assert_eq!(
        send_stream(&url, vec!["{\"a\":", "\"0123456789", "abcdef\"}"]).await,
        413
    );
    assert_eq!(send_stream(&url, vec!["{\"a\":", "1}"]).await, 200);
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
    let middlewares =
        "      - name: transform\n        options:\n          response: {uppercase: true}\n";
    let gw = TestGateway::start(&config("/stream", &upstream.target(), middlewares)).await;

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
    let middlewares = "      - name: transform\n        options:\n          response: {mode: accumulate, replace: [{from: cat, to: tiger}], limit: 1024}\n";
    let gw = TestGateway::start(&config("/acc", &upstream.target(), middlewares)).await;
    let reply = get(&gw.url("/acc")).await;
    assert_eq!((reply.status, reply.body.as_str()), (200, "the tiger sat"));
    assert_eq!(reply.header("content-length"), "13");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_options_fail_start_and_reload_keeps_the_old_config() {
    let upstream = Upstream::named("kept").await;
    // At start-up: the gateway refuses to start and names endpoint, middleware and field.
    let bad = config(
        "/conf",
        &upstream.target(),
        "      - name: ratelimit\n        options: {rate: 10, burst: lots}\n",
    );
    let err = TestGateway::start_with(&bad, &[])
        .await
        .err()
        .expect("start fails");
    assert!(
        err.contains("endpoint * /conf: middleware ratelimit: options.burst: invalid value"),
        "{err}"
    );

    // On reload: the running config keeps serving.
    let version = |v: &str, extra: &str| {
        config(
            "/conf",
            &upstream.target(),
            &format!(
                "      - name: rewrite\n        options:\n          responseHeadersRewrite: {{set: {{x-version: {v}}}}}\n{extra}"
            ),
        )
    };
    let gw = TestGateway::start(&version("one", "")).await;
    assert_eq!(get(&gw.url("/conf")).await.header("x-version"), "one");
    gw.write_config(&version("two", "          stripPrefx: /c\n"));
    let failure = "gateway_middleware_build_failures_total{middleware=\"rewrite\"}";
    let failed = eventually(Duration::from_secs(5), || async {
        metric_value(&metrics(&gw).await, failure).is_some_and(|n| n >= 1.0)
    })
    .await;
    assert!(failed, "the bad reload was attempted");
    let reply = get(&gw.url("/conf")).await;
    assert_eq!(
        (reply.status, reply.header("x-version")),
        (200, "one"),
        "old config still serving"
    );

    gw.write_config(&version("three", ""));
    let applied = eventually(Duration::from_secs(5), || async {
        get(&gw.url("/conf")).await.header("x-version") == "three"
    })
    .await;
    assert!(applied, "a fixed config is applied");
}

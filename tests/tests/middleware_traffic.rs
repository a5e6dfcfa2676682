//! Traffic-shaping middlewares through the real gateway and real upstreams: `ratelimit`,
//! `bbr` and `circuitbreaker` (error threshold, backup service, success ratio).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use tests::config::{middleware, with_middlewares};
use tests::harness::{TestGateway, Upstream, get, get_with, text};
use tests::metrics;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ratelimit_is_exact_over_a_window() {
    let upstream = Upstream::named("limited").await;
    let limit = middleware("ratelimit", "{key: global, max: 3, window: 3s}");
    let gw = TestGateway::start(&with_middlewares("/limited", &upstream.target(), &limit)).await;
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

    let page = gw.metrics().await;
    let denied = metrics::denied("ratelimit", "/limited", "rate_limited");
    assert_eq!(metrics::value(&page, &denied), Some(4.0), "{page}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ratelimit_per_client_header() {
    let upstream = Upstream::named("keyed").await;
    let limit = middleware(
        "ratelimit",
        "{key: header, header: x-api-key, rate: 1, burst: 2}",
    );
    let gw = TestGateway::start(&with_middlewares("/keyed", &upstream.target(), &limit)).await;
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
    let bbr = middleware("bbr", "{window: 1s, buckets: 10, minInFlight: 1}");
    let gw = TestGateway::start(&with_middlewares("/busy", &upstream.target(), &bbr)).await;
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
    let page = gw.metrics().await;
    let counted = metrics::value(&page, &metrics::denied("bbr", "/busy", "shed"));
    assert_eq!(counted, Some(shed as f64), "{page}");
}

/// An upstream answering `500` while `failing` is set, `200 ok` otherwise.
async fn flaky_upstream(failing: Arc<AtomicBool>) -> Upstream {
    Upstream::start(move |_req: Request<Incoming>| {
        let failing = failing.clone();
        async move {
            let status = if failing.load(Ordering::SeqCst) {
                StatusCode::INTERNAL_SERVER_ERROR
            } else {
                StatusCode::OK
            };
            Response::builder()
                .status(status)
                .body(text("ok"))
                .expect("response")
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breaker_opens_answers_without_the_upstream_and_recovers() {
    let failing = Arc::new(AtomicBool::new(true));
    let upstream = flaky_upstream(failing.clone()).await;
    let gw = TestGateway::start(&format!(
        r#"
endpoints:
  - path: /cb
    backends: [{{target: "{}"}}]
    middlewares:
      - name: circuitbreaker
        options:
          errorThreshold: {{errorThresholdPercentage: 50, request: 5, resetTimeout: 300ms}}
          responseData:
            statusCode: 503
            header: [{{key: x-breaker, value: [open]}}]
            bodyText: breaker open
"#,
        upstream.target()
    ))
    .await;
    for _ in 0..5 {
        assert_eq!(get(&gw.url("/cb")).await.status, 500);
    }
    for _ in 0..10 {
        let reply = get(&gw.url("/cb")).await;
        assert_eq!((reply.status, reply.body.as_str()), (503, "breaker open"));
        assert_eq!(reply.header("x-breaker"), "open");
    }
    assert_eq!(
        upstream.hits(),
        5,
        "an open breaker keeps requests off the upstream"
    );
    let page = gw.metrics().await;
    let denied = metrics::denied("circuitbreaker", "/cb", "breaker_open");
    assert_eq!(metrics::value(&page, &denied), Some(10.0), "{page}");

    failing.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(350)).await;
    let probe = get(&gw.url("/cb")).await;
    assert_eq!(
        (probe.status, probe.body.as_str()),
        (200, "ok"),
        "the half-open probe goes through"
    );
    for _ in 0..5 {
        assert_eq!(get(&gw.url("/cb")).await.status, 200);
    }
    assert_eq!(upstream.hits(), 11);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breaker_default_503_and_backup_service() {
    let failing = Arc::new(AtomicBool::new(true));
    let primary = flaky_upstream(failing).await;
    let backup = Upstream::named("backup").await;
    let gw = TestGateway::start(&format!(
        r#"
endpoints:
  - path: /default
    backends: [{{target: "{primary}"}}]
    middlewares:
      - name: circuitbreaker
        options: {{errorThreshold: {{request: 2, resetTimeout: 10s}}}}
  - path: /backup
    backends: [{{target: "{primary}"}}]
    middlewares:
      - name: circuitbreaker
        options:
          '@type': type.googleapis.com/gateway.middleware.circuitbreaker.v1.CircuitBreaker
          ratio: "0"
          backupService: {{"endpoint": {{"backends": [{{"target": "{backup}"}}]}}}}
"#,
        primary = primary.target(),
        backup = backup.target()
    ))
    .await;
    assert_eq!(get(&gw.url("/default")).await.status, 500);
    assert_eq!(get(&gw.url("/default")).await.status, 500);
    let open = get(&gw.url("/default")).await;
    assert_eq!(open.status, 503);
    assert!(open.body.contains("circuit breaker"), "{}", open.body);
    assert_eq!(primary.hits(), 2);

    let reply = get(&gw.url("/backup?q=1")).await;
    assert_eq!((reply.status, reply.body.as_str()), (200, "backup"));
    assert_eq!(reply.header("x-seen-path"), "/backup?q=1");
    assert_eq!((primary.hits(), backup.hits()), (2, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn success_ratio_throttles_a_failing_upstream() {
    let upstream = flaky_upstream(Arc::new(AtomicBool::new(true))).await;
    let gw = TestGateway::start(&format!(
        r#"
endpoints:
  - path: /sre
    backends: [{{target: "{}"}}]
    middlewares:
      - name: circuitbreaker
        options:
          successRatio: {{success: 0.6, request: "10", bucket: "10", window: 3s}}
"#,
        upstream.target()
    ))
    .await;
    let (mut failed, mut rejected) = (0, 0);
    for _ in 0..60 {
        match get(&gw.url("/sre")).await.status {
            500 => failed += 1,
            503 => rejected += 1,
            other => panic!("unexpected status {other}"),
        }
    }
    // The first 10 reach the upstream; after that each passes with probability 1/(n+1).
    assert_eq!(failed, upstream.hits());
    assert!((10..35).contains(&failed), "{failed} reached the upstream");
    assert!(rejected >= 25, "only {rejected} of 60 were throttled");
}

//! Limits kept in a real Redis (`redis-server` started by the test): what happens while it
//! is gone (`failureMode: open` serves on local buckets, `closed` answers 503), and the
//! recovery once it is back on the same port.

use std::time::{Duration, Instant};

use tests::assert_eventually;
use tests::config::{endpoint, gateway, middleware, middlewares};
use tests::eventually::expect_eq;
use tests::harness::{TestGateway, Upstream, get};
use tests::metrics;
use tests::redis::RedisServer;

fn limited(path: &str, target: &str, options: &str) -> String {
    endpoint(
        path,
        target,
        &format!(
            "    timeout: 5s\n{}",
            middlewares(&middleware("ratelimit", options))
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_falls_back_by_failure_mode_and_recovers() {
    let mut redis = RedisServer::start();
    let upstream = Upstream::named("limited").await;
    let yaml = gateway(&[
        limited(
            "/open",
            &upstream.target(),
            "{key: global, rate: 1000, failureMode: open}",
        ),
        limited(
            "/closed",
            &upstream.target(),
            "{key: global, rate: 1000, failureMode: closed, redisTimeout: 80ms}",
        ),
    ]);
    let gw = TestGateway::start_with(&yaml, &["--redis", &redis.dsn()])
        .await
        .expect("gateway starts");
    let up = format!(
        "go_gateway_middleware_store_up{{store=\"redis\",target=\"127.0.0.1:{}/0\"}}",
        redis.port()
    );
    assert_eq!(get(&gw.url("/open")).await.status, 200);
    assert_eq!(get(&gw.url("/closed")).await.status, 200);
    assert_eq!(metrics::value(&gw.metrics().await, &up), Some(1.0));
    let keys = redis.command(&["KEYS", "gateway:ratelimit:*"]);
    assert!(
        keys.contains("/open") && keys.contains("/closed"),
        "keys: {keys:?}"
    );

    redis.kill();
    assert_eventually!(
        Duration::from_secs(5),
        "closed mode answers 503 while Redis is down",
        || async { expect_eq(get(&gw.url("/closed")).await.status, 503) }
    );
    // Open mode keeps serving on the local bucket, and nobody waits for the dead Redis.
    for _ in 0..20 {
        let started = Instant::now();
        assert_eq!(get(&gw.url("/open")).await.status, 200);
        let closed = get(&gw.url("/closed")).await;
        assert_eq!(closed.status, 503, "{}", closed.body);
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "requests do not stall on a dead Redis: {:?}",
            started.elapsed()
        );
    }
    let page = gw.metrics().await;
    assert_eq!(metrics::value(&page, &up), Some(0.0), "{page}");
    let unavailable = metrics::denied("ratelimit", "/closed", "redis_unavailable");
    assert!(
        metrics::value(&page, &unavailable).is_some_and(|count| count >= 20.0),
        "{page}"
    );

    tokio::task::block_in_place(|| redis.restart());
    assert_eventually!(
        Duration::from_secs(10),
        "closed mode answers 200 once Redis is back",
        || async { expect_eq(get(&gw.url("/closed")).await.status, 200) }
    );
    assert_eq!(get(&gw.url("/open")).await.status, 200);
    assert_eq!(metrics::value(&gw.metrics().await, &up), Some(1.0));
    // Counting happens in Redis again (the restarted server started empty).
    let keys = redis.command(&["KEYS", "gateway:ratelimit:*"]);
    assert!(
        keys.contains("/open") && keys.contains("/closed"),
        "keys: {keys:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_redis_costs_at_most_the_timeout_then_nothing() {
    let redis = RedisServer::start();
    let upstream = Upstream::named("limited").await;
    let yaml = gateway(&[limited(
        "/open",
        &upstream.target(),
        "{key: global, rate: 1000, redisTimeout: 50ms}",
    )]);
    let gw = TestGateway::start_with(&yaml, &["--redis", &redis.dsn()])
        .await
        .expect("gateway starts");
    let up = format!(
        "go_gateway_middleware_store_up{{store=\"redis\",target=\"127.0.0.1:{}/0\"}}",
        redis.port()
    );
    assert_eq!(get(&gw.url("/open")).await.status, 200);
    // Frozen, Redis keeps its connections open and never answers: the first request waits
    // for redisTimeout, then Redis counts as down and nobody waits for it.
    redis.pause();
    for _ in 0..10 {
        let started = Instant::now();
        assert_eq!(get(&gw.url("/open")).await.status, 200);
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "a hung Redis stalls requests: {:?}",
            started.elapsed()
        );
    }
    assert_eq!(metrics::value(&gw.metrics().await, &up), Some(0.0));
    redis.resume();
    assert_eventually!(
        Duration::from_secs(10),
        "Redis counts as up once it answers again",
        || async { expect_eq(metrics::value(&gw.metrics().await, &up), Some(1.0)) }
    );
    assert_eq!(get(&gw.url("/open")).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redis_option_wins_over_the_flag_and_headers_match_the_local_limiter() {
    let redis = RedisServer::start();
    let upstream = Upstream::named("limited").await;
    let options = format!(
        "{{key: global, max: 3, window: 3s, redis: \"{}\"}}",
        redis.dsn()
    );
    let yaml = gateway(&[limited("/limited", &upstream.target(), &options)]);
    // The flag names a Redis nobody listens on; the option's wins.
    let unused = format!("redis://127.0.0.1:{}", tests::harness::unused_port());
    let gw = TestGateway::start_with(&yaml, &["--redis", &unused])
        .await
        .expect("gateway starts");
    let mut replies = Vec::new();
    for _ in 0..5 {
        replies.push(get(&gw.url("/limited")).await);
    }
    let statuses: Vec<u16> = replies.iter().map(|reply| reply.status).collect();
    assert_eq!(statuses, [200, 200, 200, 429, 429]);
    assert_eq!(replies[0].header("ratelimit-limit"), "3");
    assert_eq!(replies[0].header("ratelimit-remaining"), "2");
    assert_eq!(replies[0].header("ratelimit-reset"), "1");
    assert_eq!(replies[2].header("ratelimit-remaining"), "0");
    let denied = &replies[4];
    assert_eq!(denied.header("retry-after"), "1");
    assert_eq!(denied.header("ratelimit-remaining"), "0");
    assert_eq!(denied.header("ratelimit-reset"), "3");
    assert_eq!(upstream.hits(), 3);
    let page = gw.metrics().await;
    let denied = metrics::denied("ratelimit", "/limited", "rate_limited");
    assert_eq!(metrics::value(&page, &denied), Some(2.0), "{page}");
}

fn spiky(path: &str, target: &str, options: &str) -> String {
    endpoint(
        path,
        target,
        &format!(
            "    timeout: 5s\n{}",
            middlewares(&middleware("spikearrest", options))
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spike_arrest_through_redis_spaces_requests_across_two_gateways() {
    let redis = RedisServer::start();
    let upstream = Upstream::named("spiky").await;
    let yaml = gateway(&[
        spiky("/smooth", &upstream.target(), "{allow: 10}"),
        spiky("/queued", &upstream.target(), "{allow: 10, bufferSize: 3}"),
    ]);
    let flags = ["--redis", &redis.dsn()];
    let a = TestGateway::start_with(&yaml, &flags)
        .await
        .expect("starts");
    let b = TestGateway::start_with(&yaml, &flags)
        .await
        .expect("starts");

    // Both gateways asked in turn every 20 ms for 1.5 s: one admission per 100 ms overall.
    let started = Instant::now();
    let mut admitted = Vec::new();
    for round in 0..75u32 {
        let gw = if round % 2 == 0 { &a } else { &b };
        let reply = get(&gw.url("/smooth")).await;
        match reply.status {
            200 => admitted.push(started.elapsed()),
            429 => assert_eq!(reply.header("retry-after"), "1"),
            other => panic!("status {other}"),
        }
        tokio::time::sleep_until((started + Duration::from_millis(20) * (round + 1)).into()).await;
    }
    let window = started.elapsed().as_secs_f64();
    eprintln!(
        "spike arrest 10/s across two gateways: {} admitted in {window:.2}s at {admitted:?}",
        admitted.len()
    );
    let expected = window * 10.0;
    assert!(
        (admitted.len() as f64 - expected).abs() <= 3.0,
        "admitted {}, want about {expected:.0}",
        admitted.len()
    );
    for pair in admitted.windows(2) {
        assert!(
            pair[1] - pair[0] >= Duration::from_millis(60),
            "admissions closer than one interval: {admitted:?}"
        );
    }

    // Four at once with bufferSize 3: none refused, the last one waited about 3 intervals.
    let started = Instant::now();
    let replies = futures_util::future::join_all((0..4).map(|n| {
        let url = if n % 2 == 0 {
            a.url("/queued")
        } else {
            b.url("/queued")
        };
        async move {
            let reply = get(&url).await;
            (reply.status, started.elapsed())
        }
    }))
    .await;
    assert!(
        replies.iter().all(|(status, _)| *status == 200),
        "{replies:?}"
    );
    let last = replies.iter().map(|(_, at)| *at).max().unwrap_or_default();
    assert!(last >= Duration::from_millis(250), "{replies:?}");
    // A fifth at once finds the buffer full.
    let started = Instant::now();
    let replies =
        futures_util::future::join_all((0..5).map(|_| get_status(a.url("/queued")))).await;
    let refused = replies.iter().filter(|status| **status == 429).count();
    assert!(refused >= 1, "{replies:?} after {:?}", started.elapsed());
}

async fn get_status(url: String) -> u16 {
    get(&url).await.status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quota_in_redis_is_spent_across_two_gateways() {
    let redis = RedisServer::start();
    let upstream = Upstream::named("metered").await;
    let yaml = gateway(&[endpoint(
        "/metered",
        &upstream.target(),
        &format!(
            "    timeout: 5s\n{}",
            middlewares(&middleware(
                "quota",
                "{allow: 5, timeUnit: hour, key: apikey}"
            ))
        ),
    )]);
    let flags = ["--redis", &redis.dsn()];
    let a = TestGateway::start_with(&yaml, &flags)
        .await
        .expect("starts");
    let b = TestGateway::start_with(&yaml, &flags)
        .await
        .expect("starts");
    let mut seen = Vec::new();
    for n in 0..7 {
        let gw = if n % 2 == 0 { &a } else { &b };
        let reply = tests::harness::get_with(&gw.url("/metered"), &[("x-api-key", "team-a")]).await;
        seen.push((
            reply.status,
            reply.header("x-quota-limit").to_owned(),
            reply.header("x-quota-remaining").to_owned(),
        ));
        let reset: u64 = reply
            .header("x-quota-reset")
            .parse()
            .expect("reset seconds");
        assert!((3595..=3600).contains(&reset), "reset {reset}");
    }
    let expected: Vec<(u16, String, String)> = [
        (200, "4"),
        (200, "3"),
        (200, "2"),
        (200, "1"),
        (200, "0"),
        (429, "0"),
        (429, "0"),
    ]
    .into_iter()
    .map(|(status, remaining)| (status, "5".to_owned(), remaining.to_owned()))
    .collect();
    assert_eq!(seen, expected);
    assert_eq!(upstream.hits(), 5);
    // Another key has its own quota; the key is stored as a digest, never in clear.
    let other = tests::harness::get_with(&b.url("/metered"), &[("x-api-key", "team-b")]).await;
    assert_eq!(other.status, 200);
    let keys = redis.command(&["KEYS", "gateway:quota:*"]);
    assert_eq!(keys.lines().count(), 2, "{keys}");
    assert!(!keys.contains("team-"), "{keys}");
}

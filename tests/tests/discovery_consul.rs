//! The Consul discovery against the Consul double (tests/src/consul.rs): snapshots, health
//! filtering, index resets, registry failures, instance mapping, ACL token and datacenter.

use std::time::{Duration, Instant};

use discovery::consul::ConsulDiscovery;
use discovery::{Discovery, ServiceInstance};
use serde_json::json;
use tests::consul::ConsulDouble;
use tests::harness::unused_port;
use tests::watch::{Latencies, ids, next_within};

/// Blocking queries in these tests wait this long, so a change that is only seen when the
/// wait runs out (instead of waking the query) shows up as a failure.
const LONG_WAIT: Duration = Duration::from_secs(30);

fn discovery_for(consul: &ConsulDouble) -> ConsulDiscovery {
    ConsulDiscovery::new(consul.address(), None, None).with_wait(LONG_WAIT)
}

fn kratos(name: &str, id: &str, port: u16) -> ServiceInstance {
    ServiceInstance {
        id: id.to_owned(),
        name: name.to_owned(),
        version: "v1".to_owned(),
        metadata: [("weight".to_owned(), "10".to_owned())].into(),
        endpoints: vec![
            format!("http://127.0.0.1:{port}?isSecure=false"),
            format!("grpc://127.0.0.1:{}", port + 1000),
        ],
    }
}

#[tokio::test]
async fn snapshots_follow_registrations() {
    let consul = ConsulDouble::start().await;
    consul
        .register_kratos(&kratos("helloworld", "a", 8001))
        .await;
    consul
        .register_kratos(&kratos("helloworld", "b", 8002))
        .await;
    consul
        .register_kratos(&kratos("helloworld2", "z", 9001))
        .await;
    let discovery = discovery_for(&consul);

    assert_eq!(
        ids(&discovery
            .get_service("helloworld")
            .await
            .expect("get_service")),
        ["a", "b"]
    );

    let mut watcher = discovery.watch("helloworld").await.expect("watch");
    let first = next_within(&mut watcher, Duration::from_secs(2)).await;
    assert_eq!(ids(&first), ["a", "b"]);
    // The Kratos registration round-trips: URLs from TaggedAddresses (not the lan/wan
    // entries Consul adds), version from the tag, metadata from Meta.
    let mut expected = kratos("helloworld", "a", 8001);
    expected.endpoints.sort();
    assert_eq!(first[0], expected);
    assert_eq!(
        first[0].endpoint("grpc"),
        Some(("127.0.0.1:9001".to_owned(), false))
    );

    consul.deregister("a").await;
    assert_eq!(
        ids(&next_within(&mut watcher, Duration::from_secs(1)).await),
        ["b"]
    );

    consul
        .register_kratos(&kratos("helloworld", "c", 8003))
        .await;
    assert_eq!(
        ids(&next_within(&mut watcher, Duration::from_secs(1)).await),
        ["b", "c"]
    );

    // A change to another service wakes nothing for this one.
    consul
        .register_kratos(&kratos("helloworld2", "y", 9002))
        .await;
    assert!(
        tokio::time::timeout(Duration::from_millis(300), watcher.next())
            .await
            .is_err(),
        "a helloworld2 change produced a helloworld snapshot"
    );

    // Zero instances is an empty snapshot.
    consul.deregister("b").await;
    next_within(&mut watcher, Duration::from_secs(1)).await;
    consul.deregister("c").await;
    assert!(
        next_within(&mut watcher, Duration::from_secs(1))
            .await
            .is_empty()
    );

    watcher.stop().await;
    assert!(matches!(
        watcher.next().await,
        Err(discovery::Error::Stopped)
    ));
}

#[tokio::test]
async fn change_to_snapshot_latency() {
    let consul = ConsulDouble::start().await;
    let discovery = discovery_for(&consul);
    let mut watcher = discovery.watch("latency").await.expect("watch");
    assert!(
        next_within(&mut watcher, Duration::from_secs(2))
            .await
            .is_empty()
    );

    let mut samples = Vec::new();
    for round in 0..20u16 {
        // Let the watcher's blocking query settle in before each change.
        tokio::time::sleep(Duration::from_millis(60)).await;
        let started = Instant::now();
        consul
            .register_kratos(&kratos("latency", &format!("i{round}"), 2000 + round))
            .await;
        let snapshot = next_within(&mut watcher, Duration::from_secs(1)).await;
        samples.push(started.elapsed());
        assert_eq!(snapshot.len(), usize::from(round) + 1);
    }
    let latencies = Latencies::of(&samples);
    eprintln!("consul double change -> snapshot latency {latencies}");
    assert!(latencies.median < Duration::from_millis(200), "{latencies}");
}

#[tokio::test]
async fn failing_checks_remove_the_instance() {
    let consul = ConsulDouble::start().await;
    consul
        .register_kratos(&kratos("helloworld", "a", 8001))
        .await;
    consul
        .register_kratos(&kratos("helloworld", "b", 8002))
        .await;
    let discovery = discovery_for(&consul);
    let mut watcher = discovery.watch("helloworld").await.expect("watch");
    assert_eq!(
        ids(&next_within(&mut watcher, Duration::from_secs(2)).await),
        ["a", "b"]
    );

    consul.fail("service:a").await;
    assert_eq!(
        ids(&next_within(&mut watcher, Duration::from_secs(1)).await),
        ["b"]
    );
    consul.pass("service:a").await;
    assert_eq!(
        ids(&next_within(&mut watcher, Duration::from_secs(1)).await),
        ["a", "b"]
    );

    // `warning` is not passing either.
    let status = consul.put("/v1/agent/check/warn/service:b", None).await;
    assert_eq!(status, http::StatusCode::OK);
    assert_eq!(
        ids(&next_within(&mut watcher, Duration::from_secs(1)).await),
        ["a"]
    );

    // A check registered without a status starts critical: invisible until it passes.
    consul
        .register(json!({
            "ID": "c", "Name": "helloworld", "Address": "127.0.0.1", "Port": 8003,
            "Check": {"TTL": "30s"}
        }))
        .await;
    assert!(
        tokio::time::timeout(Duration::from_millis(300), watcher.next())
            .await
            .is_err(),
        "a critical instance was reported"
    );
    consul.pass("service:c").await;
    assert_eq!(
        ids(&next_within(&mut watcher, Duration::from_secs(1)).await),
        ["a", "c"]
    );

    // A TTL that is not refreshed expires to critical.
    consul
        .register(json!({
            "ID": "d", "Name": "helloworld", "Address": "127.0.0.1", "Port": 8004,
            "Check": {"TTL": "300ms", "Status": "passing"}
        }))
        .await;
    assert_eq!(
        ids(&next_within(&mut watcher, Duration::from_secs(1)).await),
        ["a", "c", "d"]
    );
    assert_eq!(
        ids(&next_within(&mut watcher, Duration::from_secs(2)).await),
        ["a", "c"]
    );
}

#[tokio::test]
async fn index_going_backwards_resets_and_changes_still_arrive() {
    let consul = ConsulDouble::start().await;
    for (id, port) in [("a", 8001), ("b", 8002)] {
        consul
            .register_kratos(&kratos("helloworld", id, port))
            .await;
    }
    let discovery = discovery_for(&consul);
    let mut watcher = discovery.watch("helloworld").await.expect("watch");
    assert_eq!(
        ids(&next_within(&mut watcher, Duration::from_secs(2)).await),
        ["a", "b"]
    );
    consul
        .register_kratos(&kratos("helloworld", "c", 8003))
        .await;
    assert_eq!(
        ids(&next_within(&mut watcher, Duration::from_secs(1)).await),
        ["a", "b", "c"]
    );
    let high = consul.index();

    // The watcher's blocking query is in flight when the registry's index drops far below
    // what it blocks on (a snapshot restore releases blocked queries).
    let pending = tokio::spawn(async move {
        let result = watcher.next().await;
        (watcher, result)
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let before = consul.request_count();
    consul.set_index(2);
    // Nothing changed in the set: no duplicate snapshot, and no request storm either.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(
        !pending.is_finished(),
        "an unchanged set was reported again"
    );
    let requests = consul.request_count() - before;
    assert!(
        (1..=3).contains(&requests),
        "{requests} requests in 400 ms after the reset"
    );

    // A change now carries an index (3, 4, ...) below the old one; a watcher that kept
    // blocking on the old index would only see it when its 30 s wait ran out.
    consul.deregister("a").await;
    assert!(consul.index() < high);
    let (mut watcher, result) = tokio::time::timeout(Duration::from_secs(2), pending)
        .await
        .expect("the change after the reset was not reported within 2 s")
        .expect("watcher task");
    assert_eq!(ids(&result.expect("snapshot")), ["b", "c"]);
    consul
        .register_kratos(&kratos("helloworld", "d", 8004))
        .await;
    assert_eq!(
        ids(&next_within(&mut watcher, Duration::from_secs(1)).await),
        ["b", "c", "d"]
    );
}

#[tokio::test]
async fn index_dropped_between_queries_is_noticed_when_the_wait_ends() {
    let consul = ConsulDouble::start().await;
    for (id, port) in [("a", 8001), ("b", 8002), ("c", 8003)] {
        consul
            .register_kratos(&kratos("helloworld", id, port))
            .await;
    }
    let wait = Duration::from_millis(500);
    let discovery = ConsulDiscovery::new(consul.address(), None, None).with_wait(wait);
    let mut watcher = discovery.watch("helloworld").await.expect("watch");
    assert_eq!(
        ids(&next_within(&mut watcher, Duration::from_secs(2)).await),
        ["a", "b", "c"]
    );

    // No query is in flight when the index drops, so the next one blocks on an index the
    // registry is below: as with real Consul it only returns when its wait ends, with the
    // lower index, and the watcher then resets and sees changes again.
    consul.set_index(2);
    let started = Instant::now();
    let pending = tokio::spawn(async move {
        let result = watcher.next().await;
        (watcher, result)
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    consul.deregister("a").await;
    let (_watcher, result) = tokio::time::timeout(Duration::from_secs(3), pending)
        .await
        .expect("the change after the reset was not reported")
        .expect("watcher task");
    assert_eq!(ids(&result.expect("snapshot")), ["b", "c"]);
    eprintln!(
        "index drop between queries: change reported after {:?}",
        started.elapsed()
    );
    assert!(started.elapsed() >= wait - Duration::from_millis(150));
}

#[tokio::test]
async fn registry_errors_surface_then_recover() {
    let consul = ConsulDouble::start().await;
    consul
        .register_kratos(&kratos("helloworld", "a", 8001))
        .await;
    let discovery = discovery_for(&consul);

    consul.fail_next(1);
    let error = discovery
        .get_service("helloworld")
        .await
        .expect_err("a 500 is an error");
    assert!(error.to_string().contains("500"), "{error}");

    consul.fail_next(3);
    let mut watcher = discovery.watch("helloworld").await.expect("watch");
    let started = Instant::now();
    let mut errors = 0;
    let snapshot = loop {
        match tokio::time::timeout(Duration::from_secs(5), watcher.next()).await {
            Ok(Ok(snapshot)) => break snapshot,
            Ok(Err(error)) => {
                assert!(error.to_string().contains("No cluster leader"), "{error}");
                errors += 1;
                assert!(errors <= 3, "more errors than failed requests");
            }
            Err(_) => panic!("the watcher hung on a failing registry"),
        }
    };
    assert_eq!(errors, 3);
    assert_eq!(ids(&snapshot), ["a"]);
    // Three failures back off roughly 50-100, 100-200 and 200-400 ms.
    let elapsed = started.elapsed();
    eprintln!("consul watcher recovered from 3 failures after {elapsed:?}");
    assert!(
        elapsed >= Duration::from_millis(350),
        "no backoff: {elapsed:?}"
    );
    assert!(elapsed < Duration::from_secs(3), "{elapsed:?}");

    // Mid-watch: the next request fails, the one after it catches up with the change.
    consul.fail_next(1);
    consul
        .register_kratos(&kratos("helloworld", "b", 8002))
        .await;
    let next = tokio::time::timeout(Duration::from_secs(1), watcher.next()).await;
    assert!(
        matches!(next, Ok(Err(_))),
        "expected the injected 500, got {next:?}"
    );
    assert_eq!(
        ids(&next_within(&mut watcher, Duration::from_secs(2)).await),
        ["a", "b"]
    );

    // A registry that is not there at all is an error, not a hang.
    let port = unused_port();
    let nowhere = ConsulDiscovery::new(format!("127.0.0.1:{port}"), None, None);
    let result = tokio::time::timeout(Duration::from_secs(5), nowhere.get_service("x")).await;
    assert!(
        matches!(result, Ok(Err(discovery::Error::Unreachable { .. }))),
        "{result:?}"
    );
}

#[tokio::test]
async fn plain_consul_registrations_map_to_address_and_port() {
    let consul = ConsulDouble::start().await;
    // A service registered without Kratos' URL tagged addresses: Service.Address:Port.
    consul
        .register(json!({
            "ID": "plain", "Name": "legacy", "Address": "10.0.0.7", "Port": 8080,
            "Tags": ["primary", "version=v2.1"],
            "Meta": {"weight": "30", "zone": "eu"},
            "Weights": {"Passing": 5, "Warning": 1}
        }))
        .await;
    // No Service.Address: the node's address is used.
    consul
        .register(json!({"ID": "nodeaddr", "Name": "legacy", "Port": 8081}))
        .await;
    // A custom non-URL tagged address is skipped too.
    consul
        .register(json!({
            "ID": "tagged", "Name": "legacy", "Address": "10.0.0.8", "Port": 8082,
            "TaggedAddresses": {"virtual": {"Address": "10.9.9.9", "Port": 80}}
        }))
        .await;
    let discovery = discovery_for(&consul);
    let instances = discovery.get_service("legacy").await.expect("get_service");
    assert_eq!(ids(&instances), ["nodeaddr", "plain", "tagged"]);
    assert_eq!(instances[0].endpoints, ["http://127.0.0.1:8081"]);
    assert_eq!(instances[0].version, "");
    assert_eq!(instances[1].endpoints, ["http://10.0.0.7:8080"]);
    assert_eq!(instances[1].version, "v2.1");
    assert_eq!(
        instances[1].metadata,
        [
            ("weight".to_owned(), "30".to_owned()),
            ("zone".to_owned(), "eu".to_owned())
        ]
        .into()
    );
    assert_eq!(instances[2].endpoints, ["http://10.0.0.8:8082"]);
    assert_eq!(
        instances[1].endpoint("http"),
        Some(("10.0.0.7:8080".to_owned(), false))
    );
    assert_eq!(instances[1].endpoint("grpc"), None);

    // A TLS endpoint registered by Kratos keeps its flag.
    let mut secure = kratos("secure", "s", 8443);
    secure.endpoints = vec![
        "https://127.0.0.1:8443?isSecure=true".to_owned(),
        "http://127.0.0.1:8444?isSecure=true".to_owned(),
    ];
    consul.register_kratos(&secure).await;
    let instances = discovery.get_service("secure").await.expect("get_service");
    assert_eq!(
        instances[0].endpoint("http"),
        Some(("127.0.0.1:8444".to_owned(), true))
    );
}

#[tokio::test]
async fn token_and_datacenter_are_sent() {
    let consul = ConsulDouble::start_with_token("s3cret").await;
    consul
        .register_kratos(&kratos("helloworld", "a", 8001))
        .await;

    let without_token = ConsulDiscovery::new(consul.address(), None, None);
    let error = without_token
        .get_service("helloworld")
        .await
        .expect_err("no token");
    assert!(error.to_string().contains("403"), "{error}");

    let dsn = format!("consul://{}?token=s3cret&datacenter=dc1", consul.address());
    let with_token = discovery::from_dsn(&dsn).expect("valid DSN");
    assert_eq!(
        ids(&with_token.get_service("helloworld").await.expect("get")),
        ["a"]
    );
    let mut watcher = with_token.watch("helloworld").await.expect("watch");
    assert_eq!(
        ids(&next_within(&mut watcher, Duration::from_secs(2)).await),
        ["a"]
    );

    let other_dc = ConsulDiscovery::new(
        consul.address(),
        Some("s3cret".to_owned()),
        Some("dc2".to_owned()),
    );
    let error = other_dc.get_service("helloworld").await.expect_err("dc2");
    assert!(
        error.to_string().contains("No path to datacenter"),
        "{error}"
    );
}

#[tokio::test]
async fn quiet_service_blocks_instead_of_polling() {
    let consul = ConsulDouble::start().await;
    consul
        .register_kratos(&kratos("helloworld", "a", 8001))
        .await;
    let discovery =
        ConsulDiscovery::new(consul.address(), None, None).with_wait(Duration::from_millis(500));
    let mut watcher = discovery.watch("helloworld").await.expect("watch");
    assert_eq!(
        ids(&next_within(&mut watcher, Duration::from_secs(2)).await),
        ["a"]
    );

    // With nothing changing, each blocking query runs out its 500 ms wait and the watcher
    // re-asks without reporting the same set again.
    let before = consul.request_count();
    let quiet = tokio::time::timeout(Duration::from_millis(1600), watcher.next()).await;
    assert!(quiet.is_err(), "an unchanged set was reported: {quiet:?}");
    let requests = consul.request_count() - before;
    assert!((3..=5).contains(&requests), "{requests} requests in 1.6 s");

    // A check turning critical wakes the blocked query well before the wait runs out.
    consul.fail("service:a").await;
    assert!(
        next_within(&mut watcher, Duration::from_millis(300))
            .await
            .is_empty()
    );
}

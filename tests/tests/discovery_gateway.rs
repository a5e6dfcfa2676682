//! Traffic follows the registry: the real gateway with `--discovery` against a private
//! etcd and the Consul double, with real upstreams.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use tests::consul::ConsulDouble;
use tests::etcd::{EtcdServer, instance};
use tests::eventually::expect_eq;
use tests::harness::{TestGateway, Upstream, get};
use tests::{assert_eventually, config};

const NS: &str = "/microservices";

/// A gateway config proxying `/svc/*` (and `extra_path`) to `discovery:///{service}`.
fn watching(service: &str, extra_path: Option<&str>) -> String {
    let target = format!("discovery:///{service}");
    // wrr, so 20 requests reach every node: p2c would rightly keep sending sequential
    // requests to the node with the lowest measured latency.
    let mut endpoints = vec![config::endpoint(
        "/svc/*",
        &target,
        "    timeout: 2s\n    selector: wrr\n",
    )];
    if let Some(path) = extra_path {
        endpoints.push(config::endpoint(path, &target, ""));
    }
    config::gateway(&endpoints)
}

/// Sends `n` requests and counts answers by upstream name (`x-upstream`), or by status
/// when the answer is not from an upstream.
async fn spread(gw: &TestGateway, path: &str, n: usize) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    for _ in 0..n {
        let reply = get(&gw.url(path)).await;
        let key = match reply.header("x-upstream") {
            "" => format!("status {}", reply.status),
            name => name.to_owned(),
        };
        *seen.entry(key).or_insert(0) += 1;
    }
    seen
}

/// `Ok` when 20 requests were answered by exactly the upstreams `names` (each at least
/// once); otherwise what answered.
async fn only(gw: &TestGateway, path: &str, names: &[&str]) -> Result<(), String> {
    let seen = spread(gw, path, 20).await;
    let exact = seen.keys().all(|k| names.contains(&k.as_str()))
        && names.iter().all(|n| seen.contains_key(*n));
    if exact {
        Ok(())
    } else {
        Err(format!("answered by {seen:?}, want only {names:?}"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_registry_drives_traffic() {
    let mut etcd = EtcdServer::start().await;
    let (a, b, c) = (
        Upstream::named("a").await,
        Upstream::named("b").await,
        Upstream::named("c").await,
    );
    etcd.put_instance(NS, &instance("hello", "a", &a.target()))
        .await;
    etcd.put_instance(NS, &instance("hello", "b", &b.target()))
        .await;
    let dsn = format!("etcd://{}?namespace={NS}", etcd.endpoint());
    let gw = TestGateway::start_with(&watching("hello", None), &["--discovery", &dsn])
        .await
        .unwrap();

    // Start-up waited for the first snapshot: both instances serve at once.
    let seen = spread(&gw, "/svc/x", 30).await;
    assert!(
        seen.get("a").is_some_and(|n| *n > 0) && seen.get("b").is_some_and(|n| *n > 0),
        "{seen:?}"
    );

    // Deregister b: within 1 s no request goes to it.
    etcd.delete_instance(NS, "hello", "b").await;
    let start = Instant::now();
    assert_eventually!(Duration::from_secs(1), "b drained", || only(
        &gw,
        "/svc/x",
        &["a"]
    ));
    eprintln!("etcd delete -> traffic drained in {:?}", start.elapsed());

    // Register c: it gets traffic; measure put -> first request routed to it.
    let start = Instant::now();
    etcd.put_instance(NS, &instance("hello", "c", &c.target()))
        .await;
    let mut first_routed = None;
    for _ in 0..500 {
        if get(&gw.url("/svc/x")).await.header("x-upstream") == "c" {
            first_routed = Some(start.elapsed());
            break;
        }
    }
    let first_routed = first_routed.expect("c receives traffic");
    eprintln!("etcd put -> first request routed to the new node: {first_routed:?}");
    assert!(first_routed < Duration::from_secs(1), "{first_routed:?}");

    // The debug view shows the instances in the Kratos shape.
    let nodes: serde_json::Value = serde_json::from_str(
        &get(&gw.url("/debug/watcher/nodes?service=hello"))
            .await
            .body,
    )
    .unwrap();
    let mut ids: Vec<&str> = nodes
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["id"].as_str().unwrap())
        .collect();
    ids.sort();
    assert_eq!(ids, ["a", "c"]);
    assert_eq!(nodes[0]["name"], "hello");
    assert!(
        nodes[0]["endpoints"][0]
            .as_str()
            .unwrap()
            .starts_with("http://127.0.0.1:")
    );

    // Kill etcd: the last known nodes keep serving.
    etcd.kill();
    let outage = only(&gw, "/svc/x", &["a", "c"]).await;
    assert_eq!(outage, Ok(()), "last known nodes serve during an outage");
    // Restart it and change the set: the watcher reconnects and follows.
    etcd.restart().await;
    etcd.delete_instance(NS, "hello", "a").await;
    assert_eventually!(
        Duration::from_secs(8),
        "the watcher recovered after the restart",
        || only(&gw, "/svc/x", &["c"])
    );

    // Zero instances: 503.
    etcd.delete_instance(NS, "hello", "c").await;
    assert_eventually!(
        Duration::from_secs(2),
        "an empty registry empties the node set (503)",
        || async { expect_eq(get(&gw.url("/svc/x")).await.status, 503) }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_keeps_one_watch_and_its_nodes() {
    let etcd = EtcdServer::start().await;
    let a = Upstream::named("a").await;
    etcd.put_instance(NS, &instance("kept", "a", &a.target()))
        .await;
    let dsn = format!("etcd://{}", etcd.endpoint());
    let gw = TestGateway::start_with(&watching("kept", None), &["--discovery", &dsn])
        .await
        .unwrap();
    assert_eq!(get(&gw.url("/svc/1")).await.body, "a");

    gw.write_config(&watching("kept", Some("/second/*")));
    assert_eventually!(
        Duration::from_secs(2),
        "the new endpoint shares the watch and has its nodes at once",
        || async { expect_eq(get(&gw.url("/second/x")).await.body, "a") }
    );
    assert_eq!(get(&gw.url("/svc/1")).await.body, "a");
    let appliers: serde_json::Value = serde_json::from_str(
        &get(&gw.url("/debug/watcher/appliers?service=kept"))
            .await
            .body,
    )
    .unwrap();
    let appliers = appliers.as_array().expect("a list of appliers");
    assert_eq!(
        appliers.len(),
        2,
        "the old router's applier unsubscribed: {appliers:?}"
    );
    assert!(appliers.iter().all(|a| a["nodes"] == 1), "{appliers:?}");
    let all: serde_json::Value =
        serde_json::from_str(&get(&gw.url("/debug/watcher/nodes")).await.body).unwrap();
    assert_eq!(
        all.as_object().unwrap().len(),
        1,
        "still exactly one watched service: {all}"
    );
    assert_eq!(
        get(&gw.url("/debug/watcher/nodes?service=unknown"))
            .await
            .status,
        404
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consul_registry_drives_traffic() {
    let consul = ConsulDouble::start().await;
    let (a, b, c) = (
        Upstream::named("a").await,
        Upstream::named("b").await,
        Upstream::named("c").await,
    );
    consul
        .register_kratos(&instance("hello", "a", &a.target()))
        .await;
    consul
        .register_kratos(&instance("hello", "b", &b.target()))
        .await;
    let dsn = format!("consul://{}", consul.address());
    let gw = TestGateway::start_with(&watching("hello", None), &["--discovery", &dsn])
        .await
        .unwrap();
    let seen = spread(&gw, "/svc/x", 30).await;
    assert!(seen.contains_key("a") && seen.contains_key("b"), "{seen:?}");

    // A check turning critical removes the instance (passing only).
    consul.fail("service:b").await;
    assert_eventually!(Duration::from_secs(1), "critical b drained", || only(
        &gw,
        "/svc/x",
        &["a"]
    ));
    consul.pass("service:b").await;
    assert_eventually!(
        Duration::from_secs(1),
        "b serves again once passing",
        || { only(&gw, "/svc/x", &["a", "b"]) }
    );

    // A new registration: measure change -> first request routed to it.
    let start = Instant::now();
    consul
        .register_kratos(&instance("hello", "c", &c.target()))
        .await;
    let mut routed = None;
    for _ in 0..500 {
        if get(&gw.url("/svc/x")).await.header("x-upstream") == "c" {
            routed = Some(start.elapsed());
            break;
        }
    }
    let routed = routed.expect("c receives traffic");
    eprintln!("consul register -> first request routed to the new node: {routed:?}");

    // The index going backwards (a registry restore) while the watch is blocked resets it;
    // changes still arrive. (A query sent after the drop waits out its `wait`, as on a real
    // agent: the discovery tests cover that case with a short wait.)
    tokio::time::sleep(Duration::from_millis(200)).await;
    consul.set_index(1);
    consul.deregister("a").await;
    assert_eventually!(
        Duration::from_secs(3),
        "changes after the index went backwards are followed",
        || only(&gw, "/svc/x", &["b", "c"])
    );

    // A failing registry keeps the last nodes.
    consul.fail_next(3);
    let failing = only(&gw, "/svc/x", &["b", "c"]).await;
    assert_eq!(failing, Ok(()), "a failing registry keeps the last nodes");
    consul.deregister("b").await;
    consul.deregister("c").await;
    assert_eventually!(Duration::from_secs(8), "zero instances: 503", || async {
        expect_eq(get(&gw.url("/svc/x")).await.status, 503)
    });
}

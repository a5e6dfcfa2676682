//! The etcd discovery against a real etcd (Debian's 3.4): snapshots, prefix isolation, bad
//! values, recovery after an etcd restart, and re-listing after compaction.

use std::time::{Duration, Instant};

use discovery::Discovery;
use discovery::etcd::EtcdDiscovery;
use tests::etcd::{EtcdServer, instance, instance_key};
use tests::harness::unused_port;
use tests::watch::{Latencies, ids, next_within, wait_for};

const NAMESPACE: &str = "/microservices";

fn discovery_for(etcd: &EtcdServer) -> EtcdDiscovery {
    EtcdDiscovery::new(vec![etcd.endpoint()], NAMESPACE.to_owned())
}

#[tokio::test]
async fn snapshots_follow_puts_and_deletes() {
    let etcd = EtcdServer::start().await;
    etcd.put_instance(NAMESPACE, &instance("helloworld", "a", "127.0.0.1:8001"))
        .await;
    etcd.put_instance(NAMESPACE, &instance("helloworld", "b", "127.0.0.1:8002"))
        .await;
    let discovery = discovery_for(&etcd);

    let current = discovery
        .get_service("helloworld")
        .await
        .expect("get_service");
    assert_eq!(ids(&current), ["a", "b"]);

    let mut watcher = discovery.watch("helloworld").await.expect("watch");
    let first = next_within(&mut watcher, Duration::from_secs(5)).await;
    assert_eq!(ids(&first), ["a", "b"]);
    assert_eq!(first[0], instance("helloworld", "a", "127.0.0.1:8001"));
    assert_eq!(
        first[0].endpoint("http"),
        Some(("127.0.0.1:8001".to_owned(), false))
    );

    etcd.delete_instance(NAMESPACE, "helloworld", "a").await;
    let after_delete = next_within(&mut watcher, Duration::from_secs(1)).await;
    assert_eq!(ids(&after_delete), ["b"]);

    etcd.put_instance(NAMESPACE, &instance("helloworld", "c", "127.0.0.1:8003"))
        .await;
    let after_put = next_within(&mut watcher, Duration::from_secs(1)).await;
    assert_eq!(ids(&after_put), ["b", "c"]);

    // An updated value replaces the instance (same key).
    let mut updated = instance("helloworld", "c", "127.0.0.1:9003");
    updated.version = "v2".to_owned();
    updated
        .metadata
        .insert("weight".to_owned(), "20".to_owned());
    etcd.put_instance(NAMESPACE, &updated).await;
    let after_update = next_within(&mut watcher, Duration::from_secs(1)).await;
    assert_eq!(after_update[1], updated);

    // Zero instances is an empty snapshot, not an error.
    etcd.delete_instance(NAMESPACE, "helloworld", "b").await;
    next_within(&mut watcher, Duration::from_secs(1)).await;
    etcd.delete_instance(NAMESPACE, "helloworld", "c").await;
    let empty = next_within(&mut watcher, Duration::from_secs(1)).await;
    assert!(empty.is_empty(), "{empty:?}");

    watcher.stop().await;
    assert!(matches!(
        watcher.next().await,
        Err(discovery::Error::Stopped)
    ));
}

#[tokio::test]
async fn put_to_snapshot_latency() {
    let etcd = EtcdServer::start().await;
    let discovery = discovery_for(&etcd);
    let mut watcher = discovery.watch("latency").await.expect("watch");
    assert!(
        next_within(&mut watcher, Duration::from_secs(5))
            .await
            .is_empty()
    );
    // Open the watch stream before measuring (the second next() opens it).
    etcd.put_instance(NAMESPACE, &instance("latency", "warm-up", "127.0.0.1:1"))
        .await;
    next_within(&mut watcher, Duration::from_secs(2)).await;

    let client = etcd.client().await;
    let mut samples = Vec::new();
    for round in 0..20 {
        let value = serde_json::to_string(&instance(
            "latency",
            "x",
            &format!("127.0.0.1:{}", 2000 + round),
        ))
        .expect("serialise");
        let mut kv = client.kv_client();
        let started = Instant::now();
        kv.put(instance_key(NAMESPACE, "latency", "x"), value, None)
            .await
            .expect("put");
        let snapshot = next_within(&mut watcher, Duration::from_secs(1)).await;
        samples.push(started.elapsed());
        assert!(
            snapshot
                .iter()
                .any(|instance| instance.endpoints[0].contains(&format!(":{}", 2000 + round)))
        );
    }
    let latencies = Latencies::of(&samples);
    eprintln!("etcd put -> snapshot latency {latencies}");
    assert!(latencies.median < Duration::from_millis(200), "{latencies}");
}

#[tokio::test]
async fn sibling_service_does_not_leak() {
    let etcd = EtcdServer::start().await;
    etcd.put_instance(NAMESPACE, &instance("helloworld", "a", "127.0.0.1:8001"))
        .await;
    etcd.put_instance(NAMESPACE, &instance("helloworld2", "z", "127.0.0.1:9001"))
        .await;
    let discovery = discovery_for(&etcd);
    assert_eq!(
        ids(&discovery.get_service("helloworld").await.expect("get")),
        ["a"]
    );

    let mut watcher = discovery.watch("helloworld").await.expect("watch");
    assert_eq!(
        ids(&next_within(&mut watcher, Duration::from_secs(5)).await),
        ["a"]
    );

    // A change to helloworld2 alone must not produce a helloworld snapshot: the next one is
    // caused by the helloworld put that follows, and holds only helloworld instances.
    etcd.put_instance(NAMESPACE, &instance("helloworld2", "y", "127.0.0.1:9002"))
        .await;
    etcd.delete_instance(NAMESPACE, "helloworld2", "z").await;
    etcd.put_instance(NAMESPACE, &instance("helloworld", "b", "127.0.0.1:8002"))
        .await;
    let next = next_within(&mut watcher, Duration::from_secs(1)).await;
    assert_eq!(ids(&next), ["a", "b"]);
    assert!(next.iter().all(|instance| instance.name == "helloworld"));

    // Another namespace is invisible too.
    etcd.put_instance("/other", &instance("helloworld", "q", "127.0.0.1:7001"))
        .await;
    etcd.delete_instance(NAMESPACE, "helloworld", "a").await;
    assert_eq!(
        ids(&next_within(&mut watcher, Duration::from_secs(1)).await),
        ["b"]
    );
}

#[tokio::test]
async fn unparsable_values_are_skipped() {
    let etcd = EtcdServer::start().await;
    etcd.put_instance(NAMESPACE, &instance("helloworld", "a", "127.0.0.1:8001"))
        .await;
    etcd.put_raw(
        &instance_key(NAMESPACE, "helloworld", "broken"),
        "{not json",
    )
    .await;
    let discovery = discovery_for(&etcd);
    assert_eq!(
        ids(&discovery.get_service("helloworld").await.expect("get")),
        ["a"]
    );
    let mut watcher = discovery.watch("helloworld").await.expect("watch");
    assert_eq!(
        ids(&next_within(&mut watcher, Duration::from_secs(5)).await),
        ["a"]
    );

    // A bad value arriving through the watch is skipped too; the others stay.
    etcd.put_raw(
        &instance_key(NAMESPACE, "helloworld", "b"),
        "\"just a string\"",
    )
    .await;
    etcd.put_instance(NAMESPACE, &instance("helloworld", "c", "127.0.0.1:8003"))
        .await;
    let (snapshot, _) = wait_for(&mut watcher, Duration::from_secs(2), |snapshot| {
        snapshot.iter().any(|instance| instance.id == "c")
    })
    .await;
    assert_eq!(ids(&snapshot), ["a", "c"]);

    // Overwriting a good instance with garbage removes that instance only.
    etcd.put_raw(&instance_key(NAMESPACE, "helloworld", "a"), "garbage")
        .await;
    assert_eq!(
        ids(&next_within(&mut watcher, Duration::from_secs(1)).await),
        ["c"]
    );
}

#[tokio::test]
async fn watcher_recovers_after_etcd_restart() {
    let mut etcd = EtcdServer::start().await;
    etcd.put_instance(NAMESPACE, &instance("helloworld", "a", "127.0.0.1:8001"))
        .await;
    etcd.put_instance(NAMESPACE, &instance("helloworld", "b", "127.0.0.1:8002"))
        .await;
    let discovery = discovery_for(&etcd);
    let mut watcher = discovery.watch("helloworld").await.expect("watch");
    assert_eq!(
        ids(&next_within(&mut watcher, Duration::from_secs(5)).await),
        ["a", "b"]
    );
    etcd.put_instance(NAMESPACE, &instance("helloworld", "c", "127.0.0.1:8003"))
        .await;
    assert_eq!(
        ids(&next_within(&mut watcher, Duration::from_secs(1)).await),
        ["a", "b", "c"]
    );

    etcd.kill();
    let killed = Instant::now();
    match tokio::time::timeout(Duration::from_secs(10), watcher.next()).await {
        Ok(Err(error)) => eprintln!("watch error after kill ({:?}): {error}", killed.elapsed()),
        Ok(Ok(snapshot)) => panic!("a snapshot while etcd is down: {snapshot:?}"),
        Err(_) => panic!("the watcher did not notice etcd going away within 10 s"),
    }
    // While etcd is down every call ends in an error, each bounded in time.
    let down = Instant::now();
    let result = tokio::time::timeout(Duration::from_secs(10), watcher.next()).await;
    assert!(matches!(result, Ok(Err(_))), "{result:?}");
    eprintln!("a next() while etcd is down took {:?}", down.elapsed());

    etcd.restart().await;
    // Changes made before the watcher reconnects are not lost: it re-watches from the last
    // revision it applied + 1.
    etcd.delete_instance(NAMESPACE, "helloworld", "a").await;
    etcd.put_instance(NAMESPACE, &instance("helloworld", "d", "127.0.0.1:8004"))
        .await;
    let restarted = Instant::now();
    let (snapshot, errors) = wait_for(&mut watcher, Duration::from_secs(15), |snapshot| {
        ids(snapshot) == ["b", "c", "d"]
    })
    .await;
    eprintln!(
        "etcd watcher recovered {:?} after restart ({errors} errors on the way)",
        restarted.elapsed()
    );
    assert_eq!(ids(&snapshot), ["b", "c", "d"]);

    // And it keeps following changes on the new connection.
    etcd.delete_instance(NAMESPACE, "helloworld", "b").await;
    let (snapshot, _) = wait_for(&mut watcher, Duration::from_secs(2), |snapshot| {
        ids(snapshot) == ["c", "d"]
    })
    .await;
    assert_eq!(ids(&snapshot), ["c", "d"]);
}

#[tokio::test]
async fn compaction_past_the_watch_revision_lists_again() {
    let etcd = EtcdServer::start().await;
    etcd.put_instance(NAMESPACE, &instance("helloworld", "a", "127.0.0.1:8001"))
        .await;
    let discovery = discovery_for(&etcd);
    let mut watcher = discovery.watch("helloworld").await.expect("watch");
    // The first next() lists; the watch from that revision + 1 opens on the next call.
    assert_eq!(
        ids(&next_within(&mut watcher, Duration::from_secs(5)).await),
        ["a"]
    );

    etcd.put_instance(NAMESPACE, &instance("helloworld", "b", "127.0.0.1:8002"))
        .await;
    etcd.delete_instance(NAMESPACE, "helloworld", "a").await;
    etcd.put_instance(NAMESPACE, &instance("other", "x", "127.0.0.1:1"))
        .await;
    etcd.compact().await;

    // Watching from the old revision is refused as compacted; the watcher lists again.
    let snapshot = next_within(&mut watcher, Duration::from_secs(3)).await;
    assert_eq!(ids(&snapshot), ["b"]);

    // It then watches normally from the fresh revision.
    etcd.put_instance(NAMESPACE, &instance("helloworld", "c", "127.0.0.1:8003"))
        .await;
    assert_eq!(
        ids(&next_within(&mut watcher, Duration::from_secs(1)).await),
        ["b", "c"]
    );
}

#[tokio::test]
async fn unreachable_etcd_is_an_error_not_a_hang() {
    let port = unused_port();
    let discovery = EtcdDiscovery::new(vec![format!("127.0.0.1:{port}")], NAMESPACE.to_owned());
    let started = Instant::now();
    let result = tokio::time::timeout(Duration::from_secs(10), discovery.get_service("x")).await;
    assert!(matches!(result, Ok(Err(_))), "{result:?}");
    eprintln!(
        "get_service against a dead port failed after {:?}",
        started.elapsed()
    );

    let mut watcher = discovery.watch("x").await.expect("watch is lazy");
    let result = tokio::time::timeout(Duration::from_secs(10), watcher.next()).await;
    assert!(matches!(result, Ok(Err(_))), "{result:?}");

    assert!(matches!(
        discovery.watch("a/b").await.err(),
        Some(discovery::Error::InvalidName { .. })
    ));
}

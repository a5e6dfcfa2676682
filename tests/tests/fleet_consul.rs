//! A fleet of gateways sharing one config store in Consul's KV (the Consul double of
//! tests/src/consul.rs): a PUT through one gateway's admin API is routed by the other, both
//! keep serving while Consul is down and catch up when it returns, and a gateway that dies
//! without deregistering leaves the instance list when its session's TTL runs out.

use std::time::{Duration, Instant};

use serde_json::json;
use tests::admin;
use tests::assert_eventually;
use tests::config;
use tests::consul::ConsulDouble;
use tests::eventually::expect_eq;
use tests::fleet::{self, Doomed, first_200, instance_addrs};
use tests::harness::{TestGateway, Upstream, get};

const PATIENCE: Duration = Duration::from_secs(10);

/// The hidden session TTL the tests run with; Consul allows itself twice that.
const LEASE_TTL: &str = "1s";

/// What DESIGN.md §10 asks of a shared store on loopback.
const CHANGE_BUDGET: Duration = Duration::from_millis(100);

/// A Consul double that accepts the tests' short session TTL (Consul's `session_ttl_min`,
/// 10 s unless configured).
async fn consul() -> ConsulDouble {
    let consul = ConsulDouble::start().await;
    consul.set_session_ttl_min(Duration::from_secs(1));
    consul
}

fn store_dsn(consul: &ConsulDouble) -> String {
    format!("consul://{}/fleet", consul.address())
}

async fn member(dsn: &str, file_target: &str) -> TestGateway {
    fleet::member(dsn, LEASE_TTL, file_target).await
}

fn millis(duration: Duration) -> String {
    format!("{:.1} ms", duration.as_secs_f64() * 1000.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_on_one_gateway_is_routed_by_the_other() {
    let consul = consul().await;
    let dsn = store_dsn(&consul);
    let (file, added) = (
        Upstream::named("file").await,
        Upstream::named("added").await,
    );
    let one = member(&dsn, &file.target()).await;
    let two = member(&dsn, &file.target()).await;
    let (admin_one, admin_two) = (one.admin_addr.unwrap(), two.admin_addr.unwrap());

    let mut latencies = Vec::new();
    for round in 0..5 {
        let path = format!("/added{round}/x");
        assert_eq!(get(&two.url(&path)).await.status, 404);
        let started = Instant::now();
        let put = admin::put(
            admin_one,
            &format!("added{round}"),
            &admin::endpoint(&format!("/added{round}/*"), &added.target()),
            &[],
        )
        .await;
        assert_eq!(put.status, 200, "{}", put.body);
        let version = admin::json(&put)["version"].as_str().unwrap().to_owned();
        first_200(&two.url(&path)).await;
        latencies.push(started.elapsed());
        assert_eq!(get(&two.url(&path)).await.body, "added");
        // The other gateway's admin API sees the same endpoint and version (the ModifyIndex).
        let seen =
            admin::json(&admin::get(admin_two, &format!("/admin/v1/endpoints/added{round}")).await);
        assert_eq!(seen["version"], version);
    }
    for latency in &latencies {
        println!(
            "consul fleet: PUT on gateway one -> first 200 on gateway two: {}",
            millis(*latency)
        );
    }
    let mut sorted = latencies.clone();
    sorted.sort();
    assert!(
        sorted[sorted.len() / 2] < CHANGE_BUDGET,
        "median change-to-routed latency {} is over {CHANGE_BUDGET:?}: {latencies:?}",
        millis(sorted[sorted.len() / 2])
    );

    // The layout in Consul: the folder key, one JSON value per endpoint, the instances.
    let keys = consul.kv_keys();
    assert!(keys.contains(&"fleet/endpoints/".to_owned()), "{keys:?}");
    assert!(
        keys.contains(&"fleet/endpoints/added0".to_owned()),
        "{keys:?}"
    );
    assert_eq!(
        keys.iter()
            .filter(|key| key.starts_with("fleet/instances/"))
            .count(),
        2,
        "{keys:?}"
    );
    let stored: serde_json::Value =
        serde_json::from_str(&consul.kv_value("fleet/endpoints/added0").unwrap()).unwrap();
    assert_eq!(stored["id"], "added0");
    assert_eq!(stored["endpoint"]["path"], "/added0/*");

    // Conditional writes work across gateways: the version one wrote is stale after two writes.
    let v = admin::json(&admin::get(admin_one, "/admin/v1/endpoints/added0").await)["version"]
        .as_str()
        .unwrap()
        .to_owned();
    let again = admin::put(
        admin_two,
        "added0",
        &admin::endpoint("/added0/*", &file.target()),
        &[("if-match", &v)],
    )
    .await;
    assert_eq!(again.status, 200, "{}", again.body);
    let stale = admin::put(
        admin_one,
        "added0",
        &admin::endpoint("/added0/*", &added.target()),
        &[("if-match", &v)],
    )
    .await;
    assert_eq!(stale.status, 412, "{}", stale.body);
    assert_eventually!(PATIENCE, "gateway one routes two's change", || async {
        expect_eq(get(&one.url("/added0/x")).await.body, "file".to_owned())
    });
    // If-Match: 0 creates only.
    let exists = admin::put(
        admin_one,
        "added1",
        &admin::endpoint("/added1/*", &file.target()),
        &[("if-match", "0")],
    )
    .await;
    assert_eq!(exists.status, 412, "{}", exists.body);
    let created = admin::put(
        admin_one,
        "fresh",
        &admin::endpoint("/fresh/*", &added.target()),
        &[("if-match", "0")],
    )
    .await;
    assert_eq!(created.status, 200, "{}", created.body);

    // A delete removes that key only, not the keys it prefixes (`added1` vs `added1x`).
    let put = admin::put(
        admin_one,
        "added1x",
        &admin::endpoint("/added1x/*", &added.target()),
        &[],
    )
    .await;
    assert_eq!(put.status, 200, "{}", put.body);
    let deleted = admin::delete(admin_one, "added1", &[]).await;
    assert_eq!(deleted.status, 200, "{}", deleted.body);
    assert_eventually!(PATIENCE, "gateway two drops the deleted route", || async {
        expect_eq(get(&two.url("/added1/x")).await.status, 404)
    });
    assert_eq!(get(&two.url("/added1x/x")).await.status, 200);
    let gone = admin::get(admin_two, "/admin/v1/endpoints/added1").await;
    assert_eq!(gone.status, 404, "{}", gone.body);
    let stale_delete = admin::delete(admin_two, "added2", &[("if-match", "1")]).await;
    assert_eq!(stale_delete.status, 412, "{}", stale_delete.body);

    // Both are listed, each with the store revision it applied.
    let mut want = vec![admin_one.to_string(), admin_two.to_string()];
    want.sort();
    assert_eventually!(PATIENCE, "both gateways listed", || async {
        expect_eq(instance_addrs(admin_one).await, want.clone())
    });
    let config = admin::json(&admin::get(admin_two, "/admin/v1/config").await);
    assert_eq!(config["source"], "store");
    assert_eq!(config["store"], dsn);
    let revision = config["storeRevision"].as_str().unwrap().to_owned();
    assert_eventually!(
        PATIENCE,
        "instances report the revision they applied",
        || async {
            let instances = admin::json(&admin::get(admin_one, "/admin/v1/instances").await);
            let versions: Vec<String> = instances
                .as_array()
                .unwrap()
                .iter()
                .map(|i| i["version"].as_str().unwrap_or_default().to_owned())
                .collect();
            expect_eq(versions, vec![revision.clone(), revision.clone()])
        }
    );

    // Idle, the watches block in Consul instead of polling it. The session renewals (every
    // third of the TTL) are not KV reads.
    let reads_before = consul.kv_request_count();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle_reads = consul.kv_request_count() - reads_before;
    println!("consul fleet: KV reads by two idle gateways in 1 s: {idle_reads}");
    assert_eq!(idle_reads, 0, "KV reads in 1 s of idleness");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_gateways_serve_through_a_consul_outage_and_catch_up() {
    let consul = consul().await;
    let dsn = store_dsn(&consul);
    let (file, added) = (
        Upstream::named("file").await,
        Upstream::named("added").await,
    );
    let one = member(&dsn, &file.target()).await;
    let two = member(&dsn, &file.target()).await;
    let (admin_one, admin_two) = (one.admin_addr.unwrap(), two.admin_addr.unwrap());
    let put = admin::put(
        admin_one,
        "before",
        &admin::endpoint("/before/*", &added.target()),
        &[],
    )
    .await;
    assert_eq!(put.status, 200, "{}", put.body);
    first_200(&two.url("/before/x")).await;

    consul.stop().await;
    let down = Instant::now();
    // Both keep serving the last config throughout the outage.
    while down.elapsed() < Duration::from_secs(3) {
        for gw in [&one, &two] {
            for path in ["/before/x", "/file/x"] {
                let reply = get(&gw.url(path)).await;
                assert_eq!(
                    reply.status, 200,
                    "{path} during the outage: {}",
                    reply.body
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A write cannot reach the store: refused with a clear 503, and nothing changes.
    let refused = admin::put(
        admin_two,
        "during",
        &admin::endpoint("/during/*", &added.target()),
        &[],
    )
    .await;
    assert_eq!(refused.status, 503, "{}", refused.body);
    let error = admin::json(&refused)["error"].as_str().unwrap().to_owned();
    assert!(
        error.starts_with(&format!(
            "config store unavailable: Consul at {}",
            consul.address()
        )),
        "{error}"
    );
    println!("consul fleet: a PUT while Consul is down: 503 {error}");
    let refused = admin::delete(admin_one, "before", &[]).await;
    assert_eq!(refused.status, 503, "{}", refused.body);
    assert_eq!(get(&two.url("/during/x")).await.status, 404);

    consul.restart().await;
    let back = Instant::now();
    for gw in [&one, &two] {
        assert_eq!(get(&gw.url("/before/x")).await.status, 200);
    }
    // A change made in Consul once it is back (by another tool, straight into the KV)
    // reaches both: their watches resumed.
    let value = json!({"id": "direct", "endpoint": admin::endpoint("/direct/*", &added.target())});
    let (status, _, body) = consul
        .request("PUT", "/v1/kv/fleet/endpoints/direct", value.to_string())
        .await;
    assert_eq!((status.as_u16(), body.as_str()), (200, "true"));
    for gw in [&one, &two] {
        first_200(&gw.url("/direct/x")).await;
    }
    println!(
        "consul fleet: both gateways routed a change made after Consul's restart {} after the restart",
        millis(back.elapsed())
    );
    // Writes through either gateway reach the other again.
    assert_eventually!(
        PATIENCE,
        "a PUT through gateway two succeeds again",
        || async {
            expect_eq(
                admin::put(
                    admin_two,
                    "after",
                    &admin::endpoint("/after/*", &added.target()),
                    &[],
                )
                .await
                .status,
                200,
            )
        }
    );
    let latency = first_200(&one.url("/after/x")).await;
    println!(
        "consul fleet after a Consul restart: PUT on two -> first 200 on one: {}",
        millis(latency)
    );
    let put = admin::put(
        admin_one,
        "later",
        &admin::endpoint("/later/*", &added.target()),
        &[],
    )
    .await;
    assert_eq!(put.status, 200, "{}", put.body);
    first_200(&two.url("/later/x")).await;
    // Both still listed after the outage.
    let mut want = vec![admin_one.to_string(), admin_two.to_string()];
    want.sort();
    assert_eventually!(PATIENCE, "both gateways listed again", || async {
        expect_eq(instance_addrs(admin_two).await, want.clone())
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acl_token_in_the_dsn_is_sent_and_never_shown() {
    let consul = ConsulDouble::start_with_token("s3cret-token").await;
    consul.set_session_ttl_min(Duration::from_secs(1));
    let dsn = format!("consul://{}/fleet?token=s3cret-token", consul.address());
    let (file, added) = (
        Upstream::named("file").await,
        Upstream::named("added").await,
    );
    let gateway = member(&dsn, &file.target()).await;
    let admin_addr = gateway.admin_addr.unwrap();
    let put = admin::put(
        admin_addr,
        "tokened",
        &admin::endpoint("/tokened/*", &added.target()),
        &[],
    )
    .await;
    assert_eq!(put.status, 200, "{}", put.body);
    assert_eq!(get(&gateway.url("/tokened/x")).await.body, "added");
    assert_eventually!(PATIENCE, "listed", || async {
        expect_eq(
            instance_addrs(admin_addr).await,
            vec![admin_addr.to_string()],
        )
    });
    let config = admin::get(admin_addr, "/admin/v1/config").await;
    assert_eq!(
        admin::json(&config)["store"],
        format!("consul://{}/fleet", consul.address())
    );
    assert!(!config.body.contains("s3cret"), "{}", config.body);
    let inspect = get(&gateway.url("/debug/config/inspect")).await;
    assert!(!inspect.body.contains("s3cret"), "{}", inspect.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_that_dies_leaves_the_instance_list_after_its_session_ttl() {
    let consul = consul().await;
    let dsn = store_dsn(&consul);
    let file = Upstream::named("file").await;
    let survivor = member(&dsn, &file.target()).await;
    let leaver = member(&dsn, &file.target()).await;
    let admin_addr = survivor.admin_addr.unwrap();
    let leaver_addr = leaver.admin_addr.unwrap();
    let mut doomed = Doomed::start(
        fleet::store_flags(&dsn, LEASE_TTL),
        config::single("/file/*", &file.target(), ""),
    );
    let mut all = vec![
        admin_addr.to_string(),
        leaver_addr.to_string(),
        doomed.admin_addr.to_string(),
    ];
    all.sort();
    assert_eventually!(PATIENCE, "three gateways listed", || async {
        expect_eq(instance_addrs(admin_addr).await, all.clone())
    });
    assert_eq!(consul.session_ids().len(), 3, "one session per gateway");

    // A clean shutdown destroys the session: that gateway leaves at once.
    let stopped = Instant::now();
    leaver.stop().await.expect("clean stop");
    let mut two = vec![admin_addr.to_string(), doomed.admin_addr.to_string()];
    two.sort();
    assert_eventually!(PATIENCE, "the stopped gateway leaves the list", || async {
        expect_eq(instance_addrs(admin_addr).await, two.clone())
    });
    println!(
        "consul fleet: a stopped gateway left the instance list {} after it stopped",
        millis(stopped.elapsed())
    );
    assert!(
        stopped.elapsed() < Duration::from_secs(1),
        "it left by destroying its session, not by the TTL"
    );

    let died = Instant::now();
    doomed.die();
    // Still listed just after (nobody destroyed its session), gone once Consul expires it
    // (after up to twice the 1 s TTL).
    assert_eventually!(PATIENCE, "the dead gateway leaves the list", || async {
        expect_eq(
            instance_addrs(admin_addr).await,
            vec![admin_addr.to_string()],
        )
    });
    println!(
        "consul fleet: a dead gateway left the instance list {:.1} s after it died (session TTL {LEASE_TTL})",
        died.elapsed().as_secs_f64()
    );
    assert!(
        died.elapsed() >= Duration::from_secs(1),
        "it left by session expiry, not by a destroy"
    );
    assert_eq!(
        consul.session_ids().len(),
        1,
        "only the survivor's session is left"
    );
}

//! A fleet of gateways sharing one config store in a real etcd (Debian's 3.4): a PUT
//! through one gateway's admin API is routed by the other, both keep serving while etcd is
//! down and catch up when it returns, and a gateway that dies without deregistering leaves
//! the instance list when its lease ends.

use std::time::{Duration, Instant};

use tests::admin::{self, TOKEN};
use tests::assert_eventually;
use tests::config;
use tests::etcd::EtcdServer;
use tests::eventually::expect_eq;
use tests::fleet::{self, Doomed, first_200, instance_addrs};
use tests::harness::{TestGateway, Upstream, get};

const PATIENCE: Duration = Duration::from_secs(10);

/// The hidden lease TTL the tests run with, so a dead gateway is gone in seconds.
const LEASE_TTL: &str = "2s";

fn dsn(etcd: &EtcdServer) -> String {
    format!("etcd://{}/fleet", etcd.endpoint())
}

async fn member(etcd: &EtcdServer, file_target: &str) -> TestGateway {
    fleet::member(&dsn(etcd), LEASE_TTL, file_target).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_on_one_gateway_is_routed_by_the_other() {
    let etcd = EtcdServer::start().await;
    let (file, added) = (
        Upstream::named("file").await,
        Upstream::named("added").await,
    );
    let one = member(&etcd, &file.target()).await;
    let two = member(&etcd, &file.target()).await;
    let (admin_one, admin_two) = (one.admin_addr.unwrap(), two.admin_addr.unwrap());

    let mut latencies = Vec::new();
    for round in 0..3 {
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
        // The other gateway's admin API sees the same endpoint and version.
        let seen =
            admin::json(&admin::get(admin_two, &format!("/admin/v1/endpoints/added{round}")).await);
        assert_eq!(seen["version"], version);
    }
    for latency in &latencies {
        println!(
            "etcd fleet: PUT on gateway one -> first 200 on gateway two: {:.1} ms",
            latency.as_secs_f64() * 1000.0
        );
    }

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
    let deleted = admin::delete(admin_one, "added1", &[]).await;
    assert_eq!(deleted.status, 200, "{}", deleted.body);
    assert_eventually!(PATIENCE, "gateway two drops the deleted route", || async {
        expect_eq(get(&two.url("/added1/x")).await.status, 404)
    });

    // Both are listed, each with the store revision it applied.
    let mut want = vec![admin_one.to_string(), admin_two.to_string()];
    want.sort();
    assert_eventually!(PATIENCE, "both gateways listed", || async {
        expect_eq(instance_addrs(admin_one).await, want.clone())
    });
    let config = admin::json(&admin::get(admin_two, "/admin/v1/config").await);
    assert_eq!(config["source"], "store");
    assert_eq!(config["store"], format!("etcd://{}/fleet", etcd.endpoint()));
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
    let _ = TOKEN;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_gateways_serve_through_an_etcd_outage_and_catch_up() {
    let mut etcd = EtcdServer::start().await;
    let (file, added) = (
        Upstream::named("file").await,
        Upstream::named("added").await,
    );
    let one = member(&etcd, &file.target()).await;
    let two = member(&etcd, &file.target()).await;
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

    etcd.kill();
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
    // A write cannot reach the store: refused, and nothing changes.
    let refused = admin::put(
        admin_two,
        "during",
        &admin::endpoint("/during/*", &added.target()),
        &[],
    )
    .await;
    assert_eq!(refused.status, 503, "{}", refused.body);
    assert_eq!(get(&two.url("/during/x")).await.status, 404);

    etcd.restart().await;
    for gw in [&one, &two] {
        assert_eq!(get(&gw.url("/before/x")).await.status, 200);
    }
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
        "etcd fleet after an etcd restart: PUT on two -> first 200 on one: {:.1} ms",
        latency.as_secs_f64() * 1000.0
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
    // Both re-registered after the outage.
    let mut want = vec![admin_one.to_string(), admin_two.to_string()];
    want.sort();
    assert_eventually!(PATIENCE, "both gateways listed again", || async {
        expect_eq(instance_addrs(admin_two).await, want.clone())
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_that_dies_leaves_the_instance_list_after_its_lease() {
    let etcd = EtcdServer::start().await;
    let file = Upstream::named("file").await;
    let survivor = member(&etcd, &file.target()).await;
    let admin_addr = survivor.admin_addr.unwrap();
    let mut doomed = Doomed::start(
        fleet::store_flags(&dsn(&etcd), LEASE_TTL),
        config::single("/file/*", &file.target(), ""),
    );
    let mut both = vec![admin_addr.to_string(), doomed.admin_addr.to_string()];
    both.sort();
    assert_eventually!(PATIENCE, "both gateways listed", || async {
        expect_eq(instance_addrs(admin_addr).await, both.clone())
    });

    let died = Instant::now();
    doomed.die();
    // Still listed just after (nobody deregistered it), gone once the 2 s lease ends.
    assert_eventually!(PATIENCE, "the dead gateway leaves the list", || async {
        expect_eq(
            instance_addrs(admin_addr).await,
            vec![admin_addr.to_string()],
        )
    });
    println!(
        "etcd fleet: a dead gateway left the instance list {:.1} s after it died (lease TTL {LEASE_TTL})",
        died.elapsed().as_secs_f64()
    );
    assert!(
        died.elapsed() >= Duration::from_secs(1),
        "it left by lease expiry, not by a revoke"
    );
}

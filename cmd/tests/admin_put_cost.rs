//! What an admin PUT costs when the config holds 1,000 endpoints, on the `gateway` binary.
//! Ignored by default (it prints figures, it asserts only that PUTs work); run it with
//!
//! ```sh
//! cargo test -p cmd --test admin_put_cost -- --ignored --nocapture
//! ```
//!
//! Three layouts: the 1,000 endpoints in the config file (file store), in the file store,
//! and in an etcd store. Each round PUTs a new endpoint and times the answer (the PUT
//! answers once this gateway routes the change) and the first 200 on the new route.

#[path = "../../tests/src/etcd.rs"]
#[allow(dead_code, unreachable_pub)]
mod etcd;
mod support;

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use support::{Gateway, admin_put, endpoint, get, upstream};

const ENDPOINTS: usize = 1_000;
const ROUNDS: usize = 7;

fn endpoint_yaml(path: &str, target: &str) -> String {
    format!("  - path: {path}\n    backends:\n      - target: {target}\n")
}

/// PUTs `ROUNDS` new endpoints (after one warm-up); per round, the ms until the PUT
/// answered and until the new route first answered 200.
fn measure(gateway: &Gateway, target: &str) -> Vec<(f64, f64)> {
    let mut figures = Vec::new();
    for round in 0..=ROUNDS {
        let path = format!("/new{round}");
        let started = Instant::now();
        let put = admin_put(
            gateway.admin(),
            &format!("new{round}"),
            &endpoint(&path, target),
        );
        let answered = started.elapsed();
        assert_eq!(put.status, 200, "{}", put.body);
        while get(gateway.addr, &path).status != 200 {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "{path} never routed"
            );
        }
        let routed = started.elapsed();
        if round > 0 {
            figures.push((
                answered.as_secs_f64() * 1000.0,
                routed.as_secs_f64() * 1000.0,
            ));
        }
    }
    let log = gateway.log_tail(usize::MAX);
    let applied = |prebuilt: bool| {
        log.lines()
            .filter(|line| line.contains("config applied"))
            .filter(|line| line.contains(&format!("prebuilt={prebuilt}")))
            .count()
    };
    println!(
        "  applies logged: {} with the router the PUT built, {} built again",
        applied(true),
        applied(false)
    );
    figures
}

fn wait_routed(gateway: &Gateway, path: &str) {
    support::eventually(
        Duration::from_secs(10),
        "the stored endpoints are routed",
        || match get(gateway.addr, path).status {
            200 => Ok(()),
            other => Err(format!("status {other}")),
        },
    );
}

fn report(layout: &str, figures: &[(f64, f64)]) {
    let mut answered: Vec<f64> = figures.iter().map(|f| f.0).collect();
    answered.sort_by(f64::total_cmp);
    let mut routed: Vec<f64> = figures.iter().map(|f| f.1).collect();
    routed.sort_by(f64::total_cmp);
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    println!(
        "PUT cost ({profile} build), {ENDPOINTS} endpoints {layout}: answered median {:.1} ms (min {:.1}, max {:.1}); routed median {:.1} ms; {} rounds",
        answered[answered.len() / 2],
        answered[0],
        answered[answered.len() - 1],
        routed[routed.len() / 2],
        figures.len()
    );
}

fn admin_args<'a>(conf: &'a str, store: &'a str) -> Vec<&'a str> {
    vec![
        "--conf",
        conf,
        "--addr",
        "127.0.0.1:0",
        "--admin-addr",
        "127.0.0.1:0",
        "--admin-token",
        support::TOKEN,
        "--store",
        store,
    ]
}

#[test]
#[ignore = "prints the cost of a PUT on 1,000 endpoints; run with --ignored --nocapture"]
fn cost_of_an_admin_put_with_1000_endpoints() {
    let target = upstream("big");
    let dir = tempfile::tempdir().unwrap();

    // 1. In the config file.
    let mut yaml = String::from("name: big\nendpoints:\n");
    for i in 0..ENDPOINTS {
        yaml.push_str(&endpoint_yaml(&format!("/e{i}/*"), &target));
    }
    let big_conf = dir.path().join("big.yaml");
    std::fs::write(&big_conf, &yaml).unwrap();
    let store = format!("file://{}", dir.path().join("empty-store").display());
    let gateway = Gateway::start(&admin_args(big_conf.to_str().unwrap(), &store));
    report("in the config file", &measure(&gateway, &target));
    drop(gateway);

    // 2. In the file store (one file per endpoint, as the store writes them).
    let small_conf = support::file_config(dir.path(), &target);
    let store_dir = dir.path().join("store");
    std::fs::create_dir_all(&store_dir).unwrap();
    for i in 0..ENDPOINTS {
        let mut file = format!("name: e{i}\nversion: '1'\nendpoints:\n");
        let _ = write!(file, "{}", endpoint_yaml(&format!("/e{i}/*"), &target));
        std::fs::write(store_dir.join(format!("e{i}.yaml")), file).unwrap();
    }
    let store = format!("file://{}", store_dir.display());
    let gateway = Gateway::start(&admin_args(&small_conf, &store));
    wait_routed(&gateway, "/e999/x");
    report("in the file store", &measure(&gateway, &target));
    drop(gateway);

    // 3. In an etcd store.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let etcd = runtime.block_on(etcd::EtcdServer::start());
    runtime.block_on(async {
        let mut client = etcd.client().await;
        for i in 0..ENDPOINTS {
            let value = serde_json::json!({
                "id": format!("e{i}"),
                "endpoint": endpoint(&format!("/e{i}/*"), &target),
            });
            client
                .put(format!("/big/endpoints/e{i}"), value.to_string(), None)
                .await
                .unwrap();
        }
    });
    let store = format!("etcd://{}/big", etcd.endpoint());
    let gateway = Gateway::start(&admin_args(&small_conf, &store));
    wait_routed(&gateway, "/e999/x");
    report("in an etcd store", &measure(&gateway, &target));
}

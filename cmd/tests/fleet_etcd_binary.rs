//! Two `gateway` processes sharing one config store in a real etcd (Debian's 3.4), each with
//! its own proxy listener and admin API: a PUT through one is routed by the other (the
//! latency is printed), both keep serving while etcd is killed and restarted, and a gateway
//! killed with SIGKILL leaves the instance list when its lease ends.

#[path = "../../tests/src/etcd.rs"]
#[allow(dead_code, unreachable_pub)]
mod etcd;
mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use etcd::EtcdServer;
use support::{Gateway, admin_get, admin_put, endpoint, eventually, file_config, get, upstream};

const PATIENCE: Duration = Duration::from_secs(10);

/// The hidden lease TTL the gateways run with, so a dead one is gone in seconds.
const LEASE_TTL: &str = "2s";

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime for the etcd harness")
}

/// A gateway process on the store `etcd://ETCD/fleet` whose file config routes `/file/*`.
fn member(conf: &str, etcd: &EtcdServer) -> Gateway {
    let store = format!("etcd://{}/fleet", etcd.endpoint());
    Gateway::start(&[
        "--conf",
        conf,
        "--addr",
        "127.0.0.1:0",
        "--admin-addr",
        "127.0.0.1:0",
        "--admin-token",
        support::TOKEN,
        "--store",
        &store,
        "--store-lease-ttl",
        LEASE_TTL,
    ])
}

/// Polls `GET path` on `addr` (every 1 ms, at most [`PATIENCE`]) on a thread started now;
/// the thread answers how long after `started` the first 200 came.
fn first_200_from(
    addr: SocketAddr,
    path: String,
    started: Instant,
) -> thread::JoinHandle<Option<Duration>> {
    thread::spawn(move || {
        while started.elapsed() < PATIENCE {
            if get(addr, &path).status == 200 {
                return Some(started.elapsed());
            }
            thread::sleep(Duration::from_millis(1));
        }
        None
    })
}

/// The `addr` → `version` of every instance `admin` lists, sorted by addr.
fn instances(admin: SocketAddr) -> Result<Vec<(String, String)>, String> {
    let reply = admin_get(admin, "/admin/v1/instances");
    if reply.status != 200 {
        return Err(format!("{} {}", reply.status, reply.body));
    }
    let mut list: Vec<(String, String)> = reply
        .json()
        .as_array()
        .ok_or("not a list")?
        .iter()
        .map(|i| {
            (
                i["addr"].as_str().unwrap_or_default().to_owned(),
                i["version"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    list.sort();
    Ok(list)
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

#[test]
fn a_put_on_one_gateway_process_is_routed_by_the_other() {
    let test_started = Instant::now();
    let etcd = runtime().block_on(EtcdServer::start());
    let (file, added) = (upstream("file"), upstream("added"));
    let dir = tempfile::tempdir().unwrap();
    let conf = file_config(dir.path(), &file);
    let one = member(&conf, &etcd);
    let two = member(&conf, &etcd);
    assert_eq!(get(two.addr, "/file/x").body, "file");

    let mut figures = Vec::new();
    for round in 0..5 {
        let path = format!("/added{round}/x");
        assert_eq!(get(two.addr, &path).status, 404, "before round {round}");
        let started = Instant::now();
        let poller = first_200_from(two.addr, path.clone(), started);
        let put = admin_put(
            one.admin(),
            &format!("added{round}"),
            &endpoint(&format!("/added{round}/*"), &added),
        );
        let answered = started.elapsed();
        assert_eq!(put.status, 200, "{}", put.body);
        let routed = poller
            .join()
            .unwrap()
            .unwrap_or_else(|| panic!("gateway two never routed {path}"));
        assert_eq!(get(two.addr, &path).body, "added");
        // The other gateway's admin API serves the same stored version.
        let seen = admin_get(two.admin(), &format!("/admin/v1/endpoints/added{round}"));
        assert_eq!(seen.json()["version"], put.json()["version"]);
        figures.push((answered, routed));
    }
    for (answered, routed) in &figures {
        println!(
            "etcd fleet (2 processes): PUT on gateway one answered in {:.1} ms; first 200 from gateway two {:.1} ms after the PUT was sent",
            ms(*answered),
            ms(*routed)
        );
    }
    let worst = figures.iter().map(|(_, routed)| *routed).max().unwrap();
    assert!(
        worst < Duration::from_secs(1),
        "change-to-routed latency {worst:?} (target 100 ms on loopback)"
    );
    println!("test took {:.1} s", test_started.elapsed().as_secs_f64());
}

#[test]
fn both_gateway_processes_serve_through_an_etcd_kill_and_restart() {
    let test_started = Instant::now();
    let runtime = runtime();
    let mut etcd = runtime.block_on(EtcdServer::start());
    let (file, added) = (upstream("file"), upstream("added"));
    let dir = tempfile::tempdir().unwrap();
    let conf = file_config(dir.path(), &file);
    let one = member(&conf, &etcd);
    let two = member(&conf, &etcd);
    let put = admin_put(one.admin(), "before", &endpoint("/before/*", &added));
    assert_eq!(put.status, 200, "{}", put.body);
    eventually(PATIENCE, "gateway two routes /before/", || {
        match get(two.addr, "/before/x").status {
            200 => Ok(()),
            other => Err(format!("status {other}")),
        }
    });

    // Requests to both gateways, every 10 ms, from before the kill until both caught up.
    let stop = Arc::new(AtomicBool::new(false));
    let checker = {
        let stop = stop.clone();
        let addrs = [one.addr, two.addr];
        thread::spawn(move || {
            let (mut served, mut failures) = (0_u32, Vec::new());
            let started = Instant::now();
            while !stop.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(60) {
                for addr in addrs {
                    for path in ["/before/x", "/file/x"] {
                        let reply = get(addr, path);
                        if reply.status == 200 {
                            served += 1;
                        } else {
                            failures.push(format!(
                                "{addr}{path} at {:?}: {} {}",
                                started.elapsed(),
                                reply.status,
                                reply.body
                            ));
                        }
                    }
                }
                thread::sleep(Duration::from_millis(10));
            }
            (served, failures)
        })
    };

    etcd.kill();
    let outage = Instant::now();
    // A write cannot reach the store: a clear 503, and nothing changes.
    let refused = admin_put(two.admin(), "during", &endpoint("/during/*", &added));
    let refused_after = outage.elapsed();
    assert_eq!(refused.status, 503, "{}", refused.body);
    let error = refused.json()["error"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(error.starts_with("config store unavailable"), "{error}");
    assert_eq!(get(two.addr, "/during/x").status, 404);
    // Both gateways noticed the outage (their watch failed) while still serving.
    for gw in [&one, &two] {
        eventually(PATIENCE, "the gateway logs the store watch failure", || {
            let log = gw.log_tail(200);
            if log.contains("config store watch failed") {
                Ok(())
            } else {
                Err("no watch failure logged yet".to_owned())
            }
        });
    }
    runtime.block_on(etcd.restart());
    let down_for = outage.elapsed();

    // A new PUT (through either gateway) reaches both.
    let restarted = Instant::now();
    eventually(PATIENCE, "a PUT through gateway one succeeds again", || {
        let put = admin_put(one.admin(), "after", &endpoint("/after/*", &added));
        if put.status == 200 {
            Ok(())
        } else {
            Err(format!("{} {}", put.status, put.body))
        }
    });
    for gw in [&one, &two] {
        eventually(PATIENCE, "both gateways route /after/", || {
            match get(gw.addr, "/after/x").status {
                200 => Ok(()),
                other => Err(format!("{}: status {other}", gw.addr)),
            }
        });
    }
    let caught_up = restarted.elapsed();
    stop.store(true, Ordering::Relaxed);
    let (served, failures) = checker.join().unwrap();
    assert!(
        failures.is_empty(),
        "{} request(s) failed during the outage:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(served >= 40, "only {served} requests were made");
    println!(
        "etcd fleet (2 processes): etcd down {:.1} s, {served} requests all 200; the write during the outage got 503 in {:.1} ms; after the restart a PUT reached both gateways in {:.1} ms",
        down_for.as_secs_f64(),
        ms(refused_after),
        ms(caught_up)
    );
    println!("test took {:.1} s", test_started.elapsed().as_secs_f64());
}

#[test]
fn a_gateway_process_killed_with_sigkill_leaves_the_instance_list() {
    let test_started = Instant::now();
    let etcd = runtime().block_on(EtcdServer::start());
    let file = upstream("file");
    let dir = tempfile::tempdir().unwrap();
    let conf = file_config(dir.path(), &file);
    let one = member(&conf, &etcd);
    let mut two = member(&conf, &etcd);
    let put = admin_put(one.admin(), "shared", &endpoint("/shared/*", &file));
    assert_eq!(put.status, 200, "{}", put.body);
    let version = put.json()["version"].as_str().unwrap().to_owned();

    // Both listed, each with the store revision it applied: the PUT's.
    let mut want = vec![
        (one.admin().to_string(), version.clone()),
        (two.admin().to_string(), version.clone()),
    ];
    want.sort();
    eventually(
        PATIENCE,
        "both instances listed at the PUT's revision",
        || {
            let seen = instances(one.admin())?;
            if seen == want {
                Ok(())
            } else {
                Err(format!("{seen:?}"))
            }
        },
    );
    for gw in [&one, &two] {
        let config = admin_get(gw.admin(), "/admin/v1/config").json();
        assert_eq!(config["storeRevision"], version.as_str(), "{config}");
    }
    assert_eq!(instances(two.admin()).unwrap(), want);

    let killed = Instant::now();
    two.kill();
    // Nobody deregistered it: it goes when its lease ends.
    let alone = vec![(one.admin().to_string(), version.clone())];
    eventually(PATIENCE, "the killed gateway leaves the list", || {
        let seen = instances(one.admin())?;
        if seen == alone {
            Ok(())
        } else {
            Err(format!("{seen:?}"))
        }
    });
    let gone_after = killed.elapsed();
    println!(
        "etcd fleet (2 processes): a gateway killed with SIGKILL left the instance list {:.2} s later (lease TTL {LEASE_TTL})",
        gone_after.as_secs_f64()
    );
    assert!(
        gone_after >= Duration::from_secs(1),
        "it left by lease expiry, not by a revoke ({gone_after:?})"
    );
    // The survivor still serves.
    assert_eq!(get(one.addr, "/shared/x").body, "file");
    println!("test took {:.1} s", test_started.elapsed().as_secs_f64());
}

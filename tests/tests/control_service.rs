//! The control service (`--ctrl-service`) against a double that follows go-kratos/gateway's
//! ctrl loader protocol: releases written and applied, 304s, priority configs, failover,
//! refused configs, feature flags, the debug views and atomic file replacement.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use tests::assert_eventually;
use tests::config::single;
use tests::ctrl::{CtrlDouble, FEATURES, RELEASE};
use tests::eventually::expect_eq;
use tests::harness::{TestGateway, Upstream, get, text, unused_port};

const PATIENCE: Duration = Duration::from_secs(10);

/// A Kratos gateway config (protojson, as a control service sends it): `(path, target)`
/// endpoints, GET only.
fn config(version: &str, endpoints: &[(&str, &str)]) -> Value {
    let endpoints: Vec<Value> = endpoints
        .iter()
        .map(|(path, target)| {
            json!({"path": path, "method": "GET", "protocol": "HTTP", "timeout": "5s",
                   "backends": [{"target": target, "weight": "10"}]})
        })
        .collect();
    json!({"name": "ctrl-test", "version": version, "endpoints": endpoints})
}

/// A priority config: endpoints only.
fn priority(endpoints: &[(&str, &str)]) -> Value {
    let mut config = config("", endpoints);
    if let Some(fields) = config.as_object_mut() {
        fields.retain(|key, _| key == "endpoints");
    }
    config
}

/// Flags for a gateway polling `services` every 100 ms.
fn ctrl_flags(services: &str) -> Vec<String> {
    [
        "--ctrl-service",
        services,
        "--ctrl-name",
        "gw-test",
        "--advertise-addr",
        "10.1.2.3",
        "--ctrl-interval",
        "100ms",
        "--ctrl-timeout",
        "2s",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

async fn start(disk_yaml: &str, flags: &[String]) -> TestGateway {
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    TestGateway::start_with(disk_yaml, &flags)
        .await
        .expect("gateway starts")
}

async fn body(gw: &TestGateway, path: &str) -> String {
    let reply = get(&gw.url(path)).await;
    format!("{} {}", reply.status, reply.body.trim_end())
}

async fn json_view(gw: &TestGateway, path: &str) -> Value {
    let reply = get(&gw.url(path)).await;
    serde_json::from_str(&reply.body).unwrap_or_else(|e| panic!("{path}: {e}: {}", reply.body))
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_is_applied_at_start_up_and_304_keeps_it_until_a_new_version() {
    let (a, b) = (Upstream::named("A").await, Upstream::named("B").await);
    let ctrl = CtrlDouble::start().await;
    ctrl.release("v1", &config("v1", &[("/b", &b.target())]), &[]);
    let store = tempfile::tempdir().unwrap();
    let mut flags = ctrl_flags(&ctrl.url());
    flags.extend(tests::admin::flags(&format!(
        "file://{}",
        store.path().display()
    )));
    let gw = start(&single("/a", &a.target(), ""), &flags).await;

    // Fetched before the first load: the gateway starts on the release, not on the disk file.
    assert_eq!(body(&gw, "/b").await, "200 B");
    assert_eq!(get(&gw.url("/a")).await.status, 404);
    let first = &ctrl.calls(RELEASE)[0];
    assert_eq!(first.param("gateway"), Some("gw-test"));
    assert_eq!(first.param("ip_addr"), Some("10.1.2.3"));
    assert_eq!(first.param("last_version"), Some(""));
    let written = std::fs::read_to_string(&gw.conf).unwrap();
    assert!(
        !written.trim_start().starts_with('{'),
        "written as YAML: {written}"
    );
    assert_eq!(
        configs::parse(&written, &gw.conf).unwrap().version,
        "v1",
        "{written}"
    );
    // The config in force says it is the control service's release v1.
    let origin = json!({"source": "ctrl", "path": gw.conf.display().to_string(),
                        "url": ctrl.url(), "name": "gw-test", "version": "v1"});
    let status = json_view(&gw, "/debug/config/inspect").await;
    assert_eq!(status["source"], "ctrl", "{status}");
    assert_eq!(status["base"], origin);

    // The version goes back as last_version, and 304 leaves the file alone.
    let inode = std::fs::metadata(&gw.conf).unwrap().ino();
    assert_eventually!(PATIENCE, "three 304 answers", || async {
        ctrl.calls(RELEASE)
            .iter()
            .filter(|c| c.status == 304)
            .count()
            >= 3
    });
    assert!(
        ctrl.calls(RELEASE)[1..]
            .iter()
            .all(|c| c.param("last_version") == Some("v1"))
    );
    assert_eq!(std::fs::metadata(&gw.conf).unwrap().ino(), inode);
    assert_eq!(body(&gw, "/b").await, "200 B");

    // A new version is written and applied.
    ctrl.release("v2", &config("v2", &[("/c", &a.target())]), &[]);
    assert_eventually!(PATIENCE, "the v2 route answers", || async {
        expect_eq(body(&gw, "/c").await, "200 A")
    });
    assert_eq!(get(&gw.url("/b")).await.status, 404);
    assert_eq!(
        json_view(&gw, "/debug/config/inspect").await["base"]["version"],
        "v2"
    );
    // The admin API says the same, with the store revision merged in.
    let admin_config =
        tests::admin::json(&tests::admin::get(gw.admin_addr.unwrap(), "/admin/v1/config").await);
    assert_eq!(admin_config["source"], "ctrl", "{admin_config}");
    assert_eq!(admin_config["base"]["source"], "ctrl");
    assert_eq!(admin_config["base"]["name"], "gw-test");
    assert_eq!(admin_config["base"]["version"], "v2");
    let revision = admin_config["storeRevision"].as_str().unwrap();
    assert_eq!(admin_config["version"], format!("v2+{revision}"));

    let inspect = json_view(&gw, "/debug/ctrl/inspect").await;
    assert_eq!(inspect["last_version"], "v2");
    assert_eq!(inspect["url"], ctrl.url());
    assert_eq!(inspect["hostname"], "gw-test");
    assert_eq!(inspect["advertise_addr"], "10.1.2.3");
    assert_eq!(inspect["releases"], 2);
    assert_eq!(inspect["last_error"], Value::Null);
    assert!(inspect["last_fetch"].is_string() && inspect["last_success"].is_string());
    assert_eq!(inspect["features"]["gw:Retry"], true);
    assert_eq!(
        json_view(&gw, "/debug/ctrl/load").await,
        ctrl.payload().unwrap()
    );
    let index = get(&gw.url("/debug")).await.body;
    assert!(index.contains("/debug/ctrl/inspect") && index.contains("/debug/ctrl/load"));
    gw.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn priority_configs_are_written_and_stale_ones_removed() {
    let (a, b) = (Upstream::named("A").await, Upstream::named("B").await);
    let ctrl = CtrlDouble::start().await;
    ctrl.set_features(&[("gw:PriorityConfig", true)]);
    ctrl.release(
        "v1",
        &config("v1", &[("/main", &a.target())]),
        &[
            ("canary", priority(&[("/p", &b.target())]), "c1"),
            ("old", priority(&[("/q", &b.target())]), "o1"),
        ],
    );
    let dir = tempfile::tempdir().unwrap();
    let priority_dir: PathBuf = dir.path().join("priority");
    std::fs::create_dir(&priority_dir).unwrap();
    std::fs::write(priority_dir.join("manual.yml"), "endpoints: []\n").unwrap();
    let mut flags = ctrl_flags(&ctrl.url());
    flags.extend(["--priority-dir".into(), priority_dir.display().to_string()]);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let gw = TestGateway::start_in(dir, &single("/disk", &a.target(), ""), &flags)
        .await
        .expect("gateway starts");

    assert_eq!(
        files_in(&priority_dir),
        ["canary.yaml", "manual.yml", "old.yaml"]
    );
    assert_eq!(body(&gw, "/p").await, "200 B");
    assert_eq!(body(&gw, "/q").await, "200 B");
    assert_eq!(body(&gw, "/main").await, "200 A");

    // With gw:PriorityConfig the next calls report the priority versions.
    assert_eventually!(PATIENCE, "priority versions sent back", || async {
        ctrl.calls(RELEASE).iter().any(|call| {
            call.param("supportPriorityConfig") == Some("1")
                && call.params("lastPriorityVersions") == ["canary=c1", "old=o1"]
        })
    });

    ctrl.release(
        "v2",
        &config("v2", &[("/main", &a.target())]),
        &[("canary", priority(&[("/p", &a.target())]), "c2")],
    );
    assert_eventually!(PATIENCE, "the new canary applies", || async {
        expect_eq(body(&gw, "/p").await, "200 A")
    });
    assert_eq!(get(&gw.url("/q")).await.status, 404);
    // Kratos removes the *.yaml files it did not write; other files stay.
    assert_eq!(files_in(&priority_dir), ["canary.yaml", "manual.yml"]);
    let inspect = json_view(&gw, "/debug/ctrl/inspect").await;
    assert_eq!(inspect["last_priority_versions"], json!({"canary": "c2"}));
    assert_eq!(inspect["features"]["gw:PriorityConfig"], true);
    gw.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_url_refusing_connections_fails_over_to_the_next() {
    let b = Upstream::named("B").await;
    let ctrl = CtrlDouble::start().await;
    ctrl.release("v1", &config("v1", &[("/b", &b.target())]), &[]);
    let refused = format!("http://127.0.0.1:{}", unused_port());
    let gw = start(
        &single("/disk", &b.target(), ""),
        &ctrl_flags(&format!("{refused},{}", ctrl.url())),
    )
    .await;

    // Failed over within the start-up round.
    assert_eq!(body(&gw, "/b").await, "200 B");
    let inspect = json_view(&gw, "/debug/ctrl/inspect").await;
    assert_eq!(inspect["ctrl_service"], json!([refused, ctrl.url()]));
    assert_eq!(inspect["url"], ctrl.url());
    assert_eq!(inspect["ctrl_service_idx"], 1);
    assert_eq!(inspect["last_version"], "v1");
    let error = inspect["last_error"].as_str().unwrap_or_default();
    assert!(
        error.starts_with(&refused) && error.contains("request failed"),
        "{inspect}"
    );
    gw.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_services_are_left_in_turn_and_config_stays() {
    let (a, b) = (Upstream::named("A").await, Upstream::named("B").await);
    let first = CtrlDouble::start().await;
    let second = CtrlDouble::start().await;
    first.release("v1", &config("v1", &[("/one", &a.target())]), &[]);
    second.release("v1", &config("v1", &[("/one", &a.target())]), &[]);
    let mut flags = ctrl_flags(&first.url());
    flags.extend(["--ctrl-service".into(), second.url()]);
    let gw = start(&single("/disk", &a.target(), ""), &flags).await;
    assert_eq!(body(&gw, "/one").await, "200 A");

    // The first answers 500: the second takes over and its release applies.
    first.fail_with(Some(500));
    second.release("v2", &config("v2", &[("/two", &b.target())]), &[]);
    assert_eventually!(PATIENCE, "the second service's release", || async {
        expect_eq(body(&gw, "/two").await, "200 B")
    });
    let inspect = json_view(&gw, "/debug/ctrl/inspect").await;
    assert_eq!(inspect["url"], second.url());
    assert_eq!(
        inspect["last_error"],
        format!("{}: invalid status code: 500", first.url())
    );
    assert!(
        second
            .calls(FEATURES)
            .iter()
            .all(|c| c.param("gateway") == Some("gw-test"))
    );

    // Now the second answers garbage and the first is back: round the list again.
    first.fail_with(None);
    first.release("v3", &config("v3", &[("/three", &a.target())]), &[]);
    second.answer_garbage(true);
    assert_eventually!(PATIENCE, "back on the first service", || async {
        expect_eq(body(&gw, "/three").await, "200 A")
    });
    let inspect = json_view(&gw, "/debug/ctrl/inspect").await;
    assert_eq!(inspect["url"], first.url());
    let error = inspect["last_error"].as_str().unwrap_or_default();
    assert!(error.contains("bad answer: not JSON"), "{inspect}");

    // Both down: the config in force keeps serving.
    first.stop();
    second.stop();
    assert_eventually!(PATIENCE, "the outage is seen", || async {
        let inspect = json_view(&gw, "/debug/ctrl/inspect").await;
        inspect["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("request failed"))
    });
    assert_eq!(body(&gw, "/three").await, "200 A");
    gw.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_release_is_refused_by_the_loader_and_old_routes_keep_serving() {
    let b = Upstream::named("B").await;
    let ctrl = CtrlDouble::start().await;
    ctrl.release("v1", &config("v1", &[("/b", &b.target())]), &[]);
    let gw = start(&single("/disk", &b.target(), ""), &ctrl_flags(&ctrl.url())).await;
    assert_eq!(body(&gw, "/b").await, "200 B");

    // Valid JSON, invalid config (an endpoint without backends): written, then refused
    // by the file loader.
    let mut invalid = config("v2", &[("/new", &b.target())]);
    invalid["endpoints"][0]["backends"] = json!([]);
    ctrl.release("v2", &invalid, &[]);
    assert_eventually!(PATIENCE, "the loader refuses v2", || async {
        let status = json_view(&gw, "/debug/config/inspect").await;
        status["last_error"].is_string()
    });
    assert_eq!(body(&gw, "/b").await, "200 B");
    assert_eq!(get(&gw.url("/new")).await.status, 404);
    let inspect = json_view(&gw, "/debug/ctrl/inspect").await;
    assert_eq!(inspect["last_version"], "v2");
    assert_eq!(
        json_view(&gw, "/debug/config/version").await["version"],
        "v1"
    );
    // v2 was written but refused: the config in force is still release v1.
    let status = json_view(&gw, "/debug/config/inspect").await;
    assert_eq!(
        (
            status["source"].as_str(),
            status["base"]["version"].as_str()
        ),
        (Some("ctrl"), Some("v1")),
        "{status}"
    );

    // A config that is not JSON at all is not written: the file keeps v2's text.
    let before = std::fs::read(&gw.conf).unwrap();
    ctrl.release_text("v3", "endpoints: [this is yaml, not json", &[]);
    assert_eventually!(PATIENCE, "v3 is refused", || async {
        let inspect = json_view(&gw, "/debug/ctrl/inspect").await;
        inspect["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("config is not JSON"))
    });
    assert_eq!(std::fs::read(&gw.conf).unwrap(), before);
    let inspect = json_view(&gw, "/debug/ctrl/inspect").await;
    assert_eq!(inspect["last_version"], "v2");
    assert_eq!(body(&gw, "/b").await, "200 B");
    gw.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_control_service_at_start_up_leaves_the_file_on_disk() {
    let a = Upstream::named("A").await;
    // Accepts connections (the kernel does) but never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", silent.local_addr().unwrap());
    let mut flags = ctrl_flags(&url);
    let timeout = flags.iter().position(|f| f == "2s").unwrap();
    flags[timeout] = "300ms".into();
    let gw = start(&single("/a", &a.target(), ""), &flags).await;
    assert_eq!(body(&gw, "/a").await, "200 A");
    let inspect = json_view(&gw, "/debug/ctrl/inspect").await;
    let error = inspect["last_error"].as_str().unwrap_or_default();
    assert!(error.contains("no answer within"), "{inspect}");
    assert_eq!(inspect["last_version"], "");
    assert!(json_view(&gw, "/debug/ctrl/load").await["error"].is_string());
    // Nothing came from the control service: the config in force is the file's.
    let status = json_view(&gw, "/debug/config/inspect").await;
    assert_eq!(status["source"], "file", "{status}");
    assert_eq!(status["base"]["source"], "file", "{status}");
    gw.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feature_flags_are_shown_and_gw_retry_turns_retries_off() {
    let failing = Upstream::start(|_| async {
        http::Response::builder()
            .status(503)
            .body(text("down"))
            .unwrap()
    })
    .await;
    let ctrl = CtrlDouble::start().await;
    let mut release = config("v1", &[("/r", &failing.target())]);
    release["endpoints"][0]["retry"] =
        json!({"attempts": 3, "conditions": [{"byStatusCode": "503"}]});
    ctrl.release("v1", &release, &[]);
    let gw = start(
        &single("/disk", &failing.target(), ""),
        &ctrl_flags(&ctrl.url()),
    )
    .await;

    assert_eq!(get(&gw.url("/r")).await.status, 503);
    assert_eq!(failing.hits(), 3, "gw:Retry defaults to on: three attempts");

    ctrl.set_features(&[("gw:Retry", false), ("custom:Shown", true)]);
    assert_eventually!(PATIENCE, "the flags arrive", || async {
        let inspect = json_view(&gw, "/debug/ctrl/inspect").await;
        expect_eq(
            inspect["features"].clone(),
            json!({"custom:Shown": true, "gw:PriorityConfig": false, "gw:Retry": false}),
        )
    });
    assert_eq!(get(&gw.url("/r")).await.status, 503);
    assert_eq!(failing.hits(), 4, "gw:Retry off: one attempt");

    ctrl.set_features(&[("gw:Retry", true)]);
    assert_eventually!(PATIENCE, "retries back on", || async {
        json_view(&gw, "/debug/ctrl/inspect").await["features"]["gw:Retry"] == true
    });
    assert_eq!(get(&gw.url("/r")).await.status, 503);
    assert_eq!(failing.hits(), 7);
    gw.stop().await.unwrap();
}

/// Releases of a large config in a row while a reader keeps reading the file: every read is
/// a whole config of a released version, a reader holding the old file keeps reading it
/// whole (rename semantics), and no temp file is left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_config_file_is_replaced_atomically() {
    let a = Upstream::named("A").await;
    let target = a.target();
    let many = |version: &str| {
        let paths: Vec<String> = (0..1500).map(|i| format!("/e{i}/{version}")).collect();
        let endpoints: Vec<(&str, &str)> = paths
            .iter()
            .map(|p| (p.as_str(), target.as_str()))
            .collect();
        config(version, &endpoints)
    };
    let ctrl = CtrlDouble::start().await;
    ctrl.release("v0", &many("v0"), &[]);
    let gw = start(&single("/disk", &a.target(), ""), &ctrl_flags(&ctrl.url())).await;
    let conf = gw.conf.clone();

    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (conf, stop) = (conf.clone(), stop.clone());
        std::thread::spawn(move || {
            let (mut reads, mut versions) = (0u32, Vec::new());
            let mut last = Vec::new();
            while !stop.load(Ordering::Relaxed) && reads < 1_000_000 {
                let content = std::fs::read(&conf).expect("the file is always there");
                reads += 1;
                if content == last {
                    continue;
                }
                let text = String::from_utf8(content.clone()).expect("UTF-8");
                let parsed = configs::parse(&text, &conf)
                    .unwrap_or_else(|e| panic!("a partial or broken file was read: {e}"));
                assert_eq!(parsed.endpoints.len(), 1500);
                versions.push(parsed.version);
                last = content;
            }
            (reads, versions)
        })
    };

    for round in 1..=6 {
        let version = format!("v{round}");
        let mut old = std::fs::File::open(&conf).unwrap();
        ctrl.release(&version, &many(&version), &[]);
        assert_eventually!(PATIENCE, "the release is written", || async {
            json_view(&gw, "/debug/ctrl/inspect").await["last_version"] == version.as_str()
        });
        // The file opened before the release still reads whole, as the previous version.
        let mut text = String::new();
        std::io::Read::read_to_string(&mut old, &mut text).unwrap();
        let previous = configs::parse(&text, &conf).expect("the old file is whole");
        assert_eq!(previous.version, format!("v{}", round - 1));
    }
    stop.store(true, Ordering::Relaxed);
    let (reads, versions) = reader.join().expect("reader saw only whole files");
    assert!(reads > 0 && !versions.is_empty());
    assert_eq!(versions.last().map(String::as_str), Some("v6"));
    assert_eventually!(PATIENCE, "the last release is applied", || async {
        expect_eq(body(&gw, "/e0/v6").await, "200 A")
    });
    let dir = conf.parent().unwrap();
    let leftovers: Vec<String> = files_in(dir)
        .into_iter()
        .filter(|name| name.ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    gw.stop().await.unwrap();
}

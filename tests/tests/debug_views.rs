//! The `/debug` views of the real gateway (started with `--debug`): shapes of every JSON
//! view, the index, protection against proxied requests, CPU profiles, the profile index,
//! the heap profile without a profiling allocator, and the runtime view.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tests::assert_eventually;
use tests::config::endpoint;
use tests::eventually::expect_eq;
use tests::harness::{Reply, TestGateway, Upstream, get, get_with};

const PATIENCE: Duration = Duration::from_secs(5);

fn config(version: &str, endpoints: &[(&str, &str)]) -> String {
    let mut yaml = format!("name: debug-test\nversion: {version}\nendpoints:\n");
    for (path, target) in endpoints {
        yaml.push_str(&endpoint(path, target, "    method: GET\n"));
    }
    yaml
}

fn json_of(reply: &Reply) -> Value {
    assert_eq!(
        reply.header("content-type"),
        "application/json",
        "body: {}",
        reply.body
    );
    serde_json::from_str(&reply.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", reply.body))
}

async fn get_json(gw: &TestGateway, path: &str) -> (u16, Value) {
    let reply = get(&gw.url(path)).await;
    (reply.status, json_of(&reply))
}

fn sha256_of(path: &std::path::Path) -> String {
    hex::encode(Sha256::digest(std::fs::read(path).expect("read config")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn index_links_every_view_and_ping_answers() {
    let gw = TestGateway::start(&config("v1", &[("/a", "127.0.0.1:9")])).await;

    let index = get(&gw.url("/debug")).await;
    assert_eq!(index.status, 200);
    assert!(index.header("content-type").starts_with("text/html"));
    for path in [
        "/debug/ping",
        "/debug/pprof/profile",
        "/debug/pprof/flamegraph",
        "/debug/pprof/",
        "/debug/pprof/heap",
        "/debug/runtime",
        "/debug/config/inspect",
        "/debug/config/load",
        "/debug/config/version",
        "/debug/proxy/router/inspect",
        "/debug/watcher/nodes",
        "/debug/watcher/appliers",
        "/debug/ctrl/inspect",
        "/debug/ctrl/load",
    ] {
        assert!(
            index.body.contains(&format!("href=\"{path}\"")),
            "index does not link {path}:\n{}",
            index.body
        );
    }
    assert_eq!(get(&gw.url("/debug/")).await.body, index.body);

    let ping = get(&gw.url("/debug/ping")).await;
    assert_eq!((ping.status, ping.body.as_str()), (200, "pong\n"));

    let (status, body) = get_json(&gw, "/debug/no/such/view").await;
    assert_eq!(status, 404);
    assert!(body["error"].is_string());

    // Without --ctrl-service the control-service views are listed but answer 404.
    let (status, body) = get_json(&gw, "/debug/ctrl/inspect").await;
    assert_eq!(status, 404);
    assert_eq!(
        body,
        json!({"error": "no control service configured (--ctrl-service)"})
    );

    // Only /debug and /debug/* belong to the mux; /debugger goes to the router.
    let other = get(&gw.url("/debugger")).await;
    assert_eq!(other.status, 404);
    assert_eq!(other.body, "404 page not found\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxied_requests_get_403() {
    let gw = TestGateway::start(&config("v1", &[("/a", "127.0.0.1:9")])).await;
    for path in ["/debug", "/debug/ping", "/debug/config/load"] {
        for (name, value) in [
            ("x-forwarded-for", "203.0.113.7"),
            ("forwarded", "for=203.0.113.7"),
        ] {
            let reply = get_with(&gw.url(path), &[(name, value)]).await;
            assert_eq!(reply.status, 403, "{path} with {name}");
            assert!(json_of(&reply)["error"].is_string());
        }
    }
    assert_eq!(get(&gw.url("/debug/ping")).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_inspect_follows_reloads_and_errors() {
    let gw = TestGateway::start(&config("v1", &[("/a", "127.0.0.1:9")])).await;

    let (status, inspect) = get_json(&gw, "/debug/config/inspect").await;
    assert_eq!(status, 200);
    let mut keys: Vec<&String> = inspect.as_object().expect("object").keys().collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "base",
            "last_error",
            "loaded_at",
            "path",
            "reloads",
            "sha256",
            "source",
            "version"
        ]
    );
    assert_eq!(inspect["source"], "file");
    // Where the config came from: the file, versioned by its hash.
    assert_eq!(
        inspect["base"],
        serde_json::json!({
            "source": "file",
            "path": gw.conf.display().to_string(),
            "version": sha256_of(&gw.conf)[..12],
        })
    );
    assert_eq!(inspect["path"], gw.conf.display().to_string());
    assert_eq!(inspect["sha256"], sha256_of(&gw.conf));
    assert_eq!(inspect["version"], "v1");
    assert_eq!(inspect["reloads"], 0);
    assert_eq!(inspect["last_error"], Value::Null);
    assert!(
        inspect["loaded_at"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z'))
    );
    assert_eq!(
        get_json(&gw, "/debug/config/version").await,
        (200, json!({"version": "v1"}))
    );

    gw.write_config(&config("v2", &[("/b", "127.0.0.1:9")]));
    assert_eventually!(PATIENCE, "config/inspect counts 1 reload", || async {
        expect_eq(
            get_json(&gw, "/debug/config/inspect").await.1["reloads"].clone(),
            1,
        )
    });
    let (_, inspect) = get_json(&gw, "/debug/config/inspect").await;
    assert_eq!(inspect["sha256"], sha256_of(&gw.conf));
    assert_eq!(inspect["base"]["version"], sha256_of(&gw.conf)[..12]);
    assert_eq!(inspect["version"], "v2");
    assert_eq!(inspect["last_error"], Value::Null);
    assert_eq!(
        get_json(&gw, "/debug/config/version").await,
        (200, json!({"version": "v2"}))
    );

    let good_sha = sha256_of(&gw.conf);
    gw.write_config("name: broken\nendpoints: [\n");
    assert_eventually!(
        PATIENCE,
        "config/inspect shows a last_error after a broken file",
        || async {
            let (_, inspect) = get_json(&gw, "/debug/config/inspect").await;
            if inspect["last_error"].is_string() {
                Ok(())
            } else {
                Err(inspect)
            }
        }
    );
    let (_, inspect) = get_json(&gw, "/debug/config/inspect").await;
    assert_eq!(inspect["sha256"], good_sha, "the config in force stays");
    assert_eq!(inspect["base"]["version"], good_sha[..12]);
    assert_eq!(inspect["version"], "v2");
    assert_eq!(inspect["reloads"], 1);
    assert_eq!(
        get_json(&gw, "/debug/config/version").await.1,
        json!({"version": "v2"})
    );
    let (_, load) = get_json(&gw, "/debug/config/load").await;
    assert_eq!(load["endpoints"][0]["path"], "/b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_load_is_the_config_in_force() {
    let a = Upstream::named("a").await;
    let b = Upstream::named("b").await;
    let gw = TestGateway::start(&config("v1", &[("/a/*", &a.target())])).await;

    let (status, load) = get_json(&gw, "/debug/config/load").await;
    assert_eq!(status, 200);
    assert_eq!(load["name"], "debug-test");
    assert_eq!(load["version"], "v1");
    let endpoints = load["endpoints"].as_array().expect("endpoints");
    assert_eq!(endpoints.len(), 1);
    assert_eq!(endpoints[0]["path"], "/a/*");
    assert_eq!(endpoints[0]["method"], "GET");
    assert_eq!(endpoints[0]["backends"][0]["target"], a.target());

    gw.write_config(&config(
        "v2",
        &[("/a/*", &a.target()), ("/b/*", &b.target())],
    ));
    assert_eventually!(PATIENCE, "config/load shows version v2", || async {
        expect_eq(
            get_json(&gw, "/debug/config/load").await.1["version"].clone(),
            "v2",
        )
    });
    let (_, load) = get_json(&gw, "/debug/config/load").await;
    let targets: Vec<(&str, &str)> = load["endpoints"]
        .as_array()
        .expect("endpoints")
        .iter()
        .map(|e| {
            (
                e["path"].as_str().unwrap_or(""),
                e["backends"][0]["target"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        targets,
        [("/a/*", a.target().as_str()), ("/b/*", b.target().as_str())]
    );
    // What the view shows is what serves.
    assert_eq!(get(&gw.url("/b/x")).await.body, "b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_inspect_lists_routes_with_backends() {
    let a = Upstream::named("a").await;
    let yaml = format!(
        "version: r1\nendpoints:\n\
         - path: /api/*\n  method: GET\n  backends:\n    - target: {a}\n    - target: 127.0.0.1:9\n\
         - path: /grpc.Echo/Say\n  method: POST\n  host: rpc.example.com\n  protocol: GRPC\n  backends:\n    - target: 127.0.0.1:9\n\
         - path: /any\n  timeout: 250ms\n  backends:\n    - target: {a}\n",
        a = a.target()
    );
    let gw = TestGateway::start(&yaml).await;
    let (status, routes) = get_json(&gw, "/debug/proxy/router/inspect").await;
    assert_eq!(status, 200);
    assert_eq!(
        routes,
        json!([
            {"path": "/api/*", "method": "GET", "host": "", "protocol": "HTTP",
             "backends": [a.target(), "127.0.0.1:9"], "timeout": "1s"},
            {"path": "/grpc.Echo/Say", "method": "POST", "host": "rpc.example.com",
             "protocol": "GRPC", "backends": ["127.0.0.1:9"], "timeout": "1s"},
            {"path": "/any", "method": "", "host": "", "protocol": "HTTP",
             "backends": [a.target()], "timeout": "250ms"},
        ])
    );

    gw.write_config(&config("r2", &[("/only", &a.target())]));
    assert_eventually!(PATIENCE, "router inspect shows only /only", || async {
        let (_, routes) = get_json(&gw, "/debug/proxy/router/inspect").await;
        let paths: Vec<Value> = routes
            .as_array()
            .map(|r| r.iter().map(|route| route["path"].clone()).collect())
            .unwrap_or_default();
        expect_eq(paths, vec![json!("/only")])
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watcher_views_without_discovery_are_404() {
    let gw = TestGateway::start(&config("v1", &[("/a", "127.0.0.1:9")])).await;
    for path in [
        "/debug/watcher/nodes",
        "/debug/watcher/nodes?service=helloworld",
        "/debug/watcher/appliers",
        "/debug/watcher/appliers?service=helloworld",
    ] {
        let (status, body) = get_json(&gw, path).await;
        assert_eq!(status, 404, "{path}");
        assert_eq!(
            body,
            json!({"error": "no registry configured (--discovery)"}),
            "{path}"
        );
    }
}

/// Keeps one core busy for `limit` (or until stopped) so a profile has samples.
fn burn_cpu(stop: Arc<AtomicBool>, limit: Duration) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let started = Instant::now();
        let mut x: u64 = 1;
        while !stop.load(Ordering::Relaxed) && started.elapsed() < limit {
            for i in 0..10_000u64 {
                x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(i);
            }
        }
        x
    })
}

/// Profiles are process-wide, so everything about them is in one test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cpu_profile_and_flamegraph() {
    let gw = TestGateway::start(&config("v1", &[("/a", "127.0.0.1:9")])).await;
    let stop = Arc::new(AtomicBool::new(false));
    let burner = burn_cpu(stop.clone(), Duration::from_secs(20));

    let profile = get(&gw.url("/debug/pprof/profile?seconds=1")).await;
    assert_eq!(profile.status, 200, "{}", profile.body);
    assert_eq!(profile.header("content-type"), "application/octet-stream");
    assert!(!profile.body.is_empty());
    // A pprof Profile starts with field 1 (sample_type), length-delimited: tag byte 0x0a.
    assert_eq!(profile.body.as_bytes()[0], 0x0a, "not a pprof protobuf");

    let flamegraph = get(&gw.url("/debug/pprof/flamegraph?seconds=1")).await;
    assert_eq!(flamegraph.status, 200, "{}", flamegraph.body);
    assert_eq!(flamegraph.header("content-type"), "image/svg+xml");
    assert!(flamegraph.body.contains("<svg"), "{}", flamegraph.body);
    assert!(
        !flamegraph.body.contains("no CPU samples"),
        "a busy process has samples"
    );

    // One profile at a time: of two overlapping ones, one is refused at once.
    let (profile_url, flamegraph_url) = (
        gw.url("/debug/pprof/profile?seconds=2"),
        gw.url("/debug/pprof/flamegraph?seconds=2"),
    );
    let (first, second) = tokio::join!(get(&profile_url), get(&flamegraph_url));
    let mut statuses = [first.status, second.status];
    statuses.sort();
    assert_eq!(statuses, [200, 409]);
    let refused = if first.status == 409 { &first } else { &second };
    assert!(json_of(refused)["error"].is_string());

    let (status, body) = get_json(&gw, "/debug/pprof/profile?seconds=61").await;
    assert_eq!(status, 400);
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("seconds"))
    );

    stop.store(true, Ordering::Relaxed);
    let _ = burner.join();
}

/// The in-process gateway runs on the default allocator: the profile index lists the heap
/// profile, which answers 501 saying why; the runtime view shows the test's runtime.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pprof_index_heap_without_profiler_and_runtime() {
    let gw = TestGateway::start(&config("v1", &[("/a", "127.0.0.1:9")])).await;

    for path in ["/debug/pprof/", "/debug/pprof"] {
        let index = get(&gw.url(path)).await;
        assert_eq!(index.status, 200, "{path}: {}", index.body);
        assert!(index.header("content-type").starts_with("text/html"));
        for view in [
            "/debug/pprof/profile",
            "/debug/pprof/flamegraph",
            "/debug/pprof/heap",
        ] {
            assert!(
                index.body.contains(&format!("href=\"{view}\"")),
                "{path} does not link {view}:\n{}",
                index.body
            );
        }
    }

    let (status, body) = get_json(&gw, "/debug/pprof/heap").await;
    assert_eq!(status, 501, "{body}");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("no heap profiler")),
        "{body}"
    );

    let (status, runtime) = get_json(&gw, "/debug/runtime").await;
    assert_eq!(status, 200, "{runtime}");
    assert_eq!(runtime["flavor"], "multi_thread", "{runtime}");
    assert_eq!(runtime["workers"], 2, "{runtime}");
    // At least the gateway's accept loop and the connection serving this request.
    assert!(runtime["alive_tasks"].as_u64().unwrap() >= 2, "{runtime}");
    assert!(runtime["global_queue_depth"].is_u64(), "{runtime}");
    let workers = runtime["per_worker"].as_array().unwrap();
    assert_eq!(workers.len(), 2, "{runtime}");
    for worker in workers {
        assert!(worker["park_count"].is_u64(), "{worker}");
        assert!(worker["busy_seconds"].as_f64().is_some(), "{worker}");
    }
}

//! `--conf http://...`: the gateway fetches its config from a real HTTP server on
//! 127.0.0.1, polls it with `If-None-Match`, applies a new ETag's body, and keeps its routes
//! when the server fails, serves an invalid file, or goes away.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Response, header};
use serde_json::Value;
use tests::harness::{TestGateway, Upstream, get, text, unused_port};
use tests::{assert_eventually, config};

/// What the config server serves, and what it saw.
#[derive(Debug, Default)]
struct Served {
    status: u16,
    etag: String,
    body: String,
    requests: usize,
    /// The path and query of each request.
    uris: Vec<String>,
    /// The `If-None-Match` of each request ("" when absent).
    if_none_match: Vec<String>,
}

type Shared = Arc<Mutex<Served>>;

fn lock(shared: &Shared) -> std::sync::MutexGuard<'_, Served> {
    shared.lock().expect("config server state")
}

/// A config server on `addr`: `status` other than 200 answers that status; a request whose
/// `If-None-Match` is the current ETag gets a 304; otherwise the body with its ETag.
async fn config_server(addr: std::net::SocketAddr, shared: Shared) -> Upstream {
    Upstream::start_at(addr, move |req: http::Request<hyper::body::Incoming>| {
        let shared = shared.clone();
        async move {
            let mut served = lock(&shared);
            served.requests += 1;
            served.uris.push(req.uri().to_string());
            let condition = req
                .headers()
                .get(header::IF_NONE_MATCH)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned();
            served.if_none_match.push(condition.clone());
            let response = Response::builder();
            if served.status != 200 {
                return response
                    .status(served.status)
                    .body(text("broken"))
                    .expect("response");
            }
            let response = response.header(header::ETAG, served.etag.as_str());
            if condition == served.etag {
                return response.status(304).body(text("")).expect("response");
            }
            response.body(text(served.body.clone())).expect("response")
        }
    })
    .await
}

fn routes_to(target: &str, version: &str) -> String {
    format!(
        "version: {version}\n{}",
        config::gateway(&[config::endpoint("/svc", target, "")]).trim_start_matches("name: test\n")
    )
}

async fn inspect(gw: &TestGateway) -> Value {
    let reply = get(&gw.url("/debug/config/inspect")).await;
    serde_json::from_str(&reply.body).expect("inspect json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_config_follows_etags_and_keeps_routes_on_failures() {
    let a = Upstream::named("a").await;
    let b = Upstream::named("b").await;
    let shared: Shared = Arc::new(Mutex::new(Served {
        status: 200,
        etag: "\"v1\"".into(),
        body: routes_to(&a.target(), "v1"),
        ..Served::default()
    }));
    let server = config_server("127.0.0.1:0".parse().expect("addr"), shared.clone()).await;
    let url = format!("http://{}/gateway.yaml", server.addr);
    let gw = TestGateway::start_conf(&url, &[]).await.expect("starts");
    assert_eq!(get(&gw.url("/svc")).await.body, "a");
    let status = inspect(&gw).await;
    assert_eq!(status["path"], url.as_str());
    assert_eq!(status["version"], "v1");
    // Where it came from: the URL, versioned by the ETag of the body in force.
    assert_eq!(status["source"], "remote");
    assert_eq!(
        status["base"],
        serde_json::json!({"source": "remote", "url": url, "etag": "\"v1\"", "version": "v1"})
    );

    // Polls (every 100 ms) carry the ETag and get 304s; nothing changes.
    let start = lock(&shared).requests;
    assert_eventually!(
        Duration::from_secs(5),
        "three conditional polls",
        || async {
            let served = lock(&shared);
            served.requests >= start + 3
                && served.if_none_match.last().map(String::as_str) == Some("\"v1\"")
        }
    );
    assert_eq!(get(&gw.url("/svc")).await.body, "a");
    let status = inspect(&gw).await;
    assert_eq!(status["reloads"], 0, "{status}");
    assert_eq!(status["last_error"], Value::Null, "{status}");

    // A new ETag and body are applied.
    {
        let mut served = lock(&shared);
        served.etag = "\"v2\"".into();
        served.body = routes_to(&b.target(), "v2");
    }
    assert_eventually!(Duration::from_secs(5), "the v2 route answers", || async {
        get(&gw.url("/svc")).await.body == "b"
    });
    // The status is written just after the new router is swapped in.
    assert_eventually!(Duration::from_secs(5), "the status says v2", || async {
        let status = inspect(&gw).await;
        (status["version"].as_str(), status["reloads"].as_u64()) == (Some("v2"), Some(1))
    });
    let status = inspect(&gw).await;
    assert_eq!(
        (
            status["base"]["version"].as_str(),
            status["base"]["etag"].as_str()
        ),
        (Some("v2"), Some("\"v2\""))
    );

    // A 500 keeps the routes and shows the error.
    lock(&shared).status = 500;
    assert_eventually!(Duration::from_secs(5), "the 500 in last_error", || async {
        inspect(&gw).await["last_error"]
            .as_str()
            .unwrap_or("")
            .contains("500")
    });
    assert_eq!(get(&gw.url("/svc")).await.body, "b");

    // An invalid file (new ETag) keeps the routes too, with its position in the error.
    {
        let mut served = lock(&shared);
        served.status = 200;
        served.etag = "\"v3\"".into();
        served.body = "endpoints:\n  - path: nope\n    backends: [{target: 127.0.0.1:1}]\n".into();
    }
    assert_eventually!(
        Duration::from_secs(5),
        "the invalid file in last_error",
        || async {
            let error = inspect(&gw).await["last_error"]
                .as_str()
                .unwrap_or("")
                .to_owned();
            error.contains(&format!("{url}:2:")) && error.contains("must start with '/'")
        }
    );
    assert_eq!(get(&gw.url("/svc")).await.body, "b");
    assert_eq!(inspect(&gw).await["version"], "v2");
    // The refused body's ETag was fetched, but the config in force is still v2's.
    assert_eq!(inspect(&gw).await["base"]["version"], "v2");

    // The server goes away: still serving, the fetch error is shown.
    let addr = server.addr;
    server.stop();
    drop(server);
    assert_eventually!(
        Duration::from_secs(5),
        "the fetch failure in last_error",
        || async {
            inspect(&gw).await["last_error"]
                .as_str()
                .unwrap_or("")
                .contains("cannot fetch")
        }
    );
    assert_eq!(get(&gw.url("/svc")).await.body, "b");

    // It comes back on the same address with a new config: applied, error cleared.
    {
        let mut served = lock(&shared);
        served.etag = "\"v4\"".into();
        served.body = routes_to(&a.target(), "v4");
    }
    let _server = config_server(addr, shared.clone()).await;
    assert_eventually!(Duration::from_secs(5), "the v4 route answers", || async {
        get(&gw.url("/svc")).await.body == "a"
    });
    let status = inspect(&gw).await;
    assert_eq!(status["version"], "v4", "{status}");
    assert_eq!(status["base"]["version"], "v4", "{status}");
    assert_eq!(status["last_error"], Value::Null, "{status}");
    gw.stop().await.expect("clean stop");
}

/// The URL is fetched as given, but shown (debug view, admin API, errors) without its
/// credentials and query values; the admin API names the remote source and its ETag.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_remote_origin_is_shown_without_secrets_in_inspect_and_the_admin_api() {
    let a = Upstream::named("a").await;
    let shared: Shared = Arc::new(Mutex::new(Served {
        status: 200,
        etag: "W/\"rel-7\"".into(),
        body: routes_to(&a.target(), "v7"),
        ..Served::default()
    }));
    let server = config_server("127.0.0.1:0".parse().expect("addr"), shared.clone()).await;
    let url = format!(
        "http://deploy:pa55word@{}/gateway.yaml?token=hunter2&env=eu9west",
        server.addr
    );
    let shown = format!(
        "http://{}/gateway.yaml?token=(redacted)&env=(redacted)",
        server.addr
    );
    let store = tempfile::tempdir().expect("tempdir");
    let flags = tests::admin::flags(&format!("file://{}", store.path().display()));
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let gw = TestGateway::start_conf(&url, &flags).await.expect("starts");
    assert_eq!(get(&gw.url("/svc")).await.body, "a");
    assert_eq!(
        lock(&shared).uris[0],
        "/gateway.yaml?token=hunter2&env=eu9west",
        "fetched with its query"
    );

    let reply = get(&gw.url("/debug/config/inspect")).await;
    for secret in ["pa55word", "hunter2", "eu9west", "deploy"] {
        assert!(!reply.body.contains(secret), "{secret}: {}", reply.body);
    }
    let status: Value = serde_json::from_str(&reply.body).expect("json");
    assert_eq!(status["path"], shown.as_str());
    assert_eq!(status["source"], "remote");
    assert_eq!(
        status["base"],
        serde_json::json!({"source": "remote", "url": shown, "etag": "W/\"rel-7\"", "version": "rel-7"})
    );

    let admin_addr = gw.admin_addr.expect("admin");
    let reply = tests::admin::get(admin_addr, "/admin/v1/config").await;
    for secret in ["pa55word", "hunter2", "eu9west", "deploy"] {
        assert!(!reply.body.contains(secret), "{secret}: {}", reply.body);
    }
    let config = tests::admin::json(&reply);
    assert_eq!(config["source"], "remote");
    assert_eq!(config["base"], status["base"]);
    let revision = config["storeRevision"].as_str().expect("a revision");
    assert_eq!(config["version"], format!("rel-7+{revision}"));

    // With a store endpoint merged in, the source is the store, over the remote base.
    let put = tests::admin::put(
        admin_addr,
        "extra",
        &tests::admin::endpoint("/extra", &a.target()),
        &[],
    )
    .await;
    assert_eq!(put.status, 200, "{}", put.body);
    let config = tests::admin::json(&tests::admin::get(admin_addr, "/admin/v1/config").await);
    assert_eq!(config["source"], "store");
    assert_eq!(config["base"]["source"], "remote");
    let revision = config["storeRevision"].as_str().expect("a revision");
    assert_eq!(config["version"], format!("rel-7+{revision}"));

    // A failed fetch names the URL without its secrets too.
    lock(&shared).status = 500;
    assert_eventually!(Duration::from_secs(5), "the 500 in last_error", || async {
        inspect(&gw).await["last_error"]
            .as_str()
            .unwrap_or("")
            .contains("500")
    });
    let error = inspect(&gw).await["last_error"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    assert!(error.starts_with(&shown), "{error}");
    gw.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_up_needs_a_reachable_valid_remote_config() {
    let url = format!("http://127.0.0.1:{}/gateway.yaml", unused_port());
    let error = TestGateway::start_conf(&url, &[])
        .await
        .err()
        .expect("refused");
    assert!(
        error.starts_with(&format!("config: {url}: cannot fetch")),
        "{error}"
    );
    assert_eq!(error.lines().count(), 1, "{error}");

    let shared: Shared = Arc::new(Mutex::new(Served {
        status: 200,
        etag: "\"x\"".into(),
        body: "endpoints:\n  - path: /x\n    backends: [{target: nowhere}]\n".into(),
        ..Served::default()
    }));
    let server = config_server("127.0.0.1:0".parse().expect("addr"), shared.clone()).await;
    let url = format!("http://{}/gateway.yaml", server.addr);
    let error = TestGateway::start_conf(&url, &[])
        .await
        .err()
        .expect("invalid");
    assert!(error.starts_with(&format!("config: {url}:3:")), "{error}");
    assert!(error.contains("endpoints[0].backends[0].target"), "{error}");
    assert_eq!(error.lines().count(), 1, "{error}");

    lock(&shared).status = 404;
    let error = TestGateway::start_conf(&url, &[]).await.err().expect("404");
    assert!(error.contains("404"), "{error}");
    assert_eq!(error.lines().count(), 1, "{error}");
}

/// A local priority directory merges over the fetched file, and a change there is applied
/// even while the server answers 304.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn priority_dir_merges_over_the_remote_config() {
    let a = Upstream::named("a").await;
    let b = Upstream::named("b").await;
    let shared: Shared = Arc::new(Mutex::new(Served {
        status: 200,
        etag: "\"v1\"".into(),
        body: routes_to(&a.target(), "v1"),
        ..Served::default()
    }));
    let server = config_server("127.0.0.1:0".parse().expect("addr"), shared.clone()).await;
    let url = format!("http://{}/gateway.yaml", server.addr);
    let priority = tempfile::tempdir().expect("tempdir");
    let file = priority.path().join("10-svc.yaml");
    let write = |target: &str| {
        let tmp = priority.path().join(".tmp");
        std::fs::write(
            &tmp,
            format!("endpoints:\n{}", config::endpoint("/prio", target, "")),
        )
        .expect("write");
        std::fs::rename(&tmp, &file).expect("rename");
    };
    write(&a.target());
    let dir = priority.path().to_str().expect("utf-8").to_owned();
    let gw = TestGateway::start_conf(&url, &["--priority-dir", &dir])
        .await
        .expect("starts");
    assert_eq!(get(&gw.url("/svc")).await.body, "a");
    assert_eq!(get(&gw.url("/prio")).await.body, "a");
    write(&b.target());
    assert_eventually!(Duration::from_secs(5), "the new priority route", || async {
        get(&gw.url("/prio")).await.body == "b"
    });
    assert!(
        lock(&shared)
            .if_none_match
            .iter()
            .any(|tag| tag == "\"v1\"")
    );
    assert_eq!(get(&gw.url("/svc")).await.body, "a");
    gw.stop().await.expect("clean stop");
}

/// Fetches are bounded: a server that never answers and a body over the limit are errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetches_are_bounded_in_time_and_size() {
    let silent = Upstream::start(|_req| async {
        tokio::time::sleep(Duration::from_secs(60)).await;
        Response::new(text(""))
    })
    .await;
    let loader = configs::RemoteLoader::new(format!("http://{}/g.yaml", silent.addr), None)
        .with_timeout(Duration::from_millis(300));
    let started = std::time::Instant::now();
    let error = loader.load().await.expect_err("times out").to_string();
    assert!(error.contains("no complete answer within"), "{error}");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(loader.status().last_error, Some(error));

    let big = Upstream::start(|_req| async {
        Response::new(text(format!("# {}\nendpoints: []\n", "x".repeat(4096))))
    })
    .await;
    let loader =
        configs::RemoteLoader::new(format!("http://{}/g.yaml", big.addr), None).with_max_body(1024);
    let error = loader.load().await.expect_err("too large").to_string();
    assert!(error.contains("cannot read the body"), "{error}");
}

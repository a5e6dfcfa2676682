//! The mux with fake sources: protection, dispatch, index, and every view's shape.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use http::{Request, StatusCode, header};
use http_body_util::BodyExt;
use serde_json::{Value, json};

use crate::*;

struct FakeConfig;

impl ConfigSource for FakeConfig {
    fn status(&self) -> ConfigStatus {
        ConfigStatus {
            path: "/etc/gateway.yaml".into(),
            sha256: "ab".repeat(32),
            version: "v7".into(),
            loaded_at: Some("2024-05-06T07:08:09Z".into()),
            reloads: 3,
            last_error: Some("line 2: bad".into()),
            source: "file".into(),
            base: None,
            store: None,
            store_revision: String::new(),
        }
    }

    fn config(&self) -> Value {
        json!({"name": "fake", "version": "v7", "endpoints": [{"path": "/a"}]})
    }
}

struct FakeRouter;

impl RouterSource for FakeRouter {
    fn routes(&self) -> Vec<Route> {
        vec![Route {
            path: "/api/*".into(),
            method: "GET".into(),
            host: String::new(),
            protocol: "HTTP".into(),
            backends: vec!["127.0.0.1:8000".into(), "discovery:///hello world".into()],
            timeout: "1s".into(),
            ..Route::default()
        }]
    }
}

/// Two watched services: "hello world" (one instance, one applier) and "idle" (none yet).
struct FakeWatcher;

impl WatcherSource for FakeWatcher {
    fn services(&self) -> Vec<String> {
        vec!["hello world".into(), "idle".into()]
    }

    fn instances(&self, service: &str) -> Option<Vec<Instance>> {
        match service {
            "hello world" => Some(vec![Instance {
                id: "i-1".into(),
                name: "hello world".into(),
                version: "v1".into(),
                metadata: BTreeMap::from([("weight".into(), "20".into())]),
                endpoints: vec!["http://127.0.0.1:8001?isSecure=false".into()],
            }]),
            "idle" => Some(Vec::new()),
            _ => None,
        }
    }

    fn appliers(&self, service: &str) -> Option<Vec<Applier>> {
        match service {
            "hello world" => Some(vec![Applier {
                endpoint: "GET /api/*".into(),
                nodes: 1,
            }]),
            "idle" => Some(Vec::new()),
            _ => None,
        }
    }
}

fn loopback() -> SocketAddr {
    "127.0.0.1:40000".parse().unwrap()
}

fn full_mux() -> DebugMux {
    let mut mux = DebugMux::new();
    mux.register(Arc::new(ConfigViews::new(Arc::new(FakeConfig))));
    mux.register(Arc::new(RouterViews::new(Arc::new(FakeRouter))));
    mux.register(Arc::new(WatcherViews::new(Arc::new(FakeWatcher))));
    mux
}

struct Answer {
    status: StatusCode,
    content_type: String,
    body: String,
}

impl Answer {
    fn json(&self) -> Value {
        assert_eq!(self.content_type, "application/json", "body: {}", self.body);
        serde_json::from_str(&self.body).expect("JSON body")
    }
}

async fn call(mux: &DebugMux, req: Request<()>, remote: SocketAddr) -> Answer {
    let response = mux.handle(req, remote).await;
    let status = response.status();
    let content_type = response.headers()[header::CONTENT_TYPE]
        .to_str()
        .unwrap()
        .to_owned();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    Answer {
        status,
        content_type,
        body: String::from_utf8(body.to_vec()).unwrap(),
    }
}

async fn get(mux: &DebugMux, uri: &str) -> Answer {
    call(mux, Request::get(uri).body(()).unwrap(), loopback()).await
}

#[test]
fn matches_debug_paths_only() {
    assert!(DebugMux::matches("/debug"));
    assert!(DebugMux::matches("/debug/"));
    assert!(DebugMux::matches("/debug/ping"));
    assert!(!DebugMux::matches("/debugger"));
    assert!(!DebugMux::matches("/api/debug"));
    assert!(!DebugMux::matches("/"));
}

#[tokio::test]
async fn ping_answers_pong() {
    let answer = get(&DebugMux::new(), "/debug/ping").await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.body, "pong\n");
}

#[tokio::test]
async fn index_links_every_view() {
    let mux = full_mux();
    for uri in ["/debug", "/debug/"] {
        let answer = get(&mux, uri).await;
        assert_eq!(answer.status, StatusCode::OK);
        assert!(answer.content_type.starts_with("text/html"));
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
        ] {
            assert!(
                answer.body.contains(&format!("<a href=\"{path}\">")),
                "index lacks {path}: {}",
                answer.body
            );
        }
    }
    assert_eq!(mux.views().len(), 12);
}

#[tokio::test]
async fn proxied_or_remote_requests_are_refused() {
    let mux = full_mux();
    for name in ["x-forwarded-for", "forwarded", "x-real-ip"] {
        let req = Request::get("/debug/ping")
            .header(name, "for=10.0.0.1")
            .body(())
            .unwrap();
        let answer = call(&mux, req, loopback()).await;
        assert_eq!(answer.status, StatusCode::FORBIDDEN, "{name}");
        assert!(answer.json()["error"].as_str().unwrap().contains("proxied"));
    }
    for remote in ["10.0.0.1:1234", "[2001:db8::1]:1234"] {
        let req = Request::get("/debug").body(()).unwrap();
        let answer = call(&mux, req, remote.parse().unwrap()).await;
        assert_eq!(answer.status, StatusCode::FORBIDDEN, "{remote}");
        assert!(
            answer.json()["error"]
                .as_str()
                .unwrap()
                .contains("loopback")
        );
    }
    for remote in ["[::1]:1234", "[::ffff:127.0.0.1]:1234", "127.0.0.2:1"] {
        let req = Request::get("/debug/ping").body(()).unwrap();
        let answer = call(&mux, req, remote.parse().unwrap()).await;
        assert_eq!(answer.status, StatusCode::OK, "{remote}");
    }
}

#[tokio::test]
async fn unknown_view_and_wrong_method() {
    let mux = full_mux();
    let answer = get(&mux, "/debug/nope").await;
    assert_eq!(answer.status, StatusCode::NOT_FOUND);
    assert!(
        answer.json()["error"]
            .as_str()
            .unwrap()
            .contains("/debug/nope")
    );

    let response = mux
        .handle(Request::post("/debug/ping").body(()).unwrap(), loopback())
        .await;
    assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(response.headers()[header::ALLOW], "GET, HEAD");
}

#[tokio::test]
async fn config_views() {
    let mux = full_mux();
    let inspect = get(&mux, "/debug/config/inspect").await;
    assert_eq!(inspect.status, StatusCode::OK);
    assert_eq!(
        inspect.json(),
        json!({
            "path": "/etc/gateway.yaml",
            "sha256": "ab".repeat(32),
            "version": "v7",
            "loaded_at": "2024-05-06T07:08:09Z",
            "reloads": 3,
            "last_error": "line 2: bad",
            "source": "file",
        })
    );
    let load = get(&mux, "/debug/config/load").await;
    assert_eq!(load.json()["endpoints"][0]["path"], "/a");
    let version = get(&mux, "/debug/config/version").await;
    assert_eq!(version.json(), json!({"version": "v7"}));
}

#[tokio::test]
async fn router_view() {
    let answer = get(&full_mux(), "/debug/proxy/router/inspect").await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(
        answer.json(),
        json!([{
            "path": "/api/*",
            "method": "GET",
            "host": "",
            "protocol": "HTTP",
            "backends": ["127.0.0.1:8000", "discovery:///hello world"],
            "timeout": "1s",
        }])
    );
}

#[tokio::test]
async fn watcher_nodes_view() {
    let mux = full_mux();
    let one = get(&mux, "/debug/watcher/nodes?service=hello%20world").await;
    assert_eq!(one.status, StatusCode::OK);
    assert_eq!(
        one.json(),
        json!([{
            "id": "i-1",
            "name": "hello world",
            "version": "v1",
            "metadata": {"weight": "20"},
            "endpoints": ["http://127.0.0.1:8001?isSecure=false"],
        }])
    );
    let plus = get(&mux, "/debug/watcher/nodes?service=hello+world").await;
    assert_eq!(plus.json(), one.json());

    let all = get(&mux, "/debug/watcher/nodes").await;
    assert_eq!(all.status, StatusCode::OK);
    let all = all.json();
    assert_eq!(all["hello world"], one.json());
    assert_eq!(all["idle"], json!([]));

    let missing = get(&mux, "/debug/watcher/nodes?service=nope").await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    assert!(missing.json()["error"].as_str().unwrap().contains("nope"));
}

#[tokio::test]
async fn watcher_appliers_view() {
    let mux = full_mux();
    let one = get(&mux, "/debug/watcher/appliers?service=hello%20world").await;
    assert_eq!(one.status, StatusCode::OK);
    assert_eq!(one.json(), json!([{"endpoint": "GET /api/*", "nodes": 1}]));

    let all = get(&mux, "/debug/watcher/appliers?service=").await;
    assert_eq!(
        all.json(),
        json!({"hello world": [{"endpoint": "GET /api/*", "nodes": 1}], "idle": []})
    );

    let missing = get(&mux, "/debug/watcher/appliers?service=nope").await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    assert!(missing.json()["error"].is_string());
}

#[tokio::test]
async fn unavailable_watcher_is_listed_but_404() {
    let mut mux = DebugMux::new();
    mux.register(Arc::new(WatcherViews::unavailable(
        "no registry configured",
    )));
    let index = get(&mux, "/debug").await;
    assert!(index.body.contains("/debug/watcher/nodes"));
    for uri in [
        "/debug/watcher/nodes",
        "/debug/watcher/nodes?service=x",
        "/debug/watcher/appliers",
    ] {
        let answer = get(&mux, uri).await;
        assert_eq!(answer.status, StatusCode::NOT_FOUND, "{uri}");
        assert_eq!(answer.json(), json!({"error": "no registry configured"}));
    }
}

/// A component claiming a taken path, or one outside /debug/, does not replace anything.
#[tokio::test]
async fn duplicate_and_outside_views_are_ignored() {
    struct Squatter;
    impl Debuggable for Squatter {
        fn views(&self) -> Vec<View> {
            vec![
                View {
                    path: "/debug/ping",
                    description: "mine",
                },
                View {
                    path: "/metrics",
                    description: "outside",
                },
                View {
                    path: "/debug/squat",
                    description: "new",
                },
            ]
        }
        fn serve(&self, _path: &str, _query: &Query) -> DebugResponse {
            DebugResponse::new(StatusCode::OK, "text/plain", "squatter")
        }
    }
    let mut mux = DebugMux::new();
    mux.register(Arc::new(Squatter));
    assert_eq!(get(&mux, "/debug/ping").await.body, "pong\n");
    assert_eq!(get(&mux, "/debug/squat").await.body, "squatter");
    assert!(!mux.views().iter().any(|view| view.path == "/metrics"));
}

#[tokio::test]
async fn bad_profile_seconds_is_400() {
    let answer = get(&DebugMux::new(), "/debug/pprof/profile?seconds=61").await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    assert!(answer.json()["error"].as_str().unwrap().contains("seconds"));
}

struct FakeCtrl(Option<Value>);

impl CtrlSource for FakeCtrl {
    fn status(&self) -> Value {
        json!({"url": "http://ctrl:8000", "last_version": "7", "last_error": null})
    }

    fn release(&self) -> Option<Value> {
        self.0.clone()
    }
}

#[tokio::test]
async fn ctrl_views_show_the_status_and_the_last_release() {
    let mut mux = DebugMux::new();
    let release = json!({"config": "{}", "version": "7", "priorityConfigs": []});
    mux.register(Arc::new(CtrlViews::new(Arc::new(FakeCtrl(Some(
        release.clone(),
    ))))));
    let index = get(&mux, "/debug").await;
    assert!(index.body.contains("/debug/ctrl/inspect"));
    assert!(index.body.contains("/debug/ctrl/load"));
    let inspect = get(&mux, "/debug/ctrl/inspect").await;
    assert_eq!(inspect.status, StatusCode::OK);
    assert_eq!(inspect.json()["last_version"], "7");
    assert_eq!(get(&mux, "/debug/ctrl/load").await.json(), release);

    let mut mux = DebugMux::new();
    mux.register(Arc::new(CtrlViews::new(Arc::new(FakeCtrl(None)))));
    let none = get(&mux, "/debug/ctrl/load").await;
    assert_eq!(none.status, StatusCode::NOT_FOUND);
    assert!(none.json()["error"].is_string());

    let mut mux = DebugMux::new();
    mux.register(Arc::new(CtrlViews::unavailable("no control service")));
    let answer = get(&mux, "/debug/ctrl/inspect").await;
    assert_eq!(answer.status, StatusCode::NOT_FOUND);
    assert_eq!(answer.json(), json!({"error": "no control service"}));
}

#[tokio::test]
async fn pprof_index_links_every_profile() {
    let mux = full_mux();
    for uri in ["/debug/pprof/", "/debug/pprof"] {
        let answer = get(&mux, uri).await;
        assert_eq!(answer.status, StatusCode::OK, "{uri}");
        assert!(answer.content_type.starts_with("text/html"));
        for path in [
            "/debug/pprof/profile",
            "/debug/pprof/flamegraph",
            "/debug/pprof/heap",
        ] {
            assert!(
                answer.body.contains(&format!("<a href=\"{path}\">")),
                "{uri} lacks {path}: {}",
                answer.body
            );
        }
        assert!(!answer.body.contains("/debug/config/"), "{}", answer.body);
    }
}

#[tokio::test]
async fn heap_without_profiler_is_501() {
    let answer = get(&full_mux(), "/debug/pprof/heap").await;
    assert_eq!(answer.status, StatusCode::NOT_IMPLEMENTED);
    let error = answer.json()["error"].as_str().unwrap().to_owned();
    assert!(error.contains("no heap profiler"), "{error}");
}

#[tokio::test]
async fn heap_answers_what_the_profiler_dumps() {
    fn dump() -> Result<Vec<u8>, String> {
        Ok(vec![0x1f, 0x8b, 1, 2, 3])
    }
    fn failing() -> Result<Vec<u8>, String> {
        Err("prof.dump: no space left".into())
    }
    let mux = DebugMux::new().with_heap_profiler(dump);
    let response = mux
        .handle(
            Request::get("/debug/pprof/heap").body(()).unwrap(),
            loopback(),
        )
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers()[header::CONTENT_TYPE],
        "application/octet-stream"
    );
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], [0x1f, 0x8b, 1, 2, 3]);

    let mux = DebugMux::new().with_heap_profiler(failing);
    let answer = get(&mux, "/debug/pprof/heap").await;
    assert_eq!(answer.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(answer.body.contains("no space left"), "{}", answer.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn runtime_view_shows_workers_and_tasks() {
    let (release, released) = tokio::sync::watch::channel(false);
    let waiting: Vec<_> = (0..5)
        .map(|_| {
            let mut released = released.clone();
            tokio::spawn(async move { released.wait_for(|done| *done).await.map(|_| ()) })
        })
        .collect();
    let answer = get(&DebugMux::new(), "/debug/runtime").await;
    assert_eq!(answer.status, StatusCode::OK);
    let runtime = answer.json();
    assert_eq!(runtime["flavor"], "multi_thread", "{runtime}");
    assert_eq!(runtime["workers"], 3, "{runtime}");
    assert!(runtime["alive_tasks"].as_u64().unwrap() >= 5, "{runtime}");
    assert!(runtime["global_queue_depth"].is_u64(), "{runtime}");
    let workers = runtime["per_worker"].as_array().unwrap();
    assert_eq!(workers.len(), 3, "{runtime}");
    for (index, worker) in workers.iter().enumerate() {
        assert_eq!(worker["worker"], index);
        assert!(worker["park_count"].is_u64(), "{worker}");
        assert!(worker["park_unpark_count"].is_u64(), "{worker}");
        assert!(worker["busy_seconds"].is_f64(), "{worker}");
    }
    release.send(true).unwrap();
    for task in waiting {
        task.await.unwrap().unwrap();
    }
}

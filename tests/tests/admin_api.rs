//! The admin API (`--admin-addr`) with the file store: auth, validation, versions, hostile
//! input, routing of what it stores, and persistence across a restart. Real sockets.

use std::time::{Duration, Instant};

use serde_json::json;
use sha2::{Digest, Sha256};
use tests::admin::{self, TOKEN};
use tests::assert_eventually;
use tests::config;
use tests::eventually::expect_eq;
use tests::harness::{TestGateway, Upstream, get};

const PATIENCE: Duration = Duration::from_secs(5);

/// A gateway whose file config routes `/file/*` to `file_target`, with an admin API on a
/// file store in `store_dir`.
async fn gateway(file_target: &str, store_dir: &std::path::Path) -> TestGateway {
    let flags = admin::flags(&format!("file://{}", store_dir.display()));
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    TestGateway::start_with(&config::single("/file/*", file_target, ""), &flags)
        .await
        .expect("gateway starts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_to_start_without_a_token() {
    let store = tempfile::tempdir().unwrap();
    let error = TestGateway::start_with(
        &config::single("/a", "127.0.0.1:1", ""),
        &[
            "--admin-addr",
            "127.0.0.1:0",
            "--store",
            &format!("file://{}", store.path().display()),
        ],
    )
    .await
    .err()
    .expect("no token: no start");
    assert!(error.contains("--admin-token"), "{error}");
    assert!(!error.contains('\n'), "one line: {error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_need_the_bearer_token_and_admin_is_not_on_the_proxy_listener() {
    let store = tempfile::tempdir().unwrap();
    let upstream = Upstream::named("file").await;
    let gw = gateway(&upstream.target(), store.path()).await;
    let addr = gw.admin_addr.expect("admin listener");
    let none = admin::call(addr, "GET", "/admin/v1/endpoints", None, &[], "").await;
    assert_eq!(none.status, 401, "{}", none.body);
    assert_eq!(none.header("www-authenticate"), "Bearer");
    assert!(admin::json(&none)["error"].is_string());
    let wrong = admin::call(addr, "GET", "/admin/v1/endpoints", Some("nope"), &[], "").await;
    assert_eq!(wrong.status, 401);
    let wrong_put = admin::put(addr, "x", &admin::endpoint("/x", "127.0.0.1:1"), &[]).await;
    assert_eq!(
        wrong_put.status, 200,
        "the right token works: {}",
        wrong_put.body
    );
    let bad = admin::call(
        addr,
        "DELETE",
        "/admin/v1/endpoints/x",
        Some(&format!("{TOKEN}x")),
        &[],
        "",
    )
    .await;
    assert_eq!(bad.status, 401, "a longer token is wrong too");
    assert_eq!(
        admin::get(addr, "/admin/v1/endpoints/x").await.status,
        200,
        "still there"
    );
    let list = admin::get(addr, "/admin/v1/endpoints").await;
    assert_eq!(list.status, 200);
    assert_eq!(admin::json(&list).as_array().unwrap().len(), 1);
    // The proxy listener knows nothing of /admin.
    let through_proxy = tests::harness::get_with(
        &gw.url("/admin/v1/endpoints"),
        &[("authorization", &format!("Bearer {TOKEN}"))],
    )
    .await;
    assert_eq!(through_proxy.status, 404, "{}", through_proxy.body);
    let wrong_method = admin::call(addr, "POST", "/admin/v1/endpoints", Some(TOKEN), &[], "").await;
    assert_eq!(wrong_method.status, 405);
    assert_eq!(wrong_method.header("allow"), "GET");
    assert_eq!(admin::get(addr, "/admin/v1/nothing").await.status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_is_routed_replaces_a_file_endpoint_and_survives_a_restart() {
    let store = tempfile::tempdir().unwrap();
    let (file, added, replacing) = (
        Upstream::named("file").await,
        Upstream::named("added").await,
        Upstream::named("replacing").await,
    );
    let gw = gateway(&file.target(), store.path()).await;
    let addr = gw.admin_addr.unwrap();
    assert_eq!(get(&gw.url("/added/x")).await.status, 404);

    let put = admin::put(
        addr,
        "added",
        &admin::endpoint("/added/*", &added.target()),
        &[],
    )
    .await;
    assert_eq!(put.status, 200, "{}", put.body);
    let stored = admin::json(&put);
    assert_eq!(stored["id"], "added");
    assert_eq!(stored["version"], "1");
    assert_eq!(stored["endpoint"]["path"], "/added/*");
    // Applied before the PUT answers.
    let routed = get(&gw.url("/added/x")).await;
    assert_eq!((routed.status, routed.body.as_str()), (200, "added"));

    // Same method+path+host as the file's endpoint: replaces it; DELETE brings it back.
    let put = admin::put(
        addr,
        "over",
        &admin::endpoint("/file/*", &replacing.target()),
        &[],
    )
    .await;
    assert_eq!(put.status, 200, "{}", put.body);
    assert_eq!(get(&gw.url("/file/x")).await.body, "replacing");
    let config = admin::json(&admin::get(addr, "/admin/v1/config").await);
    assert_eq!(config["source"], "store");
    // Store endpoints merged into the file: the file's hash, then the store's revision.
    let file_sha = hex::encode(Sha256::digest(std::fs::read(&gw.conf).unwrap()));
    assert_eq!(
        config["base"],
        json!({
            "source": "file",
            "path": gw.conf.display().to_string(),
            "version": file_sha[..12],
        })
    );
    let revision = config["storeRevision"].as_str().unwrap();
    assert!(!revision.is_empty(), "{config}");
    assert_eq!(
        config["version"],
        format!("{}+{revision}", &file_sha[..12]),
        "{config}"
    );
    assert_eq!(
        config["config"]["endpoints"].as_array().unwrap().len(),
        2,
        "{config}"
    );
    let deleted = admin::delete(addr, "over", &[]).await;
    assert_eq!(deleted.status, 200, "{}", deleted.body);
    assert_eq!(get(&gw.url("/file/x")).await.body, "file");

    // The debug view says where the config came from.
    let inspect: serde_json::Value =
        serde_json::from_str(&get(&gw.url("/debug/config/inspect")).await.body).unwrap();
    assert_eq!(inspect["source"], "store", "{inspect}");
    assert_eq!(inspect["base"]["source"], "file", "{inspect}");
    assert_eq!(inspect["base"]["version"], file_sha[..12], "{inspect}");
    assert_eq!(
        inspect["store"],
        format!("file://{}", store.path().display())
    );

    gw.stop().await.expect("clean stop");
    let gw = gateway(&file.target(), store.path()).await;
    let routed = get(&gw.url("/added/x")).await;
    assert_eq!(
        (routed.status, routed.body.as_str()),
        (200, "added"),
        "kept across a restart"
    );
    let again = admin::json(&admin::get(gw.admin_addr.unwrap(), "/admin/v1/endpoints/added").await);
    assert_eq!(again["version"], "1");
    let instances = admin::json(&admin::get(gw.admin_addr.unwrap(), "/admin/v1/instances").await);
    assert_eq!(instances.as_array().unwrap().len(), 1, "{instances}");
    assert_eq!(instances[0]["addr"], gw.admin_addr.unwrap().to_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_endpoints_are_400_naming_the_field_and_change_nothing() {
    let store = tempfile::tempdir().unwrap();
    let upstream = Upstream::named("file").await;
    let gw = gateway(&upstream.target(), store.path()).await;
    let addr = gw.admin_addr.unwrap();

    let bad_target = admin::put(
        addr,
        "e",
        &json!({"path": "/e", "backends": [{"target": "no port"}]}),
        &[],
    )
    .await;
    assert_eq!(bad_target.status, 400, "{}", bad_target.body);
    assert_eq!(
        admin::json(&bad_target)["field"],
        "backends[0].target",
        "{}",
        bad_target.body
    );
    assert!(bad_target.body.contains("backends[0].target"));

    let unknown_field = admin::put(
        addr,
        "e",
        &json!({"path": "/e", "backends": [{"target": "127.0.0.1:1", "wieght": 3}]}),
        &[],
    )
    .await;
    assert_eq!(unknown_field.status, 400, "{}", unknown_field.body);
    assert!(
        unknown_field.body.contains("backends[0]"),
        "{}",
        unknown_field.body
    );
    assert!(
        unknown_field.body.contains("wieght"),
        "{}",
        unknown_field.body
    );

    let yaml = admin::call(
        addr,
        "PUT",
        "/admin/v1/endpoints/e",
        Some(TOKEN),
        &[("content-type", "application/yaml")],
        "path: /e\nselector: bogus\nbackends:\n  - target: 127.0.0.1:1\n",
    )
    .await;
    assert_eq!(yaml.status, 400, "{}", yaml.body);
    assert_eq!(admin::json(&yaml)["field"], "selector", "{}", yaml.body);
    assert!(
        yaml.body.contains("body:2:"),
        "the YAML line: {}",
        yaml.body
    );

    // Valid alone, but does not build: a required middleware nobody registered.
    let no_build = admin::put(
        addr,
        "e",
        &json!({"path": "/e", "backends": [{"target": "127.0.0.1:1"}], "middlewares": [{"name": "no-such-middleware", "required": true}]}),
        &[],
    )
    .await;
    assert_eq!(no_build.status, 400, "{}", no_build.body);

    let bad_id = admin::put(addr, "..", &admin::endpoint("/e", "127.0.0.1:1"), &[]).await;
    assert_eq!(bad_id.status, 400, "{}", bad_id.body);

    let list = admin::json(&admin::get(addr, "/admin/v1/endpoints").await);
    assert_eq!(list, json!([]), "nothing stored");
    assert_eq!(get(&gw.url("/e")).await.status, 404, "nothing routed");
    assert_eq!(
        std::fs::read_dir(store.path())
            .map(|d| d.count())
            .unwrap_or(0),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn if_match_makes_writes_conditional_and_unknown_ids_are_404() {
    let store = tempfile::tempdir().unwrap();
    let (a, b) = (Upstream::named("a").await, Upstream::named("b").await);
    let gw = gateway(&a.target(), store.path()).await;
    let addr = gw.admin_addr.unwrap();

    assert_eq!(
        admin::get(addr, "/admin/v1/endpoints/nope").await.status,
        404
    );
    assert_eq!(admin::delete(addr, "nope", &[]).await.status, 404);
    let create_if = admin::put(
        addr,
        "v",
        &admin::endpoint("/v/*", &a.target()),
        &[("if-match", "1")],
    )
    .await;
    assert_eq!(
        create_if.status, 412,
        "If-Match on nothing: {}",
        create_if.body
    );

    let v1 = admin::put(addr, "v", &admin::endpoint("/v/*", &a.target()), &[]).await;
    assert_eq!(admin::json(&v1)["version"], "1");
    let v2 = admin::put(
        addr,
        "v",
        &admin::endpoint("/v/*", &b.target()),
        &[("if-match", "\"1\"")],
    )
    .await;
    assert_eq!(v2.status, 200, "{}", v2.body);
    assert_eq!(admin::json(&v2)["version"], "2");
    assert_eq!(get(&gw.url("/v/x")).await.body, "b");

    let stale = admin::put(
        addr,
        "v",
        &admin::endpoint("/v/*", &a.target()),
        &[("if-match", "1")],
    )
    .await;
    assert_eq!(stale.status, 412, "{}", stale.body);
    assert!(admin::json(&stale)["error"].as_str().unwrap().contains('2'));
    assert_eq!(
        get(&gw.url("/v/x")).await.body,
        "b",
        "a refused PUT changes no route"
    );
    let stale_delete = admin::delete(addr, "v", &[("if-match", "1")]).await;
    assert_eq!(stale_delete.status, 412);
    assert_eq!(get(&gw.url("/v/x")).await.body, "b");

    assert_eq!(
        admin::delete(addr, "v", &[("if-match", "2")]).await.status,
        200
    );
    assert_eq!(admin::get(addr, "/admin/v1/endpoints/v").await.status, 404);
    assert_eq!(get(&gw.url("/v/x")).await.status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_bodies_get_a_clear_4xx_and_change_nothing() {
    let store = tempfile::tempdir().unwrap();
    let upstream = Upstream::named("a").await;
    let gw = gateway(&upstream.target(), store.path()).await;
    let addr = gw.admin_addr.unwrap();
    let path = "/admin/v1/endpoints/h";
    let json_type = [("content-type", "application/json")];

    let huge = format!(
        "{{\"path\": \"/h\", \"description\": \"{}\"}}",
        "x".repeat(2 * 1024 * 1024)
    );
    let reply = admin::call(addr, "PUT", path, Some(TOKEN), &json_type, huge).await;
    assert_eq!(reply.status, 413, "{}", reply.body);

    // Free-form middleware options: only serde_json's recursion limit bounds the nesting.
    let deep = format!(
        "{{\"path\": \"/h\", \"middlewares\": [{{\"name\": \"cors\", \"options\": {}{}}}]}}",
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    let reply = admin::call(addr, "PUT", path, Some(TOKEN), &json_type, deep).await;
    assert_eq!(reply.status, 400, "{}", reply.body);
    assert!(
        admin::json(&reply)["error"]
            .as_str()
            .unwrap()
            .contains("recursion"),
        "{}",
        reply.body
    );

    let deep_yaml = format!(
        "path: /h\nmiddlewares:\n  - name: cors\n    options: {}{}\n",
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    let yaml_type = [("content-type", "application/yaml")];
    let reply = admin::call(addr, "PUT", path, Some(TOKEN), &yaml_type, deep_yaml).await;
    assert_eq!(reply.status, 400, "deep YAML: {}", reply.body);

    let not_utf8: Vec<u8> = b"{\"path\": \"/h\xff\xfe\"}".to_vec();
    let reply = admin::call(addr, "PUT", path, Some(TOKEN), &json_type, not_utf8).await;
    assert_eq!(reply.status, 400, "{}", reply.body);
    assert!(reply.body.contains("UTF-8"), "{}", reply.body);

    let reply = admin::call(
        addr,
        "PUT",
        path,
        Some(TOKEN),
        &[("content-type", "text/plain")],
        "path: /h",
    )
    .await;
    assert_eq!(reply.status, 415, "{}", reply.body);

    let reply = admin::call(addr, "PUT", path, Some(TOKEN), &json_type, "{\"path\": ").await;
    assert_eq!(reply.status, 400, "{}", reply.body);

    assert_eq!(
        admin::json(&admin::get(addr, "/admin/v1/endpoints").await),
        json!([])
    );
    assert_eq!(get(&gw.url("/h")).await.status, 404);
    // The gateway still serves and still takes a good PUT.
    let good = admin::put(addr, "h", &admin::endpoint("/h", &upstream.target()), &[]).await;
    assert_eq!(good.status, 200, "{}", good.body);
    assert_eq!(get(&gw.url("/h")).await.status, 200);
}

/// Not a timed assertion: prints what a PUT costs when the config holds 1,000 endpoints.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cost_of_a_put_on_a_1000_endpoint_config() {
    let store = tempfile::tempdir().unwrap();
    let upstream = Upstream::named("big").await;
    let endpoints: Vec<String> = (0..1000)
        .map(|i| config::endpoint(&format!("/e{i}/*"), &upstream.target(), ""))
        .collect();
    let flags = admin::flags(&format!("file://{}", store.path().display()));
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let gw = TestGateway::start_with(&config::gateway(&endpoints), &flags)
        .await
        .expect("gateway starts");
    let addr = gw.admin_addr.unwrap();
    let mut figures = Vec::new();
    for round in 0..3 {
        let started = Instant::now();
        let put = admin::put(
            addr,
            "new",
            &admin::endpoint(&format!("/new{round}"), &upstream.target()),
            &[],
        )
        .await;
        assert_eq!(put.status, 200, "{}", put.body);
        let answered = started.elapsed();
        assert_eventually!(PATIENCE, "the new route answers", || async {
            expect_eq(get(&gw.url(&format!("/new{round}"))).await.status, 200)
        });
        figures.push((answered, started.elapsed()));
    }
    for (answered, routed) in figures {
        println!(
            "PUT on a 1,001-endpoint config: answered in {:.1} ms, routed (first 200) after {:.1} ms",
            answered.as_secs_f64() * 1000.0,
            routed.as_secs_f64() * 1000.0
        );
    }
}

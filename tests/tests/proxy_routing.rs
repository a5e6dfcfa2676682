//! Routing through the real gateway: path forms, methods, hosts, 404 and 405.

use tests::config;
use tests::harness::{TestGateway, Upstream, get, get_with, send};

fn endpoint(path: &str, method: &str, host: &str, target: &str) -> String {
    config::endpoint(
        path,
        target,
        &format!("    method: {method:?}\n    host: {host:?}\n"),
    )
}

/// (method, path, request headers, expected status, expected upstream).
type Case = (
    &'static str,
    &'static str,
    &'static [(&'static str, &'static str)],
    u16,
    &'static str,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_forms_methods_and_hosts() {
    let names = ["exact", "prefix", "param", "regex", "post", "host", "any"];
    let mut upstreams = Vec::new();
    for name in names {
        upstreams.push(Upstream::named(name).await);
    }
    let t = |i: usize| upstreams[i].target();
    let yaml = format!(
        "name: routing\nendpoints:\n{}{}{}{}{}{}{}",
        endpoint("/api/echo/hello", "GET", "", &t(0)),
        endpoint("/api/echo/*", "GET", "", &t(1)),
        endpoint("/api/users/{name}", "GET", "", &t(2)),
        endpoint("/api/ids/{id:[0-9]+}", "GET", "", &t(3)),
        endpoint("/api/submit", "POST", "", &t(4)),
        endpoint("/api/host", "", "api.example.com", &t(5)),
        endpoint("/api/host", "", "", &t(6)),
    );
    let gw = TestGateway::start(&yaml).await;

    let cases: &[Case] = &[
        ("GET", "/api/echo/hello", &[], 200, "exact"),
        ("GET", "/api/echo/other", &[], 200, "prefix"),
        ("GET", "/api/echo/a/b/c", &[], 200, "prefix"),
        ("GET", "/api/echo/", &[], 200, "prefix"),
        ("GET", "/api/users/alice", &[], 200, "param"),
        ("GET", "/api/users/alice/extra", &[], 404, ""),
        ("GET", "/api/ids/42", &[], 200, "regex"),
        ("GET", "/api/ids/abc", &[], 404, ""),
        ("POST", "/api/submit", &[], 200, "post"),
        ("GET", "/api/submit", &[], 405, ""),
        (
            "GET",
            "/api/host",
            &[("host", "api.example.com")],
            200,
            "host",
        ),
        (
            "GET",
            "/api/host",
            &[("host", "API.example.com:8080")],
            200,
            "host",
        ),
        (
            "GET",
            "/api/host",
            &[("host", "other.example.com")],
            200,
            "any",
        ),
        ("GET", "/nowhere", &[], 404, ""),
    ];
    for (method, path, headers, status, body) in cases {
        let mut req = http::Request::builder().method(*method).uri(gw.url(path));
        for (name, value) in *headers {
            req = req.header(*name, *value);
        }
        let reply = send(req.body(Default::default()).unwrap()).await;
        assert_eq!(
            reply.status, *status,
            "{method} {path} {headers:?}: {reply:?}"
        );
        if !body.is_empty() {
            assert_eq!(reply.body, *body, "{method} {path} {headers:?}");
        }
    }
    // The upstream sees the original path and query.
    let reply = get(&gw.url("/api/echo/x?q=1&r=%20")).await;
    assert_eq!(reply.header("x-seen-path"), "/api/echo/x?q=1&r=%20");
    let reply = get_with(&gw.url("/api/host"), &[("host", "api.example.com")]).await;
    assert_eq!(
        reply.header("x-seen-host"),
        "api.example.com",
        "Host is passed through"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dot_segments_are_refused() {
    let upstream = Upstream::named("u").await;
    let gw = TestGateway::start(&config::gateway(&[endpoint(
        "/public/*",
        "GET",
        "",
        &upstream.target(),
    )]))
    .await;
    for path in [
        "/public/../admin",
        "/public/./x",
        "/public/%2e%2e/admin",
        "/public/.%2E/admin",
    ] {
        let reply = get(&gw.url(path)).await;
        assert_eq!(reply.status, 400, "{path}");
    }
    assert_eq!(upstream.hits(), 0);
    assert_eq!(
        get(&gw.url("/public/a.b/..c")).await.status,
        200,
        "dots inside names are fine"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_preflight_reaches_the_endpoint_of_the_requested_method() {
    let upstream = Upstream::named("u").await;
    let cors = config::middleware("cors", "{allowOrigins: [\"https://app.example.com\"]}");
    let gw = TestGateway::start(&config::single(
        "/api/items",
        &upstream.target(),
        &format!("    method: GET\n{}", config::middlewares(&cors)),
    ))
    .await;
    let preflight = send(
        http::Request::builder()
            .method("OPTIONS")
            .uri(gw.url("/api/items"))
            .header("origin", "https://app.example.com")
            .header("access-control-request-method", "GET")
            .body(Default::default())
            .unwrap(),
    )
    .await;
    assert!(
        preflight.status == 204 || preflight.status == 200,
        "{preflight:?}"
    );
    assert_eq!(
        preflight.header("access-control-allow-origin"),
        "https://app.example.com"
    );
    assert_eq!(upstream.hits(), 0, "answered by the gateway");
    // A plain OPTIONS (not a preflight) is still 405 on a GET-only endpoint.
    let plain = send(
        http::Request::builder()
            .method("OPTIONS")
            .uri(gw.url("/api/items"))
            .body(Default::default())
            .unwrap(),
    )
    .await;
    assert_eq!(plain.status, 405);
}

/// Kratos behaviours a switching user relies on: host templates, a backend's
/// `metadata.host` as the upstream's Host, and middleware names in any case.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_templates_metadata_host_and_middleware_names_follow_kratos() {
    let tenant = Upstream::named("tenant").await;
    let fallback = Upstream::named("fallback").await;
    let virtual_host = Upstream::reporting("vhost", &["host"]).await;
    let yaml = format!(
        "name: kratos\nendpoints:\n{}{}  - path: /vh\n    backends:\n      - target: {}\n        metadata: {{host: api.internal}}\n  - path: /guarded\n    middlewares:\n      - name: IPFilter\n        options: {{deny: [127.0.0.0/8]}}\n    backends:\n      - target: {}\n",
        endpoint("/t", "", "{tenant}.shop.example", &tenant.target()),
        endpoint("/t", "", "", &fallback.target()),
        virtual_host.target(),
        fallback.target(),
    );
    let gw = TestGateway::start(&yaml).await;
    let via = |host: &'static str| {
        let url = gw.url("/t");
        async move { get_with(&url, &[("host", host)]).await.body }
    };
    assert_eq!(via("acme.shop.example").await, "tenant");
    assert_eq!(via("ACME.shop.example:8080").await, "tenant");
    assert_eq!(via("a.b.shop.example").await, "fallback");
    assert_eq!(via("shop.example").await, "fallback");

    let reply = get_with(&gw.url("/vh"), &[("host", "public.example")]).await;
    assert_eq!(reply.status, 200);
    assert_eq!(
        reply
            .headers
            .get("x-seen-host")
            .map(|v| v.to_str().unwrap()),
        Some("api.internal"),
        "{:?}",
        reply.headers
    );
    // `IPFilter` is the `ipfilter` middleware: it runs and refuses loopback.
    assert_eq!(get(&gw.url("/guarded")).await.status, 403);
}

//! Routing through the real gateway: path forms, methods, hosts, 404 and 405.

use tests::harness::{TestGateway, Upstream, get, get_with, send};

fn endpoint(path: &str, method: &str, host: &str, target: &str) -> String {
    format!(
        "  - path: {path}\n    method: {method:?}\n    host: {host:?}\n    backends:\n      - target: {target}\n"
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

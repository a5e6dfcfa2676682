//! Header and query matchers through the real gateway: one path, three upstreams chosen by
//! a header, a query parameter, or neither; `present: true`, regexes, and the duplicate
//! rule, which takes matchers into account.

use tests::config;
use tests::harness::{TestGateway, Upstream, get, get_with};

/// (path and query, request headers, expected status, expected upstream).
type Case = (
    &'static str,
    &'static [(&'static str, &'static str)],
    u16,
    &'static str,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_query_or_neither_pick_the_upstream() {
    let names = ["payments", "v2", "plain", "debug", "canary"];
    let mut upstreams = Vec::new();
    for name in names {
        upstreams.push(Upstream::named(name).await);
    }
    let t = |i: usize| upstreams[i].target();
    // The plain endpoint comes first in the file: matchers still win on the same path.
    let yaml = config::gateway(&[
        config::endpoint("/pay", &t(2), ""),
        config::endpoint(
            "/pay",
            &t(0),
            "    headers:\n      - {name: x-noslate-target, value: \"service:payments\"}\n",
        ),
        config::endpoint(
            "/pay",
            &t(1),
            "    query:\n      - {name: version, value: \"2\"}\n",
        ),
        config::endpoint(
            "/pay/*",
            &t(3),
            "    method: GET\n    headers:\n      - {name: X-Debug, present: true}\n",
        ),
        config::endpoint("/pay/*", &t(2), "    method: GET\n"),
        config::endpoint(
            "/canary/{id}",
            &t(4),
            "    headers: [{name: x-build, regex: \"v[0-9]+\"}]\n    query: [{name: tag, present: true}]\n",
        ),
    ]);
    let gw = TestGateway::start(&yaml).await;

    let cases: &[Case] = &[
        (
            "/pay",
            &[("x-noslate-target", "service:payments")],
            200,
            "payments",
        ),
        (
            "/pay",
            &[("X-Noslate-Target", "service:payments")],
            200,
            "payments",
        ),
        (
            "/pay",
            &[("x-noslate-target", "service:orders")],
            200,
            "plain",
        ),
        ("/pay?version=2", &[], 200, "v2"),
        ("/pay?a=1&version=%32", &[], 200, "v2"),
        ("/pay?version=3", &[], 200, "plain"),
        ("/pay", &[], 200, "plain"),
        ("/pay/x", &[("x-debug", "")], 200, "debug"),
        ("/pay/x", &[("x-debug", "1")], 200, "debug"),
        ("/pay/x", &[], 200, "plain"),
        ("/canary/1?tag", &[("x-build", "v12")], 200, "canary"),
        ("/canary/1?tag=a", &[("x-build", "v12")], 200, "canary"),
        // anchored regex, and every matcher must hold
        ("/canary/1?tag", &[("x-build", "v12-rc")], 404, ""),
        ("/canary/1", &[("x-build", "v12")], 404, ""),
        ("/canary/1?tag", &[], 404, ""),
    ];
    for (path, headers, status, upstream) in cases {
        let reply = get_with(&gw.url(path), headers).await;
        assert_eq!(reply.status, *status, "{path} {headers:?}: {}", reply.body);
        if *status == 200 {
            assert_eq!(reply.body, *upstream, "{path} {headers:?}");
            // The query reaches the upstream untouched.
            assert!(
                reply
                    .header("x-seen-path")
                    .starts_with(path.split('?').next().unwrap_or(""))
            );
        }
    }

    // The router view shows the matchers as configured.
    let inspect = get(&gw.url("/debug/proxy/router/inspect")).await;
    assert_eq!(inspect.status, 200);
    let routes: serde_json::Value = serde_json::from_str(&inspect.body).expect("json");
    let routes = routes.as_array().cloned().unwrap_or_else(|| {
        routes["routes"]
            .as_array()
            .cloned()
            .expect("a list of routes")
    });
    assert_eq!(routes.len(), 6, "{routes:?}");
    assert!(routes[0].get("headers").is_none(), "{}", routes[0]);
    assert_eq!(
        routes[1]["headers"],
        serde_json::json!([{"name": "x-noslate-target", "value": "service:payments"}])
    );
    assert_eq!(
        routes[2]["query"],
        serde_json::json!([{"name": "version", "value": "2"}])
    );
    assert_eq!(
        routes[3]["headers"],
        serde_json::json!([{"name": "X-Debug", "present": true}])
    );
    assert_eq!(
        routes[5]["headers"],
        serde_json::json!([{"name": "x-build", "regex": "v[0-9]+"}])
    );
    gw.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_and_bad_matchers_are_config_errors() {
    let a = "127.0.0.1:9";
    let header = |value: &str| format!("    headers: [{{name: x-t, value: {value}}}]\n");
    // Same path, method, host and matchers (header names in another case): refused.
    let duplicate = config::gateway(&[
        config::endpoint("/x", a, &header("a")),
        config::endpoint("/x", a, "    headers: [{name: X-T, value: a}]\n"),
    ]);
    let error = TestGateway::start_with(&duplicate, &[])
        .await
        .err()
        .expect("a duplicate does not start");
    assert!(error.contains("duplicate endpoint"), "{error}");
    assert!(error.contains("gateway.yaml:7:"), "{error}");
    assert!(error.contains("endpoints[1]"), "{error}");
    assert_eq!(error.lines().count(), 1, "{error}");

    // Different matchers on the same path are not duplicates.
    let fine = config::gateway(&[
        config::endpoint("/x", a, &header("a")),
        config::endpoint("/x", a, &header("b")),
        config::endpoint("/x", a, ""),
    ]);
    let gw = TestGateway::start_with(&fine, &[]).await.expect("starts");
    gw.stop().await.expect("clean stop");

    for (extra, field) in [
        ("    headers: [{name: x-t}]\n", "endpoints[0].headers[0]"),
        (
            "    headers: [{name: x-t, value: a, regex: b}]\n",
            "endpoints[0].headers[0]",
        ),
        (
            "    query: [{name: q, regex: \"[\"}]\n",
            "endpoints[0].query[0].regex",
        ),
    ] {
        let yaml = config::gateway(&[config::endpoint("/x", a, extra)]);
        let error = TestGateway::start_with(&yaml, &[])
            .await
            .err()
            .expect(extra);
        assert!(error.contains("gateway.yaml:6:"), "{error}");
        assert!(error.contains(field), "{error}");
    }
}

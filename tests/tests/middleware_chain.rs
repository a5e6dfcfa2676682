//! The middleware chain through the real gateway: the order middlewares run in, and
//! broken middleware options that fail the start-up or a reload while the running config
//! keeps serving.

use std::time::Duration;

use tests::config::{endpoint, gateway, middleware, middlewares, with_middlewares};
use tests::embedded::{builtin_proxy, parse};
use tests::eventually::expect_eq;
use tests::harness::{TestGateway, Upstream, get};
use tests::{assert_eventually, metrics};

/// `Ok` once `/metrics` counts a failed build of `middleware`; otherwise what it counts.
async fn build_failure_counted(gw: &TestGateway, middleware: &str) -> Result<(), Option<f64>> {
    let failures = metrics::value(&gw.metrics().await, &metrics::build_failures(middleware));
    match failures {
        Some(n) if n >= 1.0 => Ok(()),
        other => Err(other),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_pass_in_list_order_and_responses_in_reverse() {
    let upstream = Upstream::reporting("ok", &["x-order"]).await;
    let rewrite = |n: &str| {
        middleware(
            "rewrite",
            &format!(
                "{{requestHeadersRewrite: {{add: {{x-order: \"{n}\"}}}}, responseHeadersRewrite: {{add: {{x-response-order: \"{n}\"}}}}}}"
            ),
        )
    };
    let chain = [
        middleware("logging", "{}"),
        rewrite("1"),
        rewrite("2"),
        rewrite("3"),
    ]
    .concat();
    // A global middleware wraps the endpoint's: first on the way in, last on the way out.
    let yaml = format!(
        "middlewares:\n  - name: rewrite\n    options:\n      requestHeadersRewrite: {{add: {{x-order: global}}}}\n      responseHeadersRewrite: {{add: {{x-response-order: global}}}}\n{}",
        with_middlewares("/order/*", &upstream.target(), &chain)
    );
    let gw = TestGateway::start(&yaml).await;
    let reply = get(&gw.url("/order/x")).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.header("x-seen-x-order"), "global,1,2,3");
    assert_eq!(reply.header_values("x-response-order"), "3,2,1,global");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_options_fail_start_and_reload_keeps_the_old_config() {
    let upstream = Upstream::named("kept").await;
    // At start-up: the gateway refuses to start and names endpoint, middleware and field.
    let bad = with_middlewares(
        "/conf",
        &upstream.target(),
        &middleware("ratelimit", "{rate: 10, burst: lots}"),
    );
    let err = TestGateway::start_with(&bad, &[])
        .await
        .err()
        .expect("start fails");
    assert!(
        err.contains("endpoint * /conf: middleware ratelimit: options.burst: invalid value"),
        "{err}"
    );

    // On reload: the running config keeps serving.
    let version = |v: &str, extra: &str| {
        with_middlewares(
            "/conf",
            &upstream.target(),
            &middleware(
                "rewrite",
                &format!("{{responseHeadersRewrite: {{set: {{x-version: {v}}}}}{extra}}}"),
            ),
        )
    };
    let gw = TestGateway::start(&version("one", "")).await;
    assert_eq!(get(&gw.url("/conf")).await.header("x-version"), "one");
    gw.write_config(&version("two", ", stripPrefx: /c"));
    assert_eventually!(
        Duration::from_secs(5),
        "the bad reload is attempted (a rewrite build failure is counted)",
        || build_failure_counted(&gw, "rewrite")
    );
    let reply = get(&gw.url("/conf")).await;
    assert_eq!(
        (reply.status, reply.header("x-version")),
        (200, "one"),
        "old config still serving"
    );

    gw.write_config(&version("three", ""));
    assert_eventually!(
        Duration::from_secs(5),
        "the fixed config is applied (x-version: three)",
        || async { expect_eq(get(&gw.url("/conf")).await.header("x-version"), "three") }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_middleware_config_keeps_the_old_config_serving() {
    let upstream = Upstream::named("a").await;
    let ok = endpoint("/ok", &upstream.target(), "");
    let gw = TestGateway::start(&gateway(std::slice::from_ref(&ok))).await;
    assert_eq!(get(&gw.url("/ok")).await.body, "a");

    let broken = |name: &str, options: &str| {
        let new = endpoint(
            "/new",
            &upstream.target(),
            &middlewares(&middleware(name, options)),
        );
        gateway(&[ok.clone(), new])
    };
    let bad_cidr = broken("ipfilter", "{allow: [10.0.0.0/33]}");
    let missing_key = broken("auth", "{jwt: {publicKeyFile: /nonexistent/key.pem}}");

    // What the update says: endpoint, middleware and field.
    for (yaml, expected) in [
        (
            &bad_cidr,
            "endpoint * /new: middleware ipfilter: options.allow[0]: invalid CIDR or IP address \"10.0.0.0/33\"",
        ),
        (
            &missing_key,
            "endpoint * /new: middleware auth: options.jwt.publicKeyFile: cannot read /nonexistent/key.pem",
        ),
    ] {
        let message = builtin_proxy()
            .update(&parse(yaml))
            .expect_err("the update fails")
            .to_string();
        assert!(message.starts_with(expected), "{message}");
    }

    // The running gateway rejects both and keeps serving the old routes.
    for (yaml, name) in [(&bad_cidr, "ipfilter"), (&missing_key, "auth")] {
        gw.write_config(yaml);
        assert_eventually!(
            Duration::from_secs(5),
            &format!("the gateway to try the new config (a {name} build failure is counted)"),
            || build_failure_counted(&gw, name)
        );
        assert_eq!(get(&gw.url("/ok")).await.body, "a");
        assert_eq!(get(&gw.url("/new")).await.status, 404);
        // The loader shows the failure as its last error.
        let field = if name == "ipfilter" {
            "options.allow[0]"
        } else {
            "options.jwt.publicKeyFile"
        };
        let expected = format!("endpoint * /new: middleware {name}: {field}");
        let inspect_url = gw.url("/debug/config/inspect");
        assert_eventually!(
            Duration::from_secs(2),
            "config/inspect shows the failure as its last error",
            || async {
                let inspect = get(&inspect_url).await.body;
                if inspect.contains(&expected) {
                    Ok(())
                } else {
                    Err(inspect)
                }
            }
        );
    }
}

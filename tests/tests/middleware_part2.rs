//! The second half of the middleware catalogue through the real gateway and real upstreams:
//! `circuitbreaker`, `auth`, `ipfilter` and `cache`, and a broken middleware config that
//! must leave the running config serving.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use tests::harness::{TestGateway, Upstream, eventually, get, get_with, text};

/// Throwaway HS256 tokens signed with `e2e-secret` (sub "alice"): valid until 2100,
/// expired in 2001, and one signed with another secret.
const VALID_TOKEN: &str = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJhbGljZSIsImV4cCI6NDEwMjQ0NDgwMH0.asZuY3aOwKBPdZ4tuP2w_g1QhCiFsmeQcmVQnk9RRXI";
const EXPIRED_TOKEN: &str = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJhbGljZSIsImV4cCI6MTAwMDAwMDAwMH0.BK9ZV4ef6JX1hkazSP0ZTsW8LUuzSTi44WHEBcRNfAU";
const WRONG_SIGNATURE_TOKEN: &str = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJhbGljZSIsImV4cCI6NDEwMjQ0NDgwMH0.g4l_u3WO5sH-8fI4B4jESjZg_yxtZslMW1FjvgtT34c";
/// A throwaway RS256 token (sub "bob", valid until 2100) and the public key that verifies it.
const RSA_TOKEN: &str = "eyJhbGciOiJSUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJib2IiLCJleHAiOjQxMDI0NDQ4MDB9.dI3eielbzplc5wcYjUK1wlvr8MwJuUDtaP1VjOnH5wr4ZjdcasOducNryKtCxs1YtAIwLOV1ctJA0UC7pnZu3Eq52NMEzFZY-v_qm-eFluI1Hm9NeOcYJR0qNIAwDgrsUYdSeeAI_Ph5OcFuDrN58SCtdVj6DXM8p9wuJfc8P2hky5OEta3XNNY1rEebnqTlzAOEq81hrIo8XW2_jywD29BTq6xdth9N5JwCVSv3dv9NQKyhNKX_dXLN6NXUbBDzCeIO3dZOAP9lIHt9tdQCl52DivpkKBNNSzbenPzfu1fkcPOmOdagu-VtGYvxWUVnkq8FKU2jyCNTN4UJn5D9Sg";
const RSA_PUBLIC_KEY: &str = "-----BEGIN PUBLIC KEY-----
MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAqYwQenm4IztXVAmOsLdv
yRqd93B/nJNbjG10SpQwbh8WTxgiqSDQdzLI17aA1Ptct9HE7TW5Yh9X3m3p/du1
57dLBXU3uS+UhA/pgkZtVyq9M1Yqqa9Ot046Hsnqgb1KSGJaMDQheqxhbdBKAP+4
KrJ6h/fQP0p7PpcA93f5YsonHrModhlbMJG+nD1+Um+ZzeVh1O62nC4r4oQj0xT/
EyDE+2Qbei1kWAMkQ8nHOgx6pt3Pzxyu9U1Ww8tYenybxEtOLQ7rJEOraqaNamul
fRSmFTgBebKPTf3KhD6FF2E7IrnIBUCX6q6ToKTt8DGuwLfMvUXtmYtZzTZqKORw
2wIDAQAB
-----END PUBLIC KEY-----
";

/// An upstream answering `500` while `failing` is set, `200 ok` otherwise.
async fn flaky_upstream(failing: Arc<AtomicBool>) -> Upstream {
    Upstream::start(move |_req: Request<Incoming>| {
        let failing = failing.clone();
        async move {
            let status = if failing.load(Ordering::SeqCst) {
                StatusCode::INTERNAL_SERVER_ERROR
            } else {
                StatusCode::OK
            };
            Response::builder()
                .status(status)
                .body(text("ok"))
                .expect("response")
        }
    })
    .await
}

/// An upstream that reports the request headers `auth` may add or remove.
async fn echo_upstream() -> Upstream {
    Upstream::start(|req: Request<Incoming>| async move {
        let seen = |name: &str| {
            req.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-")
                .to_string()
        };
        Response::builder()
            .header("x-seen-user", seen("x-user-id"))
            .header("x-seen-authorization", seen("authorization"))
            .header("x-seen-apikey", seen("x-api-key"))
            .header(
                "x-seen-path",
                req.uri().path_and_query().map_or("", |p| p.as_str()),
            )
            .body(text("ok"))
            .expect("response")
    })
    .await
}

async fn metrics(gw: &TestGateway) -> String {
    get(&gw.url("/metrics")).await.body
}

fn denied_line(middleware: &str, path: &str, reason: &str) -> String {
    format!(
        "gateway_middleware_denied_total{{middleware=\"{middleware}\",path=\"{path}\",reason=\"{reason}\"}}"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breaker_opens_answers_without_the_upstream_and_recovers() {
    let failing = Arc::new(AtomicBool::new(true));
    let upstream = flaky_upstream(failing.clone()).await;
    let gw = TestGateway::start(&format!(
        r#"
endpoints:
  - path: /cb
    backends: [{{target: "{}"}}]
    middlewares:
      - name: circuitbreaker
        options:
          errorThreshold: {{errorThresholdPercentage: 50, request: 5, resetTimeout: 300ms}}
          responseData:
            statusCode: 503
            header: [{{key: x-breaker, value: [open]}}]
            bodyText: breaker open
"#,
        upstream.target()
    ))
    .await;
    for _ in 0..5 {
        assert_eq!(get(&gw.url("/cb")).await.status, 500);
    }
    for _ in 0..10 {
        let reply = get(&gw.url("/cb")).await;
        assert_eq!((reply.status, reply.body.as_str()), (503, "breaker open"));
        assert_eq!(reply.header("x-breaker"), "open");
    }
    assert_eq!(
        upstream.hits(),
        5,
        "an open breaker keeps requests off the upstream"
    );
    assert!(metrics(&gw).await.contains(&format!(
        "{} 10",
        denied_line("circuitbreaker", "/cb", "breaker_open")
    )));

    failing.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(350)).await;
    let probe = get(&gw.url("/cb")).await;
    assert_eq!(
        (probe.status, probe.body.as_str()),
        (200, "ok"),
        "the half-open probe goes through"
    );
    for _ in 0..5 {
        assert_eq!(get(&gw.url("/cb")).await.status, 200);
    }
    assert_eq!(upstream.hits(), 11);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breaker_default_503_and_backup_service() {
    let failing = Arc::new(AtomicBool::new(true));
    let primary = flaky_upstream(failing).await;
    let backup = Upstream::named("backup").await;
    let gw = TestGateway::start(&format!(
        r#"
endpoints:
  - path: /default
    backends: [{{target: "{primary}"}}]
    middlewares:
      - name: circuitbreaker
        options: {{errorThreshold: {{request: 2, resetTimeout: 10s}}}}
  - path: /backup
    backends: [{{target: "{primary}"}}]
    middlewares:
      - name: circuitbreaker
        options:
          '@type': type.googleapis.com/gateway.middleware.circuitbreaker.v1.CircuitBreaker
          ratio: "0"
          backupService: {{"endpoint": {{"backends": [{{"target": "{backup}"}}]}}}}
"#,
        primary = primary.target(),
        backup = backup.target()
    ))
    .await;
    assert_eq!(get(&gw.url("/default")).await.status, 500);
    assert_eq!(get(&gw.url("/default")).await.status, 500);
    let open = get(&gw.url("/default")).await;
    assert_eq!(open.status, 503);
    assert!(open.body.contains("circuit breaker"), "{}", open.body);
    assert_eq!(primary.hits(), 2);

    let reply = get(&gw.url("/backup?q=1")).await;
    assert_eq!((reply.status, reply.body.as_str()), (200, "backup"));
    assert_eq!(reply.header("x-seen-path"), "/backup?q=1");
    assert_eq!((primary.hits(), backup.hits()), (2, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn success_ratio_throttles_a_failing_upstream() {
    let upstream = flaky_upstream(Arc::new(AtomicBool::new(true))).await;
    let gw = TestGateway::start(&format!(
        r#"
endpoints:
  - path: /sre
    backends: [{{target: "{}"}}]
    middlewares:
      - name: circuitbreaker
        options:
          successRatio: {{success: 0.6, request: "10", bucket: "10", window: 3s}}
"#,
        upstream.target()
    ))
    .await;
    let (mut failed, mut rejected) = (0, 0);
    for _ in 0..60 {
        match get(&gw.url("/sre")).await.status {
            500 => failed += 1,
            503 => rejected += 1,
            other => panic!("unexpected status {other}"),
        }
    }
    // The first 10 reach the upstream; after that each passes with probability 1/(n+1).
    assert_eq!(failed, upstream.hits());
    assert!((10..35).contains(&failed), "{failed} reached the upstream");
    assert!(rejected >= 25, "only {rejected} of 60 were throttled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_jwt_and_api_keys() {
    let upstream = echo_upstream().await;
    let keys = tempfile::tempdir().expect("tempdir");
    let key_file = keys.path().join("rsa.pem");
    std::fs::write(&key_file, RSA_PUBLIC_KEY).expect("write key");
    let gw = TestGateway::start(&format!(
        r#"
endpoints:
  - path: /jwt
    backends: [{{target: "{up}"}}]
    middlewares:
      - name: auth
        options:
          jwt: {{secret: e2e-secret, forwardClaims: {{sub: x-user-id}}}}
  - path: /rsa
    backends: [{{target: "{up}"}}]
    middlewares:
      - name: auth
        options:
          jwt: {{publicKeyFile: "{key}", algorithms: [RS256], forwardClaims: {{sub: x-user-id}}}}
  - path: /key
    backends: [{{target: "{up}"}}]
    middlewares:
      - name: auth
        options:
          apikey: {{keys: [k-123], query: apikey}}
"#,
        up = upstream.target(),
        key = key_file.display()
    ))
    .await;
    let bearer = |token: &str| format!("Bearer {token}");

    let ok = get_with(
        &gw.url("/jwt"),
        &[
            ("authorization", bearer(VALID_TOKEN).as_str()),
            ("x-user-id", "mallory"),
        ],
    )
    .await;
    assert_eq!(ok.status, 200);
    assert_eq!(
        ok.header("x-seen-user"),
        "alice",
        "the claim replaces the client's header"
    );
    assert_eq!(
        ok.header("x-seen-authorization"),
        bearer(VALID_TOKEN),
        "the token is forwarded by default"
    );

    for (token, description) in [
        (EXPIRED_TOKEN, "token expired"),
        (WRONG_SIGNATURE_TOKEN, "invalid signature"),
    ] {
        let refused = get_with(
            &gw.url("/jwt"),
            &[("authorization", bearer(token).as_str())],
        )
        .await;
        assert_eq!(refused.status, 401, "{description}");
        let challenge = refused.header("www-authenticate");
        assert!(
            challenge.starts_with("Bearer realm=\"gateway\", error=\"invalid_token\""),
            "{challenge}"
        );
        assert!(challenge.contains(description), "{challenge}");
    }
    let missing = get_with(&gw.url("/jwt"), &[("x-user-id", "mallory")]).await;
    assert_eq!(
        (missing.status, missing.header("www-authenticate")),
        (401, "Bearer realm=\"gateway\"")
    );

    let rsa = get_with(
        &gw.url("/rsa"),
        &[("authorization", bearer(RSA_TOKEN).as_str())],
    )
    .await;
    assert_eq!((rsa.status, rsa.header("x-seen-user")), (200, "bob"));
    assert_eq!(
        get_with(
            &gw.url("/rsa"),
            &[("authorization", bearer(VALID_TOKEN).as_str())]
        )
        .await
        .status,
        401
    );

    let by_header = get_with(&gw.url("/key"), &[("x-api-key", "k-123")]).await;
    assert_eq!(
        (by_header.status, by_header.header("x-seen-apikey")),
        (200, "-"),
        "the key is stripped"
    );
    let by_query = get(&gw.url("/key?a=1&apikey=k-123")).await;
    assert_eq!(
        (by_query.status, by_query.header("x-seen-path")),
        (200, "/key?a=1")
    );
    let wrong = get_with(&gw.url("/key"), &[("x-api-key", "k-999")]).await;
    assert_eq!(
        (wrong.status, wrong.header("www-authenticate")),
        (401, "ApiKey realm=\"gateway\"")
    );

    let text = metrics(&gw).await;
    assert!(
        text.contains(&format!(
            "{} 3",
            denied_line("auth", "/jwt", "unauthorized")
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "{} 1",
            denied_line("auth", "/key", "unauthorized")
        )),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipfilter_allow_deny_and_forwarded_for() {
    let upstream = Upstream::named("up").await;
    let endpoint = |path: &str, options: &str| {
        format!(
            "  - path: {path}\n    backends: [{{target: \"{}\"}}]\n    middlewares:\n      - name: ipfilter\n        options: {options}\n",
            upstream.target()
        )
    };
    let yaml = [
        endpoint("/deny-loopback", "{deny: [127.0.0.0/8]}"),
        endpoint("/allow-ten", "{allow: [10.0.0.0/8]}"),
        endpoint(
            "/allow-self",
            "{allow: [127.0.0.1/32], deny: [192.0.2.0/24]}",
        ),
        endpoint("/xff-untrusted", "{allow: [10.0.0.0/8]}"),
        endpoint(
            "/xff-trusted",
            "{allow: [10.0.0.0/8], trustedProxies: [127.0.0.1/32]}",
        ),
    ]
    .concat();
    let gw = TestGateway::start(&format!("endpoints:\n{yaml}")).await;

    let deny = get(&gw.url("/deny-loopback")).await;
    assert_eq!((deny.status, deny.body.as_str()), (403, "403 forbidden\n"));
    assert_eq!(get(&gw.url("/allow-ten")).await.status, 403);
    assert_eq!(get(&gw.url("/allow-self")).await.status, 200);
    // X-Forwarded-For only counts when the peer is a trusted proxy.
    assert_eq!(
        get_with(
            &gw.url("/xff-untrusted"),
            &[("x-forwarded-for", "10.1.2.3")]
        )
        .await
        .status,
        403
    );
    assert_eq!(
        get_with(&gw.url("/xff-trusted"), &[("x-forwarded-for", "10.1.2.3")])
            .await
            .status,
        200
    );
    assert_eq!(
        get(&gw.url("/xff-trusted")).await.status,
        403,
        "the trusted peer itself is not in allow"
    );
    // The rightmost untrusted hop is the client: a forged leftmost entry does not help.
    let forged = get_with(
        &gw.url("/xff-trusted"),
        &[("x-forwarded-for", "10.1.2.3, 192.0.2.9")],
    )
    .await;
    assert_eq!(forged.status, 403);
    assert_eq!(upstream.hits(), 2);
    assert!(metrics(&gw).await.contains(&format!(
        "{} 1",
        denied_line("ipfilter", "/deny-loopback", "ip_denied")
    )));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_hits_misses_expiry_vary_and_no_store() {
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    let upstream = Upstream::start(move |req: Request<Incoming>| {
        let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
        async move {
            let mut response = Response::builder();
            let language = req
                .headers()
                .get("accept-language")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            match req.uri().path() {
                "/vary" => response = response.header("vary", "Accept-Language"),
                "/nostore" => response = response.header("cache-control", "no-store"),
                _ => {}
            }
            response
                .body(text(format!("{n} {language}")))
                .expect("response")
        }
    })
    .await;
    let gw = TestGateway::start(&format!(
        r#"
endpoints:
  - path: /*
    backends: [{{target: "{}"}}]
    middlewares:
      - name: cache
        options: {{defaultTtl: 400ms, maxBytes: "1048576"}}
"#,
        upstream.target()
    ))
    .await;

    let miss = get(&gw.url("/plain")).await;
    assert_eq!(
        (miss.status, miss.header("x-cache"), miss.body.as_str()),
        (200, "MISS", "1 ")
    );
    let hit = get(&gw.url("/plain")).await;
    assert_eq!(
        (hit.header("x-cache"), hit.body.as_str(), hit.header("age")),
        ("HIT", "1 ", "0")
    );
    assert_eq!(upstream.hits(), 1, "a hit does not touch the upstream");
    tokio::time::sleep(Duration::from_millis(450)).await;
    let expired = get(&gw.url("/plain")).await;
    assert_eq!(
        (expired.header("x-cache"), expired.body.as_str()),
        ("MISS", "2 ")
    );

    let en = [("accept-language", "en")];
    let fr = [("accept-language", "fr")];
    assert_eq!(
        get_with(&gw.url("/vary"), &en).await.header("x-cache"),
        "MISS"
    );
    assert_eq!(
        get_with(&gw.url("/vary"), &fr).await.header("x-cache"),
        "MISS"
    );
    let en_hit = get_with(&gw.url("/vary"), &en).await;
    let fr_hit = get_with(&gw.url("/vary"), &fr).await;
    assert_eq!(
        (en_hit.header("x-cache"), en_hit.body.as_str()),
        ("HIT", "3 en")
    );
    assert_eq!(
        (fr_hit.header("x-cache"), fr_hit.body.as_str()),
        ("HIT", "4 fr")
    );

    get(&gw.url("/nostore")).await;
    assert_eq!(get(&gw.url("/nostore")).await.header("x-cache"), "MISS");
    assert_eq!(upstream.hits(), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_middleware_config_keeps_the_old_config_serving() {
    let upstream = Upstream::named("a").await;
    let good = format!(
        "endpoints:\n  - path: /ok\n    backends: [{{target: \"{}\"}}]\n",
        upstream.target()
    );
    let gw = TestGateway::start(&good).await;
    assert_eq!(get(&gw.url("/ok")).await.body, "a");

    let broken = |middleware: &str| {
        format!(
            "{good}  - path: /new\n    backends: [{{target: \"{}\"}}]\n    middlewares:\n      - name: {middleware}\n",
            upstream.target()
        )
    };
    let bad_cidr = broken("ipfilter\n        options: {allow: [10.0.0.0/33]}");
    let missing_key = broken("auth\n        options: {jwt: {publicKeyFile: /nonexistent/key.pem}}");

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
        let config =
            configs::parse(yaml, std::path::Path::new("gateway.yaml")).expect("valid YAML");
        let mut registry = middleware::Registry::new();
        middleware::builtin::register_all(&mut registry);
        let proxy = proxy::Proxy::new(
            client::Factory::new(client::ClientOptions::default(), None),
            registry,
            Arc::new(middleware::metrics::Metrics::new()),
        );
        let message = proxy
            .update(&config)
            .expect_err("the update fails")
            .to_string();
        assert!(message.starts_with(expected), "{message}");
    }

    // The running gateway rejects both and keeps serving the old routes.
    for (yaml, middleware) in [(&bad_cidr, "ipfilter"), (&missing_key, "auth")] {
        gw.write_config(yaml);
        let failure =
            format!("gateway_middleware_build_failures_total{{middleware=\"{middleware}\"}}");
        assert!(
            eventually(Duration::from_secs(5), || async {
                metrics(&gw).await.contains(&failure)
            })
            .await,
            "the gateway did not try the new config"
        );
        assert_eq!(get(&gw.url("/ok")).await.body, "a");
        assert_eq!(get(&gw.url("/new")).await.status, 404);
        // The loader shows the failure as its last error.
        let field = if middleware == "ipfilter" {
            "options.allow[0]"
        } else {
            "options.jwt.publicKeyFile"
        };
        let expected = format!("endpoint * /new: middleware {middleware}: {field}");
        let inspect_url = gw.url("/debug/config/inspect");
        let shown = eventually(Duration::from_secs(2), || async {
            get(&inspect_url).await.body.contains(&expected)
        })
        .await;
        assert!(shown, "{}", get(&inspect_url).await.body);
    }
}

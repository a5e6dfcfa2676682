//! The Apigee Edge plugins through the real gateway: `auth` with OAuth 2.0 token
//! introspection (RFC 7662) against an introspection endpoint double, and `analytics`
//! shipping records to a collector double or a file.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use tests::assert_eventually;
use tests::config::{endpoint, gateway, middleware, middlewares};
use tests::eventually::expect_eq;
use tests::harness::{TestGateway, Upstream, get_with, text, unused_port};
use tests::metrics;

/// `Basic base64("gateway:s3cr%2Ft")`: the client secret `s3cr/t` form-urlencoded first,
/// as RFC 6749 §2.3.1 asks.
const GATEWAY_CREDENTIALS: &str = "Basic Z2F0ZXdheTpzM2NyJTJGdA==";

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs())
        .unwrap_or_default()
}

/// An RFC 7662 introspection endpoint double on 127.0.0.1: checks the gateway's Basic
/// credentials (401 otherwise), counts calls per token, answers from its table
/// (`{"active": false}` for unknown tokens), and never answers token `slow`.
struct Introspection {
    server: Upstream,
    calls: Arc<Mutex<HashMap<String, usize>>>,
}

impl Introspection {
    async fn start(answers: Vec<(&str, Value)>) -> Introspection {
        let answers: Arc<HashMap<String, Value>> = Arc::new(
            answers
                .into_iter()
                .map(|(token, answer)| (token.to_owned(), answer))
                .collect(),
        );
        let calls = Arc::new(Mutex::new(HashMap::<String, usize>::new()));
        let counted = calls.clone();
        let server = Upstream::start(move |request: Request<Incoming>| {
            let (answers, calls) = (answers.clone(), counted.clone());
            async move {
                let authorized = request.method() == "POST"
                    && request.uri().path() == "/oauth2/introspect"
                    && request
                        .headers()
                        .get("authorization")
                        .is_some_and(|value| value == GATEWAY_CREDENTIALS)
                    && request
                        .headers()
                        .get("content-type")
                        .is_some_and(|value| value == "application/x-www-form-urlencoded");
                let body = request
                    .into_body()
                    .collect()
                    .await
                    .map(|body| body.to_bytes())
                    .unwrap_or_default();
                if !authorized {
                    return Response::builder()
                        .status(401)
                        .body(text("{\"error\":\"invalid_client\"}"))
                        .expect("response");
                }
                let token = form_value(&body, "token").unwrap_or_default();
                *calls
                    .lock()
                    .expect("lock")
                    .entry(token.clone())
                    .or_default() += 1;
                if token == "slow" {
                    tokio::time::sleep(Duration::from_secs(30)).await;
                }
                let answer = answers
                    .get(&token)
                    .cloned()
                    .unwrap_or_else(|| json!({"active": false}));
                Response::builder()
                    .header("content-type", "application/json")
                    .body(text(answer.to_string()))
                    .expect("response")
            }
        })
        .await;
        Introspection { server, calls }
    }

    fn url(&self) -> String {
        format!("http://{}/oauth2/introspect", self.server.addr)
    }

    fn calls(&self, token: &str) -> usize {
        self.calls
            .lock()
            .expect("lock")
            .get(token)
            .copied()
            .unwrap_or(0)
    }
}

/// The value of `name` in an `application/x-www-form-urlencoded` body (only the
/// percent-escapes and `+` a token can need are decoded).
fn form_value(body: &[u8], name: &str) -> Option<String> {
    let text = std::str::from_utf8(body).ok()?;
    text.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=')?;
        (key == name).then(|| percent_decode(value))
    })
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        match bytes[index] {
            b'+' => out.push(b' '),
            b'%' if index + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[index + 1..index + 3]).unwrap_or("");
                out.push(u8::from_str_radix(hex, 16).unwrap_or(b'?'));
                index += 2;
            }
            byte => out.push(byte),
        }
        index += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn oauth(url: &str, extra: &str) -> String {
    middleware(
        "auth",
        &format!(
            "{{oauth: {{introspectionUrl: \"{url}\", clientId: gateway, clientSecret: \"s3cr/t\"{extra}}}}}"
        ),
    )
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oauth_introspection_active_inactive_expired_scope_and_cache() {
    let far = unix_now() + 3600;
    let idp = Introspection::start(vec![
        (
            "good",
            json!({"active": true, "scope": "orders:read profile", "client_id": "app-1", "exp": far}),
        ),
        ("profile-only", json!({"active": true, "scope": "profile", "exp": far})),
        ("expired", json!({"active": true, "scope": "orders:read", "exp": unix_now() - 10})),
        ("revoked", json!({"active": false})),
        ("short", json!({"active": true, "scope": "orders:read", "exp": unix_now() + 2})),
        ("refresh", json!({"active": true, "scope": "orders:read", "exp": far})),
    ])
    .await;
    let upstream = Upstream::reporting("orders", &["authorization"]).await;
    let orders = oauth(&idp.url(), ", scopes: [orders:read]");
    let refresh = oauth(&idp.url(), ", scopes: [orders:read], cacheTtl: 1s");
    let gw = TestGateway::start(&gateway(&[
        endpoint("/orders", &upstream.target(), &middlewares(&orders)),
        endpoint("/refresh", &upstream.target(), &middlewares(&refresh)),
    ]))
    .await;
    let orders_url = gw.url("/orders");
    let call = |token: &str| {
        let (url, token) = (orders_url.clone(), token.to_owned());
        async move {
            match token.as_str() {
                "" => get_with(&url, &[]).await,
                token => get_with(&url, &[("authorization", bearer(token).as_str())]).await,
            }
        }
    };

    // No token: a bare challenge, and the upstream never hears of it.
    let missing = call("").await;
    assert_eq!(missing.status, 401);
    assert_eq!(
        missing.header("www-authenticate"),
        "Bearer realm=\"gateway\""
    );

    // An active token with the scope passes; the upstream still sees the token.
    let ok = call("good").await;
    assert_eq!((ok.status, ok.body.as_str()), (200, "orders"));
    assert_eq!(ok.header("x-seen-authorization"), "Bearer good");
    assert_eq!(idp.calls("good"), 1);
    // The answer is cached: the same token again makes no call.
    for _ in 0..3 {
        assert_eq!(call("good").await.status, 200);
    }
    assert_eq!(idp.calls("good"), 1, "served from the cache");

    // Inactive and expired tokens: 401 invalid_token (RFC 6750), never cached.
    for _ in 0..2 {
        let revoked = call("revoked").await;
        assert_eq!(revoked.status, 401);
        assert_eq!(
            revoked.header("www-authenticate"),
            "Bearer realm=\"gateway\", error=\"invalid_token\", error_description=\"token is not active\""
        );
    }
    assert_eq!(idp.calls("revoked"), 2, "inactive answers are not cached");
    let expired = call("expired").await;
    assert_eq!(expired.status, 401);
    assert_eq!(
        expired.header("www-authenticate"),
        "Bearer realm=\"gateway\", error=\"invalid_token\", error_description=\"token expired\""
    );

    // Active, but without the endpoint's scope: 403 insufficient_scope naming the scope.
    let scope = call("profile-only").await;
    assert_eq!(scope.status, 403);
    assert_eq!(
        scope.header("www-authenticate"),
        "Bearer realm=\"gateway\", error=\"insufficient_scope\", scope=\"orders:read\""
    );
    assert_eq!(upstream.hits(), 4, "only the good token's requests went up");

    // A token cached until its exp: once exp passes the entry is gone, the endpoint is
    // asked again and the token is refused.
    assert_eq!(call("short").await.status, 200);
    assert_eq!(call("short").await.status, 200);
    assert_eq!(idp.calls("short"), 1);
    assert_eventually!(
        Duration::from_secs(5),
        "the expired token is refused",
        || {
            let call = call("short");
            async move { expect_eq(call.await.status, 401) }
        }
    );
    assert_eq!(
        idp.calls("short"),
        2,
        "one call when the cached entry expired"
    );

    // cacheTtl bounds reuse even when exp is far: after 1 s the endpoint is asked again.
    let refresh_url = gw.url("/refresh");
    let token = bearer("refresh");
    assert_eq!(
        get_with(&refresh_url, &[("authorization", token.as_str())])
            .await
            .status,
        200
    );
    assert_eq!(idp.calls("refresh"), 1);
    let idp_ref = &idp;
    assert_eventually!(
        Duration::from_secs(5),
        "the stale entry is refreshed",
        || {
            let (url, token, idp) = (refresh_url.clone(), token.clone(), idp_ref);
            async move {
                let status = get_with(&url, &[("authorization", token.as_str())])
                    .await
                    .status;
                assert_eq!(status, 200);
                expect_eq(idp.calls("refresh"), 2)
            }
        }
    );

    let page = gw.metrics().await;
    let denied = |reason| metrics::value(&page, &metrics::denied("auth", "/orders", reason));
    assert_eq!(denied("unauthorized"), Some(5.0), "{page}");
    assert_eq!(denied("insufficient_scope"), Some(1.0), "{page}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oauth_introspection_down_slow_or_refusing_the_gateway_gets_503() {
    let idp = Introspection::start(vec![("good", json!({"active": true}))]).await;
    let upstream = Upstream::named("u").await;
    let down = format!("http://127.0.0.1:{}/oauth2/introspect", unused_port());
    let wrong_secret = middleware(
        "auth",
        &format!(
            "{{oauth: {{introspectionUrl: \"{}\", clientId: gateway, clientSecret: wrong}}}}",
            idp.url()
        ),
    );
    let gw = TestGateway::start(&gateway(&[
        endpoint("/down", &upstream.target(), &middlewares(&oauth(&down, ""))),
        endpoint(
            "/slow",
            &upstream.target(),
            &format!(
                "    timeout: 10s\n{}",
                middlewares(&oauth(&idp.url(), ", timeout: 300ms"))
            ),
        ),
        endpoint("/wrong", &upstream.target(), &middlewares(&wrong_secret)),
    ]))
    .await;

    let down = get_with(&gw.url("/down"), &[("authorization", "Bearer good")]).await;
    assert_eq!(down.status, 503, "{down:?}");
    assert_eq!(down.body, "503 authorization server unavailable\n");

    // A silent endpoint: 503 once the introspection timeout (300 ms) passes, long before
    // the endpoint's own 10 s timeout.
    let started = Instant::now();
    let slow = get_with(&gw.url("/slow"), &[("authorization", "Bearer slow")]).await;
    assert_eq!(slow.status, 503);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "bounded by the introspection timeout: {:?}",
        started.elapsed()
    );
    assert_eq!(idp.calls("slow"), 1);

    // The endpoint refuses the gateway's credentials: not the client's fault, 503 too.
    let wrong = get_with(&gw.url("/wrong"), &[("authorization", "Bearer good")]).await;
    assert_eq!(wrong.status, 503);
    assert_eq!(
        idp.calls("good"),
        0,
        "the double refused before looking at the token"
    );
    assert_eq!(upstream.hits(), 0);

    let page = gw.metrics().await;
    assert_eq!(
        metrics::value(
            &page,
            &metrics::denied("auth", "/down", "introspection_failed")
        ),
        Some(1.0),
        "{page}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oauth_refusals_on_grpc_endpoints_are_grpc_statuses() {
    let idp = Introspection::start(vec![(
        "profile-only",
        json!({"active": true, "scope": "profile"}),
    )])
    .await;
    let upstream = Upstream::named("u").await;
    let down = format!("http://127.0.0.1:{}/oauth2/introspect", unused_port());
    let gw = TestGateway::start(&gateway(&[
        endpoint(
            "/grpc.health.v1.Health/Check",
            &upstream.target(),
            &format!(
                "    protocol: GRPC\n{}",
                middlewares(&oauth(&idp.url(), ", scopes: [health]"))
            ),
        ),
        endpoint(
            "/down.Service/Call",
            &upstream.target(),
            &format!("    protocol: GRPC\n{}", middlewares(&oauth(&down, ""))),
        ),
    ]))
    .await;
    // h2c with prior knowledge, as gRPC clients speak it.
    let client = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http::<Full<Bytes>>();
    let status_of = |path: &str, token: &str| {
        let mut request = Request::post(gw.url(path))
            .header("content-type", "application/grpc")
            .header("te", "trailers");
        if !token.is_empty() {
            request = request.header("authorization", bearer(token));
        }
        let request = request
            .body(Full::new(Bytes::from_static(&[0, 0, 0, 0, 0])))
            .expect("request");
        let call = client.request(request);
        async move {
            let response = tokio::time::timeout(Duration::from_secs(10), call)
                .await
                .expect("answer within 10 s")
                .expect("response");
            assert_eq!(response.version(), Version::HTTP_2);
            assert_eq!(
                response.status(),
                StatusCode::OK,
                "gRPC refusals are HTTP 200"
            );
            response
                .headers()
                .get("grpc-status")
                .and_then(|value| value.to_str().ok())
                .unwrap_or("")
                .to_owned()
        }
    };
    let check = "/grpc.health.v1.Health/Check";
    assert_eq!(status_of(check, "").await, "16", "UNAUTHENTICATED");
    assert_eq!(status_of(check, "revoked").await, "16", "UNAUTHENTICATED");
    assert_eq!(
        status_of(check, "profile-only").await,
        "7",
        "PERMISSION_DENIED"
    );
    assert_eq!(
        status_of("/down.Service/Call", "any").await,
        "14",
        "UNAVAILABLE"
    );
    assert_eq!(upstream.hits(), 0);
}

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

/// A throwaway HS256 token signed with `e2e-secret` (sub "alice", valid until 2100).
const ALICE_TOKEN: &str = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJhbGljZSIsImV4cCI6NDEwMjQ0NDgwMH0.asZuY3aOwKBPdZ4tuP2w_g1QhCiFsmeQcmVQnk9RRXI";

/// An analytics collector double: keeps every batch POSTed to `/collect` (a JSON array)
/// and answers 204.
struct Collector {
    server: Upstream,
    batches: Arc<Mutex<Vec<Vec<Value>>>>,
}

impl Collector {
    async fn start() -> Collector {
        let batches = Arc::new(Mutex::new(Vec::new()));
        let kept = batches.clone();
        let server = Upstream::start(move |request: Request<Incoming>| {
            let kept = kept.clone();
            async move {
                let json = request.method() == "POST"
                    && request.uri().path() == "/collect"
                    && request
                        .headers()
                        .get("content-type")
                        .is_some_and(|value| value == "application/json");
                let body = request
                    .into_body()
                    .collect()
                    .await
                    .map(|body| body.to_bytes())
                    .unwrap_or_default();
                match serde_json::from_slice::<Vec<Value>>(&body) {
                    Ok(batch) if json => {
                        kept.lock().expect("lock").push(batch);
                        Response::builder()
                            .status(204)
                            .body(text(""))
                            .expect("response")
                    }
                    _ => Response::builder()
                        .status(400)
                        .body(text("want a JSON array"))
                        .expect("response"),
                }
            }
        })
        .await;
        Collector { server, batches }
    }

    fn url(&self) -> String {
        format!("http://{}/collect", self.server.addr)
    }

    fn records(&self) -> Vec<Value> {
        self.batches.lock().expect("lock").concat()
    }
}

/// An upstream answering `ok` (length known), or for `/api/stream` three streamed
/// chunks of 1000 bytes (no length), after reading the whole request body.
async fn analytics_upstream() -> Upstream {
    Upstream::start(|request: Request<Incoming>| async move {
        let streamed = request.uri().path() == "/api/stream";
        let _ = request.into_body().collect().await;
        if !streamed {
            return Response::new(text("ok"));
        }
        let chunks = futures_util::stream::iter(
            (0..3).map(|_| Ok(hyper::body::Frame::data(Bytes::from(vec![b'x'; 1000])))),
        );
        Response::new(http_body_util::StreamBody::new(chunks).boxed_unsync())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn analytics_batches_reach_the_collector_with_the_right_fields() {
    let collector = Collector::start().await;
    let upstream = analytics_upstream().await;
    let analytics = middleware(
        "analytics",
        &format!(
            "{{url: \"{}\", batchSize: 5, flushInterval: 200ms}}",
            collector.url()
        ),
    );
    let jwt = middleware("auth", "{jwt: {secret: e2e-secret}}");
    let gw = TestGateway::start(&gateway(&[
        endpoint("/api/*", &upstream.target(), &middlewares(&analytics)),
        endpoint(
            "/jwt/*",
            &upstream.target(),
            &middlewares(&format!("{analytics}{jwt}")),
        ),
    ]))
    .await;

    for index in 0..10 {
        let reply = get_with(&gw.url(&format!("/api/item/{index}?apikey=secret")), &[]).await;
        assert_eq!((reply.status, reply.body.as_str()), (200, "ok"));
    }
    // A streamed upload (7 bytes in two chunks, no length) and a streamed download.
    let chunks = futures_util::stream::iter(["abc", "defg"].map(|chunk| {
        Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(Bytes::from(chunk)))
    }));
    let upload = Request::post(gw.url("/api/upload"))
        .body(http_body_util::StreamBody::new(chunks))
        .expect("request");
    let uploaded = Client::builder(TokioExecutor::new())
        .build_http()
        .request(upload)
        .await
        .expect("upload answered");
    assert_eq!(uploaded.status(), 200);
    let _ = uploaded.into_body().collect().await;
    let download = get_with(&gw.url("/api/stream"), &[]).await;
    assert_eq!((download.status, download.body.len()), (200, 3000));
    // Through auth: the client id is the token's subject; a refusal is recorded too.
    let alice = get_with(
        &gw.url("/jwt/me"),
        &[("authorization", bearer(ALICE_TOKEN).as_str())],
    )
    .await;
    assert_eq!(alice.status, 200);
    assert_eq!(get_with(&gw.url("/jwt/me"), &[]).await.status, 401);

    assert_eventually!(
        Duration::from_secs(10),
        "14 records at the collector",
        || async { expect_eq(collector.records().len(), 14) }
    );
    let batches = collector.batches.lock().expect("lock").clone();
    assert!(
        batches
            .iter()
            .all(|batch| !batch.is_empty() && batch.len() <= 5),
        "batches of at most 5: {batches:?}"
    );
    assert!(
        batches.len() >= 3,
        "14 records need 3 batches or more: {batches:?}"
    );

    let records = collector.records();
    let find = |path: &str| -> Value {
        records
            .iter()
            .find(|record| record["path"] == path)
            .cloned()
            .unwrap_or_else(|| panic!("no record for {path}: {records:?}"))
    };
    let mut keys: Vec<String> = find("/api/item/0")
        .as_object()
        .expect("an object")
        .keys()
        .cloned()
        .collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "client",
            "endpoint",
            "latency_ms",
            "method",
            "node",
            "path",
            "rx_bytes",
            "status",
            "time",
            "tx_bytes"
        ]
    );
    for index in 0..10 {
        let record = find(&format!("/api/item/{index}"));
        assert_eq!(record["endpoint"], "/api/*");
        assert_eq!(record["method"], "GET");
        assert_eq!(record["node"], upstream.target());
        assert_eq!(record["status"], 200);
        assert_eq!(record["rx_bytes"], 0);
        assert_eq!(record["tx_bytes"], 2);
        assert_eq!(record["client"], "127.0.0.1");
        assert!(
            record["latency_ms"].as_f64().is_some_and(|ms| ms >= 0.0),
            "{record}"
        );
        let time = record["time"].as_str().expect("time");
        assert!(
            time.len() == 24 && time.ends_with('Z') && time.as_bytes()[10] == b'T',
            "RFC 3339 UTC with milliseconds: {time}"
        );
    }
    let upload = find("/api/upload");
    assert_eq!(
        (upload["method"].as_str(), upload["rx_bytes"].as_u64()),
        (Some("POST"), Some(7))
    );
    assert_eq!(find("/api/stream")["tx_bytes"], 3000);
    let jwt_records: Vec<&Value> = records
        .iter()
        .filter(|record| record["path"] == "/jwt/me")
        .collect();
    assert_eq!(jwt_records.len(), 2);
    let accepted = jwt_records
        .iter()
        .find(|record| record["status"] == 200)
        .expect("the accepted one");
    assert_eq!(
        (accepted["client"].as_str(), accepted["endpoint"].as_str()),
        (Some("alice"), Some("/jwt/*"))
    );
    let refused = jwt_records
        .iter()
        .find(|record| record["status"] == 401)
        .expect("the refused one");
    assert_eq!(refused["client"], "127.0.0.1");
    assert_eq!(
        refused["node"],
        Value::Null,
        "refused before a node was picked"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn analytics_file_sink_writes_json_lines() {
    let upstream = analytics_upstream().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("analytics.jsonl");
    let analytics = middleware(
        "analytics",
        &format!("{{file: \"{}\", flushInterval: 100ms}}", file.display()),
    );
    let gw = TestGateway::start(&gateway(&[endpoint(
        "/api/*",
        &upstream.target(),
        &middlewares(&analytics),
    )]))
    .await;
    for index in 0..3 {
        let reply = get_with(&gw.url(&format!("/api/{index}")), &[]).await;
        assert_eq!(reply.status, 200);
    }
    assert_eq!(get_with(&gw.url("/api/stream"), &[]).await.body.len(), 3000);
    assert_eventually!(Duration::from_secs(10), "4 lines in the file", || async {
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        expect_eq(text.lines().count(), 4)
    });
    let text = std::fs::read_to_string(&file).expect("file");
    assert!(text.ends_with('\n'));
    let records: Vec<Value> = text
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|err| panic!("{line:?}: {err}")))
        .collect();
    for record in &records {
        assert_eq!(record["endpoint"], "/api/*");
        assert_eq!(record["status"], 200);
        assert_eq!(record["node"], upstream.target());
    }
    let streamed = records
        .iter()
        .find(|record| record["path"] == "/api/stream")
        .expect("the streamed download's record");
    assert_eq!(streamed["tx_bytes"], 3000);
}

/// The collector down (connection refused) on one endpoint and silent (accepts, never
/// answers) on another, under 5,000 requests: every request succeeds, the queue never
/// holds more than `queueSize`, and every record is accounted for as dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn analytics_with_the_collector_down_drops_and_counts_without_blocking() {
    const REQUESTS: usize = 5_000;
    let upstream = analytics_upstream().await;
    let silent = Upstream::start(|_request: Request<Incoming>| async {
        tokio::time::sleep(Duration::from_secs(60)).await;
        Response::new(text(""))
    })
    .await;
    let clients = client::Factory::new(client::ClientOptions::default(), None);
    let analytics = middleware_builtin::analytics::AnalyticsFactory::new(clients.clone());
    let mut registry = middleware::Registry::new();
    registry.register("analytics", analytics.clone());
    let metrics = Arc::new(proxy::Metrics::new());
    let proxy = proxy::Proxy::new(clients, registry, metrics.clone());
    let options = |url: &str| {
        middlewares(&middleware(
            "analytics",
            &format!(
                "{{url: \"{url}\", batchSize: 50, queueSize: 100, flushInterval: 50ms, timeout: 300ms}}"
            ),
        ))
    };
    let down = format!("http://127.0.0.1:{}/collect", unused_port());
    let silent_url = format!("http://{}/collect", silent.addr);
    proxy
        .update(&tests::embedded::parse(&gateway(&[
            endpoint("/down", &upstream.target(), &options(&down)),
            endpoint("/silent", &upstream.target(), &options(&silent_url)),
        ])))
        .expect("config applies");

    let peer: std::net::SocketAddr = "127.0.0.1:40000".parse().expect("addr");
    let mut statuses = HashMap::<u16, usize>::new();
    for wave in 0..REQUESTS / 100 {
        let calls = (0..100).map(|index| {
            let path = if (wave * 100 + index) % 2 == 0 {
                "/down"
            } else {
                "/silent"
            };
            let proxy = &proxy;
            async move {
                let request = Request::get(path)
                    .body(Full::<Bytes>::default())
                    .expect("request");
                let response = proxy.handle(request, peer).await;
                let status = response.status().as_u16();
                let _ = response.into_body().collect().await;
                status
            }
        });
        let answered = tokio::time::timeout(
            Duration::from_secs(30),
            futures_util::future::join_all(calls),
        )
        .await
        .expect("a wave of 100 requests within 30 s: analytics never holds them up");
        for status in answered {
            *statuses.entry(status).or_default() += 1;
        }
        for sink in analytics.snapshots() {
            assert!(
                sink.queued <= sink.queue_size && sink.queued_max <= sink.queue_size,
                "queue bound respected: {sink:?}"
            );
        }
    }
    assert_eq!(statuses, HashMap::from([(200, REQUESTS)]));

    // Every record ends up dropped and counted: none shipped, none lost silently.
    assert_eventually!(
        Duration::from_secs(20),
        "all records dropped and counted",
        || async {
            let mut sinks = analytics.snapshots();
            sinks.sort_by(|a, b| a.destination.cmp(&b.destination));
            let counts: Vec<(u64, u64, usize)> = sinks
                .iter()
                .map(|sink| (sink.dropped, sink.shipped, sink.queued))
                .collect();
            expect_eq(counts, vec![(2_500, 0, 0), (2_500, 0, 0)])
        }
    );
    for sink in analytics.snapshots() {
        assert_eq!(sink.queue_size, 100);
        assert!(sink.queued_max <= 100, "{sink:?}");
    }
    let silent_sink = analytics
        .snapshots()
        .into_iter()
        .find(|sink| sink.destination == silent_url)
        .expect("the silent collector's sink");
    assert_eq!(
        silent_sink.queued_max, 100,
        "the queue filled up to its bound and no further"
    );
    let page = metrics.encode();
    for path in ["/down", "/silent"] {
        assert_eq!(
            metrics::value(&page, &metrics::denied("analytics", path, "record_dropped")),
            Some(2_500.0),
            "{page}"
        );
    }
}

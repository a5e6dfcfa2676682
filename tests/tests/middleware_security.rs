//! Middlewares that decide whether a request may pass, through the real gateway and real
//! upstreams: `cors`, `auth` (JWT and API keys), `ipfilter` and `validation`.

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http::{Request, Response};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tests::config::{endpoint, gateway, middleware, middlewares, with_middlewares};
use tests::harness::{TestGateway, Upstream, get, get_with, send, text};
use tests::metrics;

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_preflight_actual_and_refused_origins() {
    let upstream = Upstream::named("cors").await;
    let cors = middleware(
        "cors",
        "{allowOrigins: [\"*.example.com\"], allowMethods: [GET, PATCH], allowHeaders: [x-token], exposeHeaders: [x-upstream], maxAge: 1m}",
    );
    let gw = TestGateway::start(&with_middlewares("/cors", &upstream.target(), &cors)).await;

    let preflight = send(
        Request::options(gw.url("/cors"))
            .header("origin", "https://app.example.com")
            .header("access-control-request-method", "PATCH")
            .body(Full::default())
            .expect("request"),
    )
    .await;
    assert_eq!(preflight.status, 204);
    assert_eq!(
        preflight.header("access-control-allow-origin"),
        "https://app.example.com"
    );
    assert_eq!(
        preflight.header("access-control-allow-methods"),
        "GET,PATCH"
    );
    assert_eq!(preflight.header("access-control-allow-headers"), "X-Token");
    assert_eq!(preflight.header("access-control-max-age"), "60");
    assert_eq!(preflight.header("access-control-allow-credentials"), "true");
    assert_eq!(upstream.hits(), 0, "preflight answered by the gateway");

    let actual = get_with(&gw.url("/cors"), &[("origin", "https://app.example.com")]).await;
    assert_eq!((actual.status, actual.body.as_str()), (200, "cors"));
    assert_eq!(
        actual.header("access-control-allow-origin"),
        "https://app.example.com"
    );
    assert_eq!(actual.header("access-control-expose-headers"), "X-Upstream");
    assert!(actual.header_values("vary").contains("Origin"));
    assert_eq!(upstream.hits(), 1);

    let refused = get_with(&gw.url("/cors"), &[("origin", "https://evil.com")]).await;
    assert_eq!(refused.status, 403);
    assert_eq!(
        upstream.hits(),
        1,
        "refused origin never reaches the upstream"
    );

    let plain = get(&gw.url("/cors")).await;
    assert_eq!(plain.status, 200);
    assert!(!plain.headers.contains_key("access-control-allow-origin"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_jwt_and_api_keys() {
    let upstream = Upstream::reporting("ok", &["x-user-id", "authorization", "x-api-key"]).await;
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
        ok.header("x-seen-x-user-id"),
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
    assert_eq!((rsa.status, rsa.header("x-seen-x-user-id")), (200, "bob"));
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
        (by_header.status, by_header.header("x-seen-x-api-key")),
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

    let page = gw.metrics().await;
    let denied = |path: &str| metrics::value(&page, &metrics::denied("auth", path, "unauthorized"));
    assert_eq!(denied("/jwt"), Some(3.0), "{page}");
    assert_eq!(denied("/key"), Some(1.0), "{page}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipfilter_allow_deny_and_forwarded_for() {
    let upstream = Upstream::named("up").await;
    let filtered = |path: &str, options: &str| {
        let ipfilter = middleware("ipfilter", options);
        endpoint(path, &upstream.target(), &middlewares(&ipfilter))
    };
    let gw = TestGateway::start(&gateway(&[
        filtered("/deny-loopback", "{deny: [127.0.0.0/8]}"),
        filtered("/allow-ten", "{allow: [10.0.0.0/8]}"),
        filtered(
            "/allow-self",
            "{allow: [127.0.0.1/32], deny: [192.0.2.0/24]}",
        ),
        filtered("/xff-untrusted", "{allow: [10.0.0.0/8]}"),
        filtered(
            "/xff-trusted",
            "{allow: [10.0.0.0/8], trustedProxies: [127.0.0.1/32]}",
        ),
    ]))
    .await;

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
    let page = gw.metrics().await;
    let denied = metrics::denied("ipfilter", "/deny-loopback", "ip_denied");
    assert_eq!(metrics::value(&page, &denied), Some(1.0), "{page}");
}

/// A client that can send streaming (chunked) bodies.
async fn send_stream(url: &str, chunks: Vec<&'static str>) -> u16 {
    let client = Client::builder(TokioExecutor::new()).build_http();
    let stream = futures_util::stream::iter(chunks)
        .map(|chunk| Ok::<_, Infallible>(Frame::data(Bytes::from(chunk))));
    let request = Request::post(url)
        .header("x-request-id", "1")
        .header("content-type", "application/json")
        .body(StreamBody::new(stream).boxed_unsync())
        .expect("request");
    let response = tokio::time::timeout(Duration::from_secs(5), client.request(request))
        .await
        .expect("answer within 5 s")
        .expect("response");
    response.status().as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validation_allows_and_refuses() {
    let upstream = Upstream::start(|req: Request<Incoming>| async move {
        let body = req
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        Response::new(text(format!("read {}", body.len())))
    })
    .await;
    let validation = middleware(
        "validation",
        "{maxBodyBytes: 16, requiredHeaders: [x-request-id], requiredQuery: [v], allowedContentTypes: [application/json]}",
    );
    let gw = TestGateway::start(&with_middlewares("/valid", &upstream.target(), &validation)).await;
    let post = |query: &str, headers: &[(&str, &str)], body: &'static str| {
        let mut request = Request::post(gw.url(&format!("/valid{query}")));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        send(request.body(Full::new(Bytes::from(body))).expect("request"))
    };
    let json = [("x-request-id", "1"), ("content-type", "application/json")];
    let ok = post("?v=1", &json, "{\"a\":1}").await;
    assert_eq!((ok.status, ok.body.as_str()), (200, "read 7"));

    let missing = post("?v=1", &[("content-type", "application/json")], "{}").await;
    assert_eq!(
        (missing.status, missing.body.as_str()),
        (400, "400 missing header x-request-id\n")
    );
    let no_query = post("", &json, "{}").await;
    assert_eq!(
        (no_query.status, no_query.body.as_str()),
        (400, "400 missing query parameter v\n")
    );
    let xml = post(
        "?v=1",
        &[("x-request-id", "1"), ("content-type", "text/xml")],
        "<a/>",
    )
    .await;
    assert_eq!(xml.status, 415);
    let large = post("?v=1", &json, "{\"a\":\"0123456789abcdef\"}").await;
    assert_eq!(large.status, 413);
    assert_eq!(
        upstream.hits(),
        1,
        "refused requests never reach the upstream"
    );

    // No Content-Length: the limit is enforced while the body streams.
    let url = gw.url("/valid?v=1");
    assert_eq!(
        send_stream(&url, vec!["{\"a\":", "\"0123456789", "abcdef\"}"]).await,
        413
    );
    assert_eq!(send_stream(&url, vec!["{\"a\":", "1}"]).await, 200);
}

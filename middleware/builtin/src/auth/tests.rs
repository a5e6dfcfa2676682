//! Keys under `testdata/` are throwaway keys made for these tests only.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use http::StatusCode;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::{Value, json};
use tower::ServiceExt;

use super::*;
use middleware::denials::LocalDenials;
use middleware::{BoxError, EndpointInfo, RoundTripper, empty_body};

const RSA_PRIVATE: &str = include_str!("testdata/rsa_private.pem");
const RSA_PUBLIC: &str = include_str!("testdata/rsa_public.pem");
const EC_PRIVATE: &str = include_str!("testdata/ec_private.pem");
const EC_PUBLIC: &str = include_str!("testdata/ec_public.pem");

fn testdata(file: &str) -> String {
    format!("{}/src/auth/testdata/{file}", env!("CARGO_MANIFEST_DIR"))
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}

fn claims(extra: Value) -> Value {
    let mut claims = json!({"sub": "alice", "exp": now() + 3600, "realm": {"role": "admin"}, "groups": ["a", "b"]});
    if let (Some(map), Value::Object(extra)) = (claims.as_object_mut(), extra) {
        map.extend(extra);
    }
    claims
}

fn hs256(secret: &str, claims: &Value) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("sign")
}

fn signed(alg: Algorithm, kid: Option<&str>, claims: &Value) -> String {
    let key = match alg {
        Algorithm::RS256 | Algorithm::PS256 => EncodingKey::from_rsa_pem(RSA_PRIVATE.as_bytes()),
        _ => EncodingKey::from_ec_pem(EC_PRIVATE.as_bytes()),
    }
    .expect("test key");
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    encode(&header, claims, &key).expect("sign")
}

fn auth(options: Value) -> Auth {
    try_auth(options).unwrap_or_else(|err| panic!("builds: {err}"))
}

fn try_auth(options: Value) -> Result<Auth, BuildError> {
    let config = configs::Middleware {
        name: NAME.into(),
        options,
        required: true,
    };
    let options: AuthOptions = decode(&config)?;
    let ctx = BuildContext::new(Arc::new(EndpointInfo::default()));
    Auth::new(&options, NAME, &ctx, &clients())
}

fn clients() -> client::Factory {
    client::Factory::new(client::ClientOptions::default(), None)
}

fn request(uri: &str, headers: &[(&str, &str)]) -> Request<Body> {
    let mut builder = Request::get(uri);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder.body(empty_body()).expect("request")
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// Runs the filter; `Ok(request as forwarded)` or `Err((status, WWW-Authenticate values))`
/// for a refusal, which must be an `Unauthenticated` rejection.
fn run(auth: &Auth, mut request: Request<Body>) -> Result<Request<Body>, (u16, Vec<String>)> {
    let response = match auth.check(&mut request) {
        Verdict::Accept => return Ok(request),
        Verdict::Refuse(response) => response,
        Verdict::Introspect(_) => panic!("no oauth configured here"),
    };
    assert_eq!(
        Rejection::of(&response).map(|rejection| rejection.reason),
        Some(Reason::Unauthenticated)
    );
    let challenges = response
        .headers()
        .get_all(WWW_AUTHENTICATE)
        .iter()
        .map(|value| value.to_str().unwrap_or_default().to_owned())
        .collect();
    Err((response.status().as_u16(), challenges))
}

fn header<'a>(request: &'a Request<Body>, name: &str) -> Option<&'a str> {
    request
        .headers()
        .get(name)
        .and_then(|value| value.to_str().ok())
}

#[test]
fn hs256_token_passes_and_claims_are_forwarded() {
    let auth = auth(json!({"jwt": {"secret": "s3cret", "forwardClaims": {
        "sub": "x-user-id", "realm.role": "x-role", "groups": "x-groups", "missing": "x-missing"}}}));
    let token = hs256("s3cret", &claims(json!({})));
    let forwarded = run(
        &auth,
        request(
            "/a",
            &[
                ("authorization", &bearer(&token)),
                ("x-user-id", "mallory"),
                ("x-missing", "forged"),
            ],
        ),
    )
    .expect("accepted");
    assert_eq!(header(&forwarded, "x-user-id"), Some("alice"));
    assert_eq!(header(&forwarded, "x-role"), Some("admin"));
    assert_eq!(header(&forwarded, "x-groups"), Some("a,b"));
    assert_eq!(
        header(&forwarded, "x-missing"),
        None,
        "client-sent claim headers are removed"
    );
    assert!(
        header(&forwarded, "authorization").is_some(),
        "the token is kept by default"
    );
}

#[test]
fn spoofed_claim_headers_are_removed_even_when_refused() {
    let auth = auth(
        json!({"jwt": {"secret": "s3cret", "forwardClaims": {"sub": "x-user-id"}},
                           "apikey": {"keys": ["k1"]}}),
    );
    let forwarded = run(
        &auth,
        request("/a", &[("x-api-key", "k1"), ("x-user-id", "mallory")]),
    )
    .expect("key accepted");
    assert_eq!(header(&forwarded, "x-user-id"), None);
}

#[test]
fn bad_tokens_get_401_with_a_bearer_challenge() {
    let auth = auth(json!({"jwt": {"secret": "s3cret", "leeway": "5s"}}));
    let cases = [
        (
            hs256("s3cret", &claims(json!({"exp": now() - 60}))),
            "token expired",
        ),
        (hs256("other", &claims(json!({}))), "invalid signature"),
        (
            hs256("s3cret", &claims(json!({"nbf": now() + 600}))),
            "token not yet valid",
        ),
        (
            hs256("s3cret", &json!({"sub": "no-exp"})),
            "missing required claim",
        ),
        ("not.a.token".to_owned(), "malformed token"),
    ];
    for (token, description) in cases {
        let (status, challenges) = run(&auth, request("/a", &[("authorization", &bearer(&token))]))
            .expect_err(description);
        assert_eq!(status, 401);
        assert_eq!(
            challenges,
            [format!(
                "Bearer realm=\"gateway\", error=\"invalid_token\", error_description=\"{description}\""
            )]
        );
    }
    // Expired but within the leeway.
    let token = hs256("s3cret", &claims(json!({"exp": now() - 2})));
    assert!(run(&auth, request("/a", &[("authorization", &bearer(&token))])).is_ok());
    // No token: a challenge without an error code (RFC 6750 3.1); other schemes are no token.
    for headers in [&[][..], &[("authorization", "Basic YWxhZGRpbjpvcGVu")][..]] {
        let (status, challenges) = run(&auth, request("/a", headers)).expect_err("no token");
        assert_eq!(
            (status, challenges),
            (401, vec!["Bearer realm=\"gateway\"".to_owned()])
        );
    }
}

#[test]
fn issuer_and_audience_are_checked_when_configured() {
    let auth = auth(
        json!({"jwt": {"secret": "k", "issuer": "https://issuer", "audience": ["api", "web"]}}),
    );
    let good = hs256("k", &claims(json!({"iss": "https://issuer", "aud": "api"})));
    assert!(run(&auth, request("/a", &[("authorization", &bearer(&good))])).is_ok());
    for (token, description) in [
        (
            hs256("k", &claims(json!({"iss": "https://other", "aud": "api"}))),
            "invalid issuer",
        ),
        (
            hs256(
                "k",
                &claims(json!({"iss": "https://issuer", "aud": "other"})),
            ),
            "invalid audience",
        ),
    ] {
        let (_, challenges) = run(&auth, request("/a", &[("authorization", &bearer(&token))]))
            .expect_err(description);
        assert!(challenges[0].contains(description), "{challenges:?}");
    }
}

#[test]
fn public_keys_from_pem_text_files_and_jwks() {
    let rsa_file = auth(
        json!({"jwt": {"publicKeyFile": testdata("rsa_public.pem"), "algorithms": ["RS256"]}}),
    );
    let token = signed(Algorithm::RS256, None, &claims(json!({})));
    assert!(
        run(
            &rsa_file,
            request("/a", &[("authorization", &bearer(&token))])
        )
        .is_ok()
    );
    // PS256 is RSA too, but not in the configured list.
    let pss = signed(Algorithm::PS256, None, &claims(json!({})));
    let (_, challenges) = run(
        &rsa_file,
        request("/a", &[("authorization", &bearer(&pss))]),
    )
    .expect_err("PS256");
    assert!(
        challenges[0].contains("algorithm not accepted"),
        "{challenges:?}"
    );

    let ec_inline = auth(json!({"jwt": {"publicKey": EC_PUBLIC}}));
    let token = signed(Algorithm::ES256, None, &claims(json!({})));
    assert!(
        run(
            &ec_inline,
            request("/a", &[("authorization", &bearer(&token))])
        )
        .is_ok()
    );

    let jwks = auth(json!({"jwt": {"jwksFile": testdata("jwks.json")}}));
    for (alg, kid) in [
        (Algorithm::RS256, "test-rsa"),
        (Algorithm::ES256, "test-ec"),
    ] {
        let token = signed(alg, Some(kid), &claims(json!({})));
        assert!(
            run(&jwks, request("/a", &[("authorization", &bearer(&token))])).is_ok(),
            "{kid}"
        );
    }
    for (kid, description) in [
        (Some("nope"), "unknown key id"),
        (None, "token has no key id"),
    ] {
        let token = signed(Algorithm::RS256, kid, &claims(json!({})));
        let (_, challenges) = run(&jwks, request("/a", &[("authorization", &bearer(&token))]))
            .expect_err(description);
        assert!(challenges[0].contains(description), "{challenges:?}");
    }
    // The EC key's token under the RSA kid fails its signature check.
    let token = signed(Algorithm::ES256, Some("test-rsa"), &claims(json!({})));
    assert!(run(&jwks, request("/a", &[("authorization", &bearer(&token))])).is_err());
}

#[test]
fn algorithm_confusion_is_refused() {
    // HS256 "signed" with the RSA public key as the secret must not pass an RSA verifier.
    let auth = auth(json!({"jwt": {"publicKey": RSA_PUBLIC}}));
    let forged = hs256(RSA_PUBLIC, &claims(json!({})));
    let (_, challenges) =
        run(&auth, request("/a", &[("authorization", &bearer(&forged))])).expect_err("forged");
    assert!(
        challenges[0].contains("algorithm not accepted"),
        "{challenges:?}"
    );
}

#[test]
fn token_from_a_query_parameter_and_a_custom_header() {
    let auth = auth(
        json!({"jwt": {"secret": "k", "header": "x-token", "query": "access_token", "stripCredential": true}}),
    );
    let token = hs256("k", &claims(json!({})));
    let forwarded = run(
        &auth,
        request(&format!("/a?x=1&access_token={token}&y=2"), &[]),
    )
    .expect("query token");
    assert_eq!(forwarded.uri().to_string(), "/a?x=1&y=2", "stripped");
    let forwarded =
        run(&auth, request("/a", &[("x-token", &token)])).expect("raw token in a custom header");
    assert!(header(&forwarded, "x-token").is_none(), "stripped");
}

#[test]
fn api_keys_from_header_query_and_file() {
    let dir = tempfile_dir();
    let file = dir.join("keys.txt");
    std::fs::write(&file, "# team keys\nfile-key-1\n\n  file-key-2  \n").expect("write keys");
    let auth =
        auth(json!({"apikey": {"keys": ["inline-key"], "keysFile": file, "query": "apikey"}}));
    for key in ["inline-key", "file-key-1", "file-key-2"] {
        let forwarded = run(&auth, request("/a", &[("x-api-key", key)])).expect(key);
        assert!(
            header(&forwarded, "x-api-key").is_none(),
            "the key is stripped by default"
        );
    }
    let forwarded = run(&auth, request("/a?apikey=file-key-2&q=1", &[])).expect("query key");
    assert_eq!(forwarded.uri().to_string(), "/a?q=1");
    for headers in [&[("x-api-key", "wrong")][..], &[][..]] {
        let (status, challenges) = run(&auth, request("/a", headers)).expect_err("refused");
        assert_eq!(
            (status, challenges),
            (401, vec!["ApiKey realm=\"gateway\"".to_owned()])
        );
    }
    // The query parameter is off unless configured.
    let header_only = self::auth(json!({"apikey": {"keys": ["k"], "stripCredential": false}}));
    assert!(run(&header_only, request("/a?apikey=k", &[])).is_err());
    let kept = run(&header_only, request("/a", &[("x-api-key", "k")])).expect("accepted");
    assert_eq!(header(&kept, "x-api-key"), Some("k"));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn either_method_lets_a_request_in_when_both_are_configured() {
    let auth = auth(json!({"realm": "api", "jwt": {"secret": "k"}, "apikey": {"keys": ["key"]}}));
    let bad_token = hs256("wrong", &claims(json!({})));
    assert!(
        run(
            &auth,
            request(
                "/a",
                &[("authorization", &bearer(&bad_token)), ("x-api-key", "key")]
            )
        )
        .is_ok()
    );
    let good_token = hs256("k", &claims(json!({})));
    assert!(
        run(
            &auth,
            request("/a", &[("authorization", &bearer(&good_token))])
        )
        .is_ok()
    );
    let (_, challenges) = run(&auth, request("/a", &[])).expect_err("nothing");
    assert_eq!(challenges, ["Bearer realm=\"api\"", "ApiKey realm=\"api\""]);
}

#[tokio::test]
async fn denials_are_counted() {
    let denials = Arc::new(LocalDenials::default());
    let endpoint = Arc::new(EndpointInfo {
        path: "/a".into(),
        ..Default::default()
    });
    let ctx = BuildContext::new(endpoint).with_denials(denials.clone());
    let config = configs::Middleware {
        name: NAME.into(),
        options: json!({"apikey": {"keys": ["k"]}}),
        required: true,
    };
    let tripper = factory(clients())
        .build(&config, &ctx)
        .expect("builds")
        .wrap(RoundTripper::new(tower::service_fn(
            |_request: Request<Body>| async { Ok::<_, BoxError>(Response::new(empty_body())) },
        )));
    let denied = tripper
        .clone()
        .oneshot(request("/a", &[]))
        .await
        .expect("response");
    assert_eq!(denied.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        denied.headers()[WWW_AUTHENTICATE],
        "ApiKey realm=\"gateway\""
    );
    let passed = tripper
        .oneshot(request("/a", &[("x-api-key", "k")]))
        .await
        .expect("response");
    assert_eq!(passed.status(), StatusCode::OK);
    assert_eq!(denials.get(NAME, "/a", "unauthorized"), 1);
}

#[test]
fn bad_options_name_the_field() {
    let cases = [
        (
            json!({}),
            "options.jwt: configure jwt, apikey, oauth or several",
        ),
        (
            json!({"oauth": {"clientId": "gw"}}),
            "options.oauth.introspectionUrl: must be set",
        ),
        (
            json!({"oauth": {"introspectionUrl": "/introspect", "clientId": "gw"}}),
            "options.oauth.introspectionUrl: must be an absolute http(s):// URL",
        ),
        (
            json!({"oauth": {"introspectionUrl": "ftp://x/introspect", "clientId": "gw"}}),
            "options.oauth.introspectionUrl: unsupported scheme \"ftp\"",
        ),
        (
            json!({"oauth": {"introspectionUrl": "http://127.0.0.1:1/i"}}),
            "options.oauth.clientId: must be set",
        ),
        (
            json!({"oauth": {"introspectionUrl": "http://127.0.0.1:1/i", "clientId": "gw", "scopes": ["a", "b c"]}}),
            "options.oauth.scopes[1]: a scope is one non-empty word",
        ),
        (
            json!({"oauth": {"introspectionUrl": "http://127.0.0.1:1/i", "clientId": "gw", "cacheTtl": "soon"}}),
            "options.oauth.cacheTtl",
        ),
        (json!({"jwt": {}}), "options.jwt.secret: set one key source"),
        (
            json!({"jwt": {"secret": "a", "publicKey": RSA_PUBLIC}}),
            "options.jwt.publicKey: set only one key source",
        ),
        (
            json!({"jwt": {"publicKeyFile": "/nonexistent/key.pem"}}),
            "options.jwt.publicKeyFile: cannot read /nonexistent/key.pem",
        ),
        (
            json!({"jwt": {"publicKey": "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"}}),
            "options.jwt.publicKey: not an RSA",
        ),
        (
            json!({"jwt": {"publicKey": "hello"}}),
            "options.jwt.publicKey: not PEM",
        ),
        (
            json!({"jwt": {"publicKey": RSA_PRIVATE}}),
            "options.jwt.publicKey: a private key",
        ),
        (
            json!({"jwt": {"publicKeyFile": testdata("jwks.json")}}),
            "options.jwt.publicKeyFile:",
        ),
        (
            json!({"jwt": {"jwksFile": testdata("rsa_public.pem")}}),
            "options.jwt.jwksFile:",
        ),
        (
            json!({"jwt": {"secret": "k", "algorithms": ["XX1"]}}),
            "options.jwt.algorithms[0]: unknown algorithm",
        ),
        (
            json!({"jwt": {"secret": "k", "algorithms": ["RS256"]}}),
            "options.jwt.algorithms: none of the listed",
        ),
        (
            json!({"jwt": {"secret": "k", "forwardClaims": {"sub": "bad header"}}}),
            "options.jwt.forwardClaims.sub:",
        ),
        (
            json!({"jwt": {"secret": "k", "leeway": 5}}),
            "options.jwt.leeway:",
        ),
        (
            json!({"apikey": {}}),
            "options.apikey.keys: no keys configured",
        ),
        (
            json!({"apikey": {"keysFile": "/nonexistent/keys"}}),
            "options.apikey.keysFile: cannot read",
        ),
        (
            json!({"apikey": {"keys": ["k"], "header": "a b"}}),
            "options.apikey.header:",
        ),
        (
            json!({"apiKey": {"keys": ["k"], "extra": 1}}),
            "unknown field `extra`",
        ),
    ];
    for (options, expected) in cases {
        let err = try_auth(options.clone())
            .err()
            .unwrap_or_else(|| panic!("{options} should fail"));
        let message = err.to_string();
        assert!(message.starts_with("middleware auth: "), "{message}");
        assert!(message.contains(expected), "{options}: {message}");
    }
}

#[test]
fn query_helpers_keep_other_parameters_as_written() {
    let uri: Uri = "/p?a=1&key=x%20y&b=%2F&key=2".parse().expect("uri");
    assert_eq!(query_param(&uri, "key").as_deref(), Some("x y"));
    assert_eq!(
        remove_query_param(&uri, "key")
            .map(|u| u.to_string())
            .as_deref(),
        Some("/p?a=1&b=%2F")
    );
    assert_eq!(remove_query_param(&uri, "zzz"), None);
    let only: Uri = "/p?key=1".parse().expect("uri");
    assert_eq!(
        remove_query_param(&only, "key")
            .map(|u| u.to_string())
            .as_deref(),
        Some("/p")
    );
}

fn tempfile_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("auth-test-{}-{}", std::process::id(), now()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

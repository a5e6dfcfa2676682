//! HTTPS listeners (DESIGN §8): real TLS handshakes against the in-process gateway with
//! certificates generated in the test, SNI, ALPN, rotation of the files, TLS versions and
//! the handshake timeout.

use std::time::{Duration, Instant};

use http::Version;
use rustls::ProtocolVersion;
use tests::assert_eventually;
use tests::config::single;
use tests::eventually::expect_eq;
use tests::harness::{TestGateway, Upstream, get, get_with};
use tests::metrics::sum;
use tests::tls::{CertKey, TestCa, tls11_client_hello, write_atomically};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A gateway proxying `/api/*` to `upstream`, with an HTTPS listener serving `pairs` (in
/// flag order; files `{stem}.crt`/`{stem}.key` in the gateway's directory) plus `extra`
/// flags.
async fn start_https(
    upstream: &Upstream,
    pairs: &[(&str, &CertKey)],
    extra: &[&str],
) -> Result<TestGateway, String> {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut flags: Vec<String> = vec!["--tls-addr".into(), "127.0.0.1:0".into()];
    for (stem, pair) in pairs {
        let (cert, key) = pair.write(dir.path(), stem);
        flags.extend([
            "--tls-cert".into(),
            cert.display().to_string(),
            "--tls-key".into(),
            key.display().to_string(),
        ]);
    }
    flags.extend(extra.iter().map(|flag| (*flag).to_owned()));
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    TestGateway::start_in(dir, &single("/api/*", &upstream.target(), ""), &flags).await
}

fn tls_metric(page: &str, family: &str, label: (&str, &str)) -> f64 {
    sum(page, family, &[label]).unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_is_proxied_and_metrics_and_debug_answer_as_on_plain_listeners() {
    let upstream = Upstream::named("over-tls").await;
    let ca = TestCa::new("test CA");
    let pair = ca.issue(&["a.test"]);
    let gw = start_https(&upstream, &[("a", &pair)], &[])
        .await
        .expect("starts");
    let client = ca.client();

    let connection = client.connect(gw.tls_addr(), "a.test").await.expect("tls");
    assert_eq!(connection.alpn(), "http/1.1");
    let (reply, version) = connection.get("a.test", "/api/hello?x=1", &[]).await;
    assert_eq!((reply.status, reply.body.as_str()), (200, "over-tls"));
    assert_eq!(version, Version::HTTP_11);
    assert_eq!(reply.header("x-seen-path"), "/api/hello?x=1");
    assert_eq!(reply.header("x-seen-x-forwarded-for"), "127.0.0.1");
    assert_eq!(reply.header("x-seen-host"), "a.test");

    let connection = client.connect(gw.tls_addr(), "a.test").await.expect("tls");
    let (metrics, _) = connection.get("a.test", "/metrics", &[]).await;
    assert_eq!(metrics.status, 200);
    assert_eq!(
        sum(
            &metrics.body,
            "go_gateway_requests_code_total",
            &[("path", "/api/*"), ("code", "200")]
        ),
        Some(1.0),
        "the HTTPS request is counted: {}",
        metrics.body
    );

    // The debug views keep their operator-only checks behind TLS.
    let connection = client.connect(gw.tls_addr(), "a.test").await.expect("tls");
    let (ping, _) = connection.get("a.test", "/debug/ping", &[]).await;
    assert_eq!(ping.status, 200);
    let connection = client.connect(gw.tls_addr(), "a.test").await.expect("tls");
    let forwarded = [("x-forwarded-for", "203.0.113.9")];
    let (refused, _) = connection.get("a.test", "/debug/ping", &forwarded).await;
    assert_eq!(refused.status, 403);
    let connection = client.connect(gw.tls_addr(), "a.test").await.expect("tls");
    let (over_tls, _) = connection.get("a.test", "/metrics", &forwarded).await;
    let plain = get_with(&gw.url("/metrics"), &forwarded).await;
    assert_eq!(
        over_tls.status, plain.status,
        "/metrics answers as on plain HTTP"
    );

    // The plain listener is unchanged beside it.
    assert_eq!(get(&gw.url("/api/plain")).await.body, "over-tls");
    assert_eq!(upstream.hits(), 2);

    // Shutdown does not wait for a handshake that is still in progress (10 s timeout).
    let _handshaking = TcpStream::connect(gw.tls_addr()).await.expect("connect");
    let stopping = Instant::now();
    let stopped = tokio::time::timeout(Duration::from_secs(5), gw.stop())
        .await
        .expect("stops within 5 s");
    assert_eq!(stopped, Ok(()));
    assert!(
        stopping.elapsed() < Duration::from_secs(2),
        "{:?}",
        stopping.elapsed()
    );
}

/// An HTTPS keep-alive connection idle long enough for the server to park it (hyper's
/// buffers given back, the TLS session kept) serves its next requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_connection_serves_again_after_idling_past_the_park() {
    let upstream = Upstream::named("over-tls").await;
    let ca = TestCa::new("test CA");
    let pair = ca.issue(&["a.test"]);
    let gw = start_https(&upstream, &[("a", &pair)], &[])
        .await
        .expect("starts");
    let connection = ca
        .client()
        .connect(gw.tls_addr(), "a.test")
        .await
        .expect("tls");
    assert_eq!(connection.alpn(), "http/1.1");
    let mut stream = connection.into_stream();
    for round in 0..3 {
        if round > 0 {
            // Longer than the server's 200 ms park.
            tokio::time::sleep(Duration::from_millis(400)).await;
        }
        stream
            .write_all(b"GET /api/again HTTP/1.1\r\nHost: a.test\r\n\r\n")
            .await
            .unwrap();
        let mut response = Vec::new();
        while !response.ends_with(b"\r\n\r\nover-tls") {
            let mut chunk = [0; 1024];
            let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut chunk))
                .await
                .expect("a response within 5 s")
                .unwrap();
            assert!(n > 0, "closed in round {round}: {response:?}");
            response.extend_from_slice(&chunk[..n]);
        }
        assert!(response.starts_with(b"HTTP/1.1 200"), "round {round}");
    }
    assert_eq!(upstream.hits(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_picks_the_exact_san_then_the_wildcard_else_the_first_pair() {
    let upstream = Upstream::named("sni").await;
    let ca = TestCa::new("test CA");
    let a = ca.issue(&["a.test"]);
    let b = ca.issue(&["*.b.test"]);
    let c = ca.issue(&["c.test", "exact.b.test"]);
    let gw = start_https(&upstream, &[("a", &a), ("b", &b), ("c", &c)], &[])
        .await
        .expect("starts");
    let client = ca.client();

    for (server_name, want, which) in [
        ("a.test", &a, "a.test (exact)"),
        ("x.b.test", &b, "*.b.test (wildcard)"),
        ("Y.B.TEST", &b, "*.b.test (wildcard, any case)"),
        (
            "exact.b.test",
            &c,
            "exact.b.test (exact beats an earlier wildcard)",
        ),
    ] {
        let connection = client
            .connect(gw.tls_addr(), server_name)
            .await
            .unwrap_or_else(|failure| panic!("{server_name}: {failure:?}"));
        assert!(
            connection.peer_leaf() == want.leaf_der,
            "{server_name} should get {which}"
        );
        let (reply, _) = connection.get(server_name, "/api/x", &[]).await;
        assert_eq!(reply.body, "sni");
    }

    // No SAN matches (a wildcard covers one label only), or no SNI at all: the first pair,
    // which the client then rightly refuses for the name it asked for.
    for server_name in ["unknown.test", "b.test", "deep.x.b.test", "127.0.0.1"] {
        let failure = match client.connect(gw.tls_addr(), server_name).await {
            Ok(_) => panic!("{server_name}: the first pair does not cover it"),
            Err(failure) => failure,
        };
        assert!(
            failure.presented_leaf.as_deref() == Some(a.leaf_der.as_slice()),
            "{server_name} should be shown the first pair"
        );
        assert!(
            format!("{:?}", failure.error).contains("NotValidForName"),
            "{server_name}: {:?}",
            failure.error
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alpn_h2_is_negotiated_and_requests_work_over_http2() {
    let upstream = Upstream::named("h2").await;
    let ca = TestCa::new("test CA");
    let pair = ca.issue(&["a.test"]);
    let gw = start_https(&upstream, &[("a", &pair)], &[])
        .await
        .expect("starts");

    let connection = ca
        .client()
        .alpn(&["h2", "http/1.1"])
        .connect(gw.tls_addr(), "a.test")
        .await
        .expect("tls");
    assert_eq!(connection.alpn(), "h2");
    let (reply, version) = connection.get("a.test", "/api/over-h2", &[]).await;
    assert_eq!(version, Version::HTTP_2);
    assert_eq!((reply.status, reply.body.as_str()), (200, "h2"));
    assert_eq!(reply.header("x-seen-path"), "/api/over-h2");

    let connection = ca
        .client()
        .alpn(&["h2"])
        .connect(gw.tls_addr(), "a.test")
        .await
        .expect("tls");
    let (metrics, version) = connection.get("a.test", "/metrics", &[]).await;
    assert_eq!((metrics.status, version), (200, Version::HTTP_2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_files_are_served_without_a_restart_and_a_broken_pair_keeps_the_last_good_one() {
    let upstream = Upstream::named("rotation").await;
    let ca = TestCa::new("test CA");
    let first = ca.issue(&["a.test"]);
    let gw = start_https(&upstream, &[("a", &first)], &[])
        .await
        .expect("starts");
    let client = ca.client();
    let served = || async {
        client
            .connect(gw.tls_addr(), "a.test")
            .await
            .map(|connection| connection.peer_leaf())
            .map_err(|failure| failure.error.to_string())
    };
    assert!(served().await.expect("tls") == first.leaf_der);

    // Replace both files (each atomically): new handshakes get the new certificate.
    let second = ca.issue(&["a.test"]);
    second.write(gw.dir.path(), "a");
    assert_eventually!(
        Duration::from_secs(5),
        "handshakes see the rotated certificate",
        || async { served().await.is_ok_and(|leaf| leaf == second.leaf_der) }
    );
    let page = gw.metrics().await;
    let reloads = "go_gateway_tls_certificate_reloads_total";
    assert_eq!(tls_metric(&page, reloads, ("result", "applied")), 1.0);
    assert_eq!(tls_metric(&page, reloads, ("result", "failed")), 0.0);

    // A broken certificate file, then a key that belongs to another certificate: each is
    // refused (and counted), and the last good pair keeps serving.
    let cert = gw.dir.path().join("a.crt");
    let key = gw.dir.path().join("a.key");
    let third = ca.issue(&["a.test"]);
    let broken: [(&[u8], &[u8]); 2] = [
        (
            b"-----BEGIN CERTIFICATE-----\nnot base64 at all\n",
            third.key_pem.as_bytes(),
        ),
        (third.chain_pem.as_bytes(), second.key_pem.as_bytes()),
    ];
    for (round, (cert_text, key_text)) in broken.into_iter().enumerate() {
        write_atomically(&cert, cert_text);
        write_atomically(&key, key_text);
        let want = (round + 1) as f64;
        assert_eventually!(
            Duration::from_secs(5),
            "the broken pair is counted as a failed reload",
            || async {
                expect_eq(
                    tls_metric(&gw.metrics().await, reloads, ("result", "failed")),
                    want,
                )
            }
        );
        for _ in 0..3 {
            assert!(
                served().await.expect("handshakes keep working") == second.leaf_der,
                "the last good certificate keeps serving"
            );
        }
    }
    let page = gw.metrics().await;
    assert_eq!(tls_metric(&page, reloads, ("result", "applied")), 1.0);

    // Fixing the files is picked up again.
    third.write(gw.dir.path(), "a");
    assert_eventually!(
        Duration::from_secs(5),
        "the repaired pair is served",
        || async { served().await.is_ok_and(|leaf| leaf == third.leaf_der) }
    );
    let connection = client.connect(gw.tls_addr(), "a.test").await.expect("tls");
    let (reply, _) = connection.get("a.test", "/api/after", &[]).await;
    assert_eq!(reply.body, "rotation");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls12_and_tls13_are_served_and_tls11_is_refused() {
    let upstream = Upstream::named("versions").await;
    let ca = TestCa::new("test CA");
    let pair = ca.issue(&["a.test"]);
    let gw = start_https(&upstream, &[("a", &pair)], &[])
        .await
        .expect("starts");

    let connection = ca
        .client()
        .tls12_only()
        .connect(gw.tls_addr(), "a.test")
        .await
        .expect("TLS 1.2");
    assert_eq!(
        connection.protocol_version(),
        Some(ProtocolVersion::TLSv1_2)
    );
    let (reply, _) = connection.get("a.test", "/api/v12", &[]).await;
    assert_eq!((reply.status, reply.body.as_str()), (200, "versions"));

    let connection = ca
        .client()
        .connect(gw.tls_addr(), "a.test")
        .await
        .expect("TLS 1.3");
    assert_eq!(
        connection.protocol_version(),
        Some(ProtocolVersion::TLSv1_3)
    );

    // A TLS 1.1 ClientHello gets an alert record and the connection is closed.
    let mut raw = TcpStream::connect(gw.tls_addr()).await.expect("connect");
    raw.write_all(&tls11_client_hello()).await.expect("send");
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), raw.read_to_end(&mut answer))
        .await
        .expect("the server closes the connection")
        .ok();
    assert_eq!(
        answer.first(),
        Some(&0x15),
        "an alert record: {answer:02x?}"
    );
    assert_eventually!(
        Duration::from_secs(2),
        "the refused handshake is counted",
        || async {
            let page = gw.metrics().await;
            let failures = "go_gateway_tls_handshake_failures_total";
            expect_eq(tls_metric(&page, failures, ("reason", "error")), 1.0)
        }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_that_never_completes_is_closed_after_the_handshake_timeout() {
    let upstream = Upstream::named("slow").await;
    let ca = TestCa::new("test CA");
    let pair = ca.issue(&["a.test"]);
    let gw = start_https(
        &upstream,
        &[("a", &pair)],
        &["--tls-handshake-timeout", "1s"],
    )
    .await
    .expect("starts");
    let connections = |page: String| sum(&page, "go_gateway_connections", &[]).unwrap_or(-1.0);

    // One client sends nothing, another stops in the middle of its ClientHello.
    let silent = TcpStream::connect(gw.tls_addr()).await.expect("connect");
    let mut partial = TcpStream::connect(gw.tls_addr()).await.expect("connect");
    partial
        .write_all(&tls11_client_hello()[..10])
        .await
        .expect("send");
    let opened = Instant::now();
    // Both are open connections (the third is the one reading /metrics).
    assert_eventually!(
        Duration::from_secs(2),
        "the handshaking connections are counted",
        || async { expect_eq(connections(gw.metrics().await), 3.0) }
    );
    for (name, mut stream) in [("silent", silent), ("partial", partial)] {
        let mut buffer = [0u8; 64];
        let closed = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buffer))
            .await
            .unwrap_or_else(|_| panic!("{name}: not closed within 5 s"));
        assert!(
            matches!(closed, Ok(0) | Err(_)),
            "{name}: closed without an answer: {closed:?}"
        );
    }
    let waited = opened.elapsed();
    assert!(
        waited >= Duration::from_millis(800),
        "closed by the timeout, not at once: {waited:?}"
    );
    assert!(waited < Duration::from_secs(5), "{waited:?}");
    let page = gw.metrics().await;
    let failures = "go_gateway_tls_handshake_failures_total";
    assert_eq!(tls_metric(&page, failures, ("reason", "timeout")), 2.0);
    assert_eventually!(
        Duration::from_secs(2),
        "only the /metrics connection is left open",
        || async { expect_eq(connections(gw.metrics().await), 1.0) }
    );

    // The listener still serves complete handshakes.
    let connection = ca
        .client()
        .connect(gw.tls_addr(), "a.test")
        .await
        .expect("tls");
    let (reply, _) = connection.get("a.test", "/api/x", &[]).await;
    assert_eq!(reply.body, "slow");
}

#[tokio::test]
async fn bad_tls_flags_stop_the_start_with_one_line() {
    let upstream = Upstream::named("unused").await;
    let ca = TestCa::new("test CA");
    let a = ca.issue(&["a.test"]);
    let b = ca.issue(&["b.test"]);
    let dir = tempfile::tempdir().expect("tempdir");
    let (a_cert, a_key) = a.write(dir.path(), "a");
    let (b_cert, _) = b.write(dir.path(), "b");
    let (a_cert, a_key, b_cert) = (
        a_cert.display().to_string(),
        a_key.display().to_string(),
        b_cert.display().to_string(),
    );
    let missing = dir.path().join("missing.crt").display().to_string();
    let tls_addr = ["--tls-addr", "127.0.0.1:0"];
    let cases: Vec<(Vec<&str>, String)> = vec![
        (
            tls_addr.to_vec(),
            "--tls-addr needs at least one --tls-cert and --tls-key pair".to_owned(),
        ),
        (
            [
                &tls_addr[..],
                &[
                    "--tls-cert",
                    &a_cert,
                    "--tls-cert",
                    &b_cert,
                    "--tls-key",
                    &a_key,
                ],
            ]
            .concat(),
            "--tls-cert given 2 time(s) but --tls-key 1 time(s): they are paired in order"
                .to_owned(),
        ),
        (
            vec!["--tls-cert", &a_cert, "--tls-key", &a_key],
            "--tls-cert/--tls-key/--tls-client-ca given without --tls-addr".to_owned(),
        ),
        (
            [
                &tls_addr[..],
                &["--tls-cert", &missing, "--tls-key", &a_key],
            ]
            .concat(),
            format!("tls: certificate {missing}: "),
        ),
        (
            [&tls_addr[..], &["--tls-cert", &b_cert, "--tls-key", &a_key]].concat(),
            format!("tls: key {a_key} does not match the certificate in {b_cert}"),
        ),
        (
            [
                &tls_addr[..],
                &[
                    "--tls-cert",
                    &a_cert,
                    "--tls-key",
                    &a_key,
                    "--tls-client-ca",
                    &a_key,
                ],
            ]
            .concat(),
            format!("tls: client CA {a_key}: no certificate found"),
        ),
    ];
    let yaml = single("/api/*", &upstream.target(), "");
    for (flags, want) in cases {
        let error = match TestGateway::start_with(&yaml, &flags).await {
            Ok(_) => panic!("{flags:?} should not start"),
            Err(error) => error,
        };
        assert!(
            error.starts_with(&want),
            "{flags:?}: {error:?}, want {want:?}"
        );
        assert!(!error.contains('\n'), "one line: {error:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_client_ca_only_clients_holding_its_certificates_are_served() {
    let upstream = Upstream::named("mtls").await;
    let server_ca = TestCa::new("server CA");
    let client_ca = TestCa::new("client CA");
    let pair = server_ca.issue(&["a.test"]);
    let dir = tempfile::tempdir().expect("tempdir");
    let client_ca_file = dir.path().join("clients.pem");
    write_atomically(&client_ca_file, client_ca.pem().as_bytes());
    let client_ca_flag = client_ca_file.display().to_string();
    let gw = start_https(
        &upstream,
        &[("a", &pair)],
        &["--tls-client-ca", &client_ca_flag],
    )
    .await
    .expect("starts");

    let alice = client_ca.issue_client("alice");
    let connection = server_ca
        .client()
        .identity(&alice)
        .connect(gw.tls_addr(), "a.test")
        .await
        .expect("tls");
    let (reply, _) = connection.get("a.test", "/api/x", &[]).await;
    assert_eq!((reply.status, reply.body.as_str()), (200, "mtls"));

    // No certificate, or one from another CA: refused (in TLS 1.3 the client learns it on
    // its first read, so the exchange is what fails), and nothing reaches the upstream.
    let stranger = server_ca.issue_client("mallory");
    for (who, client) in [
        ("no certificate", server_ca.client()),
        ("another CA", server_ca.client().identity(&stranger)),
        ("no certificate, TLS 1.2", server_ca.client().tls12_only()),
    ] {
        let outcome = match client.connect(gw.tls_addr(), "a.test").await {
            Ok(connection) => connection.try_get("a.test", "/api/x", &[]).await.err(),
            Err(failure) => Some(failure.error.to_string()),
        };
        assert!(outcome.is_some(), "{who}: should be refused");
    }
    assert_eq!(upstream.hits(), 1);
}

/// A middleware that forwards the verified client subject as `x-client-subject`.
fn whoami(
    _: &configs::Middleware,
    _: &middleware::BuildContext,
) -> Result<middleware::Middleware, middleware::BuildError> {
    use tower::ServiceExt;
    Ok(middleware::Middleware::from_fn("whoami", |next| {
        tower::util::BoxCloneSyncService::new(tower::service_fn(
            move |mut req: http::Request<middleware::Body>| {
                let subject = req
                    .extensions()
                    .get::<middleware::RequestOptions>()
                    .and_then(|options| options.client_certificate.as_ref())
                    .map_or_else(|| "none".to_owned(), |cert| cert.subject.clone());
                req.headers_mut().insert(
                    "x-client-subject",
                    http::HeaderValue::from_str(&subject).expect("printable subject"),
                );
                next.clone().oneshot(req)
            },
        ))
    }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_verified_client_subject_reaches_middlewares() {
    use std::sync::Arc;

    let upstream = Upstream::reporting("subject", &["x-client-subject"]).await;
    let server_ca = TestCa::new("server CA");
    let client_ca = TestCa::new("client CA");
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key) = server_ca.issue(&["a.test"]).write(dir.path(), "a");
    let client_ca_file = dir.path().join("clients.pem");
    write_atomically(&client_ca_file, client_ca.pem().as_bytes());

    let mut registry = middleware::Registry::new();
    registry.register("whoami", whoami);
    let proxy = tests::embedded::proxy_with(registry);
    proxy
        .update(&tests::embedded::parse(&format!(
            "endpoints:\n  - path: /api/*\n    middlewares: [{{name: whoami}}]\n    backends: [{{target: {}}}]\n",
            upstream.target()
        )))
        .expect("config applies");
    let edge = Arc::new(proxy::Edge::new(Arc::new(proxy), None));
    let store =
        proxy::tls::CertStore::load(vec![proxy::tls::CertPair { cert, key }]).expect("pair loads");
    let acceptor = proxy::tls::TlsAcceptor::new(
        &store,
        Some(&client_ca_file),
        Duration::from_secs(5),
        proxy::tls::TlsMetrics::unregistered(),
    )
    .expect("acceptor");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let shutdown = tokio_util::sync::CancellationToken::new();
    let _stop = shutdown.clone().drop_guard();
    tokio::spawn(proxy::server::serve_tls(
        listener,
        proxy::server::ServerOptions::default(),
        acceptor,
        edge,
        shutdown,
    ));

    for (alpn, version) in [("http/1.1", Version::HTTP_11), ("h2", Version::HTTP_2)] {
        let connection = server_ca
            .client()
            .alpn(&[alpn])
            .identity(&client_ca.issue_client("alice"))
            .connect(addr, "a.test")
            .await
            .expect("tls");
        let (reply, seen_version) = connection.get("a.test", "/api/who", &[]).await;
        assert_eq!(seen_version, version);
        assert_eq!(reply.status, 200);
        assert_eq!(reply.header("x-seen-x-client-subject"), "CN=alice");
    }
}

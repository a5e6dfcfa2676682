//! `/metrics` after a known request mix.

use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use tests::assert_eventually;
use tests::eventually::expect_eq;
use tests::harness::{TestGateway, Upstream, get, text};
use tests::metrics::sum;
use tokio::io::AsyncWriteExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_mix_is_counted_by_endpoint_pattern() {
    let upstream = Upstream::start(|req: Request<Incoming>| async move {
        if req.uri().path().ends_with("/missing") {
            return Response::builder().status(404).body(text("nope")).unwrap();
        }
        if req.uri().path().ends_with("/slow") {
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        Response::new(text("hello"))
    })
    .await;
    let yaml = format!(
        "name: m\nendpoints:\n  - path: /api/{{name}}\n    method: GET\n    metadata: {{service: greeter, basePath: /api}}\n    backends:\n      - target: {}\n",
        upstream.target()
    );
    let gw = TestGateway::start(&yaml).await;
    for name in ["a", "b", "c"] {
        assert_eq!(get(&gw.url(&format!("/api/{name}"))).await.status, 200);
    }
    for _ in 0..2 {
        assert_eq!(get(&gw.url("/api/missing")).await.status, 404);
    }
    // A client that gives up: counted as 499 once the gateway notices.
    let mut stream = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    stream
        .write_all(b"GET /api/slow HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(stream);

    let labels = [
        ("path", "/api/{name}"),
        ("method", "GET"),
        ("service", "greeter"),
        ("basePath", "/api"),
        ("protocol", "HTTP"),
    ];
    let code = |page: &str, code: &str| {
        let mut with_code = labels.to_vec();
        with_code.push(("code", code));
        sum(page, "gateway_requests_code_total", &with_code)
    };
    assert_eventually!(
        Duration::from_secs(2),
        "the abandoned request is counted as 499",
        || async { expect_eq(code(&gw.metrics().await, "499"), Some(1.0)) }
    );
    let page = gw.metrics().await;
    assert_eq!(code(&page, "200"), Some(3.0), "{page}");
    assert_eq!(code(&page, "404"), Some(2.0));
    assert_eq!(
        sum(&page, "gateway_requests_duration_seconds_count", &labels),
        Some(6.0)
    );
    assert_eq!(
        sum(&page, "gateway_requests_tx_bytes", &labels),
        Some(3.0 * 5.0 + 2.0 * 4.0)
    );
    assert!(!page.contains("/api/a\""), "raw URLs never become labels");
    assert!(page.contains("gateway_connections"));
    assert_eq!(
        sum(&page, "gateway_requests_in_flight", &[]),
        Some(0.0),
        "the abandoned request left no slot behind"
    );
}

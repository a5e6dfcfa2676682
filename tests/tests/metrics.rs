//! `/metrics` after a known request mix.

use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use tests::assert_eventually;
use tests::eventually::expect_eq;
use tests::harness::{TestGateway, Upstream, get, get_with, send, text};
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
        sum(page, "go_gateway_requests_code_total", &with_code)
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
        sum(&page, "go_gateway_requests_duration_seconds_count", &labels),
        Some(6.0)
    );
    assert_eq!(
        sum(&page, "go_gateway_requests_tx_bytes", &labels),
        Some(3.0 * 5.0 + 2.0 * 4.0)
    );
    assert!(!page.contains("/api/a\""), "raw URLs never become labels");
    assert!(page.contains("go_gateway_connections"));
    assert_eq!(
        sum(&page, "go_gateway_requests_in_flight", &[]),
        Some(0.0),
        "the abandoned request left no slot behind"
    );
}

/// Kratos' labels: `method` is the request's method (an endpoint without `method` counts
/// each separately; extension methods as `OTHER`), and requests no endpoint matched count
/// under `path="/404"` and `path="/405"`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn method_is_the_requests_and_unmatched_requests_count_as_404_and_405() {
    let upstream = Upstream::named("any").await;
    let yaml = format!(
        "name: m\nendpoints:\n  - path: /any/{{x}}\n    backends:\n      - target: {up}\n  - path: /only-get\n    method: GET\n    backends:\n      - target: {up}\n",
        up = upstream.target()
    );
    let gw = TestGateway::start(&yaml).await;
    let call = |method: &'static str, path: &'static str| {
        let url = gw.url(path);
        async move {
            let req = Request::builder()
                .method(method)
                .uri(url)
                .body(http_body_util::Full::default())
                .unwrap();
            send(req).await.status
        }
    };
    for _ in 0..2 {
        assert_eq!(call("POST", "/any/a").await, 200);
    }
    assert_eq!(call("GET", "/any/b").await, 200);
    assert_eq!(call("PURGE", "/any/c").await, 200);
    assert_eq!(call("GET", "/nowhere").await, 404);
    assert_eq!(call("DELETE", "/only-get").await, 405);

    let page = gw.metrics().await;
    let count = |method: &str, path: &str, code: &str| {
        sum(
            &page,
            "go_gateway_requests_code_total",
            &[("method", method), ("path", path), ("code", code)],
        )
    };
    assert_eq!(count("POST", "/any/{x}", "200"), Some(2.0), "{page}");
    assert_eq!(count("GET", "/any/{x}", "200"), Some(1.0));
    assert_eq!(count("OTHER", "/any/{x}", "200"), Some(1.0));
    assert_eq!(count("PURGE", "/any/{x}", "200"), None);
    assert_eq!(count("GET", "/404", "404"), Some(1.0));
    assert_eq!(count("DELETE", "/405", "405"), Some(1.0));
    assert_eq!(
        sum(
            &page,
            "go_gateway_requests_duration_seconds_count",
            &[("method", "POST"), ("path", "/any/{x}")]
        ),
        Some(2.0)
    );
    assert!(
        !page.contains("path=\"/nowhere\""),
        "raw URLs never become labels"
    );
}

/// `/metrics` refuses requests that came through another proxy, on every listener, and
/// `--metrics-addr` serves `/metrics` and nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_refuse_forwarded_requests_and_have_their_own_listener() {
    let upstream = Upstream::named("catch-all").await;
    let yaml = format!(
        "name: m\nendpoints:\n  - path: /*\n    backends:\n      - target: {}\n",
        upstream.target()
    );
    let gw = TestGateway::start_with(&yaml, &["--metrics-addr", "127.0.0.1:0"])
        .await
        .unwrap();
    let metrics_addr = gw.metrics_addr.expect("--metrics-addr is listening");
    for url in [gw.url("/metrics"), format!("http://{metrics_addr}/metrics")] {
        let plain = get(&url).await;
        assert_eq!(plain.status, 200, "{url}");
        assert!(plain.body.contains("go_gateway_connections"), "{url}");
        for header in [
            ("x-forwarded-for", "203.0.113.7"),
            ("forwarded", "for=203.0.113.7"),
        ] {
            let forwarded = get_with(&url, &[header]).await;
            assert_eq!(forwarded.status, 403, "{url} with {header:?}");
            assert!(
                !forwarded.body.contains("go_gateway"),
                "{url} leaks metrics"
            );
        }
    }
    // The metrics listener proxies nothing: the catch-all is not reachable through it.
    let other = get(&format!("http://{metrics_addr}/anything")).await;
    assert_eq!(other.status, 404);
    assert_ne!(other.body, "catch-all");
    assert_eq!(get(&gw.url("/anything")).await.body, "catch-all");
}

/// Every metric the shipped Grafana dashboard (deploy/grafana/gateway.json) queries exists
/// on `/metrics` once the gateway has served a request mix that touches each family.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_of_the_grafana_dashboard_exists() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/grafana/gateway.json"
    );
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            queries.push(target["expr"].as_str().unwrap().to_owned());
        }
    }
    for variable in dashboard["templating"]["list"].as_array().unwrap() {
        queries.push(variable["query"].as_str().unwrap().to_owned());
    }
    let mut names: Vec<String> = queries
        .iter()
        .flat_map(|query| {
            query
                .match_indices("go_gateway_")
                .map(|(at, _)| {
                    query[at..]
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .collect::<String>()
                })
                .collect::<Vec<_>>()
        })
        .collect();
    names.sort();
    names.dedup();
    assert!(names.len() >= 8, "the dashboard queries {names:?}");

    let good = Upstream::named("good").await;
    let failing = Upstream::start(|_req: Request<Incoming>| async move {
        Response::builder().status(503).body(text("down")).unwrap()
    })
    .await;
    let yaml = format!(
        "name: m\nendpoints:\n  - path: /retry\n    selector: wrr\n    retry:\n      attempts: 2\n      conditions:\n        - byStatusCode: \"503\"\n    backends:\n      - target: {failing}\n      - target: {good}\n  - path: /denied\n    middlewares:\n      - name: ipfilter\n        options: {{deny: [127.0.0.0/8]}}\n    backends:\n      - target: {good}\n",
        failing = failing.target(),
        good = good.target()
    );
    let gw = TestGateway::start(&yaml).await;
    for _ in 0..4 {
        let req = Request::post(gw.url("/retry"))
            .body(http_body_util::Full::from("payload"))
            .unwrap();
        assert_eq!(send(req).await.status, 200);
    }
    assert_eq!(get(&gw.url("/denied")).await.status, 403);
    assert_eq!(get(&gw.url("/nowhere")).await.status, 404);
    let page = gw.metrics().await;
    let exported: Vec<&str> = page
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|line| line.split(' ').next())
        .collect();
    for name in &names {
        let family = ["_bucket", "_count", "_sum"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix))
            .unwrap_or(name);
        assert!(
            exported.contains(&family),
            "the dashboard queries {name}, which /metrics does not export:\n{page}"
        );
    }
}

use std::time::Duration;

use futures_util::stream;
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use middleware::denials::LocalDenials;
use middleware::{RoundTripper, full_body};
use serde_json::{Value, json};
use tower::ServiceExt;

use super::*;

fn entry(options: Value) -> configs::Middleware {
    configs::Middleware {
        name: NAME.into(),
        options,
        required: true,
    }
}

fn factory() -> AnalyticsFactory {
    AnalyticsFactory::new(client::Factory::new(client::ClientOptions::default(), None))
}

fn context(denials: Arc<LocalDenials>) -> BuildContext {
    let endpoint = Arc::new(EndpointInfo {
        path: "/api/*".into(),
        ..Default::default()
    });
    BuildContext::new(endpoint).with_denials(denials)
}

fn scratch_file(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("gateway-analytics-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    let path = dir.join("records.jsonl");
    let _ = std::fs::remove_file(&path);
    path
}

/// Reads the whole request body, then answers with three streamed chunks of 10 bytes
/// (no length known in advance).
fn streaming_upstream() -> RoundTripper {
    RoundTripper::new(tower::service_fn(|request: Request<Body>| async move {
        let _ = request.into_body().collect().await?;
        let chunks = stream::iter(
            (0..3).map(|_| Ok::<_, BoxError>(Frame::data(Bytes::from_static(b"0123456789")))),
        );
        Ok::<_, BoxError>(Response::new(StreamBody::new(chunks).boxed_unsync()))
    }))
}

fn streamed_request(path: &str) -> Request<Body> {
    let chunks = stream::iter(
        ["abc", "de"]
            .map(|chunk| Ok::<_, BoxError>(Frame::data(Bytes::from_static(chunk.as_bytes())))),
    );
    let mut request = Request::post(path)
        .body(StreamBody::new(chunks).boxed_unsync())
        .expect("request");
    let endpoint = Arc::new(EndpointInfo {
        path: "/api/*".into(),
        ..Default::default()
    });
    let options = RequestOptions::new(endpoint, Some("192.0.2.7:5000".parse().expect("addr")));
    request.extensions_mut().insert(options);
    request
}

#[tokio::test]
async fn bad_options_name_the_field() {
    let factory = factory();
    let ctx = context(Arc::default());
    let cases = [
        (json!({}), "options.url: set url or file"),
        (
            json!({"url": "http://127.0.0.1:1/c", "file": "/tmp/x"}),
            "options.file: set url or file, not both",
        ),
        (
            json!({"file": "/tmp/x", "batchSize": 0}),
            "options.batchSize: must be at least 1",
        ),
        (
            json!({"file": "/tmp/x", "queueSize": 0}),
            "options.queueSize: must be at least 1",
        ),
        (
            json!({"file": "/tmp/x", "flushInterval": "0s"}),
            "options.flushInterval: must be positive",
        ),
        (
            json!({"file": "/tmp/x", "flushInterval": "soon"}),
            "options.flushInterval",
        ),
        (
            json!({"url": "/collect"}),
            "options.url: must be an absolute http(s):// URL",
        ),
        (
            json!({"url": "ftp://x/c"}),
            "options.url: unsupported scheme \"ftp\"",
        ),
        (
            json!({"file": "/tmp/x", "batch": 1}),
            "unknown field `batch`",
        ),
    ];
    for (options, expected) in cases {
        let err = factory
            .build(&entry(options.clone()), &ctx)
            .err()
            .unwrap_or_else(|| panic!("{options} should fail"));
        let message = err.to_string();
        assert!(message.starts_with("middleware analytics: "), "{message}");
        assert!(message.contains(expected), "{options}: {message}");
    }
}

/// On a current-thread runtime the shipping task cannot run while the test does not
/// yield, so the queue's bound is what decides: 2 fit, 3 are dropped and counted.
#[tokio::test]
async fn a_full_queue_drops_and_counts_streamed_bytes_are_counted() {
    let path = scratch_file("queue");
    let denials = Arc::new(LocalDenials::default());
    let factory = factory();
    let options =
        json!({"file": path.to_str().expect("utf-8"), "queueSize": 2, "flushInterval": "20ms"});
    let tripper = factory
        .build(&entry(options), &context(denials.clone()))
        .expect("builds")
        .wrap(streaming_upstream());
    for index in 0..5 {
        let response = tripper
            .clone()
            .oneshot(streamed_request(&format!("/api/{index}?token=secret")))
            .await
            .expect("response");
        let body = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        assert_eq!(body.len(), 30);
    }
    let snapshot = factory.snapshots().pop().expect("one sink");
    assert_eq!(snapshot.queue_size, 2);
    assert_eq!(snapshot.queued_max, 2);
    assert_eq!(snapshot.dropped, 3);
    assert_eq!(denials.get(NAME, "/api/*", "record_dropped"), 3);

    // Now the task runs: the two queued records are appended to the file.
    for _ in 0..500 {
        if factory.snapshots().pop().is_some_and(|s| s.shipped == 2) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let text = std::fs::read_to_string(&path).expect("records file");
    let records: Vec<Value> = text
        .lines()
        .map(|line| serde_json::from_str(line).expect("a JSON line"))
        .collect();
    assert_eq!(records.len(), 2, "{text}");
    for (index, record) in records.iter().enumerate() {
        assert_eq!(record["endpoint"], "/api/*");
        assert_eq!(record["method"], "POST");
        assert_eq!(record["path"], format!("/api/{index}"), "no query");
        assert_eq!(record["status"], 200);
        assert_eq!(record["rx_bytes"], 5, "streamed request body");
        assert_eq!(record["tx_bytes"], 30, "streamed response body");
        assert_eq!(record["client"], "192.0.2.7");
        assert_eq!(record["node"], Value::Null, "no node picked here");
        assert!(record["latency_ms"].as_f64().is_some_and(|ms| ms >= 0.0));
        assert!(record["time"].as_str().is_some_and(|t| t.ends_with('Z')));
    }
    if let Some(dir) = path.parent() {
        let _ = std::fs::remove_dir_all(dir);
    }
}

#[tokio::test]
async fn equal_options_share_one_sink_and_it_ends_with_its_middlewares() {
    let path = scratch_file("share");
    let factory = factory();
    let options = json!({"file": path.to_str().expect("utf-8")});
    let ctx = context(Arc::default());
    let first = factory
        .build(&entry(options.clone()), &ctx)
        .expect("builds");
    let second = factory.build(&entry(options), &ctx).expect("builds");
    assert_eq!(factory.snapshots().len(), 1);
    let other = factory
        .build(
            &entry(json!({"file": path.to_str().expect("utf-8"), "batchSize": 7})),
            &ctx,
        )
        .expect("builds");
    assert_eq!(factory.snapshots().len(), 2);
    drop((first, second, other));
    assert!(factory.snapshots().is_empty());
    let tripper = factory
        .build(&entry(json!({"file": path.to_str().expect("utf-8")})), &ctx)
        .expect("builds")
        .wrap(RoundTripper::new(tower::service_fn(
            |_request: Request<Body>| async { Ok::<_, BoxError>(Response::new(full_body("ok"))) },
        )));
    let response = tripper
        .clone()
        .oneshot(
            Request::get("/api/x")
                .body(middleware::empty_body())
                .expect("request"),
        )
        .await
        .expect("response");
    assert_eq!(factory.snapshots().pop().map(|s| s.queued), Some(0));
    drop(response);
    assert_eq!(
        factory.snapshots().pop().map(|s| s.queued),
        Some(1),
        "recorded when the response body goes"
    );
    drop(tripper);
    if let Some(dir) = path.parent() {
        let _ = std::fs::remove_dir_all(dir);
    }
}

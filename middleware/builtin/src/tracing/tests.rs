use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response};
use middleware::{BuildContext, EndpointInfo, RequestOptions, RoundTripper, empty_body};
use tower::{Service, ServiceExt};

use super::*;

fn entry(options: serde_json::Value) -> configs::Middleware {
    configs::Middleware {
        name: "tracing".into(),
        options,
        required: false,
    }
}

fn url_of(options: serde_json::Value) -> Result<String, String> {
    let options: TracingOptions = decode(&entry(options)).map_err(|err| err.to_string())?;
    options
        .collector_url("tracing")
        .map_err(|err| err.to_string())
}

#[test]
fn collector_urls_follow_kratos_options() {
    use serde_json::json;
    assert_eq!(url_of(json!(null)), Ok(DEFAULT_ENDPOINT_URL.to_owned()));
    assert_eq!(
        url_of(
            json!({"@type": "type.googleapis.com/gateway.middleware.tracing.v1.Tracing", "httpEndpoint": "otel:4318"})
        ),
        Ok("http://otel:4318/v1/traces".to_owned())
    );
    assert_eq!(
        url_of(json!({"httpEndpoint": "otel:4318", "insecure": false})),
        Ok("https://otel:4318/v1/traces".to_owned())
    );
    assert_eq!(
        url_of(json!({"http_endpoint_url": "https://otel.example.com/api/v1/traces"})),
        Ok("https://otel.example.com/api/v1/traces".to_owned())
    );
    assert_eq!(
        url_of(json!({"httpEndpointUrl": "https://otel:4318/v1/traces", "insecure": true})),
        Ok("http://otel:4318/v1/traces".to_owned())
    );
    let err = url_of(json!({"httpEndpoint": "otel"})).expect_err("no port");
    assert!(err.contains("options.httpEndpoint"), "{err}");
    let err = url_of(json!({"httpEndpointUrl": "otel:4318"})).expect_err("no scheme");
    assert!(err.contains("options.httpEndpointUrl"), "{err}");
    let err = url_of(json!({"sampleRatio": "x"})).expect_err("not a number");
    assert!(err.contains("options.sampleRatio"), "{err}");
}

fn build(options: serde_json::Value) -> Result<Middleware, BuildError> {
    let endpoint = Arc::new(EndpointInfo {
        path: "/api/*".into(),
        ..EndpointInfo::default()
    });
    factory(&entry(options), &BuildContext::new(endpoint))
}

#[test]
fn sample_ratio_outside_zero_to_one_is_refused() {
    for ratio in [-0.1, 1.5] {
        let err = build(serde_json::json!({"sampleRatio": ratio}))
            .err()
            .expect("refused");
        assert!(err.to_string().contains("options.sampleRatio"), "{err}");
    }
}

/// The next hop: records the `traceparent` it was sent, answers `status`.
fn recording(seen: Arc<Mutex<Vec<String>>>, status: u16) -> RoundTripper {
    tower::util::BoxCloneSyncService::new(tower::service_fn(move |req: Request<Body>| {
        let header = req.headers().get("traceparent");
        let header = header.and_then(|v| v.to_str().ok()).unwrap_or("-");
        seen.lock().expect("lock").push(header.to_owned());
        async move {
            Ok::<_, BoxError>(
                Response::builder()
                    .status(status)
                    .body(empty_body())
                    .expect("response"),
            )
        }
    }))
}

fn parts(traceparent: &str) -> Vec<String> {
    traceparent.split('-').map(str::to_owned).collect()
}

#[tokio::test]
async fn attempts_of_one_request_share_its_trace_and_finish_ends_it() {
    // Nothing listens on port 9: the spans are dropped, propagation is what is checked.
    let middleware =
        build(serde_json::json!({"httpEndpoint": "127.0.0.1:9", "timeout": "1s"})).expect("builds");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let mut chain = middleware.wrap(recording(seen.clone(), 200));
    let mut options = RequestOptions::new(Arc::new(EndpointInfo::default()), None);
    let incoming = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    for attempt in 1..=2 {
        options.attempt = attempt;
        let mut request = Request::new(empty_body());
        request
            .headers_mut()
            .insert("traceparent", incoming.parse().expect("value"));
        request.extensions_mut().insert(options.clone());
        let response = chain.ready().await.expect("ready").call(request).await;
        assert_eq!(response.expect("response").status(), 200);
    }
    options.scope.finish(200);
    let seen = seen.lock().expect("lock").clone();
    let (first, second) = (parts(&seen[0]), parts(&seen[1]));
    assert_eq!(first[1], "0af7651916cd43dd8448eb211c80319c");
    assert_eq!(second[1], first[1]);
    assert_ne!(first[2], second[2], "a span per attempt");
    assert_ne!(first[2], "b7ad6b7169203331");
    assert_eq!((first[3].as_str(), second[3].as_str()), ("01", "01"));
}

#[tokio::test]
async fn an_unsampled_chain_still_propagates() {
    let middleware = build(serde_json::json!({"httpEndpoint": "127.0.0.1:9", "sampleRatio": 0}))
        .expect("builds");
    let seen = Arc::new(Mutex::new(Vec::new()));
    // Without the proxy's options the call is the whole request.
    let chain = middleware.wrap(recording(seen.clone(), 503));
    let response = chain.oneshot(Request::new(empty_body())).await;
    assert_eq!(response.expect("response").status(), 503);
    let seen = parts(&seen.lock().expect("lock")[0]);
    assert_eq!(seen.len(), 4);
    assert_eq!(seen[3], "00", "not sampled, still propagated");
    assert_ne!(seen[1], "0".repeat(32));
}

#[test]
fn endpoints_naming_one_collector_share_it() {
    let first =
        collector::Collector::shared("http://127.0.0.1:9/v1/traces", Duration::from_secs(1))
            .expect("starts");
    let again =
        collector::Collector::shared("http://127.0.0.1:9/v1/traces", Duration::from_secs(1))
            .expect("shared");
    let other =
        collector::Collector::shared("http://127.0.0.1:10/v1/traces", Duration::from_secs(1))
            .expect("starts");
    assert!(Arc::ptr_eq(&first, &again));
    assert!(!Arc::ptr_eq(&first, &other));
}

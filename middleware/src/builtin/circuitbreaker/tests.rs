use std::sync::Arc;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::time::Duration;

use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use serde_json::json;
use tower::ServiceExt;
use tower::util::BoxCloneSyncService;

use super::*;
use crate::metrics::Metrics;
use crate::{EndpointInfo, RoundTripper, empty_body};

struct Upstream {
    status: Arc<AtomicU16>,
    hits: Arc<AtomicUsize>,
    delay: Duration,
}

impl Upstream {
    fn new(status: u16) -> Self {
        Self {
            status: Arc::new(AtomicU16::new(status)),
            hits: Arc::new(AtomicUsize::new(0)),
            delay: Duration::ZERO,
        }
    }

    fn tripper(&self) -> RoundTripper {
        let (status, hits, delay) = (self.status.clone(), self.hits.clone(), self.delay);
        BoxCloneSyncService::new(tower::service_fn(move |_request: Request<Body>| {
            let (status, hits) = (status.clone(), hits.clone());
            async move {
                hits.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(delay).await;
                let mut response = Response::new(full_body("upstream"));
                *response.status_mut() = StatusCode::from_u16(status.load(Ordering::SeqCst))?;
                Ok::<_, BoxError>(response)
            }
        }))
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

fn context() -> BuildContext {
    BuildContext {
        endpoint: Arc::new(EndpointInfo {
            path: "/cb".into(),
            ..Default::default()
        }),
        metrics: Arc::new(Metrics::new()),
    }
}

fn entry(options: serde_json::Value) -> configs::Middleware {
    configs::Middleware {
        name: NAME.into(),
        options,
        required: true,
    }
}

fn build(options: serde_json::Value, ctx: &BuildContext) -> Result<Middleware, BuildError> {
    factory(&entry(options), ctx)
}

async fn call(tripper: &RoundTripper) -> (u16, String, http::HeaderMap) {
    let request = Request::get("/cb").body(empty_body()).expect("request");
    match tripper.clone().oneshot(request).await {
        Ok(response) => {
            let (parts, body) = response.into_parts();
            let body = body.collect().await.expect("body").to_bytes();
            (
                parts.status.as_u16(),
                String::from_utf8_lossy(&body).into_owned(),
                parts.headers,
            )
        }
        Err(err) => (0, err.to_string(), http::HeaderMap::new()),
    }
}

fn denied(ctx: &BuildContext) -> u64 {
    ctx.metrics
        .middleware_denied
        .with_label_values(&[NAME, "/cb", "breaker_open"])
        .get()
}

#[tokio::test(start_paused = true)]
async fn error_threshold_opens_answers_from_response_data_and_recovers() {
    let ctx = context();
    let upstream = Upstream::new(500);
    let breaker = build(
        json!({
            "errorThreshold": {"errorThresholdPercentage": 50, "request": 4, "resetTimeout": "300ms"},
            "responseData": {"statusCode": 429, "header": [{"key": "x-breaker", "value": ["open"]}], "bodyText": "try later"}
        }),
        &ctx,
    )
    .expect("builds");
    let tripper = breaker.wrap(upstream.tripper());
    for _ in 0..4 {
        assert_eq!(call(&tripper).await.0, 500);
    }
    for _ in 0..5 {
        let (status, body, headers) = call(&tripper).await;
        assert_eq!((status, body.as_str()), (429, "try later"));
        assert_eq!(
            headers.get("x-breaker").map(|v| v.as_bytes()),
            Some(&b"open"[..])
        );
    }
    assert_eq!(
        upstream.hits(),
        4,
        "an open breaker does not reach the upstream"
    );
    assert_eq!(denied(&ctx), 5);

    upstream.status.store(200, Ordering::SeqCst);
    tokio::time::advance(Duration::from_millis(300)).await;
    assert_eq!(call(&tripper).await.0, 200, "the probe goes through");
    for _ in 0..3 {
        assert_eq!(call(&tripper).await.0, 200);
    }
    assert_eq!(upstream.hits(), 8);
}

#[tokio::test(start_paused = true)]
async fn failed_probe_reopens_and_default_action_is_503() {
    let ctx = context();
    let upstream = Upstream::new(502);
    let breaker = build(
        json!({"errorThreshold": {"request": 2, "resetTimeout": "1s"}}),
        &ctx,
    )
    .expect("builds");
    let tripper = breaker.wrap(upstream.tripper());
    call(&tripper).await;
    call(&tripper).await;
    let (status, body, _) = call(&tripper).await;
    assert_eq!(status, 503);
    assert!(body.contains("circuit breaker"), "{body}");
    tokio::time::advance(Duration::from_secs(1)).await;
    assert_eq!(
        call(&tripper).await.0,
        502,
        "the probe reaches the failing upstream"
    );
    assert_eq!(call(&tripper).await.0, 503, "and the breaker is open again");
    assert_eq!(upstream.hits(), 3);
}

#[tokio::test(start_paused = true)]
async fn assert_conditions_decide_what_succeeds() {
    let ctx = context();
    let upstream = Upstream::new(404);
    // Kratos' spelling and snake_case condition names.
    let breaker = build(
        json!({"errorThreshold": {"request": 3}, "assertCondtions": [{"by_status_code": "200-299"}]}),
        &ctx,
    )
    .expect("builds");
    let tripper = breaker.wrap(upstream.tripper());
    for _ in 0..3 {
        assert_eq!(call(&tripper).await.0, 404);
    }
    assert_eq!(
        call(&tripper).await.0,
        503,
        "404s are failures under these conditions"
    );
}

#[tokio::test(start_paused = true)]
async fn attempt_timeout_cuts_slow_attempts_and_counts_them() {
    let ctx = context();
    let mut upstream = Upstream::new(200);
    upstream.delay = Duration::from_secs(2);
    let breaker = build(
        json!({"errorThreshold": {"request": 2, "timeout": "100ms"}}),
        &ctx,
    )
    .expect("builds");
    let tripper = breaker.wrap(upstream.tripper());
    let (status, error, _) = call(&tripper).await;
    assert_eq!(status, 0);
    assert!(error.contains("deadline"), "{error}");
    call(&tripper).await;
    assert_eq!(call(&tripper).await.0, 503);
}

#[tokio::test(start_paused = true)]
async fn success_ratio_throttles_a_failing_upstream() {
    let ctx = context();
    let upstream = Upstream::new(500);
    // Kratos' example shape: numbers as strings.
    let breaker = build(
        json!({"@type": "type.googleapis.com/gateway.middleware.circuitbreaker.v1.CircuitBreaker",
               "successRatio": {"success": 0.6, "request": "10", "bucket": "10", "window": "3s"}}),
        &ctx,
    )
    .expect("builds");
    let tripper = breaker.wrap(upstream.tripper());
    let mut rejected = 0;
    for _ in 0..200 {
        if call(&tripper).await.0 == 503 {
            rejected += 1;
        }
    }
    // The first 10 pass; after that each passes with probability 1 / (total + 1).
    assert!(
        upstream.hits() >= 10 && upstream.hits() < 40,
        "hits {}",
        upstream.hits()
    );
    assert_eq!(rejected + upstream.hits(), 200);
    assert_eq!(denied(&ctx), rejected as u64);

    // Once the window has passed, requests flow again.
    upstream.status.store(200, Ordering::SeqCst);
    tokio::time::advance(Duration::from_secs(4)).await;
    for _ in 0..20 {
        assert_eq!(call(&tripper).await.0, 200);
    }
}

#[tokio::test(start_paused = true)]
async fn ratio_zero_sends_everything_to_the_open_action() {
    let ctx = context();
    let upstream = Upstream::new(200);
    // protojson bytes: base64 of "busy".
    let breaker = build(
        json!({"ratio": "0", "responseData": {"statusCode": 503, "body": "YnVzeQ=="}}),
        &ctx,
    )
    .expect("builds");
    let tripper = breaker.wrap(upstream.tripper());
    assert_eq!(call(&tripper).await.1, "busy");
    assert_eq!(upstream.hits(), 0);
}

#[tokio::test]
async fn bad_options_name_the_field() {
    let ctx = context();
    let cases = [
        (
            json!({"ratio": 1, "successRatio": {}}),
            "options.successRatio: set only one",
        ),
        (json!({"ratio": 10001}), "options.ratio:"),
        (
            json!({"successRatio": {"success": 1.5}}),
            "options.successRatio.success:",
        ),
        (
            json!({"errorThreshold": {"errorThresholdPercentage": 0}}),
            "options.errorThreshold.errorThresholdPercentage:",
        ),
        (
            json!({"errorThreshold": {"resetTimeout": "0s"}}),
            "options.errorThreshold.resetTimeout:",
        ),
        (
            json!({"errorThreshold": {"bucket": 0}}),
            "options.errorThreshold.bucket:",
        ),
        (
            json!({"errorThreshold": {"window": "later"}}),
            "options.errorThreshold.window:",
        ),
        (
            json!({"responseData": {"statusCode": 700}}),
            "options.responseData.statusCode:",
        ),
        (
            json!({"responseData": {"body": "not base64!"}}),
            "options.responseData.body:",
        ),
        (
            json!({"responseData": {"header": [{"key": "bad key", "value": "x"}]}}),
            "options.responseData.header[0].key:",
        ),
        (
            json!({"backupService": {"endpoint": {"backends": [{"target": "127.0.0.1:1"}, {"target": "discovery:///x"}]}}}),
            "options.backupService.endpoint.backends[1]:",
        ),
        (
            json!({"backupService": {"endpoint": {}}}),
            "options.backupService.endpoint.backends[0]: no backends",
        ),
        (
            json!({"assertConditions": [{}]}),
            "options.assertConditions[0]:",
        ),
        (json!({"trigger": 1}), "unknown field `trigger`"),
    ];
    for (options, expected) in cases {
        let err = build(options.clone(), &ctx)
            .err()
            .unwrap_or_else(|| panic!("{options} should fail"));
        let message = err.to_string();
        assert!(
            message.starts_with("middleware circuitbreaker: "),
            "{message}"
        );
        assert!(message.contains(expected), "{options}: {message}");
    }
    // No options at all: the SRE trigger with its defaults and a 503 when open.
    assert!(build(serde_json::Value::Null, &ctx).is_ok());
}

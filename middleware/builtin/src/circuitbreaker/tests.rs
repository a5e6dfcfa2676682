use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::TcpListener;
use tower::ServiceExt;
use tower::util::BoxCloneSyncService;

use super::*;
use middleware::denials::LocalDenials;
use middleware::{EndpointInfo, RequestOptions, RoundTripper, empty_body, full_body};

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

/// A context for endpoint `/cb` and where it counts denials.
fn context() -> (BuildContext, Arc<LocalDenials>) {
    let endpoint = Arc::new(EndpointInfo {
        path: "/cb".into(),
        ..Default::default()
    });
    let denials = Arc::new(LocalDenials::default());
    let ctx = BuildContext::new(endpoint).with_denials(denials.clone());
    (ctx, denials)
}

fn clients() -> client::Factory {
    client::Factory::new(client::ClientOptions::default(), None)
}

fn entry(options: serde_json::Value) -> configs::Middleware {
    configs::Middleware {
        name: NAME.into(),
        options,
        required: true,
    }
}

fn build(options: serde_json::Value, ctx: &BuildContext) -> Result<Middleware, BuildError> {
    factory(clients()).build(&entry(options), ctx)
}

/// One answer as the client of the breaker sees it; an error has status 0 and its text.
struct Reply {
    status: u16,
    /// The body, or for a rejection its `message`, or the configured body.
    text: String,
    headers: http::HeaderMap,
    rejected: bool,
}

async fn call(tripper: &RoundTripper) -> Reply {
    let request = Request::get("/cb").body(empty_body()).expect("request");
    let response = match tripper.clone().oneshot(request).await {
        Ok(response) => response,
        Err(err) => {
            return Reply {
                status: 0,
                text: err.to_string(),
                headers: http::HeaderMap::new(),
                rejected: false,
            };
        }
    };
    let rejection = Rejection::of(&response).cloned();
    if let Some(rejection) = &rejection {
        assert_eq!(rejection.reason, Reason::BreakerOpen);
    }
    let (parts, body) = response.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    let text = match rejection.as_ref() {
        Some(rejection) => {
            assert!(
                body.is_empty(),
                "a rejection's body is rendered by the proxy"
            );
            match &rejection.body {
                Some(configured) => String::from_utf8_lossy(configured).into_owned(),
                None => rejection.message.clone().into_owned(),
            }
        }
        None => String::from_utf8_lossy(&body).into_owned(),
    };
    Reply {
        status: parts.status.as_u16(),
        text,
        headers: parts.headers,
        rejected: rejection.is_some(),
    }
}

fn denied(denials: &LocalDenials) -> u64 {
    denials.get(NAME, "/cb", "breaker_open")
}

#[tokio::test(start_paused = true)]
async fn error_threshold_opens_answers_from_response_data_and_recovers() {
    let (ctx, denials) = context();
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
        assert_eq!(call(&tripper).await.status, 500);
    }
    for _ in 0..5 {
        let reply = call(&tripper).await;
        assert!(reply.rejected);
        assert_eq!((reply.status, reply.text.as_str()), (429, "try later"));
        assert_eq!(
            reply.headers.get("x-breaker").map(|v| v.as_bytes()),
            Some(&b"open"[..])
        );
    }
    assert_eq!(
        upstream.hits(),
        4,
        "an open breaker does not reach the upstream"
    );
    assert_eq!(denied(&denials), 5);

    upstream.status.store(200, Ordering::SeqCst);
    tokio::time::advance(Duration::from_millis(300)).await;
    assert_eq!(call(&tripper).await.status, 200, "the probe goes through");
    for _ in 0..3 {
        assert_eq!(call(&tripper).await.status, 200);
    }
    assert_eq!(upstream.hits(), 8);
}

#[tokio::test(start_paused = true)]
async fn failed_probe_reopens_and_default_action_is_503() {
    let (ctx, _) = context();
    let upstream = Upstream::new(502);
    let breaker = build(
        json!({"errorThreshold": {"request": 2, "resetTimeout": "1s"}}),
        &ctx,
    )
    .expect("builds");
    let tripper = breaker.wrap(upstream.tripper());
    call(&tripper).await;
    call(&tripper).await;
    let open = call(&tripper).await;
    assert!(open.rejected);
    assert_eq!(open.status, 503);
    assert_eq!(open.text, "circuit breaker is open");
    tokio::time::advance(Duration::from_secs(1)).await;
    assert_eq!(
        call(&tripper).await.status,
        502,
        "the probe reaches the failing upstream"
    );
    assert_eq!(
        call(&tripper).await.status,
        503,
        "and the breaker is open again"
    );
    assert_eq!(upstream.hits(), 3);
}

#[tokio::test(start_paused = true)]
async fn assert_conditions_decide_what_succeeds() {
    let (ctx, _) = context();
    let upstream = Upstream::new(404);
    // Kratos' spelling and snake_case condition names.
    let breaker = build(
        json!({"errorThreshold": {"request": 3}, "assertCondtions": [{"by_status_code": "200-299"}]}),
        &ctx,
    )
    .expect("builds");
    let tripper = breaker.wrap(upstream.tripper());
    for _ in 0..3 {
        assert_eq!(call(&tripper).await.status, 404);
    }
    assert_eq!(
        call(&tripper).await.status,
        503,
        "404s are failures under these conditions"
    );
}

#[tokio::test(start_paused = true)]
async fn attempt_timeout_cuts_slow_attempts_and_counts_them() {
    let (ctx, _) = context();
    let mut upstream = Upstream::new(200);
    upstream.delay = Duration::from_secs(2);
    let breaker = build(
        json!({"errorThreshold": {"request": 2, "timeout": "100ms"}}),
        &ctx,
    )
    .expect("builds");
    let tripper = breaker.wrap(upstream.tripper());
    let cut = call(&tripper).await;
    assert_eq!(cut.status, 0);
    assert!(cut.text.contains("deadline"), "{}", cut.text);
    call(&tripper).await;
    assert_eq!(call(&tripper).await.status, 503);
}

#[tokio::test(start_paused = true)]
async fn success_ratio_throttles_a_failing_upstream() {
    let (ctx, denials) = context();
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
        if call(&tripper).await.status == 503 {
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
    assert_eq!(denied(&denials), rejected as u64);

    // Once the window has passed, requests flow again.
    upstream.status.store(200, Ordering::SeqCst);
    tokio::time::advance(Duration::from_secs(4)).await;
    for _ in 0..20 {
        assert_eq!(call(&tripper).await.status, 200);
    }
}

#[tokio::test(start_paused = true)]
async fn ratio_zero_sends_everything_to_the_open_action() {
    let (ctx, denials) = context();
    let upstream = Upstream::new(200);
    // protojson bytes: base64 of "busy".
    let breaker = build(
        json!({"ratio": "0", "responseData": {"statusCode": 503, "body": "YnVzeQ=="}}),
        &ctx,
    )
    .expect("builds");
    let tripper = breaker.wrap(upstream.tripper());
    assert_eq!(call(&tripper).await.text, "busy");
    assert_eq!(upstream.hits(), 0);
    assert_eq!(denied(&denials), 1);
}

/// A real HTTP/1.1 server on 127.0.0.1:0 answering `name`, with the path and query it saw
/// in `x-seen-path`.
async fn real_upstream(name: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let seen = request
                    .uri()
                    .path_and_query()
                    .map_or("", |path| path.as_str())
                    .to_owned();
                async move {
                    Response::builder()
                        .header("x-seen-path", seen)
                        .body(Full::new(Bytes::from_static(name.as_bytes())))
                }
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service),
            );
        }
    });
    addr
}

#[tokio::test]
async fn backup_service_answers_through_a_gateway_client() {
    let backup = real_upstream("backup").await;
    let (ctx, denials) = context();
    let upstream = Upstream::new(200);
    for target in [backup.to_string(), format!("http://{backup}/")] {
        let breaker = build(
            json!({"ratio": "0", "backupService": {"endpoint": {"backends": [{"target": target}]}}}),
            &ctx,
        )
        .expect("builds");
        let tripper = breaker.wrap(upstream.tripper());
        let mut request = Request::get("/cb?q=1").body(empty_body()).expect("request");
        // The primary endpoint's node filters and tried nodes do not apply to the backups.
        let mut options = RequestOptions::new(ctx.endpoint.clone(), None);
        options
            .filters
            .push(Arc::new(|_node: &selector::Node| false));
        options.tried.push(backup.to_string());
        let slot = options.backend.clone();
        request.extensions_mut().insert(options);
        let response = tripper.oneshot(request).await.expect("the backup answers");
        assert!(Rejection::of(&response).is_none());
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["x-seen-path"], "/cb?q=1");
        let body = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        assert_eq!(body, "backup");
        assert_eq!(
            slot.get().map(|node| node.address.clone()),
            Some(backup.to_string())
        );
        breaker.close();
    }
    assert_eq!(upstream.hits(), 0);
    assert_eq!(denied(&denials), 2);
}

#[tokio::test]
async fn bad_options_name_the_field() {
    let (ctx, _) = context();
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

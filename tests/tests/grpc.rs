//! gRPC through the real gateway, with a real gRPC server and client (tonic's
//! `grpc.health.v1`, so no code generation): a request a middleware refuses reaches the
//! client as the gRPC status the gateway chose (RESOURCE_EXHAUSTED, UNAUTHENTICATED,
//! PERMISSION_DENIED), not one the client guessed from an HTTP status.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Version};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tests::config::{middleware, middlewares, single};
use tests::harness::TestGateway;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint, Server};
use tonic::{Code, Status};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// Every await on the network in these tests ends within this.
const PATIENCE: Duration = Duration::from_secs(10);

/// The method the raw HTTP/2 requests call.
const CHECK: &str = "/grpc.health.v1.Health/Check";

/// Awaits `future`, panicking if it takes longer than [`PATIENCE`].
async fn within<F: Future>(what: &str, future: F) -> F::Output {
    tokio::time::timeout(PATIENCE, future)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {PATIENCE:?}"))
}

/// A tonic server of `grpc.health.v1.Health` (overall status SERVING) on 127.0.0.1:0 that
/// counts the calls reaching it; stops when dropped.
struct HealthUpstream {
    addr: SocketAddr,
    calls: Arc<AtomicUsize>,
    shutdown: CancellationToken,
}

impl HealthUpstream {
    async fn start() -> HealthUpstream {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the gRPC server");
        let addr = listener.local_addr().expect("local addr");
        let calls = Arc::new(AtomicUsize::new(0));
        let shutdown = CancellationToken::new();
        let (_reporter, health) = tonic_health::server::health_reporter();
        let counter = calls.clone();
        let count =
            tower::util::MapRequestLayer::new(move |request: http::Request<tonic::body::Body>| {
                counter.fetch_add(1, Ordering::SeqCst);
                request
            });
        let server = Server::builder()
            .layer(count)
            .add_service(health)
            .serve_with_incoming_shutdown(
                TcpListenerStream::new(listener),
                shutdown.clone().cancelled_owned(),
            );
        tokio::spawn(async move {
            if let Err(error) = server.await {
                eprintln!("the gRPC server failed: {error}");
            }
        });
        HealthUpstream {
            addr,
            calls,
            shutdown,
        }
    }

    /// Calls that reached this server so far.
    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    /// A gateway config proxying every Health method to this server as a `protocol: GRPC`
    /// endpoint with the middleware list `items` (none when empty).
    fn behind_gateway(&self, items: &str) -> String {
        let mut extra = String::from("    protocol: GRPC\n    timeout: 5s\n");
        if !items.is_empty() {
            extra.push_str(&middlewares(items));
        }
        single("/grpc.health.v1.Health/*", &self.addr.to_string(), &extra)
    }
}

impl Drop for HealthUpstream {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A Health server, a gateway in front of it whose endpoint has the middleware list
/// `items`, and a tonic client of the gateway (h2c).
struct Setup {
    upstream: HealthUpstream,
    gw: TestGateway,
    client: HealthClient<Channel>,
}

impl Setup {
    async fn start(items: &str) -> Setup {
        let upstream = HealthUpstream::start().await;
        let gw = TestGateway::start(&upstream.behind_gateway(items)).await;
        let endpoint = Endpoint::from_shared(gw.url(""))
            .expect("gateway URI")
            .connect_timeout(PATIENCE)
            .timeout(PATIENCE);
        let channel = within("connecting to the gateway", endpoint.connect())
            .await
            .expect("connect to the gateway");
        Setup {
            upstream,
            gw,
            client: HealthClient::new(channel),
        }
    }

    /// Calls `Check` (overall server health), with the `x-api-key` metadata when given.
    async fn check(&mut self, api_key: Option<&'static str>) -> Result<ServingStatus, Status> {
        let mut request = tonic::Request::new(HealthCheckRequest::default());
        if let Some(key) = api_key {
            request.metadata_mut().insert(
                "x-api-key",
                tonic::metadata::MetadataValue::from_static(key),
            );
        }
        let response = within("a Check call", self.client.check(request)).await?;
        Ok(response.into_inner().status())
    }
}

/// Asserts that a call passed and the server reported SERVING.
#[track_caller]
fn assert_serving(result: Result<ServingStatus, Status>) {
    match result {
        Ok(status) => assert_eq!(status, ServingStatus::Serving),
        Err(status) => panic!("the call was refused: {status:?}"),
    }
}

/// Asserts that a call was refused with `code` and a message saying why.
#[track_caller]
fn assert_refused(result: Result<ServingStatus, Status>, code: Code) {
    match result {
        Ok(status) => panic!("the call passed ({status:?}); it should get {code:?}"),
        Err(status) => {
            assert_eq!(status.code(), code, "{status:?}");
            assert!(
                !status.message().is_empty(),
                "a refusal without grpc-message: {status:?}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_without_middlewares_reaches_the_server() {
    let mut setup = Setup::start("").await;
    assert_serving(setup.check(None).await);
    assert_serving(setup.check(None).await);
    assert_eq!(setup.upstream.calls(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limited_calls_get_resource_exhausted() {
    let limit = middleware("ratelimit", "{key: global, max: 2, window: 1m}");
    let mut setup = Setup::start(&limit).await;
    assert_serving(setup.check(None).await);
    assert_serving(setup.check(None).await);
    assert_refused(setup.check(None).await, Code::ResourceExhausted);
    assert_refused(setup.check(None).await, Code::ResourceExhausted);
    assert_eq!(
        setup.upstream.calls(),
        2,
        "refused calls never reach the server"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_past_a_quota_or_a_spike_arrest_get_resource_exhausted() {
    for limit in [
        middleware("quota", "{allow: 2, timeUnit: hour, key: apikey}"),
        middleware("spikearrest", "{allow: 2, timeUnit: minute}"),
    ] {
        let mut setup = Setup::start(&limit).await;
        let calls = if limit.contains("quota") { 2 } else { 1 };
        for _ in 0..calls {
            assert_serving(setup.check(None).await);
        }
        assert_refused(setup.check(None).await, Code::ResourceExhausted);
        assert_eq!(setup.upstream.calls(), calls, "{limit}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_without_credentials_get_unauthenticated() {
    let auth = middleware("auth", "{apikey: {keys: [k-1]}}");
    let mut setup = Setup::start(&auth).await;
    assert_refused(setup.check(None).await, Code::Unauthenticated);
    assert_refused(setup.check(Some("k-2")).await, Code::Unauthenticated);
    // The configured key lets the call in.
    assert_serving(setup.check(Some("k-1")).await);
    assert_eq!(
        setup.upstream.calls(),
        1,
        "refused calls never reach the server"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_from_a_denied_address_get_permission_denied() {
    let ipfilter = middleware("ipfilter", "{deny: [127.0.0.1/32]}");
    let mut setup = Setup::start(&ipfilter).await;
    assert_refused(setup.check(None).await, Code::PermissionDenied);
    assert_eq!(
        setup.upstream.calls(),
        0,
        "refused calls never reach the server"
    );
}

/// Without a gRPC client in between: the gateway itself writes `grpc-status` into the
/// response headers (trailers-only) of the request it refuses, with HTTP status 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_carries_grpc_status_in_the_response_headers() {
    let limit = middleware("ratelimit", "{key: global, max: 1, window: 1m}");
    let Setup { upstream, gw, .. } = Setup::start(&limit).await;
    // h2c with prior knowledge, as gRPC clients speak it.
    let client = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http::<Full<Bytes>>();
    // An empty HealthCheckRequest: uncompressed, zero length.
    let post = || {
        Request::post(gw.url(CHECK))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(Full::new(Bytes::from_static(&[0, 0, 0, 0, 0])))
            .expect("request")
    };

    // The first passes: the server's grpc-status comes in the trailers, after the message.
    let response = within("the first call", client.request(post()))
        .await
        .expect("first response");
    assert_eq!(response.version(), Version::HTTP_2);
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers().get("grpc-status"), None);
    let body = within("the first body", response.into_body().collect())
        .await
        .expect("first body");
    let trailers = body.trailers().cloned().unwrap_or_default();
    assert_eq!(
        trailers.get("grpc-status").map(|v| v.as_bytes()),
        Some(&b"0"[..])
    );

    // The second is refused by the gateway: the status is in the headers.
    let response = within("the second call", client.request(post()))
        .await
        .expect("second response");
    let (parts, body) = response.into_parts();
    assert_eq!(parts.version, Version::HTTP_2);
    assert_eq!(parts.status, 200, "gRPC refusals are HTTP 200: {parts:?}");
    let header = |name: &str| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    assert_eq!(header("content-type"), "application/grpc");
    assert_eq!(header("grpc-status"), "8", "RESOURCE_EXHAUSTED: {parts:?}");
    assert!(!header("grpc-message").is_empty(), "{parts:?}");
    let body = within("the refusal's body", body.collect())
        .await
        .expect("refusal body");
    assert!(body.trailers().is_none(), "trailers-only: no trailers");
    assert!(body.to_bytes().is_empty(), "trailers-only: no message");
    assert_eq!(
        upstream.calls(),
        1,
        "the refused call never reached the server"
    );
}

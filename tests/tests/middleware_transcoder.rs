//! `transcoder` through the real gateway in front of a real gRPC server: tonic serving
//! `helloworld.Greeter` with a JSON codec (messages are JSON documents, as Kratos'
//! `application/grpc+json`), on 127.0.0.1. Plain HTTP/1.1 JSON clients and a tonic client
//! use the same `protocol: GRPC` endpoint.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes};
use http::{HeaderMap, Request, Version};
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};
use tests::config::{middleware, middlewares, single};
use tests::harness::{Reply, TestGateway, Upstream, send, text};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::metadata::MetadataValue;
use tonic::server::NamedService;
use tonic::transport::{Endpoint, Server};
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// Every await on the network in these tests ends within this.
const PATIENCE: Duration = Duration::from_secs(10);

/// Awaits `future`, panicking if it takes longer than [`PATIENCE`].
async fn within<F: Future>(what: &str, future: F) -> F::Output {
    tokio::time::timeout(PATIENCE, future)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {PATIENCE:?}"))
}

/// A gRPC codec whose messages are JSON documents (tonic's `examples/json-codec`, over
/// `serde_json::Value`).
#[derive(Debug, Clone, Copy, Default)]
struct JsonCodec;

#[derive(Debug)]
struct JsonEncoder;

#[derive(Debug)]
struct JsonDecoder;

impl Codec for JsonCodec {
    type Encode = Value;
    type Decode = Value;
    type Encoder = JsonEncoder;
    type Decoder = JsonDecoder;

    fn encoder(&mut self) -> JsonEncoder {
        JsonEncoder
    }

    fn decoder(&mut self) -> JsonDecoder {
        JsonDecoder
    }
}

impl Encoder for JsonEncoder {
    type Item = Value;
    type Error = Status;

    fn encode(&mut self, item: Value, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        serde_json::to_writer(dst.writer(), &item).map_err(|e| Status::internal(e.to_string()))
    }
}

impl Decoder for JsonDecoder {
    type Item = Value;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Value>, Status> {
        if !src.has_remaining() {
            return Ok(None);
        }
        serde_json::from_reader(src.reader())
            .map(Some)
            .map_err(|e| Status::invalid_argument(format!("not JSON: {e}")))
    }
}

/// What one call looked like when it reached the server.
#[derive(Debug, Clone)]
struct Seen {
    path: String,
    version: Version,
    headers: HeaderMap,
}

/// `helloworld.Greeter`, hand-written over tonic's `Grpc::unary`:
/// - `SayHello {"name": N}` answers `{"message": "Hello N"}` with the trailers
///   `x-greeted: N` and two `x-served-by` values beside `grpc-status`;
/// - `Find` fails with `NOT_FOUND` "x", an `ErrorInfo` and a `BadRequest` detail, and the
///   metadata `x-lookup: users`;
/// - anything else is `UNIMPLEMENTED`.
#[derive(Clone)]
struct Greeter {
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl NamedService for Greeter {
    const NAME: &'static str = "helloworld.Greeter";
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl tower::Service<http::Request<tonic::body::Body>> for Greeter {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let path = request.uri().path().to_owned();
        if let Ok(mut seen) = self.seen.lock() {
            seen.push(Seen {
                path: path.clone(),
                version: request.version(),
                headers: request.headers().clone(),
            });
        }
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(JsonCodec);
            let response = match path.as_str() {
                "/helloworld.Greeter/SayHello" => {
                    let greeted = Arc::new(Mutex::new(None));
                    let slot = greeted.clone();
                    let say_hello = tower::service_fn(move |request: tonic::Request<Value>| {
                        let name = request.get_ref()["name"].as_str().unwrap_or("").to_owned();
                        if let Ok(mut slot) = slot.lock() {
                            *slot = Some(name.clone());
                        }
                        async move {
                            Ok::<_, Status>(tonic::Response::new(
                                json!({"message": format!("Hello {name}")}),
                            ))
                        }
                    });
                    let response = grpc.unary(say_hello, request).await;
                    with_trailers(response, greeted)
                }
                "/helloworld.Greeter/Find" => {
                    let find = tower::service_fn(|_request: tonic::Request<Value>| async {
                        let mut details = ErrorDetails::with_error_info(
                            "USER_NOT_FOUND",
                            "example.com",
                            [("id".to_owned(), "42".to_owned())],
                        );
                        details.add_bad_request_violation("id", "no user has it");
                        let mut status = Status::with_error_details(Code::NotFound, "x", details);
                        status
                            .metadata_mut()
                            .insert("x-lookup", MetadataValue::from_static("users"));
                        Err::<tonic::Response<Value>, _>(status)
                    });
                    grpc.unary(find, request).await
                }
                _ => Status::unimplemented("no such method").into_http(),
            };
            Ok(response)
        })
    }
}

/// Adds `x-greeted: NAME` (the name `SayHello` greeted, put in `greeted` by the handler,
/// which has run by the time the trailers pass) and `x-served-by: a, b` to the trailers of
/// a `SayHello` answer.
fn with_trailers(
    response: http::Response<tonic::body::Body>,
    greeted: Arc<Mutex<Option<String>>>,
) -> http::Response<tonic::body::Body> {
    response.map(|body| {
        let mapped = body.map_frame(move |frame| match frame.into_trailers() {
            Ok(mut trailers) => {
                let name = greeted.lock().ok().and_then(|name| name.clone());
                if let Some(value) = name.and_then(|name| name.parse().ok()) {
                    trailers.insert("x-greeted", value);
                }
                trailers.append("x-served-by", "a".parse().expect("value"));
                trailers.append("x-served-by", "b".parse().expect("value"));
                http_body::Frame::trailers(trailers)
            }
            Err(frame) => frame,
        });
        tonic::body::Body::new(mapped)
    })
}

/// The Greeter on 127.0.0.1:0; stops when dropped.
struct GreeterServer {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    shutdown: CancellationToken,
}

impl GreeterServer {
    async fn start() -> GreeterServer {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the gRPC server");
        let addr = listener.local_addr().expect("local addr");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let shutdown = CancellationToken::new();
        let server = Server::builder()
            .add_service(Greeter { seen: seen.clone() })
            .serve_with_incoming_shutdown(
                TcpListenerStream::new(listener),
                shutdown.clone().cancelled_owned(),
            );
        tokio::spawn(async move {
            if let Err(error) = server.await {
                eprintln!("the gRPC server failed: {error}");
            }
        });
        GreeterServer {
            addr,
            seen,
            shutdown,
        }
    }

    /// The calls that reached the server so far.
    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("lock").clone()
    }
}

impl Drop for GreeterServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A Greeter and a gateway in front of it: `/helloworld.Greeter/*`, `protocol: GRPC`,
/// the `transcoder` with `options`.
async fn start(options: &str) -> (GreeterServer, TestGateway) {
    let server = GreeterServer::start().await;
    let extra = format!(
        "    protocol: GRPC\n    timeout: 5s\n{}",
        middlewares(&middleware("transcoder", options))
    );
    let yaml = single("/helloworld.Greeter/*", &server.addr.to_string(), &extra);
    let gateway = TestGateway::start(&yaml).await;
    (server, gateway)
}

/// POSTs `body` as `application/json` (HTTP/1.1) to `path` on the gateway.
async fn post_json(gateway: &TestGateway, path: &str, body: &str) -> Reply {
    let request = Request::post(gateway.url(path))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_owned())))
        .expect("request");
    send(request).await
}

fn json_of(reply: &Reply) -> Value {
    serde_json::from_str(&reply.body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {:?} {:?}", reply.status, reply.body))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_json_post_reaches_the_method_and_its_reply_comes_back_as_json() {
    let (server, gateway) = start("{}").await;
    let reply = post_json(
        &gateway,
        "/helloworld.Greeter/SayHello",
        r#"{"name":"kratos"}"#,
    )
    .await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.header("content-type"), "application/json");
    assert_eq!(json_of(&reply), json!({"message": "Hello kratos"}));
    assert_eq!(reply.header("grpc-status"), "0");

    let seen = server.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].path, "/helloworld.Greeter/SayHello");
    assert_eq!(seen[0].version, Version::HTTP_2);
    assert_eq!(seen[0].headers["content-type"], "application/grpc+json");
    assert_eq!(seen[0].headers["te"], "trailers");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_trailers_come_back_as_response_headers() {
    let (_server, gateway) = start("{}").await;
    let reply = post_json(
        &gateway,
        "/helloworld.Greeter/SayHello",
        r#"{"name":"ada"}"#,
    )
    .await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.header("x-greeted"), "ada");
    assert_eq!(reply.header_values("x-served-by"), "a,b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_not_found_status_with_details_becomes_a_200_status_body() {
    let (_server, gateway) = start("{}").await;
    let reply = post_json(&gateway, "/helloworld.Greeter/Find", r#"{"id":"42"}"#).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.header("content-type"), "application/json");
    assert_eq!(reply.header("grpc-status"), "5");
    assert_eq!(reply.header("x-lookup"), "users");
    assert_eq!(
        json_of(&reply),
        json!({
            "code": 5,
            "message": "x",
            "details": [
                {
                    "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                    "reason": "USER_NOT_FOUND",
                    "domain": "example.com",
                    "metadata": {"id": "42"},
                },
                {
                    "@type": "type.googleapis.com/google.rpc.BadRequest",
                    "fieldViolations": [{"field": "id", "description": "no user has it"}],
                },
            ],
        })
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_details_the_message_is_grpc_message_as_received() {
    let (_server, gateway) = start("{}").await;
    let reply = post_json(&gateway, "/helloworld.Greeter/Nope", "{}").await;
    assert_eq!(reply.status, 200, "{reply:?}");
    // As Kratos: `grpc-message` is not percent-decoded, and tonic encodes spaces.
    assert_eq!(reply.header("grpc-message"), "no%20such%20method");
    assert_eq!(
        json_of(&reply),
        json!({"code": 12, "message": "no%20such%20method"})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_client_through_the_same_endpoint_is_passed_through() {
    let (server, gateway) = start("{}").await;
    let channel = within(
        "connecting to the gateway",
        Endpoint::from_shared(gateway.url(""))
            .expect("gateway URI")
            .connect_timeout(PATIENCE)
            .timeout(PATIENCE)
            .connect(),
    )
    .await
    .expect("connect to the gateway");
    let mut client = tonic::client::Grpc::new(channel);

    within("the client to be ready", client.ready())
        .await
        .expect("ready");
    let reply = within(
        "SayHello",
        client.unary(
            tonic::Request::new(json!({"name": "grpc"})),
            http::uri::PathAndQuery::from_static("/helloworld.Greeter/SayHello"),
            JsonCodec,
        ),
    )
    .await
    .expect("SayHello passes");
    assert_eq!(reply.get_ref(), &json!({"message": "Hello grpc"}));
    // The trailers stayed trailers (tonic merges them into the reply's metadata).
    assert_eq!(
        reply.metadata().get("x-greeted").map(|v| v.as_bytes()),
        Some(&b"grpc"[..])
    );

    within("the client to be ready", client.ready())
        .await
        .expect("ready");
    let status = within(
        "Find",
        client.unary::<Value, Value, _>(
            tonic::Request::new(json!({"id": "42"})),
            http::uri::PathAndQuery::from_static("/helloworld.Greeter/Find"),
            JsonCodec,
        ),
    )
    .await
    .expect_err("Find fails");
    assert_eq!(status.code(), Code::NotFound);
    assert_eq!(status.message(), "x");
    let details = status.get_error_details();
    assert_eq!(
        details.error_info().map(|info| info.reason.as_str()),
        Some("USER_NOT_FOUND")
    );

    // The server saw gRPC as the client sent it, not re-framed.
    let seen = server.seen();
    assert_eq!(seen.len(), 2, "{seen:?}");
    for call in &seen {
        assert_eq!(call.headers["content-type"], "application/grpc");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_over_max_request_bytes_gets_413_and_never_reaches_the_server() {
    let (server, gateway) = start("{maxRequestBytes: 16}").await;
    let long = json!({"name": "x".repeat(64)}).to_string();
    let reply = post_json(&gateway, "/helloworld.Greeter/SayHello", &long).await;
    assert_eq!(reply.status, 413, "{reply:?}");
    assert_eq!(reply.header("content-type"), "application/json");
    assert_eq!(
        json_of(&reply),
        json!({"code": 8, "message": "request body is larger than 16 bytes"})
    );
    assert!(server.seen().is_empty());

    // One that fits still passes.
    let reply = post_json(&gateway, "/helloworld.Greeter/SayHello", r#"{"name":"a"}"#).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(json_of(&reply), json!({"message": "Hello a"}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_over_max_response_bytes_gets_502() {
    let (_server, gateway) = start("{maxResponseBytes: 8}").await;
    let reply = post_json(
        &gateway,
        "/helloworld.Greeter/SayHello",
        r#"{"name":"kratos"}"#,
    )
    .await;
    assert_eq!(reply.status, 502, "{reply:?}");
    assert_eq!(
        json_of(&reply),
        json!({"code": 13, "message": "upstream response is larger than 8 bytes"})
    );
}

/// Kratos' rules for answers that are not plain gRPC successes, with an h2c upstream that
/// answers like a proxy in front of a gRPC service might: a non-200 carrying a gRPC status
/// is still a 200 status body; a non-200 without one fails the round trip, which the
/// gateway answers as any upstream failure on a gRPC endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_200_answers_follow_kratos() {
    let upstream = Upstream::start(|request: http::Request<hyper::body::Incoming>| async move {
        let response = http::Response::builder().status(503);
        let response = if request.uri().path() == "/svc.Api/Draining" {
            response
                .header("content-type", "application/grpc")
                .header("grpc-status", "14")
                .header("grpc-message", "draining")
        } else {
            response.header("content-type", "text/plain")
        };
        response.body(text("overloaded")).expect("response")
    })
    .await;
    let extra = format!(
        "    protocol: GRPC\n    timeout: 5s\n{}",
        middlewares(&middleware("transcoder", "{}"))
    );
    let gateway = TestGateway::start(&single("/svc.Api/*", &upstream.target(), &extra)).await;

    let reply = post_json(&gateway, "/svc.Api/Draining", "{}").await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.header("content-type"), "application/json");
    assert_eq!(json_of(&reply), json!({"code": 14, "message": "draining"}));

    let reply = post_json(&gateway, "/svc.Api/Plain", "{}").await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.header("content-type"), "application/grpc");
    assert_eq!(
        reply.header("grpc-status"),
        "14",
        "UNAVAILABLE, as for a 502"
    );
    assert_eq!(reply.body, "");
}

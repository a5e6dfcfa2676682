use std::sync::{Arc, Mutex};

use http_body::Frame;
use http_body_util::BodyExt;
use middleware::hooks::body_with_trailers;
use middleware::{EndpointInfo, Rejection};
use tower::ServiceExt;

use super::*;

/// What the fake upstream saw.
#[derive(Debug, Default, Clone)]
struct Seen {
    headers: HeaderMap,
    body: Bytes,
}

/// The answer the fake upstream gives: status, headers, body data, trailers.
#[derive(Clone)]
struct Answer {
    status: u16,
    headers: Vec<(&'static str, &'static str)>,
    data: Bytes,
    trailers: Vec<(&'static str, &'static str)>,
}

impl Answer {
    fn grpc(message: &'static str, trailers: Vec<(&'static str, &'static str)>) -> Answer {
        Answer {
            status: 200,
            headers: vec![("content-type", "application/grpc")],
            data: frame(message.as_bytes()),
            trailers,
        }
    }
}

fn map(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in pairs {
        map.append(*name, HeaderValue::from_static(value));
    }
    map
}

fn upstream(answer: Answer, seen: Arc<Mutex<Option<Seen>>>) -> RoundTripper {
    RoundTripper::new(tower::service_fn(move |request: Request<Body>| {
        let answer = answer.clone();
        let seen = seen.clone();
        async move {
            let (parts, body) = request.into_parts();
            let body = body.collect().await?.to_bytes();
            *seen.lock().expect("lock") = Some(Seen {
                headers: parts.headers,
                body,
            });
            let trailers = (!answer.trailers.is_empty()).then(|| map(&answer.trailers));
            let mut response = Response::new(body_with_trailers(answer.data, trailers));
            *response.status_mut() = StatusCode::from_u16(answer.status)?;
            *response.headers_mut() = map(&answer.headers);
            Ok::<_, BoxError>(response)
        }
    }))
}

fn ctx(protocol: configs::Protocol) -> BuildContext {
    BuildContext::new(Arc::new(EndpointInfo {
        path: "/helloworld.Greeter/*".into(),
        protocol,
        ..EndpointInfo::default()
    }))
}

fn entry(options: serde_json::Value) -> configs::Middleware {
    configs::Middleware {
        name: NAME.into(),
        options,
        required: false,
    }
}

/// A transcoder (built by the factory with `options`) in front of a fake upstream giving
/// `answer`; returns the response and what the upstream saw.
async fn call(
    options: serde_json::Value,
    protocol: configs::Protocol,
    request: Request<Body>,
    answer: Answer,
) -> (Response<Body>, Option<Seen>) {
    let seen = Arc::new(Mutex::new(None));
    let middleware = factory(&entry(options), &ctx(protocol)).expect("builds");
    let service = middleware.wrap(upstream(answer, seen.clone()));
    let response = service.oneshot(request).await.expect("a response");
    let seen = seen.lock().expect("lock").clone();
    (response, seen)
}

fn json_post(body: &'static str) -> Request<Body> {
    Request::post("/helloworld.Greeter/SayHello")
        .header("content-type", "application/json")
        .header("content-length", body.len())
        .body(full_body(body))
        .expect("request")
}

async fn body_text(response: Response<Body>) -> (http::response::Parts, String, Option<HeaderMap>) {
    let (parts, body) = response.into_parts();
    let collected = body.collect().await.expect("body");
    let trailers = collected.trailers().cloned();
    let text = String::from_utf8(collected.to_bytes().to_vec()).expect("UTF-8");
    (parts, text, trailers)
}

#[tokio::test]
async fn json_is_framed_and_the_reply_unframed_with_trailers_folded() {
    let answer = Answer::grpc(
        r#"{"message":"hi"}"#,
        vec![
            ("grpc-status", "0"),
            ("x-served-by", "a"),
            ("x-served-by", "b"),
        ],
    );
    let (response, seen) = call(
        serde_json::Value::Null,
        configs::Protocol::Grpc,
        json_post(r#"{"name":"x"}"#),
        answer,
    )
    .await;
    let seen = seen.expect("the upstream was called");
    assert_eq!(seen.headers["content-type"], "application/grpc+json");
    assert_eq!(seen.headers["te"], "trailers");
    assert_eq!(seen.headers["content-length"], "17");
    assert_eq!(&seen.body[..], b"\0\0\0\0\x0c{\"name\":\"x\"}");

    let (parts, text, trailers) = body_text(response).await;
    assert_eq!(parts.status, 200);
    assert_eq!(text, r#"{"message":"hi"}"#);
    assert_eq!(parts.headers["content-type"], "application/json");
    assert_eq!(parts.headers["grpc-status"], "0");
    let served_by: Vec<_> = parts.headers.get_all("x-served-by").iter().collect();
    assert_eq!(served_by, ["a", "b"]);
    assert!(
        trailers.is_none(),
        "trailers are folded, not sent: {trailers:?}"
    );
}

#[tokio::test]
async fn a_non_zero_status_becomes_a_200_with_the_status_as_json() {
    // The upstream answered 503 with the status in its trailers: the client gets 200.
    let answer = Answer {
        status: 503,
        headers: vec![("content-type", "application/grpc"), ("x-node", "n1")],
        data: Bytes::new(),
        trailers: vec![
            ("grpc-status", "5"),
            ("grpc-message", "no such user"),
            ("x-request-id", "r-1"),
        ],
    };
    let (response, _) = call(
        serde_json::Value::Null,
        configs::Protocol::Grpc,
        json_post("{}"),
        answer,
    )
    .await;
    let (parts, text, _) = body_text(response).await;
    assert_eq!(parts.status, 200);
    assert_eq!(text, r#"{"code":5,"message":"no such user"}"#);
    assert_eq!(parts.headers["content-type"], "application/json");
    assert_eq!(parts.headers["grpc-status"], "5");
    assert_eq!(parts.headers["x-request-id"], "r-1");
    assert_eq!(parts.headers["x-node"], "n1");
}

#[tokio::test]
async fn status_zero_keeps_the_upstream_http_status() {
    let mut answer = Answer::grpc("{}", vec![("grpc-status", "0")]);
    answer.status = 202;
    let (response, _) = call(
        serde_json::Value::Null,
        configs::Protocol::Grpc,
        json_post("{}"),
        answer,
    )
    .await;
    assert_eq!(response.status(), 202);
}

#[tokio::test]
async fn an_answer_without_grpc_status_fails_the_round_trip() {
    let answer = Answer {
        status: 404,
        headers: vec![("content-type", "text/plain")],
        data: Bytes::from_static(b"404 page not found"),
        trailers: vec![],
    };
    let seen = Arc::new(Mutex::new(None));
    let middleware = factory(
        &entry(serde_json::Value::Null),
        &ctx(configs::Protocol::Grpc),
    )
    .expect("builds");
    let error = middleware
        .wrap(upstream(answer, seen))
        .oneshot(json_post("{}"))
        .await
        .expect_err("fails like Kratos");
    assert!(error.is::<StatusError>(), "{error}");
    assert!(error.to_string().contains("HTTP 404"), "{error}");
}

#[tokio::test]
async fn grpc_requests_and_http_endpoints_pass_untouched() {
    for (content_type, protocol) in [
        ("application/grpc", configs::Protocol::Grpc),
        ("application/grpc+proto", configs::Protocol::Grpc),
        ("application/grpc-web+json", configs::Protocol::Grpc),
        ("application/json", configs::Protocol::Http),
    ] {
        let request = Request::post("/helloworld.Greeter/SayHello")
            .header("content-type", content_type)
            .body(full_body("raw"))
            .expect("request");
        let answer = Answer {
            status: 200,
            headers: vec![("content-type", "application/grpc")],
            data: Bytes::from_static(b"\0\0\0\0\x01z"),
            trailers: vec![("grpc-status", "0")],
        };
        let (response, seen) = call(serde_json::Value::Null, protocol, request, answer).await;
        let seen = seen.expect("called");
        assert_eq!(seen.headers["content-type"], content_type);
        assert!(!seen.headers.contains_key("te"));
        assert_eq!(seen.body, "raw");
        let (parts, text, trailers) = body_text(response).await;
        assert_eq!(parts.headers["content-type"], "application/grpc");
        assert_eq!(text, "\0\0\0\0\x01z");
        assert!(
            trailers.is_some_and(|t| t["grpc-status"] == "0"),
            "{content_type}"
        );
    }
}

#[tokio::test]
async fn content_types_map_as_kratos_maps_them() {
    let value = |text: &'static str| HeaderValue::from_static(text);
    assert_eq!(
        grpc_content_type(Some(&value("application/json"))),
        "application/grpc+json"
    );
    assert_eq!(
        grpc_content_type(Some(&value("application/json; charset=utf-8"))),
        "application/grpc+json"
    );
    assert_eq!(
        grpc_content_type(Some(&value("application/x-protobuf"))),
        "application/grpc+x-protobuf"
    );
    assert_eq!(
        grpc_content_type(Some(&value("text/plain"))),
        "application/grpc+text/plain"
    );
    assert_eq!(grpc_content_type(None), "application/grpc");

    // Without a Content-Type, the response has none either.
    let request = Request::post("/x")
        .body(full_body("\x08\x01"))
        .expect("request");
    let (response, seen) = call(
        serde_json::Value::Null,
        configs::Protocol::Grpc,
        request,
        Answer::grpc("\x08\x02", vec![("grpc-status", "0")]),
    )
    .await;
    assert_eq!(
        seen.expect("called").headers["content-type"],
        "application/grpc"
    );
    assert!(!response.headers().contains_key("content-type"));
}

#[tokio::test]
async fn a_request_over_the_limit_gets_413_as_json_and_is_counted() {
    let denials = Arc::new(middleware::denials::LocalDenials::default());
    let ctx = ctx(configs::Protocol::Grpc).with_denials(denials.clone());
    let middleware =
        factory(&entry(serde_json::json!({"maxRequestBytes": 4})), &ctx).expect("builds");
    // One body of declared length (refused before it is read), one streamed without a
    // length (refused once it has grown past the limit).
    let streamed = {
        let chunks = ["{\"na", "me\":", "\"x\"}"].map(|chunk| Ok(Frame::data(Bytes::from(chunk))));
        let stream = futures_util::stream::iter(chunks);
        http_body_util::StreamBody::new(stream).boxed_unsync()
    };
    for body in [full_body(r#"{"name":"too long"}"#), streamed] {
        let seen = Arc::new(Mutex::new(None));
        let service = middleware.wrap(upstream(
            Answer::grpc("{}", vec![("grpc-status", "0")]),
            seen.clone(),
        ));
        let request = Request::post("/helloworld.Greeter/SayHello")
            .header("content-type", "application/json")
            .body(body)
            .expect("request");
        let response = service.oneshot(request).await.expect("a response");
        assert!(
            seen.lock().expect("lock").is_none(),
            "the upstream never sees it"
        );
        assert!(
            Rejection::of(&response).is_none(),
            "written here, not by the gRPC renderer"
        );
        let (parts, text, _) = body_text(response).await;
        assert_eq!(parts.status, 413);
        assert_eq!(parts.headers["content-type"], "application/json");
        assert_eq!(
            text,
            r#"{"code":8,"message":"request body is larger than 4 bytes"}"#
        );
    }
    assert_eq!(
        denials.get(NAME, "/helloworld.Greeter/*", "body_too_large"),
        2
    );
}

#[tokio::test]
async fn a_response_over_the_limit_or_malformed_gets_502_as_json() {
    let (response, _) = call(
        serde_json::json!({"max_response_bytes": "8"}),
        configs::Protocol::Grpc,
        json_post("{}"),
        Answer::grpc(r#"{"message":"long enough"}"#, vec![("grpc-status", "0")]),
    )
    .await;
    let (parts, text, _) = body_text(response).await;
    assert_eq!(parts.status, 502);
    assert_eq!(
        text,
        r#"{"code":13,"message":"upstream response is larger than 8 bytes"}"#
    );

    for (data, why) in [
        (&b"\0\0\0\0\x09{}"[..], "cut short"),
        (&b"\0\0"[..], "cut short"),
        (&b"\x01\0\0\0\x02{}"[..], "compressed"),
    ] {
        let answer = Answer {
            status: 200,
            headers: vec![],
            data: Bytes::copy_from_slice(data),
            trailers: vec![("grpc-status", "0")],
        };
        let (response, _) = call(
            serde_json::Value::Null,
            configs::Protocol::Grpc,
            json_post("{}"),
            answer,
        )
        .await;
        let (parts, text, _) = body_text(response).await;
        assert_eq!(parts.status, 502);
        assert!(text.contains(why), "{text}");
    }
}

#[test]
fn unframe_joins_messages_and_keeps_empty_bodies_empty() {
    assert_eq!(unframe(Bytes::new()), Ok(Bytes::new()));
    assert_eq!(unframe(frame(b"{}")), Ok(Bytes::from_static(b"{}")));
    let mut two = BytesMut::from(frame(b"{\"a\":1}").as_ref());
    two.extend_from_slice(&frame(b"{\"a\":2}"));
    assert_eq!(
        unframe(two.freeze()),
        Ok(Bytes::from_static(b"{\"a\":1}{\"a\":2}"))
    );
    assert_eq!(unframe(frame(b"")), Ok(Bytes::new()));
}

#[test]
fn options_are_checked() {
    let build = |options| factory(&entry(options), &ctx(configs::Protocol::Grpc)).map(|_| ());
    assert!(
        build(serde_json::json!({"maxRequestBytes": 1024, "maxResponseBytes": "2048"})).is_ok()
    );
    for (options, expected) in [
        (
            serde_json::json!({"maxRequestBytes": 0}),
            "options.maxRequestBytes: must be between",
        ),
        (
            serde_json::json!({"maxRequestBytes": 4294967296u64}),
            "options.maxRequestBytes: must be between",
        ),
        (
            serde_json::json!({"maxResponseBytes": 0}),
            "options.maxResponseBytes: must be greater",
        ),
        (
            serde_json::json!({"maxBodyBytes": 1}),
            "options.maxBodyBytes: unknown field",
        ),
    ] {
        let error = build(options).expect_err("refused");
        assert!(
            error.to_string().starts_with("middleware transcoder: "),
            "{error}"
        );
        assert!(error.to_string().contains(expected), "{error}");
    }
}

#[tokio::test]
async fn a_body_error_from_the_upstream_is_passed_on() {
    let failing = RoundTripper::new(tower::service_fn(|_request: Request<Body>| async {
        let stream = futures_util::stream::iter([
            Ok(Frame::data(Bytes::from_static(b"\0\0"))),
            Err::<Frame<Bytes>, BoxError>("upstream reset".into()),
        ]);
        Ok::<_, BoxError>(Response::new(
            http_body_util::StreamBody::new(stream).boxed_unsync(),
        ))
    }));
    let middleware = factory(
        &entry(serde_json::Value::Null),
        &ctx(configs::Protocol::Grpc),
    )
    .expect("builds");
    let error = middleware
        .wrap(failing)
        .oneshot(json_post("{}"))
        .await
        .expect_err("fails");
    assert_eq!(error.to_string(), "upstream reset");
}

//! The `tracing` middleware through the real gateway: W3C trace context to a real upstream,
//! and spans exported over OTLP/HTTP protobuf to a real receiver on 127.0.0.1 that decodes
//! each `ExportTraceServiceRequest` (opentelemetry-proto's prost types).

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use prost::Message;
use tests::assert_eventually;
use tests::config::{endpoint, gateway, middleware, middlewares, with_middlewares};
use tests::harness::{TestGateway, Upstream, get, get_with, text};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

/// A span as the receiver decoded it, with the resource's `service.name`.
#[derive(Debug, Clone)]
struct Received {
    service: String,
    span: Span,
}

impl Received {
    fn trace_id(&self) -> String {
        hex::encode(&self.span.trace_id)
    }

    fn span_id(&self) -> String {
        hex::encode(&self.span.span_id)
    }

    fn parent_id(&self) -> String {
        hex::encode(&self.span.parent_span_id)
    }

    fn kind(&self) -> SpanKind {
        SpanKind::try_from(self.span.kind).unwrap_or(SpanKind::Unspecified)
    }

    /// An attribute as text (integers in decimal); "" when absent.
    fn attr(&self, key: &str) -> String {
        let value = self
            .span
            .attributes
            .iter()
            .find(|kv| kv.key == key)
            .and_then(|kv| kv.value.as_ref())
            .and_then(|value| value.value.as_ref());
        match value {
            Some(Value::StringValue(text)) => text.clone(),
            Some(Value::IntValue(number)) => number.to_string(),
            Some(other) => format!("{other:?}"),
            None => String::new(),
        }
    }
}

/// An OTLP/HTTP receiver: `POST /v1/traces` with a protobuf body, answered 200.
struct Receiver {
    addr: SocketAddr,
    spans: mpsc::UnboundedReceiver<Received>,
    /// Export requests seen, with their content type.
    content_types: Arc<Mutex<Vec<String>>>,
}

impl Receiver {
    async fn start() -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (sender, spans) = mpsc::unbounded_channel();
        let content_types = Arc::new(Mutex::new(Vec::new()));
        let seen = content_types.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (sender, seen) = (sender.clone(), seen.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |req: Request<Incoming>| {
                        let (sender, seen) = (sender.clone(), seen.clone());
                        async move {
                            let status = receive(req, &sender, &seen).await;
                            let response = Response::builder()
                                .status(status)
                                .header("content-type", "application/x-protobuf")
                                .body(Full::new(Bytes::new()))
                                .expect("response");
                            Ok::<_, Infallible>(response)
                        }
                    });
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Receiver {
            addr,
            spans,
            content_types,
        }
    }

    /// Flushes the gateway's exporters, then takes spans until `count` arrived (10 s).
    async fn take(&mut self, count: usize) -> Vec<Received> {
        flush().await;
        let mut spans = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while spans.len() < count {
            match tokio::time::timeout_at(deadline, self.spans.recv()).await {
                Ok(Some(span)) => spans.push(span),
                _ => panic!("{} of {count} spans arrived: {spans:#?}", spans.len()),
            }
        }
        spans
    }

    /// Spans that arrived so far, without waiting.
    fn drain(&mut self) -> Vec<Received> {
        let mut spans = Vec::new();
        while let Ok(span) = self.spans.try_recv() {
            spans.push(span);
        }
        spans
    }
}

async fn receive(
    req: Request<Incoming>,
    sender: &mpsc::UnboundedSender<Received>,
    seen: &Mutex<Vec<String>>,
) -> StatusCode {
    if req.method() != http::Method::POST || req.uri().path() != "/v1/traces" {
        return StatusCode::NOT_FOUND;
    }
    let content_type = req
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    seen.lock().expect("lock").push(content_type);
    let Ok(body) = req.into_body().collect().await else {
        return StatusCode::BAD_REQUEST;
    };
    let Ok(export) = ExportTraceServiceRequest::decode(body.to_bytes()) else {
        return StatusCode::BAD_REQUEST;
    };
    for resource_spans in export.resource_spans {
        let service = resource_spans
            .resource
            .iter()
            .flat_map(|resource| &resource.attributes)
            .find(|kv| kv.key == "service.name")
            .and_then(|kv| kv.value.as_ref())
            .and_then(|value| match &value.value {
                Some(Value::StringValue(name)) => Some(name.clone()),
                _ => None,
            })
            .unwrap_or_default();
        for scope in resource_spans.scope_spans {
            for span in scope.spans {
                let _ = sender.send(Received {
                    service: service.clone(),
                    span,
                });
            }
        }
    }
    StatusCode::OK
}

/// Exports what the gateway's collectors hold now (the batch delay is 5 s).
async fn flush() {
    tokio::task::spawn_blocking(middleware_builtin::tracing::force_flush)
        .await
        .expect("flush");
}

/// `traceparent` split into (trace id, parent id, flags).
fn traceparent(value: &str) -> (String, String, String) {
    let parts: Vec<&str> = value.split('-').collect();
    assert_eq!(parts.len(), 4, "traceparent {value:?}");
    assert_eq!(parts[0], "00", "version of {value:?}");
    assert_eq!(parts[1].len(), 32, "trace id of {value:?}");
    assert_eq!(parts[2].len(), 16, "parent id of {value:?}");
    assert_ne!(parts[1], "0".repeat(32), "valid trace id");
    assert_ne!(parts[2], "0".repeat(16), "valid parent id");
    (parts[1].into(), parts[2].into(), parts[3].into())
}

fn tracing_at(receiver: &Receiver, extra: &str) -> String {
    middleware(
        "tracing",
        &format!("{{httpEndpoint: '{}'{extra}}}", receiver.addr),
    )
}

fn by_kind(spans: &[Received], kind: SpanKind) -> Vec<Received> {
    spans.iter().filter(|s| s.kind() == kind).cloned().collect()
}

const INCOMING_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const INCOMING_PARENT: &str = "00f067aa0ba902b7";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incoming_trace_is_continued_upstream_and_exported() {
    let mut receiver = Receiver::start().await;
    let upstream = Upstream::reporting("traced", &["traceparent", "tracestate"]).await;
    let config = with_middlewares("/traced/*", &upstream.target(), &tracing_at(&receiver, ""));
    let gw = TestGateway::start(&config).await;

    let incoming = format!("00-{INCOMING_TRACE}-{INCOMING_PARENT}-01");
    let reply = get_with(
        &gw.url("/traced/hello"),
        &[
            ("traceparent", incoming.as_str()),
            ("tracestate", "vendor=abc"),
        ],
    )
    .await;
    assert_eq!(reply.status, 200);
    let (trace, parent, flags) = traceparent(reply.header("x-seen-traceparent"));
    assert_eq!(
        trace, INCOMING_TRACE,
        "the upstream continues the same trace"
    );
    assert_ne!(parent, INCOMING_PARENT, "with the gateway's span as parent");
    assert_eq!(flags, "01", "sampled, as the incoming trace");
    assert_eq!(reply.header("x-seen-tracestate"), "vendor=abc");

    let spans = receiver.take(2).await;
    let server = by_kind(&spans, SpanKind::Server);
    let client = by_kind(&spans, SpanKind::Client);
    assert_eq!((server.len(), client.len()), (1, 1), "{spans:#?}");
    let (server, client) = (&server[0], &client[0]);
    assert_eq!(server.trace_id(), INCOMING_TRACE);
    assert_eq!(
        server.parent_id(),
        INCOMING_PARENT,
        "server span continues the caller's"
    );
    assert_eq!(client.trace_id(), INCOMING_TRACE);
    assert_eq!(
        client.parent_id(),
        server.span_id(),
        "client span is the server's child"
    );
    assert_eq!(
        client.span_id(),
        parent,
        "the upstream's parent is the client span"
    );
    assert_eq!(server.service, "gateway");
    assert_eq!(server.span.name, "GET /traced/*");

    for span in [server, client] {
        assert_eq!(span.attr("http.request.method"), "GET");
        assert_eq!(span.attr("url.path"), "/traced/hello");
        assert_eq!(span.attr("http.route"), "/traced/*");
        assert_eq!(span.attr("http.response.status_code"), "200");
    }
    assert_eq!(server.attr("client.address"), "127.0.0.1");
    assert_eq!(client.attr("gateway.node"), upstream.target());
    assert_eq!(client.attr("server.address"), "127.0.0.1");
    assert_eq!(client.attr("server.port"), upstream.addr.port().to_string());
    assert_eq!(client.attr("gateway.attempt"), "1");
    assert!(
        server.span.start_time_unix_nano <= client.span.start_time_unix_nano
            && client.span.end_time_unix_nano <= server.span.end_time_unix_nano,
        "the client span lies within the server span"
    );
    let content_types = receiver.content_types.lock().expect("lock").clone();
    assert!(
        content_types
            .iter()
            .all(|ct| ct == "application/x-protobuf"),
        "{content_types:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_without_trace_starts_one() {
    let mut receiver = Receiver::start().await;
    let upstream = Upstream::reporting("fresh", &["traceparent"]).await;
    let config = with_middlewares("/fresh", &upstream.target(), &tracing_at(&receiver, ""));
    let gw = TestGateway::start(&config).await;

    let first = get(&gw.url("/fresh")).await;
    let second = get(&gw.url("/fresh")).await;
    let (trace, parent, flags) = traceparent(first.header("x-seen-traceparent"));
    assert_eq!(flags, "01", "new traces are sampled by default");
    let (other_trace, _, _) = traceparent(second.header("x-seen-traceparent"));
    assert_ne!(trace, other_trace, "each request starts its own trace");

    let spans = receiver.take(4).await;
    let traced: Vec<&Received> = spans.iter().filter(|s| s.trace_id() == trace).collect();
    assert_eq!(traced.len(), 2, "{spans:#?}");
    let server = traced
        .iter()
        .find(|s| s.kind() == SpanKind::Server)
        .expect("server span");
    let client = traced
        .iter()
        .find(|s| s.kind() == SpanKind::Client)
        .expect("client span");
    assert!(server.span.parent_span_id.is_empty(), "a new trace's root");
    assert_eq!(client.parent_id(), server.span_id());
    assert_eq!(client.span_id(), parent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_gives_one_client_span_per_attempt() {
    let mut receiver = Receiver::start().await;
    // The first request fails with 503, every later one succeeds.
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = Arc::new(Mutex::new(Vec::<String>::new()));
    let (upstream_calls, upstream_seen) = (calls.clone(), seen.clone());
    let upstream = Upstream::start(move |req: Request<Incoming>| {
        let (calls, seen) = (upstream_calls.clone(), upstream_seen.clone());
        async move {
            let header = req.headers().get("traceparent");
            let header = header.and_then(|v| v.to_str().ok()).unwrap_or("-");
            seen.lock().expect("lock").push(header.to_owned());
            let status = if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                503
            } else {
                200
            };
            Response::builder()
                .status(status)
                .body(text("flaky"))
                .expect("response")
        }
    })
    .await;
    let extra = format!(
        "    timeout: 5s\n    retry:\n      attempts: 2\n      conditions:\n        - byStatusCode: \"503\"\n{}",
        middlewares(&tracing_at(&receiver, ""))
    );
    let gw = TestGateway::start(&gateway(&[endpoint("/flaky", &upstream.target(), &extra)])).await;

    assert_eq!(get(&gw.url("/flaky")).await.status, 200);
    let seen = seen.lock().expect("lock").clone();
    assert_eq!(seen.len(), 2, "two attempts: {seen:?}");
    let first = traceparent(&seen[0]);
    let second = traceparent(&seen[1]);
    assert_eq!(first.0, second.0, "both attempts carry the same trace");
    assert_ne!(first.1, second.1, "each attempt has its own span");

    let spans = receiver.take(3).await;
    let server = by_kind(&spans, SpanKind::Server);
    let mut clients = by_kind(&spans, SpanKind::Client);
    assert_eq!((server.len(), clients.len()), (1, 2), "{spans:#?}");
    clients.sort_by_key(|span| span.attr("gateway.attempt"));
    let attempts: Vec<(String, String, String)> = clients
        .iter()
        .map(|span| {
            (
                span.attr("gateway.attempt"),
                span.attr("http.response.status_code"),
                span.span_id(),
            )
        })
        .collect();
    assert_eq!(
        attempts,
        [
            ("1".into(), "503".into(), first.1.clone()),
            ("2".into(), "200".into(), second.1.clone())
        ]
    );
    assert_eq!(clients[1].attr("http.request.resend_count"), "1");
    for client in &clients {
        assert_eq!(client.parent_id(), server[0].span_id());
        assert_eq!(client.attr("gateway.node"), upstream.target());
    }
    assert_eq!(server[0].attr("http.response.status_code"), "200");
    assert_eq!(
        clients[0].span.status.as_ref().map(|s| s.code),
        Some(2),
        "the 503 attempt is an error"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sample_ratio_zero_exports_nothing_but_still_propagates() {
    let mut receiver = Receiver::start().await;
    let upstream = Upstream::reporting("sampling", &["traceparent"]).await;
    let config = gateway(&[
        endpoint(
            "/never",
            &upstream.target(),
            &middlewares(&tracing_at(&receiver, ", sampleRatio: 0")),
        ),
        endpoint(
            "/always",
            &upstream.target(),
            &middlewares(&tracing_at(&receiver, ", sampleRatio: \"1\"")),
        ),
    ]);
    let gw = TestGateway::start(&config).await;

    let mut unsampled = Vec::new();
    for _ in 0..5 {
        let reply = get(&gw.url("/never")).await;
        assert_eq!(reply.status, 200);
        let (trace, _, flags) = traceparent(reply.header("x-seen-traceparent"));
        assert_eq!(flags, "00", "propagated, marked not sampled");
        unsampled.push(trace);
    }
    // The same collector still exports the sampled endpoint's spans, and only those.
    let reply = get(&gw.url("/always")).await;
    let (sampled, _, flags) = traceparent(reply.header("x-seen-traceparent"));
    assert_eq!(flags, "01");
    let mut spans = receiver.take(2).await;
    flush().await;
    spans.extend(receiver.drain());
    assert_eq!(spans.len(), 2, "{spans:#?}");
    for span in &spans {
        assert_eq!(span.trace_id(), sampled);
        assert_eq!(span.attr("http.route"), "/always");
    }
    // An incoming sampled trace is followed even at ratio 0 (parent-based sampling).
    let incoming = format!("00-{INCOMING_TRACE}-{INCOMING_PARENT}-01");
    let reply = get_with(&gw.url("/never"), &[("traceparent", incoming.as_str())]).await;
    let (trace, _, flags) = traceparent(reply.header("x-seen-traceparent"));
    assert_eq!((trace.as_str(), flags.as_str()), (INCOMING_TRACE, "01"));
    let spans = receiver.take(2).await;
    assert!(
        spans.iter().all(|s| s.trace_id() == INCOMING_TRACE),
        "{spans:#?}"
    );
}

/// A collector that accepts connections and never answers: every export hangs until the
/// exporter's timeout.
async fn black_hole() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_never_answers_never_slows_requests() {
    let (collector, _black_hole) = black_hole().await;
    let upstream = Upstream::named("busy").await;
    let tracing = middleware(
        "tracing",
        &format!("{{httpEndpoint: '{collector}', timeout: 30s}}"),
    );
    let gw = TestGateway::start(&with_middlewares("/busy", &upstream.target(), &tracing)).await;

    // 2,000 requests, 8 at a time: 4,000 spans, about twice what the export queue holds,
    // while the exporter waits out a 30 s timeout on its first batch.
    const REQUESTS: usize = 2000;
    const CONCURRENCY: usize = 8;
    let url = gw.url("/busy");
    let slowest = Arc::new(Mutex::new(Duration::ZERO));
    let started = Instant::now();
    let mut workers = Vec::new();
    for worker in 0..CONCURRENCY {
        let (url, slowest) = (url.clone(), slowest.clone());
        workers.push(tokio::spawn(async move {
            let client = tests::harness::http_client();
            let mut ok = 0;
            for _ in (worker..REQUESTS).step_by(CONCURRENCY) {
                let begin = Instant::now();
                let request = Request::get(&url).body(Full::default()).expect("request");
                let response = client.request(request).await.expect("response");
                let status = response.status();
                response.into_body().collect().await.expect("body");
                let took = begin.elapsed();
                let mut slowest = slowest.lock().expect("lock");
                *slowest = (*slowest).max(took);
                if status == 200 {
                    ok += 1;
                }
            }
            ok
        }));
    }
    let mut ok = 0;
    for worker in workers {
        ok += worker.await.expect("worker");
    }
    assert_eq!(ok, REQUESTS, "every request succeeds");
    let slowest = *slowest.lock().expect("lock");
    // Generous slack: a request that waited on the exporter would take 30 s.
    assert!(
        slowest < Duration::from_secs(5),
        "slowest request took {slowest:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "2,000 requests took {:?}",
        started.elapsed()
    );
}

/// Threads named like the SDK's batch processor (`comm` keeps 15 bytes of the name).
fn batch_processor_threads() -> usize {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    tasks
        .filter_map(Result::ok)
        .filter_map(|task| std::fs::read_to_string(task.path().join("comm")).ok())
        .filter(|name| name.trim() == "OpenTelemetry.T")
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_share_one_exporter_across_reloads_and_removal_flushes_it() {
    let mut receiver = Receiver::start().await;
    let other = Receiver::start().await;
    let upstream = Upstream::reporting("shared", &["traceparent"]).await;
    // Endpoints /a and /b trace to `receiver`; /c, when present, to `other`.
    let config = |version: usize, tracing: bool, with_c: bool| {
        let items = if tracing {
            middlewares(&tracing_at(&receiver, ""))
        } else {
            String::new()
        };
        let mut endpoints = vec![
            endpoint("/a", &upstream.target(), &items),
            endpoint("/b", &upstream.target(), &items),
        ];
        if with_c {
            let items = middlewares(&tracing_at(&other, ""));
            endpoints.push(endpoint("/c", &upstream.target(), &items));
        }
        format!(
            "version: v{version}
{}",
            gateway(&endpoints)
        )
    };
    let gw = TestGateway::start(&config(0, true, false)).await;
    // A new thread names itself once it runs, so its name may show a moment later.
    assert_eventually!(
        Duration::from_secs(5),
        "one exporter for both endpoints",
        || async { batch_processor_threads() == 1 }
    );
    let applied = |version: usize| {
        let url = gw.url("/debug/config/version");
        async move { get(&url).await.body.contains(&format!("\"v{version}\"")) }
    };
    // A second collector URL gets its own exporter.
    gw.write_config(&config(1, true, true));
    assert_eventually!(Duration::from_secs(5), "v1 is applied", || applied(1));
    assert_eventually!(
        Duration::from_secs(5),
        "a second exporter for /c",
        || async { batch_processor_threads() == 2 }
    );

    // Reloads keep the exporter of /a and /b; the one /c used is retired.
    for version in 2..6 {
        gw.write_config(&config(version, true, false));
        assert_eventually!(Duration::from_secs(5), "the reload is applied", || applied(
            version
        ));
    }
    assert_eventually!(
        Duration::from_secs(10),
        "the /c exporter is retired",
        || async { batch_processor_threads() == 1 }
    );
    assert_eq!(get(&gw.url("/a")).await.status, 200);

    // Spans not yet exported when the last user goes away are flushed, not lost.
    let reply = get(&gw.url("/b")).await;
    let (trace, _, _) = traceparent(reply.header("x-seen-traceparent"));
    gw.write_config(&config(9, false, false));
    assert_eventually!(Duration::from_secs(5), "tracing is removed", || async {
        get(&gw.url("/b")).await.header("x-seen-traceparent") == "-"
    });
    assert_eventually!(
        Duration::from_secs(10),
        "the exporter is shut down",
        || async { batch_processor_threads() == 0 }
    );
    let mut spans: HashMap<String, usize> = HashMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while spans.get(&trace).copied().unwrap_or(0) < 2 {
        match tokio::time::timeout_at(deadline, receiver.spans.recv()).await {
            Ok(Some(span)) => *spans.entry(span.trace_id()).or_default() += 1,
            _ => panic!("the last request's spans were not flushed: {spans:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn options_are_checked_when_the_config_is_applied() {
    let upstream = Upstream::named("checked").await;
    for (options, wanted) in [
        ("{sampleRatio: 2}", "options.sampleRatio"),
        ("{httpEndpoint: 'no-port'}", "options.httpEndpoint"),
        (
            "{httpEndpoint: 'a:1', httpEndpointUrl: 'http://a:1/v1/traces'}",
            "options.httpEndpoint",
        ),
        (
            "{httpEndpointUrl: 'ftp://a/v1/traces'}",
            "options.httpEndpointUrl",
        ),
        ("{timeout: 'soon'}", "options.timeout"),
        ("{endpoint: 'a:1'}", "options.endpoint"),
    ] {
        let config = with_middlewares(
            "/checked",
            &upstream.target(),
            &middleware("tracing", options),
        );
        let err = TestGateway::start_with(&config, &[])
            .await
            .err()
            .unwrap_or_else(|| panic!("{options} is refused"));
        assert!(
            err.contains("middleware tracing") && err.contains(wanted),
            "{options}: {err}"
        );
    }
}

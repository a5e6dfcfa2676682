//! One OTLP/HTTP exporter per collector, shared by every endpoint that names it and kept
//! across config reloads while any endpoint still uses it.
//!
//! Each collector has its own tracer provider with a [`BatchSpanProcessor`]: ended spans
//! go into a bounded queue (a full queue drops spans, and the SDK logs the first drop) and
//! a dedicated thread exports them in batches, so a request never waits for the collector.
//! That thread drives the exporter's hyper client on a small current-thread tokio runtime
//! of its own: exports (and the last flush) do not depend on the gateway's runtime, which
//! may be shutting down. When the last endpoint lets go of a collector, its provider is
//! shut down (pending spans flushed) on a short-lived thread; [`shutdown`] waits for those
//! and for the collectors still in use when the gateway exits.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, LazyLock, Mutex, MutexGuard, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use opentelemetry::trace::{
    Link, SpanKind, TraceContextExt, TraceId, TraceState, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_http::hyper::HyperClient;
use opentelemetry_http::{HttpClient, HttpError};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SamplingDecision, SamplingResult, SdkTracer,
    SdkTracerProvider, ShouldSample,
};

/// Spans waiting for export per collector; past this, new spans are dropped.
pub const MAX_QUEUE_SIZE: usize = 2048;
/// Spans per export request.
const MAX_EXPORT_BATCH_SIZE: usize = 512;
/// How long a span may wait for a batch to fill before it is exported anyway.
const SCHEDULED_DELAY: Duration = Duration::from_secs(5);
/// The service name spans carry when `OTEL_SERVICE_NAME` is not set (as Kratos').
const SERVICE_NAME: &str = "gateway";

/// Collectors by (URL, export timeout); entries die with their last user.
static COLLECTORS: LazyLock<Mutex<Collectors>> = LazyLock::new(Default::default);

type Collectors = HashMap<(String, Duration), Weak<Collector>>;
/// Shutdowns of collectors nobody uses any more, still flushing.
static SHUTDOWNS: LazyLock<Mutex<Vec<JoinHandle<()>>>> = LazyLock::new(Default::default);

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A collector's tracer and the provider that batches and exports its spans.
pub(crate) struct Collector {
    url: String,
    timeout: Duration,
    provider: SdkTracerProvider,
    tracer: SdkTracer,
}

impl fmt::Debug for Collector {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("Collector")
            .field("url", &self.url)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl Collector {
    /// The collector for `url` (an export request times out after `timeout`), started on
    /// first use and shared while anyone holds it.
    pub(crate) fn shared(url: &str, timeout: Duration) -> Result<Arc<Collector>, String> {
        let mut collectors = lock(&COLLECTORS);
        let key = (url.to_owned(), timeout);
        if let Some(collector) = collectors.get(&key).and_then(Weak::upgrade) {
            return Ok(collector);
        }
        collectors.retain(|_, collector| collector.strong_count() > 0);
        let collector = Arc::new(Collector::start(url, timeout)?);
        collectors.insert(key, Arc::downgrade(&collector));
        Ok(collector)
    }

    fn start(url: &str, timeout: Duration) -> Result<Collector, String> {
        let client = ExportClient::new(timeout)?;
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(url)
            .with_timeout(timeout)
            .with_http_client(client)
            .build()
            .map_err(|err| err.to_string())?;
        let batch = BatchConfigBuilder::default()
            .with_max_queue_size(MAX_QUEUE_SIZE)
            .with_max_export_batch_size(MAX_EXPORT_BATCH_SIZE)
            .with_scheduled_delay(SCHEDULED_DELAY)
            .build();
        let processor = BatchSpanProcessor::builder(exporter)
            .with_batch_config(batch)
            .build();
        let mut resource = Resource::builder();
        if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
            resource = resource.with_service_name(SERVICE_NAME);
        }
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_sampler(EndpointSampler)
            .with_resource(resource.build())
            .build();
        let tracer = provider.tracer("gateway");
        ::tracing::info!(collector = url, "tracing: exporting spans over OTLP/HTTP");
        Ok(Collector {
            url: url.to_owned(),
            timeout,
            provider,
            tracer,
        })
    }

    /// The tracer whose spans go to this collector.
    pub(crate) fn tracer(&self) -> &SdkTracer {
        &self.tracer
    }

    fn shutdown_now(&self) {
        if let Err(err) = self.provider.shutdown_with_timeout(self.timeout) {
            ::tracing::debug!(collector = %self.url, error = %err, "tracing: shutdown");
        }
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        // Flushing waits for the collector (up to the export timeout): never on a runtime
        // worker, which may be the one dropping the last endpoint using this collector.
        let provider = self.provider.clone();
        let timeout = self.timeout;
        let url = std::mem::take(&mut self.url);
        let spawned = std::thread::Builder::new()
            .name("otlp-shutdown".into())
            .spawn(move || {
                if let Err(err) = provider.shutdown_with_timeout(timeout) {
                    ::tracing::debug!(collector = %url, error = %err, "tracing: shutdown");
                }
            });
        match spawned {
            Ok(handle) => {
                let mut shutdowns = lock(&SHUTDOWNS);
                shutdowns.retain(|handle| !handle.is_finished());
                shutdowns.push(handle);
            }
            Err(err) => ::tracing::warn!(error = %err, "tracing: cannot flush a retired collector"),
        }
    }
}

/// Flushes and shuts down every collector: those still in use and those being retired.
/// Blocks (up to each collector's export timeout); the gateway calls it once at exit.
pub fn shutdown() {
    let live: Vec<Arc<Collector>> = lock(&COLLECTORS)
        .drain()
        .filter_map(|(_, collector)| collector.upgrade())
        .collect();
    for collector in &live {
        collector.shutdown_now();
    }
    drop(live);
    let shutdowns = std::mem::take(&mut *lock(&SHUTDOWNS));
    for handle in shutdowns {
        let _ = handle.join();
    }
}

/// Exports the spans every collector holds now, without waiting for a batch to fill.
/// Blocks until the exports are done or failed; for tests and operators' tools.
pub fn force_flush() {
    let live: Vec<Arc<Collector>> = lock(&COLLECTORS)
        .values()
        .filter_map(Weak::upgrade)
        .collect();
    for collector in live {
        if let Err(err) = collector.provider.force_flush() {
            ::tracing::debug!(collector = %collector.url, error = %err, "tracing: flush");
        }
    }
}

/// The share of new traces an endpoint records, carried in the parent context of its
/// server spans (one provider serves endpoints with different ratios).
#[derive(Debug, Clone, Copy)]
pub(crate) struct SampleRatio(pub(crate) f64);

/// Parent-based sampling: a span with a parent follows the parent's decision (a remote
/// one from `traceparent`, or the server span for a client span); a new trace is sampled
/// by trace id at the endpoint's [`SampleRatio`] (every trace without one).
#[derive(Debug, Clone)]
struct EndpointSampler;

impl ShouldSample for EndpointSampler {
    fn should_sample(
        &self,
        parent: Option<&Context>,
        trace_id: TraceId,
        name: &str,
        kind: &SpanKind,
        attributes: &[KeyValue],
        links: &[Link],
    ) -> SamplingResult {
        if let Some(cx) = parent.filter(|cx| cx.has_active_span()) {
            let span = cx.span();
            let parent_span = span.span_context();
            if parent_span.is_valid() {
                return SamplingResult {
                    decision: if parent_span.is_sampled() {
                        SamplingDecision::RecordAndSample
                    } else {
                        SamplingDecision::Drop
                    },
                    attributes: Vec::new(),
                    trace_state: parent_span.trace_state().clone(),
                };
            }
        }
        match parent.and_then(|cx| cx.get::<SampleRatio>()) {
            Some(ratio) => Sampler::TraceIdRatioBased(ratio.0)
                .should_sample(parent, trace_id, name, kind, attributes, links),
            None => SamplingResult {
                decision: SamplingDecision::RecordAndSample,
                attributes: Vec::new(),
                trace_state: TraceState::default(),
            },
        }
    }
}

/// The exporter's HTTP client: hyper (HTTP, or HTTPS with the Mozilla roots), driven on a
/// current-thread runtime of its own. The batch processor calls it on its export thread,
/// outside any runtime, so blocking there on that runtime is what the thread is for.
struct ExportClient {
    inner: HyperClient<HttpsConnector<HttpConnector>>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl ExportClient {
    fn new(timeout: Duration) -> Result<Self, String> {
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|err| err.to_string())?
        .with_root_certificates(rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        })
        .with_no_client_auth();
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(timeout));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|err| format!("cannot start the exporter's runtime: {err}"))?;
        Ok(Self {
            inner: HyperClient::new(connector, timeout, None),
            runtime: Some(runtime),
        })
    }
}

impl fmt::Debug for ExportClient {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("ExportClient")
    }
}

impl Drop for ExportClient {
    fn drop(&mut self) {
        // Dropping a runtime blocks, which panics inside another runtime (a client that
        // failed to build is dropped where the config is applied).
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

#[async_trait::async_trait]
impl HttpClient for ExportClient {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let runtime = self
            .runtime
            .as_ref()
            .ok_or("the exporter's runtime is gone")?;
        if tokio::runtime::Handle::try_current().is_ok() {
            // Not the batch processor's thread: blocking here would stall a runtime.
            return Err("OTLP export called from inside a tokio runtime".into());
        }
        runtime.block_on(self.inner.send_bytes(request))
    }
}

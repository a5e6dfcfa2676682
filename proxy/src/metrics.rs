//! Prometheus metric families of the gateway, in one registry per gateway instance. They
//! belong to the proxy, as in Kratos; middlewares only get a [`Denials`] handle.
//!
//! Request families carry `path` = the endpoint's pattern, never the raw URL, so label
//! cardinality is bounded by the config. Handles are resolved once per endpoint
//! ([`EndpointMetrics`]) so the request path formats no labels.

use std::sync::{Arc, OnceLock};

use http::Method;
use middleware::EndpointInfo;
use middleware::denials::{Counter, DenialCounter, Denials, Gauge, GaugeHandle};

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

const ENDPOINT_LABELS: [&str; 5] = ["protocol", "method", "path", "service", "basePath"];

/// Every metric family the gateway exports.
pub struct Metrics {
    registry: Registry,
    /// `go_gateway_requests_code_total{protocol,method,path,code,service,basePath}`.
    pub requests_code: IntCounterVec,
    /// `go_gateway_requests_duration_seconds{protocol,method,path,service,basePath}`.
    pub requests_duration: HistogramVec,
    /// `go_gateway_requests_tx_bytes{...}`: response bytes sent downstream.
    pub tx_bytes: IntCounterVec,
    /// `go_gateway_requests_rx_bytes{...}`: request bytes received from downstream.
    pub rx_bytes: IntCounterVec,
    /// `go_gateway_requests_retry_state{...,success}`: requests that were retried, by outcome.
    pub retry_state: IntCounterVec,
    /// `go_gateway_middleware_denied_total{middleware,path,reason}`: requests a middleware stopped
    /// (breaker open, rate limited, shed, unauthorised, ...).
    pub middleware_denied: IntCounterVec,
    /// `go_gateway_middleware_build_failures_total{middleware}`.
    pub middleware_build_failures: IntCounterVec,
    /// `go_gateway_middleware_store_up{store,target}`: 1 while a shared store middlewares use
    /// (Redis) is reachable, 0 while they fall back.
    pub middleware_store_up: IntGaugeVec,
    /// `go_gateway_connections`: open downstream connections.
    pub connections: IntGauge,
    /// `go_gateway_connections_refused_total`: connections closed at accept because
    /// `--max-connections` were already open.
    pub connections_refused: IntCounter,
    /// `go_gateway_downstream_timeouts_total{kind}`: downstream waits that ran out, by kind:
    /// `header` (no request head in time), `idle` (keep-alive idle), `body` (request body
    /// paused too long), `write` (client read nothing for too long).
    pub downstream_timeouts: IntCounterVec,
    /// `go_gateway_requests_in_flight`: requests being proxied now.
    pub in_flight: IntGauge,
    /// `go_gateway_tunnels_open{protocol,method,path,service,basePath}`: upgraded connections
    /// (WebSocket and other HTTP/1.1 upgrades) being tunnelled now.
    pub tunnels_open: IntGaugeVec,
    /// `go_gateway_tunnels_opened_total{protocol,method,path,service,basePath}`: tunnels
    /// established since start.
    pub tunnels_opened: IntCounterVec,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates the families in a fresh registry.
    pub fn new() -> Self {
        let registry = Registry::new();
        let code_labels = ["protocol", "method", "path", "code", "service", "basePath"];
        let retry_labels = [
            "protocol", "method", "path", "service", "basePath", "success",
        ];
        let requests_code = IntCounterVec::new(
            Opts::new(
                "go_gateway_requests_code_total",
                "Requests by endpoint and status code.",
            ),
            &code_labels,
        )
        .expect("valid metric");
        let requests_duration = HistogramVec::new(
            HistogramOpts::new("go_gateway_requests_duration_seconds", "Request latency.").buckets(
                vec![
                    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                ],
            ),
            &ENDPOINT_LABELS,
        )
        .expect("valid metric");
        let tx_bytes = IntCounterVec::new(
            Opts::new(
                "go_gateway_requests_tx_bytes",
                "Response bytes sent downstream.",
            ),
            &ENDPOINT_LABELS,
        )
        .expect("valid metric");
        let rx_bytes = IntCounterVec::new(
            Opts::new(
                "go_gateway_requests_rx_bytes",
                "Request bytes received from downstream.",
            ),
            &ENDPOINT_LABELS,
        )
        .expect("valid metric");
        let retry_state = IntCounterVec::new(
            Opts::new(
                "go_gateway_requests_retry_state",
                "Retried requests by final outcome.",
            ),
            &retry_labels,
        )
        .expect("valid metric");
        let middleware_denied = IntCounterVec::new(
            Opts::new(
                "go_gateway_middleware_denied_total",
                "Requests stopped by a middleware.",
            ),
            &["middleware", "path", "reason"],
        )
        .expect("valid metric");
        let middleware_build_failures = IntCounterVec::new(
            Opts::new(
                "go_gateway_middleware_build_failures_total",
                "Middleware builds that failed.",
            ),
            &["middleware"],
        )
        .expect("valid metric");
        let middleware_store_up = IntGaugeVec::new(
            Opts::new(
                "go_gateway_middleware_store_up",
                "Whether a shared store of the middlewares (Redis) is reachable.",
            ),
            &["store", "target"],
        )
        .expect("valid metric");
        let connections = IntGauge::new("go_gateway_connections", "Open downstream connections.")
            .expect("valid metric");
        let connections_refused = IntCounter::new(
            "go_gateway_connections_refused_total",
            "Connections closed at accept: the connection limit was reached.",
        )
        .expect("valid metric");
        let downstream_timeouts = IntCounterVec::new(
            Opts::new(
                "go_gateway_downstream_timeouts_total",
                "Downstream waits that ran out, by kind (header, idle, body, write).",
            ),
            &["kind"],
        )
        .expect("valid metric");
        let in_flight = IntGauge::new("go_gateway_requests_in_flight", "Requests being proxied.")
            .expect("valid metric");
        let tunnels_open = IntGaugeVec::new(
            Opts::new(
                "go_gateway_tunnels_open",
                "Upgraded connections (WebSocket, ...) being tunnelled.",
            ),
            &ENDPOINT_LABELS,
        )
        .expect("valid metric");
        let tunnels_opened = IntCounterVec::new(
            Opts::new("go_gateway_tunnels_opened_total", "Tunnels established."),
            &ENDPOINT_LABELS,
        )
        .expect("valid metric");
        for collector in [
            Box::new(requests_code.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(requests_duration.clone()),
            Box::new(tx_bytes.clone()),
            Box::new(rx_bytes.clone()),
            Box::new(retry_state.clone()),
            Box::new(middleware_denied.clone()),
            Box::new(middleware_build_failures.clone()),
            Box::new(middleware_store_up.clone()),
            Box::new(connections.clone()),
            Box::new(connections_refused.clone()),
            Box::new(downstream_timeouts.clone()),
            Box::new(in_flight.clone()),
            Box::new(tunnels_open.clone()),
            Box::new(tunnels_opened.clone()),
        ] {
            registry
                .register(collector)
                .expect("metric names are unique");
        }
        Self {
            registry,
            requests_code,
            requests_duration,
            tx_bytes,
            rx_bytes,
            retry_state,
            middleware_denied,
            middleware_build_failures,
            middleware_store_up,
            connections,
            connections_refused,
            downstream_timeouts,
            in_flight,
            tunnels_open,
            tunnels_opened,
        }
    }

    /// The registry, for embedders that add their own families.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Everything in Prometheus text format.
    pub fn encode(&self) -> String {
        let mut buffer = Vec::new();
        let encoder = TextEncoder::new();
        if let Err(err) = encoder.encode(&self.registry.gather(), &mut buffer) {
            tracing::error!(%err, "encoding metrics");
        }
        String::from_utf8(buffer).unwrap_or_default()
    }

    /// Pre-resolved handles for one endpoint (per request method, resolved at first use).
    pub fn endpoint(&self, info: &EndpointInfo) -> EndpointMetrics {
        let label = |key: &str| info.metadata.get(key).cloned().unwrap_or_default();
        EndpointMetrics {
            protocol: info.protocol_label(),
            path: info.path.clone(),
            service: label("service"),
            base_path: label("basePath"),
            families: Families {
                requests_code: self.requests_code.clone(),
                duration: self.requests_duration.clone(),
                tx_bytes: self.tx_bytes.clone(),
                rx_bytes: self.rx_bytes.clone(),
                retry_state: self.retry_state.clone(),
                tunnels_open: self.tunnels_open.clone(),
                tunnels_opened: self.tunnels_opened.clone(),
            },
            by_method: Default::default(),
        }
    }

    /// Counts a request no endpoint matched, as Kratos does: `path="/404"` or `"/405"`,
    /// protocol `HTTP`, empty `service` and `basePath`.
    pub fn count_unmatched(&self, method: &Method, status: u16) {
        let (path, code) = if status == 405 {
            ("/405", "405")
        } else {
            ("/404", "404")
        };
        self.requests_code
            .with_label_values(&["HTTP", method_label(method), path, code, "", ""])
            .inc();
    }
}

/// The `method` label: the request's method, with extension methods counted as `OTHER` so
/// a client cannot grow the series without bound.
pub fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "OTHER",
    }
}

/// The slot of a method in [`EndpointMetrics`]'s table (the order of [`method_label`]).
fn method_slot(method: &Method) -> usize {
    match *method {
        Method::GET => 0,
        Method::POST => 1,
        Method::PUT => 2,
        Method::DELETE => 3,
        Method::PATCH => 4,
        Method::HEAD => 5,
        Method::OPTIONS => 6,
        Method::CONNECT => 7,
        Method::TRACE => 8,
        _ => 9,
    }
}

/// Built-ins count their refusals here, through the narrow [`Denials`] handle.
impl Denials for Metrics {
    fn counter(&self, middleware: &str, endpoint: &str, reason: &str) -> DenialCounter {
        Arc::new(DeniedCounter(
            self.middleware_denied
                .with_label_values(&[middleware, endpoint, reason]),
        ))
    }

    fn store_up(&self, store: &str, target: &str) -> GaugeHandle {
        Arc::new(StoreGauge(
            self.middleware_store_up.with_label_values(&[store, target]),
        ))
    }
}

struct StoreGauge(IntGauge);

impl Gauge for StoreGauge {
    fn set(&self, value: i64) {
        self.0.set(value);
    }
}

struct DeniedCounter(IntCounter);

impl Counter for DeniedCounter {
    fn inc(&self) {
        self.0.inc();
    }
}

/// The families an endpoint's handles come from.
struct Families {
    requests_code: IntCounterVec,
    duration: HistogramVec,
    tx_bytes: IntCounterVec,
    rx_bytes: IntCounterVec,
    retry_state: IntCounterVec,
    tunnels_open: IntGaugeVec,
    tunnels_opened: IntCounterVec,
}

/// Metric handles of one endpoint. Kratos labels `method` with the request's method, so the
/// handles are kept per method, each resolved the first time a request with that method
/// arrives: the request path formats no labels after that.
pub struct EndpointMetrics {
    protocol: &'static str,
    path: String,
    service: String,
    base_path: String,
    families: Families,
    by_method: [OnceLock<MethodMetrics>; 10],
}

impl EndpointMetrics {
    /// The handles for requests with `method`.
    pub fn of(&self, method: &Method) -> &MethodMetrics {
        self.by_method[method_slot(method)].get_or_init(|| self.resolve(method_label(method)))
    }

    fn resolve(&self, method: &'static str) -> MethodMetrics {
        let labels = [
            self.protocol,
            method,
            &self.path,
            &self.service,
            &self.base_path,
        ];
        let families = &self.families;
        let [protocol, method, path, service, base_path] = labels;
        let retry = |success| {
            families
                .retry_state
                .with_label_values(&[protocol, method, path, service, base_path, success])
        };
        MethodMetrics {
            labels: labels.map(str::to_owned),
            requests_code: families.requests_code.clone(),
            duration: families.duration.with_label_values(&labels),
            tx_bytes: families.tx_bytes.with_label_values(&labels),
            rx_bytes: families.rx_bytes.with_label_values(&labels),
            retry_success: retry("true"),
            retry_failure: retry("false"),
            codes: Default::default(),
            tunnels_open: families.tunnels_open.clone(),
            tunnels_opened: families.tunnels_opened.clone(),
            tunnels: OnceLock::new(),
        }
    }
}

/// Metric handles of one endpoint and request method.
pub struct MethodMetrics {
    labels: [String; 5],
    requests_code: IntCounterVec,
    /// Latency histogram.
    pub duration: prometheus::Histogram,
    /// Response bytes sent.
    pub tx_bytes: IntCounter,
    /// Request bytes received.
    pub rx_bytes: IntCounter,
    /// Retried requests that ended well.
    pub retry_success: IntCounter,
    /// Retried requests that ended badly.
    pub retry_failure: IntCounter,
    codes: [OnceLock<(u16, IntCounter)>; 8],
    tunnels_open: IntGaugeVec,
    tunnels_opened: IntCounterVec,
    /// Resolved at the first tunnel, so endpoints that never upgrade export no series.
    tunnels: OnceLock<TunnelMetrics>,
}

/// Metric handles a tunnel updates while it lives (its endpoint's series).
#[derive(Clone)]
pub struct TunnelMetrics {
    /// Open tunnels of the endpoint.
    pub open: IntGauge,
    /// Tunnels the endpoint established.
    pub opened: IntCounter,
    /// The endpoint's `rx_bytes`: bytes the client sent through the tunnel.
    pub rx_bytes: IntCounter,
    /// The endpoint's `tx_bytes`: bytes the upstream sent through the tunnel.
    pub tx_bytes: IntCounter,
}

impl MethodMetrics {
    /// Counts one request that ended with `code`.
    pub fn count_code(&self, code: u16) {
        for slot in &self.codes {
            match slot.get() {
                Some((cached, counter)) if *cached == code => return counter.inc(),
                Some(_) => {}
                None => {
                    let (cached, counter) = slot.get_or_init(|| (code, self.code_counter(code)));
                    if *cached == code {
                        return counter.inc();
                    }
                }
            }
        }
        self.code_counter(code).inc();
    }

    /// The handles of this endpoint's tunnels.
    pub fn tunnel(&self) -> &TunnelMetrics {
        self.tunnels.get_or_init(|| {
            let [protocol, method, path, service, base_path] = &self.labels;
            let labels = [protocol, method, path, service, base_path].map(String::as_str);
            TunnelMetrics {
                open: self.tunnels_open.with_label_values(&labels),
                opened: self.tunnels_opened.with_label_values(&labels),
                rx_bytes: self.rx_bytes.clone(),
                tx_bytes: self.tx_bytes.clone(),
            }
        })
    }

    fn code_counter(&self, code: u16) -> IntCounter {
        let code = code.to_string();
        let [protocol, method, path, service, base_path] = &self.labels;
        self.requests_code
            .with_label_values(&[protocol, method, path, &code, service, base_path])
    }
}

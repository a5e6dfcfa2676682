//! Prometheus metric families of the gateway, in one registry per gateway instance. They
//! belong to the proxy, as in Kratos; middlewares only get a [`Denials`] handle.
//!
//! Request families carry `path` = the endpoint's pattern, never the raw URL, so label
//! cardinality is bounded by the config. Handles are resolved once per endpoint
//! ([`EndpointMetrics`]) so the request path formats no labels.

use std::sync::{Arc, OnceLock};

use middleware::EndpointInfo;
use middleware::denials::{Counter, DenialCounter, Denials};

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

const ENDPOINT_LABELS: [&str; 5] = ["protocol", "method", "path", "service", "basePath"];

/// Every metric family the gateway exports.
pub struct Metrics {
    registry: Registry,
    /// `gateway_requests_code_total{protocol,method,path,code,service,basePath}`.
    pub requests_code: IntCounterVec,
    /// `gateway_requests_duration_seconds{protocol,method,path,service,basePath}`.
    pub requests_duration: HistogramVec,
    /// `gateway_requests_tx_bytes{...}`: response bytes sent downstream.
    pub tx_bytes: IntCounterVec,
    /// `gateway_requests_rx_bytes{...}`: request bytes received from downstream.
    pub rx_bytes: IntCounterVec,
    /// `gateway_requests_retry_state{...,success}`: requests that were retried, by outcome.
    pub retry_state: IntCounterVec,
    /// `gateway_middleware_denied_total{middleware,path,reason}`: requests a middleware stopped
    /// (breaker open, rate limited, shed, unauthorised, ...).
    pub middleware_denied: IntCounterVec,
    /// `gateway_middleware_build_failures_total{middleware}`.
    pub middleware_build_failures: IntCounterVec,
    /// `gateway_connections`: open downstream connections.
    pub connections: IntGauge,
    /// `gateway_connections_refused_total`: connections closed at accept because
    /// `--max-connections` were already open.
    pub connections_refused: IntCounter,
    /// `gateway_downstream_timeouts_total{kind}`: downstream waits that ran out, by kind:
    /// `header` (no request head in time), `idle` (keep-alive idle), `body` (request body
    /// paused too long), `write` (client read nothing for too long).
    pub downstream_timeouts: IntCounterVec,
    /// `gateway_requests_in_flight`: requests being proxied now.
    pub in_flight: IntGauge,
    /// `gateway_tunnels_open{protocol,method,path,service,basePath}`: upgraded connections
    /// (WebSocket and other HTTP/1.1 upgrades) being tunnelled now.
    pub tunnels_open: IntGaugeVec,
    /// `gateway_tunnels_opened_total{protocol,method,path,service,basePath}`: tunnels
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
                "gateway_requests_code_total",
                "Requests by endpoint and status code.",
            ),
            &code_labels,
        )
        .expect("valid metric");
        let requests_duration = HistogramVec::new(
            HistogramOpts::new("gateway_requests_duration_seconds", "Request latency.").buckets(
                vec![
                    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                ],
            ),
            &ENDPOINT_LABELS,
        )
        .expect("valid metric");
        let tx_bytes = IntCounterVec::new(
            Opts::new(
                "gateway_requests_tx_bytes",
                "Response bytes sent downstream.",
            ),
            &ENDPOINT_LABELS,
        )
        .expect("valid metric");
        let rx_bytes = IntCounterVec::new(
            Opts::new(
                "gateway_requests_rx_bytes",
                "Request bytes received from downstream.",
            ),
            &ENDPOINT_LABELS,
        )
        .expect("valid metric");
        let retry_state = IntCounterVec::new(
            Opts::new(
                "gateway_requests_retry_state",
                "Retried requests by final outcome.",
            ),
            &retry_labels,
        )
        .expect("valid metric");
        let middleware_denied = IntCounterVec::new(
            Opts::new(
                "gateway_middleware_denied_total",
                "Requests stopped by a middleware.",
            ),
            &["middleware", "path", "reason"],
        )
        .expect("valid metric");
        let middleware_build_failures = IntCounterVec::new(
            Opts::new(
                "gateway_middleware_build_failures_total",
                "Middleware builds that failed.",
            ),
            &["middleware"],
        )
        .expect("valid metric");
        let connections = IntGauge::new("gateway_connections", "Open downstream connections.")
            .expect("valid metric");
        let connections_refused = IntCounter::new(
            "gateway_connections_refused_total",
            "Connections closed at accept: the connection limit was reached.",
        )
        .expect("valid metric");
        let downstream_timeouts = IntCounterVec::new(
            Opts::new(
                "gateway_downstream_timeouts_total",
                "Downstream waits that ran out, by kind (header, idle, body, write).",
            ),
            &["kind"],
        )
        .expect("valid metric");
        let in_flight = IntGauge::new("gateway_requests_in_flight", "Requests being proxied.")
            .expect("valid metric");
        let tunnels_open = IntGaugeVec::new(
            Opts::new(
                "gateway_tunnels_open",
                "Upgraded connections (WebSocket, ...) being tunnelled.",
            ),
            &ENDPOINT_LABELS,
        )
        .expect("valid metric");
        let tunnels_opened = IntCounterVec::new(
            Opts::new("gateway_tunnels_opened_total", "Tunnels established."),
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

    /// Pre-resolved handles for one endpoint.
    pub fn endpoint(&self, info: &EndpointInfo) -> EndpointMetrics {
        let service = info
            .metadata
            .get("service")
            .map(String::as_str)
            .unwrap_or("");
        let base_path = info
            .metadata
            .get("basePath")
            .map(String::as_str)
            .unwrap_or("");
        let method = if info.method.is_empty() {
            "*"
        } else {
            info.method.as_str()
        };
        let labels = [
            info.protocol_label(),
            method,
            info.path.as_str(),
            service,
            base_path,
        ];
        EndpointMetrics {
            labels: labels.map(str::to_owned),
            requests_code: self.requests_code.clone(),
            duration: self.requests_duration.with_label_values(&labels),
            tx_bytes: self.tx_bytes.with_label_values(&labels),
            rx_bytes: self.rx_bytes.with_label_values(&labels),
            retry_success: self.retry_state.with_label_values(&[
                labels[0], labels[1], labels[2], labels[3], labels[4], "true",
            ]),
            retry_failure: self.retry_state.with_label_values(&[
                labels[0], labels[1], labels[2], labels[3], labels[4], "false",
            ]),
            codes: Default::default(),
            tunnels_open: self.tunnels_open.clone(),
            tunnels_opened: self.tunnels_opened.clone(),
            tunnels: OnceLock::new(),
        }
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
}

struct DeniedCounter(IntCounter);

impl Counter for DeniedCounter {
    fn inc(&self) {
        self.0.inc();
    }
}

/// Metric handles of one endpoint, resolved when the endpoint is built.
pub struct EndpointMetrics {
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

impl EndpointMetrics {
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

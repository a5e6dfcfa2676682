//! `circuitbreaker`: stops sending requests to an upstream that keeps failing, and answers
//! them from a static response or backup backends instead (Kratos' `circuitbreaker`,
//! same YAML shape, plus a classic `errorThreshold` trigger).
//!
//! Each attempt passes the trigger (see [`trigger`]): `successRatio` (Google SRE adaptive
//! throttling, the default), `ratio` (Kratos' static share) or `errorThreshold` (closed /
//! open / half-open). An admitted attempt goes on and its outcome is recorded: a success
//! is a response matching one of `assertConditions` (default: any status below 500);
//! transport errors, and attempts cut by `errorThreshold.timeout`, are failures. A
//! rejected attempt never reaches the upstream: it gets `responseData`, or is forwarded
//! to `backupService` (see [`backup`]), or gets a plain `503`; it counts in
//! `gateway_middleware_denied_total{middleware="circuitbreaker",reason="breaker_open"}`.
//!
//! The breaker's state belongs to the built middleware: one per endpoint (a global entry is
//! built once per endpoint), started afresh on every config update.

pub mod backup;
mod layer;
pub mod options;
pub mod trigger;
pub mod window;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Request, Response, StatusCode};
use prometheus::IntCounter;
use tokio::time::Instant;
use tower::Service;

use self::backup::BackupClient;
pub use self::layer::CircuitBreakerLayer;
pub use self::options::CircuitBreakerOptions;
use self::options::{ErrorThreshold, ResponseData, SuccessRatio};
use self::trigger::{
    Admission, BreakerState, RatioGate, SreThrottle, ThresholdBreaker, ThresholdSettings, Trigger,
};
use super::support::{decode, option_error, plain_response};
use crate::metrics::Metrics;
use crate::{Body, BoxError, BuildContext, BuildError, Middleware, full_body};

/// The name this middleware is registered under and counted as.
pub const NAME: &str = "circuitbreaker";

/// Builds `circuitbreaker` from its config entry.
pub fn factory(config: &configs::Middleware, ctx: &BuildContext) -> Result<Middleware, BuildError> {
    let options: CircuitBreakerOptions = decode(config)?;
    let breaker = Breaker::new(&options, &config.name, &ctx.endpoint.path, &ctx.metrics)?;
    Ok(Middleware::from_layer(
        &config.name,
        CircuitBreakerLayer::new(Arc::new(breaker)),
    ))
}

/// A breaker's configuration and state, shared by all clones of its service.
pub struct Breaker {
    trigger: Trigger,
    attempt_timeout: Option<Duration>,
    success_conditions: Vec<configs::Condition>,
    when_open: OpenAction,
    denied: IntCounter,
    endpoint: String,
}

enum OpenAction {
    Respond {
        status: StatusCode,
        headers: HeaderMap,
        body: Bytes,
    },
    Backup(BackupClient),
}

impl Breaker {
    /// Checks `options` (`name` is the middleware's configured name, for errors) and builds
    /// a closed breaker for the endpoint with path pattern `endpoint`.
    pub fn new(
        options: &CircuitBreakerOptions,
        name: &str,
        endpoint: &str,
        metrics: &Metrics,
    ) -> Result<Self, BuildError> {
        let now = Instant::now();
        let triggers = [
            options.success_ratio.is_some(),
            options.ratio.is_some(),
            options.error_threshold.is_some(),
        ];
        if triggers.iter().filter(|set| **set).count() > 1 {
            return Err(option_error(
                name,
                "successRatio",
                "set only one of successRatio, ratio and errorThreshold",
            ));
        }
        let mut attempt_timeout = None;
        let trigger = if let Some(ratio) = options.ratio {
            if ratio > 10_000 {
                return Err(option_error(
                    name,
                    "ratio",
                    format!("{ratio} is above 10000 (the share is ratio / 10000)"),
                ));
            }
            Trigger::Ratio(RatioGate::new(ratio))
        } else if let Some(threshold) = &options.error_threshold {
            attempt_timeout = threshold.timeout;
            Trigger::Threshold(ThresholdBreaker::new(
                threshold_settings(threshold, name)?,
                now,
            ))
        } else {
            sre_trigger(options.success_ratio.clone().unwrap_or_default(), name, now)?
        };
        for (index, condition) in options.assert_conditions.iter().enumerate() {
            if condition.by_status_code.is_none() && condition.by_header.is_none() {
                return Err(option_error(
                    name,
                    &format!("assertConditions[{index}]"),
                    "set byStatusCode or byHeader",
                ));
            }
        }
        let when_open = match (&options.response_data, &options.backup_service) {
            (Some(_), Some(_)) => {
                return Err(option_error(
                    name,
                    "backupService",
                    "set only one of responseData and backupService",
                ));
            }
            (Some(data), None) => static_response(data, name)?,
            (None, Some(backup)) => OpenAction::Backup(
                BackupClient::new(&backup.endpoint.backends).map_err(|(index, err)| {
                    option_error(
                        name,
                        &format!("backupService.endpoint.backends[{index}]"),
                        err,
                    )
                })?,
            ),
            (None, None) => OpenAction::Respond {
                status: StatusCode::SERVICE_UNAVAILABLE,
                headers: plain_response(StatusCode::SERVICE_UNAVAILABLE, "")
                    .headers()
                    .clone(),
                body: Bytes::from_static(b"503 circuit breaker is open\n"),
            },
        };
        Ok(Self {
            trigger,
            attempt_timeout,
            success_conditions: options.assert_conditions.clone(),
            when_open,
            denied: metrics
                .middleware_denied
                .with_label_values(&[NAME, endpoint, "breaker_open"]),
            endpoint: endpoint.to_owned(),
        })
    }

    /// Whether `response` counts as a success.
    fn is_success(&self, response: &Response<Body>) -> bool {
        if self.success_conditions.is_empty() {
            return !response.status().is_server_error();
        }
        self.success_conditions.iter().any(|condition| {
            let by_status = condition
                .by_status_code
                .is_some_and(|range| range.contains(response.status().as_u16()));
            let by_header = condition.by_header.as_ref().is_some_and(|header| {
                let wanted = header.values();
                response
                    .headers()
                    .get_all(header.name.as_str())
                    .iter()
                    .filter_map(|value| value.to_str().ok())
                    .any(|value| wanted.iter().any(|want| want == value))
            });
            by_status || by_header
        })
    }

    async fn when_open(&self, request: Request<Body>) -> Result<Response<Body>, BoxError> {
        match &self.when_open {
            OpenAction::Respond {
                status,
                headers,
                body,
            } => {
                let mut response = Response::new(full_body(body.clone()));
                *response.status_mut() = *status;
                *response.headers_mut() = headers.clone();
                Ok(response)
            }
            OpenAction::Backup(client) => client.forward(request).await,
        }
    }
}

fn sre_trigger(ratio: SuccessRatio, name: &str, now: Instant) -> Result<Trigger, BuildError> {
    let defaults = SuccessRatio::default();
    // Kratos treats zero values as "use the default".
    let success = if ratio.success == 0.0 {
        defaults.success
    } else {
        ratio.success
    };
    let request = if ratio.request == 0 {
        defaults.request
    } else {
        ratio.request
    };
    let bucket = if ratio.bucket == 0 {
        defaults.bucket
    } else {
        ratio.bucket
    };
    let window = if ratio.window.is_zero() {
        defaults.window
    } else {
        ratio.window
    };
    if !(success > 0.0 && success <= 1.0) {
        return Err(option_error(
            name,
            "successRatio.success",
            format!("{success} is not within (0, 1]"),
        ));
    }
    let bucket = check_buckets(bucket, window, name, "successRatio")?;
    Ok(Trigger::Sre(SreThrottle::new(
        success, request, window, bucket, now,
    )))
}

fn threshold_settings(
    threshold: &ErrorThreshold,
    name: &str,
) -> Result<ThresholdSettings, BuildError> {
    let percentage = threshold.error_threshold_percentage;
    if !(percentage > 0.0 && percentage <= 100.0) {
        return Err(option_error(
            name,
            "errorThreshold.errorThresholdPercentage",
            format!("{percentage} is not within (0, 100]"),
        ));
    }
    if threshold.reset_timeout.is_zero() {
        return Err(option_error(
            name,
            "errorThreshold.resetTimeout",
            "must be above zero",
        ));
    }
    if threshold.timeout.is_some_and(|timeout| timeout.is_zero()) {
        return Err(option_error(
            name,
            "errorThreshold.timeout",
            "must be above zero",
        ));
    }
    Ok(ThresholdSettings {
        error_percentage: percentage,
        min_requests: threshold.request,
        reset_timeout: threshold.reset_timeout,
        window: threshold.window,
        buckets: check_buckets(threshold.bucket, threshold.window, name, "errorThreshold")?,
    })
}

fn check_buckets(
    bucket: u64,
    window: Duration,
    name: &str,
    trigger: &str,
) -> Result<usize, BuildError> {
    if window.is_zero() {
        return Err(option_error(
            name,
            &format!("{trigger}.window"),
            "must be above zero",
        ));
    }
    if bucket == 0 || bucket > 1000 {
        return Err(option_error(
            name,
            &format!("{trigger}.bucket"),
            format!("{bucket} is not within 1-1000"),
        ));
    }
    Ok(bucket as usize)
}

fn static_response(data: &ResponseData, name: &str) -> Result<OpenAction, BuildError> {
    let status = match data.status_code {
        0 => StatusCode::SERVICE_UNAVAILABLE,
        code => u16::try_from(code)
            .ok()
            .filter(|code| (100..=599).contains(code))
            .and_then(|code| StatusCode::from_u16(code).ok())
            .ok_or_else(|| {
                option_error(
                    name,
                    "responseData.statusCode",
                    format!("{code} is not within 100-599"),
                )
            })?,
    };
    let mut headers = HeaderMap::new();
    for (index, entry) in data.header.iter().enumerate() {
        let field = format!("responseData.header[{index}]");
        let header = HeaderName::try_from(entry.key.as_str()).map_err(|_| {
            option_error(
                name,
                &format!("{field}.key"),
                format!("invalid header name {:?}", entry.key),
            )
        })?;
        for value in &entry.value {
            let value = HeaderValue::try_from(value.as_str()).map_err(|_| {
                option_error(
                    name,
                    &format!("{field}.value"),
                    format!("invalid header value {value:?}"),
                )
            })?;
            headers.append(header.clone(), value);
        }
    }
    let body = match &data.body_text {
        Some(_) if !data.body.is_empty() => {
            return Err(option_error(
                name,
                "responseData.bodyText",
                "set only one of body and bodyText",
            ));
        }
        Some(text) => Bytes::from(text.clone()),
        None => Bytes::from(decode_protojson_bytes(&data.body).ok_or_else(|| {
            option_error(
                name,
                "responseData.body",
                "not base64 (protojson bytes); write plain text in bodyText",
            )
        })?),
    };
    Ok(OpenAction::Respond {
        status,
        headers,
        body,
    })
}

/// protojson accepts standard and URL-safe base64, padded or not.
fn decode_protojson_bytes(text: &str) -> Option<Vec<u8>> {
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    [STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD]
        .iter()
        .find_map(|engine| engine.decode(text).ok())
}

/// The breaker service: see the module docs.
#[derive(Clone)]
pub struct CircuitBreaker<S> {
    inner: S,
    breaker: Arc<Breaker>,
}

/// Response future of [`CircuitBreaker`].
pub type ResponseFuture = Pin<Box<dyn Future<Output = Result<Response<Body>, BoxError>> + Send>>;

impl<S> Service<Request<Body>> for CircuitBreaker<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = BoxError> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let breaker = self.breaker.clone();
        let admission = breaker.trigger.admit(Instant::now());
        if admission == Admission::Denied {
            breaker.trigger.record_denied(Instant::now());
            breaker.denied.inc();
            return Box::pin(async move { breaker.when_open(request).await });
        }
        // The readied service takes this request; the clone stays for the next one.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let outcome = Outcome {
            breaker: breaker.clone(),
            admission,
            reported: false,
        };
        // Boxed before the async block: naming `S::Future` inside it trips rustc's
        // higher-ranked `Send` check.
        let call: ResponseFuture = Box::pin(inner.call(request));
        Box::pin(async move {
            let result = match breaker.attempt_timeout {
                Some(limit) => match tokio::time::timeout(limit, call).await {
                    Ok(result) => result,
                    Err(elapsed) => Err(BoxError::from(elapsed)),
                },
                None => call.await,
            };
            let success = result
                .as_ref()
                .is_ok_and(|response| breaker.is_success(response));
            outcome.report(success);
            result
        })
    }
}

/// Reports an admitted attempt's outcome; a half-open probe dropped before it ended (the
/// client went away) hands the probe to the next request instead of deciding anything.
struct Outcome {
    breaker: Arc<Breaker>,
    admission: Admission,
    reported: bool,
}

impl Outcome {
    fn report(mut self, success: bool) {
        self.reported = true;
        let endpoint = self.breaker.endpoint.as_str();
        match self
            .breaker
            .trigger
            .record(self.admission, success, Instant::now())
        {
            Some(BreakerState::Open) => tracing::warn!(endpoint, "circuit breaker opened"),
            Some(BreakerState::Closed) => tracing::info!(endpoint, "circuit breaker closed"),
            Some(BreakerState::HalfOpen) | None => {}
        }
    }
}

impl Drop for Outcome {
    fn drop(&mut self) {
        if !self.reported && self.admission == Admission::Probe {
            if let Trigger::Threshold(breaker) = &self.breaker.trigger {
                breaker.cancel_probe();
            }
        }
    }
}

#[cfg(test)]
mod tests;

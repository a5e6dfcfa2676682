//! `circuitbreaker`: stops sending requests to an upstream that keeps failing, and answers
//! them from a static response or backup backends instead (Kratos' `circuitbreaker`,
//! same YAML shape, plus a classic `errorThreshold` trigger).
//!
//! Each attempt passes the trigger (see [`trigger`]): `successRatio` (Google SRE adaptive
//! throttling, the default), `ratio` (Kratos' static share) or `errorThreshold` (closed /
//! open / half-open). An admitted attempt goes on and its outcome is recorded: a success
//! is a response matching one of `assertConditions` (default: any status below 500);
//! transport errors, and attempts cut by `errorThreshold.timeout`, are failures. A
//! rejected attempt never reaches the upstream: it is forwarded to `backupService` (see
//! [`backup`]), or refused with [`Reason::BreakerOpen`] (`503`, or the status, headers
//! and body of `responseData`); it counts in the proxy's
//! `go_gateway_middleware_denied_total{middleware="circuitbreaker",reason="breaker_open"}`.
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
use http::{Request, Response, StatusCode};
use tokio::time::Instant;
use tower::Service;

use self::backup::Backup;
pub use self::layer::CircuitBreakerLayer;
pub use self::options::CircuitBreakerOptions;
use self::options::{ErrorThreshold, ResponseData, SuccessRatio};
use self::trigger::{
    Admission, BreakerState, RatioGate, SreThrottle, ThresholdBreaker, ThresholdSettings, Trigger,
};
use super::support::{decode, option_error};
use middleware::denials::DenialCounter;
use middleware::{
    Body, BoxError, BuildContext, BuildError, EndpointInfo, Factory, Middleware, Reason, Rejection,
};

/// The name this middleware is registered under and counted as.
pub const NAME: &str = "circuitbreaker";

/// The `circuitbreaker` factory; `backupService` clients are built with `clients`.
pub fn factory(clients: client::Factory) -> impl Factory {
    move |config: &configs::Middleware, ctx: &BuildContext| build(config, ctx, &clients)
}

/// Builds `circuitbreaker` from its config entry; closing it closes the backup client.
fn build(
    config: &configs::Middleware,
    ctx: &BuildContext,
    clients: &client::Factory,
) -> Result<Middleware, BuildError> {
    let options: CircuitBreakerOptions = decode(config)?;
    let denied = ctx.denial_counter(NAME, "breaker_open");
    let breaker = Breaker::new(&options, &config.name, &ctx.endpoint, denied, clients)?;
    let backup = match &breaker.when_open {
        OpenAction::Backup(backup) => Some(backup.clone()),
        OpenAction::Reject(_) => None,
    };
    let middleware =
        Middleware::from_layer(&config.name, CircuitBreakerLayer::new(Arc::new(breaker)));
    Ok(match backup {
        Some(backup) => middleware.with_closer(move || backup.close()),
        None => middleware,
    })
}

/// A breaker's configuration and state, shared by all clones of its service.
pub struct Breaker {
    trigger: Trigger,
    attempt_timeout: Option<Duration>,
    success_conditions: Vec<configs::Condition>,
    when_open: OpenAction,
    denied: DenialCounter,
    endpoint: String,
}

enum OpenAction {
    /// Refuse with this (cloned per request).
    Reject(Rejection),
    Backup(Backup),
}

impl Breaker {
    /// Checks `options` (`name` is the middleware's configured name, for errors) and builds
    /// a closed breaker for `endpoint`, counting rejected attempts in `denied`; a
    /// `backupService` client is built with `clients`.
    pub fn new(
        options: &CircuitBreakerOptions,
        name: &str,
        endpoint: &EndpointInfo,
        denied: DenialCounter,
        clients: &client::Factory,
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
                Backup::new(clients, &backup_name(endpoint), &backup.endpoint)
                    .map_err(|(field, message)| option_error(name, &field, message))?,
            ),
            (None, None) => OpenAction::Reject(open_rejection()),
        };
        Ok(Self {
            trigger,
            attempt_timeout,
            success_conditions: options.assert_conditions.clone(),
            when_open,
            denied,
            endpoint: endpoint.path.clone(),
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

    /// The answer to an attempt the trigger rejected.
    fn when_open(&self, request: Request<Body>) -> ResponseFuture {
        match &self.when_open {
            OpenAction::Reject(rejection) => {
                let response = rejection.clone().into_response();
                Box::pin(std::future::ready(Ok(response)))
            }
            OpenAction::Backup(backup) => backup.forward(request),
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
    let mut rejection = open_rejection().with_status(status);
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
            rejection = rejection.with_header(header.clone(), value);
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
    Ok(OpenAction::Reject(rejection.with_body(body)))
}

/// Names the backup client of `endpoint` in logs and debug views, like the proxy names
/// endpoint clients (`GET /api/* backupService`).
fn backup_name(endpoint: &EndpointInfo) -> String {
    let method = match endpoint.method.as_str() {
        "" => "*",
        method => method,
    };
    format!("{method} {}{} backupService", endpoint.host, endpoint.path)
}

/// The rejection of an open breaker, before `responseData` is applied.
fn open_rejection() -> Rejection {
    Rejection::new(Reason::BreakerOpen, "circuit breaker is open")
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
            return breaker.when_open(request);
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

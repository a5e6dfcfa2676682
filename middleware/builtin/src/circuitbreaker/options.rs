//! Options of `circuitbreaker`, in the shape of Kratos'
//! `gateway.middleware.circuitbreaker.v1.CircuitBreaker` plus the `errorThreshold` trigger.

use std::time::Duration;

use serde::Deserialize;
use serde::de::Deserializer;

use super::super::support::{duration, lenient_f64, lenient_u64, one_or_many, opt_duration};

/// Options of `circuitbreaker`. At most one trigger (`successRatio`, `ratio`,
/// `errorThreshold`) and at most one action (`responseData`, `backupService`).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct CircuitBreakerOptions {
    /// Google SRE adaptive throttling. Default: this trigger with its defaults when no
    /// trigger is configured.
    #[serde(alias = "success_ratio")]
    pub success_ratio: Option<SuccessRatio>,
    /// Kratos' static trigger: let `ratio` requests in 10,000 through (the rest get the open
    /// action). Default: unset.
    #[serde(deserialize_with = "opt_lenient_u64")]
    pub ratio: Option<u64>,
    /// Classic closed / open / half-open breaker (our extension). Default: unset.
    #[serde(alias = "error_threshold")]
    pub error_threshold: Option<ErrorThreshold>,
    /// The status, headers and body of the answer while the breaker is open. Default:
    /// unset (`503` with the proxy's text).
    #[serde(alias = "response_data")]
    pub response_data: Option<ResponseData>,
    /// Backends that answer while the breaker is open. Default: unset.
    #[serde(alias = "backup_service")]
    pub backup_service: Option<BackupService>,
    /// What counts as a success: a response matching any of these conditions. Default:
    /// empty, meaning every response below 500 is a success; transport errors and
    /// timeouts are always failures. Kratos spells it `assertCondtions`; both are accepted.
    #[serde(
        alias = "assertCondtions",
        alias = "assert_conditions",
        alias = "assert_condtions"
    )]
    pub assert_conditions: Vec<configs::Condition>,
}

/// Google SRE adaptive throttling (Kratos' `SuccessRatio`). Zero values mean the default,
/// as in Kratos.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct SuccessRatio {
    /// The success ratio the upstream should keep, in (0, 1]; `k = 1 / success`.
    /// Default: 0.6.
    #[serde(deserialize_with = "lenient_f64")]
    pub success: f64,
    /// Requests the window must hold before any is rejected. Default: 100.
    #[serde(deserialize_with = "lenient_u64")]
    pub request: u64,
    /// Buckets the window is split into. Default: 10.
    #[serde(deserialize_with = "lenient_u64")]
    pub bucket: u64,
    /// Length of the rolling window. Default: `3s`.
    #[serde(deserialize_with = "duration")]
    pub window: Duration,
}

impl Default for SuccessRatio {
    fn default() -> Self {
        Self {
            success: 0.6,
            request: 100,
            bucket: 10,
            window: Duration::from_secs(3),
        }
    }
}

/// The classic breaker: opens when too many attempts fail, probes after `resetTimeout`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct ErrorThreshold {
    /// Failure percentage in the window, in (0, 100], that opens the breaker. Default: 50.
    #[serde(deserialize_with = "lenient_f64", alias = "error_threshold_percentage")]
    pub error_threshold_percentage: f64,
    /// Attempts the window must hold before the percentage is looked at. Default: 20.
    #[serde(deserialize_with = "lenient_u64")]
    pub request: u64,
    /// Length of the rolling window. Default: `10s`.
    #[serde(deserialize_with = "duration")]
    pub window: Duration,
    /// Buckets the window is split into. Default: 10.
    #[serde(deserialize_with = "lenient_u64")]
    pub bucket: u64,
    /// How long the breaker stays open before one probe request is let through.
    /// Default: `5s`.
    #[serde(deserialize_with = "duration", alias = "reset_timeout")]
    pub reset_timeout: Duration,
    /// Deadline of each attempt through the breaker; an attempt that takes longer is cut
    /// (the client gets 504) and counts as a failure. Default: unset (no deadline).
    #[serde(deserialize_with = "opt_duration")]
    pub timeout: Option<Duration>,
}

impl Default for ErrorThreshold {
    fn default() -> Self {
        Self {
            error_threshold_percentage: 50.0,
            request: 20,
            window: Duration::from_secs(10),
            bucket: 10,
            reset_timeout: Duration::from_secs(5),
            timeout: None,
        }
    }
}

/// The response sent while the breaker is open (Kratos' `ResponseData`).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct ResponseData {
    /// Status code. Default: 0, meaning 503.
    #[serde(deserialize_with = "lenient_u64", alias = "status_code")]
    pub status_code: u64,
    /// Response headers, each `{key, value: [..]}`. Default: none.
    #[serde(alias = "headers")]
    pub header: Vec<HeaderEntry>,
    /// Body as protojson writes `bytes`: base64. Default: empty.
    pub body: String,
    /// Body as plain text (our extension; instead of `body`). Default: unset.
    #[serde(alias = "body_text")]
    pub body_text: Option<String>,
}

/// One response header of [`ResponseData`].
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HeaderEntry {
    /// Header name. Default: empty (rejected).
    pub key: String,
    /// Header values: a list, or one string. Default: none.
    #[serde(deserialize_with = "one_or_many")]
    pub value: Vec<String>,
}

/// Backends that answer while the breaker is open (Kratos' `BackupService`).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackupService {
    /// An endpoint whose `backends` (any target form: `host:port`, `http(s)://host:port`,
    /// `discovery:///name`), `selector` and `protocol` are used; its other fields are
    /// ignored, and `tlsConfigName` is not supported here. Default: no backends (an error).
    pub endpoint: configs::Endpoint,
}

fn opt_lenient_u64<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<u64>, D::Error> {
    lenient_u64(deserializer).map(Some)
}

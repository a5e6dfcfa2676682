//! The config model: one struct per message of go-kratos/gateway's `gateway.proto`.
//!
//! Every field is optional and accepts its camelCase name (what protojson and Kratos files
//! use) as well as its snake_case name. Unknown fields are an error, so a typo never silently
//! does nothing. Serialization writes camelCase, durations as Go strings (`"1s"`), and status
//! ranges as `"502-504"`, so `serde_json::to_value(&gateway)` reads like the YAML it came from.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

use crate::duration::serde_opt as opt_duration;

/// A whole gateway config file (`Gateway` in Kratos' proto).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct Gateway {
    /// Name of this gateway config, informational.
    pub name: String,
    /// Version of this config, shown by `/debug/config/version`.
    pub version: String,
    /// Deprecated in Kratos and ignored; accepted so old files still load.
    pub hosts: Vec<String>,
    /// The routes, matched by path, method and host.
    pub endpoints: Vec<Endpoint>,
    /// Global middlewares: they wrap every endpoint's own middlewares (first = outermost).
    pub middlewares: Vec<Middleware>,
    /// Named TLS client settings that backends refer to with `tlsConfigName`.
    #[serde(alias = "tls_store")]
    pub tls_store: BTreeMap<String, Tls>,
}

/// TLS client settings for talking to backends; certificates and keys are PEM text.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct Tls {
    /// Skip verification of the server certificate.
    pub insecure: bool,
    /// PEM CA certificates that verify the server (empty: system roots).
    pub cacert: String,
    /// PEM client certificate for mutual TLS.
    pub cert: String,
    /// PEM private key of `cert`.
    pub key: String,
    /// SNI and verification name (empty: the target's host).
    #[serde(alias = "server_name")]
    pub server_name: String,
}

/// Wire protocol spoken with an endpoint's backends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// HTTP/1.1 (the default; `UNSPECIFIED` in a file means this too).
    #[default]
    Http,
    /// gRPC over HTTP/2 (h2c, or h2 over TLS).
    Grpc,
}

impl Protocol {
    /// The name used in config files: `"HTTP"` or `"GRPC"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http => "HTTP",
            Protocol::Grpc => "GRPC",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Protocol {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Protocol {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ProtocolVisitor;

        impl Visitor<'_> for ProtocolVisitor {
            type Value = Protocol;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a protocol: HTTP or GRPC")
            }

            fn visit_str<E: de::Error>(self, text: &str) -> Result<Protocol, E> {
                // protojson accepts the enum names (and numbers, below); we also accept
                // lowercase, since "http" is an obvious thing to write.
                match text.to_ascii_uppercase().as_str() {
                    "" | "UNSPECIFIED" | "HTTP" => Ok(Protocol::Http),
                    "GRPC" => Ok(Protocol::Grpc),
                    _ => Err(E::custom(format!(
                        "unknown protocol {text:?}, expected HTTP or GRPC"
                    ))),
                }
            }

            fn visit_u64<E: de::Error>(self, number: u64) -> Result<Protocol, E> {
                match number {
                    0 | 1 => Ok(Protocol::Http),
                    2 => Ok(Protocol::Grpc),
                    _ => Err(E::custom(format!(
                        "unknown protocol {number}, expected HTTP or GRPC"
                    ))),
                }
            }

            fn visit_i64<E: de::Error>(self, number: i64) -> Result<Protocol, E> {
                match u64::try_from(number) {
                    Ok(number) => self.visit_u64(number),
                    Err(_) => Err(E::custom(format!(
                        "unknown protocol {number}, expected HTTP or GRPC"
                    ))),
                }
            }
        }

        deserializer.deserialize_any(ProtocolVisitor)
    }
}

/// A route: requests matching `path`, `method` and `host` go through `middlewares` to one of
/// `backends`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct Endpoint {
    /// Path pattern: exact `/a/b`, prefix `/a/*`, restful `/a/{name}` or `/a/{name:[a-z]+}`.
    pub path: String,
    /// HTTP method (case-insensitive); empty matches any method.
    pub method: String,
    /// Free text for operators.
    pub description: String,
    /// Protocol spoken with the backends.
    pub protocol: Protocol,
    /// Deadline for the whole request, retries included (None: no deadline).
    #[serde(with = "opt_duration", skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
    /// Endpoint middlewares, inside the global ones (first = outermost).
    pub middlewares: Vec<Middleware>,
    /// Where requests go: direct `host:port` nodes or `discovery:///name` services.
    pub backends: Vec<Backend>,
    /// Retry policy (None: one attempt).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry: Option<Retry>,
    /// Free-form labels; `service` and `basePath` feed metric labels.
    pub metadata: BTreeMap<String, String>,
    /// Host to match (the `Host` header without port); empty matches any host.
    pub host: String,
    /// Load-balancing algorithm: `p2c` (default when empty), `wrr` or `random`.
    /// An extension of ours, not in the Kratos proto.
    pub selector: String,
    /// Request headers that must all match (extension): such an endpoint is tried before
    /// one without matchers on the same path, method and host.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<Matcher>,
    /// Query parameters (percent-decoded) that must all match (extension), as `headers`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub query: Vec<Matcher>,
}

/// One header or query condition of an endpoint: exactly one of `value`, `regex` and
/// `present: true`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Matcher {
    /// Header name (case-insensitive) or query parameter name (exact).
    pub name: String,
    /// Some value equals this exactly.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// Some value matches this regex whole (anchored like path constraints).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub regex: Option<String>,
    /// `true`: the header or parameter is there, with any value.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub present: Option<bool>,
}

/// A middleware reference: which factory builds it and the options it gets.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct Middleware {
    /// Registered middleware name, e.g. `logging`, `rewrite`, `cors`.
    pub name: String,
    /// The middleware's options as JSON; `Null` when absent. Kratos files carry an `@type`
    /// key here, which middleware factories should ignore.
    #[serde(skip_serializing_if = "serde_json::Value::is_null")]
    pub options: serde_json::Value,
    /// When true, failing to build this middleware fails the whole config update instead
    /// of skipping the middleware.
    pub required: bool,
}

/// One backend of an endpoint.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct Backend {
    /// `host:port`, `http(s)://host:port`, or `discovery:///service-name`.
    pub target: String,
    /// Balancing weight for `wrr`, 1 to 4294967295 (None: the node's own weight, default
    /// 10). protojson writes it as a string, so `"10"` and `10` are both accepted.
    #[serde(
        deserialize_with = "de_opt_i64",
        skip_serializing_if = "Option::is_none"
    )]
    pub weight: Option<i64>,
    /// Kratos health-check settings; accepted, carries no options yet.
    #[serde(alias = "health_check", skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheck>,
    /// Talk TLS to this backend.
    pub tls: bool,
    /// Name of the `tlsStore` entry to use for TLS (empty: defaults).
    #[serde(alias = "tls_config_name")]
    pub tls_config_name: String,
    /// Free-form labels for this backend's nodes.
    pub metadata: BTreeMap<String, String>,
}

/// Kratos' (empty) health-check message; present so Kratos files with `healthCheck: {}` load.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {}

/// When and how often a request is retried.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct Retry {
    /// Total attempts including the first (default 1: no retry); validation refuses 0.
    /// Accepts `"3"` too.
    #[serde(deserialize_with = "de_u32")]
    pub attempts: u32,
    /// Deadline for each attempt (None: only the endpoint `timeout` applies).
    #[serde(
        alias = "per_try_timeout",
        with = "opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub per_try_timeout: Option<Duration>,
    /// Responses that count as failed and are retried (transport errors always are).
    pub conditions: Vec<Condition>,
    /// Kratos' node priority groups (e.g. `primary`, `secondary`); accepted, not acted on.
    pub priorities: Vec<String>,
}

impl Default for Retry {
    fn default() -> Self {
        Self {
            attempts: 1,
            per_try_timeout: None,
            conditions: Vec::new(),
            priorities: Vec::new(),
        }
    }
}

/// A retry condition: exactly one of `by_status_code` or `by_header` is set.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct Condition {
    /// Retry when the response status is in this range, written `"502-504"` or `"429"`.
    #[serde(alias = "by_status_code", skip_serializing_if = "Option::is_none")]
    pub by_status_code: Option<StatusRange>,
    /// Retry when a response header has one of the given values.
    #[serde(alias = "by_header", skip_serializing_if = "Option::is_none")]
    pub by_header: Option<HeaderCondition>,
}

/// An inclusive range of HTTP status codes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct StatusRange {
    /// First status in the range.
    pub from: u16,
    /// Last status in the range (equal to `from` for a single code).
    pub to: u16,
}

/// Why a status range string was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid status code range {input:?}: {reason}")]
pub struct StatusRangeError {
    input: String,
    reason: &'static str,
}

impl StatusRange {
    /// Whether `code` is within the range (inclusive on both ends).
    pub fn contains(&self, code: u16) -> bool {
        (self.from..=self.to).contains(&code)
    }

    /// Checks that both ends are HTTP status codes (100-599) and `from <= to`.
    pub fn check(&self) -> Result<(), StatusRangeError> {
        let error = |reason| StatusRangeError {
            input: self.to_string(),
            reason,
        };
        if !(100..=599).contains(&self.from) || !(100..=599).contains(&self.to) {
            return Err(error("status codes must be within 100-599"));
        }
        if self.from > self.to {
            return Err(error("the start is after the end"));
        }
        Ok(())
    }

    /// Parses `"502-504"` or `"429"` and checks the result.
    pub fn parse(text: &str) -> Result<Self, StatusRangeError> {
        let error = |reason| StatusRangeError {
            input: text.to_owned(),
            reason,
        };
        let number = |part: &str| {
            let part = part.trim();
            if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                return Err(error(
                    "expected a status code like \"429\" or a range like \"502-504\"",
                ));
            }
            part.parse::<u16>()
                .map_err(|_| error("status codes must be within 100-599"))
        };
        let range = match text.split_once('-') {
            Some((from, to)) => StatusRange {
                from: number(from)?,
                to: number(to)?,
            },
            None => {
                let code = number(text)?;
                StatusRange {
                    from: code,
                    to: code,
                }
            }
        };
        range.check().map_err(|e| error(e.reason))?;
        Ok(range)
    }
}

impl fmt::Display for StatusRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.from == self.to {
            write!(f, "{}", self.from)
        } else {
            write!(f, "{}-{}", self.from, self.to)
        }
    }
}

impl Serialize for StatusRange {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for StatusRange {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct StatusRangeVisitor;

        impl Visitor<'_> for StatusRangeVisitor {
            type Value = StatusRange;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a status code like \"429\" or a range like \"502-504\"")
            }

            fn visit_str<E: de::Error>(self, text: &str) -> Result<StatusRange, E> {
                StatusRange::parse(text).map_err(E::custom)
            }

            fn visit_u64<E: de::Error>(self, number: u64) -> Result<StatusRange, E> {
                self.visit_str(&number.to_string())
            }

            fn visit_i64<E: de::Error>(self, number: i64) -> Result<StatusRange, E> {
                self.visit_str(&number.to_string())
            }
        }

        deserializer.deserialize_any(StatusRangeVisitor)
    }
}

/// Retry when the response header `name` has `value`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct HeaderCondition {
    /// Header name (case-insensitive), e.g. `Grpc-Status`.
    pub name: String,
    /// One value, or a JSON list of values such as `["14","13"]` (see [`Self::values`]).
    pub value: String,
}

impl HeaderCondition {
    /// The values that trigger a retry: each element when `value` is a JSON list of strings
    /// (Kratos' convention), otherwise `value` itself.
    pub fn values(&self) -> Vec<String> {
        if self.value.trim_start().starts_with('[') {
            if let Ok(list) = serde_json::from_str::<Vec<String>>(&self.value) {
                return list;
            }
        }
        vec![self.value.clone()]
    }
}

/// Reads an optional i64 written as a number or as a decimal string (protojson int64).
fn de_opt_i64<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<i64>, D::Error> {
    struct OptI64Visitor;

    impl<'de> Visitor<'de> for OptI64Visitor {
        type Value = Option<i64>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an integer (or an integer in a string, like \"10\")")
        }

        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_some<D: Deserializer<'de>>(
            self,
            deserializer: D,
        ) -> Result<Self::Value, D::Error> {
            deserializer.deserialize_any(self)
        }

        fn visit_i64<E: de::Error>(self, number: i64) -> Result<Self::Value, E> {
            Ok(Some(number))
        }

        fn visit_u64<E: de::Error>(self, number: u64) -> Result<Self::Value, E> {
            i64::try_from(number)
                .map(Some)
                .map_err(|_| E::custom(format!("integer {number} is too large")))
        }

        fn visit_str<E: de::Error>(self, text: &str) -> Result<Self::Value, E> {
            text.trim()
                .parse()
                .map(Some)
                .map_err(|_| E::custom(format!("invalid integer {text:?}")))
        }
    }

    deserializer.deserialize_option(OptI64Visitor)
}

/// Reads a u32 written as a number or as a decimal string.
fn de_u32<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u32, D::Error> {
    struct U32Visitor;

    impl Visitor<'_> for U32Visitor {
        type Value = u32;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a non-negative integer (or one in a string, like \"3\")")
        }

        fn visit_u64<E: de::Error>(self, number: u64) -> Result<u32, E> {
            u32::try_from(number).map_err(|_| E::custom(format!("integer {number} is too large")))
        }

        fn visit_i64<E: de::Error>(self, number: i64) -> Result<u32, E> {
            u32::try_from(number)
                .map_err(|_| E::custom(format!("expected a non-negative integer, got {number}")))
        }

        fn visit_str<E: de::Error>(self, text: &str) -> Result<u32, E> {
            text.trim()
                .parse()
                .map_err(|_| E::custom(format!("invalid non-negative integer {text:?}")))
        }
    }

    deserializer.deserialize_any(U32Visitor)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn yaml<T: for<'de> Deserialize<'de>>(text: &str) -> Result<T, String> {
        serde_saphyr::from_str(text).map_err(|e| e.to_string())
    }

    #[test]
    fn status_ranges() {
        assert_eq!(
            StatusRange::parse("502-504"),
            Ok(StatusRange { from: 502, to: 504 })
        );
        assert_eq!(
            StatusRange::parse("429"),
            Ok(StatusRange { from: 429, to: 429 })
        );
        assert_eq!(
            StatusRange::parse(" 500 - 599 "),
            Ok(StatusRange { from: 500, to: 599 })
        );
        for (bad, why) in [
            ("", "expected a status code"),
            ("abc", "expected a status code"),
            ("5xx", "expected a status code"),
            ("502-", "expected a status code"),
            ("-1", "expected a status code"),
            ("504-502", "the start is after the end"),
            ("600", "within 100-599"),
            ("99", "within 100-599"),
            ("99999", "within 100-599"),
        ] {
            let error = StatusRange::parse(bad).expect_err(bad).to_string();
            assert!(error.contains(why), "{bad}: {error}");
        }
        let range = StatusRange { from: 502, to: 504 };
        assert!(range.contains(502) && range.contains(504));
        assert!(!range.contains(501) && !range.contains(505));
        assert_eq!(range.to_string(), "502-504");
        assert_eq!(StatusRange { from: 429, to: 429 }.to_string(), "429");
    }

    #[test]
    fn status_range_from_string_or_number() {
        let c: Condition = yaml("byStatusCode: 429").expect("number");
        assert_eq!(c.by_status_code, Some(StatusRange { from: 429, to: 429 }));
        let c: Condition = yaml("by_status_code: '500-599'").expect("string");
        assert_eq!(c.by_status_code, Some(StatusRange { from: 500, to: 599 }));
        let json = serde_json::to_value(&c).expect("json");
        assert_eq!(json, serde_json::json!({"byStatusCode": "500-599"}));
    }

    #[test]
    fn header_values() {
        let single = HeaderCondition {
            name: "Grpc-Status".into(),
            value: "14".into(),
        };
        assert_eq!(single.values(), vec!["14"]);
        let list = HeaderCondition {
            name: "Grpc-Status".into(),
            value: r#"["14","13"]"#.into(),
        };
        assert_eq!(list.values(), vec!["14", "13"]);
        let not_json = HeaderCondition {
            name: "X".into(),
            value: "[oops".into(),
        };
        assert_eq!(not_json.values(), vec!["[oops"]);
    }

    #[test]
    fn integers_as_numbers_or_strings() {
        let b: Backend = yaml("target: a:1\nweight: \"10\"").expect("string weight");
        assert_eq!(b.weight, Some(10));
        let b: Backend = yaml("target: a:1\nweight: 10").expect("number weight");
        assert_eq!(b.weight, Some(10));
        let b: Backend = yaml("target: a:1\nweight: ~").expect("null weight");
        assert_eq!(b.weight, None);
        let b: Backend = yaml("target: a:1").expect("no weight");
        assert_eq!(b.weight, None);
        assert!(yaml::<Backend>("weight: ten").is_err());

        let r: Retry = yaml("attempts: \"3\"").expect("string attempts");
        assert_eq!(r.attempts, 3);
        let r: Retry = yaml("attempts: 3").expect("number attempts");
        assert_eq!(r.attempts, 3);
        assert!(yaml::<Retry>("attempts: -1").is_err());
    }

    #[test]
    fn protocols() {
        for (text, want) in [
            ("HTTP", Protocol::Http),
            ("GRPC", Protocol::Grpc),
            ("UNSPECIFIED", Protocol::Http),
            ("grpc", Protocol::Grpc),
            ("2", Protocol::Grpc),
        ] {
            let e: Endpoint = yaml(&format!("protocol: {text}")).expect(text);
            assert_eq!(e.protocol, want, "{text}");
        }
        let error = yaml::<Endpoint>("protocol: HTTP3").expect_err("HTTP3");
        assert!(error.contains("unknown protocol \"HTTP3\""), "{error}");
        assert_eq!(
            serde_json::to_value(Protocol::Grpc).ok(),
            Some("GRPC".into())
        );
    }

    #[test]
    fn camel_and_snake_keys() {
        let camel: Retry =
            yaml("perTryTimeout: 0.1s\nconditions: [{byHeader: {name: a, value: b}}]")
                .expect("camel");
        let snake: Retry =
            yaml("per_try_timeout: 0.1s\nconditions: [{by_header: {name: a, value: b}}]")
                .expect("snake");
        assert_eq!(camel, snake);
        assert_eq!(camel.per_try_timeout, Some(Duration::from_millis(100)));

        let camel: Backend = yaml("target: a:1\nhealthCheck: {}\ntlsConfigName: x").expect("camel");
        let snake: Backend =
            yaml("target: a:1\nhealth_check: {}\ntls_config_name: x").expect("snake");
        assert_eq!(camel, snake);
        assert_eq!(camel.health_check, Some(HealthCheck {}));

        let camel: Gateway = yaml("tlsStore: {a: {serverName: s}}").expect("camel");
        let snake: Gateway = yaml("tls_store: {a: {server_name: s}}").expect("snake");
        assert_eq!(camel, snake);
        assert_eq!(camel.tls_store["a"].server_name, "s");
    }

    #[test]
    fn options_keep_any_shape() {
        let m: Middleware = yaml(
            "name: cors\noptions:\n  '@type': type.googleapis.com/x\n  allowCredentials: true\n  n: 3\n",
        )
        .expect("options");
        assert_eq!(
            m.options,
            serde_json::json!({"@type": "type.googleapis.com/x", "allowCredentials": true, "n": 3})
        );
        let m: Middleware = yaml("name: logging").expect("no options");
        assert_eq!(m.options, serde_json::Value::Null);
    }

    #[test]
    fn serializes_readable_json() {
        let endpoint = Endpoint {
            path: "/a/*".into(),
            timeout: Some(Duration::from_secs(1)),
            retry: Some(Retry {
                attempts: 2,
                per_try_timeout: Some(Duration::from_millis(300)),
                ..Retry::default()
            }),
            ..Endpoint::default()
        };
        let json = serde_json::to_value(&endpoint).expect("json");
        assert_eq!(json["timeout"], "1s");
        assert_eq!(json["protocol"], "HTTP");
        assert_eq!(json["retry"]["perTryTimeout"], "300ms");
        let back: Endpoint = serde_json::from_value(json).expect("round trip");
        assert_eq!(back, endpoint);
    }
}

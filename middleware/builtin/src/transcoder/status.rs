//! A gRPC status as the JSON body Kratos' transcoder writes: `google.rpc.Status` in
//! protojson, `{"code":5,"message":"...","details":[{"@type":"...", ...}]}`.
//!
//! The message comes from `tonic-types` (decoded with prost); each detail, a
//! `google.protobuf.Any`, is written as protojson through prost-reflect when its type is in
//! the descriptor pool: the well-known types and every `google.rpc` error detail
//! (`ErrorInfo`, `BadRequest`, `RetryInfo`, ...), whose descriptors `tonic-types` ships. A
//! detail of any other type cannot be decoded without its schema; it is written as
//! `{"@type": URL, "value": BASE64}` (its raw bytes) instead of failing the response.

use std::sync::LazyLock;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
use http::HeaderMap;
use prost::Message as _;
use prost_reflect::{DescriptorPool, DynamicMessage};

/// The upstream's gRPC status could not be read.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    /// `grpc-status` is missing or not a number (the upstream did not answer as gRPC).
    #[error("upstream answered without a valid grpc-status (HTTP {http_status}): {value:?}")]
    BadCode {
        /// The upstream's HTTP status.
        http_status: u16,
        /// The `grpc-status` value as received (empty when missing).
        value: String,
    },
    /// `grpc-status-details-bin` is not base64.
    #[error("grpc-status-details-bin is not base64: {0}")]
    DetailsEncoding(#[from] base64::DecodeError),
    /// `grpc-status-details-bin` is not a `google.rpc.Status`.
    #[error("grpc-status-details-bin is not a google.rpc.Status: {0}")]
    DetailsMessage(#[from] prost::DecodeError),
}

/// The well-known types and the `google.rpc` messages; `None` if the shipped descriptors
/// did not load (every detail is then written as raw bytes).
static POOL: LazyLock<Option<DescriptorPool>> = LazyLock::new(|| {
    let mut pool = DescriptorPool::global();
    match pool.decode_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET) {
        Ok(()) => Some(pool),
        Err(error) => {
            tracing::warn!(%error, "transcoder: google.rpc descriptors did not load; details are written as raw bytes");
            None
        }
    }
});

/// Loads the descriptor pool now (so the first error response does not pay for it).
pub(super) fn preload() {
    LazyLock::force(&POOL);
}

/// The gRPC status a response carries (after its trailers were folded into `headers`):
/// `None` for `grpc-status: 0`, otherwise the `google.rpc.Status` it stands for.
///
/// As Kratos: the code is `grpc-status` and the message `grpc-message` as received (not
/// percent-decoded); when `grpc-status-details-bin` is present, the `google.rpc.Status` it
/// holds replaces both (its message is the server's text, unencoded).
pub(super) fn from_headers(
    headers: &HeaderMap,
    http_status: u16,
) -> Result<Option<tonic_types::Status>, StatusError> {
    let raw = headers
        .get("grpc-status")
        .map(|value| value.as_bytes())
        .unwrap_or_default();
    if raw == b"0" {
        return Ok(None);
    }
    let code = std::str::from_utf8(raw)
        .ok()
        .and_then(|text| text.parse::<i32>().ok())
        .ok_or_else(|| StatusError::BadCode {
            http_status,
            value: String::from_utf8_lossy(raw).into_owned(),
        })?;
    if let Some(details) = headers
        .get("grpc-status-details-bin")
        .filter(|value| !value.is_empty())
    {
        let bytes = decode_bin_header(details.as_bytes())?;
        return Ok(Some(tonic_types::Status::decode(bytes.as_slice())?));
    }
    let message = headers
        .get("grpc-message")
        .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned())
        .unwrap_or_default();
    Ok(Some(tonic_types::Status {
        code,
        message,
        details: Vec::new(),
    }))
}

/// A `-bin` header value: base64, padded or not (gRPC allows both).
fn decode_bin_header(value: &[u8]) -> Result<Vec<u8>, base64::DecodeError> {
    if value.len().is_multiple_of(4) {
        STANDARD.decode(value)
    } else {
        STANDARD_NO_PAD.decode(value)
    }
}

/// `status` as protojson: fields at their default (code 0, empty message, no details) are
/// left out, as protojson does.
pub(super) fn to_json(status: &tonic_types::Status) -> String {
    let mut fields = Vec::with_capacity(3);
    if status.code != 0 {
        fields.push(format!("\"code\":{}", status.code));
    }
    if !status.message.is_empty() {
        fields.push(format!("\"message\":{}", json_string(&status.message)));
    }
    if !status.details.is_empty() {
        let details: Vec<String> = status.details.iter().map(any_to_json).collect();
        fields.push(format!("\"details\":[{}]", details.join(",")));
    }
    format!("{{{}}}", fields.join(","))
}

/// One detail: protojson when its type is known, else `@type` and the base64 `value`.
fn any_to_json(any: &prost_types::Any) -> String {
    known_any_to_json(any).unwrap_or_else(|| {
        let raw = serde_json::json!({
            "@type": any.type_url,
            "value": STANDARD.encode(&any.value),
        });
        raw.to_string()
    })
}

fn known_any_to_json(any: &prost_types::Any) -> Option<String> {
    let pool = POOL.as_ref()?;
    let name = any.type_url.rsplit('/').next()?;
    // Checked first so an unknown type never reaches the serializer's error path.
    pool.get_message_by_name(name)?;
    let descriptor = pool.get_message_by_name("google.protobuf.Any")?;
    let message = DynamicMessage::decode(descriptor, any.encode_to_vec().as_slice()).ok()?;
    serde_json::to_string(&message).ok()
}

fn json_string(text: &str) -> String {
    serde_json::Value::from(text).to_string()
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;
    use prost::Message as _;

    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.append(*name, HeaderValue::from_str(value).expect("value"));
        }
        headers
    }

    fn any<M: prost::Message>(type_name: &str, message: &M) -> prost_types::Any {
        prost_types::Any {
            type_url: format!("type.googleapis.com/{type_name}"),
            value: message.encode_to_vec(),
        }
    }

    #[test]
    fn status_zero_is_no_error() {
        let status = from_headers(&headers(&[("grpc-status", "0")]), 200).expect("reads");
        assert!(status.is_none());
    }

    #[test]
    fn message_is_kept_as_received_without_details() {
        let status = from_headers(
            &headers(&[("grpc-status", "5"), ("grpc-message", "caf%C3%A9 gone")]),
            200,
        )
        .expect("reads")
        .expect("an error");
        assert_eq!(status.code, 5);
        assert_eq!(status.message, "caf%C3%A9 gone");
        assert_eq!(to_json(&status), r#"{"code":5,"message":"caf%C3%A9 gone"}"#);
    }

    #[test]
    fn details_replace_code_and_message_and_are_written_as_protojson() {
        let info = tonic_types::pb::ErrorInfo {
            reason: "USER_NOT_FOUND".into(),
            domain: "example.com".into(),
            metadata: [("id".to_owned(), "42".to_owned())].into(),
        };
        let retry = tonic_types::pb::RetryInfo {
            retry_delay: Some(prost_types::Duration {
                seconds: 1,
                nanos: 500_000_000,
            }),
        };
        let status = tonic_types::Status {
            code: 5,
            message: "café gone".into(),
            details: vec![
                any("google.rpc.ErrorInfo", &info),
                any("google.rpc.RetryInfo", &retry),
            ],
        };
        for encode in [
            STANDARD.encode(status.encode_to_vec()),
            STANDARD_NO_PAD.encode(status.encode_to_vec()),
        ] {
            let read = from_headers(
                &headers(&[
                    ("grpc-status", "13"),
                    ("grpc-message", "caf%C3%A9"),
                    ("grpc-status-details-bin", &encode),
                ]),
                200,
            )
            .expect("reads")
            .expect("an error");
            assert_eq!(read, status);
        }
        let json: serde_json::Value = serde_json::from_str(&to_json(&status)).expect("JSON");
        assert_eq!(
            json,
            serde_json::json!({
                "code": 5,
                "message": "café gone",
                "details": [
                    {
                        "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                        "reason": "USER_NOT_FOUND",
                        "domain": "example.com",
                        "metadata": {"id": "42"},
                    },
                    {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "1.500s"},
                ],
            })
        );
        // protojson's field order: @type first, then the fields by number.
        assert!(to_json(&status).contains(
            r#"{"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":"USER_NOT_FOUND","domain":"example.com""#
        ));
    }

    #[test]
    fn unknown_detail_types_are_written_as_raw_bytes() {
        let status = tonic_types::Status {
            code: 3,
            message: String::new(),
            details: vec![prost_types::Any {
                type_url: "type.googleapis.com/acme.v1.Quirk".into(),
                value: vec![8, 1],
            }],
        };
        assert_eq!(
            to_json(&status),
            r#"{"code":3,"details":[{"@type":"type.googleapis.com/acme.v1.Quirk","value":"CAE="}]}"#
        );
    }

    #[test]
    fn bad_status_headers_are_errors() {
        for (pairs, expected) in [
            (vec![], "without a valid grpc-status (HTTP 404): \"\""),
            (vec![("grpc-status", "five")], "\"five\""),
            (
                vec![("grpc-status", "5"), ("grpc-status-details-bin", "!!!")],
                "not base64",
            ),
            (
                vec![("grpc-status", "5"), ("grpc-status-details-bin", "/w")],
                "not a google.rpc.Status",
            ),
        ] {
            let error = from_headers(&headers(&pairs), 404).expect_err("bad");
            assert!(error.to_string().contains(expected), "{error}");
        }
    }
}

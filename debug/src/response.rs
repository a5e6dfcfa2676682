//! What a debug view answers: a status, a content type and a body held in full.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::Full;
use serde::Serialize;

/// `application/json`, the content type of every JSON view.
pub const JSON: &str = "application/json";

/// One answer of a debug view. Debug answers are small (or, for profiles, produced in one
/// piece), so the body is held in full.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DebugResponse {
    /// HTTP status.
    pub status: StatusCode,
    /// Value of the `Content-Type` header.
    pub content_type: &'static str,
    /// The body.
    pub body: Bytes,
}

impl DebugResponse {
    /// A response with any content type.
    pub fn new(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Self {
        DebugResponse {
            status,
            content_type,
            body: body.into(),
        }
    }

    /// `value` as pretty-printed JSON with `status`.
    pub fn json(status: StatusCode, value: &impl Serialize) -> Self {
        match serde_json::to_vec_pretty(value) {
            Ok(mut body) => {
                body.push(b'\n');
                DebugResponse::new(status, JSON, body)
            }
            Err(error) => DebugResponse::error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot encode the view as JSON: {error}"),
            ),
        }
    }

    /// `value` as JSON with 200 OK.
    pub fn ok(value: &impl Serialize) -> Self {
        DebugResponse::json(StatusCode::OK, value)
    }

    /// `{"error": message}` with `status`.
    pub fn error(status: StatusCode, message: impl Into<String>) -> Self {
        let body = serde_json::json!({ "error": message.into() });
        // A map of one string always encodes.
        let mut bytes = serde_json::to_vec(&body).unwrap_or_default();
        bytes.push(b'\n');
        DebugResponse::new(status, JSON, bytes)
    }

    /// The HTTP response; debug answers are never cached.
    pub fn into_response(self) -> Response<Full<Bytes>> {
        let mut response = Response::new(Full::new(self.body));
        *response.status_mut() = self.status;
        let headers = response.headers_mut();
        let content_type = HeaderValue::from_str(self.content_type)
            .unwrap_or(HeaderValue::from_static("application/octet-stream"));
        headers.insert(header::CONTENT_TYPE, content_type);
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_is_a_json_object() {
        let response = DebugResponse::error(StatusCode::NOT_FOUND, "no \"such\" view");
        assert_eq!(response.content_type, JSON);
        let value: serde_json::Value = serde_json::from_slice(&response.body).unwrap();
        assert_eq!(value, serde_json::json!({"error": "no \"such\" view"}));
    }

    #[test]
    fn into_response_sets_headers() {
        let response =
            DebugResponse::new(StatusCode::IM_A_TEAPOT, "text/plain", "x").into_response();
        assert_eq!(response.status(), StatusCode::IM_A_TEAPOT);
        assert_eq!(response.headers()[header::CONTENT_TYPE], "text/plain");
        assert_eq!(response.headers()[header::CACHE_CONTROL], "no-store");
    }
}

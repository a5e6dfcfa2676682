//! One analytics record and its JSON form.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::Method;
use serde::Serialize;
use time::OffsetDateTime;

use crate::support::Denied;
use middleware::EndpointInfo;
use selector::Node;

/// Who sent the request: the authenticated client's id when an `auth` let it in with
/// one, else the peer's address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Client {
    /// The id an `auth` middleware recorded.
    Id(String),
    /// The TCP peer.
    Ip(IpAddr),
    /// Unknown (no request options).
    Unknown,
}

/// One request as shipped. Cheap to build on the request path: shared parts stay
/// shared; the JSON is written by the shipping task.
#[derive(Debug)]
pub struct Record {
    /// When the request reached the middleware.
    pub time: SystemTime,
    /// The endpoint it matched (its path pattern is the `endpoint` field).
    pub endpoint: Arc<EndpointInfo>,
    /// Request method.
    pub method: Method,
    /// Request path, without the query (queries may carry credentials).
    pub path: String,
    /// The node that answered, if one was picked.
    pub node: Option<Arc<Node>>,
    /// Response status as the middleware saw it (502 for a failed round trip, 499 for one
    /// abandoned before its answer).
    pub status: u16,
    /// From the request reaching the middleware to the end of the response body.
    pub latency: Duration,
    /// Request body bytes read.
    pub rx_bytes: u64,
    /// Response body bytes passed on.
    pub tx_bytes: u64,
    /// Who sent it.
    pub client: Client,
    /// Where a drop of this record is counted (its endpoint's counter).
    pub dropped: Denied,
}

#[derive(Serialize)]
struct Json<'a> {
    time: String,
    endpoint: &'a str,
    method: &'a str,
    path: &'a str,
    node: Option<&'a str>,
    status: u16,
    latency_ms: f64,
    rx_bytes: u64,
    tx_bytes: u64,
    client: Option<String>,
}

impl Record {
    /// Appends the record's JSON object to `out`.
    pub fn write_json(&self, out: &mut Vec<u8>) -> serde_json::Result<()> {
        let json = Json {
            time: rfc3339(self.time),
            endpoint: &self.endpoint.path,
            method: self.method.as_str(),
            path: &self.path,
            node: self.node.as_ref().map(|node| node.address.as_str()),
            status: self.status,
            latency_ms: (self.latency.as_secs_f64() * 1_000_000.0).round() / 1000.0,
            rx_bytes: self.rx_bytes,
            tx_bytes: self.tx_bytes,
            client: match &self.client {
                Client::Id(id) => Some(id.clone()),
                Client::Ip(ip) => Some(ip.to_string()),
                Client::Unknown => None,
            },
        };
        serde_json::to_writer(out, &json)
    }
}

/// `2026-12-01T14:09:36.120Z`: RFC 3339, UTC, always three fraction digits (the `time`
/// crate's `Rfc3339` drops trailing zeros, which makes the field's width vary).
fn rfc3339(time: SystemTime) -> String {
    let time = OffsetDateTime::from(time);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        time.year(),
        u8::from(time.month()),
        time.day(),
        time.hour(),
        time.minute(),
        time.second(),
        time.millisecond()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_json_objects_with_the_documented_fields() {
        let record = Record {
            time: SystemTime::UNIX_EPOCH + Duration::from_millis(1_764_598_176_120),
            endpoint: Arc::new(EndpointInfo {
                path: "/api/*".into(),
                ..Default::default()
            }),
            method: Method::POST,
            path: "/api/orders".into(),
            node: Some(Arc::new(Node::new("10.0.0.1:8080"))),
            status: 201,
            latency: Duration::from_micros(12_345),
            rx_bytes: 5,
            tx_bytes: 1024,
            client: Client::Id("app-1".into()),
            dropped: Denied::default(),
        };
        let mut out = Vec::new();
        record.write_json(&mut out).expect("json");
        let value: serde_json::Value = serde_json::from_slice(&out).expect("valid json");
        assert_eq!(
            value,
            serde_json::json!({
                "time": "2025-12-01T14:09:36.120Z",
                "endpoint": "/api/*",
                "method": "POST",
                "path": "/api/orders",
                "node": "10.0.0.1:8080",
                "status": 201,
                "latency_ms": 12.345,
                "rx_bytes": 5,
                "tx_bytes": 1024,
                "client": "app-1",
            })
        );
    }
}

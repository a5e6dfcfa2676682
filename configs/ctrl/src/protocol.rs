//! Kratos' control-service protocol: the two GET calls, their answers, and a bounded HTTP
//! client for them.

use std::collections::BTreeMap;
use std::error::Error as StdError;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use serde::{Deserialize, Serialize};

/// The release call: `GET {ctrl}/v1/control/gateway/release?gateway=&ip_addr=&last_version=`.
pub const RELEASE_PATH: &str = "/v1/control/gateway/release";
/// The features call: `GET {ctrl}/v1/control/gateway/features?gateway=&ip_addr=`.
pub const FEATURES_PATH: &str = "/v1/control/gateway/features";

/// Answers larger than this are refused (a gateway config of thousands of endpoints is a
/// few MiB).
const MAX_BODY: usize = 32 * 1024 * 1024;
/// Time to open a TCP connection to the control service.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// A 200 answer of the release call (Kratos' `LoadResponse`). Missing fields read as empty,
/// as Go's `json.Unmarshal` leaves them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Release {
    /// The gateway config as JSON text (protojson of Kratos' `Gateway` message).
    #[serde(default)]
    pub config: String,
    /// The version to send back as `last_version`.
    #[serde(default)]
    pub version: String,
    /// Endpoint files for the priority directory (`null` reads as none).
    #[serde(
        default,
        rename = "priorityConfigs",
        deserialize_with = "null_as_empty"
    )]
    pub priority_configs: Vec<PriorityItem>,
}

/// One priority config of a release, written to `{priority-dir}/{key}.yaml`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PriorityItem {
    /// File stem.
    #[serde(default)]
    pub key: String,
    /// Its endpoints, as JSON text.
    #[serde(default)]
    pub config: String,
    /// Its version (sent back in `lastPriorityVersions` with `gw:PriorityConfig`).
    #[serde(default)]
    pub version: String,
}

/// A 200 answer of the features call (Kratos' `LoadFeatureResponse`).
#[derive(Debug, Clone, Default, Deserialize)]
pub(crate) struct FeaturesAnswer {
    #[serde(default, deserialize_with = "null_as_empty")]
    pub(crate) features: BTreeMap<String, bool>,
}

fn null_as_empty<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

/// Why a call to the control service failed; each one moves the gateway to the next URL.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    /// No connection or no answer (refused, reset, DNS, TLS).
    #[error("request failed: {0}")]
    Request(String),
    /// The whole exchange took longer than the timeout.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// Neither 200 nor 304 (Kratos' wording).
    #[error("invalid status code: {0}")]
    Status(u16),
    /// The body could not be read (or was too large).
    #[error("reading the answer: {0}")]
    Body(String),
    /// The answer is not the expected JSON, or its config cannot be written.
    #[error("bad answer: {0}")]
    BadAnswer(String),
}

/// One control-service base URL (`http(s)://host[:port][/prefix]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceUrl {
    text: String,
    scheme: String,
    authority: String,
    prefix: String,
}

impl ServiceUrl {
    /// Parses a base URL; only `http` and `https` with a host are accepted. Its query, if
    /// any, is dropped (the calls set their own, as Kratos does).
    pub fn parse(text: &str) -> Result<Self, String> {
        let uri: Uri = text.trim().parse().map_err(|error| format!("{error}"))?;
        let scheme = match uri.scheme_str() {
            Some(scheme @ ("http" | "https")) => scheme.to_owned(),
            Some(other) => return Err(format!("scheme {other:?} is not http or https")),
            None => return Err("no scheme (want http://HOST:PORT)".to_owned()),
        };
        let authority = match uri.authority() {
            Some(authority) if !authority.host().is_empty() => authority.to_string(),
            _ => return Err("no host".to_owned()),
        };
        Ok(ServiceUrl {
            text: text.trim().to_owned(),
            scheme,
            authority,
            prefix: uri.path().trim_end_matches('/').to_owned(),
        })
    }

    /// The URL as given.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// `{scheme}://{authority}{prefix}{path}?{query}`.
    pub(crate) fn call(&self, path: &str, query: &str) -> Result<Uri, FetchError> {
        format!(
            "{}://{}{}{path}?{query}",
            self.scheme, self.authority, self.prefix
        )
        .parse()
        .map_err(|error| FetchError::Request(format!("bad URL: {error}")))
    }
}

/// The HTTP client of the control-service calls: pooled, HTTP/1.1 over plain TCP or TLS
/// (Mozilla's roots), every exchange bounded.
#[derive(Clone)]
pub(crate) struct HttpClient {
    client: Client<HttpsConnector<HttpConnector>, Empty<Bytes>>,
    timeout: Duration,
}

impl HttpClient {
    /// A client whose exchanges (connect, head and body) each end within `timeout`.
    pub(crate) fn new(timeout: Duration) -> Self {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(CONNECT_TIMEOUT.min(timeout)));
        let roots = rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map(|builder| builder.with_root_certificates(roots).with_no_client_auth())
            .unwrap_or_else(|_| {
                rustls::ClientConfig::builder()
                    .with_root_certificates(rustls::RootCertStore::empty())
                    .with_no_client_auth()
            });
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(1)
            .build(connector);
        HttpClient { client, timeout }
    }

    /// GET `uri`: the status and the whole body.
    pub(crate) async fn get(&self, uri: Uri) -> Result<(StatusCode, Bytes), FetchError> {
        let request = Request::get(uri)
            .header(
                header::USER_AGENT,
                concat!("gateway/", env!("CARGO_PKG_VERSION")),
            )
            .header(header::ACCEPT, "application/json")
            .body(Empty::new())
            .map_err(|error| FetchError::Request(error.to_string()))?;
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|error| FetchError::Request(chain(&error)))?;
            let status = response.status();
            let body = Limited::new(response.into_body(), MAX_BODY)
                .collect()
                .await
                .map_err(|error| FetchError::Body(chain(error.as_ref())))?
                .to_bytes();
            Ok((status, body))
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| FetchError::Timeout(self.timeout))?
    }
}

/// An error and its causes, `a: b: c` (hyper's own message alone says little).
fn chain(error: &(dyn StdError + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_urls_keep_their_prefix_and_drop_their_query() {
        let url = ServiceUrl::parse("http://ctrl.local:8000/api/?x=1").unwrap();
        assert_eq!(
            url.call(RELEASE_PATH, "gateway=a").unwrap().to_string(),
            "http://ctrl.local:8000/api/v1/control/gateway/release?gateway=a"
        );
        let url = ServiceUrl::parse("https://ctrl").unwrap();
        assert_eq!(
            url.call(FEATURES_PATH, "").unwrap().to_string(),
            "https://ctrl/v1/control/gateway/features?"
        );
        assert!(ServiceUrl::parse("ctrl:8000").is_err());
        assert!(ServiceUrl::parse("ftp://ctrl").is_err());
        assert!(ServiceUrl::parse("/just/a/path").is_err());
    }

    #[test]
    fn a_release_reads_like_go_unmarshals_it() {
        let release: Release = serde_json::from_str(
            r#"{"config":"{}","version":"7","priorityConfigs":null,"extra":1}"#,
        )
        .unwrap();
        assert_eq!(release.version, "7");
        assert!(release.priority_configs.is_empty());
        let release: Release = serde_json::from_str(
            r#"{"config":"{}","priorityConfigs":[{"key":"k","config":"{}","version":"2"}]}"#,
        )
        .unwrap();
        assert_eq!(release.version, "");
        assert_eq!(release.priority_configs[0].key, "k");
        let answer: FeaturesAnswer =
            serde_json::from_str(r#"{"gateway":"g","features":{"gw:Retry":false}}"#).unwrap();
        assert!(!answer.features["gw:Retry"]);
    }
}

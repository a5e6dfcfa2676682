//! OAuth 2.0 bearer tokens checked by token introspection (RFC 7662).
//!
//! The token is POSTed as `token=...&token_type_hint=access_token` to the introspection
//! endpoint with the gateway's client credentials in HTTP Basic (RFC 6749 §2.3.1: both
//! form-urlencoded first). The call goes through the gateway's own upstream client (pooled
//! connections, `https://` with the default roots) under one `timeout` for connect, answer
//! and body. An active answer is cached under the token's SHA-256 digest until the token's
//! `exp`, and at most `cacheTtl`, in a bounded `quick_cache` (inactive answers are not
//! cached, so a token that becomes active is seen at once). An answer that is not `200`
//! with a JSON body, a connect failure or a timeout is [`OAuthError::Unavailable`]: the
//! request gets 503, never a 401 that would make the client throw away a good token.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use http::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HeaderName, HeaderValue};
use http::{Method, Request, StatusCode, Uri};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tower::ServiceExt;

use super::options::OAuthOptions;
use crate::support::one_or_many;
use middleware::hooks::collect_limited;
use middleware::{Body, full_body};

/// Largest introspection answer read.
const MAX_ANSWER: u64 = 64 * 1024;

/// Why a token was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OAuthError {
    /// No token in the request.
    #[error("no token")]
    Missing,
    /// The authorization server says the token is not active.
    #[error("token is not active")]
    Inactive,
    /// The token's `exp` has passed.
    #[error("token expired")]
    Expired,
    /// The token lacks a scope the endpoint requires (403).
    #[error("insufficient scope")]
    InsufficientScope,
    /// The introspection endpoint could not be asked (503).
    #[error("introspection failed: {0}")]
    Unavailable(String),
}

/// What an active token grants, as the introspection endpoint answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The token's scopes.
    pub scopes: Vec<String>,
    /// The client the token was issued to (`client_id`, else `sub`).
    pub client_id: Option<String>,
    /// Expiry, seconds since the Unix epoch (`exp`), when given.
    pub exp: Option<u64>,
}

/// The RFC 7662 answer fields the gateway reads.
#[derive(Debug, Deserialize)]
struct Answer {
    active: bool,
    #[serde(default, deserialize_with = "one_or_many")]
    scope: Vec<String>,
    #[serde(default)]
    client_id: Option<String>,
    #[serde(default)]
    sub: Option<String>,
    #[serde(default)]
    exp: Option<f64>,
}

#[derive(Clone)]
struct Cached {
    grant: Arc<Grant>,
    fresh_until: Instant,
}

/// A token introspector built from [`OAuthOptions`].
pub struct Introspector {
    client: client::Client,
    url: Uri,
    authorization: HeaderValue,
    header: HeaderName,
    bearer_required: bool,
    strip_credential: bool,
    scopes: Vec<String>,
    cache: Option<quick_cache::sync::Cache<[u8; 32], Cached>>,
    cache_ttl: Duration,
    timeout: Duration,
    down: AtomicBool,
}

/// A build error: the option field (below `oauth.`) and the message.
pub type FieldError = (String, String);

impl Introspector {
    /// Checks the options and builds the client of the introspection endpoint.
    pub fn new(options: &OAuthOptions, clients: &client::Factory) -> Result<Self, FieldError> {
        let field = |name: &str, message: String| (name.to_owned(), message);
        if options.introspection_url.is_empty() {
            return Err(field("introspectionUrl", "must be set".into()));
        }
        let url: Uri = options
            .introspection_url
            .parse()
            .map_err(|err| field("introspectionUrl", format!("{err}")))?;
        let (Some(scheme), Some(authority)) = (url.scheme_str(), url.authority()) else {
            return Err(field(
                "introspectionUrl",
                "must be an absolute http(s):// URL".into(),
            ));
        };
        if scheme != "http" && scheme != "https" {
            return Err(field(
                "introspectionUrl",
                format!("unsupported scheme {scheme:?} (http or https)"),
            ));
        }
        if options.client_id.is_empty() {
            return Err(field("clientId", "must be set".into()));
        }
        if options.timeout.is_zero() {
            return Err(field("timeout", "must be positive".into()));
        }
        if let Some(index) = options.scopes.iter().position(|scope| {
            scope.is_empty() || scope.contains(|c: char| c.is_whitespace() || c == '"' || c == '\\')
        }) {
            return Err(field(
                &format!("scopes[{index}]"),
                "a scope is one non-empty word without quotes".into(),
            ));
        }
        let header = HeaderName::try_from(options.header.as_str()).map_err(|_| {
            field(
                "header",
                format!("invalid header name {:?}", options.header),
            )
        })?;
        let encode =
            |text: &str| form_urlencoded::byte_serialize(text.as_bytes()).collect::<String>();
        let credentials = format!(
            "{}:{}",
            encode(&options.client_id),
            encode(&options.client_secret)
        );
        let authorization =
            HeaderValue::try_from(format!("Basic {}", STANDARD.encode(credentials)))
                .map_err(|err| field("clientId", err.to_string()))?;
        let backends = [configs::Backend {
            target: format!("{scheme}://{authority}"),
            ..Default::default()
        }];
        let spec = client::ClientSpec {
            name: "auth introspection",
            protocol: configs::Protocol::Http,
            selector: "",
            backends: &backends,
            tls_store: &Default::default(),
        };
        let client = clients
            .build(&spec)
            .map_err(|err| field("introspectionUrl", err.to_string()))?;
        let cache = (!options.cache_ttl.is_zero() && options.cache_size > 0)
            .then(|| quick_cache::sync::Cache::new(options.cache_size));
        Ok(Self {
            client,
            url,
            authorization,
            bearer_required: header == AUTHORIZATION,
            header,
            strip_credential: options.strip_credential,
            scopes: options.scopes.clone(),
            cache,
            cache_ttl: options.cache_ttl,
            timeout: options.timeout,
            down: AtomicBool::new(false),
        })
    }

    /// The request's bearer token.
    pub fn token(&self, request: &Request<Body>) -> Option<String> {
        let value = request.headers().get(&self.header)?.to_str().ok()?.trim();
        let token = match value.split_once(' ') {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("bearer") => rest.trim(),
            _ if self.bearer_required => return None,
            _ => value,
        };
        (!token.is_empty()).then(|| token.to_owned())
    }

    /// The cached grant of `token`, if one is still fresh.
    pub fn cached(&self, token: &str) -> Option<Arc<Grant>> {
        let cache = self.cache.as_ref()?;
        let key = digest(token);
        let entry = cache.get(&key)?;
        if Instant::now() < entry.fresh_until {
            Some(entry.grant)
        } else {
            cache.remove(&key);
            None
        }
    }

    /// Asks the introspection endpoint about `token`; caches an active answer.
    pub async fn introspect(&self, token: &str) -> Result<Arc<Grant>, OAuthError> {
        let answer = match tokio::time::timeout(self.timeout, self.call(token)).await {
            Ok(answer) => answer,
            Err(_) => Err(format!("no answer within {:?}", self.timeout)),
        };
        let answer = match answer {
            Ok(answer) => {
                if self.down.swap(false, Ordering::Relaxed) {
                    tracing::info!(url = %self.url, "auth: introspection endpoint answers again");
                }
                answer
            }
            Err(reason) => {
                if !self.down.swap(true, Ordering::Relaxed) {
                    tracing::warn!(url = %self.url, reason, "auth: introspection endpoint unavailable; requests get 503");
                }
                return Err(OAuthError::Unavailable(reason));
            }
        };
        if !answer.active {
            return Err(OAuthError::Inactive);
        }
        let grant = Arc::new(Grant {
            scopes: answer
                .scope
                .iter()
                .flat_map(|scope| scope.split_whitespace())
                .map(str::to_owned)
                .collect(),
            client_id: answer.client_id.or(answer.sub),
            exp: answer.exp.filter(|exp| *exp >= 0.0).map(|exp| exp as u64),
        });
        if let Some(cache) = &self.cache
            && let Some(fresh_for) = fresh_for(&grant, self.cache_ttl, since_epoch())
        {
            cache.insert(
                digest(token),
                Cached {
                    grant: grant.clone(),
                    fresh_until: Instant::now() + fresh_for,
                },
            );
        }
        Ok(grant)
    }

    /// Whether `grant` lets the request in here: not expired, every required scope held.
    pub fn admit(&self, grant: &Grant) -> Result<(), OAuthError> {
        if grant.exp.is_some_and(|exp| exp <= since_epoch().as_secs()) {
            return Err(OAuthError::Expired);
        }
        let held = |scope: &String| grant.scopes.iter().any(|have| have == scope);
        if self.scopes.iter().all(held) {
            Ok(())
        } else {
            Err(OAuthError::InsufficientScope)
        }
    }

    /// The required scopes, space-separated (the challenge's `scope` attribute).
    pub fn required_scopes(&self) -> String {
        self.scopes.join(" ")
    }

    /// Removes the token from the request when `stripCredential` is set.
    pub fn strip(&self, request: &mut Request<Body>) {
        if self.strip_credential {
            request.headers_mut().remove(&self.header);
        }
    }

    /// Stops the introspection endpoint's client.
    pub fn close(&self) {
        self.client.close();
    }

    async fn call(&self, token: &str) -> Result<Answer, String> {
        let form = form_urlencoded::Serializer::new(String::new())
            .append_pair("token", token)
            .append_pair("token_type_hint", "access_token")
            .finish();
        let request = Request::builder()
            .method(Method::POST)
            .uri(self.url.clone())
            .header(AUTHORIZATION, self.authorization.clone())
            .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(ACCEPT, "application/json")
            .body(full_body(form))
            .map_err(|err| err.to_string())?;
        // Boxed, not awaited in place: the client's future trips rustc's higher-ranked
        // `Send` check inside an `async fn`.
        let call: std::pin::Pin<Box<dyn Future<Output = _> + Send>> =
            Box::pin(self.client.clone().oneshot(request));
        let response = call.await.map_err(|err| err.to_string())?;
        let status = response.status();
        let (body, _) = collect_limited(response.into_body(), MAX_ANSWER)
            .await
            .map_err(|err| format!("reading the answer: {err}"))?;
        if status != StatusCode::OK {
            return Err(format!("answered {status}"));
        }
        serde_json::from_slice(&body).map_err(|err| format!("answer is not RFC 7662 JSON: {err}"))
    }
}

/// How long `grant` may be reused at `now` (since the Unix epoch): `ttl`, cut to what is
/// left before its `exp`; `None` when nothing is left.
fn fresh_for(grant: &Grant, ttl: Duration, now: Duration) -> Option<Duration> {
    let left = match grant.exp {
        Some(exp) => ttl.min(Duration::from_secs(exp).checked_sub(now)?),
        None => ttl,
    };
    (!left.is_zero()).then_some(left)
}

fn since_epoch() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(exp: Option<u64>) -> Grant {
        Grant {
            scopes: Vec::new(),
            client_id: None,
            exp,
        }
    }

    #[test]
    fn an_answer_is_reused_until_exp_and_at_most_the_ttl() {
        let ttl = Duration::from_secs(60);
        let now = Duration::from_millis(1_000_250);
        assert_eq!(fresh_for(&grant(None), ttl, now), Some(ttl));
        assert_eq!(
            fresh_for(&grant(Some(1010)), ttl, now),
            Some(Duration::from_millis(9_750))
        );
        assert_eq!(fresh_for(&grant(Some(5000)), ttl, now), Some(ttl));
        assert_eq!(fresh_for(&grant(Some(1000)), ttl, now), None);
        assert_eq!(fresh_for(&grant(Some(10)), ttl, now), None);
    }

    #[test]
    fn answers_with_a_scope_string_or_list() {
        let answer: Answer =
            serde_json::from_str(r#"{"active":true,"scope":"a b","exp":1.5e9}"#).expect("json");
        assert_eq!(answer.scope, ["a b"]);
        assert_eq!(answer.exp, Some(1.5e9));
        let answer: Answer =
            serde_json::from_str(r#"{"active":false,"scope":["a","b"]}"#).expect("json");
        assert_eq!(answer.scope, ["a", "b"]);
        assert!(serde_json::from_str::<Answer>(r#"{"scope":"a"}"#).is_err());
    }
}

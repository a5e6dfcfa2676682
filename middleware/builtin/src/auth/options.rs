//! Options of `auth`.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use super::super::support::{duration, one_or_many};

/// Options of `auth`: `jwt`, `apikey`, `oauth`, or several (then any credential lets a
/// request in).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct AuthOptions {
    /// Bearer JWT validation. Default: unset.
    pub jwt: Option<JwtOptions>,
    /// API key validation. Default: unset.
    #[serde(alias = "apiKey", alias = "api_key")]
    pub apikey: Option<ApiKeyOptions>,
    /// OAuth 2.0 bearer tokens checked by token introspection (RFC 7662). Default: unset.
    pub oauth: Option<OAuthOptions>,
    /// The `realm` named in `WWW-Authenticate` challenges. Default: `gateway`.
    pub realm: String,
}

impl Default for AuthOptions {
    fn default() -> Self {
        Self {
            jwt: None,
            apikey: None,
            oauth: None,
            realm: "gateway".into(),
        }
    }
}

/// JWT validation. Exactly one key source: `secret`, `secretFile`, `publicKey`,
/// `publicKeyFile` or `jwksFile`. Files are read when the config is applied.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct JwtOptions {
    /// HMAC secret (HS256/384/512), as text. Default: unset.
    pub secret: Option<String>,
    /// File holding the HMAC secret (surrounding whitespace trimmed). Default: unset.
    #[serde(alias = "secret_file")]
    pub secret_file: Option<String>,
    /// RSA, EC or Ed25519 public key, PEM text. Default: unset.
    #[serde(alias = "public_key")]
    pub public_key: Option<String>,
    /// File holding a PEM public key. Default: unset.
    #[serde(alias = "public_key_file")]
    pub public_key_file: Option<String>,
    /// File holding a JWKS (`{"keys": [...]}`); the token's `kid` picks the key.
    /// Default: unset.
    #[serde(alias = "jwks_file")]
    pub jwks_file: Option<String>,
    /// Accepted `alg` values, e.g. `[RS256]`. Default: every algorithm of the key's family
    /// (HS* for a secret, RS*/PS* for RSA, ES* for EC, EdDSA for Ed25519); an algorithm of
    /// another family is never accepted.
    pub algorithms: Vec<String>,
    /// Accepted issuers (`iss`), one string or a list. Default: empty (not checked).
    #[serde(deserialize_with = "one_or_many")]
    pub issuer: Vec<String>,
    /// Accepted audiences (`aud`), one string or a list. Default: empty (not checked).
    #[serde(deserialize_with = "one_or_many")]
    pub audience: Vec<String>,
    /// Clock skew allowed on `exp` and `nbf`. Default: `60s`.
    #[serde(deserialize_with = "duration")]
    pub leeway: Duration,
    /// Header carrying the token; a `Bearer ` prefix is removed (for `Authorization` it is
    /// required). Default: `Authorization`.
    pub header: String,
    /// Query parameter carrying the token, tried after the header. Default: empty (off).
    pub query: String,
    /// Claims copied into request headers for the upstream: `{claim: header}`; a dotted
    /// claim (`realm.role`) reads nested objects. Headers of these names sent by the client
    /// are always removed. Default: none.
    #[serde(alias = "forward_claims")]
    pub forward_claims: BTreeMap<String, String>,
    /// Remove the token from the request sent upstream. Default: false (the upstream
    /// usually wants to see the token).
    #[serde(alias = "strip_credential")]
    pub strip_credential: bool,
}

impl Default for JwtOptions {
    fn default() -> Self {
        Self {
            secret: None,
            secret_file: None,
            public_key: None,
            public_key_file: None,
            jwks_file: None,
            algorithms: Vec::new(),
            issuer: Vec::new(),
            audience: Vec::new(),
            leeway: Duration::from_secs(60),
            header: "Authorization".into(),
            query: String::new(),
            forward_claims: BTreeMap::new(),
            strip_credential: false,
        }
    }
}

/// API key validation: the key must equal one of the configured keys.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct ApiKeyOptions {
    /// Accepted keys. Default: none.
    pub keys: Vec<String>,
    /// File of accepted keys, one per line (blank lines and `#` comments skipped); used
    /// together with `keys`. Default: unset.
    #[serde(alias = "keys_file")]
    pub keys_file: Option<String>,
    /// Header carrying the key. Default: `X-API-Key`.
    pub header: String,
    /// Query parameter carrying the key, tried after the header. Default: empty (off:
    /// keys in URLs end up in access logs).
    pub query: String,
    /// Remove the key (header and query parameter) from the request sent upstream.
    /// Default: true (the key is the gateway's business).
    #[serde(alias = "strip_credential")]
    pub strip_credential: bool,
}

impl Default for ApiKeyOptions {
    fn default() -> Self {
        Self {
            keys: Vec::new(),
            keys_file: None,
            header: "X-API-Key".into(),
            query: String::new(),
            strip_credential: true,
        }
    }
}

/// OAuth 2.0 token introspection (RFC 7662): the bearer token is POSTed to
/// `introspectionUrl` with the gateway's client credentials; active answers are cached.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct OAuthOptions {
    /// The authorization server's introspection endpoint, `http(s)://host[:port]/path`.
    /// Required.
    #[serde(alias = "introspection_url")]
    pub introspection_url: String,
    /// The gateway's client id at the authorization server (HTTP Basic user). Required.
    #[serde(alias = "client_id")]
    pub client_id: String,
    /// The gateway's client secret (HTTP Basic password). Default: empty.
    #[serde(alias = "client_secret")]
    pub client_secret: String,
    /// Scopes the token must all carry on this endpoint, one string or a list.
    /// Default: none (any active token).
    #[serde(deserialize_with = "one_or_many")]
    pub scopes: Vec<String>,
    /// How long an active answer is reused, at most (never past the token's `exp`);
    /// `0s` turns the cache off. Default: `60s`.
    #[serde(alias = "cache_ttl", deserialize_with = "duration")]
    pub cache_ttl: Duration,
    /// Most tokens kept in the cache. Default: 10000.
    #[serde(alias = "cache_size")]
    pub cache_size: usize,
    /// Limit on one introspection call (connect, answer and body); past it the request
    /// gets 503. Default: `2s`.
    #[serde(deserialize_with = "duration")]
    pub timeout: Duration,
    /// Header carrying the token; a `Bearer ` prefix is removed (for `Authorization` it is
    /// required). Default: `Authorization`.
    pub header: String,
    /// Remove the token from the request sent upstream. Default: false.
    #[serde(alias = "strip_credential")]
    pub strip_credential: bool,
}

impl Default for OAuthOptions {
    fn default() -> Self {
        Self {
            introspection_url: String::new(),
            client_id: String::new(),
            client_secret: String::new(),
            scopes: Vec::new(),
            cache_ttl: Duration::from_secs(60),
            cache_size: 10_000,
            timeout: Duration::from_secs(2),
            header: "Authorization".into(),
            strip_credential: false,
        }
    }
}

//! `auth`: lets a request in only with a valid credential: a bearer JWT (`jwt`), an API
//! key (`apikey`), or either of the two when both are configured (chain two `auth` entries
//! to require both).
//!
//! - `jwt` (see [`jwt`]): HS256/384/512 with a secret, RS*/PS*/ES*/EdDSA with a PEM public
//!   key (inline or from a file) or a JWKS file (the token's `kid` picks the key). `exp` is
//!   required; `exp`/`nbf` are checked with `leeway`, `iss`/`aud` when configured.
//!   `forwardClaims` copies claims into request headers (client-sent headers of those
//!   names are always removed first, so they cannot be forged).
//! - `apikey` (see [`apikey`]): keys inline and/or from a file, read from a header
//!   (`X-API-Key`) or a query parameter, compared in constant time.
//! - A request without a valid credential is refused with [`Reason::Unauthenticated`]
//!   (`401 Unauthorized`) and one `WWW-Authenticate` challenge per configured method
//!   (RFC 6750 for bearer tokens: `error="invalid_token"` and a short `error_description`
//!   when a token was given), and counts in the proxy's
//!   `go_gateway_middleware_denied_total{middleware="auth",reason="unauthorized"}`.
//! - Credentials are never logged. `stripCredential` removes them from the request sent
//!   upstream: by default the API key is removed and the JWT kept.
//! - Key files are read when the config is applied (a reload re-reads them); an unreadable
//!   or malformed file fails the update with the field named.

pub mod apikey;
pub mod jwt;
pub mod options;

use std::borrow::Cow;

use http::header::WWW_AUTHENTICATE;
use http::uri::{PathAndQuery, Uri};
use http::{HeaderValue, Request, Response};

use self::apikey::{ApiKeyError, ApiKeyValidator};
use self::jwt::{JwtError, JwtValidator};
pub use self::options::{ApiKeyOptions, AuthOptions, JwtOptions};
use super::support::{decode, option_error};
use middleware::denials::DenialCounter;
use middleware::hooks::{Filter, FilterLayer};
use middleware::{Body, BuildContext, BuildError, Middleware, Reason, Rejection};

/// The name this middleware is registered under and counted as.
pub const NAME: &str = "auth";

/// Builds `auth` from its config entry.
pub fn factory(config: &configs::Middleware, ctx: &BuildContext) -> Result<Middleware, BuildError> {
    let options: AuthOptions = decode(config)?;
    let denied = ctx.denial_counter(NAME, "unauthorized");
    let auth = Auth::new(&options, &config.name, denied)?;
    Ok(Middleware::from_layer(&config.name, FilterLayer::new(auth)))
}

/// The `auth` filter with its keys loaded.
pub struct Auth {
    jwt: Option<JwtValidator>,
    apikey: Option<ApiKeyValidator>,
    realm: String,
    denied: DenialCounter,
}

impl Auth {
    /// Checks `options` and loads keys; errors name the field (`options.jwt.publicKeyFile`).
    pub fn new(
        options: &AuthOptions,
        name: &str,
        denied: DenialCounter,
    ) -> Result<Self, BuildError> {
        if options.jwt.is_none() && options.apikey.is_none() {
            return Err(option_error(name, "jwt", "configure jwt, apikey or both"));
        }
        if options.realm.contains('"') || options.realm.contains('\\') {
            return Err(option_error(
                name,
                "realm",
                "must not contain quotes or backslashes",
            ));
        }
        let jwt = options
            .jwt
            .as_ref()
            .map(|jwt| {
                JwtValidator::new(jwt).map_err(|(field, message)| {
                    option_error(name, &format!("jwt.{field}"), message)
                })
            })
            .transpose()?;
        let apikey = options
            .apikey
            .as_ref()
            .map(|apikey| {
                ApiKeyValidator::new(apikey).map_err(|(field, message)| {
                    option_error(name, &format!("apikey.{field}"), message)
                })
            })
            .transpose()?;
        Ok(Self {
            jwt,
            apikey,
            realm: options.realm.clone(),
            denied,
        })
    }

    fn unauthorized(&self, jwt: Option<JwtError>, apikey: Option<ApiKeyError>) -> Response<Body> {
        self.denied.inc();
        let mut rejection = Rejection::new(Reason::Unauthenticated, "unauthorized");
        let realm = &self.realm;
        let mut challenges = Vec::new();
        match jwt {
            Some(JwtError::Missing) => challenges.push(format!("Bearer realm=\"{realm}\"")),
            Some(JwtError::Invalid(description)) => challenges.push(format!(
                "Bearer realm=\"{realm}\", error=\"invalid_token\", error_description=\"{description}\""
            )),
            None => {}
        }
        if apikey.is_some() {
            challenges.push(format!("ApiKey realm=\"{realm}\""));
        }
        for challenge in challenges {
            if let Ok(value) = HeaderValue::try_from(challenge) {
                rejection = rejection.with_header(WWW_AUTHENTICATE, value);
            }
        }
        rejection.into_response()
    }
}

impl Filter for Auth {
    fn pre(&self, request: &mut Request<Body>) -> Result<(), Response<Body>> {
        let mut jwt_error = None;
        let mut apikey_error = None;
        let mut accepted = false;
        if let Some(jwt) = &self.jwt {
            jwt.clear_claim_headers(request.headers_mut());
            match jwt.authenticate(request) {
                Ok(claims) => {
                    jwt.forward(&claims, request.headers_mut());
                    accepted = true;
                }
                Err(err) => jwt_error = Some(err),
            }
        }
        if !accepted {
            if let Some(apikey) = &self.apikey {
                match apikey.authenticate(request) {
                    Ok(()) => accepted = true,
                    Err(err) => apikey_error = Some(err),
                }
            }
        }
        if !accepted {
            // The reason only: the credential itself is never logged.
            let reason = jwt_error
                .as_ref()
                .map(ToString::to_string)
                .or(apikey_error.map(|err| err.to_string()));
            tracing::debug!(reason, "auth: request refused");
            return Err(self.unauthorized(jwt_error, apikey_error));
        }
        if let Some(jwt) = &self.jwt {
            jwt.strip(request);
        }
        if let Some(apikey) = &self.apikey {
            apikey.strip(request);
        }
        Ok(())
    }
}

/// The decoded value of query parameter `name` in `uri`, if present.
pub(crate) fn query_param(uri: &Uri, name: &str) -> Option<String> {
    form_urlencoded::parse(uri.query()?.as_bytes())
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.into_owned())
}

/// `uri` without query parameter `name` (every occurrence), other parameters untouched;
/// `None` when it had no such parameter.
pub(crate) fn remove_query_param(uri: &Uri, name: &str) -> Option<Uri> {
    let query = uri.query()?;
    let decoded_name = |pair: &str| -> Cow<'static, str> {
        form_urlencoded::parse(pair.as_bytes())
            .next()
            .map(|(key, _)| Cow::Owned(key.into_owned()))
            .unwrap_or_default()
    };
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| decoded_name(pair) != name)
        .collect();
    if kept.len() == query.split('&').count() {
        return None;
    }
    let path_and_query = if kept.is_empty() {
        uri.path().to_owned()
    } else {
        format!("{}?{}", uri.path(), kept.join("&"))
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(PathAndQuery::try_from(path_and_query).ok()?);
    Uri::from_parts(parts).ok()
}

#[cfg(test)]
mod tests;

//! `auth`: lets a request in only with a valid credential: a bearer JWT (`jwt`), an API
//! key (`apikey`), an OAuth 2.0 token checked by introspection (`oauth`), or any of them
//! when several are configured (tried in that order; chain two `auth` entries to require
//! both).
//!
//! - `jwt` (see [`jwt`]): HS256/384/512 with a secret, RS*/PS*/ES*/EdDSA with a PEM public
//!   key (inline or from a file) or a JWKS file (the token's `kid` picks the key). `exp` is
//!   required; `exp`/`nbf` are checked with `leeway`, `iss`/`aud` when configured.
//!   `forwardClaims` copies claims into request headers (client-sent headers of those
//!   names are always removed first, so they cannot be forged).
//! - `apikey` (see [`apikey`]): keys inline and/or from a file, read from a header
//!   (`X-API-Key`) or a query parameter, compared in constant time.
//! - `oauth` (see [`oauth`]): RFC 7662 introspection with the gateway's client
//!   credentials, active answers cached until `exp` (at most `cacheTtl`), required
//!   `scopes` per endpoint. A token without a required scope gets [`Reason::Forbidden`]
//!   (`403`, `error="insufficient_scope"` with `scope="..."`, RFC 6750 §3.1); an
//!   introspection endpoint that is down, slow or answers nonsense gets
//!   [`Reason::Unavailable`] (`503`, counted with reason `introspection_failed`).
//!   Only a cache miss makes the request wait (boxed future); JWT, API key and cached
//!   tokens are checked synchronously.
//! - The accepted client's id (OAuth `client_id`; a JWT's `client_id`, `azp` or `sub`) is
//!   recorded in [`RequestOptions::client_id`] for the middlewares around it.
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
pub mod oauth;
pub mod options;

use std::borrow::Cow;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::header::WWW_AUTHENTICATE;
use http::uri::{PathAndQuery, Uri};
use http::{HeaderValue, Request, Response};
use tower::{Layer, Service};

use self::apikey::{ApiKeyError, ApiKeyValidator};
use self::jwt::{Claims, JwtError, JwtValidator};
use self::oauth::{Introspector, OAuthError};
pub use self::options::{ApiKeyOptions, AuthOptions, JwtOptions, OAuthOptions};
use super::support::{decode, option_error};
use middleware::denials::DenialCounter;
use middleware::{
    Body, BoxError, BuildContext, BuildError, Factory, Middleware, Reason, Rejection,
    RequestOptions,
};

/// The name this middleware is registered under and counted as.
pub const NAME: &str = "auth";

/// The `auth` factory; `clients` builds the client of an OAuth introspection endpoint.
pub fn factory(clients: client::Factory) -> impl Factory {
    move |config: &configs::Middleware, ctx: &BuildContext| build(config, ctx, &clients)
}

/// Builds `auth` from its config entry; closing it closes the introspection client.
fn build(
    config: &configs::Middleware,
    ctx: &BuildContext,
    clients: &client::Factory,
) -> Result<Middleware, BuildError> {
    let options: AuthOptions = decode(config)?;
    let auth = Arc::new(Auth::new(&options, &config.name, ctx, clients)?);
    let closing = auth.clone();
    Ok(
        Middleware::from_layer(&config.name, AuthLayer { auth }).with_closer(move || {
            if let Some(oauth) = &closing.oauth {
                oauth.close();
            }
        }),
    )
}

/// The `auth` checks with their keys loaded.
pub struct Auth {
    jwt: Option<JwtValidator>,
    apikey: Option<ApiKeyValidator>,
    oauth: Option<Introspector>,
    realm: String,
    unauthorized: DenialCounter,
    insufficient_scope: DenialCounter,
    introspection_failed: DenialCounter,
}

/// What [`Auth::check`] decided without waiting.
pub enum Verdict {
    /// Let in (credentials stripped as configured).
    Accept,
    /// Refused with this response.
    Refuse(Response<Body>),
    /// The OAuth token is not cached: ask the introspection endpoint (see
    /// [`Auth::introspect`]).
    Introspect(PendingToken),
}

/// A token waiting for introspection, with what the other methods said.
pub struct PendingToken {
    token: String,
    jwt: Option<JwtError>,
    apikey: Option<ApiKeyError>,
}

/// Why each configured method refused.
#[derive(Default)]
struct Failures {
    jwt: Option<JwtError>,
    apikey: Option<ApiKeyError>,
    oauth: Option<OAuthError>,
}

impl Auth {
    /// Checks `options` and loads keys; errors name the field (`options.jwt.publicKeyFile`).
    pub fn new(
        options: &AuthOptions,
        name: &str,
        ctx: &BuildContext,
        clients: &client::Factory,
    ) -> Result<Self, BuildError> {
        if options.jwt.is_none() && options.apikey.is_none() && options.oauth.is_none() {
            return Err(option_error(
                name,
                "jwt",
                "configure jwt, apikey, oauth or several",
            ));
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
        let oauth = options
            .oauth
            .as_ref()
            .map(|oauth| {
                Introspector::new(oauth, clients).map_err(|(field, message)| {
                    option_error(name, &format!("oauth.{field}"), message)
                })
            })
            .transpose()?;
        Ok(Self {
            jwt,
            apikey,
            oauth,
            realm: options.realm.clone(),
            unauthorized: ctx.denial_counter(NAME, "unauthorized"),
            insufficient_scope: ctx.denial_counter(NAME, "insufficient_scope"),
            introspection_failed: ctx.denial_counter(NAME, "introspection_failed"),
        })
    }

    /// Checks the request's credentials with what is at hand: JWT, API key, cached OAuth
    /// answers.
    pub fn check(&self, request: &mut Request<Body>) -> Verdict {
        let mut failures = Failures::default();
        if let Some(jwt) = &self.jwt {
            jwt.clear_claim_headers(request.headers_mut());
            match jwt.authenticate(request) {
                Ok(claims) => {
                    jwt.forward(&claims, request.headers_mut());
                    self.accept(request, claim_client_id(&claims));
                    return Verdict::Accept;
                }
                Err(err) => failures.jwt = Some(err),
            }
        }
        if let Some(apikey) = &self.apikey {
            match apikey.authenticate(request) {
                Ok(()) => {
                    self.accept(request, None);
                    return Verdict::Accept;
                }
                Err(err) => failures.apikey = Some(err),
            }
        }
        if let Some(oauth) = &self.oauth {
            match oauth.token(request) {
                None => failures.oauth = Some(OAuthError::Missing),
                Some(token) => match oauth.cached(&token) {
                    Some(grant) => match oauth.admit(&grant) {
                        Ok(()) => {
                            self.accept(request, grant.client_id.clone());
                            return Verdict::Accept;
                        }
                        Err(err) => failures.oauth = Some(err),
                    },
                    None => {
                        return Verdict::Introspect(PendingToken {
                            token,
                            jwt: failures.jwt,
                            apikey: failures.apikey,
                        });
                    }
                },
            }
        }
        Verdict::Refuse(self.refuse(failures))
    }

    /// Finishes a check [`Auth::check`] left to the introspection endpoint.
    // A refusal is the rare path; boxing the response would cost every request.
    #[allow(clippy::result_large_err)]
    pub async fn introspect(
        &self,
        request: &mut Request<Body>,
        pending: PendingToken,
    ) -> Result<(), Response<Body>> {
        let Some(oauth) = &self.oauth else {
            return Err(self.refuse(Failures::default()));
        };
        let admitted = oauth
            .introspect(&pending.token)
            .await
            .and_then(|grant| oauth.admit(&grant).map(|()| grant));
        match admitted {
            Ok(grant) => {
                self.accept(request, grant.client_id.clone());
                Ok(())
            }
            Err(err) => Err(self.refuse(Failures {
                jwt: pending.jwt,
                apikey: pending.apikey,
                oauth: Some(err),
            })),
        }
    }

    /// Strips credentials as configured and records the client's id.
    fn accept(&self, request: &mut Request<Body>, client_id: Option<String>) {
        if let Some(jwt) = &self.jwt {
            jwt.strip(request);
        }
        if let Some(apikey) = &self.apikey {
            apikey.strip(request);
        }
        if let Some(oauth) = &self.oauth {
            oauth.strip(request);
        }
        if let Some(client_id) = client_id
            && let Some(options) = request.extensions().get::<RequestOptions>()
        {
            let _ = options.scope.client_id.set(client_id);
        }
    }

    fn refuse(&self, failures: Failures) -> Response<Body> {
        // The reason only: the credential itself is never logged.
        let reason = failures
            .oauth
            .as_ref()
            .map(ToString::to_string)
            .or(failures.jwt.as_ref().map(ToString::to_string))
            .or(failures.apikey.map(|err| err.to_string()));
        tracing::debug!(reason, "auth: request refused");
        let realm = &self.realm;
        match &failures.oauth {
            Some(OAuthError::InsufficientScope) => {
                self.insufficient_scope.inc();
                let scope = self
                    .oauth
                    .as_ref()
                    .map(Introspector::required_scopes)
                    .unwrap_or_default();
                let challenge = format!(
                    "Bearer realm=\"{realm}\", error=\"insufficient_scope\", scope=\"{scope}\""
                );
                let mut rejection = Rejection::new(Reason::Forbidden, "insufficient scope");
                if let Ok(value) = HeaderValue::try_from(challenge) {
                    rejection = rejection.with_header(WWW_AUTHENTICATE, value);
                }
                return rejection.into_response();
            }
            Some(OAuthError::Unavailable(_)) => {
                self.introspection_failed.inc();
                return Rejection::new(Reason::Unavailable, "authorization server unavailable")
                    .into_response();
            }
            _ => {}
        }
        self.unauthorized.inc();
        let mut rejection = Rejection::new(Reason::Unauthenticated, "unauthorized");
        let mut challenges = Vec::new();
        // One Bearer challenge for JWT and OAuth together; the OAuth verdict is the later
        // and so the more telling one.
        let invalid = match (&failures.oauth, &failures.jwt) {
            (Some(err @ (OAuthError::Inactive | OAuthError::Expired)), _) => Some(err.to_string()),
            (_, Some(JwtError::Invalid(description))) => Some((*description).to_owned()),
            _ => None,
        };
        match invalid {
            Some(description) => challenges.push(format!(
                "Bearer realm=\"{realm}\", error=\"invalid_token\", error_description=\"{description}\""
            )),
            None if failures.jwt.is_some() || failures.oauth.is_some() => {
                challenges.push(format!("Bearer realm=\"{realm}\""));
            }
            None => {}
        }
        if failures.apikey.is_some() {
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

/// The client a JWT was issued to: `client_id`, else `azp`, else `sub`.
fn claim_client_id(claims: &Claims) -> Option<String> {
    ["client_id", "azp", "sub"]
        .iter()
        .find_map(|name| claims.get(*name)?.as_str().map(str::to_owned))
}

/// The tower layer of `auth`.
#[derive(Clone)]
pub struct AuthLayer {
    auth: Arc<Auth>,
}

impl AuthLayer {
    /// A layer running `auth`.
    pub fn new(auth: Arc<Auth>) -> Self {
        Self { auth }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            auth: self.auth.clone(),
            inner,
        }
    }
}

/// The `auth` service: refuses or passes each request to `inner`.
#[derive(Clone)]
pub struct AuthService<S> {
    auth: Arc<Auth>,
    inner: S,
}

/// An introspection under way: gives the request back with the verdict.
type Introspection =
    Pin<Box<dyn Future<Output = (Request<Body>, Result<(), Response<Body>>)> + Send>>;

impl<S> Service<Request<Body>> for AuthService<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = BoxError> + Clone,
{
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = ResponseFuture<S>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<Body>) -> Self::Future {
        let state = match self.auth.check(&mut request) {
            Verdict::Accept => State::Inner {
                future: self.inner.call(request),
            },
            Verdict::Refuse(response) => State::Refused {
                response: Some(response),
            },
            Verdict::Introspect(pending) => {
                // The ready service takes the request later; a clone stays for the next.
                let clone = self.inner.clone();
                let inner = std::mem::replace(&mut self.inner, clone);
                let auth = self.auth.clone();
                State::Introspecting {
                    introspection: Box::pin(async move {
                        let verdict = auth.introspect(&mut request, pending).await;
                        (request, verdict)
                    }),
                    inner: Some(inner),
                }
            }
        };
        ResponseFuture { state }
    }
}

pin_project_lite::pin_project! {
    /// Response future of [`AuthService`]: a refusal, the inner call, or an introspection
    /// followed by the inner call.
    pub struct ResponseFuture<S: Service<Request<Body>>> {
        #[pin]
        state: State<S>,
    }
}

pin_project_lite::pin_project! {
    #[project = StateProj]
    enum State<S: Service<Request<Body>>> {
        Refused { response: Option<Response<Body>> },
        Inner { #[pin] future: S::Future },
        Introspecting { introspection: Introspection, inner: Option<S> },
    }
}

impl<S> Future for ResponseFuture<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = BoxError>,
{
    type Output = Result<Response<Body>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = self.project().state;
        loop {
            let next = match state.as_mut().project() {
                StateProj::Refused { response } => {
                    return Poll::Ready(
                        response
                            .take()
                            .ok_or_else(|| "auth future polled after completion".into()),
                    );
                }
                StateProj::Inner { future } => return future.poll(cx),
                StateProj::Introspecting {
                    introspection,
                    inner,
                } => match std::task::ready!(introspection.as_mut().poll(cx)) {
                    (request, Ok(())) => match inner.take() {
                        Some(mut inner) => State::Inner {
                            future: inner.call(request),
                        },
                        None => State::Refused { response: None },
                    },
                    (_, Err(response)) => State::Refused {
                        response: Some(response),
                    },
                },
            };
            state.set(next);
        }
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

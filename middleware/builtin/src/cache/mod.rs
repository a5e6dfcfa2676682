//! `cache`: a shared response cache for GET and HEAD, in memory, per endpoint.
//!
//! - Key: method, host, path and query, plus the request headers the response names in
//!   `Vary` (`Vary: *` is never stored).
//! - Stored: responses with a status in `statusCodes` (200, 301, 404 by default), a body of
//!   at most `maxEntryBytes`, no `Set-Cookie`, and no `no-store`, `no-cache` or `private`.
//!   Responses to requests carrying `Authorization` are stored, and such requests answered
//!   from the cache, only when the response says `public`, `s-maxage` or
//!   `must-revalidate` (RFC 9111 3.5).
//! - Lifetime: `s-maxage`, else `max-age`, else `Expires`, else `defaultTtl`, minus the
//!   upstream's `Age`. No revalidation: a stale entry is a miss.
//! - Requests: `Cache-Control: no-cache` or `max-age=0` (or `Pragma: no-cache`) skip the
//!   lookup and refresh the entry; `no-store` skips the cache entirely.
//! - A hit never reaches the upstream and carries `Age` and `X-Cache: HIT`; a miss carries
//!   `X-Cache: MISS` and streams to the client while a copy fills the cache (see [`body`]).
//! - POST, PUT, PATCH and DELETE answered below 400 drop the GET and HEAD entries of
//!   their URL.
//! - Concurrent misses of one key all go upstream (no request coalescing).
//!
//! Entries live in a size-bounded sharded map (`quick_cache`, see [`store`]): it bounds
//! bytes rather than entries and evicts the least useful entries first, which a hand-rolled
//! LRU would have to re-implement; freshness is checked with tokio's clock on lookup.
//! The cache belongs to the built middleware: a config update starts it empty.

pub mod body;
mod layer;
pub mod options;
pub mod policy;
pub mod store;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::{AGE, HOST, HeaderName};
use http::{HeaderValue, Method, Request, Response};
use http_body_util::BodyExt;
use tokio::time::Instant;
use tower::Service;

use self::body::TeeBody;
pub use self::layer::CacheLayer;
pub use self::options::CacheOptions;
use self::policy::{cacheable_method, request_policy, storable};
use self::store::{Store, Stored, primary_key};
use super::support::{decode, option_error};
use middleware::{Body, BoxError, BuildContext, BuildError, Middleware, full_body};

/// The name this middleware is registered under.
pub const NAME: &str = "cache";

/// `X-Cache`: whether the response came from the cache.
pub const X_CACHE: HeaderName = HeaderName::from_static("x-cache");

/// Builds `cache` from its config entry.
pub fn factory(
    config: &configs::Middleware,
    _ctx: &BuildContext,
) -> Result<Middleware, BuildError> {
    let options: CacheOptions = decode(config)?;
    let shared = Shared::new(&options, &config.name)?;
    Ok(Middleware::from_layer(
        &config.name,
        CacheLayer::new(Arc::new(shared)),
    ))
}

/// A cache's settings and entries, shared by all clones of its service.
pub struct Shared {
    store: Store,
    default_ttl: Duration,
    max_entry_bytes: u64,
    statuses: Vec<u16>,
}

impl Shared {
    /// Checks `options` and creates an empty cache.
    pub fn new(options: &CacheOptions, name: &str) -> Result<Self, BuildError> {
        if options.max_bytes == 0 {
            return Err(option_error(name, "maxBytes", "must be above zero"));
        }
        if options.max_entry_bytes == 0 || options.max_entry_bytes > options.max_bytes {
            return Err(option_error(
                name,
                "maxEntryBytes",
                "must be above zero and at most maxBytes",
            ));
        }
        if let Some(code) = options
            .status_codes
            .iter()
            .find(|code| !(200..=599).contains(*code))
        {
            return Err(option_error(
                name,
                "statusCodes",
                format!("{code} is not a final status (200-599)"),
            ));
        }
        Ok(Self {
            store: Store::new(options.max_bytes, options.max_entry_bytes),
            default_ttl: options.default_ttl,
            max_entry_bytes: options.max_entry_bytes,
            statuses: options.status_codes.clone(),
        })
    }
}

/// The cache service: see the module docs.
#[derive(Clone)]
pub struct Cache<S> {
    inner: S,
    shared: Arc<Shared>,
}

/// Response future of [`Cache`].
pub type ResponseFuture = Pin<Box<dyn Future<Output = Result<Response<Body>, BoxError>> + Send>>;

impl<S> Service<Request<Body>> for Cache<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = BoxError> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let shared = self.shared.clone();
        let host = request
            .headers()
            .get(HOST)
            .and_then(|value| value.to_str().ok())
            .or_else(|| {
                request
                    .uri()
                    .authority()
                    .map(|authority| authority.as_str())
            })
            .unwrap_or("")
            .to_ascii_lowercase();
        let path = request
            .uri()
            .path_and_query()
            .map_or("/", |path| path.as_str())
            .to_owned();
        let method = request.method().clone();
        if !cacheable_method(&method) {
            let invalidates = matches!(
                method,
                Method::POST | Method::PUT | Method::PATCH | Method::DELETE
            );
            let call: ResponseFuture = Box::pin(self.take_inner().call(request));
            return Box::pin(async move {
                let response = call.await?;
                if invalidates && response.status().as_u16() < 400 {
                    shared
                        .store
                        .invalidate(&primary_key(&Method::GET, &host, &path));
                    shared
                        .store
                        .invalidate(&primary_key(&Method::HEAD, &host, &path));
                }
                Ok(response)
            });
        }
        let policy = request_policy(request.headers());
        let primary = primary_key(&method, &host, &path);
        if policy.lookup {
            let now = Instant::now();
            if let Some(stored) = shared.store.lookup(&primary, request.headers(), now) {
                if !policy.authorized || stored.shared_with_authorized {
                    let response = hit_response(&stored, now);
                    return Box::pin(async move { Ok(response) });
                }
            }
        }
        let request_headers = policy.store.then(|| request.headers().clone());
        // Boxed here: naming `S::Future` inside the async block trips rustc's
        // higher-ranked `Send` check.
        let call: ResponseFuture = Box::pin(self.take_inner().call(request));
        Box::pin(async move {
            let mut response = call.await?;
            let rule = request_headers.and_then(|request_headers| {
                let rule = storable(
                    policy,
                    response.status(),
                    response.headers(),
                    &shared.statuses,
                    shared.default_ttl,
                    shared.max_entry_bytes,
                )?;
                Some((rule, request_headers))
            });
            if let Some((rule, request_headers)) = rule {
                let status = response.status();
                let mut headers = response.headers().clone();
                headers.remove(AGE);
                headers.remove(&X_CACHE);
                let limit = usize::try_from(shared.max_entry_bytes).unwrap_or(usize::MAX);
                let store = shared.clone();
                let on_complete = Box::new(move |body| {
                    let now = Instant::now();
                    let stored = Stored {
                        status,
                        headers,
                        body,
                        stored_at: now,
                        expires_at: now + rule.ttl,
                        initial_age: rule.initial_age,
                        shared_with_authorized: rule.shared_with_authorized,
                    };
                    store
                        .store
                        .insert(primary, &rule.vary, &request_headers, stored);
                });
                response =
                    response.map(|body| TeeBody::new(body, limit, on_complete).boxed_unsync());
            }
            response
                .headers_mut()
                .insert(X_CACHE, HeaderValue::from_static("MISS"));
            Ok(response)
        })
    }
}

impl<S: Clone> Cache<S> {
    /// The readied service takes this request; a clone stays for the next one.
    fn take_inner(&mut self) -> S {
        let clone = self.inner.clone();
        std::mem::replace(&mut self.inner, clone)
    }
}

fn hit_response(stored: &Stored, now: Instant) -> Response<Body> {
    let mut response = Response::new(full_body(stored.body.clone()));
    *response.status_mut() = stored.status;
    *response.headers_mut() = stored.headers.clone();
    response
        .headers_mut()
        .insert(AGE, HeaderValue::from(stored.age(now)));
    response
        .headers_mut()
        .insert(X_CACHE, HeaderValue::from_static("HIT"));
    response
}

#[cfg(test)]
mod tests;

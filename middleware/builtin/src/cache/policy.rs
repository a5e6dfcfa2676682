//! What may be served from and stored in the cache (RFC 9111, the parts a shared cache
//! without revalidation needs).

use std::time::{Duration, SystemTime};

use http::header::{AGE, AUTHORIZATION, CACHE_CONTROL, DATE, EXPIRES, PRAGMA, SET_COOKIE, VARY};
use http::{HeaderMap, HeaderName, Method, StatusCode};

/// The `Cache-Control` directives the cache acts on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheControl {
    /// `no-store`.
    pub no_store: bool,
    /// `no-cache`.
    pub no_cache: bool,
    /// `private`.
    pub private: bool,
    /// `public`.
    pub public: bool,
    /// `must-revalidate`.
    pub must_revalidate: bool,
    /// `max-age=N`.
    pub max_age: Option<u64>,
    /// `s-maxage=N`.
    pub s_maxage: Option<u64>,
}

impl CacheControl {
    /// Parses every `Cache-Control` header of `headers`; unknown directives are ignored.
    pub fn parse(headers: &HeaderMap) -> Self {
        let mut control = Self::default();
        let values = headers
            .get_all(CACHE_CONTROL)
            .iter()
            .filter_map(|value| value.to_str().ok());
        for directive in values.flat_map(|value| value.split(',')) {
            let (name, argument) = match directive.split_once('=') {
                Some((name, argument)) => (name.trim(), Some(argument.trim().trim_matches('"'))),
                None => (directive.trim(), None),
            };
            let seconds = || argument.and_then(|text| text.parse::<u64>().ok());
            match name.to_ascii_lowercase().as_str() {
                "no-store" => control.no_store = true,
                // `no-cache="field"` only restricts fields; treat it as the plain form.
                "no-cache" => control.no_cache = true,
                "private" => control.private = true,
                "public" => control.public = true,
                "must-revalidate" | "proxy-revalidate" => control.must_revalidate = true,
                // A malformed lifetime is treated as already stale (RFC 9111 4.2.1).
                "max-age" => control.max_age = Some(seconds().unwrap_or(0)),
                "s-maxage" => control.s_maxage = Some(seconds().unwrap_or(0)),
                _ => {}
            }
        }
        control
    }
}

/// How a request may use the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestPolicy {
    /// A stored response may answer it.
    pub lookup: bool,
    /// Its response may be stored.
    pub store: bool,
    /// It carries `Authorization` (only responses marked shareable may answer or be kept).
    pub authorized: bool,
}

/// Only GET and HEAD are cached.
pub fn cacheable_method(method: &Method) -> bool {
    method == Method::GET || method == Method::HEAD
}

/// How a GET/HEAD request may use the cache: `no-cache` / `max-age=0` / `Pragma: no-cache`
/// skip the lookup (the response is still stored); `no-store` skips both.
pub fn request_policy(headers: &HeaderMap) -> RequestPolicy {
    let control = CacheControl::parse(headers);
    let pragma_no_cache = !headers.contains_key(CACHE_CONTROL)
        && headers
            .get_all(PRAGMA)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .any(|value| value.to_ascii_lowercase().contains("no-cache"));
    let refresh = control.no_cache || control.max_age == Some(0) || pragma_no_cache;
    RequestPolicy {
        lookup: !refresh && !control.no_store,
        store: !control.no_store,
        authorized: headers.contains_key(AUTHORIZATION),
    }
}

/// A response found storable: for how long, and under which request headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Storable {
    /// How long it stays fresh from now.
    pub ttl: Duration,
    /// The age it already had when it arrived (`Age` header).
    pub initial_age: Duration,
    /// Request headers named by `Vary` (lowercase, sorted, deduplicated).
    pub vary: Vec<HeaderName>,
    /// May answer requests that carry `Authorization`.
    pub shared_with_authorized: bool,
}

/// Whether a response may be stored, and for how long. `None`: pass it through uncached.
pub fn storable(
    request: RequestPolicy,
    status: StatusCode,
    headers: &HeaderMap,
    statuses: &[u16],
    default_ttl: Duration,
    max_entry_bytes: u64,
) -> Option<Storable> {
    if !request.store || !statuses.contains(&status.as_u16()) || headers.contains_key(SET_COOKIE) {
        return None;
    }
    let control = CacheControl::parse(headers);
    if control.no_store || control.no_cache || control.private {
        return None;
    }
    let shared_with_authorized =
        control.public || control.s_maxage.is_some() || control.must_revalidate;
    if request.authorized && !shared_with_authorized {
        return None;
    }
    let too_large = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok())
        .is_some_and(|length| length > max_entry_bytes);
    if too_large {
        return None;
    }
    let vary = vary_names(headers)?;
    let lifetime = match (control.s_maxage, control.max_age) {
        (Some(seconds), _) | (None, Some(seconds)) => Duration::from_secs(seconds),
        (None, None) => expires_lifetime(headers).unwrap_or(default_ttl),
    };
    let initial_age = Duration::from_secs(
        headers
            .get(AGE)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.trim().parse().ok())
            .unwrap_or(0),
    );
    let ttl = lifetime.saturating_sub(initial_age);
    if ttl.is_zero() {
        return None;
    }
    Some(Storable {
        ttl,
        initial_age,
        vary,
        shared_with_authorized,
    })
}

/// Header names listed in `Vary`; `None` for `Vary: *` (never matches a later request).
pub fn vary_names(headers: &HeaderMap) -> Option<Vec<HeaderName>> {
    let mut names = Vec::new();
    let values = headers
        .get_all(VARY)
        .iter()
        .filter_map(|value| value.to_str().ok());
    for name in values
        .flat_map(|value| value.split(','))
        .map(str::trim)
        .filter(|name| !name.is_empty())
    {
        if name == "*" {
            return None;
        }
        // HeaderName parsing lowercases; an invalid name can never match a request header.
        if let Ok(name) = HeaderName::try_from(name) {
            names.push(name);
        }
    }
    names.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    names.dedup();
    Some(names)
}

/// `Expires - Date` (or `Expires - now`); an invalid `Expires` means already expired.
fn expires_lifetime(headers: &HeaderMap) -> Option<Duration> {
    let expires = headers.get(EXPIRES)?;
    let Some(expires) = expires
        .to_str()
        .ok()
        .and_then(|text| httpdate::parse_http_date(text).ok())
    else {
        return Some(Duration::ZERO);
    };
    let date = headers
        .get(DATE)
        .and_then(|value| value.to_str().ok())
        .and_then(|text| httpdate::parse_http_date(text).ok())
        .unwrap_or_else(SystemTime::now);
    Some(expires.duration_since(date).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::try_from(*name).expect("name"),
                HeaderValue::try_from(*value).expect("value"),
            );
        }
        map
    }

    const ANON: RequestPolicy = RequestPolicy {
        lookup: true,
        store: true,
        authorized: false,
    };

    fn ttl(pairs: &[(&str, &str)]) -> Option<u64> {
        storable(
            ANON,
            StatusCode::OK,
            &headers(pairs),
            &[200],
            Duration::from_secs(60),
            1000,
        )
        .map(|s| s.ttl.as_secs())
    }

    #[test]
    fn lifetimes() {
        assert_eq!(ttl(&[]), Some(60));
        assert_eq!(ttl(&[("cache-control", "public, max-age=30")]), Some(30));
        assert_eq!(
            ttl(&[("cache-control", "max-age=30, s-maxage=90")]),
            Some(90)
        );
        assert_eq!(
            ttl(&[("cache-control", "max-age=30"), ("age", "10")]),
            Some(20)
        );
        assert_eq!(ttl(&[("cache-control", "max-age=0")]), None);
        assert_eq!(ttl(&[("cache-control", "max-age=soon")]), None);
        assert_eq!(
            ttl(&[
                ("date", "Sun, 06 Nov 1994 08:49:37 GMT"),
                ("expires", "Sun, 06 Nov 1994 08:51:37 GMT")
            ]),
            Some(120)
        );
        assert_eq!(ttl(&[("expires", "0")]), None);
    }

    #[test]
    fn responses_that_must_not_be_stored() {
        for pairs in [
            &[("cache-control", "no-store")][..],
            &[("cache-control", "private, max-age=60")],
            &[("cache-control", "No-Cache")],
            &[("set-cookie", "a=b")],
            &[("vary", "*")],
            &[("content-length", "1001")],
        ] {
            assert_eq!(ttl(pairs), None, "{pairs:?}");
        }
        assert!(
            storable(
                ANON,
                StatusCode::CREATED,
                &HeaderMap::new(),
                &[200],
                Duration::from_secs(1),
                10
            )
            .is_none()
        );
        let no_store_request = RequestPolicy {
            store: false,
            ..ANON
        };
        assert!(
            storable(
                no_store_request,
                StatusCode::OK,
                &HeaderMap::new(),
                &[200],
                Duration::from_secs(1),
                10
            )
            .is_none()
        );
        // Responses to authorized requests only when marked shareable.
        let authorized = RequestPolicy {
            authorized: true,
            ..ANON
        };
        assert!(
            storable(
                authorized,
                StatusCode::OK,
                &HeaderMap::new(),
                &[200],
                Duration::from_secs(1),
                10
            )
            .is_none()
        );
        let public = headers(&[("cache-control", "public")]);
        let stored = storable(
            authorized,
            StatusCode::OK,
            &public,
            &[200],
            Duration::from_secs(1),
            10,
        )
        .expect("public");
        assert!(stored.shared_with_authorized);
    }

    #[test]
    fn vary_names_are_normalised() {
        let names = vary_names(&headers(&[
            ("vary", "User-Agent, accept-encoding"),
            ("vary", "Accept-Encoding"),
        ]));
        assert_eq!(
            names,
            Some(vec![
                HeaderName::from_static("accept-encoding"),
                HeaderName::from_static("user-agent")
            ])
        );
        assert_eq!(vary_names(&headers(&[("vary", "accept, *")])), None);
    }

    #[test]
    fn request_directives() {
        assert_eq!(request_policy(&HeaderMap::new()), ANON);
        let refresh = request_policy(&headers(&[("cache-control", "no-cache")]));
        assert_eq!((refresh.lookup, refresh.store), (false, true));
        assert!(!request_policy(&headers(&[("cache-control", "max-age=0")])).lookup);
        assert!(!request_policy(&headers(&[("pragma", "no-cache")])).lookup);
        let no_store = request_policy(&headers(&[("cache-control", "no-store")]));
        assert_eq!((no_store.lookup, no_store.store), (false, false));
        assert!(request_policy(&headers(&[("authorization", "Bearer x")])).authorized);
    }
}

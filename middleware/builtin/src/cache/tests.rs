use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::BodyExt;
use serde_json::json;
use tower::ServiceExt;
use tower::util::BoxCloneSyncService;

use super::*;
use middleware::{EndpointInfo, RoundTripper, empty_body};

/// An upstream answering with the headers in `reply` and a body counting its hits.
#[derive(Clone, Default)]
struct Upstream {
    hits: Arc<AtomicUsize>,
    reply: Arc<Mutex<Vec<(&'static str, String)>>>,
    body_size: Arc<AtomicUsize>,
}

impl Upstream {
    fn set_reply(&self, headers: &[(&'static str, &str)]) {
        *self.reply.lock().expect("lock") = headers
            .iter()
            .map(|(name, value)| (*name, value.to_string()))
            .collect();
    }

    fn tripper(&self) -> RoundTripper {
        let upstream = self.clone();
        BoxCloneSyncService::new(tower::service_fn(move |request: Request<Body>| {
            let upstream = upstream.clone();
            async move {
                let hit = upstream.hits.fetch_add(1, Ordering::SeqCst) + 1;
                let size = upstream.body_size.load(Ordering::SeqCst);
                let body = if size > 0 {
                    "x".repeat(size)
                } else {
                    format!("hit {hit} {}", request.uri())
                };
                let mut response = Response::new(full_body(body));
                for (name, value) in upstream.reply.lock().expect("lock").iter() {
                    if *name == "status" {
                        *response.status_mut() = StatusCode::from_u16(value.parse()?)?;
                    } else {
                        response.headers_mut().append(*name, value.parse()?);
                    }
                }
                if let Some(language) = request.headers().get("accept-language") {
                    response
                        .headers_mut()
                        .insert("x-language", language.clone());
                }
                Ok::<_, BoxError>(response)
            }
        }))
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

fn cache(options: serde_json::Value, upstream: &Upstream) -> RoundTripper {
    let ctx = BuildContext::new(Arc::new(EndpointInfo::default()));
    let config = configs::Middleware {
        name: NAME.into(),
        options,
        required: true,
    };
    factory(&config, &ctx)
        .expect("builds")
        .wrap(upstream.tripper())
}

struct Seen {
    status: u16,
    body: String,
    headers: HeaderMap,
}

impl Seen {
    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|value| value.to_str().ok())
            .unwrap_or("")
    }
}

async fn send(tripper: &RoundTripper, method: Method, uri: &str, headers: &[(&str, &str)]) -> Seen {
    let mut builder = Request::builder()
        .method(method)
        .uri(uri)
        .header("host", "example.test");
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let response = tripper
        .clone()
        .oneshot(builder.body(empty_body()).expect("request"))
        .await
        .expect("response");
    let (parts, body) = response.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    Seen {
        status: parts.status.as_u16(),
        body: String::from_utf8_lossy(&body).into_owned(),
        headers: parts.headers,
    }
}

async fn get(tripper: &RoundTripper, uri: &str) -> Seen {
    send(tripper, Method::GET, uri, &[]).await
}

#[tokio::test(start_paused = true)]
async fn hit_miss_and_expiry() {
    let upstream = Upstream::default();
    let tripper = cache(json!({"defaultTtl": "10s"}), &upstream);
    let first = get(&tripper, "/a?x=1").await;
    assert_eq!(
        (first.header("x-cache"), first.body.as_str()),
        ("MISS", "hit 1 /a?x=1")
    );
    tokio::time::advance(Duration::from_secs(3)).await;
    let second = get(&tripper, "/a?x=1").await;
    assert_eq!(
        (second.header("x-cache"), second.body.as_str()),
        ("HIT", "hit 1 /a?x=1")
    );
    assert_eq!(second.header("age"), "3");
    assert_eq!(upstream.hits(), 1, "a hit does not reach the upstream");

    // Another query string is another entry.
    assert_eq!(get(&tripper, "/a?x=2").await.header("x-cache"), "MISS");
    tokio::time::advance(Duration::from_secs(7)).await;
    let expired = get(&tripper, "/a?x=1").await;
    assert_eq!(
        (expired.header("x-cache"), expired.body.as_str()),
        ("MISS", "hit 3 /a?x=1")
    );
    assert_eq!(upstream.hits(), 3);
}

#[tokio::test(start_paused = true)]
async fn cache_control_from_the_upstream_is_honoured() {
    let upstream = Upstream::default();
    let tripper = cache(json!({"defaultTtl": "0s"}), &upstream);
    // No lifetime and no default: not stored.
    get(&tripper, "/plain").await;
    assert_eq!(get(&tripper, "/plain").await.header("x-cache"), "MISS");
    for control in ["no-store", "private, max-age=60", "no-cache"] {
        upstream.set_reply(&[("cache-control", control)]);
        get(&tripper, "/c").await;
        assert_eq!(
            get(&tripper, "/c").await.header("x-cache"),
            "MISS",
            "{control}"
        );
    }
    upstream.set_reply(&[("cache-control", "max-age=5"), ("age", "2")]);
    get(&tripper, "/m").await;
    let hit = get(&tripper, "/m").await;
    assert_eq!((hit.header("x-cache"), hit.header("age")), ("HIT", "2"));
    tokio::time::advance(Duration::from_secs(3)).await;
    assert_eq!(
        get(&tripper, "/m").await.header("x-cache"),
        "MISS",
        "max-age minus the upstream's Age"
    );
    // Statuses outside the list pass through.
    upstream.set_reply(&[("cache-control", "max-age=60"), ("status", "500")]);
    get(&tripper, "/e").await;
    assert_eq!(get(&tripper, "/e").await.header("x-cache"), "MISS");
}

#[tokio::test(start_paused = true)]
async fn vary_splits_entries() {
    let upstream = Upstream::default();
    upstream.set_reply(&[("vary", "Accept-Language")]);
    let tripper = cache(json!({}), &upstream);
    let english = [("accept-language", "en")];
    let french = [("accept-language", "fr")];
    assert_eq!(
        send(&tripper, Method::GET, "/v", &english)
            .await
            .header("x-cache"),
        "MISS"
    );
    assert_eq!(
        send(&tripper, Method::GET, "/v", &french)
            .await
            .header("x-cache"),
        "MISS"
    );
    let en = send(&tripper, Method::GET, "/v", &english).await;
    let fr = send(&tripper, Method::GET, "/v", &french).await;
    assert_eq!(
        (en.header("x-cache"), en.header("x-language")),
        ("HIT", "en")
    );
    assert_eq!(
        (fr.header("x-cache"), fr.header("x-language")),
        ("HIT", "fr")
    );
    assert_eq!(upstream.hits(), 2);
}

#[tokio::test(start_paused = true)]
async fn request_directives_and_authorization() {
    let upstream = Upstream::default();
    let tripper = cache(json!({}), &upstream);
    get(&tripper, "/r").await;
    // no-cache refreshes the entry.
    let refreshed = send(
        &tripper,
        Method::GET,
        "/r",
        &[("cache-control", "no-cache")],
    )
    .await;
    assert_eq!(
        (refreshed.header("x-cache"), refreshed.body.as_str()),
        ("MISS", "hit 2 /r")
    );
    assert_eq!(get(&tripper, "/r").await.body, "hit 2 /r");
    // no-store neither reads nor writes.
    assert_eq!(
        send(
            &tripper,
            Method::GET,
            "/s",
            &[("cache-control", "no-store")]
        )
        .await
        .header("x-cache"),
        "MISS"
    );
    assert_eq!(get(&tripper, "/s").await.header("x-cache"), "MISS");

    // Authorized requests: not served from, nor stored in, the shared cache...
    let auth = [("authorization", "Bearer t")];
    assert_eq!(
        send(&tripper, Method::GET, "/r", &auth)
            .await
            .header("x-cache"),
        "MISS"
    );
    send(&tripper, Method::GET, "/private", &auth).await;
    assert_eq!(
        send(&tripper, Method::GET, "/private", &auth)
            .await
            .header("x-cache"),
        "MISS"
    );
    // ...unless the response says it may be shared.
    upstream.set_reply(&[("cache-control", "public, max-age=60")]);
    send(&tripper, Method::GET, "/public", &auth).await;
    assert_eq!(
        send(&tripper, Method::GET, "/public", &auth)
            .await
            .header("x-cache"),
        "HIT"
    );
}

#[tokio::test(start_paused = true)]
async fn head_has_its_own_entries_and_writes_invalidate() {
    let upstream = Upstream::default();
    let tripper = cache(json!({}), &upstream);
    get(&tripper, "/w").await;
    assert_eq!(
        send(&tripper, Method::HEAD, "/w", &[])
            .await
            .header("x-cache"),
        "MISS"
    );
    assert_eq!(
        send(&tripper, Method::HEAD, "/w", &[])
            .await
            .header("x-cache"),
        "HIT"
    );
    let post = send(&tripper, Method::POST, "/w", &[]).await;
    assert_eq!(
        post.header("x-cache"),
        "",
        "non-cacheable methods carry no X-Cache"
    );
    assert_eq!(get(&tripper, "/w").await.header("x-cache"), "MISS");
    assert_eq!(
        send(&tripper, Method::HEAD, "/w", &[])
            .await
            .header("x-cache"),
        "MISS"
    );
}

#[tokio::test(start_paused = true)]
async fn large_bodies_stream_through_uncached() {
    let upstream = Upstream::default();
    upstream.body_size.store(2048, Ordering::SeqCst);
    let tripper = cache(
        json!({"maxEntryBytes": 1024, "maxBytes": "65536"}),
        &upstream,
    );
    let first = get(&tripper, "/big").await;
    assert_eq!((first.status, first.body.len()), (200, 2048));
    assert_eq!(get(&tripper, "/big").await.header("x-cache"), "MISS");
    upstream.body_size.store(512, Ordering::SeqCst);
    get(&tripper, "/small").await;
    assert_eq!(get(&tripper, "/small").await.header("x-cache"), "HIT");
}

#[tokio::test]
async fn bad_options_name_the_field() {
    let ctx = BuildContext::new(Arc::new(EndpointInfo::default()));
    for (options, expected) in [
        (json!({"maxBytes": 0}), "options.maxBytes:"),
        (
            json!({"maxBytes": 10, "maxEntryBytes": 11}),
            "options.maxEntryBytes:",
        ),
        (
            json!({"statusCodes": [200, 100]}),
            "options.statusCodes: 100",
        ),
        (json!({"defaultTtl": "forever"}), "options.defaultTtl:"),
        (json!({"ttl": "1s"}), "unknown field `ttl`"),
    ] {
        let config = configs::Middleware {
            name: NAME.into(),
            options: options.clone(),
            required: true,
        };
        let message = factory(&config, &ctx)
            .err()
            .map(|err| err.to_string())
            .unwrap_or_default();
        assert!(
            message.starts_with("middleware cache: ") && message.contains(expected),
            "{options}: {message}"
        );
    }
}

//! The proxy as a library: an embedder's own middleware, a panicking handler, a failed
//! update leaving the old router in place.

use std::net::SocketAddr;

use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use middleware::{BuildError, Middleware, Registry};
use proxy::Proxy;
use tests::embedded::{parse, proxy_with};
use tests::harness::Upstream;

async fn call(proxy: &Proxy, path: &str) -> (u16, String) {
    let peer: SocketAddr = "127.0.0.1:40000".parse().unwrap();
    let response = proxy
        .handle(
            Request::get(path)
                .body(Full::<bytes::Bytes>::default())
                .unwrap(),
            peer,
        )
        .await;
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

fn panicking(
    _: &configs::Middleware,
    _: &middleware::BuildContext,
) -> Result<Middleware, BuildError> {
    Ok(Middleware::from_fn("boom", |_next| {
        tower::util::BoxCloneSyncService::new(tower::service_fn(
            |_req: Request<middleware::Body>| async move {
                if std::env::var_os("NEVER_SET_GATEWAY_TEST").is_none() {
                    panic!("middleware bug");
                }
                Ok::<Response<middleware::Body>, middleware::BoxError>(Response::new(
                    middleware::empty_body(),
                ))
            },
        ))
    }))
}

fn refusing(
    config: &configs::Middleware,
    _: &middleware::BuildContext,
) -> Result<Middleware, BuildError> {
    Err(BuildError::new(
        &config.name,
        "options.limit: must be positive",
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_becomes_502_and_the_proxy_keeps_serving() {
    let upstream = Upstream::named("u").await;
    let mut registry = Registry::new();
    registry.register("boom", panicking);
    let proxy = proxy_with(registry);
    proxy
        .update(&parse(&format!(
            "endpoints:\n  - path: /boom\n    middlewares: [{{name: boom}}]\n    backends: [{{target: {t}}}]\n  - path: /ok\n    backends: [{{target: {t}}}]\n",
            t = upstream.target()
        )))
        .unwrap();
    assert_eq!(call(&proxy, "/boom").await.0, 502);
    assert_eq!(call(&proxy, "/ok").await, (200, "u".into()));
    assert_eq!(upstream.hits(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_update_keeps_the_old_router() {
    let upstream = Upstream::named("u").await;
    let mut registry = Registry::new();
    registry.register("strict", refusing);
    let proxy = proxy_with(registry);
    proxy
        .update(&parse(&format!(
            "endpoints:\n  - path: /old\n    backends: [{{target: {}}}]\n",
            upstream.target()
        )))
        .unwrap();
    // An unknown middleware that is not required is skipped.
    proxy
        .update(&parse(&format!(
            "endpoints:\n  - path: /old\n    middlewares: [{{name: nosuch}}]\n    backends: [{{target: {}}}]\n",
            upstream.target()
        )))
        .unwrap();
    assert_eq!(call(&proxy, "/old").await.0, 200);
    // A required unknown one, and one whose build fails, fail the whole update.
    for middleware in ["{name: nosuch, required: true}", "{name: strict}"] {
        let err = proxy
            .update(&parse(&format!(
                "endpoints:\n  - path: /new\n    middlewares: [{middleware}]\n    backends: [{{target: {}}}]\n",
                upstream.target()
            )))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/new"), "names the endpoint: {err}");
        assert!(
            err.contains("nosuch") || err.contains("options.limit"),
            "names middleware and field: {err}"
        );
        assert_eq!(
            call(&proxy, "/old").await.0,
            200,
            "old router still serving"
        );
        assert_eq!(call(&proxy, "/new").await.0, 404);
    }
}

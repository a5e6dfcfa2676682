//! A client for the gateway's admin API (`--admin-addr`), for the admin and fleet tests.

use std::net::SocketAddr;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;

use crate::harness::{Reply, send};

/// The token the tests start gateways with.
pub const TOKEN: &str = "test-admin-token";

/// The flags of an admin API on a free port with [`TOKEN`] and the store `store`.
pub fn flags(store: &str) -> Vec<String> {
    [
        "--admin-addr",
        "127.0.0.1:0",
        "--admin-token",
        TOKEN,
        "--store",
        store,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// An admin call: `method path` on `addr` with `token` (none: no `Authorization`), extra
/// headers, and a body.
pub async fn call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Reply {
    let mut req = Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"));
    if let Some(token) = token {
        req = req.header("authorization", format!("Bearer {token}"));
    }
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    send(req.body(Full::new(body.into())).expect("request")).await
}

/// GET with [`TOKEN`].
pub async fn get(addr: SocketAddr, path: &str) -> Reply {
    call(addr, "GET", path, Some(TOKEN), &[], Bytes::new()).await
}

/// PUT a JSON endpoint under `id` with [`TOKEN`] and extra headers.
pub async fn put(
    addr: SocketAddr,
    id: &str,
    endpoint: &serde_json::Value,
    headers: &[(&str, &str)],
) -> Reply {
    let mut all = vec![("content-type", "application/json")];
    all.extend_from_slice(headers);
    call(
        addr,
        "PUT",
        &format!("/admin/v1/endpoints/{id}"),
        Some(TOKEN),
        &all,
        endpoint.to_string(),
    )
    .await
}

/// DELETE `id` with [`TOKEN`] and extra headers.
pub async fn delete(addr: SocketAddr, id: &str, headers: &[(&str, &str)]) -> Reply {
    call(
        addr,
        "DELETE",
        &format!("/admin/v1/endpoints/{id}"),
        Some(TOKEN),
        headers,
        Bytes::new(),
    )
    .await
}

/// The JSON body of `reply`; panics naming the body when it is not JSON.
pub fn json(reply: &Reply) -> serde_json::Value {
    serde_json::from_str(&reply.body)
        .unwrap_or_else(|err| panic!("not JSON ({err}): {:?}", reply.body))
}

/// An endpoint `path` (prefix) proxied to `target`.
pub fn endpoint(path: &str, target: &str) -> serde_json::Value {
    serde_json::json!({ "path": path, "backends": [{ "target": target }] })
}

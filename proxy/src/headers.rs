//! Header rules of a proxy hop: hop-by-hop removal and `X-Forwarded-For`.

use std::net::IpAddr;

use http::header::{CONNECTION, HeaderMap, HeaderName, HeaderValue, TE};

static HOP_BY_HOP: [HeaderName; 8] = [
    CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    http::header::PROXY_AUTHENTICATE,
    http::header::PROXY_AUTHORIZATION,
    TE,
    http::header::TRAILER,
    http::header::TRANSFER_ENCODING,
];

/// Removes hop-by-hop headers and every header named in `Connection` (RFC 9110 §7.6.1).
/// `TE: trailers` survives when `keep_te_trailers` (gRPC needs it end to end).
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap, keep_te_trailers: bool) {
    let te_trailers = keep_te_trailers
        && headers
            .get(TE)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    if headers.contains_key(CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
    headers.remove(http::header::UPGRADE);
    if te_trailers {
        headers.insert(TE, HeaderValue::from_static("trailers"));
    }
}

/// Appends the peer's address to `X-Forwarded-For` (one combined header).
pub(crate) fn append_forwarded_for(headers: &mut HeaderMap, peer: IpAddr) {
    static XFF: HeaderName = HeaderName::from_static("x-forwarded-for");
    let peer = peer.to_string();
    let value = match headers.get(&XFF).and_then(|v| v.to_str().ok()) {
        Some(prior) if !prior.trim().is_empty() => {
            let mut combined = String::with_capacity(prior.len() + 2 + peer.len());
            for (i, v) in headers
                .get_all(&XFF)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .enumerate()
            {
                if i > 0 {
                    combined.push_str(", ");
                }
                combined.push_str(v.trim());
            }
            combined.push_str(", ");
            combined.push_str(&peer);
            combined
        }
        _ => peer,
    };
    if let Ok(value) = HeaderValue::from_str(&value) {
        headers.insert(&XFF, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_hop_by_hop_and_connection_named() {
        let mut h = HeaderMap::new();
        h.insert(CONNECTION, HeaderValue::from_static("close, X-Secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(TE, HeaderValue::from_static("trailers"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
        let mut h = HeaderMap::new();
        h.insert(TE, HeaderValue::from_static("trailers"));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h.get(TE).map(|v| v.as_bytes()), Some(&b"trailers"[..]));
    }

    #[test]
    fn forwarded_for_appends() {
        let mut h = HeaderMap::new();
        append_forwarded_for(&mut h, "10.0.0.1".parse().unwrap());
        assert_eq!(h["x-forwarded-for"], "10.0.0.1");
        h.append("x-forwarded-for", HeaderValue::from_static("1.1.1.1"));
        append_forwarded_for(&mut h, "127.0.0.1".parse().unwrap());
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 1.1.1.1, 127.0.0.1");
    }
}

//! Header rules of a proxy hop: the `Host` check, hop-by-hop removal and
//! `X-Forwarded-For`.

use std::net::IpAddr;

use http::header::{CONNECTION, HOST, HeaderMap, HeaderName, HeaderValue, TE, UPGRADE};
use http::{Request, Version};

/// Why a request's `Host` makes it unroutable (RFC 9112 §3.2: answer 400), or `None`.
///
/// Refused: more than one `Host` header; none on an HTTP/1.1 request (HTTP/1.0 may omit
/// it, HTTP/2 carries `:authority` instead); a value that is not `host[:port]` (no
/// userinfo, path or whitespace); on HTTP/2, a `Host` naming another host than
/// `:authority` (RFC 9113 §8.3.1; ports are not compared, routing ignores them). Routing
/// and forwarding then agree on one host.
pub(crate) fn host_problem<B>(req: &Request<B>) -> Option<&'static str> {
    let mut hosts = req.headers().get_all(HOST).iter();
    let Some(host) = hosts.next() else {
        return (req.version() == Version::HTTP_11).then_some("missing Host header");
    };
    if hosts.next().is_some() {
        return Some("more than one Host header");
    }
    if !is_host_value(host.as_bytes()) {
        return Some("invalid Host header");
    }
    if req.version() == Version::HTTP_2
        && let Some(authority) = req.uri().authority()
        && !authority
            .host()
            .eq_ignore_ascii_case(host_name(host.to_str().unwrap_or_default()))
    {
        return Some("Host differs from :authority");
    }
    None
}

/// The name part of a valid `Host` value (its port left out; an IP literal keeps its
/// brackets, as `http::uri::Authority::host` does).
fn host_name(host: &str) -> &str {
    match host.rfind(':') {
        Some(colon) if !host[colon..].contains(']') => &host[..colon],
        _ => host,
    }
}

/// `uri-host [ ":" port ]` (RFC 9110 §7.2): an IP literal in brackets or a reg-name
/// (unreserved, percent-escapes, sub-delims), then optionally `:` and digits. Empty is
/// allowed (a request target without authority).
fn is_host_value(value: &[u8]) -> bool {
    let (host, port) = match value.strip_prefix(b"[") {
        Some(literal) => match literal.iter().position(|&b| b == b']') {
            Some(end) => {
                let address = &literal[..end];
                let valid = !address.is_empty()
                    && address
                        .iter()
                        .all(|&b| b.is_ascii_hexdigit() || matches!(b, b':' | b'.'));
                if !valid {
                    return false;
                }
                (&b""[..], &literal[end + 1..])
            }
            None => return false,
        },
        None => match value.iter().position(|&b| b == b':') {
            Some(colon) => (&value[..colon], &value[colon..]),
            None => (value, &b""[..]),
        },
    };
    let port_ok = match port.split_first() {
        None => true,
        Some((b':', digits)) => digits.iter().all(u8::is_ascii_digit),
        Some(_) => false,
    };
    port_ok
        && host.iter().all(|&b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'-' | b'.'
                        | b'_'
                        | b'~'
                        | b'%'
                        | b'!'
                        | b'$'
                        | b'&'
                        | b'\''
                        | b'('
                        | b')'
                        | b'*'
                        | b'+'
                        | b','
                        | b';'
                        | b'='
                )
        })
}

/// Hop-by-hop headers (RFC 9110 §7.6.1 plus the legacy `Keep-Alive`/`Proxy-Connection`).
static HOP_BY_HOP: [HeaderName; 9] = [
    CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    http::header::PROXY_AUTHENTICATE,
    http::header::PROXY_AUTHORIZATION,
    TE,
    http::header::TRAILER,
    http::header::TRANSFER_ENCODING,
    UPGRADE,
];

/// Which hop-by-hop headers a message carries: bit `i` stands for `HOP_BY_HOP[i]`.
pub(crate) type HopByHop = u16;

/// `Connection` and `Upgrade` both present: the message may ask for (or grant) an upgrade.
pub(crate) const MAY_UPGRADE: HopByHop = 1 << CONNECTION_INDEX | 1 << UPGRADE_INDEX;

/// One pass over the names finds which hop-by-hop headers are present (usually none, or
/// just `Connection: keep-alive`); only those are later looked up and removed.
pub(crate) fn hop_by_hop_present(headers: &HeaderMap) -> HopByHop {
    let mut present = 0;
    for name in headers.keys() {
        if let Some(i) = hop_by_hop_index(name) {
            present |= 1 << i;
        }
    }
    present
}

/// Removes hop-by-hop headers and every header named in `Connection` (RFC 9110 §7.6.1).
/// `TE: trailers` survives when `keep_te_trailers` (gRPC needs it end to end).
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap, keep_te_trailers: bool) {
    let present = hop_by_hop_present(headers);
    strip_present(headers, present, keep_te_trailers);
}

/// Whether a message whose hop-by-hop headers are `present` asks for an upgrade that may
/// be tunnelled: an `Upgrade` header, and `upgrade` among the `Connection` tokens (RFC 9110
/// §7.8). Only messages carrying both headers pay for the token scans.
///
/// `Upgrade: h2c` is never tunnelled: behind it the client would speak HTTP/2 to the node
/// directly, every later request bypassing routing and middlewares ("h2c smuggling");
/// RFC 9113 has dropped that upgrade anyway. Such a request is served as an ordinary one.
pub(crate) fn asks_upgrade(headers: &HeaderMap, present: HopByHop) -> bool {
    present & MAY_UPGRADE == MAY_UPGRADE
        && has_token(headers, &CONNECTION, b"upgrade")
        && !has_token(headers, &UPGRADE, b"h2c")
}

/// Whether a comma-separated header lists `token` (case-insensitively; an `Upgrade`
/// protocol's `/version` is part of its token, so `h2c` does not match `h2c/1`).
fn has_token(headers: &HeaderMap, name: &HeaderName, token: &[u8]) -> bool {
    headers.get_all(name).iter().any(|value| {
        value
            .as_bytes()
            .split(|&b| b == b',')
            .any(|listed| listed.trim_ascii().eq_ignore_ascii_case(token))
    })
}

/// The hop-by-hop rules for an upgrade request or its `101` answer: every hop-by-hop
/// header goes (as in [`strip_hop_by_hop`]) except the upgrade itself, which is forwarded
/// as `Connection: upgrade` and the message's own `Upgrade` values.
pub(crate) fn strip_keeping_upgrade(headers: &mut HeaderMap, present: HopByHop) {
    let protocols: Vec<HeaderValue> = headers.get_all(UPGRADE).iter().cloned().collect();
    strip_present(headers, present, false);
    headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    for protocol in protocols {
        headers.append(UPGRADE, protocol);
    }
}

/// [`strip_hop_by_hop`] with the presence scan already done.
pub(crate) fn strip_present(headers: &mut HeaderMap, present: HopByHop, keep_te_trailers: bool) {
    if present == 0 {
        return;
    }
    let te_trailers = keep_te_trailers
        && present & (1 << TE_INDEX) != 0
        && headers
            .get(TE)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    if present & (1 << CONNECTION_INDEX) != 0 && !names_nothing(headers) {
        // `Connection: keep-alive` (or `close`, `upgrade`) names nothing else to remove: the
        // common case costs no allocation.
        let listed = || {
            headers
                .get_all(CONNECTION)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .map(str::trim)
                .filter(|name| {
                    !name.is_empty()
                        && !name.eq_ignore_ascii_case("close")
                        && !HOP_BY_HOP
                            .iter()
                            .any(|hop| name.eq_ignore_ascii_case(hop.as_str()))
                })
        };
        if listed().next().is_some() {
            let listed: Vec<HeaderName> = listed()
                .filter_map(|name| HeaderName::from_bytes(name.as_bytes()).ok())
                .collect();
            for name in listed {
                headers.remove(name);
            }
        }
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(name);
        }
    }
    if te_trailers {
        headers.insert(TE, HeaderValue::from_static("trailers"));
    }
}

/// Whether the message has exactly one `Connection` value and it is `keep-alive` or
/// `close`, what nearly every upstream sends: it names no header to remove, and checking
/// that directly skips the token scan (about 0.4k instructions per response).
fn names_nothing(headers: &HeaderMap) -> bool {
    let mut values = headers.get_all(CONNECTION).iter();
    match (values.next(), values.next()) {
        (Some(value), None) => {
            let value = value.as_bytes();
            value.eq_ignore_ascii_case(b"keep-alive") || value.eq_ignore_ascii_case(b"close")
        }
        _ => false,
    }
}

const CONNECTION_INDEX: usize = 0;
const TE_INDEX: usize = 5;
const UPGRADE_INDEX: usize = 8;

fn hop_by_hop_index(name: &HeaderName) -> Option<usize> {
    Some(match name.as_str() {
        "connection" => CONNECTION_INDEX,
        "keep-alive" => 1,
        "proxy-connection" => 2,
        "proxy-authenticate" => 3,
        "proxy-authorization" => 4,
        "te" => TE_INDEX,
        "trailer" => 6,
        "transfer-encoding" => 7,
        "upgrade" => UPGRADE_INDEX,
        _ => return None,
    })
}

/// Appends the peer's address to `X-Forwarded-For` (one combined header).
pub(crate) fn append_forwarded_for(headers: &mut HeaderMap, peer: IpAddr) {
    static XFF: HeaderName = HeaderName::from_static("x-forwarded-for");
    // One hash of the name in the common case (no header yet): an entry, not a lookup
    // followed by an insert.
    if let http::header::Entry::Vacant(slot) = headers.entry(&XFF) {
        slot.insert(cached_ip_value(peer));
        return;
    }
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

thread_local! {
    /// The last peer address formatted on this thread: keep-alive connections send many
    /// requests from one address, so most requests reuse it (a reference-count bump).
    static LAST_PEER: std::cell::RefCell<Option<(IpAddr, HeaderValue)>> =
        const { std::cell::RefCell::new(None) };
}

fn cached_ip_value(peer: IpAddr) -> HeaderValue {
    LAST_PEER.with(|last| {
        let mut last = last.borrow_mut();
        if let Some((ip, value)) = last.as_ref()
            && *ip == peer
        {
            return value.clone();
        }
        let value = ip_value(peer);
        *last = Some((peer, value.clone()));
        value
    })
}

/// The peer address as a header value; IPv4 without the formatting machinery (it runs on
/// every request).
fn ip_value(peer: IpAddr) -> HeaderValue {
    let IpAddr::V4(v4) = peer else {
        return HeaderValue::from_str(&peer.to_string())
            .unwrap_or(HeaderValue::from_static("unknown"));
    };
    let mut buf = [0u8; 15];
    let mut len = 0;
    for (i, octet) in v4.octets().into_iter().enumerate() {
        if i > 0 {
            buf[len] = b'.';
            len += 1;
        }
        if octet >= 100 {
            buf[len] = b'0' + octet / 100;
            len += 1;
        }
        if octet >= 10 {
            buf[len] = b'0' + (octet / 10) % 10;
            len += 1;
        }
        buf[len] = b'0' + octet % 10;
        len += 1;
    }
    HeaderValue::from_bytes(&buf[..len]).unwrap_or(HeaderValue::from_static("unknown"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn hosts_of_the_grammar_pass_and_one_bad_byte_fails(
            name in "[a-zA-Z0-9._~-]{1,20}",
            port in proptest::option::of(0u32..70000),
            bad in "[ /@?#\\[\\]\t\"<>{}|^`]",
            at in any::<proptest::sample::Index>(),
        ) {
            let host = match port {
                Some(port) => format!("{name}:{port}"),
                None => name.clone(),
            };
            prop_assert!(is_host_value(host.as_bytes()), "{}", host);
            let mut broken = name.clone();
            broken.insert_str(at.index(name.len() + 1), &bad);
            prop_assert!(!is_host_value(broken.as_bytes()), "{:?}", broken);
        }
    }

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
    fn upgrades_are_recognised_and_kept() {
        let mut h = HeaderMap::new();
        h.insert(CONNECTION, HeaderValue::from_static("keep-alive, Upgrade"));
        h.insert(UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("sec-websocket-key", HeaderValue::from_static("x"));
        let present = hop_by_hop_present(&h);
        assert!(asks_upgrade(&h, present));
        strip_keeping_upgrade(&mut h, present);
        assert_eq!(h[CONNECTION], "upgrade");
        assert_eq!(h[UPGRADE], "websocket");
        assert!(h.contains_key("sec-websocket-key"));
        assert!(!h.contains_key("keep-alive"));
        assert_eq!(h.len(), 3);

        // `Upgrade` without the `upgrade` token in `Connection` (or without `Connection`)
        // is no upgrade, and is stripped like any hop-by-hop header.
        for connection in [Some("keep-alive"), Some("upgraded"), None] {
            let mut h = HeaderMap::new();
            h.insert(UPGRADE, HeaderValue::from_static("websocket"));
            if let Some(connection) = connection {
                h.insert(CONNECTION, HeaderValue::from_static(connection));
            }
            assert!(!asks_upgrade(&h, hop_by_hop_present(&h)), "{connection:?}");
            strip_hop_by_hop(&mut h, false);
            assert!(h.is_empty());
        }

        // An h2c upgrade is no tunnel, alone or among other protocols.
        for protocols in ["h2c", "websocket, H2C"] {
            let mut h = HeaderMap::new();
            h.insert(
                CONNECTION,
                HeaderValue::from_static("Upgrade, HTTP2-Settings"),
            );
            h.insert(UPGRADE, HeaderValue::from_static(protocols));
            assert!(!asks_upgrade(&h, hop_by_hop_present(&h)), "{protocols}");
        }
    }

    #[test]
    fn host_values() {
        for good in [
            "",
            "example.com",
            "example.com:8080",
            "EXAMPLE.com.",
            "127.0.0.1:80",
            "[::1]:8443",
            "[::ffff:127.0.0.1]",
            "a_b-c~d",
            "host:",
        ] {
            assert!(is_host_value(good.as_bytes()), "{good}");
        }
        for bad in [
            "a b/c@d",
            "user@example.com",
            "example.com/path",
            "example.com:80:80",
            "example.com:8o",
            "[::1",
            "[]",
            "[::1]x",
            "ex ample",
            "a\tb",
            "h?q",
        ] {
            assert!(!is_host_value(bad.as_bytes()), "{bad}");
        }
    }

    #[test]
    fn host_rules() {
        let request = |version: Version, hosts: &[&str]| {
            let mut req = Request::get("/").version(version);
            for host in hosts {
                req = req.header(HOST, *host);
            }
            req.body(()).expect("request")
        };
        assert_eq!(host_problem(&request(Version::HTTP_11, &["a"])), None);
        assert_eq!(host_problem(&request(Version::HTTP_10, &[])), None);
        assert_eq!(host_problem(&request(Version::HTTP_2, &[])), None);
        assert!(host_problem(&request(Version::HTTP_11, &[])).is_some());
        assert!(host_problem(&request(Version::HTTP_11, &["a", "a"])).is_some());
        assert!(host_problem(&request(Version::HTTP_10, &["a", "b"])).is_some());
        assert!(host_problem(&request(Version::HTTP_11, &["a b/c@d"])).is_some());
        let h2 = |host: &str| {
            Request::get("http://api.example.com/")
                .version(Version::HTTP_2)
                .header(HOST, host)
                .body(())
                .expect("request")
        };
        assert_eq!(host_problem(&h2("API.example.com")), None);
        assert_eq!(host_problem(&h2("api.example.com:80")), None);
        assert!(host_problem(&h2("admin.example.com")).is_some());
        assert_eq!(host_name("[::1]:8080"), "[::1]");
        assert_eq!(host_name("[::1]"), "[::1]");
        assert_eq!(host_name("a.test:1"), "a.test");
    }

    #[test]
    fn ipv4_values() {
        for ip in [
            "0.0.0.0",
            "127.0.0.1",
            "10.20.30.40",
            "255.255.255.255",
            "1.100.9.99",
        ] {
            assert_eq!(ip_value(ip.parse().unwrap()), ip);
        }
        assert_eq!(ip_value("::1".parse().unwrap()), "::1");
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

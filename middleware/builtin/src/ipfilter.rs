//! `ipfilter`: lets requests through or stops them by client IP address (fagongzi's
//! WHITELIST and BLACKLIST filters in one).
//!
//! - `deny` wins: an address in `deny` is stopped even when `allow` lists it too.
//! - An empty `allow` allows every address not denied; a non-empty one allows only its
//!   networks.
//! - The client address is the TCP peer. Only when the peer is in `trustedProxies` is
//!   `X-Forwarded-For` read: walking it from the right, trusted proxies are skipped and the
//!   first untrusted address is the client (when every hop is trusted, the leftmost one).
//!   The gateway appends the peer to `X-Forwarded-For` before middlewares run, so the
//!   rightmost entry is normally the peer itself.
//! - A stopped request is refused with [`Reason::Forbidden`] (`403`) and counts in the
//!   proxy's `go_gateway_middleware_denied_total{middleware="ipfilter",reason="ip_denied"}`.
//!
//! Entries are CIDRs (`10.0.0.0/8`, `2001:db8::/32`) or single addresses (`127.0.0.1`);
//! IPv4-mapped IPv6 addresses are matched as IPv4.

use std::net::IpAddr;

use http::{Request, Response};
use ipnet::IpNet;
use serde::Deserialize;

use super::support::{Denied, decode, option_error};
use middleware::denials::DenialCounter;
use middleware::hooks::{Filter, FilterLayer};
use middleware::{Body, BuildContext, BuildError, Middleware, Reason, Rejection, RequestOptions};

/// The name this middleware is registered under and counted as.
pub const NAME: &str = "ipfilter";

/// Options of `ipfilter`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct IpFilterOptions {
    /// Networks allowed in. Default: empty, meaning every address not in `deny`.
    pub allow: Vec<String>,
    /// Networks stopped with 403; wins over `allow`. Default: empty.
    pub deny: Vec<String>,
    /// Proxies whose `X-Forwarded-For` is believed. Default: empty (the TCP peer is the
    /// client, `X-Forwarded-For` is ignored).
    #[serde(alias = "trusted_proxies")]
    pub trusted_proxies: Vec<String>,
}

/// Parsed network lists.
#[derive(Debug, Clone)]
pub struct IpFilter {
    allow: Vec<IpNet>,
    deny: Vec<IpNet>,
    trusted_proxies: Vec<IpNet>,
    denied: Denied,
}

impl IpFilter {
    /// Parses the lists; errors name the entry, e.g. `options.allow[1]`.
    pub fn new(options: &IpFilterOptions, name: &str) -> Result<Self, BuildError> {
        Ok(Self {
            allow: parse_networks(&options.allow, name, "allow")?,
            deny: parse_networks(&options.deny, name, "deny")?,
            trusted_proxies: parse_networks(&options.trusted_proxies, name, "trustedProxies")?,
            denied: Denied::default(),
        })
    }

    /// Counts stopped requests in `denied`.
    pub fn counting_denials(mut self, denied: DenialCounter) -> Self {
        self.denied = Denied::new(denied);
        self
    }

    /// Whether a request from `address` may go on.
    pub fn allows(&self, address: IpAddr) -> bool {
        let address = address.to_canonical();
        if contains(&self.deny, address) {
            return false;
        }
        self.allow.is_empty() || contains(&self.allow, address)
    }

    /// The client address of a request from `peer` carrying `forwarded_for`
    /// (the `X-Forwarded-For` values in order).
    pub fn client_address<'a>(
        &self,
        peer: IpAddr,
        forwarded_for: impl Iterator<Item = &'a str>,
    ) -> IpAddr {
        let peer = peer.to_canonical();
        if !contains(&self.trusted_proxies, peer) {
            return peer;
        }
        let hops: Vec<&str> = forwarded_for
            .flat_map(|value| value.split(','))
            .map(str::trim)
            .collect();
        let mut client = peer;
        for hop in hops.iter().rev() {
            let Some(address) = parse_hop(hop) else {
                // Garbage: nothing left of it can be believed; the last good hop stands.
                break;
            };
            client = address;
            if !contains(&self.trusted_proxies, address) {
                break;
            }
        }
        client
    }
}

impl Filter for IpFilter {
    fn pre(&self, request: &mut Request<Body>) -> Result<(), Response<Body>> {
        let peer = request
            .extensions()
            .get::<RequestOptions>()
            .and_then(|options| options.client_addr);
        let Some(peer) = peer else {
            // Without a peer address nothing can be decided safely.
            return Err(self.deny_response());
        };
        let forwarded = request.headers().get_all("x-forwarded-for");
        let client = self.client_address(
            peer.ip(),
            forwarded.iter().filter_map(|value| value.to_str().ok()),
        );
        if self.allows(client) {
            Ok(())
        } else {
            tracing::debug!(%client, "ipfilter: address denied");
            Err(self.deny_response())
        }
    }
}

impl IpFilter {
    fn deny_response(&self) -> Response<Body> {
        self.denied.inc();
        Rejection::new(Reason::Forbidden, "forbidden").into_response()
    }
}

/// Builds `ipfilter` from its config entry.
pub fn factory(config: &configs::Middleware, ctx: &BuildContext) -> Result<Middleware, BuildError> {
    let options: IpFilterOptions = decode(config)?;
    let denied = ctx.denial_counter(NAME, "ip_denied");
    let filter = IpFilter::new(&options, &config.name)?.counting_denials(denied);
    Ok(Middleware::from_layer(
        &config.name,
        FilterLayer::new(filter),
    ))
}

fn contains(networks: &[IpNet], address: IpAddr) -> bool {
    networks.iter().any(|network| network.contains(&address))
}

fn parse_networks(entries: &[String], name: &str, field: &str) -> Result<Vec<IpNet>, BuildError> {
    entries
        .iter()
        .enumerate()
        .map(|(index, entry)| {
            let text = entry.trim();
            text.parse::<IpNet>()
                .or_else(|_| text.parse::<IpAddr>().map(IpNet::from))
                .map(mapped_as_ipv4)
                .map_err(|_| {
                    option_error(
                        name,
                        &format!("{field}[{index}]"),
                        format!("invalid CIDR or IP address {entry:?}"),
                    )
                })
        })
        .collect()
}

/// An IPv4-mapped IPv6 network (`::ffff:10.0.0.0/104`) as the IPv4 network it stands for,
/// since addresses are matched in canonical form.
fn mapped_as_ipv4(network: IpNet) -> IpNet {
    if let IpNet::V6(v6) = network {
        if let (Some(v4), Some(prefix)) =
            (v6.addr().to_ipv4_mapped(), v6.prefix_len().checked_sub(96))
        {
            if let Ok(v4) = ipnet::Ipv4Net::new(v4, prefix) {
                return IpNet::V4(v4);
            }
        }
    }
    network
}

/// One `X-Forwarded-For` hop: an address, possibly with a port (`1.2.3.4:5678`,
/// `[2001:db8::1]:80`).
fn parse_hop(hop: &str) -> Option<IpAddr> {
    if let Ok(address) = hop.parse::<IpAddr>() {
        return Some(address.to_canonical());
    }
    hop.parse::<std::net::SocketAddr>()
        .ok()
        .map(|socket| socket.ip().to_canonical())
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::Arc;

    use serde_json::json;
    use tower::ServiceExt;
    use tower::util::BoxCloneSyncService;

    use http::StatusCode;

    use super::*;
    use middleware::denials::LocalDenials;
    use middleware::{BoxError, EndpointInfo, empty_body, full_body};

    fn filter(options: serde_json::Value) -> IpFilter {
        let options: IpFilterOptions = serde_json::from_value(options).expect("options");
        IpFilter::new(&options, NAME).expect("valid")
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("ip")
    }

    #[test]
    fn deny_wins_and_empty_allow_allows_all() {
        let f = filter(json!({"allow": ["10.0.0.0/8"], "deny": ["10.1.0.0/16"]}));
        assert!(f.allows(ip("10.2.3.4")));
        assert!(!f.allows(ip("10.1.3.4")));
        assert!(!f.allows(ip("192.168.1.1")));
        let f = filter(json!({"deny": ["127.0.0.0/8", "::1"]}));
        assert!(!f.allows(ip("127.0.0.1")));
        assert!(
            !f.allows(ip("::ffff:127.0.0.1")),
            "IPv4-mapped addresses match as IPv4"
        );
        assert!(!f.allows(ip("::1")));
        assert!(f.allows(ip("192.168.1.1")));
        let f = filter(json!({"allow": ["::ffff:192.168.0.0/112"]}));
        assert!(f.allows(ip("192.168.7.7")));
        let f = filter(json!({"allow": ["127.0.0.1"]}));
        assert!(f.allows(ip("127.0.0.1")));
        assert!(!f.allows(ip("127.0.0.2")));
    }

    #[test]
    fn forwarded_for_is_read_only_behind_trusted_proxies() {
        let untrusting = filter(json!({}));
        assert_eq!(
            untrusting.client_address(ip("127.0.0.1"), ["1.2.3.4, 127.0.0.1"].into_iter()),
            ip("127.0.0.1")
        );

        let f = filter(json!({"trustedProxies": ["127.0.0.1", "10.0.0.0/8"]}));
        // The rightmost untrusted hop is the client; a spoofed leftmost entry is ignored.
        let chain = ["6.6.6.6, 1.2.3.4", "10.0.0.5, 127.0.0.1"];
        assert_eq!(
            f.client_address(ip("127.0.0.1"), chain.into_iter()),
            ip("1.2.3.4")
        );
        // All hops trusted: the leftmost.
        assert_eq!(
            f.client_address(ip("127.0.0.1"), ["10.0.0.9, 10.0.0.5"].into_iter()),
            ip("10.0.0.9")
        );
        // Ports are allowed; garbage stops the walk at the last good hop.
        assert_eq!(
            f.client_address(ip("127.0.0.1"), ["5.6.7.8:9000"].into_iter()),
            ip("5.6.7.8")
        );
        assert_eq!(
            f.client_address(ip("127.0.0.1"), ["1.1.1.1, bogus, 10.0.0.5"].into_iter()),
            ip("10.0.0.5")
        );
        // An untrusted peer's header means nothing.
        assert_eq!(
            f.client_address(ip("8.8.8.8"), ["1.2.3.4"].into_iter()),
            ip("8.8.8.8")
        );
    }

    #[test]
    fn bad_entries_name_the_field() {
        for (options, field) in [
            (
                json!({"allow": ["10.0.0.0/8", "10.0.0.0/33"]}),
                "options.allow[1]",
            ),
            (json!({"deny": ["not an ip"]}), "options.deny[0]"),
            (
                json!({"trustedProxies": ["1.2.3"]}),
                "options.trustedProxies[0]",
            ),
        ] {
            let options: IpFilterOptions = serde_json::from_value(options).expect("options");
            let err = IpFilter::new(&options, NAME).expect_err("invalid");
            assert!(
                err.to_string()
                    .starts_with(&format!("middleware ipfilter: {field}: invalid CIDR")),
                "{err}"
            );
        }
    }

    #[tokio::test]
    async fn denied_requests_get_403_and_are_counted() {
        let denials = Arc::new(LocalDenials::default());
        let endpoint = Arc::new(EndpointInfo {
            path: "/ip".into(),
            ..Default::default()
        });
        let ctx = BuildContext::new(endpoint).with_denials(denials.clone());
        let config = configs::Middleware {
            name: NAME.into(),
            options: json!({"deny": ["127.0.0.0/8"]}),
            required: false,
        };
        let middleware = factory(&config, &ctx).expect("builds");
        let upstream =
            BoxCloneSyncService::new(tower::service_fn(|_request: Request<Body>| async {
                Ok::<_, BoxError>(Response::new(full_body("ok")))
            }));
        let tripper = middleware.wrap(upstream);
        let send = |peer: &str| {
            let peer: SocketAddr = peer.parse().expect("addr");
            let mut request = Request::get("/ip").body(empty_body()).expect("request");
            request
                .extensions_mut()
                .insert(RequestOptions::new(ctx.endpoint.clone(), Some(peer)));
            tripper.clone().oneshot(request)
        };
        let denied = send("127.0.0.1:4000").await.expect("response");
        assert_eq!(denied.status(), StatusCode::FORBIDDEN);
        assert_eq!(
            Rejection::of(&denied).map(|rejection| rejection.reason),
            Some(Reason::Forbidden)
        );
        assert_eq!(
            send("192.0.2.1:4000").await.expect("response").status(),
            StatusCode::OK
        );
        assert_eq!(denials.get(NAME, "/ip", "ip_denied"), 1);
    }
}

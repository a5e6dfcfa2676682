//! Property tests for `--discovery` DSN parsing: any string is an answer or an error (never
//! a panic), and a DSN assembled from valid parts parses back to exactly those parts.

use std::net::{Ipv4Addr, Ipv6Addr};

use discovery::{DiscoveryDsn, DsnError};
use proptest::prelude::*;

/// A host as a DSN writes it: a DNS name, an IPv4 address or a bracketed IPv6 address.
fn host() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z][a-z0-9-]{0,12}(\\.[a-z][a-z0-9-]{0,12}){0,3}",
        any::<Ipv4Addr>().prop_map(|ip| ip.to_string()),
        any::<Ipv6Addr>().prop_map(|ip| format!("[{ip}]")),
    ]
}

/// A host with an optional explicit port (never 0).
fn address() -> impl Strategy<Value = (String, Option<u16>)> {
    (host(), proptest::option::of(1..=u16::MAX))
}

fn written((host, port): &(String, Option<u16>)) -> String {
    match port {
        Some(port) => format!("{host}:{port}"),
        None => host.clone(),
    }
}

fn expected((host, port): &(String, Option<u16>), default_port: u16) -> String {
    format!("{host}:{}", port.unwrap_or(default_port))
}

/// Percent-encodes everything but unreserved characters; spaces become `+` or `%20`.
fn encode(value: &str, plus_for_space: bool) -> String {
    let mut encoded = String::new();
    for byte in value.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'/' => {
                encoded.push(char::from(byte));
            }
            b' ' if plus_for_space => encoded.push('+'),
            _ => encoded.push_str(&format!("%{byte:02X}")),
        }
    }
    encoded
}

/// The scheme in any letter case.
fn scheme(name: &'static str) -> impl Strategy<Value = String> {
    proptest::collection::vec(any::<bool>(), name.len()).prop_map(move |upper| {
        name.chars()
            .zip(upper)
            .map(|(c, upper)| if upper { c.to_ascii_uppercase() } else { c })
            .collect()
    })
}

/// Joins query pairs, in the given order, after an optional `/`.
fn with_query(base: String, slash: bool, pairs: &[(&str, String)]) -> String {
    let mut dsn = base;
    if slash {
        dsn.push('/');
    }
    if !pairs.is_empty() {
        let query: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}={v}")).collect();
        dsn.push('?');
        dsn.push_str(&query.join("&"));
    }
    dsn
}

proptest! {
    #[test]
    fn any_string_is_an_answer_or_an_error(dsn in any::<String>()) {
        let _ = DiscoveryDsn::parse(&dsn);
    }

    #[test]
    fn dsn_like_strings_are_an_answer_or_an_error(
        dsn in "(consul|etcd|CONSUL|zk)?(://)?([a-z0-9.:\\[\\],@/%+&=?#-]|token|namespace|datacenter){0,40}"
    ) {
        if let Err(error) = DiscoveryDsn::parse(&dsn) {
            // Every error explains itself.
            prop_assert!(!error.to_string().is_empty());
        }
    }

    #[test]
    fn consul_parts_parse_back(
        scheme in scheme("consul"),
        address in address(),
        token in proptest::option::of(any::<String>()),
        datacenter in proptest::option::of("[a-z0-9 _-]{0,10}"),
        datacenter_first in any::<bool>(),
        plus_for_space in any::<bool>(),
        slash in any::<bool>(),
        padding in "[ \t\n]{0,2}",
    ) {
        let mut pairs = Vec::new();
        if let Some(token) = &token {
            pairs.push(("token", encode(token, plus_for_space)));
        }
        if let Some(datacenter) = &datacenter {
            pairs.push(("datacenter", encode(datacenter, plus_for_space)));
        }
        if datacenter_first {
            pairs.reverse();
        }
        let base = format!("{padding}{scheme}://{}", written(&address));
        let dsn = format!("{}{padding}", with_query(base, slash, &pairs));
        let parsed = DiscoveryDsn::parse(&dsn);
        // An empty value means "not set".
        let want = DiscoveryDsn::Consul {
            address: expected(&address, 8500),
            token: token.filter(|t| !t.is_empty()),
            datacenter: datacenter.filter(|d| !d.is_empty()),
        };
        prop_assert_eq!(parsed, Ok(want), "{:?}", dsn);
    }

    #[test]
    fn etcd_parts_parse_back(
        scheme in scheme("etcd"),
        addresses in proptest::collection::vec(address(), 1..5),
        namespace in proptest::option::of(any::<String>()),
        plus_for_space in any::<bool>(),
        slash in any::<bool>(),
    ) {
        let hosts: Vec<String> = addresses.iter().map(written).collect();
        let pairs: Vec<(&str, String)> = namespace
            .iter()
            .map(|namespace| ("namespace", encode(namespace, plus_for_space)))
            .collect();
        let dsn = with_query(format!("{scheme}://{}", hosts.join(",")), slash, &pairs);
        let want = DiscoveryDsn::Etcd {
            endpoints: addresses.iter().map(|a| expected(a, 2379)).collect(),
            namespace: namespace.unwrap_or_else(|| "/microservices".to_owned()),
        };
        prop_assert_eq!(DiscoveryDsn::parse(&dsn), Ok(want), "{:?}", dsn);
    }

    #[test]
    fn a_bad_port_is_named(host in host(), port in "0{1,3}|[1-9][0-9]{5,7}|[a-z]{1,4}|") {
        let dsn = format!("etcd://{host}:{port}");
        let error = DiscoveryDsn::parse(&dsn);
        let is_bad_port = matches!(error, Err(DsnError::BadPort { .. }));
        prop_assert!(is_bad_port, "{:?} gave {:?}", dsn, error);
    }
}

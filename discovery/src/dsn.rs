//! `--discovery` DSN parsing.
//!
//! Accepted forms:
//! - `consul://HOST[:PORT][?token=T&datacenter=DC]` (port defaults to 8500)
//! - `etcd://HOST[:PORT][,HOST[:PORT]...][?namespace=/microservices]` (port defaults to 2379)
//!
//! Query values are percent-decoded like a URL query (`+` is a space). Unknown or repeated
//! query keys are an error, so a typo does not silently do nothing. Parsing is pure: no
//! connection is made until the discovery is first used.

use std::sync::Arc;

use crate::consul::ConsulDiscovery;
use crate::etcd::{DEFAULT_NAMESPACE, EtcdDiscovery};
use crate::{Discovery, DsnError};

const CONSUL_DEFAULT_PORT: u16 = 8500;
const ETCD_DEFAULT_PORT: u16 = 2379;

/// A parsed `--discovery` DSN, before any connection is made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiscoveryDsn {
    /// A Consul agent.
    Consul {
        /// `host:port` of the agent's HTTP API.
        address: String,
        /// ACL token sent as `X-Consul-Token`.
        token: Option<String>,
        /// Datacenter to query (`dc=`); the agent's own when absent.
        datacenter: Option<String>,
    },
    /// An etcd cluster.
    Etcd {
        /// `host:port` of each member to use.
        endpoints: Vec<String>,
        /// Key prefix under which services are registered (Kratos default `/microservices`).
        namespace: String,
    },
}

impl DiscoveryDsn {
    /// Parses a DSN; the error message names what is wrong.
    pub fn parse(dsn: &str) -> Result<Self, DsnError> {
        let dsn = dsn.trim();
        let Some((scheme, rest)) = dsn.split_once("://") else {
            return Err(DsnError::MissingScheme {
                dsn: dsn.to_owned(),
            });
        };
        let scheme = scheme.to_ascii_lowercase();
        if scheme != "consul" && scheme != "etcd" {
            return Err(DsnError::UnknownScheme { scheme });
        }
        if rest.contains('#') {
            return Err(DsnError::BadQuery {
                reason: "a fragment (#...) is not allowed".to_owned(),
            });
        }
        let (before_query, query) = match rest.split_once('?') {
            Some((before, query)) => (before, Some(query)),
            None => (rest, None),
        };
        let hosts = match before_query.split_once('/') {
            Some((hosts, "")) => hosts,
            Some((_, path)) => {
                return Err(DsnError::BadQuery {
                    reason: format!(
                        "unexpected path \"/{path}\"; only HOST:PORT and a query are allowed"
                    ),
                });
            }
            None => before_query,
        };
        let params = parse_query(query.unwrap_or_default())?;

        if scheme == "consul" {
            if hosts.contains(',') {
                return Err(DsnError::BadQuery {
                    reason: "consul takes a single HOST:PORT (the local agent)".to_owned(),
                });
            }
            let address = parse_address(dsn, hosts, CONSUL_DEFAULT_PORT)?;
            let mut token = None;
            let mut datacenter = None;
            for (key, value) in params {
                match key.as_str() {
                    "token" => token = Some(value).filter(|value| !value.is_empty()),
                    "datacenter" => datacenter = Some(value).filter(|value| !value.is_empty()),
                    _ => return Err(unknown_key(&key, "token, datacenter")),
                }
            }
            Ok(Self::Consul {
                address,
                token,
                datacenter,
            })
        } else {
            let endpoints = hosts
                .split(',')
                .map(|host| parse_address(dsn, host, ETCD_DEFAULT_PORT))
                .collect::<Result<Vec<_>, _>>()?;
            let mut namespace = DEFAULT_NAMESPACE.to_owned();
            for (key, value) in params {
                match key.as_str() {
                    "namespace" => namespace = value,
                    _ => return Err(unknown_key(&key, "namespace")),
                }
            }
            Ok(Self::Etcd {
                endpoints,
                namespace,
            })
        }
    }

    /// Builds the discovery client; it connects on first use.
    pub fn into_discovery(self) -> Arc<dyn Discovery> {
        match self {
            Self::Consul {
                address,
                token,
                datacenter,
            } => Arc::new(ConsulDiscovery::new(address, token, datacenter)),
            Self::Etcd {
                endpoints,
                namespace,
            } => Arc::new(EtcdDiscovery::new(endpoints, namespace)),
        }
    }
}

/// Parses `consul://HOST:PORT?token=T&datacenter=DC` or
/// `etcd://HOST:PORT[,HOST:PORT...]?namespace=/microservices` and connects lazily.
pub fn from_dsn(dsn: &str) -> Result<Arc<dyn Discovery>, DsnError> {
    DiscoveryDsn::parse(dsn).map(DiscoveryDsn::into_discovery)
}

fn unknown_key(key: &str, known: &str) -> DsnError {
    DsnError::BadQuery {
        reason: format!("unknown key {key:?} (known: {known})"),
    }
}

/// Validates one `host[:port]` (IPv6 in brackets) and returns it as `host:port`.
fn parse_address(dsn: &str, address: &str, default_port: u16) -> Result<String, DsnError> {
    if address.contains('@') {
        return Err(DsnError::BadQuery {
            reason: "credentials in the address are not supported; use ?token=".to_owned(),
        });
    }
    let (host, port) = if let Some(rest) = address.strip_prefix('[') {
        let Some((host, after)) = rest.split_once(']') else {
            return Err(DsnError::MissingHost {
                dsn: dsn.to_owned(),
            });
        };
        let port = match after {
            "" => None,
            _ => match after.strip_prefix(':') {
                Some(port) => Some(port),
                None => {
                    return Err(DsnError::BadPort {
                        address: address.to_owned(),
                        reason: format!("unexpected {after:?} after the IPv6 address"),
                    });
                }
            },
        };
        (format!("[{host}]"), port)
    } else {
        match address.rsplit_once(':') {
            Some((host, port)) => (host.to_owned(), Some(port)),
            None => (address.to_owned(), None),
        }
    };
    if host.is_empty() || host == "[]" {
        return Err(DsnError::MissingHost {
            dsn: dsn.to_owned(),
        });
    }
    if host.contains(':') && !host.starts_with('[') {
        return Err(DsnError::BadPort {
            address: address.to_owned(),
            reason: "an IPv6 host must be written in brackets, e.g. [::1]:2379".to_owned(),
        });
    }
    let port = match port {
        None => default_port,
        Some("") => {
            return Err(DsnError::BadPort {
                address: address.to_owned(),
                reason: "the port is empty".to_owned(),
            });
        }
        Some(port) => match port.parse::<u16>() {
            Ok(0) => {
                return Err(DsnError::BadPort {
                    address: address.to_owned(),
                    reason: "port 0 is not allowed".to_owned(),
                });
            }
            Ok(port) => port,
            Err(_) => {
                return Err(DsnError::BadPort {
                    address: address.to_owned(),
                    reason: format!("{port:?} is not a number between 1 and 65535"),
                });
            }
        },
    };
    Ok(format!("{host}:{port}"))
}

/// Splits and percent-decodes a query string; a repeated key is an error.
fn parse_query(query: &str) -> Result<Vec<(String, String)>, DsnError> {
    let mut params: Vec<(String, String)> = Vec::new();
    for pair in query.split('&').filter(|pair| !pair.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let key = percent_decode(key)?;
        let value = percent_decode(value)?;
        if params.iter().any(|(seen, _)| *seen == key) {
            return Err(DsnError::BadQuery {
                reason: format!("key {key:?} is given more than once"),
            });
        }
        params.push((key, value));
    }
    Ok(params)
}

fn percent_decode(text: &str) -> Result<String, DsnError> {
    let bad_escape = || DsnError::BadQuery {
        reason: format!("bad percent-encoding in {text:?}"),
    };
    let bytes = text.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        match bytes[index] {
            b'%' => {
                let hex = bytes.get(index + 1..index + 3).ok_or_else(bad_escape)?;
                let hex = std::str::from_utf8(hex).map_err(|_| bad_escape())?;
                decoded.push(u8::from_str_radix(hex, 16).map_err(|_| bad_escape())?);
                index += 3;
            }
            b'+' => {
                decoded.push(b' ');
                index += 1;
            }
            byte => {
                decoded.push(byte);
                index += 1;
            }
        }
    }
    String::from_utf8(decoded).map_err(|_| bad_escape())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(dsn: &str) -> Result<DiscoveryDsn, DsnError> {
        DiscoveryDsn::parse(dsn)
    }

    fn message(dsn: &str) -> String {
        match parse(dsn) {
            Ok(parsed) => panic!("{dsn:?} should fail, parsed as {parsed:?}"),
            Err(error) => error.to_string(),
        }
    }

    #[test]
    fn consul_with_token_and_datacenter() {
        assert_eq!(
            parse("consul://127.0.0.1:8500?token=secret&datacenter=dc1"),
            Ok(DiscoveryDsn::Consul {
                address: "127.0.0.1:8500".into(),
                token: Some("secret".into()),
                datacenter: Some("dc1".into()),
            })
        );
    }

    #[test]
    fn consul_defaults() {
        assert_eq!(
            parse("consul://consul.local"),
            Ok(DiscoveryDsn::Consul {
                address: "consul.local:8500".into(),
                token: None,
                datacenter: None,
            })
        );
        assert_eq!(
            parse("CONSUL://10.0.0.1:18500/?token="),
            Ok(DiscoveryDsn::Consul {
                address: "10.0.0.1:18500".into(),
                token: None,
                datacenter: None,
            })
        );
    }

    #[test]
    fn query_values_are_percent_decoded() {
        assert_eq!(
            parse("consul://h:1?token=a%2Fb%3Dc+d"),
            Ok(DiscoveryDsn::Consul {
                address: "h:1".into(),
                token: Some("a/b=c d".into()),
                datacenter: None,
            })
        );
    }

    #[test]
    fn etcd_single_and_many_endpoints() {
        assert_eq!(
            parse("etcd://127.0.0.1:2379"),
            Ok(DiscoveryDsn::Etcd {
                endpoints: vec!["127.0.0.1:2379".into()],
                namespace: "/microservices".into(),
            })
        );
        assert_eq!(
            parse("etcd://10.0.0.1:2379,10.0.0.2,[::1]:2381?namespace=%2Fprod"),
            Ok(DiscoveryDsn::Etcd {
                endpoints: vec![
                    "10.0.0.1:2379".into(),
                    "10.0.0.2:2379".into(),
                    "[::1]:2381".into()
                ],
                namespace: "/prod".into(),
            })
        );
        assert_eq!(
            parse("etcd://h:1?namespace=/a/b"),
            Ok(DiscoveryDsn::Etcd {
                endpoints: vec!["h:1".into()],
                namespace: "/a/b".into(),
            })
        );
    }

    #[test]
    fn bad_forms_name_the_problem() {
        assert!(message("127.0.0.1:8500").contains("has no scheme"));
        assert!(message("zookeeper://h:2181").contains("unknown discovery scheme \"zookeeper\""));
        assert!(message("consul://").contains("missing a host"));
        assert!(message("consul://:8500").contains("missing a host"));
        assert!(message("etcd://h:2379,,h2:2379").contains("missing a host"));
        assert!(message("etcd://[]:2379").contains("missing a host"));
        assert!(message("consul://h:abc").contains("bad port"));
        assert!(message("consul://h:").contains("port is empty"));
        assert!(
            message("etcd://h:70000").contains("\"70000\" is not a number between 1 and 65535")
        );
        assert!(message("etcd://h:0").contains("port 0"));
        assert!(message("etcd://::1:2379").contains("brackets"));
        assert!(message("consul://h:8500?tokn=x").contains("unknown key \"tokn\""));
        assert!(message("etcd://h:2379?token=x").contains("unknown key \"token\""));
        assert!(message("consul://h:8500?token=a&token=b").contains("more than once"));
        assert!(message("consul://h:8500?token=%zz").contains("bad percent-encoding"));
        assert!(message("consul://h:8500/v1/agent").contains("unexpected path"));
        assert!(message("consul://a:1,b:2").contains("single HOST:PORT"));
        assert!(message("consul://user:pw@h:8500").contains("credentials"));
    }

    #[test]
    fn from_dsn_needs_no_runtime() {
        // No tokio runtime is running in a plain #[test]: building must not need one.
        let consul = from_dsn("consul://127.0.0.1:8500?datacenter=dc1").expect("valid DSN");
        assert_eq!(consul.describe(), "consul://127.0.0.1:8500?datacenter=dc1");
        let etcd = from_dsn("etcd://127.0.0.1:2379,127.0.0.1:2380").expect("valid DSN");
        assert_eq!(
            etcd.describe(),
            "etcd://127.0.0.1:2379,127.0.0.1:2380?namespace=/microservices"
        );
        assert!(from_dsn("nope").is_err());
    }
}

//! Parsing YAML text into the model, and merging priority configs into a gateway.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_saphyr::MessageFormatter;

use crate::error::{ConfigError, Position};
use crate::model::{Endpoint, Gateway};
use crate::validate::{FieldPath, RouteKey, check_endpoint, check_endpoints, check_gateway};

/// A priority file (Kratos' `PriorityConfig`): endpoints that override or extend the main
/// config's list.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct PriorityConfig {
    /// Name of this override, informational.
    pub name: String,
    /// Version of this override, informational.
    pub version: String,
    /// Endpoints that replace the main endpoint with the same method, path and host, or are
    /// put in front of the main list.
    pub endpoints: Vec<Endpoint>,
}

/// Parses and validates a gateway config (without merging any priority directory).
/// `file` is only used in error messages.
pub fn parse(text: &str, file: &Path) -> Result<Gateway, ConfigError> {
    let gateway: Gateway = from_yaml(text, file)?;
    check_gateway(&gateway).map_err(|issue| issue.locate(file, text))?;
    Ok(gateway)
}

/// Parses and validates one priority file (its endpoints on their own).
pub fn parse_priority(text: &str, file: &Path) -> Result<PriorityConfig, ConfigError> {
    let priority: PriorityConfig = from_yaml(text, file)?;
    check_endpoints(&priority.endpoints, &FieldPath::endpoints())
        .map_err(|issue| issue.locate(file, text))?;
    Ok(priority)
}

/// Parses and validates one endpoint written on its own (YAML, or JSON, which YAML reads),
/// as the admin API takes it. Field paths in errors start at the endpoint
/// (`backends[0].target`). `file` is only used in error messages.
pub fn parse_endpoint(text: &str, file: &Path) -> Result<Endpoint, ConfigError> {
    if is_blank_document(text) {
        return Err(ConfigError::Parse {
            file: file.to_path_buf(),
            position: None,
            message: "empty document: expected one endpoint".to_owned(),
        });
    }
    let endpoint: Endpoint = from_yaml(text, file)?;
    check_endpoint(&endpoint, &FieldPath::default()).map_err(|issue| issue.locate(file, text))?;
    Ok(endpoint)
}

/// Validates one endpoint on its own (already deserialized, e.g. from JSON); field paths
/// start at the endpoint.
pub fn validate_endpoint(endpoint: &Endpoint) -> Result<(), ConfigError> {
    check_endpoint(endpoint, &FieldPath::default()).map_err(|issue| issue.into_error())
}

/// Merges priority endpoints into `gateway`, in order: each replaces, in place, the endpoint
/// with the same method (case-insensitive), path and host, or else is put at the front of
/// the list (so a later priority endpoint comes before an earlier one).
///
/// Linear in the number of endpoints (each route key is computed once), so merging 1,000
/// store endpoints into 1,000 file endpoints takes a millisecond, not a second.
pub fn merge_priority(gateway: &mut Gateway, endpoints: impl IntoIterator<Item = Endpoint>) {
    /// Where the first endpoint with a route key is: in the main list, or the `n`th put
    /// in front.
    enum At {
        Main(usize),
        Front(usize),
    }
    let mut first: HashMap<RouteKey, At> = HashMap::with_capacity(gateway.endpoints.len());
    for (i, existing) in gateway.endpoints.iter().enumerate() {
        first.entry(RouteKey::of(existing)).or_insert(At::Main(i));
    }
    // Put in front in this order, so the list ends up with them reversed.
    let mut front: Vec<Endpoint> = Vec::new();
    for endpoint in endpoints {
        match first.entry(RouteKey::of(&endpoint)) {
            Entry::Occupied(at) => match *at.get() {
                At::Main(i) => gateway.endpoints[i] = endpoint,
                At::Front(n) => front[n] = endpoint,
            },
            Entry::Vacant(slot) => {
                slot.insert(At::Front(front.len()));
                front.push(endpoint);
            }
        }
    }
    if !front.is_empty() {
        front.reverse();
        front.append(&mut gateway.endpoints);
        gateway.endpoints = front;
    }
}

/// Deserializes YAML text, turning serde-saphyr's error into a positioned `ConfigError`.
fn from_yaml<T: for<'de> Deserialize<'de> + Default>(
    text: &str,
    file: &Path,
) -> Result<T, ConfigError> {
    // An empty (or comment-only) document is an empty config; the YAML parser would
    // otherwise complain that it "expected mapping start".
    if is_blank_document(text) {
        return Ok(T::default());
    }
    serde_saphyr::from_str(text).map_err(|error| {
        let position = error.location().and_then(|location| {
            let line = u32::try_from(location.line()).ok()?;
            let column = u32::try_from(location.column()).ok()?;
            (line > 0).then_some(Position { line, column })
        });
        let message = serde_saphyr::UserMessageFormatter.format_message(error.without_snippet());
        ConfigError::Parse {
            file: file.to_path_buf(),
            position,
            message: escape_controls(&message),
        }
    })
}

/// True when `text` holds no YAML content: only whitespace, comments and document markers.
pub(crate) fn is_blank_document(text: &str) -> bool {
    text.lines().all(|line| {
        let line = line.trim();
        line.is_empty() || line.starts_with('#') || line == "---" || line == "..."
    })
}

/// The message may quote file content: keep control characters out of logs.
fn escape_controls(message: &str) -> String {
    let mut escaped = String::with_capacity(message.len());
    for c in message.chars() {
        if c.is_control() {
            escaped.extend(c.escape_debug());
        } else {
            escaped.push(c);
        }
    }
    escaped
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Backend;

    fn endpoint(method: &str, path: &str, target: &str) -> Endpoint {
        Endpoint {
            method: method.into(),
            path: path.into(),
            backends: vec![Backend {
                target: target.into(),
                ..Backend::default()
            }],
            ..Endpoint::default()
        }
    }

    #[test]
    fn merge_replaces_in_place_or_prepends() {
        let mut gateway = Gateway {
            endpoints: vec![
                endpoint("GET", "/a", "main:1"),
                endpoint("", "/b", "main:2"),
            ],
            ..Gateway::default()
        };
        merge_priority(
            &mut gateway,
            vec![
                endpoint("get", "/a", "prio:1"),
                endpoint("", "/c", "prio:2"),
                endpoint("POST", "/b", "prio:3"),
                endpoint("", "/c", "prio:4"),
            ],
        );
        let summary: Vec<(String, String, String)> = gateway
            .endpoints
            .iter()
            .map(|e| {
                (
                    e.method.clone(),
                    e.path.clone(),
                    e.backends[0].target.clone(),
                )
            })
            .collect();
        let want = [
            ("POST", "/b", "prio:3"),
            ("", "/c", "prio:4"),
            ("get", "/a", "prio:1"),
            ("", "/b", "main:2"),
        ];
        let want: Vec<(String, String, String)> = want
            .iter()
            .map(|(m, p, t)| (m.to_string(), p.to_string(), t.to_string()))
            .collect();
        assert_eq!(summary, want);
    }

    /// The definition: each priority endpoint replaces the first one with its route key,
    /// or goes in front. Quadratic; the real merge must do the same.
    fn naive_merge(gateway: &mut Gateway, endpoints: Vec<Endpoint>) {
        for endpoint in endpoints {
            let key = RouteKey::of(&endpoint);
            match gateway
                .endpoints
                .iter_mut()
                .find(|existing| RouteKey::of(existing) == key)
            {
                Some(existing) => *existing = endpoint,
                None => gateway.endpoints.insert(0, endpoint),
            }
        }
    }

    proptest::proptest! {
        /// Few methods, paths and hosts, so keys collide often (duplicates in the main
        /// list too); the backend target tells the endpoints apart.
        #[test]
        fn merge_matches_the_naive_definition(
            main in proptest::collection::vec((0..3_u8, 0..4_u8, 0..2_u8), 0..8),
            priority in proptest::collection::vec((0..3_u8, 0..4_u8, 0..2_u8), 0..8),
        ) {
            let make = |list: &[(u8, u8, u8)], tag: &str| -> Vec<Endpoint> {
                list.iter()
                    .enumerate()
                    .map(|(i, (m, p, h))| Endpoint {
                        host: ["", "a.example"][usize::from(*h)].into(),
                        ..endpoint(["", "GET", "get"][usize::from(*m)], &format!("/p{p}"), &format!("{tag}:{i}"))
                    })
                    .collect()
            };
            let base = Gateway { endpoints: make(&main, "main"), ..Gateway::default() };
            let (mut fast, mut naive) = (base.clone(), base);
            merge_priority(&mut fast, make(&priority, "prio"));
            naive_merge(&mut naive, make(&priority, "prio"));
            proptest::prop_assert_eq!(fast, naive);
        }
    }

    #[test]
    fn blank_documents_are_empty_configs() {
        for text in ["", "\n", "# only a comment\n", "---\n"] {
            assert_eq!(
                parse(text, Path::new("x.yaml")).expect(text),
                Gateway::default()
            );
        }
    }
}

//! Rules a parsed config must follow, and the positions that let a broken rule be reported
//! as `file:line:col`.
//!
//! The model structs carry no positions (other crates build them by hand too), so the rules
//! report the *field path* of the offending value (`endpoints[1].backends[0].target`). When
//! the config came from a file, that path is looked up in a tree of node positions built by a
//! second, position-only pass over the same YAML (serde-saphyr's `Spanned`).

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_saphyr::Spanned;

use crate::error::{ConfigError, Position};
use crate::model::{Backend, Condition, Endpoint, Gateway, Matcher, Middleware};

/// Load-balancing algorithms an endpoint's `selector` may name ("" = the default, p2c).
pub const SELECTORS: [&str; 4] = ["", "p2c", "wrr", "random"];

/// Checks a config built in code or parsed from a file:
/// - endpoint `path` present and starting with '/'; `method` an HTTP token;
/// - no two endpoints with the same method (case-insensitive), path and host;
/// - at least one backend, each target `host:port`, `http(s)://host:port` or
///   `discovery:///name`; a `tlsConfigName` must name a `tlsStore` entry;
/// - `{name:regex}` constraints of the path compile;
/// - a backend `weight` within 1..=4294967295;
/// - `selector` empty, `p2c`, `wrr` or `random`; middlewares have a name;
/// - `retry.attempts` at least 1 (left out, it is 1);
/// - each retry condition has exactly one of `byStatusCode` (within 100-599, from <= to)
///   and `byHeader` (with a name);
/// - each `headers`/`query` matcher has a name (a header name for headers) and exactly one
///   of `value`, `regex` (that compiles) and `present: true`.
///
/// Errors name the offending field (`endpoints[0].backends[1].target`) but carry no file
/// position; [`crate::parse`] adds that.
pub fn validate(gateway: &Gateway) -> Result<(), ConfigError> {
    check_gateway(gateway).map_err(Issue::into_error)
}

/// One broken rule: where (as a field path) and what.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Issue {
    pub(crate) path: FieldPath,
    pub(crate) message: String,
}

impl Issue {
    fn new(path: FieldPath, message: impl Into<String>) -> Self {
        Issue {
            path,
            message: message.into(),
        }
    }

    /// The error without a file position.
    pub(crate) fn into_error(self) -> ConfigError {
        ConfigError::invalid(self.path.to_string(), self.message)
    }

    /// The error with `file` and the line/column of the offending value in `text`.
    pub(crate) fn locate(self, file: &Path, text: &str) -> ConfigError {
        let position = NodeTree::parse(text).and_then(|tree| tree.find(&self.path));
        ConfigError::Invalid {
            file: Some(file.to_path_buf()),
            position,
            field: self.path.to_string(),
            message: self.message,
        }
    }
}

/// A path from the document root to a value: keys (camelCase names) and list indexes.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct FieldPath(Vec<Segment>);

#[derive(Debug, Clone, PartialEq)]
enum Segment {
    Key(&'static str),
    Index(usize),
}

impl FieldPath {
    /// The path of the top-level `endpoints` list.
    pub(crate) fn endpoints() -> Self {
        FieldPath(vec![Segment::Key("endpoints")])
    }

    fn key(&self, key: &'static str) -> Self {
        let mut path = self.clone();
        path.0.push(Segment::Key(key));
        path
    }

    fn index(&self, index: usize) -> Self {
        let mut path = self.clone();
        path.0.push(Segment::Index(index));
        path
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("(document)");
        }
        for (i, segment) in self.0.iter().enumerate() {
            match segment {
                Segment::Key(key) if i == 0 => f.write_str(key)?,
                Segment::Key(key) => write!(f, ".{key}")?,
                Segment::Index(index) => write!(f, "[{index}]")?,
            }
        }
        Ok(())
    }
}

/// All rules for a whole gateway config.
pub(crate) fn check_gateway(gateway: &Gateway) -> Result<(), Issue> {
    let root = FieldPath::default();
    check_middlewares(&gateway.middlewares, &root.key("middlewares"))?;
    check_endpoints(&gateway.endpoints, &root.key("endpoints"))?;
    for (i, endpoint) in gateway.endpoints.iter().enumerate() {
        for (j, backend) in endpoint.backends.iter().enumerate() {
            let name = &backend.tls_config_name;
            if !name.is_empty() && !gateway.tls_store.contains_key(name) {
                let path = root
                    .key("endpoints")
                    .index(i)
                    .key("backends")
                    .index(j)
                    .key("tlsConfigName");
                return Err(Issue::new(
                    path,
                    format!("no tlsStore entry named {name:?}"),
                ));
            }
        }
    }
    Ok(())
}

/// Rules for a list of endpoints (the main list, or one priority file's).
pub(crate) fn check_endpoints(endpoints: &[Endpoint], path: &FieldPath) -> Result<(), Issue> {
    let mut seen: HashMap<RouteKey, usize> = HashMap::new();
    for (i, endpoint) in endpoints.iter().enumerate() {
        let here = path.index(i);
        check_endpoint(endpoint, &here)?;
        if let Some(first) = seen.insert(RouteKey::of(endpoint), i) {
            return Err(Issue::new(
                here,
                format!(
                    "duplicate endpoint {}: the same method, path, host and matchers as endpoints[{first}]",
                    RouteKey::of(endpoint)
                ),
            ));
        }
    }
    Ok(())
}

/// What makes two endpoints the same route: method (case-insensitive), path, host and the
/// set of header (names case-insensitive) and query matchers.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct RouteKey {
    method: String,
    path: String,
    host: String,
    headers: Vec<Matcher>,
    query: Vec<Matcher>,
}

impl RouteKey {
    /// The route key of `endpoint`.
    pub(crate) fn of(endpoint: &Endpoint) -> Self {
        let sorted = |matchers: &[Matcher], lower: bool| {
            let mut matchers: Vec<Matcher> = matchers
                .iter()
                .map(|matcher| Matcher {
                    name: if lower {
                        matcher.name.to_ascii_lowercase()
                    } else {
                        matcher.name.clone()
                    },
                    ..matcher.clone()
                })
                .collect();
            matchers.sort_by(|a, b| {
                (&a.name, &a.value, &a.regex, a.present)
                    .cmp(&(&b.name, &b.value, &b.regex, b.present))
            });
            matchers.dedup();
            matchers
        };
        RouteKey {
            method: endpoint.method.to_ascii_uppercase(),
            path: endpoint.path.clone(),
            host: endpoint.host.to_ascii_lowercase(),
            headers: sorted(&endpoint.headers, true),
            query: sorted(&endpoint.query, false),
        }
    }
}

impl fmt::Display for RouteKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let method = if self.method.is_empty() {
            "*"
        } else {
            &self.method
        };
        write!(f, "{method} {}", self.path)?;
        if !self.host.is_empty() {
            write!(f, " (host {})", self.host)?;
        }
        let count = self.headers.len() + self.query.len();
        if count > 0 {
            write!(f, " (with {count} header/query matchers)")?;
        }
        Ok(())
    }
}

pub(crate) fn check_endpoint(endpoint: &Endpoint, path: &FieldPath) -> Result<(), Issue> {
    if endpoint.path.is_empty() {
        return Err(Issue::new(path.key("path"), "path is required"));
    }
    if !endpoint.path.starts_with('/') {
        return Err(Issue::new(
            path.key("path"),
            format!("path {:?} must start with '/'", endpoint.path),
        ));
    }
    if let Some(message) = constraint_problem(&endpoint.path) {
        return Err(Issue::new(path.key("path"), message));
    }
    if !endpoint.method.bytes().all(is_token_byte) {
        return Err(Issue::new(
            path.key("method"),
            format!("invalid HTTP method {:?}", endpoint.method),
        ));
    }
    if !SELECTORS.contains(&endpoint.selector.as_str()) {
        return Err(Issue::new(
            path.key("selector"),
            format!(
                "unknown selector {:?}, expected p2c, wrr or random",
                endpoint.selector
            ),
        ));
    }
    check_middlewares(&endpoint.middlewares, &path.key("middlewares"))?;
    if endpoint.backends.is_empty() {
        return Err(Issue::new(
            path.key("backends"),
            format!("endpoint {} has no backends", endpoint.path),
        ));
    }
    for (i, backend) in endpoint.backends.iter().enumerate() {
        check_backend(backend, &path.key("backends").index(i))?;
    }
    for (i, matcher) in endpoint.headers.iter().enumerate() {
        check_matcher(matcher, true, &path.key("headers").index(i))?;
    }
    for (i, matcher) in endpoint.query.iter().enumerate() {
        check_matcher(matcher, false, &path.key("query").index(i))?;
    }
    if let Some(retry) = &endpoint.retry {
        if retry.attempts == 0 {
            return Err(Issue::new(
                path.key("retry").key("attempts"),
                "attempts must be at least 1 (the first try counts; 1 = no retry)",
            ));
        }
        let conditions = path.key("retry").key("conditions");
        for (i, condition) in retry.conditions.iter().enumerate() {
            check_condition(condition, &conditions.index(i))?;
        }
    }
    Ok(())
}

/// A name, and exactly one of `value`, `regex` (compiling, anchored) and `present: true`.
fn check_matcher(matcher: &Matcher, header: bool, path: &FieldPath) -> Result<(), Issue> {
    if matcher.name.is_empty() {
        return Err(Issue::new(path.key("name"), "a matcher needs a name"));
    }
    if header && !matcher.name.bytes().all(is_token_byte) {
        return Err(Issue::new(
            path.key("name"),
            format!("invalid header name {:?}", matcher.name),
        ));
    }
    if matcher.present == Some(false) {
        return Err(Issue::new(
            path.key("present"),
            "present must be true (leave the matcher out to not require anything)",
        ));
    }
    let set = [
        matcher.value.is_some(),
        matcher.regex.is_some(),
        matcher.present.is_some(),
    ];
    if set.iter().filter(|set| **set).count() != 1 {
        return Err(Issue::new(
            path.clone(),
            format!(
                "matcher {:?} needs exactly one of value, regex and present: true",
                matcher.name
            ),
        ));
    }
    if let Some(source) = &matcher.regex {
        if let Err(error) = regex::Regex::new(&format!("^(?:{source})$")) {
            let reason = error.to_string();
            let reason = reason.lines().last().unwrap_or("invalid regex").trim();
            return Err(Issue::new(
                path.key("regex"),
                format!("invalid regex {source:?}: {reason}"),
            ));
        }
    }
    Ok(())
}

fn check_middlewares(middlewares: &[Middleware], path: &FieldPath) -> Result<(), Issue> {
    for (i, middleware) in middlewares.iter().enumerate() {
        if middleware.name.trim().is_empty() {
            return Err(Issue::new(
                path.index(i).key("name"),
                "middleware name is required",
            ));
        }
    }
    Ok(())
}

fn check_backend(backend: &Backend, path: &FieldPath) -> Result<(), Issue> {
    check_target(&backend.target).map_err(|message| Issue::new(path.key("target"), message))?;
    if let Some(weight) = backend.weight
        && !(1..=MAX_WEIGHT).contains(&weight)
    {
        return Err(Issue::new(
            path.key("weight"),
            format!("weight {weight} is out of range 1..={MAX_WEIGHT}"),
        ));
    }
    Ok(())
}

/// The largest backend weight the `wrr` selector takes.
pub(crate) const MAX_WEIGHT: i64 = u32::MAX as i64;

/// Why a `{name:regex}` constraint of a path pattern does not compile, in one line; the
/// router compiles each constraint anchored (`^(?:regex)$`), and so does this check.
fn constraint_problem(pattern: &str) -> Option<String> {
    let body = pattern.strip_prefix('/')?;
    let body = body.strip_suffix("/*").unwrap_or(body);
    body.split('/').find_map(|piece| {
        let (_, constraint) = piece
            .strip_prefix('{')
            .and_then(|p| p.strip_suffix('}'))?
            .split_once(':')?;
        let err = regex::Regex::new(&format!("^(?:{constraint})$")).err()?;
        Some(format!(
            "invalid regex {constraint:?} in path pattern: {}",
            regex_summary(&err)
        ))
    })
}

/// The one-line gist of a regex error: the crate's syntax errors are a multi-line diagram
/// whose last `error: ` line says what is wrong.
fn regex_summary(err: &regex::Error) -> String {
    let text = err.to_string();
    text.lines()
        .rev()
        .find_map(|line| line.trim().strip_prefix("error: "))
        .or_else(|| text.lines().rev().find(|line| !line.trim().is_empty()))
        .unwrap_or("invalid regex")
        .trim()
        .to_owned()
}

/// A backend target is `host:port`, `http(s)://host:port` or `discovery:///name`.
pub(crate) fn check_target(target: &str) -> Result<(), String> {
    let bad = |why: &str| {
        format!(
            "invalid target {target:?}: {why} (expected host:port, http(s)://host:port or discovery:///name)"
        )
    };
    if target.is_empty() {
        return Err(
            "target is required (host:port, http(s)://host:port or discovery:///name)".into(),
        );
    }
    if let Some(name) = target.strip_prefix("discovery:///") {
        if name.is_empty() || name.contains(['/', '?', '#']) || name.contains(char::is_whitespace) {
            return Err(bad("the service name must be one non-empty path segment"));
        }
        return Ok(());
    }
    let authority = match target.split_once("://") {
        Some(("http" | "https", rest)) => rest.strip_suffix('/').unwrap_or(rest),
        Some((scheme, _)) => return Err(bad(&format!("unsupported scheme {scheme:?}"))),
        None => target,
    };
    if authority.contains(['/', '?', '#']) {
        return Err(bad("a target cannot carry a path or query"));
    }
    let (host, port) = authority
        .rsplit_once(':')
        .ok_or_else(|| bad("missing port"))?;
    let host_ok = if let Some(inner) = host.strip_prefix('[') {
        // IPv6 literal: [::1]
        inner
            .strip_suffix(']')
            .is_some_and(|ip| ip.parse::<std::net::Ipv6Addr>().is_ok())
    } else {
        !host.is_empty()
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
    };
    if !host_ok {
        return Err(bad("invalid host"));
    }
    match port.parse::<u16>() {
        Ok(port) if port > 0 && !port_has_sign(authority) => Ok(()),
        _ => Err(bad("invalid port")),
    }
}

/// `u16::from_str` accepts a leading '+', which is not a port.
fn port_has_sign(authority: &str) -> bool {
    authority
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.starts_with('+'))
}

fn check_condition(condition: &Condition, path: &FieldPath) -> Result<(), Issue> {
    match (&condition.by_status_code, &condition.by_header) {
        (Some(range), None) => range
            .check()
            .map_err(|e| Issue::new(path.key("byStatusCode"), e.to_string())),
        (None, Some(header)) => {
            if header.name.trim().is_empty() {
                Err(Issue::new(
                    path.key("byHeader").key("name"),
                    "byHeader needs a header name",
                ))
            } else {
                Ok(())
            }
        }
        (None, None) => Err(Issue::new(
            path.clone(),
            "a retry condition needs byStatusCode or byHeader",
        )),
        (Some(_), Some(_)) => Err(Issue::new(
            path.clone(),
            "a retry condition takes byStatusCode or byHeader, not both",
        )),
    }
}

/// RFC 9110 token characters (what an HTTP method may be made of).
fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Positions of every node of a YAML document, keyed like the document itself.
#[derive(Debug)]
struct NodeTree(Spanned<Node>);

#[derive(Debug)]
enum Node {
    Map(Vec<(String, Spanned<Node>)>),
    Seq(Vec<Spanned<Node>>),
    Scalar,
}

impl NodeTree {
    /// Parses `text` for positions only; `None` if it cannot (the caller then reports no
    /// position rather than failing differently).
    fn parse(text: &str) -> Option<Self> {
        serde_saphyr::from_str::<Spanned<Node>>(text)
            .ok()
            .map(NodeTree)
    }

    /// Position of the node at `path`, or of its deepest ancestor present in the file.
    /// Keys match in camelCase or snake_case.
    fn find(&self, path: &FieldPath) -> Option<Position> {
        let mut node = &self.0;
        for segment in &path.0 {
            let child = match (&node.value, segment) {
                (Node::Map(entries), Segment::Key(key)) => entries
                    .iter()
                    .find(|(name, _)| same_key(name, key))
                    .map(|(_, child)| child),
                (Node::Seq(items), Segment::Index(index)) => items.get(*index),
                _ => None,
            };
            match child {
                Some(child) => node = child,
                None => break,
            }
        }
        let location = node.referenced;
        let line = u32::try_from(location.line()).ok()?;
        let column = u32::try_from(location.column()).ok()?;
        (line > 0).then_some(Position { line, column })
    }
}

/// `tlsConfigName` == `tls_config_name`.
fn same_key(written: &str, camel: &str) -> bool {
    let mut written = written.bytes().filter(|b| *b != b'_');
    let mut camel = camel.bytes();
    loop {
        match (written.next(), camel.next()) {
            (None, None) => return true,
            (Some(a), Some(b)) if a.eq_ignore_ascii_case(&b) => {}
            _ => return false,
        }
    }
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(NodeVisitor)
    }
}

struct NodeVisitor;

impl<'de> Visitor<'de> for NodeVisitor {
    type Value = Node;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML node")
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Node, E> {
        Ok(Node::Scalar)
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Node, E> {
        Ok(Node::Scalar)
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Node, E> {
        Ok(Node::Scalar)
    }

    fn visit_i128<E: de::Error>(self, _: i128) -> Result<Node, E> {
        Ok(Node::Scalar)
    }

    fn visit_u128<E: de::Error>(self, _: u128) -> Result<Node, E> {
        Ok(Node::Scalar)
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Node, E> {
        Ok(Node::Scalar)
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<Node, E> {
        Ok(Node::Scalar)
    }

    fn visit_bytes<E: de::Error>(self, _: &[u8]) -> Result<Node, E> {
        Ok(Node::Scalar)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Node, E> {
        Ok(Node::Scalar)
    }

    fn visit_none<E: de::Error>(self) -> Result<Node, E> {
        Ok(Node::Scalar)
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Node, D::Error> {
        deserializer.deserialize_any(self)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<Spanned<Node>>()? {
            items.push(item);
        }
        Ok(Node::Seq(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
        let mut entries = Vec::new();
        while let Some(key) = map.next_key::<KeyText>()? {
            let value = map.next_value::<Spanned<Node>>()?;
            entries.push((key.0, value));
        }
        Ok(Node::Map(entries))
    }
}

/// A mapping key as text (non-string keys are rendered, complex keys become "").
struct KeyText(String);

impl<'de> Deserialize<'de> for KeyText {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;

        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = KeyText;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a mapping key")
            }

            fn visit_str<E: de::Error>(self, text: &str) -> Result<KeyText, E> {
                Ok(KeyText(text.to_owned()))
            }

            fn visit_bool<E: de::Error>(self, value: bool) -> Result<KeyText, E> {
                Ok(KeyText(value.to_string()))
            }

            fn visit_i64<E: de::Error>(self, value: i64) -> Result<KeyText, E> {
                Ok(KeyText(value.to_string()))
            }

            fn visit_u64<E: de::Error>(self, value: u64) -> Result<KeyText, E> {
                Ok(KeyText(value.to_string()))
            }

            fn visit_f64<E: de::Error>(self, value: f64) -> Result<KeyText, E> {
                Ok(KeyText(value.to_string()))
            }

            fn visit_unit<E: de::Error>(self) -> Result<KeyText, E> {
                Ok(KeyText(String::new()))
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<KeyText, A::Error> {
                while seq.next_element::<de::IgnoredAny>()?.is_some() {}
                Ok(KeyText(String::new()))
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<KeyText, A::Error> {
                while map
                    .next_entry::<de::IgnoredAny, de::IgnoredAny>()?
                    .is_some()
                {}
                Ok(KeyText(String::new()))
            }
        }

        deserializer.deserialize_any(KeyVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        for good in [
            "127.0.0.1:8000",
            "localhost:80",
            "my-svc.default.svc:9000",
            "[::1]:8000",
            "http://127.0.0.1:8000",
            "https://api.example.com:443",
            "http://127.0.0.1:8000/",
            "discovery:///helloworld",
        ] {
            assert_eq!(check_target(good), Ok(()), "{good}");
        }
        for (bad, why) in [
            ("", "target is required"),
            ("localhost", "missing port"),
            ("127.0.0.1:", "invalid port"),
            ("127.0.0.1:0", "invalid port"),
            ("127.0.0.1:+80", "invalid port"),
            ("127.0.0.1:70000", "invalid port"),
            (":8000", "invalid host"),
            ("a b:80", "invalid host"),
            ("[::1:80", "invalid host"),
            ("ftp://host:21", "unsupported scheme \"ftp\""),
            ("http://host:80/api", "cannot carry a path"),
            ("discovery:///", "one non-empty path segment"),
            ("discovery:///a/b", "one non-empty path segment"),
            ("discovery://a", "unsupported scheme"),
        ] {
            let message = check_target(bad).expect_err(bad);
            assert!(message.contains(why), "{bad}: {message}");
        }
    }

    #[test]
    fn keys_match_in_both_cases() {
        assert!(same_key("tlsConfigName", "tlsConfigName"));
        assert!(same_key("tls_config_name", "tlsConfigName"));
        assert!(!same_key("tlsConfig", "tlsConfigName"));
        assert!(!same_key("tls_config_name_x", "tlsConfigName"));
    }

    #[test]
    fn finds_positions_by_field_path() {
        let text = "endpoints:\n  - path: /a\n    backends:\n      - target: x\n";
        let tree = NodeTree::parse(text).expect("tree");
        let target = FieldPath::default()
            .key("endpoints")
            .index(0)
            .key("backends")
            .index(0)
            .key("target");
        assert_eq!(
            tree.find(&target),
            Some(Position {
                line: 4,
                column: 17
            })
        );
        // A missing leaf falls back to its closest ancestor.
        let missing = FieldPath::default().key("endpoints").index(0).key("retry");
        assert_eq!(tree.find(&missing), Some(Position { line: 2, column: 5 }));
        assert_eq!(target.to_string(), "endpoints[0].backends[0].target");
    }
}

#[cfg(test)]
mod matcher_tests {
    use std::path::Path;

    use crate::parse;

    const HEAD: &str = "endpoints:\n  - path: /pay\n    backends: [{target: 127.0.0.1:1}]\n";

    #[test]
    fn matcher_errors_name_file_line_and_field() {
        for (extra, field, line, why) in [
            (
                "    headers:\n      - {name: x-a}\n",
                "endpoints[0].headers[0]",
                5,
                "exactly one of",
            ),
            (
                "    headers:\n      - {name: x-a, value: b, present: true}\n",
                "endpoints[0].headers[0]",
                5,
                "exactly one of",
            ),
            (
                "    query:\n      - {name: v, regex: '('}\n",
                "endpoints[0].query[0].regex",
                5,
                "invalid regex",
            ),
            (
                "    headers:\n      - {name: 'a b', present: true}\n",
                "endpoints[0].headers[0].name",
                5,
                "header name",
            ),
            (
                "    query:\n      - {value: x}\n",
                "endpoints[0].query[0].name",
                5,
                "needs a name",
            ),
            (
                "    query:\n      - {name: v, present: false}\n",
                "endpoints[0].query[0].present",
                5,
                "must be true",
            ),
        ] {
            let text = format!("{HEAD}{extra}");
            let error = parse(&text, Path::new("g.yaml"))
                .expect_err(extra)
                .to_string();
            assert!(error.starts_with(&format!("g.yaml:{line}:")), "{error}");
            assert!(error.contains(&format!("{field}: ")), "{error}");
            assert!(error.contains(why), "{error}");
        }
        let unknown = parse(
            &format!("{HEAD}    headers: [{{name: a, valu: b}}]\n"),
            Path::new("g.yaml"),
        )
        .expect_err("unknown key");
        assert!(unknown.to_string().contains("valu"), "{unknown}");
    }

    #[test]
    fn duplicates_take_matchers_into_account() {
        let two = |a: &str, b: &str| {
            format!(
                "endpoints:\n  - path: /pay\n    backends: [{{target: 127.0.0.1:1}}]\n{a}  - path: /pay\n    backends: [{{target: 127.0.0.1:2}}]\n{b}"
            )
        };
        let header =
            |value: &str, case: &str| format!("    headers: [{{name: {case}, value: {value}}}]\n");
        parse(
            &two(&header("a", "x-t"), &header("b", "x-t")),
            Path::new("g.yaml"),
        )
        .expect("different matchers");
        parse(&two("", &header("a", "x-t")), Path::new("g.yaml")).expect("plain and matcher");
        let error = parse(
            &two(&header("a", "x-t"), &header("a", "X-T")),
            Path::new("g.yaml"),
        )
        .expect_err("same matchers")
        .to_string();
        assert!(error.contains("duplicate endpoint"), "{error}");
        assert!(error.contains("endpoints[1]"), "{error}");
        let error = parse(&two("", ""), Path::new("g.yaml"))
            .expect_err("plain twice")
            .to_string();
        assert!(error.contains("duplicate endpoint"), "{error}");
    }
}

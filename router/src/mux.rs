//! [`MuxRouter`]: the matchit-backed routing table.

use std::collections::HashMap;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::inflight::{InFlight, Lifecycle};
use crate::matcher::{MatchRule, Matchers, NoParts, RequestParts};
use crate::pattern::{Constraints, Pattern, Regexes};
use crate::{Closer, RouteError, RouteMatch, Router};

/// The routing table: three matchit trees (exact patterns, restful patterns, the fixed
/// parts of prefix patterns) and the closers of every route.
///
/// Exact patterns get a tree of their own because matchit allocates a backtracking record
/// whenever a lookup passes a node that has both static and parameter children; kept
/// apart, the common exact and prefix lookups never allocate.
///
/// Build it with [`Router::handle`], then share it read-only (it is `Sync`); see the crate
/// docs for the matching and priority rules.
pub struct MuxRouter<H> {
    routes: Vec<Route<H>>,
    /// Patterns without parameters.
    exact: Table,
    /// Patterns with parameters (not prefix).
    restful: Table,
    /// Prefix patterns, keyed by their fixed part.
    prefixes: Table,
    /// Compiled constraints, shared between routes.
    regexes: Regexes,
    lifecycle: Lifecycle,
}

/// A registered route, as [`MuxRouter::routes`] shows it.
#[derive(Debug)]
pub struct RouteEntry<'a, H> {
    /// The pattern as registered.
    pub pattern: &'a str,
    /// The method (upper case), or `None` for any method.
    pub method: Option<&'a str>,
    /// The host (lower case, without port), or `None` for any host.
    pub host: Option<&'a str>,
    /// The header and query matchers (normalised, sorted); empty for most routes.
    pub matchers: &'a [MatchRule],
    /// The handler.
    pub handler: &'a H,
}

struct Route<H> {
    handler: H,
    /// Upper case; `None` = any method.
    method: Option<MethodName>,
    /// Lower case, port stripped; `None` = any host.
    host: Option<HostName>,
    /// The pattern's regexes, checked against matchit's captures.
    constraints: Constraints,
    /// Header and query conditions; routes with more are tried first.
    matchers: Matchers,
    pattern: Pattern,
}

/// An upper-case method name; the standard ones point at static strings so a lookup
/// compares without touching the heap.
#[derive(Debug, PartialEq, Eq)]
enum MethodName {
    Standard(&'static str),
    Other(Box<str>),
}

impl MethodName {
    const STANDARD: [&'static str; 9] = [
        "GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "CONNECT", "TRACE",
    ];

    fn new(upper: String) -> Self {
        match Self::STANDARD.iter().find(|standard| **standard == upper) {
            Some(standard) => Self::Standard(standard),
            None => Self::Other(upper.into()),
        }
    }

    fn as_str(&self) -> &str {
        match self {
            Self::Standard(name) => name,
            Self::Other(name) => name,
        }
    }
}

/// A route's host: one exact name, or a template with `{name}` / `{name:regex}` parts
/// (`{sub}.example.com`), as gorilla/mux and so Kratos take them; a bare `{name}` matches
/// one DNS label (`[^.]+`).
#[derive(Debug)]
struct HostName {
    /// As configured, lower case, port stripped: the route's identity and what views show.
    text: Box<str>,
    /// Compiled (case-insensitive, anchored) when the host has template parts.
    template: Option<regex::Regex>,
}

impl PartialEq for HostName {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}

impl HostName {
    fn matches(&self, host: &str) -> bool {
        let host = host_without_port(host);
        match &self.template {
            Some(template) => template.is_match(host),
            None => self.text.eq_ignore_ascii_case(host),
        }
    }
}

impl<H> Route<H> {
    /// `host` is the request's Host as received; it is normalised only when this route
    /// names a host, so host-less tables never pay for it.
    fn host_matches(&self, host: &str) -> bool {
        self.host.as_ref().is_none_or(|want| want.matches(host))
    }

    fn method_matches(&self, method: &str) -> bool {
        self.method
            .as_ref()
            .is_none_or(|want| want.as_str().eq_ignore_ascii_case(method))
    }
}

/// The request as the tables see it: method and host as given; headers and query only
/// through `parts`, for routes with matchers.
struct Request<'r, P: ?Sized> {
    method: &'r str,
    host: &'r str,
    parts: &'r P,
}

/// What a scan of candidate routes concluded.
#[derive(Default)]
struct Verdict {
    /// Some route matched path, constraints and host, but not the method.
    method_not_allowed: bool,
}

impl Verdict {
    /// Checks one route whose path shape already matched; returns it if it takes the request.
    fn offer<'a, H, P: RequestParts + ?Sized>(
        &mut self,
        route: &'a Route<H>,
        request: &Request<'_, P>,
    ) -> Option<&'a H> {
        if !route.host_matches(request.host) {
            return None;
        }
        if route.matchers.len() > 0 && !route.matchers.hold(request.parts) {
            return None;
        }
        if route.method_matches(request.method) {
            return Some(&route.handler);
        }
        self.method_not_allowed = true;
        None
    }
}

/// Patterns of one kind sharing a matchit tree. Patterns with the same normalised key
/// share a slot; each slot lazily learns which other routes could match its paths.
#[derive(Default)]
struct Table {
    tree: matchit::Router<usize>,
    /// Normalised key -> slot, for registration.
    keys: HashMap<Box<str>, usize>,
    slots: Vec<Slot>,
    /// The slot of the empty key (the root prefix `/*`), which matchit cannot hold.
    empty: Option<usize>,
    /// Route ids by pattern length, to compute fallbacks without scanning everything.
    by_len: HashMap<usize, Vec<usize>>,
    /// Bit `n` is set when some pattern has `n` segments (63 stands for 63 or more), so
    /// lookups skip trees that cannot hold a path of that length.
    lengths: u64,
    /// Whether two different keys here can match the same path (not so for exact
    /// patterns), which is when slots need fallback lists.
    keys_overlap: bool,
    /// Whether any slot has computed its fallback list (so `insert` must reset them).
    fallbacks_used: AtomicBool,
}

struct Slot {
    /// The first route id; most slots hold only this one, so it is kept inline.
    first: usize,
    /// The other route ids. All ids are ordered host-specific first, each group in
    /// registration order.
    more: Vec<usize>,
    /// Other routes of the same table that could match a path this slot matches, in
    /// priority order. Computed on the first lookup where every route here declined.
    fallback: OnceLock<Box<[usize]>>,
}

impl Slot {
    fn new(first: usize) -> Self {
        Self {
            first,
            more: Vec::new(),
            fallback: OnceLock::new(),
        }
    }

    /// The route ids in the order they are tried.
    fn ids(&self) -> impl Iterator<Item = usize> + '_ {
        std::iter::once(self.first).chain(self.more.iter().copied())
    }

    /// Adds `id` in trial order: host-specific routes first, then routes with more
    /// matchers, then registration order.
    fn add<H>(&mut self, routes: &[Route<H>], id: usize) {
        let mut ids: Vec<usize> = self.ids().collect();
        let rank = |id: usize| slot_rank(&routes[id]);
        let position = ids
            .iter()
            .position(|&other| rank(other) > rank(id))
            .unwrap_or(ids.len());
        ids.insert(position, id);
        self.first = ids.remove(0);
        self.more = ids;
    }
}

impl Table {
    /// A table for patterns without parameters: distinct keys never match the same path.
    fn for_exact() -> Self {
        Self::default()
    }

    /// A table whose keys may overlap (`/x/{id}/y` and `/x/{a}/{b}`).
    fn for_overlapping() -> Self {
        Self {
            keys_overlap: true,
            ..Self::default()
        }
    }

    /// The routes already registered under `pattern`'s key.
    fn same_key<'a, H>(
        &'a self,
        routes: &'a [Route<H>],
        pattern: &Pattern,
    ) -> impl Iterator<Item = &'a Route<H>> {
        self.keys
            .get(pattern.key().as_str())
            .into_iter()
            .flat_map(|&slot| self.slots[slot].ids())
            .map(move |id| &routes[id])
    }

    /// Adds route `id` (already pushed to `routes`) under its pattern's key.
    fn insert<H>(&mut self, routes: &[Route<H>], id: usize) -> Result<(), RouteError> {
        let route = &routes[id];
        let key = route.pattern.key();
        match self.keys.get(key.as_str()) {
            Some(&slot) => self.slots[slot].add(routes, id),
            None => {
                let slot = self.slots.len();
                if key.is_empty() {
                    self.empty = Some(slot);
                } else {
                    self.tree
                        .insert(key.as_str(), slot)
                        .map_err(|error| RouteError::Conflict {
                            pattern: route.pattern.text().to_owned(),
                            reason: error.to_string(),
                        })?;
                }
                self.keys.insert(key.into(), slot);
                self.slots.push(Slot::new(id));
            }
        }
        self.by_len.entry(route.pattern.len()).or_default().push(id);
        self.lengths |= 1 << route.pattern.len().min(63);
        if self.fallbacks_used.swap(false, Ordering::Relaxed) {
            for slot in &mut self.slots {
                slot.fallback.take();
            }
        }
        Ok(())
    }

    /// Whether some pattern here has `segments` segments.
    fn holds_length(&self, segments: usize) -> bool {
        self.lengths & (1 << segments.min(63)) != 0
    }

    /// Whether some pattern here has at most `segments` segments.
    fn holds_length_up_to(&self, segments: usize) -> bool {
        let below = match segments {
            63.. => u64::MAX,
            n => (1 << (n + 1)) - 1,
        };
        self.lengths & below != 0
    }

    /// Finds the first route in priority order that takes a request for exactly `path`
    /// (a whole path, or a truncation of one for the prefix table).
    fn lookup<'a, H, P: RequestParts + ?Sized>(
        &self,
        routes: &'a [Route<H>],
        path: &str,
        request: &Request<'_, P>,
        verdict: &mut Verdict,
    ) -> Option<&'a H> {
        let slot = if path.is_empty() {
            let slot = self.empty?;
            for id in self.slots[slot].ids() {
                if let Some(handler) = verdict.offer(&routes[id], request) {
                    return Some(handler);
                }
            }
            slot
        } else {
            let found = self.tree.at(path).ok()?;
            let slot = *found.value;
            for id in self.slots[slot].ids() {
                let route = &routes[id];
                if route
                    .constraints
                    .hold(found.params.iter().map(|(_, value)| value))
                {
                    if let Some(handler) = verdict.offer(route, request) {
                        return Some(handler);
                    }
                }
            }
            slot
        };
        if !self.keys_overlap {
            return None;
        }
        for &id in self.fallback(routes, slot) {
            let route = &routes[id];
            if route.pattern.matches_exactly(path) {
                if let Some(handler) = verdict.offer(route, request) {
                    return Some(handler);
                }
            }
        }
        None
    }

    /// The slot's fallback list, computed on first use.
    fn fallback<H>(&self, routes: &[Route<H>], slot: usize) -> &[usize] {
        let slot = &self.slots[slot];
        slot.fallback.get_or_init(|| {
            self.fallbacks_used.store(true, Ordering::Relaxed);
            let shape = &routes[slot.first].pattern;
            let mut ids: Vec<usize> = self
                .by_len
                .get(&shape.len())
                .into_iter()
                .flatten()
                .copied()
                .filter(|&id| {
                    !slot.ids().any(|own| own == id) && routes[id].pattern.overlaps(shape)
                })
                .collect();
            ids.sort_by(|&a, &b| {
                let (ra, rb) = (&routes[a], &routes[b]);
                ra.pattern
                    .priority_cmp(&rb.pattern)
                    .then_with(|| slot_rank(ra).cmp(&slot_rank(rb)))
                    .then_with(|| a.cmp(&b))
            });
            ids.into()
        })
    }
}

impl<H> MuxRouter<H> {
    /// An empty routing table.
    pub fn new() -> Self {
        Self {
            routes: Vec::new(),
            exact: Table::for_exact(),
            restful: Table::for_overlapping(),
            prefixes: Table::for_overlapping(),
            regexes: Regexes::default(),
            lifecycle: Lifecycle::default(),
        }
    }

    /// How many routes are registered.
    pub fn len(&self) -> usize {
        self.routes.len()
    }

    /// Whether no route is registered.
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// How many requests are in flight now (guards from [`Router::enter`] still alive).
    pub fn in_flight(&self) -> usize {
        self.lifecycle.in_flight()
    }

    /// Every registered route, in registration order (for inspection views).
    pub fn routes(&self) -> impl Iterator<Item = RouteEntry<'_, H>> {
        self.routes.iter().map(|route| RouteEntry {
            pattern: route.pattern.text(),
            method: route.method.as_ref().map(MethodName::as_str),
            host: route.host.as_ref().map(|host| &*host.text),
            matchers: route.matchers.rules(),
            handler: &route.handler,
        })
    }

    fn table(&self, kind: TableKind) -> &Table {
        match kind {
            TableKind::Exact => &self.exact,
            TableKind::Restful => &self.restful,
            TableKind::Prefix => &self.prefixes,
        }
    }

    /// Like [`Router::handle`], for a route that also requires every one of `matchers`
    /// (headers, query parameters) to hold. On the same path, method and host, routes with
    /// more matchers are tried first, then in registration order, and a route without
    /// matchers takes what they leave. Regexes are compiled here, anchored. Two routes
    /// differing only in their matchers are not duplicates.
    pub fn handle_matching(
        &mut self,
        pattern: &str,
        method: &str,
        host: &str,
        matchers: Vec<MatchRule>,
        handler: H,
        closer: Option<Closer>,
    ) -> Result<(), RouteError> {
        let matchers = Matchers::new(pattern, matchers);
        match matchers.and_then(|matchers| self.register(pattern, method, host, matchers, handler))
        {
            Ok(()) => {
                if let Some(closer) = closer {
                    self.lifecycle.push_closer(closer);
                }
                Ok(())
            }
            Err(error) => {
                // The router owns the closer from the call on; nothing else will run it.
                if let Some(closer) = closer {
                    closer();
                }
                Err(error)
            }
        }
    }

    /// Like [`Router::route`], offering the request's headers and query to the routes with
    /// matchers (only they look at `parts`).
    pub fn route_request<P: RequestParts + ?Sized>(
        &self,
        method: &str,
        host: &str,
        path: &str,
        parts: &P,
    ) -> RouteMatch<'_, H> {
        if !path.starts_with('/') {
            return RouteMatch::NotFound;
        }
        let request = Request {
            method,
            host,
            parts,
        };
        let mut verdict = Verdict::default();
        let segments = path.bytes().filter(|&b| b == b'/').count();
        for table in [&self.exact, &self.restful] {
            if table.holds_length(segments) {
                if let Some(handler) = table.lookup(&self.routes, path, &request, &mut verdict) {
                    return RouteMatch::Found(handler);
                }
            }
        }
        // Prefix patterns: try the path's truncations at `/` boundaries, longest first
        // (`/a/b/c`, `/a/b`, `/a`, then "" for the root prefix), looking up only the
        // lengths some prefix pattern has.
        let mut segments = segments;
        let mut end = path.len();
        while self.prefixes.holds_length_up_to(segments) {
            let truncated = &path[..end];
            if self.prefixes.holds_length(segments) {
                if let Some(handler) =
                    self.prefixes
                        .lookup(&self.routes, truncated, &request, &mut verdict)
                {
                    return RouteMatch::Found(handler);
                }
            }
            if segments == 0 {
                break;
            }
            end = truncated.rfind('/').unwrap_or(0);
            segments -= 1;
        }
        if verdict.method_not_allowed {
            RouteMatch::MethodNotAllowed
        } else {
            RouteMatch::NotFound
        }
    }

    fn register(
        &mut self,
        pattern: &str,
        method: &str,
        host: &str,
        matchers: Matchers,
        handler: H,
    ) -> Result<(), RouteError> {
        let pattern = Pattern::parse(pattern, &mut self.regexes)?;
        let method = normalise_method(pattern.text(), method)?;
        let host = normalise_host(pattern.text(), host)?;
        let kind = TableKind::of(&pattern);
        let table = self.table(kind);
        let duplicate = table.same_key(&self.routes, &pattern).any(|other| {
            other.pattern.same_as(&pattern)
                && other.method == method
                && other.host == host
                && other.matchers == matchers
        });
        if duplicate {
            return Err(RouteError::Duplicate {
                pattern: pattern.text().to_owned(),
                method: method
                    .as_ref()
                    .map(MethodName::as_str)
                    .unwrap_or_default()
                    .to_owned(),
                host: host
                    .as_ref()
                    .map(|host| host.text.to_string())
                    .unwrap_or_default(),
            });
        }
        self.routes.push(Route {
            handler,
            method,
            host,
            constraints: pattern.constraints(),
            matchers,
            pattern,
        });
        let id = self.routes.len() - 1;
        let table = match kind {
            TableKind::Exact => &mut self.exact,
            TableKind::Restful => &mut self.restful,
            TableKind::Prefix => &mut self.prefixes,
        };
        if let Err(error) = table.insert(&self.routes, id) {
            self.routes.pop();
            return Err(error);
        }
        Ok(())
    }
}

/// Trial order among routes of one shape: host-specific first, then more matchers first
/// (registration order breaks ties).
fn slot_rank<H>(route: &Route<H>) -> (bool, std::cmp::Reverse<usize>) {
    (
        route.host.is_none(),
        std::cmp::Reverse(route.matchers.len()),
    )
}

/// Which of the three trees a pattern lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TableKind {
    Exact,
    Restful,
    Prefix,
}

impl TableKind {
    fn of(pattern: &Pattern) -> Self {
        if pattern.is_prefix() {
            Self::Prefix
        } else if pattern.has_params() {
            Self::Restful
        } else {
            Self::Exact
        }
    }
}

impl<H> Default for MuxRouter<H> {
    fn default() -> Self {
        Self::new()
    }
}

impl<H> std::fmt::Debug for MuxRouter<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MuxRouter")
            .field("routes", &self.routes.len())
            .field("lifecycle", &self.lifecycle)
            .finish_non_exhaustive()
    }
}

impl<H: Send + Sync> Router<H> for MuxRouter<H> {
    fn handle(
        &mut self,
        pattern: &str,
        method: &str,
        host: &str,
        handler: H,
        closer: Option<Closer>,
    ) -> Result<(), RouteError> {
        self.handle_matching(pattern, method, host, Vec::new(), handler, closer)
    }

    /// Offers no headers or query: routes with matchers never take such a lookup (see
    /// [`MuxRouter::route_request`]).
    fn route(&self, method: &str, host: &str, path: &str) -> RouteMatch<'_, H> {
        self.route_request(method, host, path, &NoParts)
    }

    fn enter(&self) -> InFlight {
        self.lifecycle.enter()
    }

    fn sync_close(&self, grace: Duration) -> impl Future<Output = ()> + Send {
        self.lifecycle.close(grace)
    }
}

/// `""` and `"*"` mean any method; anything else must be an HTTP token, kept upper case.
fn normalise_method(pattern: &str, method: &str) -> Result<Option<MethodName>, RouteError> {
    if method.is_empty() || method == "*" {
        return Ok(None);
    }
    if !method
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
    {
        return Err(RouteError::InvalidPattern {
            pattern: pattern.to_owned(),
            reason: format!("method {method:?} is not an HTTP method token"),
        });
    }
    Ok(Some(MethodName::new(method.to_ascii_uppercase())))
}

/// `""` means any host; otherwise the host is kept lower case, without port or trailing dot.
fn normalise_host(pattern: &str, host: &str) -> Result<Option<HostName>, RouteError> {
    if host.is_empty() {
        return Ok(None);
    }
    let invalid = |reason: String| RouteError::InvalidPattern {
        pattern: pattern.to_owned(),
        reason,
    };
    let braces = host.contains(['{', '}']);
    let name = if braces {
        host
    } else {
        host_without_port(host)
    };
    if name.is_empty() || name.contains(|c: char| c == '/' || c.is_whitespace()) {
        return Err(invalid(format!("host {host:?} is not a host name")));
    }
    let text: Box<str> = name.to_ascii_lowercase().into();
    let template = if braces {
        Some(host_template(&text).map_err(|reason| invalid(format!("host {host:?}: {reason}")))?)
    } else {
        None
    };
    Ok(Some(HostName { text, template }))
}

/// The anchored, case-insensitive regex of a host template: literal parts escaped, `{name}`
/// as one DNS label, `{name:re}` as `re`.
fn host_template(template: &str) -> Result<regex::Regex, String> {
    let mut pattern = String::from("(?i)^");
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        pattern.push_str(&regex::escape(&rest[..open]));
        let close = rest[open..]
            .find('}')
            .map(|at| open + at)
            .ok_or("a '{' without its '}'")?;
        let variable = &rest[open + 1..close];
        match variable.split_once(':') {
            Some((name, re)) if !name.is_empty() && !re.is_empty() => {
                pattern.push_str(&format!("(?:{re})"));
            }
            None if !variable.is_empty() => pattern.push_str("[^.]+"),
            _ => return Err(format!("bad template part {{{variable}}}")),
        }
        rest = &rest[close + 1..];
    }
    if rest.contains('}') {
        return Err("a '}' without its '{'".to_owned());
    }
    pattern.push_str(&regex::escape(rest));
    pattern.push('$');
    regex::Regex::new(&pattern).map_err(|err| {
        err.to_string()
            .lines()
            .last()
            .unwrap_or("invalid regex")
            .trim()
            .to_owned()
    })
}

/// Strips a `:port` (and a trailing dot) from a Host header value without allocating:
/// `api.example.com:8080` -> `api.example.com`, `[::1]:80` -> `[::1]`.
fn host_without_port(host: &str) -> &str {
    let bytes = host.as_bytes();
    let digits = bytes
        .iter()
        .rev()
        .take_while(|byte| byte.is_ascii_digit())
        .count();
    let colon = bytes.len() - digits;
    let mut name = host;
    if colon > 0 && bytes[colon - 1] == b':' {
        let before = &host[..colon - 1];
        // A bare IPv6 address ("::1") has colons of its own and no port.
        if before.ends_with(']') || !before.contains(':') {
            name = before;
        }
    }
    name.strip_suffix('.').unwrap_or(name)
}

#[cfg(test)]
mod tests;

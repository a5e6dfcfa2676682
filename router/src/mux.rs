//! [`MuxRouter`]: the matchit-backed routing table.

use std::collections::HashMap;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::inflight::{InFlight, Lifecycle};
use crate::pattern::Pattern;
use crate::{Closer, RouteError, RouteMatch, Router};

/// The routing table: exact and restful patterns in one matchit tree, the fixed parts of
/// prefix patterns in another, and the closers of every route.
///
/// Build it with [`Router::handle`], then share it read-only (it is `Sync`); see the crate
/// docs for the matching and priority rules.
pub struct MuxRouter<H> {
    routes: Vec<Route<H>>,
    /// Exact and restful patterns.
    paths: Table,
    /// Prefix patterns, keyed by their fixed part.
    prefixes: Table,
    /// The longest fixed part (in segments) of any prefix pattern; longer path
    /// truncations need no lookup.
    longest_prefix: usize,
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
    /// The handler.
    pub handler: &'a H,
}

struct Route<H> {
    pattern: Pattern,
    /// Upper case; `None` = any method.
    method: Option<Box<str>>,
    /// Lower case, port stripped; `None` = any host.
    host: Option<Box<str>>,
    handler: H,
}

impl<H> Route<H> {
    fn host_matches(&self, host: &str) -> bool {
        self.host
            .as_deref()
            .is_none_or(|want| want.eq_ignore_ascii_case(host))
    }

    fn method_matches(&self, method: &str) -> bool {
        self.method
            .as_deref()
            .is_none_or(|want| want.eq_ignore_ascii_case(method))
    }
}

/// The request as the tables see it: method as given, host without its port.
struct Request<'r> {
    method: &'r str,
    host: &'r str,
}

/// What a scan of candidate routes concluded.
#[derive(Default)]
struct Verdict {
    /// Some route matched path, constraints and host, but not the method.
    method_not_allowed: bool,
}

impl Verdict {
    /// Checks one route whose path shape already matched; returns it if it takes the request.
    fn offer<'a, H>(&mut self, route: &'a Route<H>, request: &Request<'_>) -> Option<&'a H> {
        if !route.host_matches(request.host) {
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
    /// Whether any slot has computed its fallback list (so `insert` must reset them).
    fallbacks_used: AtomicBool,
}

#[derive(Default)]
struct Slot {
    /// Route ids: host-specific first, each group in registration order.
    routes: Vec<usize>,
    /// Other routes of the same table that could match a path this slot matches, in
    /// priority order. Computed on the first lookup where every route here declined.
    fallback: OnceLock<Box<[usize]>>,
}

impl Table {
    /// The routes already registered under `pattern`'s key.
    fn same_key<'a, H>(
        &self,
        routes: &'a [Route<H>],
        pattern: &Pattern,
    ) -> impl Iterator<Item = &'a Route<H>> {
        let ids = self
            .keys
            .get(pattern.key().as_str())
            .map(|&slot| self.slots[slot].routes.clone())
            .unwrap_or_default();
        ids.into_iter().map(move |id| &routes[id])
    }

    /// Adds route `id` (already pushed to `routes`) under its pattern's key.
    fn insert<H>(&mut self, routes: &[Route<H>], id: usize) -> Result<(), RouteError> {
        let route = &routes[id];
        let key = route.pattern.key();
        let slot = match self.keys.get(key.as_str()) {
            Some(&slot) => slot,
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
                self.slots.push(Slot::default());
                slot
            }
        };
        let ids = &mut self.slots[slot].routes;
        let position = if route.host.is_some() {
            ids.iter()
                .position(|&other| routes[other].host.is_none())
                .unwrap_or(ids.len())
        } else {
            ids.len()
        };
        ids.insert(position, id);
        self.by_len.entry(route.pattern.len()).or_default().push(id);
        if self.fallbacks_used.swap(false, Ordering::Relaxed) {
            for slot in &mut self.slots {
                slot.fallback.take();
            }
        }
        Ok(())
    }

    /// Finds the first route in priority order that takes a request for exactly `path`
    /// (a whole path, or a truncation of one for the prefix table).
    fn lookup<'a, H>(
        &self,
        routes: &'a [Route<H>],
        path: &str,
        request: &Request<'_>,
        verdict: &mut Verdict,
    ) -> Option<&'a H> {
        let slot = if path.is_empty() {
            let slot = self.empty?;
            for &id in &self.slots[slot].routes {
                if let Some(handler) = verdict.offer(&routes[id], request) {
                    return Some(handler);
                }
            }
            slot
        } else {
            let found = self.tree.at(path).ok()?;
            let slot = *found.value;
            for &id in &self.slots[slot].routes {
                let route = &routes[id];
                if route
                    .pattern
                    .constraints_hold(found.params.iter().map(|(_, value)| value))
                {
                    if let Some(handler) = verdict.offer(route, request) {
                        return Some(handler);
                    }
                }
            }
            slot
        };
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
            let Some(&first) = slot.routes.first() else {
                return Box::default();
            };
            let shape = &routes[first].pattern;
            let mut ids: Vec<usize> = self
                .by_len
                .get(&shape.len())
                .into_iter()
                .flatten()
                .copied()
                .filter(|id| !slot.routes.contains(id) && routes[*id].pattern.overlaps(shape))
                .collect();
            ids.sort_by(|&a, &b| {
                let (ra, rb) = (&routes[a], &routes[b]);
                ra.pattern
                    .priority_cmp(&rb.pattern)
                    .then_with(|| rb.host.is_some().cmp(&ra.host.is_some()))
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
            paths: Table::default(),
            prefixes: Table::default(),
            longest_prefix: 0,
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
            method: route.method.as_deref(),
            host: route.host.as_deref(),
            handler: &route.handler,
        })
    }

    fn register(
        &mut self,
        pattern: &str,
        method: &str,
        host: &str,
        handler: H,
    ) -> Result<(), RouteError> {
        let pattern = Pattern::parse(pattern)?;
        let method = normalise_method(pattern.text(), method)?;
        let host = normalise_host(pattern.text(), host)?;
        let table = if pattern.is_prefix() {
            &self.prefixes
        } else {
            &self.paths
        };
        let duplicate = table.same_key(&self.routes, &pattern).any(|other| {
            other.pattern.same_as(&pattern) && other.method == method && other.host == host
        });
        if duplicate {
            return Err(RouteError::Duplicate {
                pattern: pattern.text().to_owned(),
                method: method.as_deref().unwrap_or_default().to_owned(),
                host: host.as_deref().unwrap_or_default().to_owned(),
            });
        }
        let prefix = pattern.is_prefix();
        let len = pattern.len();
        self.routes.push(Route {
            pattern,
            method,
            host,
            handler,
        });
        let id = self.routes.len() - 1;
        let table = if prefix {
            &mut self.prefixes
        } else {
            &mut self.paths
        };
        if let Err(error) = table.insert(&self.routes, id) {
            self.routes.pop();
            return Err(error);
        }
        if prefix {
            self.longest_prefix = self.longest_prefix.max(len);
        }
        Ok(())
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
        match self.register(pattern, method, host, handler) {
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

    fn route(&self, method: &str, host: &str, path: &str) -> RouteMatch<'_, H> {
        let request = Request {
            method,
            host: host_without_port(host),
        };
        let mut verdict = Verdict::default();
        if let Some(handler) = self
            .paths
            .lookup(&self.routes, path, &request, &mut verdict)
        {
            return RouteMatch::Found(handler);
        }
        if !self.prefixes.slots.is_empty() && path.starts_with('/') {
            // Try the path's truncations at `/` boundaries, longest first: `/a/b/c`,
            // `/a/b`, `/a`, then "" (the root prefix). Truncations longer than any
            // prefix pattern cannot match and are skipped without a lookup.
            let mut segments = path.bytes().filter(|&b| b == b'/').count();
            let mut end = path.len();
            while segments > self.longest_prefix {
                end = path[..end].rfind('/').unwrap_or(0);
                segments -= 1;
            }
            loop {
                let truncated = &path[..end];
                if let Some(handler) =
                    self.prefixes
                        .lookup(&self.routes, truncated, &request, &mut verdict)
                {
                    return RouteMatch::Found(handler);
                }
                if end == 0 {
                    break;
                }
                end = truncated.rfind('/').unwrap_or(0);
            }
        }
        if verdict.method_not_allowed {
            RouteMatch::MethodNotAllowed
        } else {
            RouteMatch::NotFound
        }
    }

    fn enter(&self) -> InFlight {
        self.lifecycle.enter()
    }

    fn sync_close(&self, grace: Duration) -> impl Future<Output = ()> + Send {
        self.lifecycle.close(grace)
    }
}

/// `""` and `"*"` mean any method; anything else must be an HTTP token, kept upper case.
fn normalise_method(pattern: &str, method: &str) -> Result<Option<Box<str>>, RouteError> {
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
    Ok(Some(method.to_ascii_uppercase().into()))
}

/// `""` means any host; otherwise the host is kept lower case, without port or trailing dot.
fn normalise_host(pattern: &str, host: &str) -> Result<Option<Box<str>>, RouteError> {
    if host.is_empty() {
        return Ok(None);
    }
    let name = host_without_port(host);
    if name.is_empty() || name.contains(|c: char| c == '/' || c.is_whitespace()) {
        return Err(RouteError::InvalidPattern {
            pattern: pattern.to_owned(),
            reason: format!("host {host:?} is not a host name"),
        });
    }
    Ok(Some(name.to_ascii_lowercase().into()))
}

/// Strips a `:port` (and a trailing dot) from a Host header value without allocating:
/// `api.example.com:8080` -> `api.example.com`, `[::1]:80` -> `[::1]`.
fn host_without_port(host: &str) -> &str {
    let name = if host.starts_with('[') {
        match host.find(']') {
            Some(close) => &host[..=close],
            None => host,
        }
    } else {
        match host.rsplit_once(':') {
            Some((name, port))
                if !name.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) =>
            {
                name
            }
            _ => host,
        }
    };
    name.strip_suffix('.').unwrap_or(name)
}

//! Request routing for the gateway: a [`Router`] trait and its matchit-based
//! implementation, [`MuxRouter`].
//!
//! A route is a path pattern plus an optional method and an optional host. Path patterns
//! follow the Kratos / gorilla-mux forms:
//!
//! | form        | example                     | matches                                             |
//! |-------------|-----------------------------|-----------------------------------------------------|
//! | exact       | `/api/echo/hello`           | that path only (a trailing slash is significant)    |
//! | prefix      | `/api/echo/*`               | `/api/echo`, `/api/echo/`, `/api/echo/a/b/c`, …     |
//! | restful     | `/api/echo/{name}`          | one non-empty segment: `/api/echo/bob`              |
//! | constrained | `/api/echo/{name:[a-z]+}`   | one segment the regex matches *whole*               |
//!
//! `/*` matches every path. Parameters always span a whole segment. Paths are matched
//! as given: no percent-decoding, no dot-segment removal, and the caller passes the URI
//! path without its query string. The gateway first brings every request path to one
//! normal form with [`path::normalize`] (unreserved escapes decoded, `//` collapsed, dot
//! segments refused) and forwards that same form, so a route and its upstream never read
//! two spellings of one path differently.
//!
//! A method of `""` or `"*"` means any method; methods compare case-insensitively. A host
//! of `""` means any host; otherwise it is one name, or a template with `{name}` (one DNS
//! label) or `{name:regex}` parts as in Kratos (`{sub}.example.com`), compared
//! case-insensitively with the request's port and any trailing dot ignored.
//!
//! ```
//! use router::{MuxRouter, RouteMatch, Router};
//!
//! let mut router = MuxRouter::new();
//! router.handle("/api/echo/*", "", "", "echo", None)?;
//! router.handle("/api/users/{id:[0-9]+}", "GET", "", "user", None)?;
//! assert_eq!(router.route("get", "api.example.com:8080", "/api/users/42").found(), Some(&"user"));
//! assert_eq!(router.route("GET", "", "/api/echo").found(), Some(&"echo"));
//! assert_eq!(router.route("POST", "", "/api/users/42"), RouteMatch::MethodNotAllowed);
//! assert_eq!(router.route("GET", "", "/api/users/bob"), RouteMatch::NotFound);
//! # Ok::<(), router::RouteError>(())
//! ```
//!
//! # Priority
//!
//! When several routes match a path they are tried in this order:
//! 1. exact patterns, then restful patterns, then prefix patterns, whatever their lengths;
//! 2. among restful patterns, compared segment by segment from the left, a static segment
//!    beats a parameter (matchit's order): `/x/{id}/posts` before `/x/{a}/{b}`;
//! 3. among prefix patterns, the longest fixed part first (`/api/echo/*` before `/api/*`
//!    for `/api/echo/x`), then rule 2 between fixed parts of equal length;
//! 4. patterns of the same shape (`/x/{id:[0-9]+}` and `/x/{name:[a-z]+}`, or `/x/{a}`
//!    for GET and `/x/{b}` for POST): host-specific first, then routes with more header
//!    and query matchers first, then registration order.
//!
//! Header and query matchers ([`MuxRouter::handle_matching`], [`MatchRule`]) are further
//! conditions, all of which must hold: a header or query parameter with a given value, a
//! value matching an anchored regex, or merely present. A route whose matchers fail is
//! skipped like one for another host (it never causes a 405), so on one path a route with
//! matchers is tried before the plain one, which takes the rest. Only lookups through
//! [`MuxRouter::route_request`] see headers and query; they are read only when a candidate
//! route has matchers, so tables without any never pay for them.
//!
//! A route takes the request only if its constraints, host and method all match;
//! otherwise the next route in that order is tried, so a GET-only `/api/users` lets a POST
//! fall through to `/api/*`. When no route takes it, the result is
//! [`RouteMatch::MethodNotAllowed`] if some route matched path, constraints and host but
//! not the method, else [`RouteMatch::NotFound`].
//!
//! # Cost
//!
//! A lookup counts the path's segments, then does one matchit lookup in each tree that
//! holds patterns of that length (for prefixes: each truncation length some prefix
//! pattern has), and scans the few routes sharing the matched key. It takes no lock and,
//! in the common case, allocates nothing; the cost grows with the path, not the table.
//! Only when every route under the matched key declines does it walk that key's list of
//! other overlapping routes, computed once on first need.

#![forbid(unsafe_code)]

mod inflight;
mod matcher;
mod mux;
pub mod path;
mod pattern;

use std::future::Future;
use std::time::Duration;

pub use inflight::InFlight;
pub use matcher::{MatchRule, MatchSource, MatchTest, NoParts, RequestParts};
pub use mux::{MuxRouter, RouteEntry};

/// Runs once when the router is closed (after in-flight requests drained or the grace expired).
pub type Closer = Box<dyn FnOnce() + Send + Sync>;

/// Why a route could not be registered.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    /// The path pattern is not one of the supported forms.
    #[error("invalid route pattern {pattern:?}: {reason}")]
    InvalidPattern {
        /// The pattern as given.
        pattern: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A `{name:regex}` constraint does not compile.
    #[error("invalid regex in route pattern {pattern:?}: {}", regex_summary(.source))]
    InvalidRegex {
        /// The pattern as given.
        pattern: String,
        /// The regex compiler's error.
        #[source]
        source: regex::Error,
    },
    /// A route with the same pattern, method and host is already registered.
    #[error("duplicate route: method {method:?} host {host:?} pattern {pattern:?}")]
    Duplicate {
        /// The pattern as given.
        pattern: String,
        /// The method as given ("" = any).
        method: String,
        /// The host as given ("" = any).
        host: String,
    },
    /// The pattern cannot live in the same routing table as an existing one.
    #[error("route pattern {pattern:?} conflicts with an existing route: {reason}")]
    Conflict {
        /// The pattern as given.
        pattern: String,
        /// The underlying routing-tree error.
        reason: String,
    },
}

/// The one-line gist of a regex error (the regex crate's syntax errors are a multi-line
/// diagram whose last `error: ` line says what is wrong).
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

/// The outcome of a lookup.
#[derive(Debug)]
pub enum RouteMatch<'a, H> {
    /// The handler of the highest-priority route that accepts the request.
    Found(&'a H),
    /// No route matches the path (with its constraints and host): answer 404.
    NotFound,
    /// Some route matches path, constraints and host, but none allows the method: answer 405.
    MethodNotAllowed,
}

impl<H> Clone for RouteMatch<'_, H> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<H> Copy for RouteMatch<'_, H> {}

impl<H> PartialEq for RouteMatch<'_, H> {
    /// Two `Found` results are equal when they point at the same handler.
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Found(a), Self::Found(b)) => std::ptr::eq(*a, *b),
            (Self::NotFound, Self::NotFound) => true,
            (Self::MethodNotAllowed, Self::MethodNotAllowed) => true,
            _ => false,
        }
    }
}

impl<H> Eq for RouteMatch<'_, H> {}

impl<'a, H> RouteMatch<'a, H> {
    /// The handler, if the lookup found one.
    pub fn found(self) -> Option<&'a H> {
        match self {
            Self::Found(handler) => Some(handler),
            Self::NotFound | Self::MethodNotAllowed => None,
        }
    }
}

/// What a routing table does; [`MuxRouter`] is the implementation.
///
/// `sync_close` returns `impl Future`, so the trait is not object-safe: hold the concrete
/// router type (for example in an `ArcSwap<MuxRouter<H>>`).
pub trait Router<H>: Send + Sync {
    /// Registers `handler` for `pattern` ("" method = any method, "" host = any host).
    /// `closer` runs at `sync_close`.
    ///
    /// From this call on the router owns `closer`: if registration fails, the closer is run
    /// before the error is returned, so the caller must not close that resource itself.
    fn handle(
        &mut self,
        pattern: &str,
        method: &str,
        host: &str,
        handler: H,
        closer: Option<Closer>,
    ) -> Result<(), RouteError>;

    /// Finds the handler for a request. `host` may carry a port ("api.example.com:8080"),
    /// which is ignored; hosts compare case-insensitively, and so do methods.
    fn route(&self, method: &str, host: &str, path: &str) -> RouteMatch<'_, H>;

    /// Marks a request in flight for as long as the guard lives (`sync_close` waits for these).
    fn enter(&self) -> InFlight;

    /// Waits until no request is in flight or `grace` elapsed, then runs every closer once,
    /// in registration order. Idempotent: a concurrent call waits for the first one to
    /// finish, a later call returns at once, and closers never run twice. Poll it inside a
    /// tokio runtime (it uses tokio's timer).
    fn sync_close(&self, grace: Duration) -> impl Future<Output = ()> + Send;
}

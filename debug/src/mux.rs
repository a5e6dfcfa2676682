//! The `/debug` mux: protection, the built-in views, dispatch to registered views, and the
//! index page.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Full;

use crate::heap::{self, HeapProfiler};
use crate::profile::{self, Output};
use crate::query::Query;
use crate::response::DebugResponse;

/// The path every debug view lives under.
pub const PREFIX: &str = "/debug";

/// Request headers that show a request came through a proxy; such a request is refused.
const FORWARDING_HEADERS: [&str; 3] = ["x-forwarded-for", "forwarded", "x-real-ip"];

/// One view a [`Debuggable`] serves, as listed on the index page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct View {
    /// Full path, starting with `/debug/`.
    pub path: &'static str,
    /// One line for the index page (mention query parameters here).
    pub description: &'static str,
}

/// A component that shows views under `/debug`. The mux calls `serve` only with a path
/// that `views` listed, after the protection checks.
pub trait Debuggable: Send + Sync {
    /// The views this component serves.
    fn views(&self) -> Vec<View>;

    /// Answers a GET of `path` (one of `views`) with the decoded `query`.
    fn serve(&self, path: &str, query: &Query) -> DebugResponse;
}

/// What the mux does with one path.
enum Handler {
    Ping,
    PprofIndex,
    Profile(Output),
    Heap,
    Runtime,
    View(Arc<dyn Debuggable>),
}

/// The index of the profiles, as Go's `net/http/pprof` serves it.
const PPROF_INDEX: &str = "/debug/pprof/";

/// Serves `/debug` and `/debug/*`: built-in views (index, ping, CPU profiles) and the views
/// of every registered [`Debuggable`].
///
/// Only operators reach it: a request from a non-loopback peer, or one carrying
/// `X-Forwarded-For`, `Forwarded` or `X-Real-IP` (it came through a proxy), gets 403.
/// Only GET and HEAD are served (405 otherwise); an unknown path gets 404. Every error is
/// a JSON `{"error": ...}`.
pub struct DebugMux {
    handlers: BTreeMap<&'static str, Handler>,
    descriptions: BTreeMap<&'static str, &'static str>,
    heap_profiler: Option<HeapProfiler>,
}

impl Default for DebugMux {
    fn default() -> Self {
        DebugMux::new()
    }
}

impl DebugMux {
    /// A mux with the built-in views: `/debug` (index), `/debug/ping`, `/debug/pprof/`
    /// (index of the profiles), `/debug/pprof/profile`, `/debug/pprof/flamegraph`,
    /// `/debug/pprof/heap` (501 until [`with_heap_profiler`](Self::with_heap_profiler)) and
    /// `/debug/runtime`.
    pub fn new() -> Self {
        let mut mux = DebugMux {
            handlers: BTreeMap::new(),
            descriptions: BTreeMap::new(),
            heap_profiler: None,
        };
        mux.add(
            View {
                path: "/debug/ping",
                description: "liveness: answers 200 pong",
            },
            Handler::Ping,
        );
        mux.add(
            View {
                path: "/debug/pprof/profile",
                description: "CPU profile in pprof protobuf (go tool pprof); ?seconds=N, default 30, at most 60",
            },
            Handler::Profile(Output::Pprof),
        );
        mux.add(
            View {
                path: "/debug/pprof/flamegraph",
                description: "CPU flame graph as SVG; ?seconds=N, default 30, at most 60",
            },
            Handler::Profile(Output::Flamegraph),
        );
        mux.add(
            View {
                path: PPROF_INDEX,
                description: "index of the profiles (CPU, flame graph, heap)",
            },
            Handler::PprofIndex,
        );
        mux.add(
            View {
                path: "/debug/pprof/heap",
                description: "heap profile of sampled live allocations, gzipped pprof protobuf (go tool pprof); 501 without a profiling allocator",
            },
            Handler::Heap,
        );
        mux.add(
            View {
                path: "/debug/runtime",
                description: "tokio runtime: workers, alive tasks, global queue depth, per-worker park counts and busy time",
            },
            Handler::Runtime,
        );
        mux
    }

    /// Serves `/debug/pprof/heap` with `dump` (the binary hands over its allocator's
    /// profile). Without one, the view answers 501.
    pub fn with_heap_profiler(mut self, dump: HeapProfiler) -> Self {
        self.heap_profiler = Some(dump);
        self
    }

    /// Adds every view of `component`. A path that is already taken keeps its first owner
    /// (logged); a path outside `/debug/` is ignored (logged).
    pub fn register(&mut self, component: Arc<dyn Debuggable>) {
        for view in component.views() {
            if !view.path.starts_with("/debug/") {
                tracing::warn!(path = view.path, "debug view outside /debug/ ignored");
                continue;
            }
            self.add(view, Handler::View(component.clone()));
        }
    }

    fn add(&mut self, view: View, handler: Handler) {
        if self.handlers.contains_key(view.path) {
            tracing::warn!(
                path = view.path,
                "debug view registered twice; keeping the first"
            );
            return;
        }
        self.handlers.insert(view.path, handler);
        self.descriptions.insert(view.path, view.description);
    }

    /// Every view with its description, in path order (what the index page lists).
    pub fn views(&self) -> Vec<View> {
        self.descriptions
            .iter()
            .map(|(path, description)| View { path, description })
            .collect()
    }

    /// Whether `path` belongs to the mux: `/debug` or anything under `/debug/`.
    pub fn matches(path: &str) -> bool {
        path == PREFIX
            || path
                .strip_prefix(PREFIX)
                .is_some_and(|rest| rest.starts_with('/'))
    }

    /// Serves one request that [`matches`](Self::matches); `remote` is the peer address.
    /// Never fails: every problem is a response.
    pub async fn handle<B>(&self, req: Request<B>, remote: SocketAddr) -> Response<Full<Bytes>> {
        let mut response = self.answer(&req, remote).await.into_response();
        if response.status() == StatusCode::METHOD_NOT_ALLOWED {
            response
                .headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        }
        response
    }

    async fn answer<B>(&self, req: &Request<B>, remote: SocketAddr) -> DebugResponse {
        if let Some(reason) = refusal(req, remote) {
            tracing::debug!(%remote, path = req.uri().path(), reason, "debug request refused");
            return DebugResponse::error(StatusCode::FORBIDDEN, reason);
        }
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return DebugResponse::error(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("debug views answer GET and HEAD, not {}", req.method()),
            );
        }
        let path = req.uri().path();
        let query = Query::parse(req.uri().query().unwrap_or(""));
        if path == PREFIX || path == "/debug/" {
            return self.index();
        }
        let path = if path == "/debug/pprof" {
            PPROF_INDEX
        } else {
            path
        };
        match self.handlers.get(path) {
            Some(Handler::Ping) => {
                DebugResponse::new(StatusCode::OK, "text/plain; charset=utf-8", "pong\n")
            }
            Some(Handler::PprofIndex) => self.pprof_index(),
            Some(Handler::Profile(output)) => profile::serve(&query, *output).await,
            Some(Handler::Heap) => heap::serve(self.heap_profiler).await,
            Some(Handler::Runtime) => crate::runtime::serve(),
            Some(Handler::View(component)) => component.serve(path, &query),
            None => DebugResponse::error(
                StatusCode::NOT_FOUND,
                format!("no debug view at {path}; see /debug for the list"),
            ),
        }
    }

    /// The HTML index: one link per view with its description.
    fn index(&self) -> DebugResponse {
        index_page("gateway debug views", self.views())
    }

    /// The HTML index of the profiles: every view under `/debug/pprof/` but itself.
    fn pprof_index(&self) -> DebugResponse {
        let views = self
            .views()
            .into_iter()
            .filter(|view| view.path.starts_with(PPROF_INDEX) && view.path != PPROF_INDEX)
            .collect();
        index_page("gateway profiles", views)
    }
}

/// An HTML page titled `title` with one link per view and its description.
fn index_page(title: &str, views: Vec<View>) -> DebugResponse {
    let title = escape_html(title);
    let mut html = format!(
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{title}</title></head>\n<body><h1>{title}</h1>\n<ul>\n"
    );
    for view in views {
        let path = escape_html(view.path);
        html.push_str(&format!(
            "<li><a href=\"{path}\">{path}</a> &mdash; {}</li>\n",
            escape_html(view.description)
        ));
    }
    html.push_str("</ul>\n</body></html>\n");
    DebugResponse::new(StatusCode::OK, "text/html; charset=utf-8", html)
}

/// Why a request may not see the debug views, if it may not.
fn refusal<B>(req: &Request<B>, remote: SocketAddr) -> Option<&'static str> {
    if !remote.ip().to_canonical().is_loopback() {
        return Some("debug views are served to loopback clients only");
    }
    if FORWARDING_HEADERS
        .iter()
        .any(|name| req.headers().contains_key(*name))
    {
        return Some(
            "debug views are not served to proxied requests (X-Forwarded-For, Forwarded or X-Real-IP present)",
        );
    }
    None
}

fn escape_html(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => escaped.push_str("&amp;"),
            '<' => escaped.push_str("&lt;"),
            '>' => escaped.push_str("&gt;"),
            '"' => escaped.push_str("&quot;"),
            '\'' => escaped.push_str("&#39;"),
            c => escaped.push(c),
        }
    }
    escaped
}

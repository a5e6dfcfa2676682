//! Conformance table, registration errors and a randomised comparison against a naive matcher.

use std::cmp::Reverse;

use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};

use super::*;
use crate::{MatchSource, MatchTest};

/// What a lookup should produce, with `Found` naming the route by its index in the set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    Found(usize),
    NotFound,
    NotAllowed,
}

use Want::{Found, NotAllowed, NotFound};

type RouteSpec = (&'static str, &'static str, &'static str);

fn build(specs: &[RouteSpec]) -> MuxRouter<usize> {
    let mut router = MuxRouter::new();
    for (id, (pattern, method, host)) in specs.iter().enumerate() {
        router
            .handle(pattern, method, host, id, None)
            .unwrap_or_else(|error| panic!("register {pattern:?}: {error}"));
    }
    router
}

fn outcome(router: &MuxRouter<usize>, method: &str, host: &str, path: &str) -> Want {
    match router.route(method, host, path) {
        RouteMatch::Found(id) => Found(*id),
        RouteMatch::NotFound => NotFound,
        RouteMatch::MethodNotAllowed => NotAllowed,
    }
}

/// Every path form together, so priorities between them are exercised.
const ALL_FORMS: &[RouteSpec] = &[
    ("/api/echo/hello", "", ""),             // 0
    ("/api/echo/*", "", ""),                 // 1
    ("/api/echo/{name}", "GET", ""),         // 2
    ("/api/echo/{name:[a-z]+}", "POST", ""), // 3
    ("/api/*", "", ""),                      // 4
    ("/users/{id:[0-9]+}", "", ""),          // 5
    ("/users/{name:[a-z]+}", "", ""),        // 6
    ("/host/x", "", "api.example.com"),      // 7
    ("/host/x", "", ""),                     // 8
    ("/m/only", "GET", ""),                  // 9
    ("/m/only", "delete", ""),               // 10
    ("/slash/", "", ""),                     // 11
    ("/enc/{seg}", "", ""),                  // 12
    ("/enc/a%2Fb", "", ""),                  // 13
    ("/", "", ""),                           // 14
    ("/users/{id:[0-9]+}/posts", "", ""),    // 15
    ("/users/{a}/{b}", "", ""),              // 16
];

const PREFIXES: &[RouteSpec] = &[
    ("/*", "", ""),                              // 0
    ("/api/*", "", ""),                          // 1
    ("/api/echo/*", "", ""),                     // 2
    ("/api/echo/*", "", "internal.example.com"), // 3: later, but host-specific
    ("/api/{v}/*", "GET", ""),                   // 4
    ("/api/v1/*", "GET", ""),                    // 5
];

const METHODS: &[RouteSpec] = &[
    ("/api/users", "GET", ""),      // 0
    ("/api/*", "POST", ""),         // 1
    ("/h", "GET", "a.example.com"), // 2
    ("/x/{a}", "GET", ""),          // 3
    ("/x/{b}", "POST", ""),         // 4
    ("/any", "*", ""),              // 5
];

const SLASHES: &[RouteSpec] = &[
    ("/a", "", ""),              // 0
    ("/a/*", "", ""),            // 1
    ("/a/", "", ""),             // 2
    ("/v6", "", "[::1]"),        // 3
    ("/dot", "", "Example.COM"), // 4
];

#[test]
fn conformance_table() {
    #[rustfmt::skip]
    let table: &[(&[RouteSpec], &str, &str, &str, Want)] = &[
        // exact beats restful beats prefix
        (ALL_FORMS, "GET", "", "/api/echo/hello", Found(0)),
        (ALL_FORMS, "GET", "", "/api/echo/bob", Found(2)),
        (ALL_FORMS, "POST", "", "/api/echo/bob", Found(3)),
        // constraint fails and GET-only route declines: falls through to the prefix
        (ALL_FORMS, "POST", "", "/api/echo/bob1", Found(1)),
        (ALL_FORMS, "PUT", "", "/api/echo/bob", Found(1)),
        // prefix forms: bare, trailing slash, deep
        (ALL_FORMS, "GET", "", "/api/echo", Found(1)),
        (ALL_FORMS, "GET", "", "/api/echo/", Found(1)),
        (ALL_FORMS, "GET", "", "/api/echo/a/b/c", Found(1)),
        (ALL_FORMS, "GET", "", "/api/echo/hello/x", Found(1)),
        // the shorter prefix catches the rest of /api
        (ALL_FORMS, "GET", "", "/api/other", Found(4)),
        (ALL_FORMS, "GET", "", "/api", Found(4)),
        (ALL_FORMS, "GET", "", "/api/", Found(4)),
        (ALL_FORMS, "GET", "", "/apix", NotFound),
        (ALL_FORMS, "GET", "", "/apix/echo", NotFound),
        // constrained params, anchored regexes, same shape in registration order
        (ALL_FORMS, "GET", "", "/users/42", Found(5)),
        (ALL_FORMS, "GET", "", "/users/bob", Found(6)),
        (ALL_FORMS, "GET", "", "/users/bob1", NotFound),
        (ALL_FORMS, "GET", "", "/users/1bob", NotFound),
        (ALL_FORMS, "GET", "", "/users/", NotFound),
        (ALL_FORMS, "GET", "", "/users", NotFound),
        (ALL_FORMS, "GET", "", "/users//", NotFound),
        // a failing constraint falls back to a less specific shape
        (ALL_FORMS, "GET", "", "/users/12/posts", Found(15)),
        (ALL_FORMS, "GET", "", "/users/bob/posts", Found(16)),
        (ALL_FORMS, "GET", "", "/users/12/likes", Found(16)),
        (ALL_FORMS, "GET", "", "/users//posts", NotFound),
        // hosts: specific wins, port ignored, case-insensitive
        (ALL_FORMS, "GET", "api.example.com", "/host/x", Found(7)),
        (ALL_FORMS, "GET", "API.Example.COM:8080", "/host/x", Found(7)),
        (ALL_FORMS, "GET", "other.example.com", "/host/x", Found(8)),
        (ALL_FORMS, "GET", "", "/host/x", Found(8)),
        // methods: case-insensitive, 405 when only the method is wrong
        (ALL_FORMS, "GET", "", "/m/only", Found(9)),
        (ALL_FORMS, "get", "", "/m/only", Found(9)),
        (ALL_FORMS, "DELETE", "", "/m/only", Found(10)),
        (ALL_FORMS, "Delete", "", "/m/only", Found(10)),
        (ALL_FORMS, "POST", "", "/m/only", NotAllowed),
        // trailing slash is significant for exact routes
        (ALL_FORMS, "GET", "", "/slash/", Found(11)),
        (ALL_FORMS, "GET", "", "/slash", NotFound),
        // percent-encoded segments are matched as given, never decoded
        (ALL_FORMS, "GET", "", "/enc/a%2Fb", Found(13)),
        (ALL_FORMS, "GET", "", "/enc/a%2fb", Found(12)),
        (ALL_FORMS, "GET", "", "/enc/a%2Fc", Found(12)),
        (ALL_FORMS, "GET", "", "/enc/a/b", NotFound),
        (ALL_FORMS, "GET", "", "/", Found(14)),
        (ALL_FORMS, "GET", "", "", NotFound),
        (ALL_FORMS, "GET", "", "api/echo/hello", NotFound),
        (ALL_FORMS, "GET", "", "//", NotFound),
        // prefixes: longest wins, root catches everything
        (PREFIXES, "GET", "", "/anything", Found(0)),
        (PREFIXES, "GET", "", "/", Found(0)),
        (PREFIXES, "GET", "", "/apiecho", Found(0)),
        (PREFIXES, "GET", "", "/api", Found(1)),
        (PREFIXES, "POST", "", "/api/x", Found(1)),
        (PREFIXES, "GET", "", "/api/echo", Found(2)),
        (PREFIXES, "GET", "", "/api/echo/x/y", Found(2)),
        (PREFIXES, "GET", "internal.example.com:443", "/api/echo/x", Found(3)),
        (PREFIXES, "GET", "", "/api/v1", Found(5)),
        (PREFIXES, "GET", "", "/api/v1/x", Found(5)),
        (PREFIXES, "GET", "", "/api/v2/x", Found(4)),
        (PREFIXES, "POST", "", "/api/v2/x", Found(1)),
        // method fallthrough and 405
        (METHODS, "GET", "", "/api/users", Found(0)),
        (METHODS, "POST", "", "/api/users", Found(1)),
        (METHODS, "PUT", "", "/api/users", NotAllowed),
        (METHODS, "PUT", "", "/api/x/y", NotAllowed),
        (METHODS, "PUT", "", "/other", NotFound),
        (METHODS, "GET", "a.example.com", "/h", Found(2)),
        (METHODS, "POST", "a.example.com", "/h", NotAllowed),
        (METHODS, "POST", "b.example.com", "/h", NotFound),
        (METHODS, "GET", "b.example.com", "/h", NotFound),
        (METHODS, "GET", "", "/x/1", Found(3)),
        (METHODS, "POST", "", "/x/1", Found(4)),
        (METHODS, "PUT", "", "/x/1", NotAllowed),
        (METHODS, "PATCH", "", "/any", Found(5)),
        // exact beats the bare and slash forms of a prefix
        (SLASHES, "GET", "", "/a", Found(0)),
        (SLASHES, "GET", "", "/a/", Found(2)),
        (SLASHES, "GET", "", "/a/b", Found(1)),
        (SLASHES, "GET", "", "/a//", Found(1)),
        (SLASHES, "GET", "[::1]:8080", "/v6", Found(3)),
        (SLASHES, "GET", "[::1]", "/v6", Found(3)),
        (SLASHES, "GET", "[::2]", "/v6", NotFound),
        (SLASHES, "GET", "example.com.", "/dot", Found(4)),
        (SLASHES, "GET", "EXAMPLE.com:80", "/dot", Found(4)),
    ];
    let mut failures = Vec::new();
    for &(specs, method, host, path, want) in table {
        let router = build(specs);
        // Twice: the second lookup runs with fallback lists already computed.
        for _ in 0..2 {
            let got = outcome(&router, method, host, path);
            if got != want {
                failures.push(format!(
                    "{method} {host:?} {path:?}: got {got:?}, want {want:?}"
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn registration_errors() {
    let mut router: MuxRouter<usize> = MuxRouter::new();
    router
        .handle("/x/{a}", "GET", "h.example.com", 0, None)
        .expect("first");
    for (pattern, method, host) in [
        ("/x/{a}", "GET", "h.example.com"),
        ("/x/{b}", "get", "H.example.com:8080"),
    ] {
        let error = router
            .handle(pattern, method, host, 1, None)
            .expect_err("duplicate");
        assert!(matches!(error, RouteError::Duplicate { .. }), "{error}");
    }
    // Same shape, but a different constraint, method or host is not a duplicate.
    router
        .handle("/x/{a:[0-9]+}", "GET", "h.example.com", 2, None)
        .expect("constraint");
    router
        .handle("/x/{a}", "POST", "h.example.com", 3, None)
        .expect("method");
    router.handle("/x/{a}", "GET", "", 4, None).expect("host");
    router
        .handle("/x/*", "GET", "h.example.com", 5, None)
        .expect("prefix");
    let error = router
        .handle("/x/*", "", "", 6, None)
        .and_then(|()| router.handle("/x/*", "*", "", 7, None));
    assert!(matches!(error, Err(RouteError::Duplicate { .. })));
    assert!(matches!(
        router.handle("/y/{id:[0-9}", "", "", 8, None),
        Err(RouteError::InvalidRegex { .. })
    ));
    for (pattern, method, host) in [
        ("y", "", ""),
        ("/y/*/z", "", ""),
        ("/y", "GE T", ""),
        ("/y", "", "a/b"),
        ("/y", "", ":80"),
    ] {
        let error = router
            .handle(pattern, method, host, 9, None)
            .expect_err("invalid");
        assert!(
            matches!(error, RouteError::InvalidPattern { .. }),
            "{error}"
        );
    }
    assert_eq!(router.len(), 6);
    assert!(!router.is_empty());
    let listed: Vec<(&str, Option<&str>, Option<&str>, usize)> = router
        .routes()
        .map(|entry| (entry.pattern, entry.method, entry.host, *entry.handler))
        .collect();
    assert_eq!(
        listed[1],
        ("/x/{a:[0-9]+}", Some("GET"), Some("h.example.com"), 2)
    );
    assert_eq!(listed[5], ("/x/*", None, None, 6));
}

#[test]
fn a_rejected_route_runs_its_closer_and_changes_nothing() {
    use std::sync::Arc;
    use std::sync::atomic::AtomicUsize;
    let closed = Arc::new(AtomicUsize::new(0));
    let counting = |closed: &Arc<AtomicUsize>| -> Option<Closer> {
        let closed = Arc::clone(closed);
        Some(Box::new(move || {
            closed.fetch_add(1, Ordering::SeqCst);
        }))
    };
    let mut router: MuxRouter<usize> = MuxRouter::new();
    router
        .handle("/a", "", "", 0, counting(&closed))
        .expect("first");
    assert_eq!(closed.load(Ordering::SeqCst), 0);
    assert!(router.handle("/a", "", "", 1, counting(&closed)).is_err());
    assert_eq!(
        closed.load(Ordering::SeqCst),
        1,
        "the rejected route's closer ran"
    );
    assert_eq!(router.len(), 1);
    assert_eq!(outcome(&router, "GET", "", "/a"), Found(0));
}

#[test]
fn registering_after_lookups_recomputes_fallbacks() {
    let mut router = build(&[("/x/{id:[0-9]+}", "", ""), ("/*", "GET", "")]);
    assert_eq!(outcome(&router, "GET", "", "/x/abc"), Found(1));
    assert_eq!(outcome(&router, "POST", "", "/x/abc"), NotAllowed);
    router
        .handle("/x/{name}", "POST", "", 2, None)
        .expect("register");
    assert_eq!(outcome(&router, "POST", "", "/x/abc"), Found(2));
    assert_eq!(outcome(&router, "GET", "", "/x/abc"), Found(1));
    assert_eq!(outcome(&router, "GET", "", "/x/12"), Found(0));
}

#[test]
fn paths_longer_than_the_length_index_still_match() {
    let deep: String = (0..70).map(|i| format!("/s{i}")).collect();
    let deeper = format!("{deep}/x/y");
    let mut router = build(&[("/s0/*", "", ""), ("/s0/s1/{p}/*", "", "")]);
    router.handle(&deep, "", "", 2, None).expect("deep exact");
    router
        .handle(&format!("{deep}/*"), "", "", 3, None)
        .expect("deep prefix");
    assert_eq!(outcome(&router, "GET", "", &deep), Found(2));
    assert_eq!(outcome(&router, "GET", "", &deeper), Found(3));
    assert_eq!(
        outcome(&router, "GET", "", &format!("/s0/s1/s2{deep}")),
        Found(1)
    );
    assert_eq!(
        outcome(&router, "GET", "", &format!("/s0/z{deep}")),
        Found(0)
    );
}

#[test]
fn host_without_port_handles_the_usual_forms() {
    for (given, want) in [
        ("api.example.com", "api.example.com"),
        ("api.example.com:8080", "api.example.com"),
        ("api.example.com.", "api.example.com"),
        ("api.example.com.:80", "api.example.com"),
        ("127.0.0.1:80", "127.0.0.1"),
        ("[::1]:8080", "[::1]"),
        ("[::1]", "[::1]"),
        ("::1", "::1"),
        ("host:port", "host:port"),
        ("", ""),
    ] {
        assert_eq!(host_without_port(given), want, "{given:?}");
    }
}

// ---------------------------------------------------------------------------------------
// Randomised comparison against a naive matcher.

#[derive(Debug, Clone, PartialEq, Eq)]
enum NaiveSegment {
    Literal(String),
    /// A parameter with an optional character class: 'd' digits, 'l' lower-case letters.
    Param(Option<char>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct NaiveRoute {
    segments: Vec<NaiveSegment>,
    prefix: bool,
    method: Option<String>,
    host: Option<String>,
    /// Sorted and without repeats, as the router keeps them.
    matchers: Vec<MatchRule>,
}

/// A request's headers and raw query, as the random lookups make them.
#[derive(Debug, Default)]
struct Parts {
    headers: Vec<(&'static str, &'static str)>,
    query: Option<&'static str>,
}

impl RequestParts for Parts {
    fn header_values(&self, name: &str) -> impl Iterator<Item = &[u8]> {
        self.headers
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_bytes())
    }

    fn raw_query(&self) -> Option<&str> {
        self.query
    }
}

/// The naive reading of the matchers: decode every pair by hand, compare.
fn naive_matchers_hold(matchers: &[MatchRule], parts: &Parts) -> bool {
    let decode = |text: &str| -> String {
        let bytes = text.replace('+', " ").into_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < bytes.len() {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|pair| std::str::from_utf8(pair).ok())
                .and_then(|pair| u8::from_str_radix(pair, 16).ok());
            match (bytes[i], hex) {
                (b'%', Some(byte)) => {
                    out.push(byte);
                    i += 3;
                }
                (byte, _) => {
                    out.push(byte);
                    i += 1;
                }
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    };
    let pairs: Vec<(String, String)> = parts
        .query
        .map(|query| {
            query
                .split('&')
                .filter(|pair| !pair.is_empty())
                .map(|pair| match pair.split_once('=') {
                    Some((name, value)) => (decode(name), decode(value)),
                    None => (decode(pair), String::new()),
                })
                .collect()
        })
        .unwrap_or_default();
    matchers.iter().all(|rule| {
        let values: Vec<String> = match rule.source {
            MatchSource::Header => parts
                .headers
                .iter()
                .filter(|(name, _)| name.eq_ignore_ascii_case(&rule.name))
                .map(|(_, value)| (*value).to_owned())
                .collect(),
            MatchSource::Query => pairs
                .iter()
                .filter(|(name, _)| *name == rule.name)
                .map(|(_, value)| value.clone())
                .collect(),
        };
        match &rule.test {
            MatchTest::Present => !values.is_empty(),
            MatchTest::Value(want) => values.iter().any(|value| value == want),
            // The generator's only regex is `[0-9]+`.
            MatchTest::Regex(_) => values
                .iter()
                .any(|value| !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit())),
        }
    })
}

impl NaiveRoute {
    fn pattern(&self) -> String {
        let mut text = String::new();
        for (index, segment) in self.segments.iter().enumerate() {
            text.push('/');
            match segment {
                NaiveSegment::Literal(literal) => text.push_str(literal),
                NaiveSegment::Param(None) => text.push_str(&format!("{{p{index}}}")),
                NaiveSegment::Param(Some('d')) => text.push_str(&format!("{{p{index}:[0-9]+}}")),
                NaiveSegment::Param(Some(_)) => text.push_str(&format!("{{p{index}:[a-z]+}}")),
            }
        }
        if self.prefix {
            text.push_str("/*");
        }
        text
    }

    fn path_matches(&self, pieces: &[&str]) -> bool {
        let count_ok = if self.prefix {
            pieces.len() >= self.segments.len()
        } else {
            pieces.len() == self.segments.len()
        };
        count_ok
            && self
                .segments
                .iter()
                .zip(pieces)
                .all(|(segment, piece)| match segment {
                    NaiveSegment::Literal(literal) => literal == piece,
                    NaiveSegment::Param(class) => {
                        !piece.is_empty()
                            && match class {
                                None => true,
                                Some('d') => piece.chars().all(|c| c.is_ascii_digit()),
                                Some(_) => piece.chars().all(|c| c.is_ascii_lowercase()),
                            }
                    }
                })
    }

    /// Sort key: restful/exact before prefix; longer prefixes first; from the left a
    /// literal before a parameter; host-specific first; then registration order.
    fn rank(&self, id: usize) -> (bool, Reverse<usize>, Vec<u8>, bool, Reverse<usize>, usize) {
        let kinds = self
            .segments
            .iter()
            .map(|segment| u8::from(matches!(segment, NaiveSegment::Param(_))))
            .collect();
        let length = if self.prefix { self.segments.len() } else { 0 };
        (
            self.prefix,
            Reverse(length),
            kinds,
            self.host.is_none(),
            Reverse(self.matchers.len()),
            id,
        )
    }
}

fn naive_route(routes: &[NaiveRoute], method: &str, host: &str, path: &str, parts: &Parts) -> Want {
    let Some(rest) = path.strip_prefix('/') else {
        return NotFound;
    };
    let pieces: Vec<&str> = rest.split('/').collect();
    let host = host
        .split(':')
        .next()
        .unwrap_or_default()
        .to_ascii_lowercase();
    let mut matching: Vec<usize> = (0..routes.len())
        .filter(|&id| routes[id].path_matches(&pieces))
        .collect();
    matching.sort_by_key(|&id| routes[id].rank(id));
    let mut not_allowed = false;
    for id in matching {
        let route = &routes[id];
        if route.host.as_ref().is_some_and(|want| *want != host) {
            continue;
        }
        if !naive_matchers_hold(&route.matchers, parts) {
            continue;
        }
        if route
            .method
            .as_ref()
            .is_none_or(|want| want.eq_ignore_ascii_case(method))
        {
            return Found(id);
        }
        not_allowed = true;
    }
    if not_allowed { NotAllowed } else { NotFound }
}

/// How dense a random table is: small tables use few literals (many overlaps, the root
/// prefix now and then); large ones many literals, fewer parameters and no root prefix,
/// so that lookups still end in all three outcomes.
struct Density {
    literals: Vec<String>,
    pieces: Vec<String>,
    shortest_prefix: usize,
    /// Out of 10 segments, how many are parameters.
    params_in_10: u32,
}

fn dense() -> Density {
    let words = |list: &[&str]| list.iter().map(|word| (*word).to_owned()).collect();
    Density {
        literals: words(&["a", "b", "c", "1", "ab"]),
        pieces: words(&["a", "b", "c", "1", "22", "ab", "ab1", "", "Z"]),
        shortest_prefix: 0,
        params_in_10: 4,
    }
}

fn sparse() -> Density {
    let literals: Vec<String> = (0..60)
        .map(|i| format!("w{i}"))
        .chain(["7".into()])
        .collect();
    let mut pieces: Vec<String> = (0..80).map(|i| format!("w{i}")).collect();
    pieces.extend(["", "Z", "45", "ab1"].map(String::from));
    Density {
        literals,
        pieces,
        shortest_prefix: 1,
        params_in_10: 1,
    }
}

fn random_route(rng: &mut StdRng, density: &Density) -> NaiveRoute {
    let prefix = rng.random_bool(0.3);
    let length = if prefix {
        rng.random_range(density.shortest_prefix..=3)
    } else {
        rng.random_range(1..=3)
    };
    let segments = (0..length)
        .map(|_| {
            let roll = rng.random_range(0..10);
            if roll < density.params_in_10 {
                match rng.random_range(0..4) {
                    0 | 1 => NaiveSegment::Param(None),
                    2 => NaiveSegment::Param(Some('d')),
                    _ => NaiveSegment::Param(Some('l')),
                }
            } else if roll == 9 {
                NaiveSegment::Literal(String::new())
            } else {
                NaiveSegment::Literal(density.literals.choose(rng).cloned().unwrap_or_default())
            }
        })
        .collect();
    let method = ["", "GET", "POST"].choose(rng).copied().unwrap_or("");
    let host = ["", "h1.test", "h2.test"]
        .choose(rng)
        .copied()
        .unwrap_or("");
    // A quarter of the routes carry one or two matchers.
    let mut matchers: Vec<MatchRule> = if rng.random_bool(0.25) {
        let count = rng.random_range(1..=2);
        random_matchers()
            .choose_multiple(rng, count)
            .cloned()
            .collect()
    } else {
        Vec::new()
    };
    matchers.sort();
    NaiveRoute {
        segments,
        prefix,
        method: (!method.is_empty()).then(|| method.to_owned()),
        host: (!host.is_empty()).then(|| host.to_owned()),
        matchers,
    }
}

fn random_matchers() -> Vec<MatchRule> {
    let rule = |source, name: &str, test| MatchRule {
        source,
        name: name.to_owned(),
        test,
    };
    vec![
        rule(MatchSource::Header, "x-t", MatchTest::Value("a".into())),
        rule(MatchSource::Header, "x-t", MatchTest::Value("b".into())),
        rule(MatchSource::Header, "x-t", MatchTest::Present),
        rule(
            MatchSource::Header,
            "x-u",
            MatchTest::Regex("[0-9]+".into()),
        ),
        rule(MatchSource::Query, "q", MatchTest::Value("1".into())),
        rule(MatchSource::Query, "q", MatchTest::Present),
        rule(MatchSource::Query, "r s", MatchTest::Regex("[0-9]+".into())),
    ]
}

fn random_parts(rng: &mut StdRng) -> Parts {
    const HEADERS: [(&str, &str); 5] = [
        ("x-t", "a"),
        ("X-T", "b"),
        ("x-u", "12"),
        ("x-u", "z"),
        ("x-other", "a"),
    ];
    let count = rng.random_range(0..=2);
    Parts {
        headers: HEADERS.choose_multiple(rng, count).copied().collect(),
        query: [
            None,
            Some("q=1"),
            Some("q=2"),
            Some("q"),
            Some("q=%31&r+s=7"),
            Some("r%20s=x"),
        ]
        .choose(rng)
        .copied()
        .flatten(),
    }
}

fn random_path(rng: &mut StdRng, density: &Density) -> String {
    let length = rng.random_range(1..=4);
    (0..length)
        .map(|_| {
            format!(
                "/{}",
                density.pieces.choose(rng).map_or("a", String::as_str)
            )
        })
        .collect()
}

/// Registers random routes in both matchers and compares random lookups.
fn compare_with_naive(
    seed: u64,
    density: &Density,
    tables: usize,
    routes_per_table: usize,
    lookups: usize,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    let (mut found, mut not_found, mut not_allowed) = (0usize, 0usize, 0usize);
    for table in 0..tables {
        let mut router: MuxRouter<usize> = MuxRouter::new();
        let mut naive: Vec<NaiveRoute> = Vec::new();
        for _ in 0..routes_per_table {
            let route = random_route(&mut rng, density);
            let pattern = route.pattern();
            let method = route.method.clone().unwrap_or_default();
            let host = route.host.clone().unwrap_or_default();
            match router.handle_matching(
                &pattern,
                &method,
                &host,
                route.matchers.clone(),
                naive.len(),
                None,
            ) {
                Ok(()) => naive.push(route),
                Err(RouteError::Duplicate { .. }) => {
                    assert!(naive.contains(&route), "{pattern:?} reported as duplicate");
                }
                Err(error) => panic!("{pattern:?} {method:?} {host:?}: {error}"),
            }
        }
        assert_eq!(router.len(), naive.len());
        for _ in 0..lookups {
            let path = random_path(&mut rng, density);
            let method = ["GET", "POST", "PUT", "get"]
                .choose(&mut rng)
                .copied()
                .unwrap_or("GET");
            let host = ["h1.test", "H2.test:8080", "other.test", ""]
                .choose(&mut rng)
                .copied()
                .unwrap_or("");
            let parts = random_parts(&mut rng);
            let got = match router.route_request(method, host, &path, &parts) {
                RouteMatch::Found(id) => Found(*id),
                RouteMatch::NotFound => NotFound,
                RouteMatch::MethodNotAllowed => NotAllowed,
            };
            let want = naive_route(&naive, method, host, &path, &parts);
            match want {
                Found(_) => found += 1,
                NotFound => not_found += 1,
                NotAllowed => not_allowed += 1,
            }
            if got != want {
                let listing: Vec<String> = naive
                    .iter()
                    .enumerate()
                    .map(|(id, r)| {
                        format!(
                            "  {id}: {} {:?} {:?} {:?}",
                            r.pattern(),
                            r.method,
                            r.host,
                            r.matchers
                        )
                    })
                    .collect();
                panic!(
                    "seed {seed} table {table}: {method} {host:?} {path:?} {parts:?}: got {got:?}, want {want:?}\n{}",
                    listing.join("\n")
                );
            }
        }
    }
    // The generator must exercise every outcome, or agreement proves little.
    let total = tables * lookups;
    for (name, count) in [("found", found), ("404", not_found), ("405", not_allowed)] {
        assert!(
            count * 20 >= total,
            "only {count} of {total} lookups were {name}"
        );
    }
}

#[test]
fn random_small_tables_agree_with_naive_matcher() {
    compare_with_naive(0x5eed_0001, &dense(), 300, 12, 200);
}

#[test]
fn random_large_tables_agree_with_naive_matcher() {
    compare_with_naive(0x5eed_0002, &sparse(), 10, 400, 3_000);
}

/// Host templates as gorilla/mux (and so Kratos) takes them: `{name}` is one DNS label,
/// `{name:re}` a regex part; exact hosts and templates are both host-specific routes.
#[test]
fn host_templates_match_like_kratos() {
    let router = build(&[
        ("/x", "", "{sub}.example.com"),           // 0
        ("/x", "", "api.example.com"),             // 1
        ("/x", "", "v{n:[0-9]+}.svc.example.com"), // 2
        ("/x", "", ""),                            // 3
    ]);
    for (host, want) in [
        ("shop.example.com", Found(0)),
        ("SHOP.Example.com:8443", Found(0)),
        ("a.b.example.com", Found(3)), // `{sub}` is one label
        ("example.com", Found(3)),
        ("v2.svc.example.com", Found(2)),
        ("vx.svc.example.com", Found(3)),
        ("other.org", Found(3)),
    ] {
        assert_eq!(outcome(&router, "GET", host, "/x"), want, "{host}");
    }
    // Registration order decides between two host-specific routes that both match.
    assert_eq!(outcome(&router, "GET", "api.example.com", "/x"), Found(0));
    for bad in [
        "{sub.example.com",
        "sub}.example.com",
        "{}.example.com",
        "{a:(}.b",
    ] {
        let mut router: MuxRouter<usize> = MuxRouter::new();
        let error = router.handle("/x", "", bad, 0, None).unwrap_err();
        assert!(error.to_string().contains("host"), "{bad}: {error}");
        assert_eq!(error.to_string().lines().count(), 1, "{error}");
    }
}

/// Method, path, headers, raw query and the expected outcome.
type MatcherCase = (
    &'static str,
    &'static str,
    Vec<(&'static str, &'static str)>,
    Option<&'static str>,
    Want,
);

/// Header and query matchers: on one path (and method/host) the routes with matchers are
/// tried first, most matchers first, then registration order; the plain route takes the
/// rest. Matchers never turn a miss into a 405.
#[test]
fn matchers_conformance_table() {
    let header = |name: &str, test| MatchRule {
        source: MatchSource::Header,
        name: name.to_owned(),
        test,
    };
    let query = |name: &str, test| MatchRule {
        source: MatchSource::Query,
        name: name.to_owned(),
        test,
    };
    let value = |text: &str| MatchTest::Value(text.to_owned());
    let regex = |text: &str| MatchTest::Regex(text.to_owned());
    let specs: Vec<(&str, &str, &str, Vec<MatchRule>)> = vec![
        ("/pay", "", "", vec![]), // 0
        (
            "/pay",
            "",
            "",
            vec![header("x-noslate-target", value("service:payments"))],
        ), // 1
        ("/pay", "", "", vec![query("v", value("2"))]), // 2
        (
            "/pay",
            "",
            "",
            vec![
                header("x-noslate-target", value("service:payments")),
                query("v", value("2")),
            ],
        ), // 3
        ("/pay", "", "", vec![header("X-Debug", MatchTest::Present)]), // 4
        ("/api/*", "", "", vec![header("x-v", regex("v[0-9]+"))]), // 5
        ("/api/*", "", "", vec![]), // 6
        ("/only", "GET", "", vec![header("x-a", value("1"))]), // 7
        ("/u/{id}", "", "", vec![query("tab", regex("a|b"))]), // 8
        ("/u/{name:[a-z]+}", "", "", vec![]), // 9
    ];
    let mut router = MuxRouter::new();
    for (id, (pattern, method, host, matchers)) in specs.iter().enumerate() {
        router
            .handle_matching(pattern, method, host, matchers.clone(), id, None)
            .unwrap_or_else(|error| panic!("register {id}: {error}"));
    }
    #[rustfmt::skip]
    let table: &[MatcherCase] = &[
        ("GET", "/pay", vec![], None, Found(0)),
        ("GET", "/pay", vec![("X-Noslate-Target", "service:payments")], None, Found(1)),
        ("GET", "/pay", vec![("x-noslate-target", "service:other")], None, Found(0)),
        ("GET", "/pay", vec![("x-noslate-target", "SERVICE:PAYMENTS")], None, Found(0)),
        ("GET", "/pay", vec![], Some("v=2"), Found(2)),
        ("GET", "/pay", vec![], Some("x=1&v=%32"), Found(2)),
        ("GET", "/pay", vec![], Some("v=22"), Found(0)),
        // most matchers first
        ("GET", "/pay", vec![("x-noslate-target", "service:payments")], Some("v=2"), Found(3)),
        // one of several values of a header is enough
        ("GET", "/pay", vec![("x-noslate-target", "a"), ("x-noslate-target", "service:payments")], None, Found(1)),
        ("GET", "/pay", vec![("x-debug", "")], None, Found(4)),
        // regexes are anchored
        ("GET", "/api/x", vec![("x-v", "v12")], None, Found(5)),
        ("GET", "/api/x", vec![("x-v", "v12x")], None, Found(6)),
        ("GET", "/api/x", vec![("x-v", "xv1")], None, Found(6)),
        // a matcher route that declines is no 405 and no match
        ("GET", "/only", vec![("x-a", "1")], None, Found(7)),
        ("POST", "/only", vec![("x-a", "1")], None, NotAllowed),
        ("GET", "/only", vec![], None, NotFound),
        ("POST", "/only", vec![], None, NotFound),
        // restful: a matcher route with a looser shape still yields to constraints' order
        ("GET", "/u/bob", vec![], Some("tab=a"), Found(8)),
        ("GET", "/u/bob", vec![], Some("tab=c"), Found(9)),
        ("GET", "/u/42", vec![], Some("tab=b"), Found(8)),
        ("GET", "/u/42", vec![], None, NotFound),
    ];
    let mut failures = Vec::new();
    for (method, path, headers, query, want) in table {
        let parts = Parts {
            headers: headers.clone(),
            query: *query,
        };
        for _ in 0..2 {
            let got = match router.route_request(method, "", path, &parts) {
                RouteMatch::Found(id) => Found(*id),
                RouteMatch::NotFound => NotFound,
                RouteMatch::MethodNotAllowed => NotAllowed,
            };
            if got != *want {
                failures.push(format!(
                    "{method} {path} {parts:?}: got {got:?}, want {want:?}"
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // Without its parts, a lookup never reaches a matcher route.
    assert_eq!(outcome(&router, "GET", "", "/pay"), Found(0));
    // The same path, method, host and matchers (in any order, any header case) is a
    // duplicate; other matchers are not.
    let error = router
        .handle_matching(
            "/pay",
            "",
            "",
            vec![
                query("v", value("2")),
                header("X-NOSLATE-TARGET", value("service:payments")),
            ],
            99,
            None,
        )
        .expect_err("duplicate");
    assert!(matches!(error, RouteError::Duplicate { .. }), "{error}");
    router
        .handle_matching("/pay", "", "", vec![query("v", value("3"))], 10, None)
        .expect("other matchers are no duplicate");
    let error = router
        .handle_matching("/bad", "", "", vec![header("x", regex("("))], 11, None)
        .expect_err("bad regex");
    assert!(error.to_string().contains("regex"), "{error}");
    let listed: Vec<usize> = router
        .routes()
        .filter(|entry| !entry.matchers.is_empty())
        .map(|entry| *entry.handler)
        .collect();
    assert_eq!(listed, vec![1, 2, 3, 4, 5, 7, 8, 10]);
}

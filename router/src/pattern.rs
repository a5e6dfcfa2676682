//! Path patterns: parsing, the matchit key they normalise to, and the shape comparisons
//! the router uses for duplicates, fallbacks and priority.

use std::cmp::Ordering;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;

use regex::Regex;

use crate::RouteError;

/// One `/`-separated piece of a pattern.
#[derive(Debug)]
pub(crate) enum Segment {
    /// Must equal the request's segment byte for byte.
    Static(Box<str>),
    /// Matches one non-empty segment, which `regex` (anchored) must match when present.
    Param {
        /// The name the operator gave, kept for diagnostics.
        name: Box<str>,
        /// The compiled, anchored constraint (shared by every pattern using the same one).
        regex: Option<Arc<Regex>>,
        /// The constraint as written, used to compare patterns.
        source: Option<Box<str>>,
    },
}

impl Segment {
    /// Rank used by priority: a static segment beats a parameter.
    fn rank(&self) -> u8 {
        match self {
            Self::Static(_) => 1,
            Self::Param { .. } => 0,
        }
    }
}

/// A parsed path pattern.
///
/// For a prefix pattern (`/api/*`), `segments` is its fixed part (`/api`), and the pattern
/// matches a path whose first segments match those (`/api`, `/api/`, `/api/x/y`).
#[derive(Debug)]
pub(crate) struct Pattern {
    text: Box<str>,
    segments: Box<[Segment]>,
    prefix: bool,
}

impl Pattern {
    /// Parses one of the supported forms; regexes are compiled here, once per distinct
    /// constraint in `regexes`.
    pub(crate) fn parse(text: &str, regexes: &mut Regexes) -> Result<Self, RouteError> {
        let invalid = |reason: &str| RouteError::InvalidPattern {
            pattern: text.to_owned(),
            reason: reason.to_owned(),
        };
        let Some(body) = text.strip_prefix('/') else {
            return Err(invalid("a pattern must start with `/`"));
        };
        // `/*` is the root prefix (no fixed segment); `//*` has one empty fixed segment.
        let (pieces, prefix): (Vec<&str>, bool) = if body == "*" {
            (Vec::new(), true)
        } else if let Some(base) = body.strip_suffix("/*") {
            (base.split('/').collect(), true)
        } else {
            (body.split('/').collect(), false)
        };
        let mut segments = Vec::with_capacity(pieces.len());
        for piece in pieces {
            segments.push(Self::parse_segment(text, piece, regexes)?);
        }
        let mut names: Vec<&str> = segments
            .iter()
            .filter_map(|segment| match segment {
                Segment::Param { name, .. } => Some(&**name),
                Segment::Static(_) => None,
            })
            .collect();
        names.sort_unstable();
        if names.windows(2).any(|pair| pair[0] == pair[1]) {
            return Err(invalid("a parameter name is used twice"));
        }
        Ok(Self {
            text: text.into(),
            segments: segments.into(),
            prefix,
        })
    }

    fn parse_segment(
        text: &str,
        piece: &str,
        regexes: &mut Regexes,
    ) -> Result<Segment, RouteError> {
        let invalid = |reason: String| RouteError::InvalidPattern {
            pattern: text.to_owned(),
            reason,
        };
        let Some(inner) = piece.strip_prefix('{').and_then(|p| p.strip_suffix('}')) else {
            if piece.contains(['{', '}']) {
                return Err(invalid(format!(
                    "segment {piece:?}: a parameter must span a whole segment (`/{{name}}`)"
                )));
            }
            if piece.contains('*') {
                return Err(invalid(format!(
                    "segment {piece:?}: `*` is only allowed as the whole last segment (`/api/*`)"
                )));
            }
            return Ok(Segment::Static(piece.into()));
        };
        let (name, constraint) = match inner.split_once(':') {
            Some((name, constraint)) => (name, Some(constraint)),
            None => (inner, None),
        };
        let name_ok = !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if !name_ok {
            return Err(invalid(format!(
                "segment {piece:?}: a parameter name must be non-empty ASCII letters, digits, `_` or `-`"
            )));
        }
        let regex =
            match constraint {
                None => None,
                Some("") => return Err(invalid(format!("segment {piece:?}: empty constraint"))),
                Some(constraint) => Some(regexes.anchored(constraint).map_err(|source| {
                    RouteError::InvalidRegex {
                        pattern: text.to_owned(),
                        source,
                    }
                })?),
            };
        Ok(Segment::Param {
            name: name.into(),
            regex,
            source: constraint.map(Into::into),
        })
    }

    /// The pattern as the operator wrote it.
    pub(crate) fn text(&self) -> &str {
        &self.text
    }

    /// Whether this is a prefix (`/*`) pattern.
    pub(crate) fn is_prefix(&self) -> bool {
        self.prefix
    }

    /// Whether any segment is a parameter.
    pub(crate) fn has_params(&self) -> bool {
        self.segments
            .iter()
            .any(|segment| matches!(segment, Segment::Param { .. }))
    }

    /// How many segments the fixed part has (what a looked-up path must have).
    pub(crate) fn len(&self) -> usize {
        self.segments.len()
    }

    /// The matchit route for the fixed part, with parameters renamed by position
    /// (`{p0}`, `{p1}`, …) so that patterns of the same shape share one key.
    /// Empty for the root prefix `/*`.
    pub(crate) fn key(&self) -> String {
        let mut key = String::with_capacity(self.text.len());
        let mut params = 0usize;
        for segment in &self.segments {
            key.push('/');
            match segment {
                Segment::Static(text) => {
                    for c in text.chars() {
                        // matchit reserves braces; we never produce them, but escape anyway.
                        match c {
                            '{' => key.push_str("{{"),
                            '}' => key.push_str("}}"),
                            c => key.push(c),
                        }
                    }
                }
                Segment::Param { .. } => {
                    // Writing to a String cannot fail.
                    let _ = write!(key, "{{p{params}}}");
                    params += 1;
                }
            }
        }
        key
    }

    /// The regex constraints, by parameter position, for the lookup hot path.
    pub(crate) fn constraints(&self) -> Constraints {
        let mut constraints = Vec::new();
        let params = self
            .segments
            .iter()
            .filter(|segment| matches!(segment, Segment::Param { .. }));
        for (position, segment) in params.enumerate() {
            if let Segment::Param {
                regex: Some(regex), ..
            } = segment
            {
                constraints.push((position, Arc::clone(regex)));
            }
        }
        Constraints(constraints.into())
    }

    /// Whether `path` (a full path, or a truncation of one for prefix patterns) has exactly
    /// this pattern's fixed segments, constraints included. Used off the hot path.
    pub(crate) fn matches_exactly(&self, path: &str) -> bool {
        let Some(rest) = path.strip_prefix('/') else {
            return path.is_empty() && self.segments.is_empty();
        };
        let mut pieces = rest.split('/');
        for segment in &self.segments {
            let Some(piece) = pieces.next() else {
                return false;
            };
            let ok = match segment {
                Segment::Static(text) => **text == *piece,
                Segment::Param { regex, .. } => {
                    !piece.is_empty() && regex.as_ref().is_none_or(|regex| regex.is_match(piece))
                }
            };
            if !ok {
                return false;
            }
        }
        pieces.next().is_none()
    }

    /// Whether some path of this length could match both patterns (constraints ignored).
    pub(crate) fn overlaps(&self, other: &Self) -> bool {
        self.segments.len() == other.segments.len()
            && self
                .segments
                .iter()
                .zip(other.segments.iter())
                .all(|pair| match pair {
                    (Segment::Static(a), Segment::Static(b)) => a == b,
                    (Segment::Static(text), Segment::Param { .. })
                    | (Segment::Param { .. }, Segment::Static(text)) => !text.is_empty(),
                    (Segment::Param { .. }, Segment::Param { .. }) => true,
                })
    }

    /// Whether the two patterns match exactly the same requests (names aside).
    pub(crate) fn same_as(&self, other: &Self) -> bool {
        self.prefix == other.prefix
            && self.segments.len() == other.segments.len()
            && self
                .segments
                .iter()
                .zip(other.segments.iter())
                .all(|pair| match pair {
                    (Segment::Static(a), Segment::Static(b)) => a == b,
                    (Segment::Param { source: a, .. }, Segment::Param { source: b, .. }) => a == b,
                    _ => false,
                })
    }

    /// Priority of two same-length patterns of one kind: `Less` means `self` is tried first.
    /// Compared from the left, a static segment beats a parameter (matchit's order); the
    /// static text only breaks ties between patterns that never match the same path.
    pub(crate) fn priority_cmp(&self, other: &Self) -> Ordering {
        for pair in self.segments.iter().zip(other.segments.iter()) {
            let order = pair.1.rank().cmp(&pair.0.rank()).then_with(|| match pair {
                (Segment::Static(a), Segment::Static(b)) => a.cmp(b),
                _ => Ordering::Equal,
            });
            if order != Ordering::Equal {
                return order;
            }
        }
        other.segments.len().cmp(&self.segments.len())
    }
}

/// Compiled constraints by their source text. Sharing one `Regex` (rather than clones,
/// which each get a fresh cache pool) keeps thousands of `{id:[0-9]+}` routes to one
/// compiled program and one set of search caches.
#[derive(Debug, Default)]
pub(crate) struct Regexes(HashMap<Box<str>, Arc<Regex>>);

impl Regexes {
    /// The constraint compiled to match a whole segment: `^(?:constraint)$`.
    fn anchored(&mut self, constraint: &str) -> Result<Arc<Regex>, regex::Error> {
        if let Some(regex) = self.0.get(constraint) {
            return Ok(Arc::clone(regex));
        }
        let regex = Arc::new(Regex::new(&format!("^(?:{constraint})$"))?);
        self.0.insert(constraint.into(), Arc::clone(&regex));
        Ok(regex)
    }
}

/// A pattern's regex constraints keyed by parameter position.
#[derive(Debug, Default)]
pub(crate) struct Constraints(Box<[(usize, Arc<Regex>)]>);

impl Constraints {
    /// Whether the parameter values matchit captured, in order, satisfy every constraint.
    pub(crate) fn hold<'v>(&self, mut values: impl Iterator<Item = &'v str>) -> bool {
        let mut next = 0;
        for (position, regex) in &self.0 {
            let Some(value) = values.nth(position - next) else {
                return false;
            };
            next = position + 1;
            if !regex.is_match(value) {
                return false;
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Pattern, RouteError> {
        Pattern::parse(text, &mut Regexes::default())
    }

    #[test]
    fn equal_constraints_share_one_regex() {
        let mut regexes = Regexes::default();
        let a = Pattern::parse("/a/{id:[0-9]+}", &mut regexes).expect("valid");
        let b = Pattern::parse("/b/{n:[0-9]+}", &mut regexes).expect("valid");
        let (Segment::Param { regex: Some(a), .. }, Segment::Param { regex: Some(b), .. }) =
            (&a.segments[1], &b.segments[1])
        else {
            panic!("constrained parameters expected");
        };
        assert!(Arc::ptr_eq(a, b));
    }

    #[test]
    fn keys_normalise_parameter_names() {
        let a = parse("/x/{id:[0-9]+}/y").expect("valid");
        let b = parse("/x/{name}/y").expect("valid");
        assert_eq!(a.key(), "/x/{p0}/y");
        assert_eq!(a.key(), b.key());
        assert!(!a.same_as(&b));
        assert!(a.overlaps(&b));
    }

    #[test]
    fn prefix_keys_are_the_fixed_part() {
        let root = parse("/*").expect("valid");
        assert!(root.is_prefix());
        assert_eq!(root.key(), "");
        let api = parse("/api/{v}/*").expect("valid");
        assert!(api.is_prefix());
        assert_eq!(api.key(), "/api/{p0}");
        assert_eq!(api.len(), 2);
    }

    #[test]
    fn root_and_trailing_slash_are_segments() {
        let root = parse("/").expect("valid");
        assert_eq!(root.key(), "/");
        assert!(root.matches_exactly("/"));
        let slash = parse("/a/").expect("valid");
        assert!(slash.matches_exactly("/a/"));
        assert!(!slash.matches_exactly("/a"));
    }

    #[test]
    fn constraints_are_anchored() {
        let p = parse("/e/{name:[a-z]+}").expect("valid");
        assert!(p.matches_exactly("/e/abc"));
        assert!(!p.matches_exactly("/e/abc1"));
        assert!(!p.matches_exactly("/e/1abc"));
        assert!(p.constraints().hold(["abc"].into_iter()));
        assert!(!p.constraints().hold(["abc1"].into_iter()));
        let two = parse("/{a}/{b:[0-9]+}/{c}/{d:x}").expect("valid");
        assert!(two.constraints().hold(["q", "12", "r", "x"].into_iter()));
        assert!(!two.constraints().hold(["q", "12", "r", "y"].into_iter()));
        assert!(!two.constraints().hold(["12", "q", "r", "x"].into_iter()));
        assert!(!two.constraints().hold(["q", "12"].into_iter()));
    }

    #[test]
    fn alternation_is_anchored_as_a_whole() {
        let p = parse("/e/{v:v1|v2}").expect("valid");
        assert!(p.matches_exactly("/e/v1"));
        assert!(!p.matches_exactly("/e/v1x"));
        assert!(!p.matches_exactly("/e/xv2"));
    }

    #[test]
    fn braces_inside_constraints_parse() {
        let p = parse("/e/{id:[0-9]{3}}").expect("valid");
        assert!(p.matches_exactly("/e/123"));
        assert!(!p.matches_exactly("/e/1234"));
    }

    #[test]
    fn bad_patterns_are_rejected() {
        for bad in [
            "",
            "api",
            "/a/*/b",
            "/a*",
            "/a/x{id}",
            "/a/{}",
            "/a/{id}/{id}",
            "/a/{id:}",
            "/a/{id",
        ] {
            assert!(
                matches!(parse(bad), Err(RouteError::InvalidPattern { .. })),
                "{bad:?} should be rejected"
            );
        }
        assert!(matches!(
            parse("/a/{id:[0-9}"),
            Err(RouteError::InvalidRegex { .. })
        ));
    }

    #[test]
    fn static_beats_parameter_from_the_left() {
        let exact = parse("/x/abc").expect("valid");
        let param = parse("/x/{id}").expect("valid");
        let left = parse("/{a}/y").expect("valid");
        let right = parse("/x/{b}").expect("valid");
        assert_eq!(exact.priority_cmp(&param), Ordering::Less);
        assert_eq!(param.priority_cmp(&exact), Ordering::Greater);
        assert_eq!(right.priority_cmp(&left), Ordering::Less);
    }
}

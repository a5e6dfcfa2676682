//! Path patterns: parsing, the matchit key they normalise to, and the shape comparisons
//! the router uses for duplicates, fallbacks and priority.

use std::cmp::Ordering;
use std::fmt::Write as _;

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
        /// The compiled, anchored constraint.
        regex: Option<Regex>,
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
    /// Parses one of the supported forms; regexes are compiled here, once.
    pub(crate) fn parse(text: &str) -> Result<Self, RouteError> {
        let invalid = |reason: &str| RouteError::InvalidPattern {
            pattern: text.to_owned(),
            reason: reason.to_owned(),
        };
        let Some(body) = text.strip_prefix('/') else {
            return Err(invalid("a pattern must start with `/`"));
        };
        let (body, prefix) = if body == "*" {
            ("", true)
        } else if let Some(base) = body.strip_suffix("/*") {
            (base, true)
        } else {
            (body, false)
        };
        let pieces: Vec<&str> = if prefix && body.is_empty() {
            Vec::new()
        } else {
            body.split('/').collect()
        };
        let mut segments = Vec::with_capacity(pieces.len());
        for piece in pieces {
            segments.push(Self::parse_segment(text, piece)?);
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

    fn parse_segment(text: &str, piece: &str) -> Result<Segment, RouteError> {
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
        let regex = match constraint {
            None => None,
            Some("") => return Err(invalid(format!("segment {piece:?}: empty constraint"))),
            Some(constraint) => Some(Regex::new(&format!("^(?:{constraint})$")).map_err(
                |source| RouteError::InvalidRegex {
                    pattern: text.to_owned(),
                    source,
                },
            )?),
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

    /// Whether the parameter values matchit captured (in order) satisfy the constraints.
    pub(crate) fn constraints_hold<'v>(&self, mut values: impl Iterator<Item = &'v str>) -> bool {
        for segment in &self.segments {
            if let Segment::Param { regex, .. } = segment {
                let Some(value) = values.next() else {
                    return false;
                };
                if value.is_empty() || regex.as_ref().is_some_and(|regex| !regex.is_match(value)) {
                    return false;
                }
            }
        }
        true
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_normalise_parameter_names() {
        let a = Pattern::parse("/x/{id:[0-9]+}/y").expect("valid");
        let b = Pattern::parse("/x/{name}/y").expect("valid");
        assert_eq!(a.key(), "/x/{p0}/y");
        assert_eq!(a.key(), b.key());
        assert!(!a.same_as(&b));
        assert!(a.overlaps(&b));
    }

    #[test]
    fn prefix_keys_are_the_fixed_part() {
        let root = Pattern::parse("/*").expect("valid");
        assert!(root.is_prefix());
        assert_eq!(root.key(), "");
        let api = Pattern::parse("/api/{v}/*").expect("valid");
        assert!(api.is_prefix());
        assert_eq!(api.key(), "/api/{p0}");
        assert_eq!(api.len(), 2);
    }

    #[test]
    fn root_and_trailing_slash_are_segments() {
        let root = Pattern::parse("/").expect("valid");
        assert_eq!(root.key(), "/");
        assert!(root.matches_exactly("/"));
        let slash = Pattern::parse("/a/").expect("valid");
        assert!(slash.matches_exactly("/a/"));
        assert!(!slash.matches_exactly("/a"));
    }

    #[test]
    fn constraints_are_anchored() {
        let p = Pattern::parse("/e/{name:[a-z]+}").expect("valid");
        assert!(p.matches_exactly("/e/abc"));
        assert!(!p.matches_exactly("/e/abc1"));
        assert!(!p.matches_exactly("/e/1abc"));
        assert!(p.constraints_hold(["abc"].into_iter()));
        assert!(!p.constraints_hold(["abc1"].into_iter()));
    }

    #[test]
    fn alternation_is_anchored_as_a_whole() {
        let p = Pattern::parse("/e/{v:v1|v2}").expect("valid");
        assert!(p.matches_exactly("/e/v1"));
        assert!(!p.matches_exactly("/e/v1x"));
        assert!(!p.matches_exactly("/e/xv2"));
    }

    #[test]
    fn braces_inside_constraints_parse() {
        let p = Pattern::parse("/e/{id:[0-9]{3}}").expect("valid");
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
                matches!(Pattern::parse(bad), Err(RouteError::InvalidPattern { .. })),
                "{bad:?} should be rejected"
            );
        }
        assert!(matches!(
            Pattern::parse("/a/{id:[0-9}"),
            Err(RouteError::InvalidRegex { .. })
        ));
    }

    #[test]
    fn static_beats_parameter_from_the_left() {
        let exact = Pattern::parse("/x/abc").expect("valid");
        let param = Pattern::parse("/x/{id}").expect("valid");
        let left = Pattern::parse("/{a}/y").expect("valid");
        let right = Pattern::parse("/x/{b}").expect("valid");
        assert_eq!(exact.priority_cmp(&param), Ordering::Less);
        assert_eq!(param.priority_cmp(&exact), Ordering::Greater);
        assert_eq!(right.priority_cmp(&left), Ordering::Less);
    }
}

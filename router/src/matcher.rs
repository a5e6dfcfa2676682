//! Header and query matchers: conditions a route puts on a request beyond path, method and
//! host (`headers:` / `query:` in the config). They are looked at only for routes that have
//! some, so tables without matchers never touch a request's headers or query.

use regex::Regex;

use crate::RouteError;

/// Where a matcher looks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum MatchSource {
    /// A request header (names compare case-insensitively).
    Header,
    /// A query parameter of the raw query, percent-decoded (names compare exactly).
    Query,
}

/// What a matcher requires of the header or query parameter it names.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum MatchTest {
    /// Some value equals this one exactly.
    Value(String),
    /// Some value matches this regex whole (anchored, like path constraints).
    Regex(String),
    /// The header or parameter is there, whatever its value (even empty).
    Present,
}

/// One condition on a request: `source` `name` passes `test`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MatchRule {
    /// Header or query.
    pub source: MatchSource,
    /// Header name or query parameter name.
    pub name: String,
    /// The condition on its values.
    pub test: MatchTest,
}

/// What a lookup may ask of the request when a candidate route has matchers.
pub trait RequestParts {
    /// The values of the header `name` (given in lower case), in order.
    fn header_values(&self, name: &str) -> impl Iterator<Item = &[u8]>;
    /// The raw (still percent-encoded) query string, without the `?`.
    fn raw_query(&self) -> Option<&str>;
}

/// A request with no headers and no query: what [`crate::Router::route`] offers, so a route
/// with matchers never takes a request looked up without its parts.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoParts;

impl RequestParts for NoParts {
    fn header_values(&self, _name: &str) -> impl Iterator<Item = &[u8]> {
        std::iter::empty()
    }

    fn raw_query(&self) -> Option<&str> {
        None
    }
}

/// A route's compiled matchers; all must hold.
#[derive(Debug, Default)]
pub(crate) struct Matchers {
    /// Sorted, header names lower case: the route's identity for duplicates.
    rules: Box<[MatchRule]>,
    compiled: Box<[Compiled]>,
}

#[derive(Debug)]
struct Compiled {
    source: MatchSource,
    name: Box<str>,
    test: CompiledTest,
}

#[derive(Debug)]
enum CompiledTest {
    Value(Box<str>),
    Regex(Regex),
    Present,
}

impl Matchers {
    /// Checks and compiles `rules` (regexes once, here). `pattern` names the route in errors.
    pub(crate) fn new(pattern: &str, rules: Vec<MatchRule>) -> Result<Self, RouteError> {
        let invalid = |reason: String| RouteError::InvalidPattern {
            pattern: pattern.to_owned(),
            reason,
        };
        let mut rules = rules;
        for rule in &mut rules {
            if rule.name.is_empty() {
                return Err(invalid("a header or query matcher needs a name".to_owned()));
            }
            if rule.source == MatchSource::Header {
                rule.name.make_ascii_lowercase();
            }
        }
        rules.sort();
        rules.dedup();
        let compiled = rules
            .iter()
            .map(|rule| {
                let test = match &rule.test {
                    MatchTest::Value(value) => CompiledTest::Value(value.as_str().into()),
                    MatchTest::Present => CompiledTest::Present,
                    MatchTest::Regex(source) => CompiledTest::Regex(
                        Regex::new(&format!("^(?:{source})$")).map_err(|error| {
                            let reason = error.to_string();
                            let reason = reason.lines().last().unwrap_or("invalid regex").trim();
                            invalid(format!(
                                "matcher {:?}: regex {source:?}: {reason}",
                                rule.name
                            ))
                        })?,
                    ),
                };
                Ok(Compiled {
                    source: rule.source,
                    name: rule.name.as_str().into(),
                    test,
                })
            })
            .collect::<Result<_, RouteError>>()?;
        Ok(Self {
            rules: rules.into(),
            compiled,
        })
    }

    /// How many conditions there are (routes with more are tried first).
    pub(crate) fn len(&self) -> usize {
        self.compiled.len()
    }

    /// The rules, normalised and sorted.
    pub(crate) fn rules(&self) -> &[MatchRule] {
        &self.rules
    }

    /// Whether every condition holds for the request.
    pub(crate) fn hold<P: RequestParts + ?Sized>(&self, parts: &P) -> bool {
        self.compiled.iter().all(|matcher| match matcher.source {
            MatchSource::Header => {
                let mut values = parts.header_values(&matcher.name);
                match &matcher.test {
                    CompiledTest::Present => values.next().is_some(),
                    CompiledTest::Value(want) => values.any(|value| value == want.as_bytes()),
                    CompiledTest::Regex(regex) => values.any(|value| {
                        std::str::from_utf8(value).is_ok_and(|value| regex.is_match(value))
                    }),
                }
            }
            MatchSource::Query => {
                let Some(query) = parts.raw_query() else {
                    return false;
                };
                form_urlencoded::parse(query.as_bytes())
                    .filter(|(name, _)| **name == *matcher.name)
                    .any(|(_, value)| match &matcher.test {
                        CompiledTest::Present => true,
                        CompiledTest::Value(want) => *value == **want,
                        CompiledTest::Regex(regex) => regex.is_match(&value),
                    })
            }
        })
    }
}

impl PartialEq for Matchers {
    fn eq(&self, other: &Self) -> bool {
        self.rules == other.rules
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    fn rule(source: MatchSource, name: &str, test: MatchTest) -> MatchRule {
        MatchRule {
            source,
            name: name.to_owned(),
            test,
        }
    }

    #[test]
    fn query_values_are_percent_decoded_and_regexes_anchored() {
        let matchers = Matchers::new(
            "/x",
            vec![
                rule(MatchSource::Query, "a b", MatchTest::Value("c/d".into())),
                rule(MatchSource::Query, "v", MatchTest::Regex("[0-9]+".into())),
                rule(MatchSource::Header, "X-Flag", MatchTest::Present),
            ],
        )
        .expect("valid");
        let parts = |query| Parts {
            headers: vec![("x-flag", "")],
            query: Some(query),
        };
        assert!(matchers.hold(&parts("a%20b=c%2Fd&v=12")));
        assert!(matchers.hold(&parts("v=x&a+b=c/d&v=7")));
        assert!(!matchers.hold(&parts("a%20b=c%2Fd&v=12x")));
        assert!(!matchers.hold(&parts("a%20b=c&v=12")));
        let no_flag = Parts {
            headers: vec![],
            query: Some("a%20b=c%2Fd&v=12"),
        };
        assert!(!matchers.hold(&no_flag));
        assert!(!matchers.hold(&NoParts));
        assert!(
            Matchers::new(
                "/x",
                vec![rule(MatchSource::Header, "a", MatchTest::Regex("(".into()))]
            )
            .is_err()
        );
    }
}

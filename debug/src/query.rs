//! The decoded query string of a debug request.

/// Query parameters, percent- and `+`-decoded (`application/x-www-form-urlencoded` rules),
/// in the order they were given.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Query {
    pairs: Vec<(String, String)>,
}

impl Query {
    /// Decodes a raw query string (without the leading `?`). Invalid UTF-8 in an escape is
    /// replaced, never an error.
    pub fn parse(raw: &str) -> Self {
        Query {
            pairs: form_urlencoded::parse(raw.as_bytes())
                .map(|(name, value)| (name.into_owned(), value.into_owned()))
                .collect(),
        }
    }

    /// The first value of `name`; an empty value counts as absent (`?service=` is the
    /// same as no `service`).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
            .filter(|value| !value.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_percent_and_plus() {
        let query = Query::parse("service=hello%2Fworld&x=a+b&service=second");
        assert_eq!(query.get("service"), Some("hello/world"));
        assert_eq!(query.get("x"), Some("a b"));
        assert_eq!(query.get("missing"), None);
    }

    #[test]
    fn empty_value_is_absent() {
        assert_eq!(Query::parse("service=").get("service"), None);
        assert_eq!(Query::parse("").get("service"), None);
    }

    #[test]
    fn bad_escapes_do_not_fail() {
        let query = Query::parse("a=%zz&b=%ff");
        assert_eq!(query.get("a"), Some("%zz"));
        assert_eq!(query.get("b"), Some("\u{fffd}"));
    }
}

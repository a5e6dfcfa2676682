//! The request path as the gateway routes and forwards it.
//!
//! Routing on one spelling of a path while the upstream resolves another is how route-level
//! access control gets bypassed (`/%61dmin/x` and `//admin/x` missing an `/admin/*` deny
//! and reaching the upstream as `/admin/x`). [`normalize`] gives every request one
//! spelling, and the proxy both routes on it and forwards it, so router and upstream never
//! disagree:
//!
//! 1. percent-escapes of unreserved characters (RFC 3986 §2.3: `A-Z a-z 0-9 - . _ ~`) are
//!    decoded (`%61` → `a`); other escapes stay encoded, hex digits upper-cased (`%2f` →
//!    `%2F`, RFC 3986 §6.2.2.1), so a `%2F` never becomes a segment separator;
//! 2. empty segments are dropped (`//a///b` → `/a/b`), keeping one trailing slash when the
//!    path had one (`/a//b/c//` → `/a/b/c/`): go-kratos/gateway's `cleanPath`, Go's
//!    `path.Clean` with the trailing slash put back;
//! 3. a `.` or `..` segment (after step 1, so `%2e%2E` too) is refused rather than
//!    resolved: [`PathError::DotSegment`];
//! 4. a `%` not followed by two hex digits is refused: [`PathError::BadEscape`] (Go's URL
//!    parser refuses those requests too).
//!
//! A path that is already normal (the usual case) is returned borrowed, after one pass over
//! its bytes and no allocation. A path that does not start with `/` (`*`, or the empty path
//! of an authority-form request) is returned as it is: no route pattern can match it.

use std::borrow::Cow;

/// Why a request path is refused before routing (the proxy answers 400).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// A `.` or `..` segment, also percent-encoded.
    #[error("dot segment in path")]
    DotSegment,
    /// A `%` not followed by two hex digits.
    #[error("invalid percent-encoding in path")]
    BadEscape,
}

/// The normal form of `path` (see the module docs), or why it is refused.
pub fn normalize(path: &str) -> Result<Cow<'_, str>, PathError> {
    if !path.starts_with('/') || is_normal(path.as_bytes()) {
        return Ok(Cow::Borrowed(path));
    }
    let mut normal = String::with_capacity(path.len());
    let mut segment = String::new();
    for raw in path[1..].split('/') {
        if raw.is_empty() {
            continue;
        }
        segment.clear();
        decode_unreserved(raw, &mut segment)?;
        if segment == "." || segment == ".." {
            return Err(PathError::DotSegment);
        }
        normal.push('/');
        normal.push_str(&segment);
    }
    if normal.is_empty() || path.ends_with('/') {
        normal.push('/');
    }
    Ok(Cow::Owned(normal))
}

/// Whether `path` (starting with `/`) is already normal: no `%`, no empty segment but a
/// trailing one, no dot segment.
fn is_normal(path: &[u8]) -> bool {
    let mut start = 1;
    for i in 1..=path.len() {
        match path.get(i) {
            Some(b'%') => return false,
            Some(b'/') | None => {
                let segment = &path[start..i];
                let last = i == path.len();
                if (segment.is_empty() && !last) || segment == b"." || segment == b".." {
                    return false;
                }
                start = i + 1;
            }
            Some(_) => {}
        }
    }
    true
}

/// Appends `raw` to `out`, decoding escapes of unreserved characters and upper-casing the
/// hex digits of the others.
fn decode_unreserved(raw: &str, out: &mut String) -> Result<(), PathError> {
    let mut rest = raw;
    while let Some(at) = rest.find('%') {
        out.push_str(&rest[..at]);
        let escape = rest
            .as_bytes()
            .get(at + 1..at + 3)
            .ok_or(PathError::BadEscape)?;
        let (high, low) = (hex(escape[0])?, hex(escape[1])?);
        let byte = high << 4 | low;
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push('%');
            out.push(char::from(escape[0].to_ascii_uppercase()));
            out.push(char::from(escape[1].to_ascii_uppercase()));
        }
        rest = &rest[at + 3..];
    }
    out.push_str(rest);
    Ok(())
}

fn hex(digit: u8) -> Result<u8, PathError> {
    match digit {
        b'0'..=b'9' => Ok(digit - b'0'),
        b'a'..=b'f' => Ok(digit - b'a' + 10),
        b'A'..=b'F' => Ok(digit - b'A' + 10),
        _ => Err(PathError::BadEscape),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn kratos_clean_path_cases() {
        // go-kratos/gateway router/mux/mux_test.go TestPathClean
        for (given, want) in [
            ("/a/b/c", "/a/b/c"),
            ("//a/b", "/a/b"),
            ("/a/b/c/", "/a/b/c/"),
            ("/a//b/c//", "/a/b/c/"),
        ] {
            assert_eq!(normalize(given).as_deref(), Ok(want), "{given}");
        }
    }

    #[test]
    fn normal_forms() {
        for (given, want) in [
            ("/", "/"),
            ("//", "/"),
            ("///", "/"),
            ("/%61dmin/x", "/admin/x"),
            ("/admi%6E/secret", "/admin/secret"),
            ("/%41%7a%30%2D%2e%5F%7E", "/Az0-._~"),
            ("/a%2fb", "/a%2Fb"),
            ("/a%2Fb/%25", "/a%2Fb/%25"),
            ("/%e2%82%ac", "/%E2%82%AC"),
            ("/a/.b/..c/...", "/a/.b/..c/..."),
            ("/a?b", "/a?b"),
            ("*", "*"),
            ("", ""),
        ] {
            assert_eq!(normalize(given).as_deref(), Ok(want), "{given}");
        }
        assert!(matches!(normalize("/a/b/"), Ok(Cow::Borrowed(_))));
    }

    #[test]
    fn refusals() {
        for path in [
            "/.",
            "/..",
            "/a/./b",
            "/a/../b",
            "/a/%2e%2E/b",
            "/a/.%2e",
            "//..//x",
            "/a/%2e/",
        ] {
            assert_eq!(normalize(path), Err(PathError::DotSegment), "{path}");
        }
        for path in ["/%", "/%4", "/%zz", "/a%2", "/%g1/x", "//%"] {
            assert_eq!(normalize(path), Err(PathError::BadEscape), "{path}");
        }
    }

    /// Decodes every escape (the reading an upstream may apply).
    fn decode_all(path: &str) -> Vec<u8> {
        let bytes = path.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < bytes.len() {
            let escape = bytes.get(i + 1..i + 3).and_then(|pair| {
                std::str::from_utf8(pair)
                    .ok()
                    .and_then(|pair| u8::from_str_radix(pair, 16).ok())
            });
            match (bytes[i], escape) {
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
        out
    }

    /// Collapses runs of `/` in a decoded path (a trailing one kept), as the reference.
    fn collapse(decoded: &[u8]) -> Vec<u8> {
        let mut out: Vec<u8> = Vec::new();
        for &byte in decoded {
            if byte == b'/' && out.last() == Some(&b'/') {
                continue;
            }
            out.push(byte);
        }
        out
    }

    proptest! {
        #[test]
        fn normal_paths_are_fixed_points_without_empty_or_dot_segments(
            path in "/[a-zA-Z0-9/.%~_-]{0,24}",
        ) {
            let Ok(normal) = normalize(&path) else { return Ok(()) };
            prop_assert!(normal.starts_with('/'));
            prop_assert!(!normal.contains("//"), "{} -> {}", path, normal);
            prop_assert!(
                normal.split('/').all(|segment| segment != "." && segment != ".."),
                "{} -> {}", path, normal
            );
            prop_assert_eq!(normalize(&normal), Ok(Cow::Borrowed(&*normal)));
            // Same resource: fully decoded, both read the same once `//` runs collapse.
            prop_assert_eq!(collapse(&decode_all(&normal)), collapse(&decode_all(&path)));
            prop_assert_eq!(normal.ends_with('/'), path.ends_with('/'));
        }

        #[test]
        fn dot_segments_are_refused_wherever_they_hide(
            before in "(/+[a-z%4-6]{0,3}){0,3}",
            dots in "(\\.|%2[eE]){1,2}",
            after in "(/+[a-z]{0,3}){0,3}",
        ) {
            let path = format!("{before}/{dots}{after}");
            // An invalid escape before the dot segment is found first.
            let want = match normalize(&before) {
                Err(err) => err,
                Ok(_) => PathError::DotSegment,
            };
            prop_assert_eq!(normalize(&path), Err(want), "{}", path);
        }

        #[test]
        fn any_text_is_judged_without_panicking(path in "\\PC{0,64}") {
            let _ = normalize(&path);
        }
    }
}

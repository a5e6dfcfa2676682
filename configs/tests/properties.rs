//! Property tests: the config parser survives any input and always says where a problem is;
//! Go durations round-trip; numbers written as strings load like numbers.

use std::path::Path;
use std::time::Duration;

use configs::{ConfigError, Gateway, format_duration, parse, parse_duration};
use proptest::prelude::*;

const EXAMPLE: &str = include_str!("../examples/gateway.yaml");
const FILE: &str = "prop.yaml";

/// Parses `text` and checks the outcome: a config, or an error that names the file, line
/// and column. Returns the error text, if any, for further checks.
fn parse_checked(text: &str) -> Result<Gateway, String> {
    match parse(text, Path::new(FILE)) {
        Ok(gateway) => Ok(gateway),
        Err(error) => {
            let shown = error.to_string();
            assert_eq!(error.file(), Some(Path::new(FILE)), "{shown}");
            let position = error
                .position()
                .unwrap_or_else(|| panic!("no line:column in {shown:?} for {text:?}"));
            assert!(position.line >= 1 && position.column >= 1, "{shown}");
            let prefix = format!("{FILE}:{position}: ");
            assert!(shown.starts_with(&prefix), "{shown:?} lacks {prefix:?}");
            assert!(
                !matches!(error, ConfigError::Io { .. }),
                "parsing text is no I/O: {shown}"
            );
            Err(shown)
        }
    }
}

/// One edit of a text, applied on characters so the result stays valid UTF-8.
#[derive(Debug, Clone)]
enum Edit {
    Delete { at: usize, len: usize },
    Insert { at: usize, text: String },
    Replace { at: usize, with: char },
    DuplicateLine { line: usize },
    SwapLines { a: usize, b: usize },
    Truncate { at: usize },
}

fn edit() -> impl Strategy<Value = Edit> {
    // Characters that matter to YAML, plus some that do not.
    let yaml_chars = "[-:#{}\\[\\],'\"|>&*!%@` \t\n0-9a-zA-Z/.]{1,8}";
    prop_oneof![
        (any::<usize>(), 1..20usize).prop_map(|(at, len)| Edit::Delete { at, len }),
        (any::<usize>(), yaml_chars).prop_map(|(at, text)| Edit::Insert { at, text }),
        (any::<usize>(), any::<String>()).prop_map(|(at, text)| Edit::Insert { at, text }),
        (any::<usize>(), any::<char>()).prop_map(|(at, with)| Edit::Replace { at, with }),
        any::<usize>().prop_map(|line| Edit::DuplicateLine { line }),
        (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Edit::SwapLines { a, b }),
        any::<usize>().prop_map(|at| Edit::Truncate { at }),
    ]
}

fn apply(text: &str, edit: &Edit) -> String {
    let mut chars: Vec<char> = text.chars().collect();
    let mut lines: Vec<&str> = text.split_inclusive('\n').collect();
    let n = chars.len().max(1);
    match edit {
        Edit::Delete { at, len } => {
            let start = at % n;
            let end = (start + len).min(chars.len());
            chars.drain(start.min(end)..end);
        }
        Edit::Insert { at, text } => {
            let at = at % (chars.len() + 1);
            chars.splice(at..at, text.chars());
        }
        Edit::Replace { at, with } => {
            if !chars.is_empty() {
                chars[at % n] = *with;
            }
        }
        Edit::DuplicateLine { line } => {
            if !lines.is_empty() {
                let line = line % lines.len();
                lines.insert(line, lines[line]);
            }
            return lines.concat();
        }
        Edit::SwapLines { a, b } => {
            if !lines.is_empty() {
                let len = lines.len();
                lines.swap(a % len, b % len);
            }
            return lines.concat();
        }
        Edit::Truncate { at } => chars.truncate(at % n),
    }
    chars.into_iter().collect()
}

// 256 cases each (proptest's default); PROPTEST_CASES=10000 searches harder.
proptest! {
    #[test]
    fn parser_survives_any_text(text in any::<String>()) {
        let _ = parse_checked(&text);
    }

    #[test]
    fn parser_survives_yaml_like_text(text in "([a-zA-Z_]{1,10}|[-:#{}\\[\\],'\"|>&*!? \t0-9./]|\n {0,6}){0,80}") {
        let _ = parse_checked(&text);
    }

    #[test]
    fn parser_survives_edits_of_the_example(edits in prop::collection::vec(edit(), 1..6)) {
        let mut text = EXAMPLE.to_owned();
        for edit in &edits {
            text = apply(&text, edit);
        }
        let _ = parse_checked(&text);
    }

    #[test]
    fn formatted_durations_parse_back(nanos in 0..=i64::MAX as u64) {
        let duration = Duration::from_nanos(nanos);
        let text = format_duration(duration);
        prop_assert_eq!(parse_duration(&text), Ok(duration), "{}", text);
    }

    #[test]
    fn round_durations_parse_back(value in 0..100_000u64, unit in 0..6usize) {
        // Whole numbers of one unit: the values people write.
        let nanos = [1, 1_000, 1_000_000, 1_000_000_000, 60_000_000_000, 3_600_000_000_000][unit];
        let duration = Duration::from_nanos(value * nanos);
        let text = format_duration(duration);
        prop_assert_eq!(parse_duration(&text), Ok(duration), "{}", text);
        // And through a config file.
        let yaml = format!("endpoints:\n  - path: /a\n    timeout: {text}\n    backends: [{{target: 'a:1'}}]\n");
        let gateway = parse_checked(&yaml).map_err(TestCaseError::fail)?;
        prop_assert_eq!(gateway.endpoints[0].timeout, Some(duration));
    }

    #[test]
    fn parse_duration_never_panics(text in "[-+]?([0-9]{0,25}(\\.[0-9]{0,25})?(ns|us|µs|μs|ms|s|m|h|x)?){0,4}") {
        if let Ok(duration) = parse_duration(&text) {
            // Whatever parses formats to something that parses to the same value.
            prop_assert_eq!(parse_duration(&format_duration(duration)), Ok(duration));
        }
    }

    #[test]
    fn quoted_and_plain_weights_are_the_same(weight in 1..=i64::from(u32::MAX)) {
        let config = |weight: String| {
            format!("endpoints:\n  - path: /a\n    backends: [{{target: 'a:1', weight: {weight}}}]\n")
        };
        let plain = parse_checked(&config(weight.to_string()));
        let quoted = parse_checked(&config(format!("\"{weight}\"")));
        let plain = plain.map_err(TestCaseError::fail)?;
        prop_assert_eq!(plain.endpoints[0].backends[0].weight, Some(weight));
        prop_assert_eq!(Ok(plain), quoted);
    }

    #[test]
    fn quoted_and_plain_attempts_are_the_same(attempts in 1..=u32::MAX) {
        let config = |attempts: String| {
            format!("endpoints:\n  - path: /a\n    backends: [{{target: 'a:1'}}]\n    retry: {{attempts: {attempts}}}\n")
        };
        let plain = parse_checked(&config(attempts.to_string()));
        let quoted = parse_checked(&config(format!("'{attempts}'")));
        prop_assert_eq!(&plain, &quoted);
        let gateway = plain.map_err(TestCaseError::fail)?;
        prop_assert_eq!(gateway.endpoints[0].retry.as_ref().map(|r| r.attempts), Some(attempts));
    }

    #[test]
    fn quoted_and_plain_status_codes_are_the_same(code in 0..1000u16) {
        let config = |code: String| {
            format!("endpoints:\n  - path: /a\n    backends: [{{target: 'a:1'}}]\n    retry:\n      attempts: 2\n      conditions: [{{byStatusCode: {code}}}]\n")
        };
        let plain = parse_checked(&config(code.to_string()));
        let quoted = parse_checked(&config(format!("\"{code}\"")));
        prop_assert_eq!(plain, quoted);
    }
}

#[test]
fn example_parses_unedited() {
    parse_checked(EXAMPLE).expect("the example is valid");
}

#[test]
fn deep_nesting_is_an_error_not_a_crash() {
    for text in [
        "[".repeat(100_000),
        "{a: ".repeat(50_000),
        format!("endpoints: {}", "- ".repeat(50_000)),
    ] {
        let _ = parse_checked(&text);
    }
}

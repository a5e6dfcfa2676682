//! Every rejected config names the file, line and column of the problem.

use std::path::Path;

use configs::{Backend, ConfigError, Endpoint, Gateway, parse, validate};

/// Parses `text` as `bad.yaml`, expects an error at `line:column` whose text contains `want`.
#[track_caller]
fn rejects(text: &str, line: u32, column: u32, want: &str) -> ConfigError {
    let error = parse(text, Path::new("bad.yaml")).expect_err("config should be rejected");
    let shown = error.to_string();
    assert_eq!(
        (error.line(), error.column()),
        (Some(line), Some(column)),
        "position of: {shown}"
    );
    let prefix = format!("bad.yaml:{line}:{column}: ");
    assert!(
        shown.starts_with(&prefix),
        "{shown:?} should start with {prefix:?}"
    );
    assert!(shown.contains(want), "{shown:?} should contain {want:?}");
    error
}

#[test]
fn unknown_field_names_the_typo() {
    let text = "\
name: t
endpoints:
  - path: /a
    backends: [{target: 'a:1'}]
    perTryTimeout: 1s
";
    rejects(text, 5, 5, "unknown field `perTryTimeout`");

    let text = "\
endpoints:
  - path: /a
    backends:
      - target: 'a:1'
        wieght: 3
";
    rejects(text, 5, 9, "unknown field `wieght`");

    let text = "nmae: x\n";
    rejects(text, 1, 1, "unknown field `nmae`");

    let text = "\
endpoints:
  - path: /a
    backends: [{target: 'a:1'}]
    retry:
      conditions:
        - byStatusCode: '500'
          byHeaders: {name: a, value: b}
";
    rejects(text, 7, 11, "unknown field `byHeaders`");
}

#[test]
fn bad_duration() {
    let text = "\
endpoints:
  - path: /a
    timeout: 1sec
    backends: [{target: 'a:1'}]
";
    rejects(text, 3, 14, "unknown unit \"sec\" in duration \"1sec\"");

    let text = "\
endpoints:
  - path: /a
    backends: [{target: 'a:1'}]
    retry:
      perTryTimeout: -1s
";
    rejects(text, 5, 22, "negative duration");

    let text = "\
endpoints:
  - path: /a
    timeout: 5
    backends: [{target: 'a:1'}]
";
    rejects(text, 3, 14, "invalid duration \"5\"");
}

#[test]
fn bad_target() {
    let text = "\
endpoints:
  - path: /a
    backends:
      - target: 127.0.0.1:8000
      - target: localhost
";
    let error = rejects(text, 5, 17, "invalid target \"localhost\": missing port");
    assert!(
        error
            .to_string()
            .contains("endpoints[0].backends[1].target"),
        "{error}"
    );

    let text = "\
endpoints:
  - path: /a
    backends:
      - weight: 3
";
    rejects(text, 4, 9, "target is required");

    let text = "\
endpoints:
  - path: /a
    backends:
      - target: ftp://files:21
";
    rejects(text, 4, 17, "unsupported scheme \"ftp\"");
}

#[test]
fn bad_status_code_range() {
    let condition = |value: &str| {
        format!(
            "endpoints:\n  - path: /a\n    backends: [{{target: 'a:1'}}]\n    retry:\n      conditions:\n        - byStatusCode: {value}\n"
        )
    };
    rejects(
        &condition("'5xx'"),
        6,
        25,
        "invalid status code range \"5xx\"",
    );
    rejects(&condition("'504-502'"), 6, 25, "the start is after the end");
    rejects(&condition("'600'"), 6, 25, "within 100-599");
    rejects(&condition("99"), 6, 25, "within 100-599");
}

#[test]
fn condition_needs_exactly_one_kind() {
    let text = "\
endpoints:
  - path: /a
    backends: [{target: 'a:1'}]
    retry:
      attempts: 2
      conditions:
        - byStatusCode: '502'
        - {}
";
    rejects(text, 8, 11, "needs byStatusCode or byHeader");

    let text = "\
endpoints:
  - path: /a
    backends: [{target: 'a:1'}]
    retry:
      conditions:
        - byStatusCode: '502'
          byHeader: {name: Grpc-Status, value: '14'}
";
    rejects(text, 6, 11, "not both");
}

#[test]
fn duplicate_route_points_at_the_second() {
    let text = "\
endpoints:
  - path: /a
    method: GET
    backends: [{target: 'a:1'}]
  - path: /b
    backends: [{target: 'a:1'}]
  - method: get
    path: /a
    backends: [{target: 'a:2'}]
";
    let error = rejects(text, 7, 5, "duplicate endpoint GET /a");
    assert!(error.to_string().contains("endpoints[2]"), "{error}");
    assert!(error.to_string().contains("as endpoints[0]"), "{error}");

    // A different host is a different route.
    let text = "\
endpoints:
  - path: /a
    backends: [{target: 'a:1'}]
  - path: /a
    host: api.example.com
    backends: [{target: 'a:1'}]
";
    parse(text, Path::new("ok.yaml")).expect("same path, other host");
}

#[test]
fn path_must_start_with_slash() {
    let text = "\
endpoints:
  - path: api/a
    backends: [{target: 'a:1'}]
";
    rejects(text, 2, 11, "path \"api/a\" must start with '/'");

    let text = "\
endpoints:
  - method: GET
    backends: [{target: 'a:1'}]
";
    rejects(text, 2, 5, "path is required");
}

#[test]
fn backends_are_required() {
    let text = "\
endpoints:
  - path: /a
    backends: []
";
    rejects(text, 3, 15, "has no backends");

    let text = "\
endpoints:
  - path: /ok
    backends: [{target: 'a:1'}]
  - path: /a
    timeout: 1s
";
    rejects(text, 4, 5, "endpoint /a has no backends");
}

#[test]
fn unknown_selector_and_protocol() {
    let text = "\
endpoints:
  - path: /a
    selector: round-robin
    backends: [{target: 'a:1'}]
";
    rejects(
        text,
        3,
        15,
        "unknown selector \"round-robin\", expected p2c, wrr or random",
    );

    let text = "\
endpoints:
  - path: /a
    protocol: HTTP2
    backends: [{target: 'a:1'}]
";
    rejects(
        text,
        3,
        15,
        "unknown protocol \"HTTP2\", expected HTTP or GRPC",
    );
}

#[test]
fn unknown_tls_config_name() {
    let text = "\
tlsStore:
  internal: {insecure: true}
endpoints:
  - path: /a
    backends:
      - target: 'a:1'
        tls: true
        tls_config_name: internl
";
    rejects(text, 8, 26, "no tlsStore entry named \"internl\"");
}

#[test]
fn middleware_needs_a_name() {
    let text = "\
middlewares:
  - name: logging
  - options: {a: 1}
endpoints: []
";
    rejects(text, 3, 5, "middleware name is required");
}

#[test]
fn yaml_syntax_errors_have_positions() {
    let text = "name: x\nendpoints:\n  - path: /a\n   backends: [\n";
    let error = parse(text, Path::new("bad.yaml")).expect_err("syntax");
    assert!(error.line().is_some(), "{error}");
    assert!(error.to_string().starts_with("bad.yaml:"), "{error}");

    let text = "name: a\nname: b\n";
    rejects(text, 2, 1, "duplicate mapping key");
}

#[test]
fn validate_works_on_configs_built_in_code() {
    let mut gateway = Gateway {
        endpoints: vec![Endpoint {
            path: "/a".into(),
            backends: vec![Backend {
                target: "127.0.0.1:8000".into(),
                ..Backend::default()
            }],
            ..Endpoint::default()
        }],
        ..Gateway::default()
    };
    validate(&gateway).expect("valid");
    gateway.endpoints[0].backends[0].target = "nope".into();
    let error = validate(&gateway).expect_err("bad target");
    assert_eq!(error.line(), None);
    assert!(
        error
            .to_string()
            .starts_with("endpoints[0].backends[0].target: invalid target \"nope\""),
        "{error}"
    );
}

#[test]
fn bad_route_regex_is_one_line_at_the_path() {
    let text = "\
endpoints:
  - path: /a
    backends: [{target: 'a:1'}]
  - path: /api/{id:[0-9+}/x
    backends: [{target: 'a:1'}]
";
    let error = rejects(
        text,
        4,
        11,
        "endpoints[1].path: invalid regex \"[0-9+\" in path pattern: unclosed character class",
    );
    assert!(!error.to_string().contains('\n'), "{error:?}");

    // In a prefix pattern, and as the regex crate's other errors.
    let text = "\
endpoints:
  - path: '/files/{name:a{2,1}}/*'
    backends: [{target: 'a:1'}]
";
    let error = rejects(text, 2, 11, "invalid regex \"a{2,1}\" in path pattern: ");
    assert!(!error.to_string().contains('\n'), "{error:?}");

    // Constraints the router accepts pass.
    let text = "\
endpoints:
  - path: '/users/{id:[0-9]+}/{name:[a-z]{2,8}}'
    backends: [{target: 'a:1'}]
";
    parse(text, Path::new("good.yaml")).expect("valid constraints");
}

#[test]
fn weight_must_be_positive() {
    for weight in ["-1", "0", "'-5'", "4294967296"] {
        let text = format!(
            "\
endpoints:
  - path: /a
    backends:
      - target: 'a:1'
      - target: 'b:1'
        weight: {weight}
"
        );
        rejects(&text, 6, 17, "endpoints[0].backends[1].weight: weight ");
    }
    let text = "\
endpoints:
  - path: /a
    backends: [{target: 'a:1', weight: 1}, {target: 'b:1', weight: 4294967295}]
";
    parse(text, Path::new("good.yaml")).expect("weights in range");
}

#[test]
fn attempts_must_be_at_least_one() {
    for attempts in ["0", "'0'"] {
        let text = format!(
            "\
endpoints:
  - path: /a
    backends: [{{target: 'a:1'}}]
    retry:
      attempts: {attempts}
"
        );
        rejects(
            &text,
            5,
            17,
            "endpoints[0].retry.attempts: attempts must be at least 1",
        );
    }
    // Left out, it is one attempt (no retry), as in Kratos.
    let text = "\
endpoints:
  - path: /a
    backends: [{target: 'a:1'}]
    retry:
      perTryTimeout: 1s
";
    let gateway = parse(text, Path::new("good.yaml")).expect("attempts left out");
    assert_eq!(
        gateway.endpoints[0].retry.as_ref().map(|r| r.attempts),
        Some(1)
    );
}

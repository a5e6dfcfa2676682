//! go-kratos/gateway files load unchanged; every example loads; both key styles work.

use std::path::{Path, PathBuf};
use std::time::Duration;

use configs::{Gateway, Protocol, StatusRange, parse};

fn load(path: &Path) -> Gateway {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    parse(&text, path).unwrap_or_else(|e| panic!("{e}"))
}

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn kratos_cmd_config_loads_unchanged() {
    let gateway = load(&crate_dir().join("tests/fixtures/kratos_cmd_config.yaml"));
    assert_eq!(gateway.name, "helloworld");
    assert_eq!(gateway.version, "v1");
    let names: Vec<&str> = gateway
        .middlewares
        .iter()
        .map(|m| m.name.as_str())
        .collect();
    assert_eq!(names, ["tracing", "logging", "transcoder", "cors"]);
    assert_eq!(
        gateway.middlewares[0].options["@type"],
        "type.googleapis.com/gateway.middleware.tracing.v1.Tracing"
    );
    assert_eq!(gateway.middlewares[3].options["allowCredentials"], true);

    let http = &gateway.endpoints[0];
    assert_eq!(http.path, "/helloworld/*");
    assert_eq!(http.host, "localhost");
    assert_eq!(http.timeout, Some(Duration::from_secs(1)));
    assert_eq!(http.backends[0].target, "127.0.0.1:8000");
    // Nested JSON-in-YAML options survive as JSON.
    assert_eq!(http.middlewares[0].options["successRatio"]["window"], "3s");

    let grpc = &gateway.endpoints[1];
    assert_eq!(grpc.protocol, Protocol::Grpc);
    assert_eq!(grpc.method, "POST");
    let retry = grpc.retry.as_ref().expect("retry");
    assert_eq!(retry.attempts, 3);
    assert_eq!(retry.per_try_timeout, Some(Duration::from_millis(100)));
    assert_eq!(
        retry.conditions[0].by_status_code,
        Some(StatusRange { from: 502, to: 504 })
    );
    let header = retry.conditions[1].by_header.as_ref().expect("byHeader");
    assert_eq!(
        (header.name.as_str(), header.values()),
        ("Grpc-Status", vec!["14".to_owned()])
    );
}

#[test]
fn kratos_fixture_config_loads_unchanged() {
    let gateway = load(&crate_dir().join("tests/fixtures/kratos_fixture_config.yaml"));
    assert_eq!(gateway.hosts, ["localhost", "127.0.0.1"]);
    assert_eq!(gateway.endpoints.len(), 2);
    assert_eq!(
        gateway.endpoints[1]
            .retry
            .as_ref()
            .and_then(|r| r.per_try_timeout),
        Some(Duration::from_millis(500))
    );
}

#[test]
fn every_example_loads() {
    let dir = crate_dir().join("examples");
    let mut loaded = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("examples dir") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            let gateway = load(&path);
            assert!(!gateway.endpoints.is_empty(), "{}", path.display());
            loaded.push(
                path.file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned(),
            );
        }
    }
    loaded.sort();
    assert!(loaded.len() >= 2, "{loaded:?}");
    assert!(loaded.contains(&"gateway.yaml".to_owned()));
    assert!(loaded.contains(&"kratos.yaml".to_owned()));
}

#[test]
fn gateway_example_is_what_the_readme_promises() {
    let gateway = load(&crate_dir().join("examples/gateway.yaml"));
    assert_eq!(gateway.middlewares[0].name, "logging");
    let hello = &gateway.endpoints[0];
    assert_eq!(hello.path, "/hello/*");
    assert_eq!(hello.backends[0].target, "127.0.0.1:8000");
    assert!(hello.timeout.is_some());
    assert!(hello.retry.is_some());
    let echo = &gateway.endpoints[1];
    assert_eq!(echo.path, "/echo/*");
    assert_eq!(echo.middlewares[0].name, "rewrite");
    assert_eq!(echo.middlewares[0].options["stripPrefix"], "/echo");
}

#[test]
fn kratos_example_uses_protojson_quirks() {
    let gateway = load(&crate_dir().join("examples/kratos.yaml"));
    let http = &gateway.endpoints[0];
    assert_eq!(http.backends[0].weight, Some(10)); // written "10"
    assert_eq!(http.backends[1].weight, Some(5)); // written 5
    let grpc = &gateway.endpoints[1];
    assert_eq!(grpc.backends[1].tls_config_name, "internal");
    assert_eq!(
        gateway.tls_store["internal"].server_name,
        "helloworld.internal"
    );
    let retry = grpc.retry.as_ref().expect("retry");
    assert_eq!(retry.priorities, ["primary", "secondary"]);
    let header = retry.conditions[1].by_header.as_ref().expect("byHeader");
    assert_eq!(header.values(), ["14", "13"]);
}

const CAMEL: &str = r#"
name: keys
tlsStore:
  a: {serverName: api.internal, insecure: true}
endpoints:
  - path: /x
    timeout: 1.5s
    backends:
      - {target: 'h:1', weight: "10", healthCheck: {}, tlsConfigName: a, tls: true}
    retry:
      attempts: "2"
      perTryTimeout: 250ms
      conditions:
        - byStatusCode: 503
        - byHeader: {name: Grpc-Status, value: "14"}
"#;

const SNAKE: &str = r#"
name: keys
tls_store:
  a: {server_name: api.internal, insecure: true}
endpoints:
  - path: /x
    timeout: 1.5s
    backends:
      - {target: 'h:1', weight: 10, health_check: {}, tls_config_name: a, tls: true}
    retry:
      attempts: 2
      per_try_timeout: 250ms
      conditions:
        - by_status_code: "503"
        - by_header: {name: Grpc-Status, value: "14"}
"#;

#[test]
fn camel_and_snake_case_files_are_the_same_config() {
    let camel = parse(CAMEL, Path::new("camel.yaml")).expect("camel");
    let snake = parse(SNAKE, Path::new("snake.yaml")).expect("snake");
    assert_eq!(camel, snake);
    let endpoint = &camel.endpoints[0];
    assert_eq!(endpoint.timeout, Some(Duration::from_millis(1500)));
    assert_eq!(endpoint.backends[0].weight, Some(10));
    let retry = endpoint.retry.as_ref().expect("retry");
    assert_eq!(retry.attempts, 2);
    assert!(
        retry.conditions[0]
            .by_status_code
            .is_some_and(|r| r.contains(503))
    );
}

#[test]
fn json_view_round_trips() {
    let gateway = load(&crate_dir().join("examples/kratos.yaml"));
    let json = serde_json::to_value(&gateway).expect("to json");
    assert_eq!(json["endpoints"][1]["retry"]["perTryTimeout"], "100ms");
    assert_eq!(
        json["endpoints"][1]["retry"]["conditions"][0]["byStatusCode"],
        "502-504"
    );
    assert_eq!(json["endpoints"][1]["protocol"], "GRPC");
    let back: Gateway = serde_json::from_value(json).expect("from json");
    assert_eq!(back, gateway);
}

//! A custom middleware registered by name, built from YAML like a built-in.
//!
//! `override` answers a fixed response for one path and lets every other request through.
//! Run it with `cargo run -p middleware-builtin --example custom_override`.

use std::path::Path;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body_util::BodyExt;
use middleware::hooks::{Filter, FilterLayer};
use middleware::{
    Body, BoxError, BuildContext, BuildError, EndpointInfo, Middleware, Registry, RoundTripper,
    full_body,
};
use middleware_builtin::support::{decode, option_error};
use serde::Deserialize;
use tower::ServiceExt;

/// Options of `override`; unknown fields are refused like the built-ins do.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct OverrideOptions {
    /// The request path answered here. Required.
    path: String,
    /// Status of the answer. Default: 200.
    status: Option<u16>,
    /// Body of the answer. Default: empty.
    body: String,
    /// Headers of the answer. Default: none.
    headers: std::collections::BTreeMap<String, String>,
}

/// The filter: stops matching requests with the configured answer.
struct Override {
    path: String,
    status: StatusCode,
    body: Bytes,
    headers: Vec<(HeaderName, HeaderValue)>,
}

impl Filter for Override {
    fn pre(&self, request: &mut Request<Body>) -> Result<(), Response<Body>> {
        if request.uri().path() != self.path {
            return Ok(());
        }
        let mut response = Response::new(full_body(self.body.clone()));
        *response.status_mut() = self.status;
        for (name, value) in &self.headers {
            response.headers_mut().insert(name.clone(), value.clone());
        }
        Err(response)
    }
}

/// The factory the registry calls for every `name: override` entry.
fn override_factory(
    config: &configs::Middleware,
    _ctx: &BuildContext,
) -> Result<Middleware, BuildError> {
    let options: OverrideOptions = decode(config)?;
    if !options.path.starts_with('/') {
        return Err(option_error(&config.name, "path", "must start with '/'"));
    }
    let status = StatusCode::from_u16(options.status.unwrap_or(200))
        .map_err(|err| option_error(&config.name, "status", err))?;
    let mut headers = Vec::new();
    for (name, value) in &options.headers {
        let pair = (
            HeaderName::try_from(name.as_str()),
            HeaderValue::try_from(value.as_str()),
        );
        let (Ok(name), Ok(value)) = pair else {
            return Err(option_error(
                &config.name,
                "headers",
                format!("invalid header {name:?}"),
            ));
        };
        headers.push((name, value));
    }
    let filter = Override {
        path: options.path,
        status,
        body: Bytes::from(options.body),
        headers,
    };
    Ok(Middleware::from_layer(
        &config.name,
        FilterLayer::new(filter),
    ))
}

const CONFIG: &str = r#"
name: example
endpoints:
  - path: /api/*
    backends:
      - target: 127.0.0.1:8000
    middlewares:
      - name: override
        options:
          path: /api/maintenance
          status: 503
          body: "down for maintenance\n"
          headers: {retry-after: "120"}
      - name: rewrite
        options:
          responseHeadersRewrite: {set: {x-served-by: upstream}}
"#;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let mut registry = Registry::new();
    let clients = client::Factory::new(client::ClientOptions::default(), None);
    middleware_builtin::register_all(&mut registry, clients);
    registry.register("override", override_factory);

    let gateway = configs::parse(CONFIG, Path::new("example.yaml"))?;
    let endpoint = &gateway.endpoints[0];
    let ctx = BuildContext::new(std::sync::Arc::new(EndpointInfo::from_config(endpoint)));
    // A trivial "upstream" in place of the gateway's HTTP client.
    let mut tripper = RoundTripper::new(tower::service_fn(|request: Request<Body>| async move {
        Ok::<_, BoxError>(Response::new(full_body(format!(
            "upstream saw {}\n",
            request.uri()
        ))))
    }));
    // The first middleware listed is the outermost: wrap in reverse order.
    let mut built = Vec::new();
    for entry in &endpoint.middlewares {
        if let Some(middleware) = registry.build(entry, &ctx)? {
            built.push(middleware);
        }
    }
    for middleware in built.iter().rev() {
        tripper = middleware.wrap(tripper);
    }

    for path in ["/api/maintenance", "/api/users"] {
        let request = Request::get(path).body(full_body(""))?;
        let response = tripper.clone().oneshot(request).await?;
        let (parts, body) = response.into_parts();
        let body = body.collect().await?.to_bytes();
        println!("GET {path} -> {} {:?}", parts.status, parts.headers);
        print!("  {}", String::from_utf8_lossy(&body));
    }

    // A typo in the options fails the build and names the middleware and the field.
    let mut typo = endpoint.middlewares[0].clone();
    typo.options = serde_json::json!({"path": "/x", "stauts": 500});
    if let Err(err) = registry.build(&typo, &ctx) {
        println!("bad options -> {err}");
    }
    for middleware in &built {
        middleware.close();
    }
    Ok(())
}

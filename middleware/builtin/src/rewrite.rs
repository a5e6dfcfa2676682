//! `rewrite`: changes the request path, host and headers on the way in and the response
//! headers on the way out (Kratos' `rewrite` middleware, same option names).
//!
//! Order within one request: `pathRewrite`, then `hostRewrite`, then `stripPrefix` (applied
//! to the already rewritten path), then the request header policy. Each header policy
//! applies `set`, then `add`, then `remove`. The query string is kept.

use std::collections::BTreeMap;

use http::header::{HOST, HeaderName};
use http::uri::{PathAndQuery, Uri};
use http::{HeaderMap, HeaderValue, Request, Response};
use serde::Deserialize;

use super::support::{decode, option_error};
use middleware::hooks::{Filter, FilterLayer};
use middleware::{Body, BuildContext, BuildError, Middleware};

/// Options of `rewrite` (Kratos' `gateway.middleware.rewrite.v1.Rewrite`).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct RewriteOptions {
    /// Replaces the whole request path (query kept). Default: unset (path unchanged).
    #[serde(alias = "path_rewrite")]
    pub path_rewrite: Option<String>,
    /// Replaces the `Host` header sent upstream. Default: unset (the client's Host is kept).
    #[serde(alias = "host_rewrite")]
    pub host_rewrite: Option<String>,
    /// Removes this string prefix from the path (`/api` turns `/api/x` into `/x`, and the
    /// empty rest into `/`). Default: unset.
    #[serde(alias = "strip_prefix")]
    pub strip_prefix: Option<String>,
    /// Header changes on the request sent upstream. Default: none.
    #[serde(alias = "request_headers_rewrite")]
    pub request_headers_rewrite: HeadersPolicy,
    /// Header changes on the response sent downstream. Default: none.
    #[serde(alias = "response_headers_rewrite")]
    pub response_headers_rewrite: HeadersPolicy,
}

/// Header changes: `set` replaces, `add` appends, `remove` deletes (in that order).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HeadersPolicy {
    /// Headers to set, replacing any value present. Default: none.
    pub set: BTreeMap<String, String>,
    /// Headers to append next to values already present. Default: none.
    pub add: BTreeMap<String, String>,
    /// Header names to delete. Default: none.
    pub remove: Vec<String>,
}

/// A [`HeadersPolicy`] with names and values checked.
#[derive(Debug, Clone, Default)]
pub struct CompiledHeaders {
    set: Vec<(HeaderName, HeaderValue)>,
    add: Vec<(HeaderName, HeaderValue)>,
    remove: Vec<HeaderName>,
}

impl CompiledHeaders {
    /// Checks the policy; `field` names it in errors.
    fn compile(policy: &HeadersPolicy, name: &str, field: &str) -> Result<Self, BuildError> {
        let pair = |kind: &str, (key, value): (&String, &String)| {
            let header = HeaderName::try_from(key.as_str()).map_err(|_| {
                option_error(
                    name,
                    &format!("{field}.{kind}"),
                    format!("invalid header name {key:?}"),
                )
            })?;
            let value = HeaderValue::try_from(value.as_str()).map_err(|_| {
                option_error(
                    name,
                    &format!("{field}.{kind}.{key}"),
                    format!("invalid header value {value:?}"),
                )
            })?;
            Ok::<_, BuildError>((header, value))
        };
        Ok(Self {
            set: policy
                .set
                .iter()
                .map(|entry| pair("set", entry))
                .collect::<Result<_, _>>()?,
            add: policy
                .add
                .iter()
                .map(|entry| pair("add", entry))
                .collect::<Result<_, _>>()?,
            remove: policy
                .remove
                .iter()
                .map(|key| {
                    HeaderName::try_from(key.as_str()).map_err(|_| {
                        option_error(
                            name,
                            &format!("{field}.remove"),
                            format!("invalid header name {key:?}"),
                        )
                    })
                })
                .collect::<Result<_, _>>()?,
        })
    }

    /// Applies set, add, remove to `headers`.
    pub fn apply(&self, headers: &mut HeaderMap) {
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
        for (name, value) in &self.add {
            headers.append(name.clone(), value.clone());
        }
        for name in &self.remove {
            headers.remove(name);
        }
    }

    fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }
}

/// The `rewrite` filter with its options checked.
#[derive(Debug, Clone)]
pub struct Rewrite {
    path_rewrite: Option<String>,
    host_rewrite: Option<HeaderValue>,
    strip_prefix: Option<String>,
    request_headers: CompiledHeaders,
    response_headers: CompiledHeaders,
}

impl Rewrite {
    /// Checks `options` (paths must start with `/`, headers must be valid).
    pub fn new(options: &RewriteOptions, name: &str) -> Result<Self, BuildError> {
        if let Some(path) = &options.path_rewrite {
            if !path.starts_with('/') || path.parse::<PathAndQuery>().is_err() || path.contains('?')
            {
                return Err(option_error(
                    name,
                    "pathRewrite",
                    format!("{path:?} is not a path starting with '/'"),
                ));
            }
        }
        let host_rewrite = options
            .host_rewrite
            .as_ref()
            .map(|host| {
                HeaderValue::try_from(host.as_str())
                    .ok()
                    .filter(|_| !host.is_empty())
                    .ok_or_else(|| {
                        option_error(name, "hostRewrite", format!("invalid host {host:?}"))
                    })
            })
            .transpose()?;
        Ok(Self {
            path_rewrite: options.path_rewrite.clone(),
            host_rewrite,
            strip_prefix: options
                .strip_prefix
                .clone()
                .filter(|prefix| !prefix.is_empty()),
            request_headers: CompiledHeaders::compile(
                &options.request_headers_rewrite,
                name,
                "requestHeadersRewrite",
            )?,
            response_headers: CompiledHeaders::compile(
                &options.response_headers_rewrite,
                name,
                "responseHeadersRewrite",
            )?,
        })
    }

    fn rewrite_path(&self, path: &str) -> Option<String> {
        if self.path_rewrite.is_none() && self.strip_prefix.is_none() {
            return None;
        }
        let mut path = self.path_rewrite.clone().unwrap_or_else(|| path.to_owned());
        if let Some(prefix) = &self.strip_prefix {
            path = strip_prefix(&path, prefix);
        }
        Some(path)
    }
}

/// Kratos' prefix stripping: a plain string prefix; an empty rest becomes `/` and a rest
/// not starting with `/` gets one.
fn strip_prefix(path: &str, prefix: &str) -> String {
    let rest = path.strip_prefix(prefix).unwrap_or(path);
    if rest.starts_with('/') {
        rest.to_owned()
    } else {
        format!("/{rest}")
    }
}

fn replace_path(uri: &Uri, path: &str) -> Option<Uri> {
    let path_and_query = match uri.query() {
        Some(query) => format!("{path}?{query}"),
        None => path.to_owned(),
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(path_and_query.parse().ok()?);
    Uri::from_parts(parts).ok()
}

impl Filter for Rewrite {
    fn pre(&self, request: &mut Request<Body>) -> Result<(), Response<Body>> {
        if let Some(path) = self.rewrite_path(request.uri().path()) {
            if let Some(uri) = replace_path(request.uri(), &path) {
                *request.uri_mut() = uri;
            }
        }
        if let Some(host) = &self.host_rewrite {
            request.headers_mut().insert(HOST, host.clone());
        }
        if !self.request_headers.is_empty() {
            self.request_headers.apply(request.headers_mut());
        }
        Ok(())
    }

    fn post(&self, response: &mut Response<Body>) {
        if !self.response_headers.is_empty() {
            self.response_headers.apply(response.headers_mut());
        }
    }
}

/// Builds `rewrite` from its config entry.
pub fn factory(
    config: &configs::Middleware,
    _ctx: &BuildContext,
) -> Result<Middleware, BuildError> {
    let options: RewriteOptions = decode(config)?;
    let rewrite = Rewrite::new(&options, &config.name)?;
    Ok(Middleware::from_layer(
        &config.name,
        FilterLayer::new(rewrite),
    ))
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    use super::*;
    use crate::support::decode;
    use middleware::{BoxError, RoundTripper, full_body};

    fn entry(options: serde_json::Value) -> configs::Middleware {
        configs::Middleware {
            name: "rewrite".into(),
            options,
            required: false,
        }
    }

    fn ctx() -> BuildContext {
        BuildContext::new(Default::default())
    }

    /// Answers with what it saw: path+query in the body, request headers copied back.
    fn mirror() -> RoundTripper {
        RoundTripper::new(tower::service_fn(|request: Request<Body>| async move {
            let mut response = Response::new(full_body(
                request
                    .uri()
                    .path_and_query()
                    .map_or("", |p| p.as_str())
                    .to_owned(),
            ));
            for (name, value) in request.headers() {
                response.headers_mut().append(name.clone(), value.clone());
            }
            response
                .headers_mut()
                .insert("x-drop", HeaderValue::from_static("1"));
            Ok::<_, BoxError>(response)
        }))
    }

    async fn call(
        options: serde_json::Value,
        uri: &str,
        headers: &[(&str, &str)],
    ) -> Response<Body> {
        let middleware = factory(&entry(options), &ctx()).expect("builds");
        let mut request = Request::builder().uri(uri);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request.body(full_body("")).expect("request");
        middleware
            .wrap(mirror())
            .oneshot(request)
            .await
            .expect("response")
    }

    async fn body(response: Response<Body>) -> String {
        let bytes = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    #[test]
    fn strip_prefix_follows_kratos() {
        assert_eq!(strip_prefix("/api/echo", "/api"), "/echo");
        assert_eq!(strip_prefix("/api", "/api"), "/");
        assert_eq!(strip_prefix("/apiv2", "/api"), "/v2");
        assert_eq!(strip_prefix("/other", "/api"), "/other");
    }

    #[tokio::test]
    async fn rewrites_path_keeping_the_query() {
        let response = call(
            serde_json::json!({"stripPrefix": "/api"}),
            "/api/users?id=1",
            &[],
        )
        .await;
        assert_eq!(body(response).await, "/users?id=1");
        let response = call(
            serde_json::json!({"path_rewrite": "/v2/all", "strip_prefix": "/v2"}),
            "/x?q",
            &[],
        )
        .await;
        assert_eq!(body(response).await, "/all?q");
    }

    #[tokio::test]
    async fn rewrites_host_and_headers_both_ways() {
        let options = serde_json::json!({
            "hostRewrite": "backend.internal",
            "requestHeadersRewrite": {"set": {"x-env": "prod"}, "add": {"x-multi": "2"}, "remove": ["x-secret"]},
            "responseHeadersRewrite": {"set": {"server": "gateway"}, "remove": ["x-drop"]},
        });
        let response = call(
            options,
            "/",
            &[
                ("host", "public.example"),
                ("x-env", "dev"),
                ("x-multi", "1"),
                ("x-secret", "s"),
            ],
        )
        .await;
        let headers = response.headers();
        assert_eq!(headers["host"], "backend.internal");
        assert_eq!(headers["x-env"], "prod");
        let multi: Vec<_> = headers.get_all("x-multi").iter().collect();
        assert_eq!(multi, ["1", "2"]);
        assert!(!headers.contains_key("x-secret"));
        assert_eq!(headers["server"], "gateway");
        assert!(!headers.contains_key("x-drop"));
    }

    #[test]
    fn bad_options_name_the_field() {
        let err = factory(&entry(serde_json::json!({"stripPrefx": "/a"})), &ctx())
            .err()
            .expect("typo");
        assert!(
            err.to_string()
                .contains("middleware rewrite: options.stripPrefx: unknown field `stripPrefx`"),
            "{err}"
        );
        let err = factory(&entry(serde_json::json!({"pathRewrite": 3})), &ctx())
            .err()
            .expect("type");
        assert!(
            err.to_string()
                .contains("options.pathRewrite: invalid type"),
            "{err}"
        );
        let err = factory(&entry(serde_json::json!({"pathRewrite": "nope"})), &ctx())
            .err()
            .expect("value");
        assert!(err.to_string().contains("options.pathRewrite"), "{err}");
        let err = factory(
            &entry(serde_json::json!({"requestHeadersRewrite": {"set": {"bad name": "v"}}})),
            &ctx(),
        )
        .err()
        .expect("header");
        assert!(
            err.to_string()
                .contains("options.requestHeadersRewrite.set: invalid header name"),
            "{err}"
        );
        let options: RewriteOptions = decode(&entry(serde_json::Value::Null)).expect("defaults");
        assert_eq!(options, RewriteOptions::default());
    }
}

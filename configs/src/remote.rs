//! The remote loader: `--conf http(s)://...`, fetched with hyper and polled with
//! `If-None-Match` / `If-Modified-Since`, so an unchanged file costs a 304.
//!
//! A failed fetch (refused, timed out, non-2xx, too large) or a body that does not parse or
//! validate keeps the running config; it is logged once per distinct failure and shown as
//! `last_error` until a poll succeeds again. The priority directory is local and merged as
//! for a file (read once per poll: unlike the main file, it is not read twice to settle).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio_util::sync::CancellationToken;

use crate::error::ConfigError;
use crate::loader::{
    Loaded, LoaderStatus, Sources, State, Summary, build, read_priority_dir, rfc3339,
};

/// Time allowed for one fetch (connect, response, whole body), unless
/// [`RemoteLoader::with_timeout`] says otherwise.
pub const DEFAULT_FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest config body accepted (16 MiB), unless [`RemoteLoader::with_max_body`] says
/// otherwise.
pub const DEFAULT_MAX_BODY: usize = 16 << 20;

/// Loads the config from an `http://` or `https://` URL (plus an optional local priority
/// directory) and polls it. The same shape as [`crate::FileLoader`]; cheap to clone.
#[derive(Debug, Clone)]
pub struct RemoteLoader {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    url: String,
    /// `url` without credentials and query values ([`redact_url`]): what status, logs and
    /// errors show.
    shown: String,
    priority_dir: Option<PathBuf>,
    timeout: Duration,
    max_body: usize,
    client: Client<HttpsConnector<HttpConnector>, Empty<Bytes>>,
    state: Mutex<State>,
    cache: Mutex<Cache>,
}

/// The last body the server sent and its validators, for conditional requests.
#[derive(Debug, Default)]
struct Cache {
    body: Option<Bytes>,
    etag: Option<String>,
    last_modified: Option<String>,
}

/// What one poll found.
enum Poll {
    Unchanged,
    Changed(Box<Loaded>),
    Failed { key: String, error: String },
}

impl RemoteLoader {
    /// A loader for `url` (`http://` or `https://`, verified against the Mozilla roots) and,
    /// if given, the local priority directory merged over it. Nothing is fetched until
    /// `load` or `watch`.
    pub fn new(url: impl Into<String>, priority_dir: Option<PathBuf>) -> Self {
        Self::build(
            url.into(),
            priority_dir,
            DEFAULT_FETCH_TIMEOUT,
            DEFAULT_MAX_BODY,
        )
    }

    /// Time allowed for one fetch, connect to last body byte (default 10 s).
    pub fn with_timeout(self, timeout: Duration) -> Self {
        Self::build(
            self.inner.url.clone(),
            self.inner.priority_dir.clone(),
            timeout,
            self.inner.max_body,
        )
    }

    /// Largest body accepted, in bytes (default 16 MiB); a larger one is a failed fetch.
    pub fn with_max_body(self, max_body: usize) -> Self {
        Self::build(
            self.inner.url.clone(),
            self.inner.priority_dir.clone(),
            self.inner.timeout,
            max_body,
        )
    }

    fn build(
        url: String,
        priority_dir: Option<PathBuf>,
        timeout: Duration,
        max_body: usize,
    ) -> Self {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(timeout));
        // ring offers every default protocol version, so this cannot fail.
        #[allow(clippy::expect_used)]
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("ring supports the default TLS versions")
        .with_root_certificates(rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        })
        .with_no_client_auth();
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(1)
            .build(connector);
        RemoteLoader {
            inner: Arc::new(Inner {
                shown: redact_url(&url),
                url,
                priority_dir,
                timeout,
                max_body,
                client,
                state: Mutex::new(State::default()),
                cache: Mutex::new(Cache::default()),
            }),
        }
    }

    /// Fetches (unconditionally), merges the priority directory and validates. A success
    /// becomes the config in force for `status` and `watch`; a failure is recorded as
    /// `last_error`.
    pub async fn load(&self) -> Result<Loaded, ConfigError> {
        let result = match self.fetch(false).await {
            Ok((body, etag)) => self
                .build_from(body)
                .await
                .map(|loaded| Loaded { etag, ..loaded }),
            Err(error) => Err(error),
        };
        let mut state = self.state();
        match &result {
            Ok(loaded) => state.record_success(loaded),
            Err(error) => state.last_error = Some(error.to_string()),
        }
        result
    }

    /// What the loader knows now; `path` is the URL (without credentials and query
    /// values, see [`redact_url`]).
    pub fn status(&self) -> LoaderStatus {
        let state = self.state();
        LoaderStatus {
            path: self.inner.shown.clone(),
            sha256: state.sha256.clone(),
            version: state.version.clone(),
            loaded_at: state.loaded_at.map(rfc3339),
            reloads: state.reloads,
            last_error: state.last_error.clone(),
            skipped_priority_files: state.skipped.clone(),
        }
    }

    /// Polls every `interval` with a conditional GET: a 304, or a body hashing like the
    /// config in force, changes nothing; a new body is parsed, merged, validated and given
    /// to `apply`. A failure (fetch, parse, validation, `apply`) is logged once per distinct
    /// failure, stored as `last_error`, and the running config stays; the first successful
    /// poll after it clears `last_error`. Ends when `shutdown` is cancelled.
    pub fn watch<F>(
        &self,
        interval: Duration,
        shutdown: CancellationToken,
        mut apply: F,
    ) -> tokio::task::JoinHandle<()>
    where
        F: FnMut(Loaded) -> Result<(), String> + Send + 'static,
    {
        let loader = self.clone();
        tokio::spawn(async move {
            tracing::info!(url = %loader.inner.shown, ?interval, "polling remote config");
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(interval) => {}
                }
                let poll = tokio::select! {
                    () = shutdown.cancelled() => break,
                    poll = loader.poll() => poll,
                };
                match poll {
                    Poll::Unchanged => {}
                    Poll::Failed { key, error } => loader.record_failure(key, error),
                    Poll::Changed(loaded) => {
                        let sha256 = loaded.sha256.clone();
                        let summary = Summary::of(&loaded);
                        match apply(*loaded) {
                            Ok(()) => {
                                tracing::info!(url = %loader.inner.shown, sha256 = %sha256, "remote config reloaded");
                                loader.state().record_reload(&summary);
                            }
                            Err(error) => loader.record_failure(
                                sha256.clone(),
                                format!("config {sha256} was not applied: {error}"),
                            ),
                        }
                    }
                }
            }
            tracing::debug!("remote config polling stopped");
        })
    }

    /// One conditional fetch, then a build if the content is new.
    async fn poll(&self) -> Poll {
        let (body, etag) = match self.fetch(true).await {
            Ok(fetched) => fetched,
            Err(error) => {
                let error = error.to_string();
                return Poll::Failed {
                    key: error.clone(),
                    error,
                };
            }
        };
        let sources = match self.read_sources(body).await {
            Ok(sources) => sources,
            Err(error) => {
                let error = error.to_string();
                return Poll::Failed {
                    key: error.clone(),
                    error,
                };
            }
        };
        {
            let mut state = self.state();
            if sources.sha256 == state.sha256 {
                if state.rejected.take().is_some() {
                    tracing::info!(url = %self.inner.shown, "remote config is reachable and unchanged again");
                    state.last_error = None;
                }
                return Poll::Unchanged;
            }
            if state.rejected.as_deref() == Some(sources.sha256.as_str()) {
                return Poll::Unchanged;
            }
        }
        match build(
            Path::new(&self.inner.shown),
            self.inner.priority_dir.as_deref(),
            &sources,
        ) {
            Ok(loaded) => Poll::Changed(Box::new(Loaded { etag, ..loaded })),
            Err(error) => Poll::Failed {
                key: sources.sha256,
                error: error.to_string(),
            },
        }
    }

    /// Logs and records a failure, once per distinct failure in a row.
    fn record_failure(&self, key: String, error: String) {
        let mut state = self.state();
        if state.rejected.as_deref() == Some(key.as_str()) {
            return;
        }
        tracing::error!(url = %self.inner.shown, %error, "remote config not reloaded; the running config stays");
        state.rejected = Some(key);
        state.last_error = Some(error);
    }

    /// GETs the URL within the timeout and the body limit: the body and its `ETag`. With
    /// `conditional`, sends the validators of the last body and answers that body (and its
    /// `ETag`) again on a 304.
    async fn fetch(&self, conditional: bool) -> Result<(Bytes, Option<String>), ConfigError> {
        let failed = |message: String| ConfigError::Fetch {
            url: self.inner.shown.clone(),
            message,
        };
        let mut request = http::Request::get(self.inner.url.as_str())
            .header(http::header::USER_AGENT, "gateway-config-poller");
        let cached = if conditional {
            let cache = self.cache();
            if cache.body.is_some() {
                if let Some(etag) = &cache.etag {
                    request = request.header(http::header::IF_NONE_MATCH, etag.as_str());
                }
                if let Some(date) = &cache.last_modified {
                    request = request.header(http::header::IF_MODIFIED_SINCE, date.as_str());
                }
            }
            cache.body.clone().map(|body| (body, cache.etag.clone()))
        } else {
            None
        };
        let request = request
            .body(Empty::new())
            .map_err(|error| failed(format!("invalid URL: {error}")))?;
        let exchange = async {
            let response = self
                .inner
                .client
                .request(request)
                .await
                .map_err(|error| failed(format!("cannot fetch: {}", one_line(&error))))?;
            let status = response.status();
            if status == http::StatusCode::NOT_MODIFIED {
                return cached.ok_or_else(|| {
                    failed("304 Not Modified to an unconditional request".to_owned())
                });
            }
            if !status.is_success() {
                return Err(failed(format!("server answered {status}")));
            }
            let header = |name| {
                response
                    .headers()
                    .get(name)
                    .and_then(|value: &http::HeaderValue| value.to_str().ok())
                    .map(str::to_owned)
            };
            let etag = header(http::header::ETAG);
            let last_modified = header(http::header::LAST_MODIFIED);
            let body = Limited::new(response.into_body(), self.inner.max_body)
                .collect()
                .await
                .map_err(|error| failed(format!("cannot read the body: {}", one_line(&*error))))?
                .to_bytes();
            let mut cache = self.cache();
            cache.body = Some(body.clone());
            cache.etag.clone_from(&etag);
            cache.last_modified = last_modified;
            Ok((body, etag))
        };
        match tokio::time::timeout(self.inner.timeout, exchange).await {
            Ok(result) => result,
            Err(_) => Err(failed(format!(
                "no complete answer within {:?}",
                self.inner.timeout
            ))),
        }
    }

    /// The body with the priority files (read off the runtime), hashed.
    async fn read_sources(&self, body: Bytes) -> Result<Sources, ConfigError> {
        let priority = match self.inner.priority_dir.clone() {
            Some(dir) => tokio::task::spawn_blocking(move || read_priority_dir(&dir))
                .await
                .map_err(|error| ConfigError::Fetch {
                    url: self.inner.shown.clone(),
                    message: format!("priority directory read failed: {error}"),
                })??,
            None => Vec::new(),
        };
        Ok(Sources::new(body.to_vec(), priority))
    }

    async fn build_from(&self, body: Bytes) -> Result<Loaded, ConfigError> {
        let sources = self.read_sources(body).await?;
        build(
            Path::new(&self.inner.shown),
            self.inner.priority_dir.as_deref(),
            &sources,
        )
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Plain data, valid even if a holder panicked.
        self.inner
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn cache(&self) -> MutexGuard<'_, Cache> {
        self.inner
            .cache
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// An error and its causes on one line (`a: b: c`), leaving out causes already quoted.
fn one_line(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text.replace(['\n', '\r'], " ")
}

/// `url` as status views, logs and errors show it: without `user:password@` and with every
/// query value replaced by `(redacted)` (a token in a query is as secret as a password);
/// the fragment is dropped. `https://u:p@host/c.yaml?token=t&v` →
/// `https://host/c.yaml?token=(redacted)&v`.
pub fn redact_url(url: &str) -> String {
    let url = url.split('#').next().unwrap_or_default();
    let (before_query, query) = match url.split_once('?') {
        Some((before, query)) => (before, Some(query)),
        None => (url, None),
    };
    let mut shown = match before_query.split_once("://") {
        Some((scheme, rest)) => {
            let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
            let host = authority
                .rsplit_once('@')
                .map_or(authority, |(_, host)| host);
            format!("{scheme}://{host}{path}")
        }
        None => before_query.to_owned(),
    };
    if let Some(query) = query {
        let pairs: Vec<String> = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((name, value)) if !value.is_empty() => format!("{name}=(redacted)"),
                _ => pair.to_owned(),
            })
            .collect();
        shown.push('?');
        shown.push_str(&pairs.join("&"));
    }
    shown
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn urls_are_shown_without_credentials_or_query_values() {
        for (url, shown) in [
            (
                "http://127.0.0.1:8080/gateway.yaml",
                "http://127.0.0.1:8080/gateway.yaml",
            ),
            (
                "https://user:secret@config.example/c.yaml?token=abc&v&x=",
                "https://config.example/c.yaml?token=(redacted)&v&x=",
            ),
            ("http://user@host:1?a=b#frag", "http://host:1?a=(redacted)"),
            ("https://host/p@th", "https://host/p@th"),
            ("HTTP://a:b@HOST/", "HTTP://HOST/"),
        ] {
            assert_eq!(redact_url(url), shown, "{url}");
        }
    }
}

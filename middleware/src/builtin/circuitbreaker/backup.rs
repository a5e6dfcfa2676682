//! `backupService`: forwards a request the breaker rejected to backup backends.
//!
//! The `middleware` crate cannot use the gateway's `client` crate (which depends on it), so
//! this is a deliberately small client: a pooled hyper-util HTTP/1.1 client and the
//! configured direct targets picked round robin. No discovery, TLS, health checks or
//! retries; a failed backup call is an upstream error (the client gets 502).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use http::uri::{Authority, Scheme, Uri};
use http::{Request, Response};
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::{Body, BoxError};

/// Why a backup target was rejected at build time.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackupError {
    /// No backends were listed.
    #[error("no backends: list at least one `target`")]
    NoBackends,
    /// A target is not a direct plain-HTTP `host:port`.
    #[error("target {target:?}: {reason}")]
    Target {
        /// The target as configured.
        target: String,
        /// What is wrong with it.
        reason: &'static str,
    },
}

/// The backup backends of one breaker.
#[derive(Clone)]
pub struct BackupClient {
    client: Client<HttpConnector, Body>,
    targets: Arc<[Authority]>,
    next: Arc<AtomicUsize>,
}

impl BackupClient {
    /// A client for `backends`: each a `host:port` or `http://host:port` target. Returns
    /// the index of the first bad backend with the reason.
    pub fn new(backends: &[configs::Backend]) -> Result<Self, (usize, BackupError)> {
        if backends.is_empty() {
            return Err((0, BackupError::NoBackends));
        }
        let targets = backends
            .iter()
            .enumerate()
            .map(|(index, backend)| parse_target(&backend.target).map_err(|err| (index, err)))
            .collect::<Result<Vec<_>, _>>()?;
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        Ok(Self {
            client: Client::builder(TokioExecutor::new()).build(connector),
            targets: targets.into(),
            next: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// Sends `request` to the next backup target and returns its response.
    pub async fn forward(&self, mut request: Request<Body>) -> Result<Response<Body>, BoxError> {
        let index = self.next.fetch_add(1, Ordering::Relaxed) % self.targets.len();
        let mut parts = request.uri().clone().into_parts();
        parts.scheme = Some(Scheme::HTTP);
        parts.authority = Some(self.targets[index].clone());
        if parts.path_and_query.is_none() {
            parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
        }
        *request.uri_mut() = Uri::from_parts(parts)?;
        *request.version_mut() = http::Version::HTTP_11;
        let response = self.client.request(request).await?;
        Ok(response.map(|body| body.map_err(BoxError::from).boxed_unsync()))
    }
}

fn parse_target(target: &str) -> Result<Authority, BackupError> {
    let error = |reason| BackupError::Target {
        target: target.to_owned(),
        reason,
    };
    let rest = if let Some(rest) = target.strip_prefix("http://") {
        rest
    } else if target.contains("://") {
        return Err(error(
            "only direct host:port (or http://host:port) targets can be backups",
        ));
    } else {
        target
    };
    let rest = rest.trim_end_matches('/');
    let authority: Authority = rest.parse().map_err(|_| error("not a host:port"))?;
    if authority.port_u16().is_none() || authority.as_str().contains('@') {
        return Err(error("not a host:port"));
    }
    Ok(authority)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(target: &str) -> configs::Backend {
        configs::Backend {
            target: target.into(),
            ..Default::default()
        }
    }

    #[test]
    fn targets_must_be_direct_http() {
        assert!(
            BackupClient::new(&[backend("127.0.0.1:8001"), backend("http://localhost:9/")]).is_ok()
        );
        assert_eq!(BackupClient::new(&[]).err().map(|e| e.0), Some(0));
        let (index, err) =
            BackupClient::new(&[backend("127.0.0.1:1"), backend("discovery:///svc")])
                .err()
                .expect("discovery target rejected");
        assert_eq!(index, 1);
        assert!(err.to_string().contains("direct host:port"), "{err}");
        assert!(BackupClient::new(&[backend("no-port")]).is_err());
        assert!(BackupClient::new(&[backend("https://secure:443")]).is_err());
    }
}

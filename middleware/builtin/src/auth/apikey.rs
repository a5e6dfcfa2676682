//! API key validation.
//!
//! Keys are kept as SHA-256 digests and a presented key is compared, in constant time,
//! against every one of them (no early exit), so neither the matching key nor its length
//! leaks through timing.

use http::Request;
use http::header::HeaderName;
use sha2::{Digest, Sha256};
use subtle::{Choice, ConstantTimeEq};

use super::options::ApiKeyOptions;
use super::{query_param, remove_query_param};
use middleware::Body;

/// Why a key was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ApiKeyError {
    /// No key in the request.
    #[error("no API key")]
    Missing,
    /// A key that is not one of the configured keys.
    #[error("invalid API key")]
    Invalid,
}

/// An API key validator built from [`ApiKeyOptions`].
pub struct ApiKeyValidator {
    digests: Vec<[u8; 32]>,
    header: HeaderName,
    query: String,
    strip_credential: bool,
}

impl ApiKeyValidator {
    /// Checks the options and loads the keys (reading `keysFile` now). Errors are
    /// `(field below apikey., message)`.
    pub fn new(options: &ApiKeyOptions) -> Result<Self, (String, String)> {
        let mut keys: Vec<String> = options
            .keys
            .iter()
            .map(|key| key.trim().to_owned())
            .collect();
        if let Some(index) = keys.iter().position(String::is_empty) {
            return Err((format!("keys[{index}]"), "must not be empty".into()));
        }
        if let Some(path) = &options.keys_file {
            let text = std::fs::read_to_string(path)
                .map_err(|err| ("keysFile".to_owned(), format!("cannot read {path}: {err}")))?;
            keys.extend(
                text.lines()
                    .map(str::trim)
                    .filter(|line| !line.is_empty() && !line.starts_with('#'))
                    .map(str::to_owned),
            );
        }
        if keys.is_empty() {
            return Err((
                "keys".into(),
                "no keys configured (set keys or keysFile)".into(),
            ));
        }
        let header = HeaderName::try_from(options.header.as_str()).map_err(|_| {
            (
                "header".to_owned(),
                format!("invalid header name {:?}", options.header),
            )
        })?;
        Ok(Self {
            digests: keys.iter().map(|key| digest(key.as_bytes())).collect(),
            header,
            query: options.query.clone(),
            strip_credential: options.strip_credential,
        })
    }

    /// Checks the request's key.
    pub fn authenticate(&self, request: &Request<Body>) -> Result<(), ApiKeyError> {
        let presented = request
            .headers()
            .get(&self.header)
            .map(|value| value.as_bytes().to_vec())
            .or_else(|| {
                (!self.query.is_empty())
                    .then(|| query_param(request.uri(), &self.query))
                    .flatten()
                    .map(String::into_bytes)
            })
            .filter(|key| !key.is_empty())
            .ok_or(ApiKeyError::Missing)?;
        if self.matches(&presented) {
            Ok(())
        } else {
            Err(ApiKeyError::Invalid)
        }
    }

    /// Whether `presented` is one of the keys (constant time in the key compared).
    pub fn matches(&self, presented: &[u8]) -> bool {
        let presented = digest(presented.trim_ascii());
        let found = self
            .digests
            .iter()
            .fold(Choice::from(0), |found, key| found | key.ct_eq(&presented));
        found.into()
    }

    /// Removes the key from the request when `stripCredential` is set.
    pub fn strip(&self, request: &mut Request<Body>) {
        if !self.strip_credential {
            return;
        }
        request.headers_mut().remove(&self.header);
        if !self.query.is_empty() {
            if let Some(uri) = remove_query_param(request.uri(), &self.query) {
                *request.uri_mut() = uri;
            }
        }
    }
}

fn digest(key: &[u8]) -> [u8; 32] {
    Sha256::digest(key).into()
}

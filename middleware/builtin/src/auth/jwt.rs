//! Bearer JWT validation with `jsonwebtoken` (RustCrypto backend: pure Rust, no cmake).
//! Only public-key verification is done here, so the `rsa` crate's timing advisory
//! (RUSTSEC-2023-0071, private-key operations) does not apply.
//!
//! The accepted algorithms come from the key, never from the token: a token whose `alg`
//! belongs to another key family (the "alg confusion" attack) is rejected. `exp` is
//! required; `exp` and `nbf` are checked with `leeway`; `iss` and `aud` when configured.

use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;

use http::header::{AUTHORIZATION, HeaderName, HeaderValue};
use http::{HeaderMap, Request};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{JwkSet, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};

use super::options::JwtOptions;
use super::{query_param, remove_query_param};
use middleware::Body;

/// Claims of a validated token.
pub type Claims = Map<String, Value>;

/// Why a token was not accepted; the text goes into `error_description`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    /// No token in the request.
    #[error("no token")]
    Missing,
    /// The token was present but not valid.
    #[error("{0}")]
    Invalid(&'static str),
}

/// A key with the validation rules that go with it.
#[derive(Clone)]
struct VerifyKey {
    key: DecodingKey,
    validation: Validation,
}

enum Keys {
    Single(VerifyKey),
    Jwks {
        by_kid: HashMap<String, VerifyKey>,
        only: Option<VerifyKey>,
    },
}

/// A JWT validator built from [`JwtOptions`].
pub struct JwtValidator {
    keys: Keys,
    header: HeaderName,
    bearer_required: bool,
    query: String,
    forward_claims: Vec<(String, HeaderName)>,
    strip_credential: bool,
}

/// A build error: the option field (below `jwt.`) and the message.
pub type FieldError = (String, String);

fn field_error(field: &str, message: impl Into<String>) -> FieldError {
    (field.to_owned(), message.into())
}

impl JwtValidator {
    /// Checks the options and loads the key (reading files now).
    pub fn new(options: &JwtOptions) -> Result<Self, FieldError> {
        let sources = [
            ("secret", options.secret.is_some()),
            ("secretFile", options.secret_file.is_some()),
            ("publicKey", options.public_key.is_some()),
            ("publicKeyFile", options.public_key_file.is_some()),
            ("jwksFile", options.jwks_file.is_some()),
        ];
        let set: Vec<&str> = sources
            .iter()
            .filter(|(_, set)| *set)
            .map(|(name, _)| *name)
            .collect();
        match set.len() {
            0 => {
                return Err(field_error(
                    "secret",
                    "set one key source: secret, secretFile, publicKey, publicKeyFile or jwksFile",
                ));
            }
            1 => {}
            _ => {
                return Err(field_error(
                    set[1],
                    format!("set only one key source (also set: {})", set[0]),
                ));
            }
        }
        let algorithms = options
            .algorithms
            .iter()
            .enumerate()
            .map(|(index, name)| {
                Algorithm::from_str(name).map_err(|_| {
                    field_error(
                        &format!("algorithms[{index}]"),
                        format!("unknown algorithm {name:?}"),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let rules = Rules {
            options,
            algorithms: &algorithms,
        };
        let keys = if let Some(secret) = &options.secret {
            if secret.is_empty() {
                return Err(field_error("secret", "must not be empty"));
            }
            Keys::Single(rules.key(DecodingKey::from_secret(secret.as_bytes()), "secret")?)
        } else if let Some(path) = &options.secret_file {
            let secret = read_file(path, "secretFile")?;
            let secret = secret.trim();
            if secret.is_empty() {
                return Err(field_error(
                    "secretFile",
                    format!("{path}: the file is empty"),
                ));
            }
            Keys::Single(rules.key(DecodingKey::from_secret(secret.as_bytes()), "secretFile")?)
        } else if let Some(pem) = &options.public_key {
            Keys::Single(rules.key(
                pem_key(pem).map_err(|err| field_error("publicKey", err))?,
                "publicKey",
            )?)
        } else if let Some(path) = &options.public_key_file {
            let pem = read_file(path, "publicKeyFile")?;
            let key = pem_key(&pem)
                .map_err(|err| field_error("publicKeyFile", format!("{path}: {err}")))?;
            Keys::Single(rules.key(key, "publicKeyFile")?)
        } else if let Some(path) = &options.jwks_file {
            jwks_keys(path, &rules)?
        } else {
            return Err(field_error("secret", "no key source"));
        };
        let header = HeaderName::try_from(options.header.as_str()).map_err(|_| {
            field_error(
                "header",
                format!("invalid header name {:?}", options.header),
            )
        })?;
        let forward_claims = options
            .forward_claims
            .iter()
            .map(|(claim, header)| {
                HeaderName::try_from(header.as_str())
                    .map(|name| (claim.clone(), name))
                    .map_err(|_| {
                        field_error(
                            &format!("forwardClaims.{claim}"),
                            format!("invalid header name {header:?}"),
                        )
                    })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            keys,
            bearer_required: header == AUTHORIZATION,
            header,
            query: options.query.clone(),
            forward_claims,
            strip_credential: options.strip_credential,
        })
    }

    /// Removes client-sent headers that forwarded claims would fill (they must not be
    /// spoofable).
    pub fn clear_claim_headers(&self, headers: &mut HeaderMap) {
        for (_, header) in &self.forward_claims {
            headers.remove(header);
        }
    }

    /// Validates the request's token and returns its claims.
    pub fn authenticate(&self, request: &Request<Body>) -> Result<Claims, JwtError> {
        let token = self.token(request).ok_or(JwtError::Missing)?;
        let header = jsonwebtoken::decode_header(&token)
            .map_err(|_| JwtError::Invalid("malformed token"))?;
        let key = match &self.keys {
            Keys::Single(key) => key,
            Keys::Jwks { by_kid, only } => match header.kid.as_deref() {
                Some(kid) => by_kid.get(kid).ok_or(JwtError::Invalid("unknown key id"))?,
                None => only
                    .as_ref()
                    .ok_or(JwtError::Invalid("token has no key id"))?,
            },
        };
        jsonwebtoken::decode::<Claims>(&token, &key.key, &key.validation)
            .map(|data| data.claims)
            .map_err(|err| JwtError::Invalid(describe(err.kind())))
    }

    /// Sets the forwarded-claim headers from `claims`.
    pub fn forward(&self, claims: &Claims, headers: &mut HeaderMap) {
        for (claim, header) in &self.forward_claims {
            let Some(value) = claim_value(claims, claim) else {
                continue;
            };
            let text = match value {
                Value::String(text) => text.clone(),
                Value::Array(items) if items.iter().all(Value::is_string) => items
                    .iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(","),
                other => other.to_string(),
            };
            match HeaderValue::try_from(text) {
                Ok(value) => {
                    headers.insert(header.clone(), value);
                }
                Err(_) => tracing::debug!(
                    claim,
                    "jwt: claim value cannot be a header value; not forwarded"
                ),
            }
        }
    }

    /// Removes the token from the request when `stripCredential` is set.
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

    fn token(&self, request: &Request<Body>) -> Option<String> {
        let from_header = request
            .headers()
            .get(&self.header)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| {
                let value = value.trim();
                let token = match value.split_once(' ') {
                    Some((scheme, rest)) if scheme.eq_ignore_ascii_case("bearer") => rest.trim(),
                    _ if self.bearer_required => return None,
                    _ => value,
                };
                (!token.is_empty()).then(|| token.to_owned())
            });
        from_header.or_else(|| {
            if self.query.is_empty() {
                return None;
            }
            query_param(request.uri(), &self.query).filter(|token| !token.is_empty())
        })
    }
}

struct Rules<'a> {
    options: &'a JwtOptions,
    algorithms: &'a [Algorithm],
}

impl Rules<'_> {
    /// The validation for `key`: the configured algorithms of its family (all of the family
    /// by default).
    fn key(&self, key: DecodingKey, field: &str) -> Result<VerifyKey, FieldError> {
        let family = key.family();
        let family = family.algorithms();
        let algorithms: Vec<Algorithm> = if self.algorithms.is_empty() {
            family.to_vec()
        } else {
            self.algorithms
                .iter()
                .copied()
                .filter(|alg| family.contains(alg))
                .collect()
        };
        if algorithms.is_empty() {
            return Err(field_error(
                "algorithms",
                format!(
                    "none of the listed algorithms fits the key given in {field} ({:?})",
                    key.family()
                ),
            ));
        }
        let mut validation = Validation::new(algorithms[0]);
        validation.algorithms = algorithms;
        validation.leeway = self.options.leeway.as_secs();
        validation.validate_nbf = true;
        validation.validate_aud = !self.options.audience.is_empty();
        if !self.options.audience.is_empty() {
            validation.set_audience(&self.options.audience);
        }
        if !self.options.issuer.is_empty() {
            validation.set_issuer(&self.options.issuer);
        }
        Ok(VerifyKey { key, validation })
    }
}

fn read_file(path: &str, field: &str) -> Result<String, FieldError> {
    std::fs::read_to_string(Path::new(path))
        .map_err(|err| field_error(field, format!("cannot read {path}: {err}")))
}

/// A public key from PEM text: RSA (PKCS#1 or SPKI), EC or Ed25519 (SPKI).
fn pem_key(pem: &str) -> Result<DecodingKey, String> {
    if pem.contains("PRIVATE KEY") {
        return Err("a private key was given: give the public key".into());
    }
    if !pem.contains("-----BEGIN") {
        return Err("not PEM text (expected -----BEGIN PUBLIC KEY-----)".into());
    }
    let bytes = pem.as_bytes();
    DecodingKey::from_rsa_pem(bytes)
        .or_else(|_| DecodingKey::from_ec_pem(bytes))
        .or_else(|_| DecodingKey::from_ed_pem(bytes))
        .map_err(|err| format!("not an RSA, EC or Ed25519 public key in PEM: {err}"))
}

fn jwks_keys(path: &str, rules: &Rules<'_>) -> Result<Keys, FieldError> {
    let text = read_file(path, "jwksFile")?;
    let set: JwkSet = serde_json::from_str(&text)
        .map_err(|err| field_error("jwksFile", format!("{path}: not a JWKS: {err}")))?;
    let mut keys = Vec::new();
    for (index, jwk) in set.keys.iter().enumerate() {
        if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
            continue;
        }
        let key = DecodingKey::from_jwk(jwk)
            .map_err(|err| field_error("jwksFile", format!("{path}: keys[{index}]: {err}")))?;
        let mut verify = rules.key(key, "jwksFile")?;
        if let Some(alg) = jwk.common.key_algorithm {
            // A key that names its algorithm is used with that algorithm only.
            match Algorithm::from_str(&alg.to_string()) {
                Ok(alg) if verify.validation.algorithms.contains(&alg) => {
                    verify.validation.algorithms = vec![alg]
                }
                _ => continue,
            }
        }
        keys.push((jwk.common.key_id.clone(), verify));
    }
    if keys.is_empty() {
        return Err(field_error(
            "jwksFile",
            format!("{path}: no usable signing key"),
        ));
    }
    // A token without `kid` is accepted only when the set holds a single key.
    let only = (keys.len() == 1).then(|| keys[0].1.clone());
    let by_kid = keys
        .into_iter()
        .filter_map(|(kid, key)| kid.map(|kid| (kid, key)))
        .collect();
    Ok(Keys::Jwks { by_kid, only })
}

fn claim_value<'a>(claims: &'a Claims, claim: &str) -> Option<&'a Value> {
    if let Some(value) = claims.get(claim) {
        return Some(value);
    }
    let mut parts = claim.split('.');
    let mut value = claims.get(parts.next()?)?;
    for part in parts {
        value = value.as_object()?.get(part)?;
    }
    Some(value)
}

fn describe(kind: &ErrorKind) -> &'static str {
    match kind {
        ErrorKind::ExpiredSignature => "token expired",
        ErrorKind::ImmatureSignature => "token not yet valid",
        ErrorKind::InvalidSignature => "invalid signature",
        ErrorKind::InvalidIssuer => "invalid issuer",
        ErrorKind::InvalidAudience => "invalid audience",
        ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => "algorithm not accepted",
        ErrorKind::MissingRequiredClaim(_) => "missing required claim",
        ErrorKind::InvalidClaimFormat(_) => "invalid claim",
        _ => "malformed token",
    }
}

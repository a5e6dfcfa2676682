//! Building middlewares by name from the config.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use http::{Request, Response};
use serde::de::DeserializeOwned;
use tower::util::BoxCloneSyncService;
use tower::{Layer, Service};

use crate::denials::{DenialCounter, Denials, LocalDenials};
use crate::{Body, BoxError, EndpointInfo, RoundTripper};

/// A middleware failed to build; the whole config update fails with this message.
#[derive(Debug, Clone, thiserror::Error)]
#[error("middleware {name}: {message}")]
pub struct BuildError {
    /// The middleware's configured name.
    pub name: String,
    /// What was wrong (names the option field where there is one).
    pub message: String,
}

impl BuildError {
    /// An error for middleware `name`.
    pub fn new(name: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            message: message.into(),
        }
    }
}

type WrapFn = dyn Fn(RoundTripper) -> RoundTripper + Send + Sync;
type CloseFn = Box<dyn FnOnce() + Send>;

/// What a middleware declares about itself, so the proxy never has to know it by name.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// It writes an access line per attempt (the proxy then skips its own per-request line).
    pub access_log: bool,
    /// It answers CORS preflights (`OPTIONS` with `Access-Control-Request-Method`), so the
    /// router sends a preflight for method M on a path to the endpoint serving M there.
    pub answers_preflight: bool,
}

/// A built middleware: wraps the next RoundTripper; closed when its router is retired.
pub struct Middleware {
    name: String,
    wrap: Arc<WrapFn>,
    closer: Mutex<Option<CloseFn>>,
    capabilities: Capabilities,
}

impl Middleware {
    /// A middleware from a tower `Layer` over the RoundTripper.
    pub fn from_layer<L>(name: impl Into<String>, layer: L) -> Self
    where
        L: Layer<RoundTripper> + Send + Sync + 'static,
        L::Service: Service<Request<Body>, Response = Response<Body>, Error = BoxError>
            + Clone
            + Send
            + Sync
            + 'static,
        <L::Service as Service<Request<Body>>>::Future: Send + 'static,
    {
        Self::from_fn(name, move |next| {
            BoxCloneSyncService::new(layer.layer(next))
        })
    }

    /// A middleware from a plain wrapping function.
    pub fn from_fn(
        name: impl Into<String>,
        wrap: impl Fn(RoundTripper) -> RoundTripper + Send + Sync + 'static,
    ) -> Self {
        Self {
            name: name.into(),
            wrap: Arc::new(wrap),
            closer: Mutex::new(None),
            capabilities: Capabilities::default(),
        }
    }

    /// Declares what the middleware does that the proxy must know about.
    pub fn with_capabilities(mut self, capabilities: Capabilities) -> Self {
        self.capabilities = capabilities;
        self
    }

    /// What the middleware declared.
    pub fn capabilities(&self) -> Capabilities {
        self.capabilities
    }

    /// Runs `closer` when the middleware is closed (e.g. to stop a background task).
    pub fn with_closer(self, closer: impl FnOnce() + Send + 'static) -> Self {
        if let Ok(mut slot) = self.closer.lock() {
            *slot = Some(Box::new(closer));
        }
        self
    }

    /// The configured name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Wraps `next`.
    pub fn wrap(&self, next: RoundTripper) -> RoundTripper {
        (self.wrap)(next)
    }

    /// Releases what the middleware holds; runs at most once.
    pub fn close(&self) {
        let closer = self.closer.lock().ok().and_then(|mut slot| slot.take());
        if let Some(closer) = closer {
            closer();
        }
    }
}

/// What a factory may use while building a middleware for one endpoint.
#[derive(Clone)]
pub struct BuildContext {
    /// The endpoint the middleware wraps (global middlewares are built once per endpoint).
    pub endpoint: Arc<EndpointInfo>,
    /// Where refused requests are counted.
    pub denials: Arc<dyn Denials>,
    /// The gateway-wide Redis DSN (`--redis`): the default of every middleware option
    /// `redis`. `None` when the flag is not given.
    pub redis: Option<Arc<str>>,
}

impl BuildContext {
    /// A context for `endpoint` that counts denials in memory.
    pub fn new(endpoint: Arc<EndpointInfo>) -> Self {
        Self {
            endpoint,
            denials: Arc::new(LocalDenials::default()),
            redis: None,
        }
    }

    /// Sets the gateway-wide Redis DSN (the default of middleware options `redis`).
    pub fn with_redis(mut self, dsn: Option<Arc<str>>) -> Self {
        self.redis = dsn;
        self
    }

    /// Counts denials in `denials` instead.
    pub fn with_denials(mut self, denials: Arc<dyn Denials>) -> Self {
        self.denials = denials;
        self
    }

    /// The denial counter of middleware `name` on this endpoint, for `reason`.
    pub fn denial_counter(&self, name: &str, reason: &str) -> DenialCounter {
        self.denials.counter(name, &self.endpoint.path, reason)
    }
}

/// Builds a middleware from its config entry.
pub trait Factory: Send + Sync {
    /// Builds the middleware or says which option is wrong.
    fn build(
        &self,
        config: &configs::Middleware,
        ctx: &BuildContext,
    ) -> Result<Middleware, BuildError>;
}

impl<F> Factory for F
where
    F: Fn(&configs::Middleware, &BuildContext) -> Result<Middleware, BuildError> + Send + Sync,
{
    fn build(
        &self,
        config: &configs::Middleware,
        ctx: &BuildContext,
    ) -> Result<Middleware, BuildError> {
        self(config, ctx)
    }
}

/// Middleware factories by name. Names match case-insensitively, as in Kratos (`CORS`,
/// `Cors` and `cors` are one middleware).
#[derive(Clone, Default)]
pub struct Registry {
    factories: HashMap<String, Arc<dyn Factory>>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers (or replaces) the factory for `name`.
    pub fn register(&mut self, name: impl Into<String>, factory: impl Factory + 'static) {
        self.factories
            .insert(name.into().to_ascii_lowercase(), Arc::new(factory));
    }

    /// Whether a factory is registered for `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.factories.contains_key(&name.to_ascii_lowercase())
    }

    /// Builds the middleware named in `config`. An unknown name yields `Ok(None)` (the caller
    /// logs and skips it) unless the entry is `required`, which is an error.
    pub fn build(
        &self,
        config: &configs::Middleware,
        ctx: &BuildContext,
    ) -> Result<Option<Middleware>, BuildError> {
        match self.factories.get(&config.name.to_ascii_lowercase()) {
            Some(factory) => factory.build(config, ctx).map(Some),
            None if config.required => Err(BuildError::new(
                &config.name,
                "required middleware is not registered",
            )),
            None => Ok(None),
        }
    }
}

/// Decodes `config.options` into `T` (ignoring a protobuf `'@type'` key; absent options
/// give `T::default()`). Errors name the middleware and the option field, e.g.
/// `middleware ratelimit: options.burst: invalid type: string "x", expected a number`.
pub fn options<T: DeserializeOwned + Default>(
    config: &configs::Middleware,
) -> Result<T, BuildError> {
    let mut value = config.options.clone();
    if let serde_json::Value::Object(map) = &mut value {
        map.remove("@type");
    }
    if value.is_null() {
        return Ok(T::default());
    }
    serde_path_to_error::deserialize(value).map_err(|err| {
        let path = err.path().to_string();
        let field = if path == "." {
            "options".to_owned()
        } else {
            format!("options.{path}")
        };
        BuildError::new(&config.name, format!("{field}: {}", err.inner()))
    })
}

//! [`CacheLayer`]: wraps a service in a [`Cache`].

use std::sync::Arc;

use tower::Layer;

use super::{Cache, Shared};

/// A tower `Layer` applying one response cache (shared by every service it wraps).
#[derive(Clone)]
pub struct CacheLayer {
    shared: Arc<Shared>,
}

impl CacheLayer {
    pub(super) fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }
}

impl<S> Layer<S> for CacheLayer {
    type Service = Cache<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Cache {
            inner,
            shared: self.shared.clone(),
        }
    }
}

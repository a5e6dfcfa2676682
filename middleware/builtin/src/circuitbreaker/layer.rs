//! [`CircuitBreakerLayer`]: wraps a service in a [`CircuitBreaker`].

use std::sync::Arc;

use tower::Layer;

use super::{Breaker, CircuitBreaker};

/// A tower `Layer` applying one breaker (its state is shared by every service it wraps).
#[derive(Clone)]
pub struct CircuitBreakerLayer {
    breaker: Arc<Breaker>,
}

impl CircuitBreakerLayer {
    pub(super) fn new(breaker: Arc<Breaker>) -> Self {
        Self { breaker }
    }
}

impl<S> Layer<S> for CircuitBreakerLayer {
    type Service = CircuitBreaker<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CircuitBreaker {
            inner,
            breaker: self.breaker.clone(),
        }
    }
}

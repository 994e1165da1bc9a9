use super::{Breaker, CircuitBreaker, CircuitBreakerConfig, CircuitBreakerHandle};
use crate::classify::ErrorsAreFailures;
use std::fmt;
use std::sync::Arc;
use tower_layer::Layer;

/// Wraps services in one shared [`CircuitBreaker`].
///
/// The layer owns one breaker: every service it wraps (and every clone of those) shares its state,
/// which is what you want when the layer guards one downstream dependency. Use one layer per
/// dependency, or a [`CircuitBreakerRegistry`](super::CircuitBreakerRegistry).
///
/// ```
/// use palisade::circuit_breaker::{CircuitBreakerConfig, CircuitBreakerLayer};
/// use palisade::classify::Outcome;
/// use std::time::Duration;
///
/// // Count only server errors; a "not found" is an answer, not an outage.
/// let layer = CircuitBreakerLayer::new(CircuitBreakerConfig::new("catalog").max_failures(3))
///     .with_classifier(|result: &Result<Option<String>, std::io::Error>| match result {
///         Ok(_) => Outcome::Success,
///         Err(e) if e.kind() == std::io::ErrorKind::NotFound => Outcome::Ignored,
///         Err(_) => Outcome::Failure,
///     });
/// # let _ = layer;
/// ```
#[must_use = "a layer does nothing until it wraps a service"]
pub struct CircuitBreakerLayer<C = ErrorsAreFailures> {
    breaker: Arc<Breaker>,
    classifier: C,
}

impl CircuitBreakerLayer {
    /// A layer holding a new breaker configured by `config`.
    pub fn new(config: CircuitBreakerConfig) -> Self {
        CircuitBreakerLayer {
            breaker: Breaker::new(config),
            classifier: ErrorsAreFailures,
        }
    }
}

impl<C> CircuitBreakerLayer<C> {
    /// The same breaker with another [classifier](crate::classify::Classify).
    pub fn with_classifier<C2>(self, classifier: C2) -> CircuitBreakerLayer<C2> {
        CircuitBreakerLayer {
            breaker: self.breaker,
            classifier,
        }
    }

    /// A handle to observe and control the breaker.
    pub fn handle(&self) -> CircuitBreakerHandle {
        CircuitBreakerHandle::new(Arc::clone(&self.breaker))
    }
}

impl<C: Clone> Clone for CircuitBreakerLayer<C> {
    fn clone(&self) -> Self {
        CircuitBreakerLayer {
            breaker: Arc::clone(&self.breaker),
            classifier: self.classifier.clone(),
        }
    }
}

impl<C> fmt::Debug for CircuitBreakerLayer<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreakerLayer")
            .field("name", &self.breaker.name)
            .finish_non_exhaustive()
    }
}

impl<S, C: Clone> Layer<S> for CircuitBreakerLayer<C> {
    type Service = CircuitBreaker<S, C>;

    fn layer(&self, inner: S) -> Self::Service {
        CircuitBreaker::new(inner, Arc::clone(&self.breaker), self.classifier.clone())
    }
}

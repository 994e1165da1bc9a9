use super::{CircuitBreakerConfig, CircuitBreakerHandle, CircuitBreakerLayer};
use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};

/// Breakers by name, stamped out from one configuration template: one breaker per downstream
/// service, or per message pattern. A registry keeps each breaker until it is
/// [removed](Self::remove); names made per tenant or per host should be removed when done.
///
/// ```
/// use palisade::circuit_breaker::{CircuitBreakerConfig, CircuitBreakerRegistry};
///
/// let registry = CircuitBreakerRegistry::new(CircuitBreakerConfig::new("template").max_failures(3));
/// let users = registry.layer("get-user");
/// let same = registry.layer("get-user");   // shares state with `users`
/// let orders = registry.layer("create-order");
/// assert_eq!(registry.handles().len(), 2);
/// # let _ = (users, same, orders);
/// ```
#[derive(Clone)]
pub struct CircuitBreakerRegistry {
    template: CircuitBreakerConfig,
    breakers: Arc<Mutex<HashMap<String, CircuitBreakerLayer>>>,
}

impl CircuitBreakerRegistry {
    /// A registry whose breakers are configured like `template` (under their own names).
    pub fn new(template: CircuitBreakerConfig) -> Self {
        CircuitBreakerRegistry {
            template,
            breakers: Arc::default(),
        }
    }

    /// The layer for `name`, created from the template on first use.
    pub fn layer(&self, name: &str) -> CircuitBreakerLayer {
        let mut breakers = self
            .breakers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        breakers
            .entry(name.to_owned())
            .or_insert_with(|| CircuitBreakerLayer::new(self.template.clone().with_name(name)))
            .clone()
    }

    /// Forgets the breaker for `name` (say, a tenant that left) and returns its layer. Its state
    /// and name are freed once the services built from it are dropped too.
    pub fn remove(&self, name: &str) -> Option<CircuitBreakerLayer> {
        self.breakers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .remove(name)
    }

    /// The handle of the breaker for `name`, if it exists.
    pub fn handle(&self, name: &str) -> Option<CircuitBreakerHandle> {
        let breakers = self
            .breakers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        breakers.get(name).map(CircuitBreakerLayer::handle)
    }

    /// Handles of all breakers created so far, sorted by name.
    pub fn handles(&self) -> Vec<CircuitBreakerHandle> {
        let breakers = self
            .breakers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut handles: Vec<_> = breakers.values().map(CircuitBreakerLayer::handle).collect();
        handles.sort_by(|a, b| a.name().cmp(b.name()));
        handles
    }
}

impl fmt::Debug for CircuitBreakerRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreakerRegistry")
            .field("breakers", &self.handles())
            .finish()
    }
}

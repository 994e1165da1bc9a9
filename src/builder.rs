//! Stacking the layers: an extension trait on [`tower::ServiceBuilder`] and a preset that puts
//! deadline, retry, circuit breaker and attempt timeout in the right order.
//!
//! tower's `ServiceBuilder` already has inherent `.retry(policy)` and `.timeout(duration)` methods,
//! and an inherent method always wins over a trait method of the same name. So palisade's methods
//! have names of their own: [`circuit_breaker`](ServiceBuilderExt::circuit_breaker),
//! [`retry_with`](ServiceBuilderExt::retry_with), [`attempt_timeout`](ServiceBuilderExt::attempt_timeout),
//! [`typed_timeout`](ServiceBuilderExt::typed_timeout), [`deadline`](ServiceBuilderExt::deadline),
//! [`fault`](ServiceBuilderExt::fault), [`fallback`](ServiceBuilderExt::fallback) and
//! [`resilience`](ServiceBuilderExt::resilience).
//! (tower's own `.retry(RetryPolicy::new(3))` works as well: a [`RetryPolicy`] is a tower policy.)
//!
//! They compose with tower's own middleware — `ConcurrencyLimit`, `RateLimit`, `LoadShed`,
//! `Buffer` — rather than replacing them:
//!
//! ```
//! use palisade::builder::ServiceBuilderExt;
//! use palisade::circuit_breaker::CircuitBreakerConfig;
//! use std::time::Duration;
//! use tower::{BoxError, Service, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), BoxError> {
//! let mut service = ServiceBuilder::new()
//!     .map_err(BoxError::from)                 // tower's LoadShed and Buffer speak BoxError
//!     .buffer(64)                              // shareable across tasks
//!     .load_shed()                             // shed load instead of queueing forever
//!     .concurrency_limit(16)                   // at most 16 calls in flight
//!     .circuit_breaker(CircuitBreakerConfig::new("pricing").max_failures(5))
//!     .typed_timeout(Duration::from_secs(1))
//!     .service_fn(|sku: u32| async move { Ok::<_, BoxError>(sku * 100) });
//! assert_eq!(service.ready().await?.call(3).await?, 300);
//! # Ok(()) }
//! ```

use crate::circuit_breaker::{
    CircuitBreaker, CircuitBreakerConfig, CircuitBreakerHandle, CircuitBreakerLayer,
};
use crate::classify::ErrorsAreFailures;
use crate::fallback::FallbackLayer;
use crate::fault::FaultLayer;
use crate::retry::{Retry, RetryLayer, RetryPolicy, TransientErrors};
use crate::timeout::{DeadlineLayer, EnforceDeadline, RequestDeadline, Timeout, TimeoutLayer};
use std::fmt;
use std::time::Duration;
use tower::ServiceBuilder;
use tower::layer::util::Stack;
use tower_layer::Layer;

/// palisade's layers as [`ServiceBuilder`] methods. See the [module docs](self).
pub trait ServiceBuilderExt<L>: Sized {
    /// Adds a circuit breaker configured by `config`.
    fn circuit_breaker(
        self,
        config: CircuitBreakerConfig,
    ) -> ServiceBuilder<Stack<CircuitBreakerLayer, L>>;

    /// Adds retry with `policy` (palisade's [`Retry`] service; tower's inherent `.retry(policy)`
    /// works too). A policy other than [`RetryPolicy`] says which
    /// results are final through [`FinalResult`](crate::retry::FinalResult), or goes in
    /// [`AnyPolicy`](crate::retry::AnyPolicy).
    fn retry_with<P>(self, policy: P) -> ServiceBuilder<Stack<RetryLayer<P>, L>>;

    /// Adds a per-attempt timeout that also stops at the request's deadline:
    /// `min(timeout, time left)`. Requests must be [`HasDeadline`](crate::timeout::HasDeadline).
    fn attempt_timeout(
        self,
        timeout: Duration,
    ) -> ServiceBuilder<Stack<TimeoutLayer<RequestDeadline>, L>>;

    /// Adds a timeout for any request type, failing through the service's own error type
    /// (`From<Elapsed>`), unlike tower's `.timeout()` which forces `BoxError`. It also stops at
    /// the deadline of an enclosing [`deadline`](Self::deadline) layer.
    fn typed_timeout(self, timeout: Duration) -> ServiceBuilder<Stack<TimeoutLayer, L>>;

    /// Gives each request a deadline `budget` from now (or keeps an earlier one) and enforces it.
    fn deadline(self, budget: Duration) -> ServiceBuilder<Stack<DeadlineLayer, L>>;

    /// Adds fault injection.
    fn fault(self, layer: FaultLayer) -> ServiceBuilder<Stack<FaultLayer, L>>;

    /// Answers failed calls with `fallback(error)`; see [`FallbackLayer`].
    fn fallback<F>(self, fallback: F) -> ServiceBuilder<Stack<FallbackLayer<F>, L>>;

    /// Adds the whole [`Resilience`] preset.
    fn resilience<P, C>(
        self,
        preset: Resilience<P, C>,
    ) -> ServiceBuilder<Stack<Resilience<P, C>, L>>;
}

impl<L> ServiceBuilderExt<L> for ServiceBuilder<L> {
    fn circuit_breaker(
        self,
        config: CircuitBreakerConfig,
    ) -> ServiceBuilder<Stack<CircuitBreakerLayer, L>> {
        self.layer(CircuitBreakerLayer::new(config))
    }

    fn retry_with<P>(self, policy: P) -> ServiceBuilder<Stack<RetryLayer<P>, L>> {
        self.layer(RetryLayer::new(policy))
    }

    fn attempt_timeout(
        self,
        timeout: Duration,
    ) -> ServiceBuilder<Stack<TimeoutLayer<RequestDeadline>, L>> {
        self.layer(TimeoutLayer::new(timeout).honor_deadline())
    }

    fn typed_timeout(self, timeout: Duration) -> ServiceBuilder<Stack<TimeoutLayer, L>> {
        self.layer(TimeoutLayer::new(timeout))
    }

    fn deadline(self, budget: Duration) -> ServiceBuilder<Stack<DeadlineLayer, L>> {
        self.layer(DeadlineLayer::new(budget))
    }

    fn fault(self, layer: FaultLayer) -> ServiceBuilder<Stack<FaultLayer, L>> {
        self.layer(layer)
    }

    fn fallback<F>(self, fallback: F) -> ServiceBuilder<Stack<FallbackLayer<F>, L>> {
        self.layer(FallbackLayer::new(fallback))
    }

    fn resilience<P, C>(
        self,
        preset: Resilience<P, C>,
    ) -> ServiceBuilder<Stack<Resilience<P, C>, L>> {
        self.layer(preset)
    }
}

/// The standard resilience stack in one layer. Outermost first:
///
/// 1. **deadline** — the caller's total budget, set on the request and enforced around everything
///    below, backoff sleeps included;
/// 2. **retry** — outside the breaker so that *every attempt* is seen and counted by the breaker,
///    and so that a [`CircuitOpen`](crate::circuit_breaker::CircuitOpen) is returned at once instead
///    of being retried (see [`RetryPolicy::retry_rejections`]); it never sleeps past the deadline;
/// 3. **circuit breaker** — fails fast while the dependency is down;
/// 4. **attempt timeout** — inside the breaker so that a hung attempt *counts as a failure*, and
///    bounded by the time left so an attempt never outlives the deadline;
/// 5. the service.
///
/// Requests must be `Clone` (to retry) and [`HasDeadline`](crate::timeout::HasDeadline); the error
/// type must be `From<CircuitOpen> + From<Elapsed>` (both `BoxError` and
/// [`RpcError`](crate::rpc::RpcError) are).
///
/// ```
/// use palisade::builder::{Resilience, ServiceBuilderExt};
/// use palisade::circuit_breaker::CircuitBreakerConfig;
/// use palisade::retry::RetryPolicy;
/// use palisade::timeout::Deadlined;
/// use std::time::Duration;
/// use tower::{BoxError, Service, ServiceBuilder, ServiceExt};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), BoxError> {
/// let preset = Resilience::new(CircuitBreakerConfig::new("users").max_failures(5))
///     .deadline(Duration::from_secs(3))
///     .retry(RetryPolicy::new(3))
///     .attempt_timeout(Duration::from_millis(500));
/// let breaker = preset.breaker_handle();
/// let mut users = ServiceBuilder::new()
///     .resilience(preset)
///     .service_fn(|req: Deadlined<u32>| async move { Ok::<_, BoxError>(req.request + 1) });
/// assert_eq!(users.ready().await?.call(Deadlined::new(41)).await?, 42);
/// # let _ = breaker; Ok(()) }
/// ```
#[must_use = "a preset does nothing until it wraps a service"]
pub struct Resilience<P = TransientErrors, C = ErrorsAreFailures> {
    deadline: Duration,
    retry: RetryPolicy<P, RequestDeadline>,
    breaker: CircuitBreakerLayer<C>,
    attempt_timeout: Duration,
}

impl Resilience {
    /// The preset with a breaker configured by `breaker` and defaults for the rest: a 10 s
    /// deadline, 3 attempts ([`RetryPolicy::new`]'s backoff), a 2 s attempt timeout.
    pub fn new(breaker: CircuitBreakerConfig) -> Self {
        Resilience {
            deadline: Duration::from_secs(10),
            retry: RetryPolicy::new(3).honor_deadline(),
            breaker: CircuitBreakerLayer::new(breaker),
            attempt_timeout: Duration::from_secs(2),
        }
    }
}

impl<P, C> Resilience<P, C> {
    /// The total time a caller waits, retries included.
    pub fn deadline(mut self, budget: Duration) -> Self {
        self.deadline = budget;
        self
    }

    /// The retry policy (made to honour the deadline).
    pub fn retry<P2, D>(self, policy: RetryPolicy<P2, D>) -> Resilience<P2, C> {
        Resilience {
            deadline: self.deadline,
            retry: policy.honor_deadline(),
            breaker: self.breaker,
            attempt_timeout: self.attempt_timeout,
        }
    }

    /// The circuit breaker layer (to share one, or to give it a classifier).
    pub fn breaker<C2>(self, breaker: CircuitBreakerLayer<C2>) -> Resilience<P, C2> {
        Resilience {
            deadline: self.deadline,
            retry: self.retry,
            breaker,
            attempt_timeout: self.attempt_timeout,
        }
    }

    /// The timeout of one attempt (it never exceeds the time left before the deadline).
    pub fn attempt_timeout(mut self, timeout: Duration) -> Self {
        self.attempt_timeout = timeout;
        self
    }

    /// A handle to the preset's circuit breaker.
    pub fn breaker_handle(&self) -> CircuitBreakerHandle {
        self.breaker.handle()
    }
}

impl<P: Clone, C: Clone> Clone for Resilience<P, C> {
    fn clone(&self) -> Self {
        Resilience {
            deadline: self.deadline,
            retry: self.retry.clone(),
            breaker: self.breaker.clone(),
            attempt_timeout: self.attempt_timeout,
        }
    }
}

impl<P, C> fmt::Debug for Resilience<P, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Resilience")
            .field("deadline", &self.deadline)
            .field("retry", &self.retry)
            .field("breaker", &self.breaker)
            .field("attempt_timeout", &self.attempt_timeout)
            .finish()
    }
}

/// The service the [`Resilience`] preset builds around `S`.
pub type Resilient<S, P = TransientErrors, C = ErrorsAreFailures> = EnforceDeadline<
    Retry<CircuitBreaker<Timeout<S, RequestDeadline>, C>, RetryPolicy<P, RequestDeadline>>,
>;

impl<S, P: Clone, C: Clone> Layer<S> for Resilience<P, C> {
    type Service = Resilient<S, P, C>;

    fn layer(&self, service: S) -> Self::Service {
        let timed = TimeoutLayer::new(self.attempt_timeout)
            .honor_deadline()
            .layer(service);
        let guarded = self.breaker.layer(timed);
        let retried = Retry::new(guarded, self.retry.clone());
        DeadlineLayer::new(self.deadline).layer(retried)
    }
}

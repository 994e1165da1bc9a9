use super::{AmbientDeadline, EnforceDeadline, NoDeadline, RequestDeadline, Timeout};
use std::time::Duration;
use tower_layer::Layer;

/// Applies a [`Timeout`] to every call.
///
/// `TimeoutLayer::new(d)` times every call out after `d`, or at the deadline of an enclosing
/// [`DeadlineLayer`] if that comes first ([`AmbientDeadline`], any request type). With
/// [`honor_deadline`](Self::honor_deadline) a deadline the request itself carries counts too — the
/// per-attempt timeout of the resilience preset.
#[derive(Clone, Copy, Debug)]
#[must_use = "a layer does nothing until it wraps a service"]
pub struct TimeoutLayer<D = AmbientDeadline> {
    timeout: Duration,
    source: D,
}

impl TimeoutLayer {
    /// Times every call out after `timeout` (or at an enclosing layer's deadline, if earlier).
    pub fn new(timeout: Duration) -> Self {
        TimeoutLayer {
            timeout,
            source: AmbientDeadline,
        }
    }
}

impl<D> TimeoutLayer<D> {
    /// Also stop at the deadline the request carries if that comes first (requests must be
    /// [`HasDeadline`](super::HasDeadline)).
    pub fn honor_deadline(self) -> TimeoutLayer<RequestDeadline> {
        TimeoutLayer {
            timeout: self.timeout,
            source: RequestDeadline,
        }
    }

    /// Ignore deadlines: time calls out after the timeout alone.
    pub fn ignore_deadline(self) -> TimeoutLayer<NoDeadline> {
        TimeoutLayer {
            timeout: self.timeout,
            source: NoDeadline,
        }
    }
}

impl<S, D: Clone> Layer<S> for TimeoutLayer<D> {
    type Service = Timeout<S, D>;

    fn layer(&self, inner: S) -> Self::Service {
        Timeout::new(inner, self.timeout, self.source.clone())
    }
}

/// Gives every request a deadline and enforces it; see [`EnforceDeadline`].
///
/// `DeadlineLayer::new(budget)` sets the deadline `budget` from now, or keeps the request's own
/// deadline if that is earlier (a deadline only ever shrinks on the way down a call chain).
/// `DeadlineLayer::enforce()` only enforces a deadline the request already carries.
#[derive(Clone, Copy, Debug)]
#[must_use = "a layer does nothing until it wraps a service"]
pub struct DeadlineLayer {
    budget: Option<Duration>,
}

impl DeadlineLayer {
    /// Requests must be answered within `budget`.
    pub fn new(budget: Duration) -> Self {
        DeadlineLayer {
            budget: Some(budget),
        }
    }

    /// Enforce the deadline requests already carry; set none.
    pub fn enforce() -> Self {
        DeadlineLayer { budget: None }
    }
}

impl<S> Layer<S> for DeadlineLayer {
    type Service = EnforceDeadline<S>;

    fn layer(&self, inner: S) -> Self::Service {
        EnforceDeadline::new(inner, self.budget)
    }
}

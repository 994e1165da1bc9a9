//! Deciding what a call's result means to the resilience layers.
//!
//! Two questions come up again and again: *did the callee fail?* (a circuit breaker counts
//! failures) and *is it worth trying again, and when?* (retry). The answers live here so the
//! breaker, retry and the RPC layer agree.
//!
//! - [`Classify`] turns a whole `Result` into an [`Outcome`] for a circuit breaker. The default,
//!   [`ErrorsAreFailures`], counts every `Err`; [`FaultsOnly`] counts only errors whose
//!   [`FailureKind`] says the callee is at fault; any `Fn(&Result<T, E>) -> Outcome` works too.
//! - [`FailureKind`] describes an error: transient or not, the callee's fault or not, a fast local
//!   rejection or not. [`RetryAfter`] is the small trait for a server's or a breaker's
//!   "try again in N" hint.

use std::time::Duration;

/// What one call's result means to a circuit breaker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The callee did its job.
    Success,
    /// The callee (or the path to it) failed: this counts toward opening the circuit.
    Failure,
    /// Neither: the result says nothing about the callee's health (say, a validation error caused
    /// by the caller). An ignored half-open trial frees its slot without a verdict.
    Ignored,
}

/// Classifies a call's result into an [`Outcome`].
///
/// Implemented by [`ErrorsAreFailures`] (the default), [`FaultsOnly`], and every
/// `Fn(&Result<T, E>) -> Outcome`:
///
/// ```
/// use palisade::classify::{Classify, Outcome};
///
/// // Count only server errors (5xx-like codes) as failures.
/// let classifier = |result: &Result<u16, std::io::Error>| match result {
///     Ok(status) if *status >= 500 => Outcome::Failure,
///     Ok(_) => Outcome::Success,
///     Err(_) => Outcome::Failure,
/// };
/// assert_eq!(classifier.classify(&Ok(503)), Outcome::Failure);
/// assert_eq!(classifier.classify(&Ok(404)), Outcome::Success);
/// ```
pub trait Classify<T, E> {
    /// Decides what `result` means.
    fn classify(&self, result: &Result<T, E>) -> Outcome;
}

impl<T, E, F> Classify<T, E> for F
where
    F: Fn(&Result<T, E>) -> Outcome,
{
    #[inline]
    fn classify(&self, result: &Result<T, E>) -> Outcome {
        self(result)
    }
}

/// The default classifier: `Ok` is a success, every `Err` a failure.
#[derive(Clone, Copy, Debug, Default)]
pub struct ErrorsAreFailures;

impl<T, E> Classify<T, E> for ErrorsAreFailures {
    #[inline]
    fn classify(&self, result: &Result<T, E>) -> Outcome {
        match result {
            Ok(_) => Outcome::Success,
            Err(_) => Outcome::Failure,
        }
    }
}

/// Counts an error as a failure only when its [`FailureKind`] says the callee is at fault; other
/// errors (the caller's mistakes, local rejections) are [`Outcome::Ignored`].
///
/// This is what the messaging client uses with [`RpcError`](crate::rpc::RpcError): a `NotFound` or
/// `InvalidArgument` reply means the service is up and answering.
#[derive(Clone, Copy, Debug, Default)]
pub struct FaultsOnly;

impl<T, E: FailureKind> Classify<T, E> for FaultsOnly {
    #[inline]
    fn classify(&self, result: &Result<T, E>) -> Outcome {
        match result {
            Ok(_) => Outcome::Success,
            Err(error) if error.is_fault() => Outcome::Failure,
            Err(_) => Outcome::Ignored,
        }
    }
}

/// An error that may carry a hint of when to try again (a server's retry-after, the time until
/// an open circuit lets a trial call through).
///
/// Retry uses the hint instead of its computed backoff delay.
pub trait RetryAfter {
    /// How long to wait before the next attempt has a chance, if known.
    fn retry_after(&self) -> Option<Duration>;
}

/// What kind of failure an error is: the questions retry and circuit breakers ask.
///
/// Implemented by palisade's own errors ([`CircuitOpen`](crate::circuit_breaker::CircuitOpen),
/// [`Elapsed`](crate::timeout::Elapsed), [`RpcError`](crate::rpc::RpcError), ...), by
/// [`std::io::Error`], and by [`tower::BoxError`] (which looks inside for a known error and treats
/// anything else as a non-transient fault). Implement it for your own error type to use the default
/// retry predicate and the [`FaultsOnly`] classifier with it.
pub trait FailureKind: RetryAfter {
    /// Whether another attempt may succeed and is safe to make.
    fn is_transient(&self) -> bool;

    /// Whether the callee, or the path to it, is at fault (what a circuit breaker should count).
    fn is_fault(&self) -> bool {
        true
    }

    /// Whether the request was turned away locally without reaching the callee (an open circuit,
    /// a shed load). Retrying such an error is only useful after its [`RetryAfter`] hint.
    fn is_rejection(&self) -> bool {
        false
    }
}

impl RetryAfter for std::io::Error {
    fn retry_after(&self) -> Option<Duration> {
        None
    }
}

impl FailureKind for std::io::Error {
    fn is_transient(&self) -> bool {
        use std::io::ErrorKind::*;
        matches!(
            self.kind(),
            ConnectionRefused
                | ConnectionReset
                | ConnectionAborted
                | NotConnected
                | BrokenPipe
                | TimedOut
                | Interrupted
                | WouldBlock
                | UnexpectedEof
        )
    }
}

/// Finds the most specific palisade-known error inside a boxed error and asks it.
fn boxed_kind<R>(
    error: &(dyn std::error::Error + Send + Sync + 'static),
    ask: impl Fn(&dyn FailureKind) -> R,
    unknown: R,
) -> R {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(error) = current {
        if let Some(known) = crate::errors::as_failure_kind(error) {
            return ask(known);
        }
        current = error.source();
    }
    unknown
}

impl RetryAfter for tower::BoxError {
    fn retry_after(&self) -> Option<Duration> {
        boxed_kind(self.as_ref(), |kind| kind.retry_after(), None)
    }
}

impl FailureKind for tower::BoxError {
    fn is_transient(&self) -> bool {
        boxed_kind(self.as_ref(), |kind| kind.is_transient(), false)
    }

    fn is_fault(&self) -> bool {
        boxed_kind(self.as_ref(), |kind| kind.is_fault(), true)
    }

    fn is_rejection(&self) -> bool {
        boxed_kind(self.as_ref(), |kind| kind.is_rejection(), false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_classifier_counts_errors() {
        assert_eq!(
            ErrorsAreFailures.classify(&Ok::<(), ()>(())),
            Outcome::Success
        );
        assert_eq!(
            ErrorsAreFailures.classify(&Err::<(), ()>(())),
            Outcome::Failure
        );
    }

    #[test]
    fn boxed_errors_are_looked_into() {
        let refused: tower::BoxError =
            Box::new(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert!(refused.is_transient());
        let denied: tower::BoxError =
            Box::new(std::io::Error::from(std::io::ErrorKind::PermissionDenied));
        assert!(!denied.is_transient());
        let unknown: tower::BoxError = "something odd".into();
        assert!(!unknown.is_transient());
        assert!(unknown.is_fault());
        assert_eq!(
            FaultsOnly.classify(&Err::<(), _>(unknown)),
            Outcome::Failure
        );
    }
}

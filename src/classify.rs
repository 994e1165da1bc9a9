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
//!   rejection or not, and a server's or a breaker's "try again in N" hint. One method to
//!   implement for your own error type; [`failure_kind_of`] finds it inside a `dyn Error`.

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
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot classify a `Result<{T}, {E}>`",
    label = "a classifier must implement `Classify<{T}, {E}>`",
    note = "use `ErrorsAreFailures`, `FaultsOnly` (needs `{E}: FailureKind`), or a closure `|result: &Result<{T}, {E}>| -> Outcome`"
)]
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

/// What kind of failure an error is: the questions retry, circuit breakers and fallbacks ask.
///
/// Implemented by palisade's own errors ([`CircuitOpen`](crate::circuit_breaker::CircuitOpen),
/// [`Elapsed`](crate::timeout::Elapsed), [`RpcError`](crate::rpc::RpcError), ...), by tower's
/// (`tower::timeout::error::Elapsed`, `tower::load_shed::error::Overloaded`,
/// `tower::buffer::error::Closed`), by [`std::io::Error`], and by [`tower::BoxError`], which looks
/// inside the box and down its [`source`](std::error::Error::source) chain for one of those (see
/// [`failure_kind_of`]) and treats anything else as a fault that is not transient.
///
/// # Opting your error type in
///
/// One method is required; the others have defaults:
///
/// ```
/// use palisade::classify::FailureKind;
///
/// #[derive(Debug)]
/// enum StoreError { Timeout, Conflict }
///
/// impl FailureKind for StoreError {
///     fn is_transient(&self) -> bool {
///         matches!(self, StoreError::Timeout)
///     }
/// }
/// # assert!(StoreError::Timeout.is_transient() && !StoreError::Conflict.is_transient());
/// ```
///
/// An enum that wraps palisade's errors can hand those variants to [`failure_kind_of`], or to
/// their own implementation, and decide the rest itself.
#[diagnostic::on_unimplemented(
    message = "`{Self}` does not implement `palisade::classify::FailureKind`",
    label = "retry and the `FaultsOnly` classifier need to know what kind of failure `{Self}` is",
    note = "implement it in one step: `impl FailureKind for {Self} {{ fn is_transient(&self) -> bool {{ .. }} }}` (the other methods have defaults), or use `tower::BoxError`"
)]
pub trait FailureKind {
    /// Whether another attempt may succeed and is safe to make.
    fn is_transient(&self) -> bool;

    /// Whether the callee, or the path to it, is at fault (what a circuit breaker should count).
    /// Default: `true`.
    fn is_fault(&self) -> bool {
        true
    }

    /// Whether the request was turned away locally without reaching the callee (an open circuit,
    /// a shed load). Retry never retries a rejection unless its [`retry_after`](Self::retry_after)
    /// hint fits and the policy allows it. Default: `false`.
    fn is_rejection(&self) -> bool {
        false
    }

    /// How long to wait before another attempt has a chance, if the error knows (a server's
    /// retry-after, the time until an open circuit admits a trial). Retry waits this long instead
    /// of its computed backoff. Default: `None`.
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

/// tower's `timeout` layer fired: worth another attempt, and the callee's fault.
impl FailureKind for tower::timeout::error::Elapsed {
    fn is_transient(&self) -> bool {
        true
    }
}

/// tower's `LoadShed` turned the request away: a local rejection, not the callee's fault.
impl FailureKind for tower::load_shed::error::Overloaded {
    fn is_transient(&self) -> bool {
        true
    }

    fn is_fault(&self) -> bool {
        false
    }

    fn is_rejection(&self) -> bool {
        true
    }
}

/// tower's `Buffer` worker is gone: the path to the callee is broken for good.
impl FailureKind for tower::buffer::error::Closed {
    fn is_transient(&self) -> bool {
        false
    }
}

/// Finds the error that says what kind of failure `error` is: `error` itself or the first error
/// down its [`source`](std::error::Error::source) chain that palisade knows — palisade's own
/// errors, [`RpcError`](crate::rpc::RpcError), tower's `Elapsed`, `Overloaded` and `Closed`
/// (tower's buffer `ServiceError` is looked through to the error it carries), and
/// [`std::io::Error`].
///
/// This is what [`FailureKind`] for [`tower::BoxError`] uses; call it from your own error type's
/// implementation to delegate the variants that carry such an error:
///
/// ```
/// use palisade::classify::{FailureKind, failure_kind_of};
///
/// let boxed: tower::BoxError = Box::new(tower::timeout::error::Elapsed::new());
/// assert!(failure_kind_of(boxed.as_ref()).is_some_and(|kind| kind.is_transient()));
/// ```
pub fn failure_kind_of<'a>(
    error: &'a (dyn std::error::Error + 'static),
) -> Option<&'a dyn FailureKind> {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(error) = current {
        if let Some(known) = crate::errors::as_failure_kind(error) {
            return Some(known);
        }
        current = error.source();
    }
    None
}

impl FailureKind for tower::BoxError {
    fn is_transient(&self) -> bool {
        failure_kind_of(self.as_ref()).is_some_and(|kind| kind.is_transient())
    }

    fn is_fault(&self) -> bool {
        failure_kind_of(self.as_ref()).is_none_or(|kind| kind.is_fault())
    }

    fn is_rejection(&self) -> bool {
        failure_kind_of(self.as_ref()).is_some_and(|kind| kind.is_rejection())
    }

    fn retry_after(&self) -> Option<Duration> {
        failure_kind_of(self.as_ref())?.retry_after()
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

    #[derive(Debug)]
    struct Wrapper(Box<dyn std::error::Error + Send + Sync>);

    impl std::fmt::Display for Wrapper {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("wrapper")
        }
    }

    impl std::error::Error for Wrapper {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(self.0.as_ref())
        }
    }

    #[test]
    fn towers_own_errors_are_recognised_down_the_source_chain() {
        let elapsed: tower::BoxError = Box::new(tower::timeout::error::Elapsed::new());
        assert!(elapsed.is_transient() && elapsed.is_fault() && !elapsed.is_rejection());
        let overloaded: tower::BoxError = Box::new(tower::load_shed::error::Overloaded::new());
        assert!(overloaded.is_transient() && !overloaded.is_fault() && overloaded.is_rejection());
        let wrapped: tower::BoxError =
            Box::new(Wrapper(Box::new(tower::timeout::error::Elapsed::new())));
        assert!(wrapped.is_transient());
        let deep: tower::BoxError = Box::new(Wrapper(Box::new(Wrapper(Box::new(
            std::io::Error::from(std::io::ErrorKind::ConnectionReset),
        )))));
        assert!(deep.is_transient());
        assert_eq!(deep.retry_after(), None);
    }
}

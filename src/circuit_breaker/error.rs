use super::state::Rejection;
use super::{CircuitState, Name};
use crate::classify::FailureKind;
use std::fmt;
use std::time::Duration;

/// The error of a call the circuit breaker turned away without calling the inner service.
///
/// A service wrapped in a breaker must have an error type that is `From<CircuitOpen>`;
/// [`tower::BoxError`] and [`RpcError`](crate::rpc::RpcError) both are.
#[derive(Clone, PartialEq, Eq)]
pub struct CircuitOpen {
    // Kept to three words: rejections are moved through several futures on the hot path.
    name: Name,
    /// Nanoseconds; `u64::MAX` when unknown (forced open).
    retry_after_nanos: u64,
    state: CircuitState,
}

impl CircuitOpen {
    #[inline]
    pub(crate) fn new(name: Name, rejection: Rejection) -> Self {
        CircuitOpen {
            name,
            retry_after_nanos: rejection.retry_after_nanos,
            state: rejection.state,
        }
    }

    /// The name of the breaker that rejected the call.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The state the breaker was in: `Open`, `HalfOpen` (all trial slots taken) or `ForcedOpen`.
    pub fn state(&self) -> CircuitState {
        self.state
    }

    /// How long until the breaker would let a call through: in `Open`, the time until the first
    /// trial is admitted (a caller that waits exactly this long is admitted); in `HalfOpen`, the
    /// longest a trial slot can stay taken. `None` when the circuit was forced open.
    pub fn retry_after(&self) -> Option<Duration> {
        (self.retry_after_nanos != u64::MAX).then(|| Duration::from_nanos(self.retry_after_nanos))
    }
}

/// `CircuitOpen { name: "users", state: Open, retry_after: Some(1.5s) }`: the public view, not
/// the packed representation.
impl fmt::Debug for CircuitOpen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitOpen")
            .field("name", &self.name())
            .field("state", &self.state)
            .field("retry_after", &self.retry_after())
            .finish()
    }
}

impl fmt::Display for CircuitOpen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.state, self.retry_after()) {
            (CircuitState::HalfOpen, Some(after)) => write!(
                f,
                "circuit '{}' is half-open and its trial calls are taken; retry after {:.1?}",
                self.name, after
            ),
            (_, Some(after)) => write!(
                f,
                "circuit '{}' is open; retry after {:.1?}",
                self.name, after
            ),
            (_, None) => write!(
                f,
                "circuit '{}' is forced open; it admits no calls until it is closed or reset",
                self.name
            ),
        }
    }
}

impl std::error::Error for CircuitOpen {}

impl FailureKind for CircuitOpen {
    fn retry_after(&self) -> Option<Duration> {
        CircuitOpen::retry_after(self)
    }

    fn is_transient(&self) -> bool {
        self.retry_after_nanos != u64::MAX
    }

    fn is_fault(&self) -> bool {
        false
    }

    fn is_rejection(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_shows_the_public_view() {
        let open = CircuitOpen {
            name: Name::from("users"),
            retry_after_nanos: 1_500_000_000,
            state: CircuitState::Open,
        };
        assert_eq!(
            format!("{open:?}"),
            r#"CircuitOpen { name: "users", state: Open, retry_after: Some(1.5s) }"#
        );
        let forced = CircuitOpen {
            retry_after_nanos: u64::MAX,
            state: CircuitState::ForcedOpen,
            ..open
        };
        assert_eq!(
            format!("{forced:?}"),
            r#"CircuitOpen { name: "users", state: ForcedOpen, retry_after: None }"#
        );
    }
}

use super::{Breaker, CircuitState, Metrics, StateChange, TransitionReason};
use std::fmt;
use std::sync::Arc;
use tokio::sync::broadcast;

/// Observes and controls one breaker. Cheap to clone; keeps the breaker alive.
///
/// ```
/// use palisade::circuit_breaker::{CircuitBreakerConfig, CircuitBreakerLayer, CircuitState};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let layer = CircuitBreakerLayer::new(CircuitBreakerConfig::new("payments"));
/// let handle = layer.handle();
/// let mut changes = handle.subscribe();
///
/// handle.force_open(); // e.g. during a maintenance window
/// assert_eq!(handle.state(), CircuitState::ForcedOpen);
/// let change = changes.recv().await.unwrap();
/// assert_eq!((change.from, change.to), (CircuitState::Closed, CircuitState::ForcedOpen));
///
/// handle.reset();
/// assert_eq!(handle.state(), CircuitState::Closed);
/// # }
/// ```
#[derive(Clone)]
pub struct CircuitBreakerHandle {
    breaker: Arc<Breaker>,
}

impl CircuitBreakerHandle {
    pub(crate) fn new(breaker: Arc<Breaker>) -> Self {
        CircuitBreakerHandle { breaker }
    }

    /// The breaker's name.
    pub fn name(&self) -> &str {
        &self.breaker.name
    }

    /// The current state. `Open` becomes `HalfOpen` when the first caller after the reset
    /// timeout asks for readiness (`poll_ready`), not by a timer.
    pub fn state(&self) -> CircuitState {
        self.breaker.slot.state()
    }

    /// The state, and whether it is open with its open period over, so that the next caller is
    /// let through to a trial (for health checks: such a breaker no longer turns calls away).
    pub(crate) fn state_and_trial_due(&self) -> (CircuitState, bool) {
        self.breaker.slot.state_and_trial_due(self.breaker.epoch)
    }

    /// A snapshot of the counters.
    pub fn metrics(&self) -> Metrics {
        self.breaker.slot.metrics()
    }

    /// Opens the circuit until [`force_closed`](Self::force_closed) or [`reset`](Self::reset).
    pub fn force_open(&self) {
        self.breaker
            .slot
            .force(CircuitState::ForcedOpen, TransitionReason::ForcedOpen);
    }

    /// Lets every call through and records nothing, until [`force_open`](Self::force_open) or
    /// [`reset`](Self::reset).
    pub fn force_closed(&self) {
        self.breaker
            .slot
            .force(CircuitState::ForcedClosed, TransitionReason::ForcedClosed);
    }

    /// Closes the circuit and forgets all recorded failures (and any open-time growth).
    pub fn reset(&self) {
        self.breaker
            .slot
            .force(CircuitState::Closed, TransitionReason::Reset);
    }

    /// Subscribes to state changes from now on.
    pub fn subscribe(&self) -> StateChanges {
        StateChanges {
            receiver: self.breaker.slot.subscribe(),
            skipped: 0,
        }
    }
}

impl fmt::Debug for CircuitBreakerHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreakerHandle")
            .field("name", &self.name())
            .field("state", &self.state())
            .finish()
    }
}

/// A subscription to a breaker's state changes, from [`CircuitBreakerHandle::subscribe`].
///
/// Buffers up to 64 changes; a subscriber that falls further behind skips the oldest ones (see
/// [`skipped`](Self::skipped)).
#[derive(Debug)]
pub struct StateChanges {
    receiver: broadcast::Receiver<StateChange>,
    skipped: u64,
}

impl StateChanges {
    /// The next state change; `None` once the breaker is gone.
    pub async fn recv(&mut self) -> Option<StateChange> {
        loop {
            match self.receiver.recv().await {
                Ok(change) => return Some(change),
                Err(broadcast::error::RecvError::Lagged(n)) => self.skipped += n,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }

    /// The next state change if one is waiting.
    pub fn try_recv(&mut self) -> Option<StateChange> {
        loop {
            match self.receiver.try_recv() {
                Ok(change) => return Some(change),
                Err(broadcast::error::TryRecvError::Lagged(n)) => self.skipped += n,
                Err(_) => return None,
            }
        }
    }

    /// How many changes this subscriber missed by falling behind.
    pub fn skipped(&self) -> u64 {
        self.skipped
    }
}

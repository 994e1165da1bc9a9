//! A circuit breaker for any [`tower::Service`].
//!
//! A breaker watches the results of the calls going through it. When the callee looks broken it
//! *opens* and turns calls away at once with [`CircuitOpen`], without calling the inner service, so
//! a failing dependency gets room to recover and callers fail fast instead of piling up. After
//! `reset_timeout` it lets a trial call through (*half-open*); a successful trial closes it again.
//!
//! Configuration follows NestJS's circuit breaker: a name, `ttl`, `max_failures`, `reset_timeout`.
//!
//! ```
//! use palisade::circuit_breaker::{CircuitBreakerConfig, CircuitBreakerLayer, CircuitOpen, CircuitState};
//! use std::time::Duration;
//! use tower::{BoxError, Service, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! let breaker = CircuitBreakerLayer::new(
//!     CircuitBreakerConfig::new("inventory")
//!         .ttl(Duration::from_secs(5))
//!         .max_failures(2)
//!         .reset_timeout(Duration::from_secs(10)),
//! );
//! let handle = breaker.handle();
//! let mut service = ServiceBuilder::new()
//!     .layer(breaker)
//!     .service_fn(|fail: bool| async move {
//!         if fail { Err::<&str, BoxError>("inventory is down".into()) } else { Ok("ok") }
//!     });
//!
//! // Two failures within 5 s open the circuit...
//! for _ in 0..2 {
//!     assert!(service.ready().await.unwrap().call(true).await.is_err());
//! }
//! assert_eq!(handle.state(), CircuitState::Open);
//!
//! // ...and it turns calls away without calling the service.
//! let err = service.ready().await.unwrap().call(false).await.unwrap_err();
//! let open = err.downcast_ref::<CircuitOpen>().unwrap();
//! assert_eq!(open.retry_after(), Some(Duration::from_secs(10)));
//!
//! // After the reset timeout a trial goes through; its success closes the circuit.
//! tokio::time::sleep(Duration::from_secs(10)).await;
//! assert_eq!(service.ready().await.unwrap().call(false).await.unwrap(), "ok");
//! assert_eq!(handle.state(), CircuitState::Closed);
//! # }
//! ```
//!
//! # Semantics
//!
//! - **Closed → Open** when any configured [`TripRule`] fires: by default when at least
//!   `max_failures` failures were recorded within the last `ttl` (exact, not bucketed; a failure
//!   exactly `ttl` old no longer counts; successes do not erase failures). Also available, alone
//!   or together: consecutive failures, and a failure (and slow-call) rate over a rolling window
//!   with a minimum number of calls, judged after every call as Resilience4j does.
//! - **Open**: calls are rejected with [`CircuitOpen`], whose `retry_after` is the time left until a
//!   trial is admitted. Rejection happens in `call`, never in `poll_ready`, so a breaker never
//!   poisons a `Buffer` or a balancer; and while no trial is due, `poll_ready` is ready at once
//!   *without polling the inner service*, so callers fail fast even when the inner service is
//!   not ready (see [Readiness](#readiness)).
//! - **Open → Half-open** lazily: the first caller at or after `opened_at + reset_timeout` is
//!   admitted as a trial — its `poll_ready` takes the trial's slot, its `call` is the trial; no
//!   timer task runs.
//! - **Half-open** admits at most [`half_open_max_calls`](CircuitBreakerConfig::half_open_max_calls)
//!   trials at once. A failed trial re-opens the circuit (for longer, with
//!   [`open_backoff`](CircuitBreakerConfig::open_backoff)); [`success_threshold`](CircuitBreakerConfig::success_threshold)
//!   successful trials close it and clear the history. A trial whose future is dropped, or whose
//!   outcome is [`Ignored`](crate::classify::Outcome::Ignored), frees its slot without a verdict;
//!   a trial that hangs longer than the trial timeout loses its slot to a new trial.
//! - Results of calls admitted before a transition never move the new state.
//! - Manual controls ([`CircuitBreakerHandle`]) that change nothing emit nothing: `force_open` on a
//!   forced-open breaker, `force_closed` on a forced-closed one, and `reset` on a closed one send
//!   no event, and the first two keep calls in flight valid. A `reset` of a closed breaker with
//!   recorded failures still forgets them, and results of calls admitted before it then no
//!   longer count.
//! - What counts as a failure is the [classifier](crate::classify::Classify)'s call (default: every
//!   `Err`).
//!
//! # Readiness
//!
//! While the breaker is forced open, open with no trial due yet, or half-open with every trial
//! slot taken (by trials younger than the trial timeout), `poll_ready` answers for it (ready)
//! without polling the inner service, and `call` rejects: callers never queue behind an inner
//! service that is not ready (a full `Buffer`, a `ConcurrencyLimit` the trial holds, a
//! reconnecting client) only to be rejected once it is. If the breaker becomes willing to admit
//! between that `poll_ready` and `call`, the call is still rejected, with a `retry_after` of
//! zero: the inner service was never made ready, so it cannot be called; the next `poll_ready`
//! polls it.
//!
//! A caller let through to a trial takes the trial's slot in `poll_ready`, before it polls the
//! inner service, and holds it while the inner service gets ready (as `ConcurrencyLimit` holds
//! its permit): the other callers are turned away meanwhile, rather than all waiting for an
//! inner service that only one of them may call. The slot goes back when the service is dropped
//! without calling (a clone does not share it); one held past the trial timeout can be taken
//! by another caller, as a hung trial's can. The trial timeout itself counts from the call. A
//! service that asks for readiness before it has a request (`call_all`, a ready cache) holds the
//! slot meanwhile, as it would hold a `ConcurrencyLimit`'s permit.
//!
//! An error from the inner service's `poll_ready` (a transport that reports connect failures
//! there) is returned to the caller and classified like a call's result: in `Closed`, a
//! [`Failure`](crate::classify::Outcome::Failure) counts toward the trip rules, so a breaker
//! around a dead transport opens; in `HalfOpen`, or in `Open` once a trial is due (the inner
//! service is polled again only then), it is a failed trial and opens the circuit for another
//! period, so the callers after it fail fast again.
//! This is what Resilience4j does with an exception thrown before the call: the dependency is
//! unreachable, and that is what a breaker exists to notice.
//!
//! # Errors
//!
//! The breaker does not wrap the inner service's error: it requires `S::Error: From<CircuitOpen>`,
//! so one error type runs through a whole stack. `tower::BoxError` and
//! [`RpcError`](crate::rpc::RpcError) qualify, and so does your own enum:
//!
//! ```
//! use palisade::circuit_breaker::CircuitOpen;
//!
//! #[derive(Debug)]
//! enum StoreError {
//!     Database(String),
//!     Unavailable(CircuitOpen),
//! }
//!
//! impl From<CircuitOpen> for StoreError {
//!     fn from(open: CircuitOpen) -> Self {
//!         StoreError::Unavailable(open)
//!     }
//! }
//! ```
//!
//! # Cost
//!
//! In `Closed` under the default rule, a successful call costs one atomic load, no lock, no clock
//! read and no heap allocation (plus a per-thread counter bump with no locked instruction). A
//! rejection in `Open` costs an atomic load and a clock read in `poll_ready` (which answers
//! without polling the inner service) and the same again in `call`. Failures, half-open traffic
//! and the failure-rate rule (which records every call) take a short lock.
//!
//! # Sharing
//!
//! A [`CircuitBreakerLayer`] holds one breaker: every service it wraps, and every clone of those
//! services, shares that breaker's state. Observe and control it through a
//! [`CircuitBreakerHandle`]; keep one breaker per downstream name with a
//! [`CircuitBreakerRegistry`].

mod config;
mod error;
mod future;
mod handle;
mod layer;
mod registry;
mod state;

pub use self::config::{CircuitBreakerConfig, Name, OpenBackoff, SlowCalls, TripRule};
pub use self::error::CircuitOpen;
pub use self::future::ResponseFuture;
pub use self::handle::{CircuitBreakerHandle, StateChanges};
pub use self::layer::CircuitBreakerLayer;
pub use self::registry::CircuitBreakerRegistry;
pub use self::state::Metrics;

use self::future::Tracker;
use self::state::{Permit, Readiness, Rejection, Slot, SuccessAction};
use crate::classify::{Classify, ErrorsAreFailures};
use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::time::Instant;
use tower_service::Service;

/// The state of a circuit breaker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CircuitState {
    /// Calls go through; failures are counted.
    Closed,
    /// Calls are rejected until the reset timeout has passed.
    Open,
    /// A limited number of trial calls decide whether to close or re-open.
    HalfOpen,
    /// Opened by hand: every call is rejected until `force_closed` or `reset`.
    ForcedOpen,
    /// Closed by hand: every call goes through and nothing is recorded, until `force_open` or
    /// `reset`.
    ForcedClosed,
}

impl fmt::Display for CircuitState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CircuitState::Closed => "closed",
            CircuitState::Open => "open",
            CircuitState::HalfOpen => "half-open",
            CircuitState::ForcedOpen => "forced open",
            CircuitState::ForcedClosed => "forced closed",
        })
    }
}

/// Why a breaker changed state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TransitionReason {
    /// The trip rule fired.
    Tripped,
    /// The reset timeout passed and a call arrived: it is the first trial.
    ResetTimeoutElapsed,
    /// Enough trials succeeded.
    TrialsSucceeded,
    /// A trial failed.
    TrialFailed,
    /// [`CircuitBreakerHandle::force_open`].
    ForcedOpen,
    /// [`CircuitBreakerHandle::force_closed`].
    ForcedClosed,
    /// [`CircuitBreakerHandle::reset`].
    Reset,
}

impl fmt::Display for TransitionReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TransitionReason::Tripped => "the trip rule fired",
            TransitionReason::ResetTimeoutElapsed => "the reset timeout elapsed",
            TransitionReason::TrialsSucceeded => "trial calls succeeded",
            TransitionReason::TrialFailed => "a trial call failed",
            TransitionReason::ForcedOpen => "forced open",
            TransitionReason::ForcedClosed => "forced closed",
            TransitionReason::Reset => "reset",
        })
    }
}

/// One state transition, as delivered to [`StateChanges`] subscribers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StateChange {
    /// The state before.
    pub from: CircuitState,
    /// The state after.
    pub to: CircuitState,
    /// Why.
    pub reason: TransitionReason,
    /// When (tokio's clock).
    pub at: Instant,
}

/// One breaker: owns its state slot and gives it back when the last service, layer or handle
/// holding it is dropped.
pub(crate) struct Breaker {
    slot: &'static Slot,
    name: Name,
    epoch: Instant,
    action: SuccessAction,
    times_calls: bool,
}

impl Breaker {
    pub(crate) fn new(config: CircuitBreakerConfig) -> Arc<Breaker> {
        let epoch = Instant::now();
        let name = config.name.clone();
        let rules = config.rules.effective();
        let action = SuccessAction::for_rules(&rules);
        let times_calls = rules.rate.is_some_and(|rate| rate.slow.is_some());
        Arc::new(Breaker {
            slot: Slot::claim(config, epoch),
            name,
            epoch,
            action,
            times_calls,
        })
    }
}

impl Drop for Breaker {
    fn drop(&mut self) {
        self.slot.retire();
    }
}

/// A service guarded by a circuit breaker. See the [module docs](self).
///
/// Created by [`CircuitBreakerLayer`]. Clones share the breaker.
pub struct CircuitBreaker<S, C = ErrorsAreFailures> {
    inner: S,
    /// The half-open trial slot this service took in `poll_ready` for its next call. Before
    /// `breaker`: dropped first, it is released while the breaker's slot is still this breaker's.
    reserved: Reserved,
    breaker: Arc<Breaker>,
    // Copied out of `breaker` so the hot path does not chase the `Arc`.
    slot: &'static Slot,
    epoch: Instant,
    action: SuccessAction,
    times_calls: bool,
    /// Whether the last `poll_ready` made the inner service ready (it is not polled while the
    /// breaker turns calls away).
    inner_ready: bool,
    classifier: C,
}

impl<S, C> CircuitBreaker<S, C> {
    pub(crate) fn new(inner: S, breaker: Arc<Breaker>, classifier: C) -> Self {
        CircuitBreaker {
            inner,
            reserved: Reserved(None),
            slot: breaker.slot,
            epoch: breaker.epoch,
            action: breaker.action,
            times_calls: breaker.times_calls,
            breaker,
            inner_ready: false,
            classifier,
        }
    }

    /// A handle to observe and control this service's breaker.
    pub fn handle(&self) -> CircuitBreakerHandle {
        CircuitBreakerHandle::new(Arc::clone(&self.breaker))
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Consumes the breaker, returning the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: Clone, C: Clone> Clone for CircuitBreaker<S, C> {
    fn clone(&self) -> Self {
        CircuitBreaker {
            inner: self.inner.clone(),
            // The trial slot is the original's, for its own call.
            reserved: Reserved(None),
            breaker: Arc::clone(&self.breaker),
            slot: self.slot,
            epoch: self.epoch,
            action: self.action,
            times_calls: self.times_calls,
            // A clone of a service is not ready (tower's contract).
            inner_ready: false,
            classifier: self.classifier.clone(),
        }
    }
}

impl<S: fmt::Debug, C> fmt::Debug for CircuitBreaker<S, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreaker")
            .field("name", &self.breaker.name)
            .field("state", &self.slot.state())
            .field("inner", &self.inner)
            .finish()
    }
}

impl<S, C, Request> Service<Request> for CircuitBreaker<S, C>
where
    S: Service<Request>,
    S::Error: From<CircuitOpen>,
    C: Classify<S::Response, S::Error> + Clone,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, C>;

    /// Ready at once, without polling the inner service, while the breaker turns calls away
    /// (forced open, open with no trial due, or half-open with every trial slot taken): callers
    /// then get [`CircuitOpen`] from `call` instead of queueing behind an inner service that is
    /// not ready (a full `Buffer`, a reconnecting client). Otherwise polls the inner service; an error from it is classified
    /// like a call's result (see the [module docs](self#readiness)).
    #[inline(always)]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        if self.slot.is_not_closed() && self.turned_away() {
            self.inner_ready = false;
            return Poll::Ready(Ok(()));
        }
        match self.inner.poll_ready(cx) {
            Poll::Ready(Ok(())) => {
                self.inner_ready = true;
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(error)) => {
                self.inner_ready = false;
                Poll::Ready(self.ready_failed(error))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    #[inline(always)]
    fn call(&mut self, request: Request) -> Self::Future {
        let ready = std::mem::replace(&mut self.inner_ready, false);
        // One branch for the common case: the inner service is ready and the breaker closed.
        let tracker = match self.slot.acquire_closed(ready) {
            Ok(generation) => Tracker::closed(self.slot, generation, self.action, self.times_calls),
            Err(word) => match self.admit_slow(ready, word) {
                Ok(tracker) => tracker,
                Err(rejection) => {
                    return ResponseFuture::rejected(
                        self.rejecting_name(),
                        rejection,
                        self.classifier.clone(),
                    );
                }
            },
        };
        ResponseFuture::called(self.inner.call(request), tracker, self.classifier.clone())
    }
}

impl<S, C> CircuitBreaker<S, C> {
    /// Whether `poll_ready`, with the circuit not plainly closed, answers without polling the
    /// inner service. A caller let through to a trial takes the trial's slot first and holds it
    /// while the inner service gets ready; the others are turned away meanwhile.
    #[cold]
    #[inline(never)]
    fn turned_away(&mut self) -> bool {
        let held = self
            .reserved
            .0
            .map(|(_, generation, ticket)| (generation, ticket));
        match self.slot.ready_not_closed(self.epoch, held) {
            Readiness::Poll => false,
            Readiness::Reserved { generation, ticket } => {
                // A slot held before is stale (this one was not taken otherwise): its release
                // changes nothing.
                self.reserved = Reserved(Some((self.slot, generation, ticket)));
                false
            }
            Readiness::TurnAway => true,
        }
    }

    /// Admission when the breaker is not plainly closed, or the inner service was not made ready.
    #[inline]
    fn admit_slow(&mut self, ready: bool, word: u64) -> Result<Tracker, Rejection> {
        if !ready {
            return Err(self.slot.reject_unready(self.epoch));
        }
        if let Some((slot, generation, ticket)) = self.reserved.0.take()
            && slot.use_reserved(generation, ticket)
        {
            return Ok(Tracker::new(
                slot,
                Permit::Trial { generation, ticket },
                self.action,
                self.times_calls,
            ));
        }
        admit_not_closed(self.slot, word, self.epoch, self.action, self.times_calls)
    }

    /// The name a rejection carries. Out of line, and returning only the name (in registers),
    /// so that `call` never hands out the address of the response future it builds.
    #[cold]
    #[inline(never)]
    fn rejecting_name(&self) -> Name {
        self.breaker.name.clone()
    }

    #[cold]
    #[inline(never)]
    fn ready_failed<T, E>(&mut self, error: E) -> Result<(), E>
    where
        C: Classify<T, E>,
    {
        let result = Err(error);
        if self.classifier.classify(&result) == crate::classify::Outcome::Failure {
            // A failed trial: the slot it held goes with the circuit's new state.
            self.reserved.0 = None;
            self.slot.record_ready_failure();
        }
        result.map(|_: T| ())
    }
}

/// A half-open trial slot taken by `poll_ready` for the next call: the breaker's slot, the
/// generation and the ticket. Dropped unused (the service dropped, or a new slot taken), it is
/// given back, so that a service that never calls does not hold the trial until its timeout.
struct Reserved(Option<(&'static Slot, u64, u64)>);

impl Drop for Reserved {
    #[inline(always)]
    fn drop(&mut self) {
        if self.0.is_some() {
            self.release();
        }
    }
}

impl Reserved {
    #[cold]
    #[inline(never)]
    fn release(&mut self) {
        if let Some((slot, generation, ticket)) = self.0.take() {
            slot.release_trial(generation, ticket);
        }
    }
}

/// Admission in every state but plainly closed. Out of line, and not generic, so that the closed
/// path of `call` stays small enough to inline and keep in registers.
#[inline(never)]
fn admit_not_closed(
    slot: &'static Slot,
    word: u64,
    epoch: Instant,
    action: SuccessAction,
    times_calls: bool,
) -> Result<Tracker, Rejection> {
    slot.acquire_not_closed(word, epoch)
        .map(|permit| Tracker::new(slot, permit, action, times_calls))
}

//! Seeded fault injection for any [`tower::Service`]: errors (by rate or scripted by call number),
//! added latency and hangs — for tests, for chaos drills in staging, and for the demo.
//!
//! Latency delays the *call*, as Polly's chaos latency does: the inner service is called only
//! once the delay has passed (so a server sees the request late, not just the caller the answer).
//! To do that without holding up other callers, a delayed call takes the ready inner service and
//! leaves a clone in its place, so the wrapped service must be `Clone` (tower's usual pattern).
//!
//! Deterministic: what happens to call number *n* depends only on the seed and *n*, so a seed
//! reproduces a run exactly, whatever the interleaving of concurrent calls. Rates can be turned up
//! and down while traffic flows through a [`FaultHandle`].
//!
//! ```
//! use palisade::fault::{FaultLayer, InjectedFault};
//! use tower::{Layer, Service, ServiceExt};
//!
//! #[derive(Debug)]
//! enum AppError { Injected(InjectedFault) }
//! impl From<InjectedFault> for AppError {
//!     fn from(fault: InjectedFault) -> Self { AppError::Injected(fault) }
//! }
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
//! let mut service = FaultLayer::seeded(7)
//!     .fail_calls(2..=3) // the 2nd and 3rd calls fail
//!     .layer(tower::service_fn(|x: u32| async move { Ok::<_, AppError>(x) }));
//! let mut outcomes = Vec::new();
//! for i in 1..=4 {
//!     outcomes.push(service.ready().await.unwrap().call(i).await.is_ok());
//! }
//! assert_eq!(outcomes, [true, false, false, true]);
//! # }
//! ```

use crate::classify::FailureKind;
use crate::rng::{mix, unit_interval};
use pin_project_lite::pin_project;
use std::fmt;
use std::future::Future;
use std::ops::RangeInclusive;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::Sleep;
use tower_layer::Layer;
use tower_service::Service;

/// The error of a call that fault injection failed on purpose.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("injected fault on call {call}")]
pub struct InjectedFault {
    call: u64,
}

impl InjectedFault {
    /// The number of the call that failed (the first call is 1).
    pub fn call(&self) -> u64 {
        self.call
    }
}

impl FailureKind for InjectedFault {
    /// Injected faults stand for transient outages.
    fn is_transient(&self) -> bool {
        true
    }
}

struct State {
    seed: u64,
    calls: AtomicU64,
    error_rate: AtomicU64,
    hang_rate: AtomicU64,
    latency_nanos: AtomicU64,
    latency_rate: AtomicU64,
    scripts: RwLock<Scripts>,
    /// The [`FaultHandle`]s sharing this state. They steer the layer they came from: unlike a
    /// clone of the layer, one does not make scripting the layer copy its state.
    handles: AtomicUsize,
}

/// The calls scripted to fail or hang.
#[derive(Clone, Default)]
struct Scripts {
    failing_calls: Vec<RangeInclusive<u64>>,
    hanging_calls: Vec<RangeInclusive<u64>>,
}

fn load_rate(cell: &AtomicU64) -> f64 {
    f64::from_bits(cell.load(Ordering::Relaxed))
}

fn store_rate(cell: &AtomicU64, rate: f64) {
    assert!(
        (0.0..=1.0).contains(&rate),
        "a fault rate must be between 0 and 1, got {rate}"
    );
    cell.store(rate.to_bits(), Ordering::Relaxed);
}

/// What to do to one call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Plan {
    Pass,
    Fail,
    Hang,
}

impl State {
    /// Independent draws in `[0, 1)` for call `call`: one per decision.
    fn draw(&self, call: u64, decision: u64) -> f64 {
        unit_interval(mix(
            self.seed ^ mix(call.wrapping_mul(4).wrapping_add(decision))
        ))
    }

    fn plan(&self, call: u64) -> (Plan, Option<Duration>) {
        let latency = Duration::from_nanos(self.latency_nanos.load(Ordering::Relaxed));
        let delay = (!latency.is_zero() && self.draw(call, 0) < load_rate(&self.latency_rate))
            .then_some(latency);
        let scripted = |ranges: &[RangeInclusive<u64>]| ranges.iter().any(|r| r.contains(&call));
        let (hang, fail) = {
            let scripts = self.scripts.read().unwrap_or_else(|p| p.into_inner());
            (
                scripted(&scripts.hanging_calls),
                scripted(&scripts.failing_calls),
            )
        };
        let plan = if hang || self.draw(call, 1) < load_rate(&self.hang_rate) {
            Plan::Hang
        } else if fail || self.draw(call, 2) < load_rate(&self.error_rate) {
            Plan::Fail
        } else {
            Plan::Pass
        };
        (plan, delay)
    }
}

/// Injects faults into the services it wraps; all of them share one call counter and settings.
///
/// Rates ([`error_rate`](Self::error_rate), [`hang_rate`](Self::hang_rate),
/// [`latency`](Self::latency)) are live settings shared with clones and [`FaultHandle`]s.
/// Scripting calls ([`fail_calls`](Self::fail_calls), [`hang_calls`](Self::hang_calls)) on a
/// layer that has clones (or wrapped a service already) gives it its own copy: its own script
/// and call counter, starting from the rates as they are; handles taken before stay with the
/// original. Handles alone do not make a copy: a handle taken from a layer nothing else shares
/// still steers it after it is scripted.
#[derive(Clone)]
#[must_use = "a layer does nothing until it wraps a service"]
pub struct FaultLayer {
    state: Arc<State>,
}

impl FaultLayer {
    /// No faults yet; `seed` fixes every random decision.
    pub fn seeded(seed: u64) -> Self {
        FaultLayer {
            state: Arc::new(State {
                seed: mix(seed),
                calls: AtomicU64::new(0),
                error_rate: AtomicU64::new(0f64.to_bits()),
                hang_rate: AtomicU64::new(0f64.to_bits()),
                latency_nanos: AtomicU64::new(0),
                latency_rate: AtomicU64::new(0f64.to_bits()),
                scripts: RwLock::new(Scripts::default()),
                handles: AtomicUsize::new(0),
            }),
        }
    }

    /// Edits this layer's script, copying the state first if another layer or a service shares
    /// it (scripting a clone gives the clone its own script and call counter; the original is
    /// unchanged). Handles do not count: they follow the layer.
    fn script(&mut self, edit: impl FnOnce(&mut Scripts)) {
        // Over-counts while a handle is being made or dropped (its `Arc` is counted before and
        // after its entry in `handles`): then the state is copied, which is always safe.
        let shared = Arc::strong_count(&self.state)
            .saturating_sub(self.state.handles.load(Ordering::Acquire))
            > 1;
        if shared {
            let state = &*self.state;
            let scripts = state
                .scripts
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            self.state = Arc::new(State {
                seed: state.seed,
                calls: AtomicU64::new(0),
                error_rate: AtomicU64::new(state.error_rate.load(Ordering::Relaxed)),
                hang_rate: AtomicU64::new(state.hang_rate.load(Ordering::Relaxed)),
                latency_nanos: AtomicU64::new(state.latency_nanos.load(Ordering::Relaxed)),
                latency_rate: AtomicU64::new(state.latency_rate.load(Ordering::Relaxed)),
                scripts: RwLock::new(scripts),
                handles: AtomicUsize::new(0),
            });
        }
        edit(
            &mut self
                .state
                .scripts
                .write()
                .unwrap_or_else(|p| p.into_inner()),
        );
    }

    /// Fails each call with probability `rate`.
    ///
    /// # Panics
    /// If `rate` is not between 0 and 1.
    pub fn error_rate(self, rate: f64) -> Self {
        store_rate(&self.state.error_rate, rate);
        self
    }

    /// Fails the calls numbered in `calls` (the first call is 1), e.g. `10..=20`.
    pub fn fail_calls(mut self, calls: RangeInclusive<u64>) -> Self {
        self.script(|scripts| scripts.failing_calls.push(calls));
        self
    }

    /// Never answers calls with probability `rate`.
    ///
    /// # Panics
    /// If `rate` is not between 0 and 1.
    pub fn hang_rate(self, rate: f64) -> Self {
        store_rate(&self.state.hang_rate, rate);
        self
    }

    /// Never answers the calls numbered in `calls`.
    pub fn hang_calls(mut self, calls: RangeInclusive<u64>) -> Self {
        self.script(|scripts| scripts.hanging_calls.push(calls));
        self
    }

    /// Delays each call by `latency` with probability `rate`: the inner service is called once
    /// the delay has passed.
    ///
    /// # Panics
    /// If `rate` is not between 0 and 1.
    pub fn latency(self, latency: Duration, rate: f64) -> Self {
        self.handle().set_latency(latency, rate);
        self
    }

    /// A handle to change the rates while traffic flows.
    pub fn handle(&self) -> FaultHandle {
        FaultHandle::of(Arc::clone(&self.state))
    }
}

impl fmt::Debug for FaultLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultLayer").finish_non_exhaustive()
    }
}

impl<S> Layer<S> for FaultLayer {
    type Service = Fault<S>;

    fn layer(&self, inner: S) -> Fault<S> {
        Fault {
            inner,
            state: Arc::clone(&self.state),
        }
    }
}

/// Turns fault rates up and down at run time.
pub struct FaultHandle {
    state: Arc<State>,
}

impl Clone for FaultHandle {
    fn clone(&self) -> Self {
        FaultHandle::of(Arc::clone(&self.state))
    }
}

impl Drop for FaultHandle {
    fn drop(&mut self) {
        self.state.handles.fetch_sub(1, Ordering::AcqRel);
    }
}

impl FaultHandle {
    /// A handle on `state`, counted in it (after the `Arc` was: see [`FaultLayer::script`]).
    fn of(state: Arc<State>) -> Self {
        state.handles.fetch_add(1, Ordering::AcqRel);
        FaultHandle { state }
    }

    /// Sets the error rate.
    ///
    /// # Panics
    /// If `rate` is not between 0 and 1.
    pub fn set_error_rate(&self, rate: f64) {
        store_rate(&self.state.error_rate, rate);
    }

    /// Sets the hang rate.
    ///
    /// # Panics
    /// If `rate` is not between 0 and 1.
    pub fn set_hang_rate(&self, rate: f64) {
        store_rate(&self.state.hang_rate, rate);
    }

    /// Delays calls by `latency` with probability `rate` (`Duration::ZERO` turns latency off).
    ///
    /// # Panics
    /// If `rate` is not between 0 and 1.
    pub fn set_latency(&self, latency: Duration, rate: f64) {
        store_rate(&self.state.latency_rate, rate);
        self.state.latency_nanos.store(
            u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    /// Calls seen so far.
    pub fn calls(&self) -> u64 {
        self.state.calls.load(Ordering::Relaxed)
    }
}

impl fmt::Debug for FaultHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultHandle")
            .field("calls", &self.calls())
            .finish_non_exhaustive()
    }
}

/// A service with faults injected; created by [`FaultLayer`].
#[derive(Clone)]
pub struct Fault<S> {
    inner: S,
    state: Arc<State>,
}

impl<S: fmt::Debug> fmt::Debug for Fault<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Fault").field("inner", &self.inner).finish()
    }
}

impl<S, Request> Service<Request> for Fault<S>
where
    S: Service<Request> + Clone,
    S::Error: From<InjectedFault>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = ResponseFuture<S, Request>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        let call = self.state.calls.fetch_add(1, Ordering::Relaxed) + 1;
        let (plan, delay) = self.state.plan(call);
        if plan != Plan::Pass {
            tracing::debug!(call, ?plan, ?delay, "injecting a fault");
        }
        let outcome = match (plan, delay) {
            (Plan::Pass, None) => Outcome::Pass {
                future: self.inner.call(request),
            },
            // Call once the delay has passed: take the ready service, leave a clone (not yet
            // ready) for the caller's next `poll_ready`.
            (Plan::Pass, Some(_)) => {
                let clone = self.inner.clone();
                Outcome::Delayed {
                    call: Some((std::mem::replace(&mut self.inner, clone), request)),
                }
            }
            (Plan::Fail, _) => Outcome::Fail {
                fault: Some(InjectedFault { call }),
            },
            (Plan::Hang, _) => Outcome::Hang,
        };
        ResponseFuture {
            delay: delay.map(tokio::time::sleep),
            outcome,
        }
    }
}

pin_project! {
    #[project = OutcomeProj]
    enum Outcome<S: Service<Request>, Request> {
        Pass { #[pin] future: S::Future },
        Delayed { call: Option<(S, Request)> },
        Fail { fault: Option<InjectedFault> },
        Hang,
    }
}

pin_project! {
    /// Response future of [`Fault`].
    pub struct ResponseFuture<S: Service<Request>, Request> {
        #[pin]
        delay: Option<Sleep>,
        #[pin]
        outcome: Outcome<S, Request>,
    }
}

impl<S, Request, T, E> Future for ResponseFuture<S, Request>
where
    S: Service<Request, Response = T, Error = E>,
    E: From<InjectedFault>,
{
    type Output = Result<T, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        if let Some(delay) = this.delay.as_mut().as_pin_mut() {
            std::task::ready!(delay.poll(cx));
            this.delay.set(None);
        }
        loop {
            match this.outcome.as_mut().project() {
                OutcomeProj::Pass { future } => return future.poll(cx),
                OutcomeProj::Delayed { call } => {
                    let (mut service, request) =
                        call.take().expect("fault future polled after completion");
                    let future = service.call(request);
                    this.outcome.set(Outcome::Pass { future });
                }
                OutcomeProj::Fail { fault } => {
                    return Poll::Ready(Err(E::from(
                        fault.take().expect("fault future polled after completion"),
                    )));
                }
                OutcomeProj::Hang => return Poll::Pending,
            }
        }
    }
}

impl<S: Service<Request>, Request> fmt::Debug for ResponseFuture<S, Request> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

//! The circuit breaker checked against a small reference model (proptest-state-machine).
//!
//! Random sequences of calls (succeeding, failing, ignored, left in flight, finished later,
//! cancelled, or hung for good), clock advances and manual operations run against both the real
//! breaker (on tokio's paused clock) and the model below, which is written from the semantics in
//! the breaker's docs, not from its code. After every step the admit/reject decision (with the
//! retry-after), the state and the counters must agree.
//!
//! The trip rules are drawn in every combination the configuration allows: failures within a
//! window, consecutive failures, and a failure rate with or without slow calls (ten buckets of
//! `window / 10`; judged after every completed call). Calls left in flight finish after clock
//! advances, so slow calls happen.
//!
//! Two clones of the service share the breaker, as tower's `Retry`, a `Buffer`'s workers or a
//! router's per-request clones do: each has its own readiness and may hold a half-open trial slot
//! taken in its `poll_ready`, and either may be dropped and replaced by a new clone, which gives
//! such a slot back.

use palisade::circuit_breaker::{
    CircuitBreaker, CircuitBreakerConfig, CircuitBreakerLayer, CircuitOpen, CircuitState,
};
use palisade::classify::Outcome;
use proptest::prelude::*;
use proptest_state_machine::{ReferenceStateMachine, StateMachineTest, prop_state_machine};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::sync::oneshot;
use tower::{BoxError, Layer, Service, ServiceExt};

const MS: Duration = Duration::from_millis(1);
/// Clones of the guarded service.
const SERVICES: usize = 2;

#[derive(Clone, Copy, Debug)]
struct Rate {
    threshold: Option<f64>,
    window: Duration,
    min_calls: u32,
    slow: Option<(Duration, f64)>,
}

#[derive(Clone, Debug)]
struct Params {
    /// `(max_failures, ttl)`.
    within: Option<(u32, Duration)>,
    consecutive: Option<u32>,
    rate: Option<Rate>,
    reset_timeout: Duration,
    half_open_max_calls: u32,
    success_threshold: u32,
    trial_timeout: Duration,
    /// Open time doubles on each re-open, capped at this (if set).
    backoff_cap: Option<Duration>,
}

impl Params {
    fn config(&self) -> CircuitBreakerConfig {
        let mut config = CircuitBreakerConfig::new("model");
        if let Some((max_failures, ttl)) = self.within {
            config = config.max_failures(max_failures).ttl(ttl);
        }
        if let Some(threshold) = self.consecutive {
            config = config.consecutive_failures(threshold);
        }
        if let Some(rate) = self.rate {
            match (rate.threshold, rate.slow) {
                (Some(threshold), slow) => {
                    config = config.failure_rate(threshold, rate.window, rate.min_calls);
                    if let Some((duration, threshold)) = slow {
                        config = config.slow_calls(duration, threshold);
                    }
                }
                (None, slow) => {
                    config = config.trip_rule(palisade::circuit_breaker::TripRule::FailureRate {
                        threshold: None,
                        window: rate.window,
                        min_calls: rate.min_calls,
                        slow_calls: slow.map(|(duration, threshold)| {
                            palisade::circuit_breaker::SlowCalls {
                                duration,
                                threshold,
                            }
                        }),
                    });
                }
            }
        }
        let mut config = config
            .reset_timeout(self.reset_timeout)
            .half_open_max_calls(self.half_open_max_calls)
            .success_threshold(self.success_threshold)
            .trial_timeout(self.trial_timeout);
        if let Some(cap) = self.backoff_cap {
            config = config.open_backoff(2.0, cap);
        }
        config
    }

    fn open_duration(&self, reopens: u32) -> Duration {
        match self.backoff_cap {
            None => self.reset_timeout,
            Some(cap) => {
                let grown = self
                    .reset_timeout
                    .saturating_mul(1u32.checked_shl(reopens).unwrap_or(u32::MAX));
                grown.min(cap).max(self.reset_timeout)
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Permit {
    Closed {
        generation: u64,
        started: Duration,
    },
    Trial {
        generation: u64,
        ticket: u64,
        started: Duration,
    },
    Untracked,
}

/// What the last step should have observed.
#[derive(Clone, Debug, PartialEq)]
enum Observed {
    Nothing,
    Admitted,
    Rejected {
        state: CircuitState,
        retry_after: Option<Duration>,
    },
    /// `ready()` answered without polling the inner service.
    TurnedAway,
    /// `ready()` polled the inner service and got its error.
    ReadyFailed,
    /// `ready()` polled the inner service, which was not ready.
    Polled,
}

#[derive(Clone, Debug)]
struct Model {
    params: Params,
    now: Duration,
    state: CircuitState,
    generation: u64,
    failures: Vec<Duration>,
    streak: u32,
    /// Completed calls of this closed period for the rate rule: (bucket, failed, slow).
    rate_calls: Vec<(u64, bool, bool)>,
    open_until: Duration,
    reopens: u32,
    trials: Vec<(u64, Duration)>,
    next_ticket: u64,
    trial_successes: u32,
    pending: Vec<Permit>,
    calls: u64,
    rejections: u64,
    recorded_failures: u64,
    transitions: u64,
    /// The trial slot (generation, ticket) each clone took in `poll_ready` for its next call.
    reserved: [Option<(u64, u64)>; SERVICES],
    last: Observed,
}

#[derive(Clone, Debug)]
enum Op {
    /// A call through this clone that finishes at once with this outcome.
    Call(usize, Outcome),
    /// A call through this clone left in flight.
    Start(usize),
    /// Finish the in-flight call at this index.
    Finish(usize, Outcome),
    /// Drop the in-flight call at this index.
    Cancel(usize),
    Advance(Duration),
    ForceOpen,
    ForceClosed,
    Reset,
    /// `ready()` on this clone while the inner service's `poll_ready` fails (a dead transport).
    ReadyFails(usize),
    /// `ready()` on this clone polled once while the inner service is not ready (a saturated
    /// `ConcurrencyLimit`); the clone keeps any trial slot it took.
    ReadyPending(usize),
    /// Drops this clone (giving back a trial slot it holds) and puts a new clone of the other in
    /// its place.
    Replace(usize),
}

impl Model {
    fn transition(&mut self, to: CircuitState) {
        let from = self.state;
        self.generation += 1;
        self.transitions += 1;
        self.state = to;
        self.trials.clear();
        self.trial_successes = 0;
        match to {
            CircuitState::Open => {
                if from == CircuitState::HalfOpen {
                    self.reopens += 1;
                }
                self.open_until = self.now + self.params.open_duration(self.reopens);
            }
            CircuitState::Closed => self.forget(),
            _ => {}
        }
    }

    fn forget(&mut self) {
        self.failures.clear();
        self.streak = 0;
        self.rate_calls.clear();
        self.reopens = 0;
    }

    /// A manual control: a control that changes nothing does nothing, except that `reset` of a
    /// closed breaker with a recorded history forgets it (starting a new generation, no event).
    fn control(&mut self, to: CircuitState) {
        if self.state != to {
            self.transition(to);
        } else if to == CircuitState::Closed
            && (!self.failures.is_empty() || self.streak > 0 || !self.rate_calls.is_empty())
        {
            self.generation += 1;
            self.forget();
        }
    }

    fn is_slow(&self, started: Duration) -> bool {
        self.params
            .rate
            .and_then(|rate| rate.slow)
            .is_some_and(|(duration, _)| self.now - started >= duration)
    }

    /// Records a completed closed-state call in the rate window; whether the rate rule trips.
    fn record_rate(&mut self, failed: bool, slow: bool) -> bool {
        let Some(rate) = self.params.rate else {
            return false;
        };
        let bucket_len = rate.window / 10;
        let bucket = (self.now.as_nanos() / bucket_len.as_nanos()) as u64;
        self.rate_calls.push((bucket, failed, slow));
        let in_window: Vec<_> = self
            .rate_calls
            .iter()
            .filter(|(at, _, _)| bucket - at < 10)
            .collect();
        let calls = in_window.len();
        if calls < rate.min_calls as usize {
            return false;
        }
        let failures = in_window.iter().filter(|(_, failed, _)| *failed).count();
        let slows = in_window.iter().filter(|(_, _, slow)| *slow).count();
        rate.threshold
            .is_some_and(|threshold| failures as f64 / calls as f64 >= threshold)
            || rate
                .slow
                .is_some_and(|(_, threshold)| slows as f64 / calls as f64 >= threshold)
    }

    /// Records a failure in `Closed`; whether a rule trips.
    fn closed_failure(&mut self, slow: bool) -> bool {
        self.recorded_failures += 1;
        let mut trip = false;
        if let Some((max_failures, ttl)) = self.params.within {
            let now = self.now;
            self.failures.retain(|at| now - *at < ttl);
            self.failures.push(now);
            trip |= self.failures.len() >= max_failures as usize;
        }
        if let Some(threshold) = self.params.consecutive {
            self.streak += 1;
            trip |= self.streak >= threshold;
        }
        trip |= self.record_rate(true, slow);
        trip
    }

    /// Whether the clone's reserved trial slot is still its own.
    fn holds_reservation(&self, service: usize) -> bool {
        self.reserved[service].is_some_and(|(generation, ticket)| {
            self.state == CircuitState::HalfOpen
                && generation == self.generation
                && self.trials.iter().any(|(t, _)| *t == ticket)
        })
    }

    /// Takes a half-open trial slot, reclaiming a hung trial's; `false` if none is free.
    fn take_trial_slot(&mut self) -> Option<u64> {
        let limit = self.params.half_open_max_calls as usize;
        if self.trials.len() >= limit && self.now - self.trials[0].1 >= self.params.trial_timeout {
            self.trials.remove(0);
        }
        if self.trials.len() >= limit {
            return None;
        }
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        self.trials.push((ticket, self.now));
        Some(ticket)
    }

    /// `poll_ready` up to the inner service: whether it polls the inner service (else it answers
    /// ready itself, and `call` rejects). A caller let through to a trial takes its slot here.
    fn poll_ready(&mut self, service: usize) -> bool {
        match self.state {
            CircuitState::Closed | CircuitState::ForcedClosed => true,
            CircuitState::ForcedOpen => false,
            CircuitState::Open if self.now < self.open_until => false,
            CircuitState::Open | CircuitState::HalfOpen => {
                if self.state == CircuitState::Open {
                    self.transition(CircuitState::HalfOpen);
                }
                if self.holds_reservation(service) {
                    return true;
                }
                match self.take_trial_slot() {
                    Some(ticket) => {
                        self.reserved[service] = Some((self.generation, ticket));
                        true
                    }
                    None => false,
                }
            }
        }
    }

    /// `ready()` with an inner service whose `poll_ready` fails: the breaker answers without
    /// polling it while it turns calls away; otherwise the error counts as a failed call in
    /// `Closed`, and as a failed trial in `HalfOpen` (a trial due in `Open` took its slot first).
    fn ready_fails(&mut self, service: usize) {
        if !self.poll_ready(service) {
            self.last = Observed::TurnedAway;
            return;
        }
        self.last = Observed::ReadyFailed;
        self.reserved[service] = None;
        let opens = match self.state {
            CircuitState::Closed => self.closed_failure(false),
            CircuitState::HalfOpen => {
                self.recorded_failures += 1;
                true
            }
            _ => false,
        };
        if opens {
            self.transition(CircuitState::Open);
        }
    }

    /// `ready()` polled once with an inner service that is not ready.
    fn ready_pending(&mut self, service: usize) {
        self.last = if self.poll_ready(service) {
            Observed::Polled
        } else {
            Observed::TurnedAway
        };
    }

    fn reject(&mut self, state: CircuitState, retry_after: Option<Duration>) -> Option<Permit> {
        self.rejections += 1;
        self.last = Observed::Rejected { state, retry_after };
        None
    }

    /// `ready()` (the inner service is ready) then `call`.
    fn admit(&mut self, service: usize) -> Option<Permit> {
        if !self.poll_ready(service) {
            return match self.state {
                CircuitState::ForcedOpen => self.reject(CircuitState::ForcedOpen, None),
                CircuitState::Open => {
                    let wait = self.open_until - self.now;
                    self.reject(CircuitState::Open, Some(wait))
                }
                _ => {
                    let wait = self.trials[0].1 + self.params.trial_timeout - self.now;
                    self.reject(CircuitState::HalfOpen, Some(wait))
                }
            };
        }
        match self.state {
            CircuitState::Closed => {
                self.calls += 1;
                self.last = Observed::Admitted;
                Some(Permit::Closed {
                    generation: self.generation,
                    started: self.now,
                })
            }
            CircuitState::ForcedClosed => {
                self.reserved[service] = None;
                self.calls += 1;
                self.last = Observed::Admitted;
                Some(Permit::Untracked)
            }
            CircuitState::HalfOpen => {
                // `poll_ready` left this service holding a trial slot; the trial's time starts
                // at the call.
                let held = self.holds_reservation(service);
                let (generation, ticket) = self.reserved[service].take().expect("a reserved slot");
                assert!(held, "poll_ready let a call through without a slot");
                self.trials.retain(|(t, _)| *t != ticket);
                self.trials.push((ticket, self.now));
                self.calls += 1;
                self.last = Observed::Admitted;
                Some(Permit::Trial {
                    generation,
                    ticket,
                    started: self.now,
                })
            }
            CircuitState::Open | CircuitState::ForcedOpen => {
                unreachable!("poll_ready polls the inner service only when a call can follow")
            }
        }
    }

    fn complete(&mut self, permit: Permit, outcome: Outcome) {
        match permit {
            Permit::Closed {
                generation,
                started,
            } if generation == self.generation && self.state == CircuitState::Closed => {
                let slow = self.is_slow(started);
                let trip = match outcome {
                    Outcome::Success => {
                        self.streak = 0;
                        self.record_rate(false, slow)
                    }
                    Outcome::Failure => self.closed_failure(slow),
                    Outcome::Ignored => false,
                };
                if trip {
                    self.transition(CircuitState::Open);
                }
            }
            Permit::Trial {
                generation,
                ticket,
                started,
            } if generation == self.generation && self.state == CircuitState::HalfOpen => {
                let Some(index) = self.trials.iter().position(|(t, _)| *t == ticket) else {
                    return;
                };
                self.trials.remove(index);
                let outcome = if outcome == Outcome::Success && self.is_slow(started) {
                    Outcome::Failure
                } else {
                    outcome
                };
                match outcome {
                    Outcome::Success => {
                        self.trial_successes += 1;
                        if self.trial_successes >= self.params.success_threshold {
                            self.transition(CircuitState::Closed);
                        }
                    }
                    Outcome::Failure => {
                        self.recorded_failures += 1;
                        self.transition(CircuitState::Open);
                    }
                    Outcome::Ignored => {}
                }
            }
            _ => {}
        }
    }

    /// Drops a clone: a trial slot it still holds goes back, without a verdict.
    fn replace(&mut self, service: usize) {
        if self.holds_reservation(service) {
            let (_, ticket) = self.reserved[service].expect("held");
            self.trials.retain(|(t, _)| *t != ticket);
        }
        self.reserved[service] = None;
    }

    fn cancel(&mut self, permit: Permit) {
        if let Permit::Trial {
            generation, ticket, ..
        } = permit
            && generation == self.generation
            && self.state == CircuitState::HalfOpen
        {
            self.trials.retain(|(t, _)| *t != ticket);
        }
    }
}

struct BreakerModel;

fn outcome() -> impl Strategy<Value = Outcome> {
    prop_oneof![
        3 => Just(Outcome::Success),
        4 => Just(Outcome::Failure),
        1 => Just(Outcome::Ignored),
    ]
}

impl ReferenceStateMachine for BreakerModel {
    type State = Model;
    type Transition = Op;

    fn init_state() -> BoxedStrategy<Model> {
        let share = || prop_oneof![Just(0.25), Just(0.5), Just(0.75), Just(1.0)];
        let rate = (
            prop::option::of(share()),
            1u32..=6,
            1u32..=5,
            prop::option::of((1u32..=4, share())),
        )
            .prop_map(|(threshold, window, min_calls, slow)| Rate {
                // A rate rule needs a failure threshold or slow calls.
                threshold: threshold.or(if slow.is_none() { Some(0.5) } else { None }),
                window: window * 500 * MS,
                min_calls,
                slow: slow.map(|(d, t)| (d * 250 * MS, t)),
            });
        (
            (
                prop::option::of((1u32..=4, 1u32..=6)),
                prop::option::of(1u32..=4),
                prop::option::of(rate),
            ),
            1u32..=6,
            1u32..=3,
            1u32..=3,
            1u32..=8,
            prop::option::of(2u32..=20),
        )
            .prop_map(
                |((within, consecutive, rate), reset, half_open, successes, trial, cap)| {
                    // No rule configured means the NestJS default: 5 failures within 10 s.
                    let within = match (within, consecutive, rate) {
                        (None, None, None) => Some((5, 10 * 1000 * MS)),
                        (within, ..) => within.map(|(max, ttl)| (max, ttl * 500 * MS)),
                    };
                    Model {
                        params: Params {
                            within,
                            consecutive,
                            rate,
                            reset_timeout: reset * 500 * MS,
                            half_open_max_calls: half_open,
                            success_threshold: successes,
                            trial_timeout: trial * 500 * MS,
                            backoff_cap: cap.map(|c| c * 500 * MS),
                        },
                        now: Duration::ZERO,
                        state: CircuitState::Closed,
                        generation: 0,
                        failures: Vec::new(),
                        streak: 0,
                        rate_calls: Vec::new(),
                        open_until: Duration::ZERO,
                        reopens: 0,
                        trials: Vec::new(),
                        next_ticket: 0,
                        trial_successes: 0,
                        pending: Vec::new(),
                        calls: 0,
                        rejections: 0,
                        recorded_failures: 0,
                        transitions: 0,
                        reserved: [None; SERVICES],
                        last: Observed::Nothing,
                    }
                },
            )
            .boxed()
    }

    fn transitions(state: &Model) -> BoxedStrategy<Op> {
        let pending = state.pending.len();
        let mut choices: Vec<(u32, BoxedStrategy<Op>)> = vec![
            (
                8,
                (0..SERVICES, outcome())
                    .prop_map(|(s, o)| Op::Call(s, o))
                    .boxed(),
            ),
            (4, (0..SERVICES).prop_map(Op::Start).boxed()),
            // Durations are multiples of 500 ms, so quarter-second steps land exactly on the
            // boundaries (a failure exactly `ttl` old, a wait of exactly `retry_after`); 1 ms
            // nudges probe just either side of them.
            (
                5,
                prop_oneof![
                    4 => (1u32..=12).prop_map(|n| Op::Advance(n * 250 * MS)),
                    1 => Just(Op::Advance(MS)),
                ]
                .boxed(),
            ),
            (1, Just(Op::ForceOpen).boxed()),
            (1, Just(Op::ForceClosed).boxed()),
            (1, Just(Op::Reset).boxed()),
            (2, (0..SERVICES).prop_map(Op::ReadyFails).boxed()),
            (2, (0..SERVICES).prop_map(Op::ReadyPending).boxed()),
            (1, (0..SERVICES).prop_map(Op::Replace).boxed()),
        ];
        if pending > 0 {
            choices.push((
                4,
                (0..pending, outcome())
                    .prop_map(|(i, o)| Op::Finish(i, o))
                    .boxed(),
            ));
            choices.push((2, (0..pending).prop_map(Op::Cancel).boxed()));
        }
        prop::strategy::Union::new_weighted(choices).boxed()
    }

    fn preconditions(state: &Model, op: &Op) -> bool {
        match op {
            Op::Finish(i, _) | Op::Cancel(i) => *i < state.pending.len(),
            _ => true,
        }
    }

    fn apply(mut state: Model, op: &Op) -> Model {
        state.last = Observed::Nothing;
        match op {
            Op::Call(service, outcome) => {
                if let Some(permit) = state.admit(*service) {
                    state.complete(permit, *outcome);
                }
            }
            Op::Start(service) => {
                if let Some(permit) = state.admit(*service) {
                    state.pending.push(permit);
                } else {
                    // A rejected call leaves nothing in flight; the SUT mirrors this.
                }
            }
            Op::Finish(i, outcome) => {
                let permit = state.pending.remove(*i);
                state.complete(permit, *outcome);
            }
            Op::Cancel(i) => {
                let permit = state.pending.remove(*i);
                state.cancel(permit);
            }
            Op::Advance(d) => state.now += *d,
            Op::ForceOpen => state.control(CircuitState::ForcedOpen),
            Op::ForceClosed => state.control(CircuitState::ForcedClosed),
            Op::Reset => state.control(CircuitState::Closed),
            Op::ReadyFails(service) => state.ready_fails(*service),
            Op::ReadyPending(service) => state.ready_pending(*service),
            Op::Replace(service) => state.replace(*service),
        }
        state
    }
}

type Reply = Result<&'static str, BoxError>;
type Pending = Pin<Box<dyn Future<Output = Reply>>>;

/// The guarded service: a call answers with the outcome sent for it; `poll_ready` fails once
/// while `fail_ready` is set, or is not ready once while `pend_ready` is, and clears the flag (so
/// the test sees whether it was polled). Clones share the flags.
#[derive(Clone)]
struct Inner {
    fail_ready: Arc<AtomicBool>,
    pend_ready: Arc<AtomicBool>,
}

impl Service<oneshot::Receiver<Outcome>> for Inner {
    type Response = &'static str;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Reply> + Send>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), BoxError>> {
        if self.pend_ready.swap(false, Ordering::SeqCst) {
            return std::task::Poll::Pending;
        }
        std::task::Poll::Ready(if self.fail_ready.swap(false, Ordering::SeqCst) {
            Err("not ready".into())
        } else {
            Ok(())
        })
    }

    fn call(&mut self, outcome: oneshot::Receiver<Outcome>) -> Self::Future {
        Box::pin(async move {
            match outcome.await {
                Ok(Outcome::Success) => Ok("ok"),
                Ok(Outcome::Ignored) => Err("ignored".into()),
                Ok(Outcome::Failure) | Err(_) => Err("failed".into()),
            }
        })
    }
}

/// The guarded service, one clone of it.
type Guarded = CircuitBreaker<Inner, fn(&Reply) -> Outcome>;

struct Sut {
    runtime: tokio::runtime::Runtime,
    services: Vec<Guarded>,
    pending: Vec<(oneshot::Sender<Outcome>, Pending)>,
    ready_fails: Arc<AtomicBool>,
    ready_pends: Arc<AtomicBool>,
}

fn classify(result: &Reply) -> Outcome {
    match result {
        Ok(_) => Outcome::Success,
        Err(e) if e.to_string() == "ignored" => Outcome::Ignored,
        Err(_) => Outcome::Failure,
    }
}

impl Sut {
    /// Calls the breaker; `Ok` holds the in-flight call if admitted, `Err` the rejection.
    fn start(
        &mut self,
        service: usize,
    ) -> Result<(oneshot::Sender<Outcome>, Pending), CircuitOpen> {
        let (tx, rx) = oneshot::channel();
        let service = &mut self.services[service];
        self.runtime.block_on(service.ready()).unwrap();
        // Inside the runtime's context, so the breaker reads the paused clock.
        let _context = self.runtime.enter();
        let future = service.call(rx);
        let mut future: Pending = Box::pin(future);
        // Poll once: a rejection resolves at once; an admitted call waits for its outcome.
        match self
            .runtime
            .block_on(async { futures_util::poll!(future.as_mut()) })
        {
            std::task::Poll::Pending => Ok((tx, future)),
            std::task::Poll::Ready(Err(e)) => Err(*e.downcast::<CircuitOpen>().expect("rejection")),
            std::task::Poll::Ready(Ok(_)) => panic!("a call finished before its outcome was sent"),
        }
    }

    fn finish(&mut self, (tx, future): (oneshot::Sender<Outcome>, Pending), outcome: Outcome) {
        tx.send(outcome).unwrap();
        let result = self.runtime.block_on(future);
        assert_eq!(classify(&result), outcome);
    }

    fn observe(&self, observed: Result<(), CircuitOpen>, expected: &Observed) {
        match (observed, expected) {
            (Ok(()), Observed::Admitted) => {}
            (Err(open), Observed::Rejected { state, retry_after }) => {
                assert_eq!((open.state(), open.retry_after()), (*state, *retry_after));
            }
            (observed, expected) => panic!("breaker {observed:?}, model {expected:?}"),
        }
    }
}

struct BreakerTest;

impl StateMachineTest for BreakerTest {
    type SystemUnderTest = Sut;
    type Reference = BreakerModel;

    fn init_test(model: &Model) -> Sut {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        let ready_fails = Arc::new(AtomicBool::new(false));
        let ready_pends = Arc::new(AtomicBool::new(false));
        let first = runtime.block_on(async {
            let inner = Inner {
                fail_ready: Arc::clone(&ready_fails),
                pend_ready: Arc::clone(&ready_pends),
            };
            CircuitBreakerLayer::new(model.params.config())
                .with_classifier(classify as fn(&Reply) -> Outcome)
                .layer(inner)
        });
        let second = first.clone();
        Sut {
            runtime,
            services: vec![first, second],
            pending: Vec::new(),
            ready_fails,
            ready_pends,
        }
    }

    fn apply(mut sut: Sut, model: &Model, op: Op) -> Sut {
        match op {
            Op::Call(service, outcome) => {
                let observed = sut.start(service).map(|call| sut.finish(call, outcome));
                sut.observe(observed, &model.last);
            }
            Op::Start(service) => {
                let observed = sut.start(service).map(|call| sut.pending.push(call));
                sut.observe(observed, &model.last);
            }
            Op::Finish(i, outcome) => {
                let call = sut.pending.remove(i);
                sut.finish(call, outcome);
            }
            Op::Cancel(i) => drop(sut.pending.remove(i)),
            Op::Advance(d) => sut.runtime.block_on(tokio::time::advance(d)),
            Op::ForceOpen => sut.services[0].handle().force_open(),
            Op::ForceClosed => sut.services[1].handle().force_closed(),
            Op::Reset => sut.services[0].handle().reset(),
            Op::ReadyFails(service) => {
                sut.ready_fails.store(true, Ordering::SeqCst);
                let ready = sut
                    .runtime
                    .block_on(sut.services[service].ready())
                    .map(|_| ());
                let polled = !sut.ready_fails.swap(false, Ordering::SeqCst);
                match (&model.last, ready) {
                    (Observed::TurnedAway, Ok(())) => assert!(!polled, "polled the inner service"),
                    (Observed::ReadyFailed, Err(error)) => {
                        assert!(polled);
                        assert_eq!(error.to_string(), "not ready");
                    }
                    (expected, ready) => panic!("breaker {ready:?}, model {expected:?}"),
                }
            }
            Op::ReadyPending(service) => {
                sut.ready_pends.store(true, Ordering::SeqCst);
                let service = &mut sut.services[service];
                let ready = sut.runtime.block_on(async {
                    futures_util::poll!(std::pin::pin!(service.ready())).map(|ready| ready.is_ok())
                });
                let polled = !sut.ready_pends.swap(false, Ordering::SeqCst);
                match (&model.last, ready) {
                    (Observed::TurnedAway, std::task::Poll::Ready(true)) => {
                        assert!(!polled, "polled the inner service")
                    }
                    (Observed::Polled, std::task::Poll::Pending) => assert!(polled),
                    (expected, ready) => panic!("breaker {ready:?}, model {expected:?}"),
                }
            }
            Op::Replace(service) => {
                let other = sut.services[1 - service].clone();
                // The old clone is dropped here, inside the runtime (its slot goes back).
                let _context = sut.runtime.enter();
                sut.services[service] = other;
            }
        }
        sut
    }

    fn check_invariants(sut: &Sut, model: &Model) {
        let handle = sut.services[0].handle();
        assert_eq!(handle.state(), model.state, "state");
        let metrics = handle.metrics();
        assert_eq!(
            (
                metrics.calls,
                metrics.rejections,
                metrics.failures,
                metrics.transitions
            ),
            (
                model.calls,
                model.rejections,
                model.recorded_failures,
                model.transitions
            ),
            "counters (calls, rejections, failures, transitions)"
        );
        assert_eq!(sut.pending.len(), model.pending.len());
    }
}

prop_state_machine! {
    #![proptest_config(ProptestConfig { cases: 2048, ..ProptestConfig::default() })]

    #[test]
    fn breaker_agrees_with_the_model(sequential 1..80 => BreakerTest);
}

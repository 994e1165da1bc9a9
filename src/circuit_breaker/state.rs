//! The breaker's state machine.
//!
//! # Layout
//!
//! The fast path reads one atomic word, `word = generation << 3 | state`. In `Closed` that is all a
//! call costs; in `Open` a rejection adds one clock read and one more atomic load (`open_until`).
//! Everything else — the failure history, half-open trial slots, counters that only move on
//! failures, the event channel — sits behind a mutex that only failures, half-open traffic and
//! transitions take.
//!
//! Every transition bumps the generation. A permit remembers the generation it was issued in and a
//! result is applied only if the generation is still current, so calls admitted before a
//! transition never move the new state.
//!
//! # Why slots are `'static`
//!
//! A response future must be able to report a failure after the service that created it is gone,
//! so it needs a reference to the shared state. An `Arc` clone per call would cost two locked
//! read-modify-writes and, with two threads sharing a breaker, a cache line bouncing between cores —
//! more than the rest of the layer. Instead the state lives in a leaked [`Slot`] that is recycled
//! when its breaker is dropped: retiring bumps the generation, so a straggling future from the old
//! breaker finds a foreign generation and records nothing. Slots are never freed, so the number of
//! slots is bounded by the number of breakers alive at once.

use super::config::{CircuitBreakerConfig, TripRule};
use super::{CircuitState, StateChange, TransitionReason};
use crate::classify::Outcome;
use crate::counter::StripedCounter;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::broadcast;
use tokio::time::Instant;

const CLOSED: u64 = 0;
const OPEN: u64 = 1;
const HALF_OPEN: u64 = 2;
const FORCED_OPEN: u64 = 3;
const FORCED_CLOSED: u64 = 4;
const RETIRED: u64 = 5;
const STATE_BITS: u32 = 3;
const STATE_MASK: u64 = (1 << STATE_BITS) - 1;

/// Buckets in the failure-rate window.
const RATE_BUCKETS: usize = 10;
/// Capacity of the state-change channel; a subscriber that falls further behind skips events.
const EVENT_CAPACITY: usize = 64;

fn encode(generation: u64, state: u64) -> u64 {
    generation << STATE_BITS | state
}

fn generation_of(word: u64) -> u64 {
    word >> STATE_BITS
}

fn code_of(state: CircuitState) -> u64 {
    match state {
        CircuitState::Closed => CLOSED,
        CircuitState::Open => OPEN,
        CircuitState::HalfOpen => HALF_OPEN,
        CircuitState::ForcedOpen => FORCED_OPEN,
        CircuitState::ForcedClosed => FORCED_CLOSED,
    }
}

fn state_of(word: u64) -> CircuitState {
    match word & STATE_MASK {
        CLOSED => CircuitState::Closed,
        OPEN => CircuitState::Open,
        HALF_OPEN => CircuitState::HalfOpen,
        FORCED_OPEN => CircuitState::ForcedOpen,
        // A retired slot is only reachable from stale futures, which never ask for the state.
        _ => CircuitState::ForcedClosed,
    }
}

fn nanos_since(epoch: Instant, now: Instant) -> u64 {
    u64::try_from(now.saturating_duration_since(epoch).as_nanos()).unwrap_or(u64::MAX)
}

/// What a successful call admitted in `Closed` must do; fixed by the trip rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SuccessAction {
    /// `FailuresWithin`: successes do not matter.
    Nothing,
    /// `ConsecutiveFailures`: a success ends the streak.
    EndStreak,
    /// `FailureRate`: every call is recorded.
    Record,
}

impl SuccessAction {
    pub(crate) fn for_rule(rule: &TripRule) -> Self {
        match rule {
            TripRule::FailuresWithin { .. } => SuccessAction::Nothing,
            TripRule::ConsecutiveFailures { .. } => SuccessAction::EndStreak,
            TripRule::FailureRate { .. } => SuccessAction::Record,
        }
    }
}

/// Why a call was turned away; the service adds its name to make a
/// [`CircuitOpen`](super::CircuitOpen). Two words, so it comes back in registers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Rejection {
    /// Nanoseconds until a call could be admitted; `u64::MAX` when unknown (forced open).
    pub(crate) retry_after_nanos: u64,
    pub(crate) state: CircuitState,
}

impl Rejection {
    fn after(state: CircuitState, nanos: u64) -> Self {
        Rejection {
            retry_after_nanos: nanos.min(u64::MAX - 1),
            state,
        }
    }

    fn forced() -> Self {
        Rejection {
            retry_after_nanos: u64::MAX,
            state: CircuitState::ForcedOpen,
        }
    }
}

/// The right to make one call, and to report its result.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Permit {
    /// Admitted in `Closed` during `generation`.
    Closed { generation: u64 },
    /// A half-open trial holding slot `ticket`.
    Trial { generation: u64, ticket: u64 },
    /// Admitted while forced closed (or already reported): nothing to report.
    Untracked,
}

#[derive(Clone, Copy, Debug)]
struct Trial {
    ticket: u64,
    admitted: Instant,
}

#[derive(Clone, Copy, Debug, Default)]
struct Bucket {
    index: u64,
    calls: u32,
    failures: u32,
    slow: u32,
}

struct Machine {
    config: CircuitBreakerConfig,
    epoch: Instant,
    generation: u64,
    state: CircuitState,
    /// `FailuresWithin`: timestamps of the most recent failures, oldest first, at most
    /// `max_failures` of them.
    recent_failures: VecDeque<Instant>,
    /// `FailureRate`: the rolling window.
    buckets: [Bucket; RATE_BUCKETS],
    trials: Vec<Trial>,
    next_ticket: u64,
    trial_successes: u32,
    reopens: u32,
    failures: u64,
    transitions: u64,
    calls_base: u64,
    rejections_base: u64,
    events: broadcast::Sender<StateChange>,
}

/// Shared state of one breaker. See the module docs.
pub(crate) struct Slot {
    word: AtomicU64,
    /// In `Open`: nanoseconds after the breaker's epoch at which a trial is admitted.
    open_until: AtomicU64,
    /// `ConsecutiveFailures`: the current streak.
    streak: AtomicU32,
    /// `FailureRate` with slow calls: the slow-call threshold in nanoseconds.
    slow_nanos: AtomicU64,
    calls: StripedCounter,
    rejections: StripedCounter,
    machine: Mutex<Machine>,
}

static POOL: Mutex<Vec<&'static Slot>> = Mutex::new(Vec::new());

/// A snapshot of a breaker's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Metrics {
    /// Calls let through to the inner service.
    pub calls: u64,
    /// Calls whose result was classified as a failure (those recorded while closed or half-open).
    pub failures: u64,
    /// Calls rejected without calling the inner service.
    pub rejections: u64,
    /// State transitions so far.
    pub transitions: u64,
}

impl Slot {
    fn lock(&self) -> MutexGuard<'_, Machine> {
        // The machine's invariants hold between statements that could panic, and a panic inside
        // the lock would come from a bug elsewhere (tracing, a subscriber); keep serving.
        self.machine
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Takes a slot from the pool (or makes one) and sets it up for a new breaker.
    pub(crate) fn claim(config: CircuitBreakerConfig, epoch: Instant) -> &'static Slot {
        let recycled = POOL
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .pop();
        let slot = recycled.unwrap_or_else(|| {
            Box::leak(Box::new(Slot {
                word: AtomicU64::new(encode(0, RETIRED)),
                open_until: AtomicU64::new(0),
                streak: AtomicU32::new(0),
                slow_nanos: AtomicU64::new(u64::MAX),
                calls: StripedCounter::new(),
                rejections: StripedCounter::new(),
                machine: Mutex::new(Machine {
                    config: config.clone(),
                    epoch,
                    generation: 0,
                    state: CircuitState::Closed,
                    recent_failures: VecDeque::new(),
                    buckets: [Bucket::default(); RATE_BUCKETS],
                    trials: Vec::new(),
                    next_ticket: 0,
                    trial_successes: 0,
                    reopens: 0,
                    failures: 0,
                    transitions: 0,
                    calls_base: 0,
                    rejections_base: 0,
                    events: broadcast::channel(1).0,
                }),
            }))
        });
        let mut machine = slot.lock();
        let generation = machine.generation + 1;
        let capacity = match config.rule {
            TripRule::FailuresWithin { max_failures, .. } => max_failures.min(1024) as usize,
            _ => 0,
        };
        *machine = Machine {
            config,
            epoch,
            generation,
            state: CircuitState::Closed,
            recent_failures: VecDeque::with_capacity(capacity),
            buckets: [Bucket::default(); RATE_BUCKETS],
            trials: Vec::new(),
            next_ticket: 0,
            trial_successes: 0,
            reopens: 0,
            failures: 0,
            transitions: 0,
            calls_base: slot.calls.sum(),
            rejections_base: slot.rejections.sum(),
            events: broadcast::channel(EVENT_CAPACITY).0,
        };
        let slow_nanos = match &machine.config.rule {
            TripRule::FailureRate {
                slow_calls: Some(slow),
                ..
            } => u64::try_from(slow.duration.as_nanos()).unwrap_or(u64::MAX),
            _ => u64::MAX,
        };
        slot.slow_nanos.store(slow_nanos, Ordering::Relaxed);
        slot.streak.store(0, Ordering::Relaxed);
        slot.open_until.store(0, Ordering::Relaxed);
        slot.word
            .store(encode(generation, CLOSED), Ordering::Release);
        drop(machine);
        slot
    }

    /// Returns the slot to the pool; results of calls still in flight are disregarded.
    pub(crate) fn retire(&'static self) {
        let mut machine = self.lock();
        machine.generation += 1;
        machine.trials.clear();
        // Dropping the sender ends every subscription.
        machine.events = broadcast::channel(1).0;
        self.word
            .store(encode(machine.generation, RETIRED), Ordering::Release);
        drop(machine);
        POOL.lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(self);
    }

    /// Admits a call if the breaker is plainly closed, returning the closed generation; `Err`
    /// carries the state word for [`acquire_not_closed`](Self::acquire_not_closed). The fast path of
    /// the whole breaker: one atomic load, one branch, one per-thread counter bump.
    #[inline(always)]
    pub(crate) fn acquire_closed(&'static self) -> Result<u64, u64> {
        let word = self.word.load(Ordering::Acquire);
        if word & STATE_MASK == CLOSED {
            self.calls.increment();
            Ok(generation_of(word))
        } else {
            Err(word)
        }
    }

    /// Admits or rejects a call in every state but `Closed`, given the word `acquire_closed` saw.
    /// Its one caller is already out of line, so that the closed path stays one branch.
    #[inline]
    pub(crate) fn acquire_not_closed(
        &'static self,
        word: u64,
        epoch: Instant,
    ) -> Result<Permit, Rejection> {
        match word & STATE_MASK {
            OPEN => {
                let now = Instant::now();
                let until = self.open_until.load(Ordering::Acquire);
                let elapsed = nanos_since(epoch, now);
                if elapsed < until {
                    self.rejections.increment();
                    Err(Rejection::after(CircuitState::Open, until - elapsed))
                } else {
                    self.acquire_slow(now)
                }
            }
            FORCED_CLOSED => {
                self.calls.increment();
                Ok(Permit::Untracked)
            }
            FORCED_OPEN => {
                self.rejections.increment();
                Err(Rejection::forced())
            }
            _ => self.acquire_slow(Instant::now()),
        }
    }

    #[cold]
    fn acquire_slow(&'static self, now: Instant) -> Result<Permit, Rejection> {
        let mut machine = self.lock();
        let machine = &mut *machine;
        match machine.state {
            CircuitState::Closed => {
                self.calls.increment();
                return Ok(Permit::Closed {
                    generation: machine.generation,
                });
            }
            CircuitState::ForcedClosed => {
                self.calls.increment();
                return Ok(Permit::Untracked);
            }
            CircuitState::ForcedOpen => {
                self.rejections.increment();
                return Err(Rejection::forced());
            }
            CircuitState::Open => {
                let until = self.open_until.load(Ordering::Relaxed);
                let elapsed = nanos_since(machine.epoch, now);
                if elapsed < until {
                    self.rejections.increment();
                    return Err(Rejection::after(CircuitState::Open, until - elapsed));
                }
                machine.transition(
                    self,
                    CircuitState::HalfOpen,
                    TransitionReason::ResetTimeoutElapsed,
                    now,
                );
            }
            CircuitState::HalfOpen => {}
        }

        // Half-open: admit a trial if a slot is free, reclaiming one held by a hung trial.
        let trial_timeout = machine.config.effective_trial_timeout();
        let limit = machine.config.half_open_max_calls as usize;
        if machine.trials.len() >= limit
            && let Some(oldest) = machine.trials.first().copied()
            && now.saturating_duration_since(oldest.admitted) >= trial_timeout
        {
            machine.trials.remove(0);
            tracing::warn!(
                breaker = %machine.config.name,
                hung_for = ?now.saturating_duration_since(oldest.admitted),
                "half-open trial call did not finish within the trial timeout; admitting another"
            );
        }
        if machine.trials.len() < limit {
            let ticket = machine.next_ticket;
            machine.next_ticket += 1;
            machine.trials.push(Trial {
                ticket,
                admitted: now,
            });
            self.calls.increment();
            return Ok(Permit::Trial {
                generation: machine.generation,
                ticket,
            });
        }
        let oldest = machine.trials[0].admitted;
        let retry_after = (oldest + trial_timeout).saturating_duration_since(now);
        self.rejections.increment();
        Err(Rejection::after(
            CircuitState::HalfOpen,
            u64::try_from(retry_after.as_nanos()).unwrap_or(u64::MAX),
        ))
    }

    /// A call admitted in `Closed` failed.
    #[cold]
    pub(crate) fn record_failure(&self, generation: u64, slow: bool) {
        let now = Instant::now();
        let mut machine = self.lock();
        if machine.generation != generation || machine.state != CircuitState::Closed {
            return;
        }
        machine.failures += 1;
        let trip = match machine.config.rule {
            TripRule::FailuresWithin { max_failures, ttl } => {
                let recent = &mut machine.recent_failures;
                while recent
                    .front()
                    .is_some_and(|at| now.saturating_duration_since(*at) >= ttl)
                {
                    recent.pop_front();
                }
                if recent.len() >= max_failures as usize {
                    recent.pop_front();
                }
                recent.push_back(now);
                recent.len() >= max_failures as usize
            }
            TripRule::ConsecutiveFailures { threshold } => {
                self.streak.fetch_add(1, Ordering::Relaxed) + 1 >= threshold
            }
            TripRule::FailureRate { .. } => machine.record_rate(now, true, slow),
        };
        if trip {
            machine.transition(self, CircuitState::Open, TransitionReason::Tripped, now);
        }
    }

    /// A call admitted in `Closed` succeeded under the consecutive-failures rule.
    #[inline]
    pub(crate) fn end_streak(&self, generation: u64) {
        if self.streak.load(Ordering::Relaxed) != 0
            && generation_of(self.word.load(Ordering::Relaxed)) == generation
        {
            self.streak.store(0, Ordering::Relaxed);
        }
    }

    /// Whether a call that took `elapsed` counts as slow.
    pub(crate) fn is_slow(&self, elapsed: Duration) -> bool {
        u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX)
            >= self.slow_nanos.load(Ordering::Relaxed)
    }

    /// A call admitted in `Closed` succeeded under the failure-rate rule.
    pub(crate) fn record_success(&self, generation: u64, slow: bool) {
        let now = Instant::now();
        let mut machine = self.lock();
        if machine.generation != generation || machine.state != CircuitState::Closed {
            return;
        }
        if machine.record_rate(now, false, slow) {
            machine.transition(self, CircuitState::Open, TransitionReason::Tripped, now);
        }
    }

    /// A half-open trial finished.
    #[cold]
    pub(crate) fn record_trial(&self, generation: u64, ticket: u64, outcome: Outcome) {
        let now = Instant::now();
        let mut machine = self.lock();
        if machine.generation != generation || machine.state != CircuitState::HalfOpen {
            return;
        }
        let Some(position) = machine.trials.iter().position(|t| t.ticket == ticket) else {
            // Its slot was reclaimed as hung; the late verdict is disregarded.
            return;
        };
        machine.trials.remove(position);
        match outcome {
            Outcome::Success => {
                machine.trial_successes += 1;
                if machine.trial_successes >= machine.config.success_threshold {
                    machine.transition(
                        self,
                        CircuitState::Closed,
                        TransitionReason::TrialsSucceeded,
                        now,
                    );
                }
            }
            Outcome::Failure => {
                machine.failures += 1;
                machine.transition(self, CircuitState::Open, TransitionReason::TrialFailed, now);
            }
            Outcome::Ignored => {}
        }
    }

    /// A half-open trial was dropped before it finished: free its slot without a verdict.
    #[cold]
    pub(crate) fn release_trial(&self, generation: u64, ticket: u64) {
        let mut machine = self.lock();
        if machine.generation == generation && machine.state == CircuitState::HalfOpen {
            machine.trials.retain(|t| t.ticket != ticket);
        }
    }

    /// Moves to `state` by hand (`force_open`, `force_closed`, `reset`).
    pub(crate) fn force(&self, state: CircuitState, reason: TransitionReason) {
        let now = Instant::now();
        let mut machine = self.lock();
        machine.transition(self, state, reason, now);
    }

    /// The current state (as of the last transition: `Open` turns `HalfOpen` on the first call
    /// after the reset timeout, not by a timer).
    pub(crate) fn state(&self) -> CircuitState {
        state_of(self.word.load(Ordering::Acquire))
    }

    pub(crate) fn metrics(&self) -> Metrics {
        let machine = self.lock();
        Metrics {
            calls: self.calls.sum().wrapping_sub(machine.calls_base),
            failures: machine.failures,
            rejections: self.rejections.sum().wrapping_sub(machine.rejections_base),
            transitions: machine.transitions,
        }
    }

    pub(crate) fn subscribe(&self) -> broadcast::Receiver<StateChange> {
        self.lock().events.subscribe()
    }
}

impl Machine {
    /// Records one completed call in the failure-rate window; returns whether the circuit trips.
    fn record_rate(&mut self, now: Instant, failed: bool, slow: bool) -> bool {
        let TripRule::FailureRate {
            threshold,
            window,
            min_calls,
            slow_calls,
        } = self.config.rule
        else {
            return false;
        };
        let bucket_nanos = (window.as_nanos() / RATE_BUCKETS as u128).max(1);
        let index = (now.saturating_duration_since(self.epoch).as_nanos() / bucket_nanos) as u64;
        let bucket = &mut self.buckets[(index % RATE_BUCKETS as u64) as usize];
        if bucket.index != index {
            *bucket = Bucket {
                index,
                ..Bucket::default()
            };
        }
        bucket.calls = bucket.calls.saturating_add(1);
        bucket.failures = bucket.failures.saturating_add(u32::from(failed));
        bucket.slow = bucket.slow.saturating_add(u32::from(slow));
        if !failed && !slow {
            return false;
        }
        let (mut calls, mut failures, mut slows) = (0u64, 0u64, 0u64);
        for bucket in &self.buckets {
            if index.wrapping_sub(bucket.index) < RATE_BUCKETS as u64 && bucket.calls > 0 {
                calls += u64::from(bucket.calls);
                failures += u64::from(bucket.failures);
                slows += u64::from(bucket.slow);
            }
        }
        if calls < u64::from(min_calls) {
            return false;
        }
        let calls = calls as f64;
        failures as f64 / calls >= threshold
            || slow_calls.is_some_and(|slow| slows as f64 / calls >= slow.threshold)
    }

    fn transition(
        &mut self,
        slot: &Slot,
        to: CircuitState,
        reason: TransitionReason,
        now: Instant,
    ) {
        let from = self.state;
        self.generation += 1;
        self.state = to;
        self.transitions += 1;
        self.trials.clear();
        self.trial_successes = 0;
        let mut open_for = None;
        match to {
            CircuitState::Open => {
                if from == CircuitState::HalfOpen {
                    self.reopens = self.reopens.saturating_add(1);
                }
                let duration = self.config.open_duration(self.reopens);
                let until = nanos_since(self.epoch, now)
                    .saturating_add(u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX));
                slot.open_until.store(until, Ordering::Release);
                open_for = Some(duration);
            }
            CircuitState::Closed => {
                self.recent_failures.clear();
                self.buckets = [Bucket::default(); RATE_BUCKETS];
                self.reopens = 0;
                slot.streak.store(0, Ordering::Relaxed);
            }
            CircuitState::HalfOpen | CircuitState::ForcedOpen | CircuitState::ForcedClosed => {}
        }
        slot.word
            .store(encode(self.generation, code_of(to)), Ordering::Release);

        let name = &self.config.name;
        match to {
            CircuitState::Open | CircuitState::ForcedOpen => tracing::warn!(
                breaker = %name, ?from, to = ?to, %reason, open_for = ?open_for,
                "circuit breaker opened"
            ),
            _ => tracing::info!(
                breaker = %name, ?from, to = ?to, %reason,
                "circuit breaker state changed"
            ),
        }
        // No subscribers is not an error.
        let _ = self.events.send(StateChange {
            from,
            to,
            reason,
            at: now,
        });
    }
}

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
//!
//! This was measured against an `Arc`-held state (issue 13, item 14; `benches/benches/layers.rs`,
//! `bare+arc-per-call`): one `Arc` clone carried by each response future costs about 10 ns per call
//! on one thread and 25 ns with two threads sharing the breaker, against about 2.4 ns for the whole
//! closed-state success path here (which two threads share at no extra cost). tower's `Retry` does
//! clone the service, and with it the breaker's `Arc<Breaker>`, per request — but a breaker used
//! without retry, or behind a `Buffer`, does not pay that, and the preset's other costs are larger.
//! So the slots stay, with their memory bounded: a retired slot drops its name, its history and its
//! event channel (which exists only while someone subscribes), and its counters' cells are reused
//! (see `tests/memory_flat.rs`, which creates and drops 16 000 distinct breakers with flat memory).

use super::config::{CircuitBreakerConfig, Name, Rules};
use super::{CircuitState, StateChange, TransitionReason};
use crate::classify::Outcome;
use crate::counter::StripedCounter;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};
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
pub(crate) const EVENT_CAPACITY: usize = 64;

fn encode(generation: u64, state: u64) -> u64 {
    generation << STATE_BITS | state
}

fn generation_of(word: u64) -> u64 {
    word >> STATE_BITS
}

/// The consecutive-failure streak word: the low 32 bits of the generation it belongs to, and the
/// count. A success ends a streak with a compare-and-swap of the whole word, so a stale result
/// (from an earlier generation) can never zero a newer streak.
fn streak_word(generation: u64, count: u32) -> u64 {
    (generation & 0xFFFF_FFFF) << 32 | u64::from(count)
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

fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

/// What a successful call admitted in `Closed` must do; fixed by the trip rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct SuccessAction(u8);

impl SuccessAction {
    const END_STREAK: u8 = 1;
    const RECORD: u8 = 2;

    /// Nothing: only `FailuresWithin`, where successes do not matter.
    pub(crate) const NOTHING: SuccessAction = SuccessAction(0);

    pub(crate) fn for_rules(rules: &Rules) -> Self {
        let mut flags = 0;
        if rules.consecutive.is_some() {
            flags |= Self::END_STREAK;
        }
        if rules.rate.is_some() {
            flags |= Self::RECORD;
        }
        SuccessAction(flags)
    }

    pub(crate) fn ends_streak(self) -> bool {
        self.0 & Self::END_STREAK != 0
    }

    pub(crate) fn records(self) -> bool {
        self.0 & Self::RECORD != 0
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

/// What `poll_ready` does outside the plainly closed state ([`Slot::ready_not_closed`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Readiness {
    /// Poll the inner service (closed, forced closed, or the service holds a trial slot).
    Poll,
    /// A trial slot is now the service's: poll the inner service, and call with it.
    Reserved { generation: u64, ticket: u64 },
    /// Answer ready without polling the inner service; `call` rejects.
    TurnAway,
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
    rules: Rules,
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
    /// Created on the first `subscribe`, dropped when the last subscriber is gone: a breaker
    /// nobody watches carries no channel.
    events: Option<broadcast::Sender<StateChange>>,
}

/// Shared state of one breaker. See the module docs.
pub(crate) struct Slot {
    word: AtomicU64,
    /// In `Open`: nanoseconds after the breaker's epoch at which a trial is admitted.
    open_until: AtomicU64,
    /// `ConsecutiveFailures`: the current streak, tagged with its generation ([`streak_word`]).
    streak: AtomicU64,
    /// `FailureRate` with slow calls: the slow-call threshold in nanoseconds.
    slow_nanos: AtomicU64,
    calls: StripedCounter,
    rejections: StripedCounter,
    machine: Mutex<Machine>,
}

static POOL: Mutex<Vec<&'static Slot>> = Mutex::new(Vec::new());

/// The name a retired slot holds, so that the name of a dropped breaker is freed.
fn retired_name() -> Name {
    static NAME: OnceLock<Name> = OnceLock::new();
    NAME.get_or_init(|| Name::new("")).clone()
}

/// A snapshot of a breaker's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Metrics {
    /// Calls let through to the inner service.
    pub calls: u64,
    /// Calls whose result was classified as a failure (those recorded while closed or half-open,
    /// and failed `poll_ready`s recorded in those states).
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

    fn fresh_machine(config: CircuitBreakerConfig, epoch: Instant, generation: u64) -> Machine {
        let rules = config.rules.effective();
        let capacity = rules
            .failures_within
            .map_or(0, |(max_failures, _)| max_failures.min(1024) as usize);
        Machine {
            config,
            rules,
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
            calls_base: 0,
            rejections_base: 0,
            events: None,
        }
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
                streak: AtomicU64::new(0),
                slow_nanos: AtomicU64::new(u64::MAX),
                calls: StripedCounter::new(),
                rejections: StripedCounter::new(),
                machine: Mutex::new(Self::fresh_machine(config.clone(), epoch, 0)),
            }))
        });
        let mut machine = slot.lock();
        let generation = machine.generation + 1;
        *machine = Self::fresh_machine(config, epoch, generation);
        machine.calls_base = slot.calls.sum();
        machine.rejections_base = slot.rejections.sum();
        let slow_nanos = machine
            .rules
            .rate
            .and_then(|rate| rate.slow)
            .map_or(u64::MAX, |slow| nanos(slow.duration));
        slot.slow_nanos.store(slow_nanos, Ordering::Relaxed);
        slot.streak
            .store(streak_word(generation, 0), Ordering::Relaxed);
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
        machine.trials = Vec::new();
        machine.recent_failures = VecDeque::new();
        // Dropping the sender ends every subscription; the name is freed with the breaker.
        machine.events = None;
        machine.config.name = retired_name();
        self.word
            .store(encode(machine.generation, RETIRED), Ordering::Release);
        drop(machine);
        POOL.lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(self);
    }

    /// Admits a call if the breaker is plainly closed and the inner service `ready`, returning the
    /// closed generation; `Err` carries the state word for
    /// [`acquire_not_closed`](Self::acquire_not_closed). The fast path of the whole breaker: one
    /// atomic load, one branch, one per-thread counter bump.
    #[inline(always)]
    pub(crate) fn acquire_closed(&'static self, ready: bool) -> Result<u64, u64> {
        let word = self.word.load(Ordering::Acquire);
        // `word | !ready` is not CLOSED unless both hold: one compare for the two conditions.
        if (word | u64::from(!ready)) & STATE_MASK == CLOSED {
            self.calls.increment();
            Ok(generation_of(word))
        } else {
            Err(word)
        }
    }

    /// Whether the circuit is anything but plainly closed. One atomic load.
    #[inline(always)]
    pub(crate) fn is_not_closed(&self) -> bool {
        self.word.load(Ordering::Acquire) & STATE_MASK != CLOSED
    }

    /// What `poll_ready` does when the circuit is not plainly closed, for a service that holds
    /// the trial slot `held` (if any). A trial's slot is taken here, before the inner service is
    /// polled, so that while the trial waits for the inner service to be ready (a
    /// `ConcurrencyLimit` still held by calls admitted before the circuit opened, a full
    /// `Buffer`) the other callers are turned away instead of queueing behind it.
    #[cold]
    #[inline(never)]
    pub(crate) fn ready_not_closed(&self, epoch: Instant, held: Option<(u64, u64)>) -> Readiness {
        let word = self.word.load(Ordering::Acquire);
        match word & STATE_MASK {
            FORCED_OPEN => return Readiness::TurnAway,
            FORCED_CLOSED | CLOSED => return Readiness::Poll,
            _ => {}
        }
        // Read only here: forced closed, every `poll_ready` comes this way.
        let now = Instant::now();
        if word & STATE_MASK == OPEN
            && nanos_since(epoch, now) < self.open_until.load(Ordering::Acquire)
        {
            return Readiness::TurnAway;
        }
        let mut machine = self.lock();
        let machine = &mut *machine;
        match machine.state {
            CircuitState::ForcedOpen => return Readiness::TurnAway,
            CircuitState::Closed | CircuitState::ForcedClosed => return Readiness::Poll,
            CircuitState::Open => {
                if !machine.half_open_if_due(self, now) {
                    return Readiness::TurnAway;
                }
            }
            CircuitState::HalfOpen => {
                if held.is_some_and(|(generation, ticket)| {
                    machine.trial_position(generation, ticket).is_some()
                }) {
                    return Readiness::Poll;
                }
            }
        }
        match machine.admit_trial(now) {
            Ok(ticket) => Readiness::Reserved {
                generation: machine.generation,
                ticket,
            },
            Err(_) => Readiness::TurnAway,
        }
    }

    /// Turns the trial slot `ticket`, taken by `poll_ready`, into the call's permit; `false` if
    /// the slot is no longer this generation's (the circuit moved on, or a hung trial's slot was
    /// taken back). The trial's time starts now: the trial timeout bounds the call, not the wait
    /// for the inner service before it.
    #[cold]
    #[inline(never)]
    pub(crate) fn use_reserved(&self, generation: u64, ticket: u64) -> bool {
        let now = Instant::now();
        let mut machine = self.lock();
        let Some(position) = machine.trial_position(generation, ticket) else {
            return false;
        };
        // Last, with its new time: the trials stay oldest first, as reclaiming expects.
        machine.trials.remove(position);
        machine.trials.push(Trial {
            ticket,
            admitted: now,
        });
        self.calls.increment();
        true
    }

    /// Rejects a call for which `poll_ready` did not poll the inner service (it answered for an
    /// open breaker). If the breaker has since become willing to admit, the caller is told to
    /// come back at once (`retry_after` zero): the inner service was never made ready, so calling
    /// it would break tower's contract.
    #[cold]
    #[inline(never)]
    pub(crate) fn reject_unready(&self, epoch: Instant) -> Rejection {
        self.rejections.increment();
        let word = self.word.load(Ordering::Acquire);
        match word & STATE_MASK {
            FORCED_OPEN => Rejection::forced(),
            OPEN => {
                let until = self.open_until.load(Ordering::Acquire);
                let elapsed = nanos_since(epoch, Instant::now());
                Rejection::after(CircuitState::Open, until.saturating_sub(elapsed))
            }
            HALF_OPEN => {
                let retry_after = self.lock().trial_slots_taken(Instant::now());
                Rejection::after(CircuitState::HalfOpen, retry_after.map_or(0, nanos))
            }
            _ => Rejection::after(CircuitState::Open, 0),
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
                match self.reject_while_open(until, nanos_since(epoch, now)) {
                    Some(rejection) => Err(rejection),
                    None => self.acquire_slow(now),
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

    /// The rejection of a call `elapsed` nanoseconds after the epoch while the circuit is open
    /// until `until`; `None` once a trial is due.
    #[inline]
    fn reject_while_open(&self, until: u64, elapsed: u64) -> Option<Rejection> {
        (elapsed < until).then(|| {
            self.rejections.increment();
            Rejection::after(CircuitState::Open, until - elapsed)
        })
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
                // Reached when the open period ended, or when another thread re-opened the
                // circuit between the lock-free read of the state and this lock.
                let until = self.open_until.load(Ordering::Relaxed);
                if let Some(rejection) =
                    self.reject_while_open(until, nanos_since(machine.epoch, now))
                {
                    return Err(rejection);
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

        match machine.admit_trial(now) {
            Ok(ticket) => {
                self.calls.increment();
                Ok(Permit::Trial {
                    generation: machine.generation,
                    ticket,
                })
            }
            Err(retry_after) => {
                self.rejections.increment();
                Err(Rejection::after(CircuitState::HalfOpen, nanos(retry_after)))
            }
        }
    }

    /// A call admitted in `Closed` failed.
    #[cold]
    pub(crate) fn record_failure(&self, generation: u64, slow: bool) {
        let now = Instant::now();
        let mut machine = self.lock();
        if machine.generation != generation || machine.state != CircuitState::Closed {
            return;
        }
        machine.record_closed_failure(self, now, slow);
    }

    /// The inner service's `poll_ready` failed and the classifier counts it as a failure: in
    /// `Closed` it counts toward the trip rules like a failed call; in `HalfOpen`, or in `Open`
    /// once a trial is due (the inner service is polled only then), it is a failed trial and
    /// opens the circuit for another period — left open with its period over, the breaker would
    /// send every later caller to the dead inner service. (In `Open` before a trial is due, and
    /// in the forced states, no call could have been admitted, so it is not recorded.)
    #[cold]
    pub(crate) fn record_ready_failure(&self) {
        let now = Instant::now();
        let mut machine = self.lock();
        let failed_trial = match machine.state {
            CircuitState::Closed => {
                machine.record_closed_failure(self, now, false);
                false
            }
            CircuitState::HalfOpen => true,
            CircuitState::Open => machine.half_open_if_due(self, now),
            CircuitState::ForcedOpen | CircuitState::ForcedClosed => false,
        };
        if failed_trial {
            machine.failures += 1;
            machine.transition(self, CircuitState::Open, TransitionReason::TrialFailed, now);
        }
    }

    /// A call admitted in `Closed` succeeded under the consecutive-failures rule.
    pub(crate) fn end_streak(&self, generation: u64) {
        let mut word = self.streak.load(Ordering::Relaxed);
        while word != streak_word(generation, 0) && word >> 32 == generation & 0xFFFF_FFFF {
            match self.streak.compare_exchange_weak(
                word,
                streak_word(generation, 0),
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return,
                Err(actual) => word = actual,
            }
        }
    }

    /// Whether a call that took `elapsed` counts as slow.
    pub(crate) fn is_slow(&self, elapsed: Duration) -> bool {
        nanos(elapsed) >= self.slow_nanos.load(Ordering::Relaxed)
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

    /// Moves to `state` by hand (`force_open`, `force_closed`, `reset`). A control that would not
    /// change the state emits nothing and keeps calls in flight valid, except that `reset` on a
    /// closed breaker with a recorded history forgets it (and so disregards results of calls
    /// admitted before, which belong to the forgotten history).
    pub(crate) fn force(&self, state: CircuitState, reason: TransitionReason) {
        let now = Instant::now();
        let mut machine = self.lock();
        if machine.state != state {
            machine.transition(self, state, reason, now);
        } else if state == CircuitState::Closed && machine.has_history(self) {
            machine.generation += 1;
            machine.clear_history(self);
            self.word
                .store(encode(machine.generation, CLOSED), Ordering::Release);
            tracing::info!(breaker = %machine.config.name, "circuit breaker history reset");
        }
    }

    /// The current state, and whether it is `Open` with its open period over (the next caller
    /// is let through to a trial; the state turns `HalfOpen` then), from one reading of it.
    pub(crate) fn state_and_trial_due(&self, epoch: Instant) -> (CircuitState, bool) {
        let word = self.word.load(Ordering::Acquire);
        let due = word & STATE_MASK == OPEN
            && nanos_since(epoch, Instant::now()) >= self.open_until.load(Ordering::Acquire);
        (state_of(word), due)
    }

    /// The current state (as of the last transition: `Open` turns `HalfOpen` at the first
    /// `poll_ready` after the reset timeout, not by a timer).
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
        self.lock()
            .events
            .get_or_insert_with(|| broadcast::channel(EVENT_CAPACITY).0)
            .subscribe()
    }

    /// Whether a state-change channel exists (for tests of its lazy creation).
    #[cfg(test)]
    fn has_channel(&self) -> bool {
        self.lock().events.is_some()
    }
}

impl Machine {
    /// In `Open`: moves to `HalfOpen` if the open period is over; whether it did.
    fn half_open_if_due(&mut self, slot: &Slot, now: Instant) -> bool {
        if nanos_since(self.epoch, now) < slot.open_until.load(Ordering::Relaxed) {
            return false;
        }
        self.transition(
            slot,
            CircuitState::HalfOpen,
            TransitionReason::ResetTimeoutElapsed,
            now,
        );
        true
    }

    /// Where the trial slot `ticket` of `generation` stands among the trials, if it is still
    /// held (the circuit is still in that half-open period, and the slot was not taken back).
    fn trial_position(&self, generation: u64, ticket: u64) -> Option<usize> {
        if self.state != CircuitState::HalfOpen || self.generation != generation {
            return None;
        }
        self.trials.iter().position(|trial| trial.ticket == ticket)
    }

    /// In `HalfOpen`: takes a trial slot if one is free, reclaiming one held by a hung trial;
    /// its ticket, or how long until the oldest trial's slot can be taken back.
    fn admit_trial(&mut self, now: Instant) -> Result<u64, Duration> {
        let trial_timeout = self.config.trial_timeout;
        let limit = self.config.half_open_max_calls as usize;
        if self.trials.len() >= limit
            && let Some(oldest) = self.trials.first().copied()
            && now.saturating_duration_since(oldest.admitted) >= trial_timeout
        {
            self.trials.remove(0);
            tracing::warn!(
                breaker = %self.config.name,
                hung_for = ?now.saturating_duration_since(oldest.admitted),
                "half-open trial call did not finish within the trial timeout; admitting another"
            );
        }
        if self.trials.len() < limit {
            let ticket = self.next_ticket;
            self.next_ticket += 1;
            self.trials.push(Trial {
                ticket,
                admitted: now,
            });
            return Ok(ticket);
        }
        let held = now.saturating_duration_since(self.trials[0].admitted);
        Err(trial_timeout.saturating_sub(held))
    }

    /// In `HalfOpen` with every trial slot taken by a trial younger than the trial timeout: how
    /// long until the oldest trial's slot can be taken back. `None` when a trial could be
    /// admitted now (or the breaker is not half-open).
    fn trial_slots_taken(&self, now: Instant) -> Option<Duration> {
        let oldest = self.trials.first()?;
        if self.state != CircuitState::HalfOpen
            || self.trials.len() < self.config.half_open_max_calls as usize
        {
            return None;
        }
        let held = now.saturating_duration_since(oldest.admitted);
        (held < self.config.trial_timeout).then(|| self.config.trial_timeout - held)
    }

    /// Records a failure of the current closed generation and trips if any rule fires.
    fn record_closed_failure(&mut self, slot: &Slot, now: Instant, slow: bool) {
        self.failures += 1;
        let mut trip = false;
        if let Some((max_failures, ttl)) = self.rules.failures_within {
            let recent = &mut self.recent_failures;
            // A failure exactly `ttl` old no longer counts. Comparing instants with a cut-off
            // computed once is cheaper than a duration per entry.
            if let Some(cutoff) = now.checked_sub(ttl) {
                while recent.front().is_some_and(|at| *at <= cutoff) {
                    recent.pop_front();
                }
            }
            if recent.len() >= max_failures as usize {
                recent.pop_front();
            }
            recent.push_back(now);
            trip |= recent.len() >= max_failures as usize;
        }
        if let Some(threshold) = self.rules.consecutive {
            // Under the lock the generation cannot change; successes may end the streak
            // concurrently, so count with a compare-and-swap.
            let mut word = slot.streak.load(Ordering::Relaxed);
            let count = loop {
                let count = if word >> 32 == self.generation & 0xFFFF_FFFF {
                    (word & 0xFFFF_FFFF) as u32
                } else {
                    0
                };
                let next = count.saturating_add(1);
                match slot.streak.compare_exchange_weak(
                    word,
                    streak_word(self.generation, next),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                ) {
                    Ok(_) => break next,
                    Err(actual) => word = actual,
                }
            };
            trip |= count >= threshold;
        }
        if self.rules.rate.is_some() {
            trip |= self.record_rate(now, true, slow);
        }
        if trip {
            self.transition(slot, CircuitState::Open, TransitionReason::Tripped, now);
        }
    }

    /// Records one completed call in the failure-rate window; returns whether the circuit trips
    /// (checked after every call, so a success that brings the window to `min_calls` can trip it).
    fn record_rate(&mut self, now: Instant, failed: bool, slow: bool) -> bool {
        let Some(rate) = self.rules.rate else {
            return false;
        };
        let bucket_nanos = (rate.window.as_nanos() / RATE_BUCKETS as u128).max(1);
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
        let (mut calls, mut failures, mut slows) = (0u64, 0u64, 0u64);
        for bucket in &self.buckets {
            if index.wrapping_sub(bucket.index) < RATE_BUCKETS as u64 && bucket.calls > 0 {
                calls += u64::from(bucket.calls);
                failures += u64::from(bucket.failures);
                slows += u64::from(bucket.slow);
            }
        }
        if calls < u64::from(rate.min_calls) {
            return false;
        }
        let calls = calls as f64;
        rate.threshold
            .is_some_and(|threshold| failures as f64 / calls >= threshold)
            || rate
                .slow
                .is_some_and(|slow| slows as f64 / calls >= slow.threshold)
    }

    /// Whether the closed period has recorded anything a `reset` would forget.
    fn has_history(&self, slot: &Slot) -> bool {
        !self.recent_failures.is_empty()
            || self.buckets.iter().any(|bucket| bucket.calls > 0)
            || slot.streak.load(Ordering::Relaxed) & 0xFFFF_FFFF != 0
    }

    fn clear_history(&mut self, slot: &Slot) {
        self.recent_failures.clear();
        self.buckets = [Bucket::default(); RATE_BUCKETS];
        self.reopens = 0;
        slot.streak
            .store(streak_word(self.generation, 0), Ordering::Relaxed);
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
                let until = nanos_since(self.epoch, now).saturating_add(nanos(duration));
                slot.open_until.store(until, Ordering::Release);
                open_for = Some(duration);
            }
            CircuitState::Closed => self.clear_history(slot),
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
        if let Some(events) = &self.events {
            let change = StateChange {
                from,
                to,
                reason,
                at: now,
            };
            // Nobody listens any more: free the channel until the next subscriber.
            if events.send(change).is_err() {
                self.events = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_event_channel_exists_only_while_someone_listens() {
        let slot = Slot::claim(CircuitBreakerConfig::new("lazy"), Instant::now());
        assert!(!slot.has_channel());
        slot.force(CircuitState::ForcedOpen, TransitionReason::ForcedOpen);
        assert!(!slot.has_channel());
        let receiver = slot.subscribe();
        assert!(slot.has_channel());
        drop(receiver);
        slot.force(CircuitState::Closed, TransitionReason::Reset);
        assert!(!slot.has_channel());
        slot.retire();
    }

    /// A failed `poll_ready` seen while the open period runs (one that began before another
    /// caller's failed trial re-opened the circuit) neither counts nor restarts the period.
    #[tokio::test(start_paused = true)]
    async fn a_failed_poll_ready_within_the_open_period_records_nothing() {
        let config = CircuitBreakerConfig::new("racing")
            .max_failures(1)
            .reset_timeout(Duration::from_secs(10));
        let slot = Slot::claim(config, Instant::now());
        slot.record_ready_failure();
        assert_eq!(slot.state(), CircuitState::Open);
        let until = slot.open_until.load(Ordering::Relaxed);
        tokio::time::advance(Duration::from_secs(9)).await;
        slot.record_ready_failure();
        assert_eq!(slot.open_until.load(Ordering::Relaxed), until);
        let metrics = slot.metrics();
        assert_eq!((metrics.failures, metrics.transitions), (1, 1));
        // Once the period is over it is a failed trial: a new period from now.
        tokio::time::advance(Duration::from_secs(1)).await;
        slot.record_ready_failure();
        assert_eq!(slot.state(), CircuitState::Open);
        assert_eq!(
            slot.open_until.load(Ordering::Relaxed),
            until + nanos(Duration::from_secs(10))
        );
        let metrics = slot.metrics();
        assert_eq!((metrics.failures, metrics.transitions), (2, 3));
        slot.retire();
    }

    #[test]
    fn stale_streak_ends_do_not_touch_a_newer_streak() {
        assert_eq!(streak_word(7, 3) >> 32, 7);
        assert_eq!(streak_word(u64::from(u32::MAX) + 2, 3) >> 32, 1);
    }
}

//! Future types.

use super::state::{Permit, Rejection, Slot, SuccessAction};
use super::{CircuitOpen, Name};
use crate::classify::{Classify, Outcome};
use pin_project_lite::pin_project;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use tokio::time::Instant;

/// Reports a call's result to the breaker exactly once; frees a half-open trial slot without a
/// verdict if the call is dropped before it finishes.
///
/// Kept as plain scalars (not a `Permit` enum moved in and out) because the hot path reads it right
/// after writing it: mixing narrow stores with a wide load of an enum stalls store forwarding,
/// which cost more than the rest of the layer together.
pub(crate) struct Tracker {
    slot: &'static Slot,
    generation: u64,
    ticket: u64,
    kind: PermitKind,
    action: SuccessAction,
    /// When the call started, if slow calls are detected.
    started: Option<Instant>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum PermitKind {
    Closed,
    Trial,
    /// Forced closed, or already reported.
    Untracked,
}

impl Tracker {
    #[inline]
    pub(crate) fn new(
        slot: &'static Slot,
        permit: Permit,
        action: SuccessAction,
        times_calls: bool,
    ) -> Self {
        let (kind, generation, ticket) = match permit {
            Permit::Closed { generation } => (PermitKind::Closed, generation, 0),
            Permit::Trial { generation, ticket } => (PermitKind::Trial, generation, ticket),
            Permit::Untracked => (PermitKind::Untracked, 0, 0),
        };
        Tracker {
            slot,
            generation,
            ticket,
            kind,
            action,
            started: if times_calls {
                Some(Instant::now())
            } else {
                None
            },
        }
    }

    /// A tracker for a call admitted in `Closed` during `generation`.
    #[inline(always)]
    pub(crate) fn closed(
        slot: &'static Slot,
        generation: u64,
        action: SuccessAction,
        times_calls: bool,
    ) -> Self {
        Tracker {
            slot,
            generation,
            ticket: 0,
            kind: PermitKind::Closed,
            action,
            started: if times_calls {
                Some(Instant::now())
            } else {
                None
            },
        }
    }

    #[inline(always)]
    fn complete(&mut self, outcome: Outcome) {
        // The common case, a success that the trip rule does not need to hear about, inline;
        // everything else out of line. The out-of-line part gets the tracker's fields by value,
        // never its address: the response future then stays in registers on the inline path.
        let kind = self.kind;
        self.kind = PermitKind::Untracked;
        if !(kind == PermitKind::Closed
            && outcome == Outcome::Success
            && self.action == SuccessAction::NOTHING)
        {
            complete_slow(
                self.slot,
                kind,
                self.generation,
                self.ticket,
                self.action,
                self.started,
                outcome,
            );
        }
    }
}

/// Whether a call that started at `started` (if slow calls are detected) was slow.
fn is_slow(slot: &Slot, started: Option<Instant>) -> bool {
    started.is_some_and(|started| slot.is_slow(started.elapsed()))
}

/// Reports a result the closed fast path does not handle.
///
/// Cannot unwind (`extern "C"`): a call that can unwind makes the caller's landing pad drop the
/// response future through its address, and a future whose address escapes lives in memory even
/// on the closed fast path. A panic here can only come from a `tracing` subscriber reporting a
/// transition; it is caught (the panic hook has reported it by then), the breaker's bookkeeping
/// stands as far as it got, and the call's result still reaches the caller.
#[inline(never)]
#[allow(improper_ctypes_definitions)] // called from Rust only, for its `nounwind`
extern "C" fn complete_slow(
    slot: &'static Slot,
    kind: PermitKind,
    generation: u64,
    ticket: u64,
    action: SuccessAction,
    started: Option<Instant>,
    outcome: Outcome,
) {
    let record = || match kind {
        PermitKind::Closed => match outcome {
            Outcome::Success => {
                if action.ends_streak() {
                    slot.end_streak(generation);
                }
                if action.records() {
                    slot.record_success(generation, is_slow(slot, started));
                }
            }
            Outcome::Failure => slot.record_failure(generation, is_slow(slot, started)),
            Outcome::Ignored => {}
        },
        PermitKind::Trial => {
            let outcome = if outcome == Outcome::Success && is_slow(slot, started) {
                Outcome::Failure
            } else {
                outcome
            };
            slot.record_trial(generation, ticket, outcome);
        }
        PermitKind::Untracked => {}
    };
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(record));
}

impl Drop for Tracker {
    #[inline]
    fn drop(&mut self) {
        if self.kind == PermitKind::Trial {
            self.slot.release_trial(self.generation, self.ticket);
        }
    }
}

/// The name a rejected call's error carries.
///
/// Dropped by value out of line: `Arc`'s own drop hands the address of the field to its slow path,
/// and a response future whose address escapes lives in memory on the closed path too. For the
/// same reason nothing here can unwind (a call that can makes the caller's landing pad drop the
/// future through its address): a future polled again after its rejection answers with a
/// placeholder name rather than panicking.
struct RejectingName(Option<Name>);

impl RejectingName {
    #[inline]
    fn take(&mut self) -> Name {
        match self.0.take() {
            Some(name) => name,
            None => polled_again(),
        }
    }
}

/// The name of a rejection polled after it completed. A function that cannot unwind, for the
/// reason on [`RejectingName`].
#[cold]
#[inline(never)]
#[allow(improper_ctypes_definitions)] // called from Rust only, for its `nounwind`
extern "C" fn polled_again() -> Name {
    Name::new("circuit breaker (future polled after completion)")
}

impl Drop for RejectingName {
    #[inline]
    fn drop(&mut self) {
        if let Some(name) = self.0.take() {
            drop_name(name);
        }
    }
}

#[inline(never)]
fn drop_name(name: Name) {
    drop(name);
}

pin_project! {
    #[project = KindProj]
    enum Kind<F> {
        Called { #[pin] future: F, tracker: Tracker },
        Rejected { name: RejectingName, rejection: Rejection },
    }
}

pin_project! {
    /// Response future of [`CircuitBreaker`](super::CircuitBreaker).
    pub struct ResponseFuture<F, C> {
        #[pin]
        kind: Kind<F>,
        classifier: C,
    }
}

impl<F, C> ResponseFuture<F, C> {
    #[inline]
    pub(crate) fn called(future: F, tracker: Tracker, classifier: C) -> Self {
        ResponseFuture {
            kind: Kind::Called { future, tracker },
            classifier,
        }
    }

    #[inline]
    pub(crate) fn rejected(name: Name, rejection: Rejection, classifier: C) -> Self {
        ResponseFuture {
            kind: Kind::Rejected {
                name: RejectingName(Some(name)),
                rejection,
            },
            classifier,
        }
    }
}

impl<F, C, T, E> Future for ResponseFuture<F, C>
where
    F: Future<Output = Result<T, E>>,
    C: Classify<T, E>,
    E: From<CircuitOpen>,
{
    type Output = Result<T, E>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        match this.kind.project() {
            KindProj::Called { future, tracker } => {
                let result = ready!(future.poll(cx));
                tracker.complete(this.classifier.classify(&result));
                Poll::Ready(result)
            }
            KindProj::Rejected { name, rejection } => {
                Poll::Ready(Err(E::from(CircuitOpen::new(name.take(), *rejection))))
            }
        }
    }
}

impl<F, C> std::fmt::Debug for ResponseFuture<F, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

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

    fn is_slow(&self) -> bool {
        self.started
            .is_some_and(|started| self.slot.is_slow(started.elapsed()))
    }

    #[inline(always)]
    fn complete(&mut self, outcome: Outcome) {
        // The common case, a success that the trip rule does not need to hear about, inline;
        // everything else out of line.
        if self.kind == PermitKind::Closed
            && outcome == Outcome::Success
            && self.action == SuccessAction::NOTHING
        {
            self.kind = PermitKind::Untracked;
        } else {
            self.complete_slow(outcome);
        }
    }

    #[inline(never)]
    fn complete_slow(&mut self, outcome: Outcome) {
        let kind = self.kind;
        self.kind = PermitKind::Untracked;
        match kind {
            PermitKind::Closed => match outcome {
                Outcome::Success => {
                    if self.action.ends_streak() {
                        self.slot.end_streak(self.generation);
                    }
                    if self.action.records() {
                        self.slot.record_success(self.generation, self.is_slow());
                    }
                }
                Outcome::Failure => self.slot.record_failure(self.generation, self.is_slow()),
                Outcome::Ignored => {}
            },
            PermitKind::Trial => {
                let outcome = if outcome == Outcome::Success && self.is_slow() {
                    Outcome::Failure
                } else {
                    outcome
                };
                self.slot
                    .record_trial(self.generation, self.ticket, outcome);
            }
            PermitKind::Untracked => {}
        }
    }
}

impl Drop for Tracker {
    #[inline]
    fn drop(&mut self) {
        if self.kind == PermitKind::Trial {
            self.slot.release_trial(self.generation, self.ticket);
        }
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F> {
        Called { #[pin] future: F, tracker: Tracker },
        Rejected { name: Option<Name>, rejection: Rejection },
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
                name: Some(name),
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
            KindProj::Rejected { name, rejection } => Poll::Ready(Err(E::from(CircuitOpen::new(
                name.take()
                    .expect("a rejected call's future polled after completion"),
                *rejection,
            )))),
        }
    }
}

impl<F, C> std::fmt::Debug for ResponseFuture<F, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

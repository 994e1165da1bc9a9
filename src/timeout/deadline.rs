use std::cell::Cell;
use std::fmt;
use std::time::Duration;
use tokio::time::Instant;

/// Thirty years: what "no deadline in sight" saturates to (tokio's own far future).
pub(crate) const FAR_FUTURE: Duration = Duration::from_secs(86_400 * 365 * 30);

/// `after` past `now`, saturating like [`Deadline::after`]: a timeout of `Duration::MAX` (never)
/// must not overflow the clock.
pub(crate) fn later(now: Instant, after: Duration) -> Instant {
    Deadline::after_from(now, after).instant()
}

/// The instant by which a request must be answered; it travels with the request.
///
/// Layers read it through [`HasDeadline`]: retry never sleeps past it, a deadline-aware timeout
/// gives an attempt at most the time left, and transports carry it to the server so the callee
/// stops work nobody waits for any more.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Deadline(Instant);

impl Deadline {
    /// The deadline `budget` from now (tokio's clock). A budget too large for the clock
    /// (`Duration::MAX`) saturates to thirty years from now instead of overflowing.
    pub fn after(budget: Duration) -> Self {
        Self::after_from(Instant::now(), budget)
    }

    /// The deadline `budget` after `now`, saturating like [`after`](Self::after).
    pub(crate) fn after_from(now: Instant, budget: Duration) -> Self {
        Deadline(
            now.checked_add(budget)
                .or_else(|| now.checked_add(FAR_FUTURE))
                .unwrap_or(now),
        )
    }

    /// The deadline at `instant`.
    pub fn at(instant: Instant) -> Self {
        Deadline(instant)
    }

    /// The instant itself.
    pub fn instant(self) -> Instant {
        self.0
    }

    /// Time left until the deadline (zero once it passed).
    pub fn remaining(self) -> Duration {
        self.0.saturating_duration_since(Instant::now())
    }

    /// Whether the deadline has passed.
    pub fn is_expired(self) -> bool {
        Instant::now() >= self.0
    }

    /// The earlier of two deadlines.
    pub fn min(self, other: Deadline) -> Deadline {
        if other.0 < self.0 { other } else { self }
    }
}

impl fmt::Display for Deadline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "deadline in {:?}", self.remaining())
    }
}

/// A request that can carry a [`Deadline`].
///
/// Implemented by [`Deadlined`] (wrap any request), by
/// [`RpcRequest`](crate::rpc::RpcRequest), and easily by your own request types.
#[diagnostic::on_unimplemented(
    message = "the request type `{Self}` does not carry a deadline",
    label = "`{Self}` does not implement `palisade::timeout::HasDeadline`",
    note = "wrap the request in `palisade::timeout::Deadlined`, implement `HasDeadline` for it, or drop `.honor_deadline()` (layers then honour the deadline of an enclosing `DeadlineLayer` for any request type)"
)]
pub trait HasDeadline {
    /// The request's deadline, if it has one.
    fn deadline(&self) -> Option<Deadline>;
    /// Sets the request's deadline.
    fn set_deadline(&mut self, deadline: Deadline);
}

/// Any request with a deadline attached.
///
/// ```
/// use palisade::timeout::{Deadline, Deadlined, HasDeadline};
/// use std::time::Duration;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let request = Deadlined::new("get-user 42").with_deadline(Deadline::after(Duration::from_secs(2)));
/// assert!(request.deadline().is_some());
/// # }
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Deadlined<R> {
    /// The request.
    pub request: R,
    /// Its deadline, if any.
    pub deadline: Option<Deadline>,
}

impl<R> Deadlined<R> {
    /// `request` without a deadline yet.
    pub fn new(request: R) -> Self {
        Deadlined {
            request,
            deadline: None,
        }
    }

    /// The same request with `deadline`.
    pub fn with_deadline(mut self, deadline: Deadline) -> Self {
        self.deadline = Some(deadline);
        self
    }
}

impl<R> HasDeadline for Deadlined<R> {
    fn deadline(&self) -> Option<Deadline> {
        self.deadline
    }

    fn set_deadline(&mut self, deadline: Deadline) {
        self.deadline = Some(deadline);
    }
}

/// Where a layer finds a request's deadline: [`AmbientDeadline`] (the default) and
/// [`NoDeadline`] for any request, [`RequestDeadline`] for requests that are [`HasDeadline`].
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot find the deadline of a `{Request}`",
    note = "`RequestDeadline` needs `{Request}: HasDeadline`; `AmbientDeadline` and `NoDeadline` work for any request"
)]
pub trait DeadlineSource<Request> {
    /// The deadline of `request`, if this source sees one.
    fn deadline_of(&self, request: &Request) -> Option<Deadline>;
}

/// Ignores deadlines: works with any request type.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoDeadline;

impl<Request> DeadlineSource<Request> for NoDeadline {
    #[inline]
    fn deadline_of(&self, _: &Request) -> Option<Deadline> {
        None
    }
}

/// Reads the deadline the request carries ([`HasDeadline`]), and the [ambient](AmbientDeadline)
/// one if that is earlier.
#[derive(Clone, Copy, Debug, Default)]
pub struct RequestDeadline;

impl<Request: HasDeadline> DeadlineSource<Request> for RequestDeadline {
    #[inline]
    fn deadline_of(&self, request: &Request) -> Option<Deadline> {
        match (request.deadline(), ambient()) {
            (Some(own), Some(ambient)) => Some(own.min(ambient)),
            (own, ambient) => own.or(ambient),
        }
    }
}

/// The default: the deadline of the enclosing [`DeadlineLayer`](super::DeadlineLayer) (or
/// [`EnforceDeadline`](super::EnforceDeadline), the resilience preset, a client with a timeout),
/// for any request type.
///
/// An enforced deadline is *ambient* while its service is called and while its response future
/// is polled: layers below it on the same task see it without the request having to carry it.
/// So retry never sleeps past it and an attempt timeout never outlives it, with no
/// `.honor_deadline()` to remember. (A `Buffer` hands requests to another task; there, only a
/// deadline the request carries — [`RequestDeadline`] — is seen.)
#[derive(Clone, Copy, Debug, Default)]
pub struct AmbientDeadline;

impl<Request> DeadlineSource<Request> for AmbientDeadline {
    #[inline]
    fn deadline_of(&self, _: &Request) -> Option<Deadline> {
        ambient()
    }
}

/// What the deadline layers running on this thread make ambient.
#[derive(Clone, Copy)]
struct Scope {
    /// The earliest deadline enforced by the layers whose call or poll is running.
    deadline: Option<Instant>,
    /// The clock as read by the innermost deadline layer's `call`, for the synchronous extent of
    /// that call: layers below reuse it instead of reading the clock again.
    now: Option<Instant>,
}

thread_local! {
    static AMBIENT: Cell<Scope> = const { Cell::new(Scope { deadline: None, now: None }) };
}

/// The ambient deadline, if a deadline layer above is running.
#[inline]
pub(crate) fn ambient() -> Option<Deadline> {
    AMBIENT
        .try_with(|scope| scope.get().deadline)
        .ok()
        .flatten()
        .map(Deadline)
}

/// The current time: the clock reading of an enclosing deadline layer's `call` if one is running
/// on this thread (the same synchronous call, so the same instant), else a fresh reading.
#[inline]
pub(crate) fn now() -> Instant {
    match AMBIENT.try_with(|scope| scope.get().now) {
        Ok(Some(now)) => now,
        _ => Instant::now(),
    }
}

/// Runs `f` with `deadline` ambient (the earlier of it and one already ambient), and with `now`
/// as the current time if given (only for the synchronous extent of a `call`).
#[inline]
pub(crate) fn within<R>(
    deadline: Option<Deadline>,
    now: Option<Instant>,
    f: impl FnOnce() -> R,
) -> R {
    struct Restore(Scope);
    impl Drop for Restore {
        #[inline]
        fn drop(&mut self) {
            let _ = AMBIENT.try_with(|cell| cell.set(self.0));
        }
    }
    let Some(deadline) = deadline else {
        return f();
    };
    let Ok(previous) = AMBIENT.try_with(|cell| {
        let previous = cell.get();
        cell.set(Scope {
            deadline: Some(previous.deadline.map_or(deadline.0, |p| p.min(deadline.0))),
            now,
        });
        previous
    }) else {
        return f();
    };
    let _restore = Restore(previous);
    f()
}

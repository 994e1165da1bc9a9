use std::fmt;
use std::time::Duration;
use tokio::time::Instant;

/// The instant by which a request must be answered; it travels with the request.
///
/// Layers read it through [`HasDeadline`]: retry never sleeps past it, a deadline-aware timeout
/// gives an attempt at most the time left, and transports carry it to the server so the callee
/// stops work nobody waits for any more.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Deadline(Instant);

impl Deadline {
    /// The deadline `budget` from now (tokio's clock).
    pub fn after(budget: Duration) -> Self {
        Deadline(Instant::now() + budget)
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

/// Where a layer finds a request's deadline: [`NoDeadline`] for any request,
/// [`RequestDeadline`] for requests that are [`HasDeadline`].
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

/// Reads the deadline the request carries ([`HasDeadline`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct RequestDeadline;

impl<Request: HasDeadline> DeadlineSource<Request> for RequestDeadline {
    #[inline]
    fn deadline_of(&self, request: &Request) -> Option<Deadline> {
        request.deadline()
    }
}

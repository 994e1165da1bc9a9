//! Timeouts and deadlines for any [`tower::Service`].
//!
//! - [`Timeout`] fails a call that takes too long with [`Elapsed`], through the service's own error
//!   type (`S::Error: From<Elapsed>`; no `BoxError` forced on you, unlike `tower::timeout`).
//! - A [`Deadline`] travels with a request ([`HasDeadline`]). [`DeadlineLayer`] sets and enforces it,
//!   and while it runs the deadline is [ambient](AmbientDeadline) to the layers below: a
//!   [`Timeout`] gives each attempt `min(attempt timeout, time left)` and [retry](crate::retry)
//!   never sleeps past it — by default, for any request type.
//!   [`TimeoutLayer::honor_deadline`] also reads a deadline the request itself carries.
//!
//! ```
//! use palisade::timeout::{Elapsed, TimeoutLayer};
//! use std::time::Duration;
//! use tower::{Layer, Service, ServiceExt};
//!
//! #[derive(Debug)]
//! enum AppError { TooSlow(Elapsed) }
//! impl From<Elapsed> for AppError {
//!     fn from(e: Elapsed) -> Self { AppError::TooSlow(e) }
//! }
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! let mut slow = TimeoutLayer::new(Duration::from_millis(100)).layer(tower::service_fn(|_: ()| async {
//!     tokio::time::sleep(Duration::from_secs(1)).await;
//!     Ok::<_, AppError>("done")
//! }));
//! let err = slow.ready().await.unwrap().call(()).await.unwrap_err();
//! assert!(matches!(err, AppError::TooSlow(e) if e.to_string() == "attempt timed out after 100ms"));
//! # }
//! ```
//!
//! # Cancellation is not a timeout
//!
//! A caller that drops the future has cancelled the call; nothing is reported anywhere. Only a
//! timer that fires produces [`Elapsed`], and only then does a circuit breaker below see a failure.

mod deadline;
mod error;
mod future;
mod layer;
mod timer;

pub use self::deadline::{
    AmbientDeadline, Deadline, DeadlineSource, Deadlined, HasDeadline, NoDeadline, RequestDeadline,
};
pub use self::error::{Elapsed, ElapsedKind};
pub use self::future::ResponseFuture;
pub use self::layer::{DeadlineLayer, TimeoutLayer};
pub(crate) use self::timer::{Until, sleep_until_lazily, until};

use std::task::{Context, Poll};
use std::time::Duration;
use tower_service::Service;

/// Fails calls that take longer than a timeout (and, with a deadline source, calls that outlive
/// the request's deadline). See the [module docs](self).
#[derive(Clone, Copy, Debug)]
pub struct Timeout<S, D = AmbientDeadline> {
    inner: S,
    timeout: Duration,
    source: D,
}

impl<S, D> Timeout<S, D> {
    /// Wraps `inner`; `source` tells where requests keep their deadline.
    pub fn new(inner: S, timeout: Duration, source: D) -> Self {
        Timeout {
            inner,
            timeout,
            source,
        }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Consumes the layer, returning the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, D, Request> Service<Request> for Timeout<S, D>
where
    S: Service<Request>,
    S::Error: From<Elapsed>,
    D: DeadlineSource<Request>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    #[inline]
    fn call(&mut self, request: Request) -> Self::Future {
        let deadline = self.source.deadline_of(&request);
        ResponseFuture::new(self.inner.call(request), Some(self.timeout), deadline)
    }
}

/// Sets a deadline on each request (unless it already has an earlier one) and fails the call with
/// [`Elapsed`] (`is_deadline()`) when it passes, cancelling whatever runs inside — retries and
/// their backoff sleeps included. Created by [`DeadlineLayer`].
#[derive(Clone, Copy, Debug)]
pub struct EnforceDeadline<S> {
    inner: S,
    budget: Option<Duration>,
}

impl<S> EnforceDeadline<S> {
    /// Wraps `inner`: requests get `budget` (or keep an earlier deadline of their own).
    pub fn new(inner: S, budget: Option<Duration>) -> Self {
        EnforceDeadline { inner, budget }
    }
}

impl<S, Request> Service<Request> for EnforceDeadline<S>
where
    S: Service<Request>,
    S::Error: From<Elapsed>,
    Request: HasDeadline,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request) -> Self::Future {
        let now = self.budget.map(|_| tokio::time::Instant::now());
        let from_budget = now
            .zip(self.budget)
            .map(|(now, budget)| Deadline::after_from(now, budget));
        let deadline = match (request.deadline(), from_budget) {
            (own, None) => own,
            (None, Some(budget)) => Some(budget),
            (Some(own), Some(budget)) => Some(own.min(budget)),
        };
        if let Some(deadline) = deadline {
            request.set_deadline(deadline);
        }
        // While the inner service is called (and, in the future, polled) the deadline is ambient
        // to the layers below.
        let inner = &mut self.inner;
        self::deadline::within(deadline, now, move || {
            ResponseFuture::enforcing(inner.call(request), deadline)
        })
    }
}

#[cfg(any(feature = "nats", feature = "redis"))]
pub(crate) use self::deadline::FAR_FUTURE;
pub(crate) use self::deadline::{later, now};

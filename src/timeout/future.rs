//! Future types.

use super::timer::LazyTimer;
use super::{Deadline, Elapsed};
use pin_project_lite::pin_project;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::Instant;

pin_project! {
    /// Response future of [`Timeout`](super::Timeout) and [`EnforceDeadline`](super::EnforceDeadline).
    ///
    /// The timer is armed only if the inner future is not ready on its first poll, so a service
    /// that answers at once pays for neither a clock read nor a timer.
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        #[pin]
        timer: LazyTimer,
        timeout: Option<Duration>,
        deadline: Option<Deadline>,
        fires_for_deadline: bool,
        // Makes `deadline` ambient while the inner future is polled (`EnforceDeadline`).
        ambient: bool,
    }
}

impl<F> ResponseFuture<F> {
    #[inline]
    pub(crate) fn new(inner: F, timeout: Option<Duration>, deadline: Option<Deadline>) -> Self {
        ResponseFuture {
            inner,
            timer: LazyTimer::new(),
            timeout,
            deadline,
            fires_for_deadline: false,
            ambient: false,
        }
    }

    #[inline]
    pub(crate) fn enforcing(inner: F, deadline: Option<Deadline>) -> Self {
        ResponseFuture {
            inner,
            timer: LazyTimer::new(),
            timeout: None,
            deadline,
            fires_for_deadline: false,
            ambient: deadline.is_some(),
        }
    }
}

impl<F, T, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: From<Elapsed>,
{
    type Output = Result<T, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let inner = this.inner;
        let polled = if *this.ambient {
            super::deadline::within(*this.deadline, None, || inner.poll(cx))
        } else {
            inner.poll(cx)
        };
        if let Poll::Ready(result) = polled {
            return Poll::Ready(result);
        }
        let (timeout, deadline) = (*this.timeout, *this.deadline);
        let fires_for_deadline = &mut *this.fires_for_deadline;
        let fired = this.timer.poll_fired(cx, || {
            let attempt_end = timeout.and_then(|timeout| Instant::now().checked_add(timeout));
            match (attempt_end, deadline) {
                (None, None) => None,
                (Some(attempt), None) => Some(attempt),
                (None, Some(deadline)) => {
                    *fires_for_deadline = true;
                    Some(deadline.instant())
                }
                (Some(attempt), Some(deadline)) => {
                    *fires_for_deadline = deadline.instant() <= attempt;
                    Some(attempt.min(deadline.instant()))
                }
            }
        });
        match fired {
            Poll::Pending => Poll::Pending,
            Poll::Ready(()) => {
                let elapsed = match (*this.fires_for_deadline, *this.timeout) {
                    (false, Some(timeout)) => Elapsed::attempt(timeout),
                    _ => Elapsed::deadline(),
                };
                Poll::Ready(Err(E::from(elapsed)))
            }
        }
    }
}

impl<F> std::fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("timeout", &self.timeout)
            .field("deadline", &self.deadline)
            .finish_non_exhaustive()
    }
}

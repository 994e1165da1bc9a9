//! Future types.

use super::{Deadline, Elapsed};
use pin_project_lite::pin_project;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::{Instant, Sleep, sleep_until};

pin_project! {
    /// Response future of [`Timeout`](super::Timeout) and [`EnforceDeadline`](super::EnforceDeadline).
    ///
    /// The timer is armed only if the inner future is not ready on its first poll, so a service
    /// that answers at once pays for neither a clock read nor a timer.
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        #[pin]
        sleep: Option<Sleep>,
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
            sleep: None,
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
            sleep: None,
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
        let mut this = self.project();
        let inner = this.inner;
        let polled = if *this.ambient {
            super::deadline::within(*this.deadline, None, || inner.poll(cx))
        } else {
            inner.poll(cx)
        };
        if let Poll::Ready(result) = polled {
            return Poll::Ready(result);
        }
        if this.sleep.is_none() {
            let attempt_end = this
                .timeout
                .and_then(|timeout| Instant::now().checked_add(timeout));
            let end = match (attempt_end, *this.deadline) {
                (None, None) => return Poll::Pending,
                (Some(attempt), None) => attempt,
                (None, Some(deadline)) => {
                    *this.fires_for_deadline = true;
                    deadline.instant()
                }
                (Some(attempt), Some(deadline)) => {
                    *this.fires_for_deadline = deadline.instant() <= attempt;
                    attempt.min(deadline.instant())
                }
            };
            this.sleep.set(Some(sleep_until(end)));
        }
        let sleep = this.sleep.as_pin_mut().expect("the timer was just armed");
        match sleep.poll(cx) {
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

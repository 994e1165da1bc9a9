//! A timer that is armed on demand and asks tokio's timer wheel only when it must.

use pin_project_lite::pin_project;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use tokio::time::{Instant, Sleep, sleep_until};

pin_project! {
    /// A deadline's timer, armed on its first poll and polled through tokio only when that changes
    /// something.
    ///
    /// `tokio::time::Sleep` re-registers the task's waker with the timer wheel and checks the
    /// cooperative budget on every poll. A request's timer is polled each time anything wakes the
    /// request (its reply, a flushed write), about five times per request over a broker, and
    /// fires almost never. Here a poll after the first reads the fired flag and compares wakers:
    /// the wheel already holds a waker that wakes the same task, so asking again changes
    /// nothing. A poll with a waker for another task registers that one instead.
    pub(crate) struct LazyTimer {
        #[pin]
        sleep: Option<Sleep>,
        // The waker the wheel was last given, to tell whether a poll's waker needs registering.
        registered: Option<Waker>,
    }
}

impl LazyTimer {
    /// A timer not yet armed.
    pub(crate) const fn new() -> Self {
        LazyTimer {
            sleep: None,
            registered: None,
        }
    }

    /// Whether the timer was armed.
    #[cfg(test)]
    pub(crate) fn is_armed(&self) -> bool {
        self.sleep.is_some()
    }

    /// Arms the timer for `end()` if it is not armed yet (`end` is only called then; `None` is
    /// never, and leaves the timer unarmed), and says whether it fired; when it has not, the task
    /// of `cx` is woken when it does.
    pub(crate) fn poll_fired(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        end: impl FnOnce() -> Option<Instant>,
    ) -> Poll<()> {
        let mut this = self.project();
        match this.sleep.as_mut().as_pin_mut() {
            None => match end() {
                Some(end) => this.sleep.set(Some(sleep_until(end))),
                None => return Poll::Pending,
            },
            Some(sleep) => {
                if sleep.is_elapsed() {
                    return Poll::Ready(());
                }
                if this
                    .registered
                    .as_ref()
                    .is_some_and(|registered| registered.will_wake(cx.waker()))
                {
                    return Poll::Pending;
                }
            }
        }
        let Some(sleep) = this.sleep.as_pin_mut() else {
            unreachable!("the timer was armed above")
        };
        // Outside the task's cooperative budget: a `Sleep` polled by a task that spent its budget
        // returns `Pending` without registering with the wheel, and this timer, holding the same
        // waker, would not ask again: it would never fire. (tokio's own `Timeout` polls its
        // timer unconstrained too when the future before it spent the budget.)
        match Pin::new(&mut tokio::task::unconstrained(sleep)).poll(cx) {
            Poll::Ready(()) => Poll::Ready(()),
            Poll::Pending => {
                match this.registered {
                    Some(registered) => registered.clone_from(cx.waker()),
                    None => *this.registered = Some(cx.waker().clone()),
                }
                Poll::Pending
            }
        }
    }
}

pin_project! {
    /// Resolves at `end`: `tokio::time::sleep_until` with the timer of [`LazyTimer`].
    pub(crate) struct SleepUntil {
        #[pin]
        timer: LazyTimer,
        end: Instant,
    }
}

/// A future that resolves at `end`, cheap to poll again before then.
pub(crate) fn sleep_until_lazily(end: Instant) -> SleepUntil {
    SleepUntil {
        timer: LazyTimer::new(),
        end,
    }
}

impl Future for SleepUntil {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        let end = *this.end;
        this.timer.poll_fired(cx, || Some(end))
    }
}

pin_project! {
    /// `future`, or `None` once `end` passes first: `tokio::time::timeout_at` with the timer of
    /// [`LazyTimer`].
    pub(crate) struct Until<F> {
        #[pin]
        future: F,
        #[pin]
        timer: LazyTimer,
        end: Instant,
    }
}

impl<F> Until<F> {
    /// The future raced against the deadline.
    pub(crate) fn get_ref(&self) -> &F {
        &self.future
    }
}

/// `future` within `end`: `None` if `end` passes first.
pub(crate) fn until<F: Future>(end: Instant, future: F) -> Until<F> {
    Until {
        future,
        timer: LazyTimer::new(),
        end,
    }
}

impl<F: Future> Future for Until<F> {
    type Output = Option<F::Output>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(output) = this.future.poll(cx) {
            return Poll::Ready(Some(output));
        }
        let end = *this.end;
        this.timer.poll_fired(cx, || Some(end)).map(|()| None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::Wake;
    use std::time::Duration;

    /// A task that spent its cooperative budget (it drained a ready channel) before it first polls
    /// its timer still hears the timer fire.
    #[tokio::test(start_paused = true)]
    async fn a_timer_first_polled_after_the_task_spent_its_budget_still_fires() {
        let (sender, mut receiver) = tokio::sync::mpsc::unbounded_channel();
        for n in 0..1000 {
            sender.send(n).unwrap();
        }
        let mut timer = std::pin::pin!(LazyTimer::new());
        let end = Instant::now() + Duration::from_millis(50);
        let fired = std::future::poll_fn(|cx| {
            // A ready channel answers until the budget runs out.
            while let Poll::Ready(Some(_)) = receiver.poll_recv(cx) {}
            timer.as_mut().poll_fired(cx, || Some(end))
        });
        tokio::time::timeout(Duration::from_secs(1), fired)
            .await
            .expect("the timer fired");
        assert_eq!(Instant::now(), end);
    }

    struct Counting(AtomicUsize);

    impl Wake for Counting {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn counting() -> (Arc<Counting>, Waker) {
        let counter = Arc::new(Counting(AtomicUsize::new(0)));
        let waker = Waker::from(Arc::clone(&counter));
        (counter, waker)
    }

    #[tokio::test(start_paused = true)]
    async fn fires_at_its_end_and_not_before() {
        let start = Instant::now();
        let sleep = sleep_until_lazily(start + Duration::from_millis(10));
        sleep.await;
        assert_eq!(start.elapsed(), Duration::from_millis(10));
    }

    #[tokio::test(start_paused = true)]
    async fn a_future_that_finishes_first_wins_and_one_that_does_not_loses() {
        let start = Instant::now();
        let end = start + Duration::from_millis(10);
        let quick = until(end, tokio::time::sleep(Duration::from_millis(9))).await;
        assert_eq!(quick, Some(()));
        let slow = until(end, tokio::time::sleep(Duration::from_millis(2))).await;
        assert_eq!(slow, None);
        assert_eq!(start.elapsed(), Duration::from_millis(10));
        // An end already passed: one poll arms the timer, the next sees it fired.
        let passed = until(start, std::future::pending::<()>()).await;
        assert_eq!(passed, None);
    }

    #[tokio::test(start_paused = true)]
    async fn is_not_armed_until_the_future_is_pending() {
        let mut at_once = std::pin::pin!(until(Instant::now(), async { 7 }));
        let (_, waker) = counting();
        let mut cx = Context::from_waker(&waker);
        assert_eq!(at_once.as_mut().poll(&mut cx), Poll::Ready(Some(7)));
        assert!(!at_once.timer.is_armed());
    }

    /// A poll with another task's waker moves the registration there: the timer wakes the task
    /// that polled it last, as `Sleep` does.
    #[tokio::test(start_paused = true)]
    async fn wakes_the_task_that_polled_it_last() {
        let mut timer = std::pin::pin!(sleep_until_lazily(
            Instant::now() + Duration::from_millis(5)
        ));
        let (first, first_waker) = counting();
        let (second, second_waker) = counting();
        assert!(
            timer
                .as_mut()
                .poll(&mut Context::from_waker(&first_waker))
                .is_pending()
        );
        // The same waker again: nothing changes.
        assert!(
            timer
                .as_mut()
                .poll(&mut Context::from_waker(&first_waker))
                .is_pending()
        );
        assert!(
            timer
                .as_mut()
                .poll(&mut Context::from_waker(&second_waker))
                .is_pending()
        );
        tokio::time::sleep(Duration::from_millis(6)).await;
        assert_eq!(first.0.load(Ordering::SeqCst), 0);
        assert_eq!(second.0.load(Ordering::SeqCst), 1);
        assert!(
            timer
                .as_mut()
                .poll(&mut Context::from_waker(&first_waker))
                .is_ready()
        );
    }
}

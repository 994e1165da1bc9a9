use pin_project_lite::pin_project;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use tower::retry::Policy;
use tower_layer::Layer;
use tower_service::Service;

/// Retries calls to the inner service as its [`Policy`] decides — the same contract as tower's
/// `Retry` (any `tower::retry::Policy` works), with a response future built for the common case:
/// a call that is not retried costs a branch, inline.
///
/// Created by [`RetryLayer`] (or [`RetryPolicy::layer`](super::RetryPolicy::layer)). Like tower's,
/// it clones the inner service and the policy into each response future (a retry needs both).
#[derive(Clone, Debug)]
pub struct Retry<S, P> {
    inner: S,
    policy: P,
}

impl<S, P> Retry<S, P> {
    /// Retries calls to `inner` as `policy` decides.
    pub fn new(inner: S, policy: P) -> Self {
        Retry { inner, policy }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Consumes the layer, returning the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, P, Request> Service<Request> for Retry<S, P>
where
    S: Service<Request> + Clone,
    P: Policy<Request, S::Response, S::Error> + Clone,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = ResponseFuture<S, P, Request>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    #[inline]
    fn call(&mut self, request: Request) -> Self::Future {
        let copy = self.policy.clone_request(&request);
        let future = self.inner.call(request);
        ResponseFuture {
            state: State::Called { future },
            request: copy,
            inner: self.inner.clone(),
            policy: self.policy.clone(),
        }
    }
}

/// Applies [`Retry`] with a policy.
#[derive(Clone, Debug)]
#[must_use = "a layer does nothing until it wraps a service"]
pub struct RetryLayer<P> {
    policy: P,
}

impl<P> RetryLayer<P> {
    /// Retries as `policy` decides.
    pub fn new(policy: P) -> Self {
        RetryLayer { policy }
    }
}

impl<S, P: Clone> Layer<S> for RetryLayer<P> {
    type Service = Retry<S, P>;

    fn layer(&self, inner: S) -> Self::Service {
        Retry::new(inner, self.policy.clone())
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F, W> {
        Called { #[pin] future: F },
        Waiting { #[pin] waiting: W },
        Retrying,
    }
}

pin_project! {
    /// Response future of [`Retry`].
    pub struct ResponseFuture<S, P, Request>
    where
        S: Service<Request>,
        P: Policy<Request, S::Response, S::Error>,
    {
        #[pin]
        state: State<S::Future, P::Future>,
        request: Option<Request>,
        inner: S,
        policy: P,
    }
}

impl<S, P, Request> Future for ResponseFuture<S, P, Request>
where
    S: Service<Request>,
    P: Policy<Request, S::Response, S::Error>,
{
    type Output = Result<S::Response, S::Error>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        // The first attempt, inline; anything after it out of line.
        if let StateProj::Called { future } = this.state.as_mut().project() {
            let mut result = ready!(future.poll(cx));
            let Some(request) = this.request else {
                return Poll::Ready(result);
            };
            match this.policy.retry(request, &mut result) {
                None => return Poll::Ready(result),
                Some(waiting) => this.state.set(State::Waiting { waiting }),
            }
        }
        retry_loop(this.state, this.request, this.inner, this.policy, cx)
    }
}

/// Waits, retries, and judges later attempts.
#[inline(never)]
fn retry_loop<S, P, Request>(
    mut state: Pin<&mut State<S::Future, P::Future>>,
    request: &mut Option<Request>,
    inner: &mut S,
    policy: &mut P,
    cx: &mut Context<'_>,
) -> Poll<Result<S::Response, S::Error>>
where
    S: Service<Request>,
    P: Policy<Request, S::Response, S::Error>,
{
    loop {
        match state.as_mut().project() {
            StateProj::Called { future } => {
                let mut result = ready!(future.poll(cx));
                let Some(copy) = request else {
                    return Poll::Ready(result);
                };
                match policy.retry(copy, &mut result) {
                    None => return Poll::Ready(result),
                    Some(waiting) => state.set(State::Waiting { waiting }),
                }
            }
            StateProj::Waiting { waiting } => {
                ready!(waiting.poll(cx));
                state.set(State::Retrying);
            }
            StateProj::Retrying => {
                ready!(inner.poll_ready(cx))?;
                let attempt = request
                    .take()
                    .expect("retrying requires a copy of the request");
                *request = policy.clone_request(&attempt);
                state.set(State::Called {
                    future: inner.call(attempt),
                });
            }
        }
    }
}

impl<S, P, Request> fmt::Debug for ResponseFuture<S, P, Request>
where
    S: Service<Request>,
    P: Policy<Request, S::Response, S::Error>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

use pin_project_lite::pin_project;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use tower::retry::Policy;
use tower_layer::Layer;
use tower_service::Service;

/// Retries calls to the inner service as its [`Policy`] decides — the same contract as tower's
/// `Retry`, with a response future built for the common case: a result the policy calls
/// [final](FinalResult) costs a branch, inline. Any `tower::retry::Policy` works, wrapped in
/// [`AnyPolicy`] or with an empty [`FinalResult`] implementation.
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
    P: Policy<Request, S::Response, S::Error> + FinalResult<S::Response, S::Error> + Clone,
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

/// What [`Retry`] asks of its policy beyond [`tower::retry::Policy`]: whether a result is final
/// without a call to [`Policy::retry`], so that the common case — a success that is never
/// retried — is one inline branch and the result never leaves registers.
///
/// [`RetryPolicy`](super::RetryPolicy) implements it. For a policy of your own, an empty
/// `impl` asks the policy about every result, exactly as tower's `Retry` does:
///
/// ```
/// use palisade::retry::{FinalResult, RetryLayer};
/// use std::future::Ready;
///
/// #[derive(Clone)]
/// struct Twice(usize);
///
/// impl<Req: Clone, Res, E> tower::retry::Policy<Req, Res, E> for Twice {
///     type Future = Ready<()>;
///     fn retry(&mut self, _: &mut Req, result: &mut Result<Res, E>) -> Option<Self::Future> {
///         (result.is_err() && self.0 > 0).then(|| {
///             self.0 -= 1;
///             std::future::ready(())
///         })
///     }
///     fn clone_request(&mut self, request: &Req) -> Option<Req> {
///         Some(request.clone())
///     }
/// }
///
/// // Only errors are retried, so a success is final; `impl<Res, E> FinalResult<Res, E> for
/// // Twice {}` would ask `retry` about it instead.
/// impl<Res, E> FinalResult<Res, E> for Twice {
///     fn is_final(&self, result: &Result<Res, E>) -> bool {
///         result.is_ok()
///     }
/// }
///
/// let layer = RetryLayer::new(Twice(2));
/// # let _ = layer;
/// ```
///
/// A policy from another crate goes in [`AnyPolicy`].
#[diagnostic::on_unimplemented(
    message = "`{Self}` does not say which results are final, as palisade's `Retry` needs",
    label = "no `FinalResult<{Res}, {E}>` implementation",
    note = "add `impl<Res, E> palisade::retry::FinalResult<Res, E> for {Self} {{}}` (every result goes to `Policy::retry`), or wrap a policy from another crate in `palisade::retry::AnyPolicy`"
)]
pub trait FinalResult<Res, E> {
    /// Whether [`Retry`] runs the whole retry loop inline (the default): right for a policy whose
    /// `retry` is small, which then costs what it costs in tower's `Retry`. A policy with a large
    /// `retry` says `false`: every result it does not call [final](Self::is_final) is judged out
    /// of line, which keeps the response future small for the results it does.
    const RETRY_INLINE: bool = true;

    /// Whether `result` goes back to the caller as it is, whatever the state of the request;
    /// [`Retry`] then does not call [`Policy::retry`]. The default, `false`, asks the policy about
    /// every result.
    #[inline(always)]
    fn is_final(&self, result: &Result<Res, E>) -> bool {
        let _ = result;
        false
    }
}

/// Any [`tower::retry::Policy`], for [`Retry`]: every result goes to the policy, as in tower's
/// `Retry`.
///
/// ```
/// use palisade::retry::{AnyPolicy, RetryLayer};
/// # #[derive(Clone)] struct FromElsewhere;
/// # impl<Req: Clone, Res, E> tower::retry::Policy<Req, Res, E> for FromElsewhere {
/// #     type Future = std::future::Ready<()>;
/// #     fn retry(&mut self, _: &mut Req, _: &mut Result<Res, E>) -> Option<Self::Future> { None }
/// #     fn clone_request(&mut self, request: &Req) -> Option<Req> { Some(request.clone()) }
/// # }
/// let layer = RetryLayer::new(AnyPolicy(FromElsewhere));
/// # let _ = layer;
/// ```
#[derive(Clone, Copy, Debug, Default)]
pub struct AnyPolicy<P>(pub P);

impl<P, Req, Res, E> Policy<Req, Res, E> for AnyPolicy<P>
where
    P: Policy<Req, Res, E>,
{
    type Future = P::Future;

    #[inline]
    fn retry(&mut self, request: &mut Req, result: &mut Result<Res, E>) -> Option<Self::Future> {
        self.0.retry(request, result)
    }

    #[inline]
    fn clone_request(&mut self, request: &Req) -> Option<Req> {
        self.0.clone_request(request)
    }
}

impl<P, Res, E> FinalResult<Res, E> for AnyPolicy<P> {}

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
    P: Policy<Request, S::Response, S::Error> + FinalResult<S::Response, S::Error>,
{
    type Output = Result<S::Response, S::Error>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        if P::RETRY_INLINE {
            return poll_inline(this.state, this.request, this.inner, this.policy, cx);
        }
        let mut finished = None;
        // The first attempt, and a result the policy calls final, inline; anything else out of
        // line. The result never has its address taken on the inline path, so it stays in
        // registers: a result that a judgement out of line reads through a pointer lives in
        // memory, is copied out of it piece by piece, and stalls the caller that reads it whole.
        if let StateProj::Called { future } = this.state.as_mut().project() {
            let result = ready!(future.poll(cx));
            if this.policy.is_final(&result) {
                return Poll::Ready(result);
            }
            finished = Some(result);
        }
        // The out-of-line part leaves its answer in `finished` rather than returning it, so that
        // the compiler does not build this function's output in memory for both paths.
        retry_loop(
            this.state,
            this.request,
            this.inner,
            this.policy,
            cx,
            &mut finished,
        );
        match finished {
            Some(result) => Poll::Ready(result),
            None => Poll::Pending,
        }
    }
}

/// The retry loop of a policy that asks for it inline ([`FinalResult::RETRY_INLINE`]): tower's
/// own loop, with the policy's word on final results first.
#[inline(always)]
fn poll_inline<S, P, Request>(
    mut state: Pin<&mut State<S::Future, P::Future>>,
    request: &mut Option<Request>,
    inner: &mut S,
    policy: &mut P,
    cx: &mut Context<'_>,
) -> Poll<Result<S::Response, S::Error>>
where
    S: Service<Request>,
    P: Policy<Request, S::Response, S::Error> + FinalResult<S::Response, S::Error>,
{
    loop {
        match state.as_mut().project() {
            StateProj::Called { future } => {
                let mut result = ready!(future.poll(cx));
                if policy.is_final(&result) {
                    return Poll::Ready(result);
                }
                let Some(copy) = request.as_mut() else {
                    return Poll::Ready(result);
                };
                match policy.retry(copy, &mut result) {
                    Some(waiting) => state.set(State::Waiting { waiting }),
                    None => return Poll::Ready(result),
                }
            }
            StateProj::Waiting { waiting } => {
                ready!(waiting.poll(cx));
                state.set(State::Retrying);
            }
            StateProj::Retrying => {
                ready!(inner.poll_ready(cx))?;
                start_attempt(state.as_mut(), request, inner, policy);
            }
        }
    }
}

/// Calls the inner service with the copy of the request, keeping a copy for the attempt after.
#[inline(always)]
fn start_attempt<S, P, Request>(
    mut state: Pin<&mut State<S::Future, P::Future>>,
    request: &mut Option<Request>,
    inner: &mut S,
    policy: &mut P,
) where
    S: Service<Request>,
    P: Policy<Request, S::Response, S::Error>,
{
    let attempt = request
        .take()
        .expect("retrying requires a copy of the request");
    *request = policy.clone_request(&attempt);
    state.set(State::Called {
        future: inner.call(attempt),
    });
}

/// Judges a finished attempt (`finished` holds its result on entry, if there is one), waits,
/// retries and judges later attempts. Leaves the result for the caller in `finished`, or `None`
/// while an attempt or a wait is pending.
#[inline(never)]
fn retry_loop<S, P, Request>(
    mut state: Pin<&mut State<S::Future, P::Future>>,
    request: &mut Option<Request>,
    inner: &mut S,
    policy: &mut P,
    cx: &mut Context<'_>,
    finished: &mut Option<Result<S::Response, S::Error>>,
) where
    S: Service<Request>,
    P: Policy<Request, S::Response, S::Error> + FinalResult<S::Response, S::Error>,
{
    let mut judged = finished.take();
    loop {
        let mut result = match judged.take() {
            Some(result) => result,
            None => match state.as_mut().project() {
                StateProj::Called { future } => match future.poll(cx) {
                    Poll::Ready(result) if policy.is_final(&result) => {
                        *finished = Some(result);
                        return;
                    }
                    Poll::Ready(result) => result,
                    Poll::Pending => return,
                },
                StateProj::Waiting { waiting } => {
                    if waiting.poll(cx).is_pending() {
                        return;
                    }
                    state.set(State::Retrying);
                    continue;
                }
                StateProj::Retrying => {
                    match inner.poll_ready(cx) {
                        Poll::Pending => return,
                        Poll::Ready(Err(error)) => {
                            *finished = Some(Err(error));
                            return;
                        }
                        Poll::Ready(Ok(())) => {}
                    }
                    start_attempt(state.as_mut(), request, inner, policy);
                    continue;
                }
            },
        };
        let Some(copy) = request else {
            *finished = Some(result);
            return;
        };
        match policy.retry(copy, &mut result) {
            None => {
                *finished = Some(result);
                return;
            }
            Some(waiting) => state.set(State::Waiting { waiting }),
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

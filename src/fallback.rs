//! Answering from a function when a call fails, as Polly's and Resilience4j's fallbacks do.
//!
//! [`FallbackLayer::new(f)`](FallbackLayer::new) calls `f` with the error of every failed call
//! and returns what `f` returns: a substitute response (`Ok`), or an error (`Err`, the same one to
//! pass it on). Deciding *which* errors get a fallback is a `match` in `f`; for the common case of
//! "only when the callee is down or turned us away", see [`FallbackLayer::on_faults`].
//!
//! Put it outside retry and the breaker, so that it sees the final outcome:
//!
//! ```
//! use palisade::builder::ServiceBuilderExt;
//! use palisade::circuit_breaker::CircuitBreakerConfig;
//! use palisade::fallback::FallbackLayer;
//! use tower::{BoxError, Service, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), BoxError> {
//! let mut prices = ServiceBuilder::new()
//!     // A cached or default price when the pricing service is down or its breaker is open.
//!     .layer(FallbackLayer::new(|_error: BoxError| Ok::<u32, BoxError>(999)))
//!     .circuit_breaker(CircuitBreakerConfig::new("pricing"))
//!     .service_fn(|_sku: u32| async { Err::<u32, BoxError>("pricing is down".into()) });
//! assert_eq!(prices.ready().await?.call(7).await?, 999);
//! # Ok(()) }
//! ```

use crate::classify::FailureKind;
use pin_project_lite::pin_project;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use tower_layer::Layer;
use tower_service::Service;

/// Wraps services in a [`Fallback`]. See the [module docs](self).
#[derive(Clone, Copy)]
#[must_use = "a layer does nothing until it wraps a service"]
pub struct FallbackLayer<F> {
    fallback: F,
}

impl<F> FallbackLayer<F> {
    /// Answers every failed call with `fallback(error)`.
    pub fn new(fallback: F) -> Self {
        FallbackLayer { fallback }
    }
}

/// The fallback of [`FallbackLayer::on_faults`]: calls the function only for errors that are
/// faults or rejections, passes the others on.
#[derive(Clone, Copy)]
pub struct OnFaults<F>(F);

impl<F> FallbackLayer<OnFaults<F>> {
    /// Answers with `fallback(error)` only when the error is the callee's fault or a local
    /// rejection (an open circuit, a shed load, a timeout) per its [`FailureKind`]; other errors
    /// (a "not found", a validation error) reach the caller unchanged.
    pub fn on_faults(fallback: F) -> Self {
        FallbackLayer {
            fallback: OnFaults(fallback),
        }
    }
}

impl<F> fmt::Debug for FallbackLayer<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FallbackLayer").finish_non_exhaustive()
    }
}

impl<S, F: Clone> Layer<S> for FallbackLayer<F> {
    type Service = Fallback<S, F>;

    fn layer(&self, inner: S) -> Self::Service {
        Fallback {
            inner,
            fallback: self.fallback.clone(),
        }
    }
}

/// What a fallback does with an error: turn it into the call's result.
pub trait Recover<T, E> {
    /// The result to return instead of `Err(error)`.
    fn recover(&self, error: E) -> Result<T, E>;
}

impl<T, E, F> Recover<T, E> for F
where
    F: Fn(E) -> Result<T, E>,
{
    #[inline]
    fn recover(&self, error: E) -> Result<T, E> {
        self(error)
    }
}

impl<T, E, F> Recover<T, E> for OnFaults<F>
where
    F: Fn(E) -> Result<T, E>,
    E: FailureKind,
{
    #[inline]
    fn recover(&self, error: E) -> Result<T, E> {
        if error.is_fault() || error.is_rejection() {
            (self.0)(error)
        } else {
            Err(error)
        }
    }
}

/// A service whose failed calls are answered by a fallback; created by [`FallbackLayer`].
#[derive(Clone, Copy)]
pub struct Fallback<S, F> {
    inner: S,
    fallback: F,
}

impl<S: fmt::Debug, F> fmt::Debug for Fallback<S, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Fallback")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S, F, Request> Service<Request> for Fallback<S, F>
where
    S: Service<Request>,
    F: Recover<S::Response, S::Error> + Clone,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, F>;

    /// Readiness is the inner service's: a fallback answers failed calls, not a service that is
    /// not ready (its `poll_ready` error is returned as is).
    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    #[inline]
    fn call(&mut self, request: Request) -> Self::Future {
        ResponseFuture {
            inner: self.inner.call(request),
            fallback: self.fallback.clone(),
        }
    }
}

pin_project! {
    /// Response future of [`Fallback`].
    pub struct ResponseFuture<Fut, F> {
        #[pin]
        inner: Fut,
        fallback: F,
    }
}

impl<Fut, F, T, E> Future for ResponseFuture<Fut, F>
where
    Fut: Future<Output = Result<T, E>>,
    F: Recover<T, E>,
{
    type Output = Result<T, E>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        Poll::Ready(match ready!(this.inner.poll(cx)) {
            Ok(response) => Ok(response),
            Err(error) => this.fallback.recover(error),
        })
    }
}

impl<Fut, F> fmt::Debug for ResponseFuture<Fut, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

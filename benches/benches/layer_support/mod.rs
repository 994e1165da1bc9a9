//! The contenders of the layer benches, shared by the criterion bench (`layers.rs`) and the
//! instruction-count runner (`layers_icount.rs`), so that both measure exactly the same stacks.
//!
//! Every contender wraps the same bare service, and its overhead is its total minus the bare
//! service's, the way the outside harness of issue 16 measures.
#![allow(dead_code)]

use palisade::builder::Resilience;
use palisade::circuit_breaker::{CircuitBreakerConfig, CircuitBreakerLayer, CircuitOpen};
use palisade::classify::FailureKind;
use palisade::retry::{Backoff, RetryBudget, RetryPolicy};
use palisade::timeout::{Deadlined, Elapsed};
use std::future::{Future, Ready, ready};
use std::hint::black_box;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tower::{Layer, Service};

#[derive(Debug)]
pub enum BenchError {
    Inner,
    Open(#[allow(dead_code)] CircuitOpen),
    Timeout(#[allow(dead_code)] Elapsed),
}

impl From<CircuitOpen> for BenchError {
    fn from(open: CircuitOpen) -> Self {
        BenchError::Open(open)
    }
}

impl From<Elapsed> for BenchError {
    fn from(elapsed: Elapsed) -> Self {
        BenchError::Timeout(elapsed)
    }
}

impl FailureKind for BenchError {
    fn is_transient(&self) -> bool {
        matches!(self, BenchError::Inner)
    }
}

impl std::fmt::Display for BenchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self:?}")
    }
}

impl std::error::Error for BenchError {}

/// The bare service: answers at once, failing when asked to.
#[derive(Clone, Copy)]
pub struct Bare;

/// The bare service's future computes its result when polled, as an `async fn` does (unlike
/// `std::future::Ready`, which stores a finished result at `call` time and copies it out at `poll`).
pub struct BareFuture {
    fail: bool,
}

impl Future for BareFuture {
    type Output = Result<u64, BenchError>;

    #[inline]
    fn poll(self: std::pin::Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Self::Output> {
        Poll::Ready(if self.fail {
            Err(BenchError::Inner)
        } else {
            Ok(7)
        })
    }
}

impl Service<bool> for Bare {
    type Response = u64;
    type Error = BenchError;
    type Future = BareFuture;

    #[inline]
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BenchError>> {
        Poll::Ready(Ok(()))
    }

    #[inline]
    fn call(&mut self, fail: bool) -> Self::Future {
        BareFuture { fail }
    }
}

impl Service<Deadlined<bool>> for Bare {
    type Response = u64;
    type Error = BenchError;
    type Future = BareFuture;

    #[inline]
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BenchError>> {
        Poll::Ready(Ok(()))
    }

    #[inline]
    fn call(&mut self, request: Deadlined<bool>) -> Self::Future {
        BareFuture {
            fail: request.request,
        }
    }
}

/// One ready-call-poll round trip, as a caller that finds the service ready makes it.
///
/// Forced inline for every contender: left to the compiler, the bare service's round trip is
/// inlined into criterion's loop while a larger layer's becomes a call, so the comparison would
/// charge the harness's own call and register saves to the layer.
#[inline(always)]
pub fn drive<S: Service<bool>>(service: &mut S, cx: &mut Context<'_>, fail: bool) -> bool {
    drive_with(service, cx, fail)
}

#[inline(always)]
pub fn drive_with<R, S: Service<R>>(service: &mut S, cx: &mut Context<'_>, request: R) -> bool {
    if service.poll_ready(cx).is_pending() {
        panic!("service not ready");
    }
    // The future is dropped before the result, as an `.await` does.
    let result = {
        let mut future = pin!(service.call(black_box(request)));
        loop {
            match future.as_mut().poll(cx) {
                Poll::Ready(result) => break result,
                // Only a layer that takes an async lock (tower-resilience's breaker, when two
                // threads contend) gets here; the holder releases it within a few instructions.
                Poll::Pending => std::hint::spin_loop(),
            }
        }
    };
    result.is_ok()
}

pub fn palisade_breaker(
    config: CircuitBreakerConfig,
) -> palisade::circuit_breaker::CircuitBreaker<Bare> {
    CircuitBreakerLayer::new(config).layer(Bare)
}

/// A tower-resilience breaker that never trips (rate threshold 100%, huge minimum).
pub fn resilience_breaker()
-> impl Service<bool, Response = u64, Error = impl std::fmt::Debug> + Clone {
    let layer = tower_resilience::circuitbreaker::CircuitBreakerLayer::builder()
        .failure_rate_threshold(1.0)
        .minimum_number_of_calls(usize::MAX / 2)
        .sliding_window_size(100)
        .build()
        .unwrap();
    layer.layer(Bare)
}

/// A failsafe breaker wrapped around the bare service's futures.
#[derive(Clone)]
pub struct Failsafe<B> {
    breaker: B,
}

impl<B> Service<bool> for Failsafe<B>
where
    B: failsafe::futures::CircuitBreaker,
{
    type Response = u64;
    type Error = failsafe::Error<BenchError>;
    type Future = failsafe::futures::ResponseFuture<
        BareFuture,
        B::FailurePolicy,
        B::Instrument,
        failsafe::Any,
    >;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, fail: bool) -> Self::Future {
        self.breaker.call(BareFuture { fail })
    }
}

pub fn failsafe_breaker(
    failures_to_trip: u32,
) -> Failsafe<impl failsafe::futures::CircuitBreaker + Clone> {
    let backoff = failsafe::backoff::constant(Duration::from_secs(3600));
    let policy = failsafe::failure_policy::consecutive_failures(failures_to_trip, backoff);
    Failsafe {
        breaker: failsafe::Config::new().failure_policy(policy).build(),
    }
}

/// tower's canonical example policy: retry errors up to n times.
#[derive(Clone)]
pub struct Attempts(pub usize);

impl<Req: Clone, Res, E> tower::retry::Policy<Req, Res, E> for Attempts {
    type Future = Ready<()>;

    fn retry(&mut self, _: &mut Req, result: &mut Result<Res, E>) -> Option<Self::Future> {
        match result {
            Err(_) if self.0 > 0 => {
                self.0 -= 1;
                Some(ready(()))
            }
            _ => None,
        }
    }

    fn clone_request(&mut self, request: &Req) -> Option<Req> {
        Some(request.clone())
    }
}

/// Asks `Attempts` about every result, as tower's `Retry` does (for palisade's `Retry` with a
/// plain tower policy).
impl<Res, E> palisade::retry::FinalResult<Res, E> for Attempts {}

/// The preset exactly as the README builds it, retry budget included.
pub fn readme_preset() -> Resilience {
    Resilience::new(
        CircuitBreakerConfig::new("inventory")
            .ttl(Duration::from_secs(5))
            .max_failures(3)
            .reset_timeout(Duration::from_secs(10)),
    )
    .deadline(Duration::from_secs(2))
    .retry(
        RetryPolicy::new(3)
            .backoff(Backoff::exponential(Duration::from_millis(50), 2.0))
            .budget(Arc::new(RetryBudget::new(Duration::from_secs(10), 10, 0.2))),
    )
    .attempt_timeout(Duration::from_millis(500))
}

/// The same preset without the retry budget.
pub fn readme_preset_without_budget() -> Resilience {
    Resilience::new(
        CircuitBreakerConfig::new("inventory")
            .ttl(Duration::from_secs(5))
            .max_failures(3)
            .reset_timeout(Duration::from_secs(10)),
    )
    .deadline(Duration::from_secs(2))
    .retry(RetryPolicy::new(3).backoff(Backoff::exponential(Duration::from_millis(50), 2.0)))
    .attempt_timeout(Duration::from_millis(500))
}

/// palisade's retry with a budget (what `Retry` costs per request when it deposits).
pub fn palisade_retry_with_budget()
-> impl Service<bool, Response = u64, Error = BenchError> + Clone + Send + 'static {
    RetryPolicy::new(3)
        .budget(Arc::new(RetryBudget::new(Duration::from_secs(10), 10, 0.2)))
        .layer()
        .layer(Bare)
}

/// tower's `Retry` with its `TpsBudget`: deposit per request, withdraw per retry.
#[derive(Clone)]
pub struct TpsPolicy {
    budget: Arc<tower::retry::budget::TpsBudget>,
    attempts: usize,
}

impl TpsPolicy {
    pub fn new() -> Self {
        TpsPolicy {
            budget: Arc::new(tower::retry::budget::TpsBudget::new(
                Duration::from_secs(10),
                10,
                0.2,
            )),
            attempts: 2,
        }
    }
}

impl<Req: Clone, Res, E> tower::retry::Policy<Req, Res, E> for TpsPolicy {
    type Future = Ready<()>;

    fn retry(&mut self, _: &mut Req, result: &mut Result<Res, E>) -> Option<Self::Future> {
        use tower::retry::budget::Budget;
        match result {
            Ok(_) => {
                self.budget.deposit();
                None
            }
            Err(_) if self.attempts > 0 && self.budget.withdraw() => {
                self.attempts -= 1;
                Some(ready(()))
            }
            Err(_) => None,
        }
    }

    fn clone_request(&mut self, request: &Req) -> Option<Req> {
        Some(request.clone())
    }
}

pub fn tower_retry_with_budget()
-> impl Service<bool, Response = u64, Error = BenchError> + Clone + Send + 'static {
    tower::retry::Retry::new(TpsPolicy::new(), Bare)
}

/// A stand-in for an `Arc`-held breaker state: the bare service plus one `Arc` clone carried by
/// every response future (what a breaker whose future holds an `Arc` of its state pays per call).
#[derive(Clone)]
pub struct ArcPerCall<S> {
    inner: S,
    state: Arc<u64>,
}

impl<S> ArcPerCall<S> {
    pub fn new(inner: S) -> Self {
        ArcPerCall {
            inner,
            state: Arc::new(0),
        }
    }
}

pub struct ArcFuture<F> {
    inner: F,
    _state: Arc<u64>,
}

impl<F: Future + Unpin> Future for ArcFuture<F> {
    type Output = F::Output;

    #[inline]
    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        std::pin::Pin::new(&mut self.inner).poll(cx)
    }
}

impl<S: Service<bool>> Service<bool> for ArcPerCall<S>
where
    S::Future: Unpin,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = ArcFuture<S::Future>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    #[inline]
    fn call(&mut self, request: bool) -> Self::Future {
        ArcFuture {
            inner: self.inner.call(request),
            _state: Arc::clone(&self.state),
        }
    }
}

/// A breaker configured never to trip.
pub fn never_trips() -> CircuitBreakerConfig {
    CircuitBreakerConfig::new("bench")
        .max_failures(1_000_000)
        .ttl(Duration::from_millis(1))
}

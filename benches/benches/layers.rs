//! Per-call overhead of the resilience layers over a bare always-ready service, side by side with
//! the anchors (tower, tower-resilience, failsafe) in the same run.
//!
//! Every variant drives `poll_ready` + `call` + one `poll` with a no-op waker, the way a caller that
//! finds the service ready would; the bare service is the floor.

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use palisade::builder::Resilience;
use palisade::circuit_breaker::{CircuitBreakerConfig, CircuitBreakerLayer, CircuitOpen};
use palisade::classify::{FailureKind, RetryAfter};
use palisade::retry::RetryPolicy;
use palisade::timeout::{Deadlined, Elapsed, TimeoutLayer};
use std::future::{Future, Ready, ready};
use std::hint::black_box;
use std::pin::pin;
use std::sync::{Arc, Barrier};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};
use tower::{Layer, Service};

#[derive(Debug)]
enum BenchError {
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

impl RetryAfter for BenchError {
    fn retry_after(&self) -> Option<Duration> {
        None
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
struct Bare;

/// The bare service's future computes its result when polled, as an `async fn` does (unlike
/// `std::future::Ready`, which stores a finished result at `call` time and copies it out at `poll`).
struct BareFuture {
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
fn drive<S: Service<bool>>(service: &mut S, cx: &mut Context<'_>, fail: bool) -> bool {
    drive_with(service, cx, fail)
}

#[inline(always)]
fn drive_with<R, S: Service<R>>(service: &mut S, cx: &mut Context<'_>, request: R) -> bool {
    if service.poll_ready(cx).is_pending() {
        panic!("service not ready");
    }
    let mut future = pin!(service.call(black_box(request)));
    loop {
        match future.as_mut().poll(cx) {
            Poll::Ready(result) => return result.is_ok(),
            // Only a layer that takes an async lock (tower-resilience's breaker, when two threads
            // contend) gets here; the holder releases it within a few instructions.
            Poll::Pending => std::hint::spin_loop(),
        }
    }
}

fn palisade_breaker(
    config: CircuitBreakerConfig,
) -> palisade::circuit_breaker::CircuitBreaker<Bare> {
    CircuitBreakerLayer::new(config).layer(Bare)
}

/// A tower-resilience breaker that never trips (rate threshold 100%, huge minimum).
fn resilience_breaker() -> impl Service<bool, Response = u64, Error = impl std::fmt::Debug> + Clone
{
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
struct Failsafe<B> {
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

fn failsafe_breaker(
    failures_to_trip: u32,
) -> Failsafe<impl failsafe::futures::CircuitBreaker + Clone> {
    let backoff = failsafe::backoff::constant(Duration::from_secs(3600));
    let policy = failsafe::failure_policy::consecutive_failures(failures_to_trip, backoff);
    Failsafe {
        breaker: failsafe::Config::new().failure_policy(policy).build(),
    }
}

fn breaker(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let _guard = runtime.enter();
    let mut cx = Context::from_waker(Waker::noop());
    let never_trips = || {
        CircuitBreakerConfig::new("bench")
            .max_failures(1_000_000)
            .ttl(Duration::from_millis(1))
    };

    let mut group = c.benchmark_group("breaker/closed_success");
    group.bench_function("bare", |b| b.iter(|| drive(&mut Bare, &mut cx, false)));
    let mut ours = palisade_breaker(never_trips());
    group.bench_function("palisade", |b| b.iter(|| drive(&mut ours, &mut cx, false)));
    let mut theirs = resilience_breaker();
    group.bench_function("tower-resilience", |b| {
        b.iter(|| drive(&mut theirs, &mut cx, false))
    });
    let mut failsafe = failsafe_breaker(u32::MAX);
    group.bench_function("failsafe", |b| {
        b.iter(|| drive(&mut failsafe, &mut cx, false))
    });
    group.finish();

    let mut group = c.benchmark_group("breaker/closed_failure");
    group.bench_function("bare", |b| b.iter(|| drive(&mut Bare, &mut cx, true)));
    group.bench_function("palisade", |b| b.iter(|| drive(&mut ours, &mut cx, true)));
    group.bench_function("tower-resilience", |b| {
        b.iter(|| drive(&mut theirs, &mut cx, true))
    });
    group.bench_function("failsafe", |b| {
        b.iter(|| drive(&mut failsafe, &mut cx, true))
    });
    group.finish();

    let mut group = c.benchmark_group("breaker/open_rejection");
    let mut ours = palisade_breaker(
        CircuitBreakerConfig::new("bench")
            .max_failures(1)
            .reset_timeout(Duration::from_secs(3600)),
    );
    drive(&mut ours, &mut cx, true);
    assert!(
        !drive(&mut ours, &mut cx, false),
        "palisade breaker did not open"
    );
    group.bench_function("palisade", |b| b.iter(|| drive(&mut ours, &mut cx, false)));
    let theirs_layer = tower_resilience::circuitbreaker::CircuitBreakerLayer::builder()
        .failure_rate_threshold(0.5)
        .minimum_number_of_calls(1)
        .sliding_window_size(1)
        .wait_duration_in_open(Duration::from_secs(3600))
        .build()
        .unwrap();
    let mut theirs = theirs_layer.layer(Bare);
    drive(&mut theirs, &mut cx, true);
    assert!(
        !drive(&mut theirs, &mut cx, false),
        "tower-resilience breaker did not open"
    );
    group.bench_function("tower-resilience", |b| {
        b.iter(|| drive(&mut theirs, &mut cx, false))
    });
    let mut failsafe = failsafe_breaker(1);
    drive(&mut failsafe, &mut cx, true);
    assert!(
        !drive(&mut failsafe, &mut cx, false),
        "failsafe breaker did not open"
    );
    group.bench_function("failsafe", |b| {
        b.iter(|| drive(&mut failsafe, &mut cx, false))
    });
    group.finish();

    // Two threads sharing one breaker: wall time for `iters` calls on each thread at once, so a
    // breaker that scales perfectly reports the same per-call time as with one thread.
    let mut group = c.benchmark_group("breaker/shared_closed_success");
    for threads in [1usize, 2] {
        let shared = palisade_breaker(never_trips());
        group.bench_with_input(
            BenchmarkId::new("palisade", threads),
            &threads,
            |b, &threads| b.iter_custom(|iters| run_threads(threads, iters, shared.clone())),
        );
        let theirs = resilience_breaker();
        group.bench_with_input(
            BenchmarkId::new("tower-resilience", threads),
            &threads,
            |b, &threads| b.iter_custom(|iters| run_threads(threads, iters, theirs.clone())),
        );
        let failsafe = failsafe_breaker(u32::MAX);
        group.bench_with_input(
            BenchmarkId::new("failsafe", threads),
            &threads,
            |b, &threads| b.iter_custom(|iters| run_threads(threads, iters, failsafe.clone())),
        );
    }
    group.finish();
}

/// tower's canonical example policy: retry errors up to n times.
#[derive(Clone)]
struct Attempts(usize);

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

fn retry_timeout_preset(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let _guard = runtime.enter();
    let mut cx = Context::from_waker(Waker::noop());

    let mut group = c.benchmark_group("retry/never_retries");
    group.bench_function("bare", |b| b.iter(|| drive(&mut Bare, &mut cx, false)));
    let mut ours = RetryPolicy::new(3).layer().layer(Bare);
    group.bench_function("palisade", |b| b.iter(|| drive(&mut ours, &mut cx, false)));
    let mut tower_retry = tower::retry::Retry::new(Attempts(2), Bare);
    group.bench_function("tower", |b| {
        b.iter(|| drive(&mut tower_retry, &mut cx, false))
    });
    let mut theirs = tower_resilience::retry::RetryLayer::<bool, u64, BenchError>::builder()
        .max_attempts(3)
        .fixed_backoff(Duration::from_millis(10))
        .build()
        .layer(Bare);
    group.bench_function("tower-resilience", |b| {
        b.iter(|| drive(&mut theirs, &mut cx, false))
    });
    group.finish();

    let mut group = c.benchmark_group("timeout/ready");
    group.bench_function("bare", |b| b.iter(|| drive(&mut Bare, &mut cx, false)));
    let mut ours = TimeoutLayer::new(Duration::from_secs(1)).layer(Bare);
    group.bench_function("palisade", |b| b.iter(|| drive(&mut ours, &mut cx, false)));
    let mut tower_timeout = tower::timeout::Timeout::new(Bare, Duration::from_secs(1));
    group.bench_function("tower", |b| {
        b.iter(|| drive(&mut tower_timeout, &mut cx, false))
    });
    let mut theirs = tower_resilience::timelimiter::TimeLimiterLayer::builder()
        .timeout_duration(Duration::from_secs(1))
        .build()
        .layer(Bare);
    group.bench_function("tower-resilience", |b| {
        b.iter(|| drive(&mut theirs, &mut cx, false))
    });
    group.finish();

    let mut group = c.benchmark_group("preset/success");
    group.bench_function("bare", |b| {
        b.iter(|| drive_with(&mut Bare, &mut cx, Deadlined::new(false)))
    });
    let mut preset = Resilience::new(CircuitBreakerConfig::new("preset-bench").max_failures(5))
        .deadline(Duration::from_secs(10))
        .retry(RetryPolicy::new(3))
        .attempt_timeout(Duration::from_secs(1))
        .layer(Bare);
    group.bench_function("palisade", |b| {
        b.iter(|| drive_with(&mut preset, &mut cx, Deadlined::new(false)))
    });
    group.finish();
}

fn run_threads<S>(threads: usize, iters: u64, service: S) -> Duration
where
    S: Service<bool> + Clone + Send + 'static,
{
    let barrier = Arc::new(Barrier::new(threads + 1));
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let mut service = service.clone();
            let barrier = Arc::clone(&barrier);
            std::thread::spawn(move || {
                let mut cx = Context::from_waker(Waker::noop());
                barrier.wait();
                for _ in 0..iters {
                    black_box(drive(&mut service, &mut cx, false));
                }
            })
        })
        .collect();
    barrier.wait();
    let start = Instant::now();
    for worker in workers {
        worker.join().unwrap();
    }
    start.elapsed()
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = breaker, retry_timeout_preset
}
criterion_main!(benches);

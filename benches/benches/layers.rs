//! Per-call overhead of the resilience layers over a bare always-ready service, side by side with
//! the anchors (tower, tower-resilience, failsafe) in the same run.
//!
//! Every variant drives `poll_ready` + `call` + one `poll` with a no-op waker, the way a caller that
//! finds the service ready would; the bare service is the floor.

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use palisade::circuit_breaker::CircuitBreakerConfig;
use palisade::retry::RetryPolicy;
use palisade::timeout::{Deadlined, TimeoutLayer};
use std::hint::black_box;
use std::sync::{Arc, Barrier};
use std::task::{Context, Waker};
use std::time::{Duration, Instant};
use tower::{Layer, Service};

#[path = "layer_support/mod.rs"]
mod layer_support;
use layer_support::*;

fn breaker(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let _guard = runtime.enter();
    let mut cx = Context::from_waker(Waker::noop());

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
    let mut arc = ArcPerCall::new(Bare);
    group.bench_function("bare+arc-per-call", |b| {
        b.iter(|| drive(&mut arc, &mut cx, false))
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
        let arc = ArcPerCall::new(Bare);
        group.bench_with_input(
            BenchmarkId::new("bare+arc-per-call", threads),
            &threads,
            |b, &threads| b.iter_custom(|iters| run_threads(threads, iters, arc.clone())),
        );
    }
    group.finish();
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
    // palisade's `Retry` with tower's trivial policy, and tower's `Retry` with palisade's
    // policy: the two services side by side with the same policy.
    let mut ours_with_attempts = palisade::retry::Retry::new(Bare, Attempts(2));
    group.bench_function("palisade-with-attempts", |b| {
        b.iter(|| drive(&mut ours_with_attempts, &mut cx, false))
    });
    let mut tower_with_ours = tower::retry::Retry::new(RetryPolicy::new(3), Bare);
    group.bench_function("tower-with-palisade-policy", |b| {
        b.iter(|| drive(&mut tower_with_ours, &mut cx, false))
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
    let mut preset = readme_preset().layer(Bare);
    group.bench_function("palisade-readme", |b| {
        b.iter(|| drive_with(&mut preset, &mut cx, Deadlined::new(false)))
    });
    let mut preset = readme_preset_without_budget().layer(Bare);
    group.bench_function("palisade-readme-no-budget", |b| {
        b.iter(|| drive_with(&mut preset, &mut cx, Deadlined::new(false)))
    });
    group.finish();

    // The same preset shared by one and by two threads (per-call wall time on each thread).
    let mut group = c.benchmark_group("preset/shared_success");
    for threads in [1usize, 2] {
        group.bench_with_input(
            BenchmarkId::new("bare", threads),
            &threads,
            |b, &threads| {
                b.iter_custom(|iters| {
                    run_threads_with(threads, iters, Bare, || Deadlined::new(false))
                })
            },
        );
        let preset = readme_preset().layer(Bare);
        group.bench_with_input(
            BenchmarkId::new("palisade-readme", threads),
            &threads,
            |b, &threads| {
                b.iter_custom(|iters| {
                    run_threads_with(threads, iters, preset.clone(), || Deadlined::new(false))
                })
            },
        );
    }
    group.finish();

    // A retry with a budget, shared by one and by two threads: palisade's `RetryBudget` against
    // tower's `TpsBudget`.
    let mut group = c.benchmark_group("retry/budget_shared");
    for threads in [1usize, 2] {
        group.bench_with_input(
            BenchmarkId::new("bare", threads),
            &threads,
            |b, &threads| b.iter_custom(|iters| run_threads(threads, iters, Bare)),
        );
        let ours = palisade_retry_with_budget();
        group.bench_with_input(
            BenchmarkId::new("palisade", threads),
            &threads,
            |b, &threads| b.iter_custom(|iters| run_threads(threads, iters, ours.clone())),
        );
        let theirs = tower_retry_with_budget();
        group.bench_with_input(
            BenchmarkId::new("tower-tps-budget", threads),
            &threads,
            |b, &threads| b.iter_custom(|iters| run_threads(threads, iters, theirs.clone())),
        );
    }
    group.finish();
}

fn run_threads<S>(threads: usize, iters: u64, service: S) -> Duration
where
    S: Service<bool> + Clone + Send + 'static,
{
    run_threads_with(threads, iters, service, || false)
}

/// Wall time for `iters` calls on each of `threads` threads at once, each thread with its own
/// clone of `service`: a layer that scales perfectly reports the same per-call time for 1 and 2.
fn run_threads_with<R, S>(threads: usize, iters: u64, service: S, request: fn() -> R) -> Duration
where
    S: Service<R> + Clone + Send + 'static,
    R: 'static,
{
    let barrier = Arc::new(Barrier::new(threads + 1));
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let mut service = service.clone();
            let barrier = Arc::clone(&barrier);
            std::thread::spawn(move || {
                // Each thread reads tokio's clock (deadlines, budgets) inside a runtime context.
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_time()
                    .build()
                    .unwrap();
                let _guard = runtime.enter();
                let mut cx = Context::from_waker(Waker::noop());
                barrier.wait();
                for _ in 0..iters {
                    black_box(drive_with(&mut service, &mut cx, request()));
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

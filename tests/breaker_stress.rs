//! Many tasks on a multi-thread runtime hammer one breaker through half-open phases: the number of
//! trial calls running at once never exceeds the limit.
//!
//! Real threads need the real clock here (tokio's paused clock is single-threaded); the test only
//! waits for the reset timeout to pass and asserts nothing about timing.

use palisade::circuit_breaker::{CircuitBreakerConfig, CircuitBreakerLayer, CircuitState};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::sync::Barrier;
use tower::{BoxError, Layer, Service, ServiceExt};

const TASKS: usize = 16;
const CALLS_PER_TASK: usize = 300;
const TRIAL_LIMIT: u32 = 3;
const ROUNDS: usize = 8;

#[derive(Default)]
struct Gauge {
    running: AtomicUsize,
    max: AtomicUsize,
    admitted: AtomicUsize,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn half_open_never_admits_more_trials_than_the_limit() {
    let reset = Duration::from_millis(30);
    let layer = CircuitBreakerLayer::new(
        CircuitBreakerConfig::new("stress")
            .max_failures(1)
            .reset_timeout(reset)
            // Trials never hang here; no slot may be reclaimed.
            .trial_timeout(Duration::from_secs(600))
            .half_open_max_calls(TRIAL_LIMIT)
            // Stay half-open for the whole round.
            .success_threshold(u32::MAX),
    );
    let handle = layer.handle();
    let gauge = Arc::new(Gauge::default());
    let inner_gauge = Arc::clone(&gauge);
    let service = layer.layer(tower::service_fn(move |fail: bool| {
        let gauge = Arc::clone(&inner_gauge);
        async move {
            if fail {
                return Err::<(), BoxError>("trip".into());
            }
            gauge.admitted.fetch_add(1, Ordering::SeqCst);
            let now = gauge.running.fetch_add(1, Ordering::SeqCst) + 1;
            gauge.max.fetch_max(now, Ordering::SeqCst);
            // Stay in flight across a few scheduling points so trials overlap.
            for _ in 0..3 {
                tokio::task::yield_now().await;
            }
            gauge.running.fetch_sub(1, Ordering::SeqCst);
            Ok(())
        }
    }));

    let mut total_admitted = 0;
    for _ in 0..ROUNDS {
        handle.reset();
        let mut tripper = service.clone();
        assert!(tripper.ready().await.unwrap().call(true).await.is_err());
        assert_eq!(handle.state(), CircuitState::Open);
        tokio::time::sleep(reset).await;

        let barrier = Arc::new(Barrier::new(TASKS));
        let tasks: Vec<_> = (0..TASKS)
            .map(|_| {
                let mut service = service.clone();
                let barrier = Arc::clone(&barrier);
                tokio::spawn(async move {
                    barrier.wait().await;
                    let mut admitted = 0;
                    for _ in 0..CALLS_PER_TASK {
                        if service.ready().await.unwrap().call(false).await.is_ok() {
                            admitted += 1;
                        }
                    }
                    admitted
                })
            })
            .collect();
        for task in tasks {
            total_admitted += task.await.unwrap();
        }
        assert_eq!(handle.state(), CircuitState::HalfOpen);
    }

    let max = gauge.max.load(Ordering::SeqCst);
    assert!(
        max <= TRIAL_LIMIT as usize,
        "{max} trials ran at once; the limit is {TRIAL_LIMIT}"
    );
    assert!(max >= 1);
    assert_eq!(gauge.admitted.load(Ordering::SeqCst), total_admitted);
    assert!(total_admitted >= ROUNDS, "no trial was admitted");
    let metrics = handle.metrics();
    assert_eq!(
        metrics.calls + metrics.rejections,
        (ROUNDS * (TASKS * CALLS_PER_TASK + 1)) as u64,
        "every call was either admitted or rejected"
    );
}

//! The builder extension and the resilience preset: order and interplay of the layers.

use palisade::builder::{Resilience, ServiceBuilderExt};
use palisade::circuit_breaker::{CircuitBreakerConfig, CircuitOpen, CircuitState};
use palisade::fault::FaultLayer;
use palisade::retry::{Backoff, Jitter, RetryPolicy};
use palisade::timeout::{Deadlined, Elapsed};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;
use tokio::time::Instant;
use tower::{BoxError, Service, ServiceBuilder, ServiceExt};

const MS: Duration = Duration::from_millis(1);
const SEC: Duration = Duration::from_secs(1);

fn policy(attempts: u32) -> RetryPolicy {
    RetryPolicy::new(attempts)
        .backoff(Backoff::constant(10 * MS))
        .jitter(Jitter::None)
}

fn transient() -> BoxError {
    Box::new(std::io::Error::from(std::io::ErrorKind::ConnectionReset))
}

#[tokio::test(start_paused = true)]
async fn preset_retry_sits_outside_the_breaker() {
    let calls = Arc::new(AtomicU32::new(0));
    let counter = Arc::clone(&calls);
    let preset = Resilience::new(
        CircuitBreakerConfig::new("preset")
            .max_failures(3)
            .reset_timeout(30 * SEC),
    )
    .deadline(5 * SEC)
    .retry(policy(7));
    let breaker = preset.breaker_handle();
    let mut service =
        ServiceBuilder::new()
            .resilience(preset)
            .service_fn(move |_: Deadlined<()>| {
                counter.fetch_add(1, Ordering::SeqCst);
                async { Err::<(), BoxError>(transient()) }
            });
    let error = service
        .ready()
        .await
        .unwrap()
        .call(Deadlined::new(()))
        .await
        .unwrap_err();
    assert!(error.is::<CircuitOpen>(), "got {error}");
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    assert_eq!(breaker.state(), CircuitState::Open);
}

#[tokio::test(start_paused = true)]
async fn preset_times_out_hung_attempts_inside_the_breaker() {
    let calls = Arc::new(AtomicU32::new(0));
    let counter = Arc::clone(&calls);
    let preset = Resilience::new(CircuitBreakerConfig::new("hung").max_failures(5))
        .retry(policy(3))
        .attempt_timeout(SEC);
    let breaker = preset.breaker_handle();
    let mut service =
        ServiceBuilder::new()
            .resilience(preset)
            .service_fn(move |_: Deadlined<()>| {
                let n = counter.fetch_add(1, Ordering::SeqCst);
                async move {
                    if n < 2 {
                        std::future::pending::<()>().await;
                    }
                    Ok::<_, BoxError>("third")
                }
            });
    let start = Instant::now();
    assert_eq!(
        service
            .ready()
            .await
            .unwrap()
            .call(Deadlined::new(()))
            .await
            .unwrap(),
        "third"
    );
    assert_eq!(start.elapsed(), 2 * SEC + 20 * MS);
    // The breaker saw the two timeouts as failures.
    assert_eq!(breaker.metrics().failures, 2);
}

#[tokio::test(start_paused = true)]
async fn preset_deadline_bounds_the_whole_call() {
    let preset = Resilience::new(CircuitBreakerConfig::new("slow").max_failures(100))
        .deadline(SEC)
        .retry(policy(50))
        .attempt_timeout(400 * MS);
    let mut service =
        ServiceBuilder::new()
            .resilience(preset)
            .service_fn(|_: Deadlined<()>| async {
                std::future::pending::<()>().await;
                Ok::<(), BoxError>(())
            });
    let start = Instant::now();
    let error = service
        .ready()
        .await
        .unwrap()
        .call(Deadlined::new(()))
        .await
        .unwrap_err();
    let elapsed = error.downcast_ref::<Elapsed>().expect("a timeout");
    assert!(elapsed.is_deadline(), "got {elapsed}");
    // 400 ms, 400 ms, then 180 ms left (10 ms backoffs): never past the deadline.
    assert_eq!(start.elapsed(), SEC);
}

#[tokio::test(start_paused = true)]
async fn cancellation_is_not_a_failure_anywhere() {
    let preset = Resilience::new(CircuitBreakerConfig::new("cancel").max_failures(1))
        .retry(policy(3))
        .attempt_timeout(SEC);
    let breaker = preset.breaker_handle();
    let mut service =
        ServiceBuilder::new()
            .resilience(preset)
            .service_fn(|_: Deadlined<()>| async {
                std::future::pending::<()>().await;
                Ok::<(), BoxError>(())
            });
    let mut call = Box::pin(service.ready().await.unwrap().call(Deadlined::new(())));
    assert!(futures_util::poll!(call.as_mut()).is_pending());
    tokio::time::advance(500 * MS).await;
    drop(call);
    tokio::time::advance(10 * SEC).await;
    assert_eq!(breaker.state(), CircuitState::Closed);
    assert_eq!(breaker.metrics().failures, 0);
}

#[tokio::test(start_paused = true)]
async fn extension_methods_stack_like_the_preset() {
    let fault = FaultLayer::seeded(11).fail_calls(1..=2);
    let mut service = ServiceBuilder::new()
        .deadline(5 * SEC)
        .retry_with(policy(3).honor_deadline())
        .circuit_breaker(CircuitBreakerConfig::new("ext").max_failures(5))
        .attempt_timeout(SEC)
        .fault(fault.clone())
        .service_fn(
            |request: Deadlined<u32>| async move { Ok::<_, BoxError>(request.request * 2) },
        );
    assert_eq!(
        service
            .ready()
            .await
            .unwrap()
            .call(Deadlined::new(21))
            .await
            .unwrap(),
        42
    );
    assert_eq!(
        fault.handle().calls(),
        3,
        "two injected faults were retried"
    );
}

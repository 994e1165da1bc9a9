//! Fault injection is deterministic for a seed, scriptable, and adjustable while running.

use palisade::fault::{FaultLayer, InjectedFault};
use palisade::timeout::{Elapsed, TimeoutLayer};
use std::time::Duration;
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt};

#[derive(Debug, PartialEq)]
enum AppError {
    Injected(InjectedFault),
    Timeout(Elapsed),
}

impl From<InjectedFault> for AppError {
    fn from(fault: InjectedFault) -> Self {
        AppError::Injected(fault)
    }
}

impl From<Elapsed> for AppError {
    fn from(e: Elapsed) -> Self {
        AppError::Timeout(e)
    }
}

fn echo() -> impl Service<u64, Response = u64, Error = AppError> + Clone {
    tower::service_fn(|x: u64| async move { Ok::<_, AppError>(x) })
}

async fn pattern(layer: FaultLayer, calls: u64) -> Vec<bool> {
    let mut service = layer.layer(echo());
    let mut out = Vec::new();
    for i in 0..calls {
        out.push(service.ready().await.unwrap().call(i).await.is_ok());
    }
    out
}

#[tokio::test(start_paused = true)]
async fn the_same_seed_gives_the_same_faults() {
    let a = pattern(FaultLayer::seeded(99).error_rate(0.3), 1000).await;
    let b = pattern(FaultLayer::seeded(99).error_rate(0.3), 1000).await;
    let c = pattern(FaultLayer::seeded(100).error_rate(0.3), 1000).await;
    assert_eq!(a, b);
    assert_ne!(a, c);
    let failures = a.iter().filter(|ok| !**ok).count();
    assert!(
        (240..=360).contains(&failures),
        "{failures} failures at a 30% rate"
    );
}

#[tokio::test(start_paused = true)]
async fn scripted_failures_hit_exactly_those_calls() {
    let outcomes = pattern(FaultLayer::seeded(1).fail_calls(10..=20), 30).await;
    let failed: Vec<_> = (1..=30).filter(|n| !outcomes[*n as usize - 1]).collect();
    assert_eq!(failed, (10..=20).collect::<Vec<_>>());

    let mut service = FaultLayer::seeded(1).fail_calls(2..=2).layer(echo());
    let _ = service.ready().await.unwrap().call(0).await;
    let error = service.ready().await.unwrap().call(0).await.unwrap_err();
    match error {
        AppError::Injected(fault) => {
            assert_eq!(fault.call(), 2);
            assert_eq!(fault.to_string(), "injected fault on call 2");
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn latency_and_hangs() {
    let mut slow = FaultLayer::seeded(5)
        .latency(Duration::from_millis(250), 1.0)
        .layer(echo());
    let start = Instant::now();
    assert_eq!(slow.ready().await.unwrap().call(1).await, Ok(1));
    assert_eq!(start.elapsed(), Duration::from_millis(250));

    let hanging = FaultLayer::seeded(5).hang_calls(2..=2).layer(echo());
    let mut service = TimeoutLayer::new(Duration::from_secs(1)).layer(hanging);
    assert_eq!(service.ready().await.unwrap().call(1).await, Ok(1));
    assert_eq!(
        service.ready().await.unwrap().call(2).await,
        Err(AppError::Timeout(Elapsed::attempt(Duration::from_secs(1))))
    );
    assert_eq!(service.ready().await.unwrap().call(3).await, Ok(3));
}

#[tokio::test(start_paused = true)]
async fn rates_can_be_turned_up_and_down_while_running() {
    let layer = FaultLayer::seeded(3);
    let handle = layer.handle();
    let mut service = layer.layer(echo());
    for i in 0..50 {
        assert!(service.ready().await.unwrap().call(i).await.is_ok());
    }
    handle.set_error_rate(1.0);
    for i in 0..50 {
        assert!(service.ready().await.unwrap().call(i).await.is_err());
    }
    handle.set_error_rate(0.0);
    assert!(service.ready().await.unwrap().call(0).await.is_ok());
    assert_eq!(handle.calls(), 101);
}

/// A service that records when it was *called* (not when its answer was read).
fn call_log() -> (
    impl Service<u64, Response = u64, Error = AppError> + Clone,
    std::sync::Arc<std::sync::Mutex<Vec<Instant>>>,
) {
    let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = std::sync::Arc::clone(&log);
    let service = tower::service_fn(move |x: u64| {
        seen.lock().unwrap().push(Instant::now());
        async move { Ok::<_, AppError>(x) }
    });
    (service, log)
}

#[tokio::test(start_paused = true)]
async fn latency_delays_the_call_itself_not_just_the_answer() {
    let (inner, called) = call_log();
    let mut slow = FaultLayer::seeded(5)
        .latency(Duration::from_millis(250), 1.0)
        .layer(inner);
    let start = Instant::now();
    let future = slow.ready().await.unwrap().call(1);
    assert!(
        called.lock().unwrap().is_empty(),
        "the inner service was called at once"
    );
    assert_eq!(future.await, Ok(1));
    assert_eq!(
        called.lock().unwrap()[0] - start,
        Duration::from_millis(250)
    );
    // Delayed calls do not hold each other up: two at once both finish after 250 ms.
    let start = Instant::now();
    let a = slow.ready().await.unwrap().call(2);
    let b = slow.ready().await.unwrap().call(3);
    assert_eq!(futures::join!(a, b), (Ok(2), Ok(3)));
    assert_eq!(start.elapsed(), Duration::from_millis(250));
}

#[tokio::test(start_paused = true)]
async fn a_huge_latency_neither_panics_nor_answers() {
    let mut service = TimeoutLayer::new(Duration::from_secs(1)).layer(
        FaultLayer::seeded(5)
            .latency(Duration::MAX, 1.0)
            .layer(echo()),
    );
    assert_eq!(
        service.ready().await.unwrap().call(1).await,
        Err(AppError::Timeout(Elapsed::attempt(Duration::from_secs(1))))
    );
}

#[tokio::test(start_paused = true)]
async fn scripting_a_clone_gives_it_its_own_script() {
    let original = FaultLayer::seeded(1).fail_calls(1..=1);
    let clone = original.clone().fail_calls(2..=2);
    assert_eq!(pattern(original, 3).await, [false, true, true]);
    assert_eq!(pattern(clone, 3).await, [false, false, true]);
    // A handle made and dropped does not hide a clone.
    let original = FaultLayer::seeded(1);
    drop(original.handle());
    let _clone = original.clone().fail_calls(1..=1);
    assert_eq!(pattern(original, 2).await, [true, true]);
}

mod fallback {
    use super::*;
    use palisade::builder::ServiceBuilderExt;
    use palisade::circuit_breaker::{CircuitBreakerConfig, CircuitOpen};
    use palisade::classify::FailureKind;
    use palisade::fallback::FallbackLayer;
    use tower::ServiceBuilder;

    #[derive(Debug, PartialEq)]
    enum StoreError {
        NotFound,
        Down,
        Open,
    }

    impl From<CircuitOpen> for StoreError {
        fn from(_: CircuitOpen) -> Self {
            StoreError::Open
        }
    }

    impl FailureKind for StoreError {
        fn is_transient(&self) -> bool {
            *self != StoreError::NotFound
        }
        fn is_fault(&self) -> bool {
            *self == StoreError::Down
        }
        fn is_rejection(&self) -> bool {
            *self == StoreError::Open
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_fallback_answers_failed_calls_and_can_pass_errors_on() {
        let mut service = ServiceBuilder::new()
            .fallback(|error: StoreError| match error {
                StoreError::Down => Ok("cached"),
                other => Err(other),
            })
            .service_fn(|key: &'static str| async move {
                match key {
                    "down" => Err(StoreError::Down),
                    "missing" => Err(StoreError::NotFound),
                    key => Ok(key),
                }
            });
        assert_eq!(
            service.ready().await.unwrap().call("fresh").await,
            Ok("fresh")
        );
        assert_eq!(
            service.ready().await.unwrap().call("down").await,
            Ok("cached")
        );
        assert_eq!(
            service.ready().await.unwrap().call("missing").await,
            Err(StoreError::NotFound)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn on_faults_answers_outages_and_open_circuits_only() {
        let mut service = ServiceBuilder::new()
            .layer(FallbackLayer::on_faults(|_: StoreError| Ok("stale")))
            .circuit_breaker(CircuitBreakerConfig::new("store").max_failures(1))
            .service_fn(|key: &'static str| async move {
                match key {
                    "down" => Err(StoreError::Down),
                    "missing" => Err(StoreError::NotFound),
                    key => Ok(key),
                }
            });
        assert_eq!(
            service.ready().await.unwrap().call("missing").await,
            Err(StoreError::NotFound)
        );
        // The not-found counted as a failure (default classifier) and opened the breaker; the open
        // circuit's rejection gets the fallback, as does an outage.
        assert_eq!(
            service.ready().await.unwrap().call("fresh").await,
            Ok("stale")
        );
    }
}

/// A handle taken before the layer is scripted (builder calls take the layer by value) still
/// steers it and counts its calls.
#[tokio::test(start_paused = true)]
async fn a_handle_taken_before_scripting_still_steers_the_layer() {
    let layer = FaultLayer::seeded(1);
    let handle = layer.handle();
    let layer = layer.fail_calls(1..=1).hang_calls(1000..=1000);
    let mut service = layer.layer(echo());
    assert!(service.ready().await.unwrap().call(1).await.is_err());
    assert!(service.ready().await.unwrap().call(2).await.is_ok());
    handle.set_error_rate(1.0);
    assert!(service.ready().await.unwrap().call(3).await.is_err());
    assert_eq!(handle.calls(), 3);
    // Once nothing but handles shares the layer's state (a clone of the handle made and dropped
    // included), scripting it again keeps the handles on it.
    drop(service);
    drop(handle.clone());
    let layer = layer.fail_calls(10..=10);
    handle.set_error_rate(0.0);
    let mut service = layer.layer(echo());
    assert!(service.ready().await.unwrap().call(4).await.is_ok());
    assert_eq!(handle.calls(), 4);
}

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

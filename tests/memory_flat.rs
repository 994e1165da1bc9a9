//! Memory stays flat in a process that creates and drops breakers and retry policies with
//! distinct names and settings all day (issue 13, items 10–14). Measured with a counting global
//! allocator: the bytes still allocated after each round must not grow.

use palisade::circuit_breaker::{
    CircuitBreakerConfig, CircuitBreakerLayer, CircuitBreakerRegistry, CircuitOpen,
};
use palisade::retry::{Backoff, Jitter, RetryPolicy};
use std::time::Duration;
use tower::{BoxError, Layer, Service, ServiceExt};

#[path = "support/live_bytes.rs"]
mod live_bytes;
use live_bytes::{LiveBytes, live};

#[global_allocator]
static ALLOCATOR: LiveBytes = LiveBytes;

#[derive(Debug)]
struct Error;

impl From<CircuitOpen> for Error {
    fn from(_: CircuitOpen) -> Self {
        Error
    }
}

impl palisade::classify::FailureKind for Error {
    fn is_transient(&self) -> bool {
        false
    }
}

/// One round: `n` breakers and policies, each with a name and settings never seen before, used
/// (tripped, subscribed to, failed through) and dropped.
async fn round(round: usize, n: usize) {
    let registry = CircuitBreakerRegistry::new(CircuitBreakerConfig::new("template"));
    for i in 0..n {
        let name = format!("tenant-{round}-{i}-{}", "x".repeat(i % 64));
        let layer = CircuitBreakerLayer::new(
            CircuitBreakerConfig::new(name.as_str())
                .max_failures(1 + (i % 7) as u32)
                .consecutive_failures(2)
                .failure_rate(0.5, Duration::from_secs(1 + (i % 5) as u64), 2),
        );
        let handle = layer.handle();
        let mut changes = handle.subscribe();
        let mut service = layer.layer(tower::service_fn(|fail: bool| async move {
            if fail { Err(Error) } else { Ok(()) }
        }));
        for _ in 0..3 {
            let _ = service.ready().await.unwrap().call(true).await;
        }
        let _ = changes.try_recv();
        // A rejection carries the name out of the breaker; it is freed with the error.
        let rejection = service.ready().await.unwrap().call(false).await;
        drop((rejection, changes, service, handle, layer));

        let per_tenant = registry.layer(&name);
        drop(per_tenant);
        assert!(registry.remove(&name).is_some());

        let policy = RetryPolicy::new(1 + (i % 50) as u32)
            .backoff(Backoff::constant(Duration::from_nanos(
                (round * n + i) as u64,
            )))
            .jitter(Jitter::Equal)
            .seed(i as u64);
        let mut retried = policy.layer().layer(tower::service_fn(|_: ()| async {
            Err::<(), BoxError>("boom".into())
        }));
        let _ = retried.ready().await.unwrap().call(()).await;
    }
}

#[tokio::test(start_paused = true)]
async fn creating_and_dropping_breakers_and_policies_keeps_memory_flat() {
    const N: usize = 4_000;
    // Warm up: pools, slabs, tracing's callsites and tokio's timer reach their working size.
    round(0, N).await;
    round(1, N).await;
    let after_warm_up = live();
    for r in 2..6 {
        round(r, N).await;
    }
    let after = live();
    eprintln!("live bytes after warm-up {after_warm_up}, after 4 more rounds {after}");
    // 16 000 more distinct breakers and policies: a leak of even one byte each would show.
    assert!(
        after - after_warm_up <= 4096,
        "live memory grew by {} bytes over 16 000 breakers and policies",
        after - after_warm_up
    );
}

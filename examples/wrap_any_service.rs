//! palisade's layers around a plain `service_fn` — no messaging at all — stacked with tower's own
//! `Buffer`, `ConcurrencyLimit`, `RateLimit` and `LoadShed`.
//!
//! `cargo run --example wrap_any_service`
//!
//! A flaky "pricing" function (fault injection turns it down for a while) is called by 8 tasks at
//! once through one shared stack. The output shows retries absorbing the blips, the breaker opening
//! when the outage is sustained, and recovery afterwards.

use palisade::builder::{Resilience, ServiceBuilderExt};
use palisade::circuit_breaker::{CircuitBreakerConfig, CircuitOpen};
use palisade::fault::FaultLayer;
use palisade::retry::{Backoff, Jitter, RetryPolicy};
use palisade::timeout::{Deadlined, Elapsed};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tower::{BoxError, Service, ServiceBuilder, ServiceExt};

#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    open: AtomicU64,
    timeout: AtomicU64,
    other: AtomicU64,
    retries: AtomicU64,
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let tally = Arc::new(Tally::default());
    let retries = Arc::clone(&tally);

    // The plain function being protected: price lookup, with faults injected in front of it.
    let fault = FaultLayer::seeded(2024).latency(Duration::from_millis(20), 0.2);
    let faults = fault.handle();

    let preset = Resilience::new(
        CircuitBreakerConfig::new("pricing")
            .ttl(Duration::from_secs(1))
            .max_failures(8)
            .reset_timeout(Duration::from_millis(400)),
    )
    .deadline(Duration::from_millis(600))
    .retry(
        RetryPolicy::new(3)
            .backoff(
                Backoff::exponential(Duration::from_millis(10), 2.0)
                    .max_delay(Duration::from_millis(100)),
            )
            .jitter(Jitter::Full)
            .on_retry(move |_| {
                retries.retries.fetch_add(1, Ordering::Relaxed);
            }),
    )
    .attempt_timeout(Duration::from_millis(100));
    let breaker = preset.breaker_handle();

    let pricing = ServiceBuilder::new()
        // tower's Buffer makes the stack shareable between tasks (it speaks BoxError)...
        .buffer(64)
        // ...LoadShed rejects at once when the stack below is saturated...
        .load_shed()
        // ...and ConcurrencyLimit / RateLimit bound what reaches the dependency.
        .concurrency_limit(16)
        .rate_limit(2_000, Duration::from_secs(1))
        // Boxing the future here keeps the resilience stack's type out of the tasks that await
        // it (see "BoxError and tokio::spawn" in palisade::retry's docs).
        .layer(tower::util::BoxService::layer())
        .resilience(preset)
        .fault(fault)
        .service_fn(|request: Deadlined<u32>| async move {
            Ok::<_, BoxError>(request.request as f64 * 1.25)
        });

    let phases = [
        ("healthy", 0.0),
        ("blips (10% errors): retries absorb them", 0.1),
        ("outage (100% errors): the breaker opens", 1.0),
        ("recovered", 0.0),
    ];
    for (phase, error_rate) in phases {
        faults.set_error_rate(error_rate);
        let before = snapshot(&tally);
        let workers: Vec<_> = (0..8)
            .map(|worker| {
                let mut pricing = pricing.clone();
                let tally = Arc::clone(&tally);
                tokio::spawn(async move {
                    for sku in 0..25u32 {
                        let result = match pricing.ready().await {
                            Ok(ready) => ready.call(Deadlined::new(worker * 100 + sku)).await,
                            Err(e) => Err(e),
                        };
                        let counter = match &result {
                            Ok(_) => &tally.ok,
                            Err(e) if e.is::<CircuitOpen>() => &tally.open,
                            Err(e) if e.is::<Elapsed>() => &tally.timeout,
                            Err(_) => &tally.other,
                        };
                        counter.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(8)).await;
                    }
                })
            })
            .collect();
        for worker in workers {
            worker.await?;
        }
        let after = snapshot(&tally);
        let delta: Vec<u64> = after.iter().zip(before).map(|(a, b)| a - b).collect();
        println!(
            "{phase:<42} ok {:>3}  rejected (circuit open) {:>3}  timed out {:>2}  failed {:>3}  retries {:>3}  breaker {}",
            delta[0],
            delta[1],
            delta[2],
            delta[3],
            delta[4],
            breaker.state()
        );
        if error_rate == 1.0 {
            // Give the breaker its reset timeout before the recovery phase.
            tokio::time::sleep(Duration::from_millis(450)).await;
        }
    }
    Ok(())
}

fn snapshot(tally: &Tally) -> [u64; 5] {
    [
        tally.ok.load(Ordering::Relaxed),
        tally.open.load(Ordering::Relaxed),
        tally.timeout.load(Ordering::Relaxed),
        tally.other.load(Ordering::Relaxed),
        tally.retries.load(Ordering::Relaxed),
    ]
}

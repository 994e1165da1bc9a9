//! A circuit breaker tripping and recovering around a flaky service, printed as a timeline.
//!
//! `cargo run --example demo` — no broker, no setup; finishes in about four seconds.

use palisade::circuit_breaker::{CircuitBreakerConfig, CircuitBreakerLayer, CircuitOpen};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::time::Instant;
use tower::{BoxError, Service, ServiceBuilder, ServiceExt};

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let healthy = Arc::new(AtomicBool::new(true));
    let breaker = CircuitBreakerLayer::new(
        CircuitBreakerConfig::new("inventory")
            .ttl(Duration::from_secs(1))
            .max_failures(3)
            .reset_timeout(Duration::from_millis(800)),
    );
    let handle = breaker.handle();
    let mut changes = handle.subscribe();
    let start = Instant::now();
    tokio::spawn(async move {
        while let Some(change) = changes.recv().await {
            println!(
                "{:>6.2}s  breaker {} -> {} ({})",
                (change.at - start).as_secs_f64(),
                change.from,
                change.to,
                change.reason
            );
        }
    });

    let flag = Arc::clone(&healthy);
    let mut inventory = ServiceBuilder::new()
        .layer(breaker)
        .service_fn(move |sku: u32| {
            let healthy = flag.load(Ordering::Relaxed);
            async move {
                tokio::time::sleep(Duration::from_millis(5)).await;
                if healthy {
                    Ok(sku * 10)
                } else {
                    Err::<u32, BoxError>("inventory database is down".into())
                }
            }
        });

    println!("  time  event");
    for tick in 0..40u32 {
        match tick {
            8 => {
                healthy.store(false, Ordering::Relaxed);
                println!(
                    "{:>6.2}s  -- the inventory service starts failing",
                    start.elapsed().as_secs_f64()
                );
            }
            26 => {
                healthy.store(true, Ordering::Relaxed);
                println!(
                    "{:>6.2}s  -- the inventory service recovers",
                    start.elapsed().as_secs_f64()
                );
            }
            _ => {}
        }
        let outcome = match inventory.ready().await?.call(tick).await {
            Ok(stock) => format!("ok ({stock})"),
            Err(error) if error.is::<CircuitOpen>() => format!("rejected: {error}"),
            Err(error) => format!("failed: {error}"),
        };
        println!(
            "{:>6.2}s  call {tick:>2}: {outcome}",
            start.elapsed().as_secs_f64()
        );
        tokio::time::sleep(Duration::from_millis(90)).await;
    }
    let metrics = handle.metrics();
    println!(
        "\nsummary: {} calls went through, {} failed, {} were rejected without touching the service; {} state changes; final state {}",
        metrics.calls,
        metrics.failures,
        metrics.rejections,
        metrics.transitions,
        handle.state()
    );
    Ok(())
}

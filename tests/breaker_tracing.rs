//! Breaker transitions are `tracing` events carrying the breaker's name.
//!
//! Alone in its test binary: tracing caches each callsite's interest process-wide, and a test running
//! in parallel without a subscriber could register the callsite first.

mod support;

use palisade::circuit_breaker::{CircuitBreakerConfig, CircuitBreakerLayer};
use std::time::Duration;
use support::{Call, scripted};
use tower::{Layer, Service, ServiceExt};

#[test]
fn transitions_are_traced_with_the_breaker_name() {
    use std::sync::{Arc, Mutex};
    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let buffer = Buffer::default();
    let writer = buffer.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    tracing::subscriber::with_default(subscriber, || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        runtime.block_on(async {
            let (inner, _) = scripted();
            let config = CircuitBreakerConfig::new("users")
                .max_failures(1)
                .reset_timeout(Duration::from_secs(10));
            let mut service = CircuitBreakerLayer::new(config).layer(inner);
            let _ = service.ready().await.unwrap().call(Call::Fail).await;
        });
    });
    let log = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
    assert!(log.contains("circuit breaker opened"), "{log}");
    assert!(log.contains("breaker=users"), "{log}");
    assert!(log.contains("reason=the trip rule fired"), "{log}");
}

//! Breaker transitions are `tracing` events carrying the breaker's name.
//!
//! Alone in its test binary: tracing caches each callsite's interest process-wide, and a test running
//! in parallel without a subscriber could register the callsite first.

mod support;

use palisade::circuit_breaker::{CircuitBreakerConfig, CircuitBreakerLayer};
use std::time::Duration;
use support::{Call, scripted};
use tower::{Layer, Service, ServiceExt};

/// A runtime on tokio's paused clock, for a test that installs its subscriber on this thread.
fn paused_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap()
}

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
        paused_runtime().block_on(async {
            let (inner, _) = scripted();
            let config = CircuitBreakerConfig::new("users")
                .max_failures(1)
                .reset_timeout(Duration::from_secs(10));
            let layer = CircuitBreakerLayer::new(config);
            let mut service = layer.layer(inner);
            let _ = service.ready().await.unwrap().call(Call::Fail).await;
            // Half-open on the next call after the reset timeout, closed once the trial succeeds.
            tokio::time::advance(Duration::from_secs(10)).await;
            let _ = service.ready().await.unwrap().call(Call::Ok).await;
            layer.handle().force_open();
        });
    });
    let log = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
    let lines: Vec<&str> = log.lines().collect();
    let opened: Vec<&&str> = lines
        .iter()
        .filter(|line| line.contains("circuit breaker opened"))
        .collect();
    // Opening is a warning, whether a trip rule or a person did it; other changes are news.
    assert_eq!(opened.len(), 2, "{log}");
    for line in &opened {
        assert!(line.contains(" WARN "), "{line}");
        assert!(line.contains("breaker=users"), "{line}");
    }
    assert!(opened[0].contains("reason=the trip rule fired"), "{log}");
    assert!(opened[0].contains("open_for=Some(10s)"), "{log}");
    assert!(opened[1].contains("to=ForcedOpen"), "{log}");
    let changed: Vec<&&str> = lines
        .iter()
        .filter(|line| line.contains("circuit breaker state changed"))
        .collect();
    assert_eq!(changed.len(), 2, "half-open, then closed: {log}");
    for line in &changed {
        assert!(line.contains(" INFO "), "{line}");
        assert!(line.contains("breaker=users"), "{line}");
    }
    assert!(changed[0].contains("to=HalfOpen"), "{log}");
    assert!(changed[1].contains("to=Closed"), "{log}");
}

/// A subscriber that panics while the breaker reports its opening (a bug in someone's logging)
/// does not turn the call that tripped it into a panic: the caller gets the call's own result,
/// and the breaker is open for the next one.
#[test]
fn a_subscriber_panicking_on_a_transition_does_not_reach_the_caller() {
    struct PanicsOnOpening;
    impl std::io::Write for PanicsOnOpening {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            if String::from_utf8_lossy(bytes).contains("circuit breaker opened") {
                panic!("the log sink broke");
            }
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let subscriber = tracing_subscriber::fmt()
        .with_writer(|| PanicsOnOpening)
        .with_ansi(false)
        .finish();
    tracing::subscriber::with_default(subscriber, || {
        paused_runtime().block_on(async {
            let (inner, calls) = scripted();
            let layer = CircuitBreakerLayer::new(
                CircuitBreakerConfig::new("logged")
                    .max_failures(1)
                    .reset_timeout(Duration::from_secs(10)),
            );
            let mut service = layer.layer(inner);
            let first = service.ready().await.unwrap().call(Call::Fail).await;
            assert_eq!(first.unwrap_err().to_string(), "boom");
            assert_eq!(
                layer.handle().state(),
                palisade::circuit_breaker::CircuitState::Open
            );
            let second = service.ready().await.unwrap().call(Call::Ok).await;
            let rejected = second.unwrap_err();
            assert!(
                rejected.is::<palisade::circuit_breaker::CircuitOpen>(),
                "{rejected}"
            );
            assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
        });
    });
}

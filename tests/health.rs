//! Health checks: breakers and checks of your own, reported in terminus's shape, as a message
//! pattern and as a tower service.

use palisade::circuit_breaker::{CircuitBreakerConfig, CircuitBreakerLayer};
use palisade::health::Health;
use palisade::rpc::transport::memory::MemoryTransport;
use palisade::rpc::{Client, Code, Router, Server};
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tower::ServiceExt;

fn health() -> (
    Health,
    palisade::circuit_breaker::CircuitBreakerHandle,
    Arc<AtomicBool>,
) {
    let breaker = CircuitBreakerLayer::new(CircuitBreakerConfig::new("payments")).handle();
    let connected = Arc::new(AtomicBool::new(true));
    let flag = Arc::clone(&connected);
    let health = Health::new()
        .breaker(breaker.clone())
        .check("broker", move || {
            if flag.load(Ordering::Relaxed) {
                Ok(())
            } else {
                Err("disconnected from 127.0.0.1:4222".to_owned())
            }
        });
    (health, breaker, connected)
}

#[test]
fn a_report_follows_the_breakers_and_the_checks() {
    let (health, breaker, connected) = health();
    let report = health.report();
    assert!(report.is_up());
    assert_eq!(report.http_status(), 200);
    assert_eq!(
        report.to_json(),
        json!({
            "status": "ok",
            "info": {"payments": {"status": "up", "state": "closed"}, "broker": {"status": "up"}},
            "error": {},
            "details": {"payments": {"status": "up", "state": "closed"}, "broker": {"status": "up"}},
        })
    );

    breaker.force_open();
    connected.store(false, Ordering::Relaxed);
    let report = health.report();
    assert!(!report.is_up());
    assert_eq!(report.http_status(), 503);
    assert_eq!(report.down().collect::<Vec<_>>(), ["payments", "broker"]);
    let json = report.to_json();
    assert_eq!(json["status"], "error");
    assert_eq!(json["info"], json!({}));
    assert_eq!(
        json["error"]["broker"],
        json!({"status": "down", "message": "disconnected from 127.0.0.1:4222"})
    );
    assert_eq!(json["error"]["payments"]["state"], "forced open");

    // One check down is enough; back up when it recovers.
    breaker.reset();
    assert!(!health.report().is_up());
    connected.store(true, Ordering::Relaxed);
    assert!(health.report().is_up());
}

#[tokio::test]
async fn served_as_a_message_pattern_down_is_unavailable_with_the_report() {
    let (health, breaker, _connected) = health();
    let transport = MemoryTransport::new();
    let server = Server::new(Router::new().message("health", health.handler()))
        .serve(&transport)
        .await
        .unwrap();
    let client = Client::builder().connect(transport).await.unwrap();

    let up: Value = client.send("health", &json!({})).await.unwrap();
    assert_eq!(up["status"], "ok");

    breaker.force_open();
    let down = client
        .send::<Value>("health", &json!({}))
        .await
        .unwrap_err();
    assert_eq!(down.code(), Code::Unavailable, "{down}");
    assert_eq!(down.message(), "health check failed: payments");
    let err = down.err();
    assert_eq!(err["status"], "error");
    assert_eq!(err["error"]["payments"]["status"], "down");
    assert_eq!(err["info"]["broker"]["status"], "up");
    server.shutdown().await;
}

#[tokio::test]
async fn usable_as_a_tower_service() {
    let (health, breaker, _connected) = health();
    let report = health.clone().oneshot(()).await.unwrap();
    assert!(report.is_up());
    breaker.force_open();
    // Clones share the checks.
    let report = health.oneshot("GET /health").await.unwrap();
    assert_eq!(report.http_status(), 503);
}

/// A tripped breaker is down while it turns calls away, and up once its reset timeout has passed
/// and it would let a trial through: its state turns half-open only at the next call, and a
/// readiness probe that keeps traffic away while the breaker is down would otherwise keep it
/// down for good (it was still down an hour after a 30 s reset timeout).
#[tokio::test(start_paused = true)]
async fn an_open_breaker_is_up_again_once_a_trial_is_due() {
    use std::time::Duration;
    use tower::{Layer, Service};
    let layer = CircuitBreakerLayer::new(
        CircuitBreakerConfig::new("payments")
            .max_failures(1)
            .reset_timeout(Duration::from_secs(30)),
    );
    let handle = layer.handle();
    let health = Health::new().breaker(handle.clone());
    let mut service = layer.layer(tower::service_fn(|fail: bool| async move {
        if fail {
            Err(tower::BoxError::from("down"))
        } else {
            Ok(())
        }
    }));
    assert!(service.ready().await.unwrap().call(true).await.is_err());
    let report = health.report();
    assert!(!report.is_up());
    assert_eq!(report.to_json()["error"]["payments"]["state"], "open");
    tokio::time::advance(Duration::from_secs(30) - Duration::from_millis(1)).await;
    assert!(!health.report().is_up());
    tokio::time::advance(Duration::from_millis(1)).await;
    let report = health.report();
    assert!(report.is_up());
    assert_eq!(report.to_json()["info"]["payments"]["state"], "open");
    // The trial fails: down again for another period.
    assert!(service.ready().await.unwrap().call(true).await.is_err());
    assert!(!health.report().is_up());
    tokio::time::advance(Duration::from_secs(30)).await;
    assert!(service.ready().await.unwrap().call(false).await.is_ok());
    assert_eq!(
        health.report().to_json()["info"]["payments"]["state"],
        "closed"
    );
}

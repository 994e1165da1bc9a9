//! NATS durable-event faults, each against its own `nats-server` on a free loopback port: a dead
//! letter near the server's `max_payload`, a backoff of `Duration::MAX`, and shutdown while the
//! server is paused.
#![cfg(feature = "nats")]

mod support;

use palisade::rpc::transport::ServerTransport;
use palisade::rpc::transport::nats::{DurableEvents, NatsOptions, NatsServer, NatsTransport};
use palisade::rpc::{Client, Payload, Router, RpcError, Server};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use support::nats::Broker;
use tokio::time::Instant;

/// An event the stream stored (under the broker's max_payload) that fails for good ends in the
/// dead-letter stream. The dead letter carries the same body plus three headers; when those
/// pushed it over max_payload, its publication failed every time, and the event was never
/// settled, delivered again every ack_wait, for good. It goes without its body now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_near_max_payload_that_fails_is_still_dead_lettered() {
    dead_letters_an_event_of(4000, 13).await;
}

/// A small event whose handler fails with a long error (5 000 characters: a response body, a
/// trace): the reason is shortened to fit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_event_failing_with_a_long_error_is_still_dead_lettered() {
    dead_letters_an_event_of(100, 5000).await;
}

/// The same with a 3 000-byte body, which fits with its headers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_a_smaller_event_is_dead_lettered() {
    dead_letters_an_event_of(3000, 13).await;
}

async fn dead_letters_an_event_of(size: usize, error_len: usize) {
    let config = std::env::temp_dir().join(format!(
        "hunt-nats-{}-{size}-{error_len}.conf",
        std::process::id()
    ));
    std::fs::write(&config, "max_payload: 4096\n").unwrap();
    let broker = Broker::start_with(&["-c", config.to_str().unwrap()]);
    let attempts = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&attempts);
    let router = Router::new().event("payment-received", move |Payload(_): Payload<String>| {
        counter.fetch_add(1, Ordering::SeqCst);
        let message = "card declined ".repeat(error_len / 14 + 1);
        async move { Err::<(), _>(RpcError::exception(message)) }
    });
    let server = NatsServer::new(NatsOptions::new([broker.url()]))
        .durable_events(
            DurableEvents::new("PAYMENTS")
                .max_deliveries(1)
                .ack_wait(Duration::from_secs(1)),
        )
        .serve(Server::new(router))
        .await
        .unwrap();
    let transport = NatsTransport::new(NatsOptions::new([broker.url()]))
        .durable_events()
        .connect()
        .await
        .unwrap();
    let client = Client::builder().build(transport);
    // The body is `{"pattern":"payment-received","data":"xxx…"}`: 4 000 bytes, under 4 096.
    let data = "x".repeat(size - 46);
    client.emit("payment-received", &data).await.unwrap();

    let jetstream = async_nats::jetstream::new(async_nats::connect(broker.url()).await.unwrap());
    let deadline = Instant::now() + Duration::from_secs(8);
    let mut dead_lettered = false;
    while Instant::now() < deadline {
        if let Ok(mut stream) = jetstream.get_stream("PAYMENTS_DEAD_LETTERS").await
            && stream.info().await.unwrap().state.messages > 0
        {
            dead_lettered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let attempts = attempts.load(Ordering::SeqCst);
    server.shutdown().await;
    let _ = std::fs::remove_file(&config);
    assert!(
        dead_lettered,
        "never dead-lettered within 8 s (handler ran {attempts} times)"
    );
}

/// `backoff([Duration::MAX])`: a failed event waits "for ever" before its redelivery (Redis
/// durable events read it so, and palisade takes other `Duration::MAX` settings as its far
/// future). On JetStream the NAK's delay overflowed JetStream's signed 64-bit nanoseconds, the
/// server dropped the delay, and the event came back at once, again and again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backoff_of_duration_max_does_not_redeliver_at_once() {
    let broker = Broker::start();
    let attempts = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&attempts);
    let router = Router::new().event("payment-received", move |Payload(_): Payload<u32>| {
        counter.fetch_add(1, Ordering::SeqCst);
        async { Err::<(), _>(RpcError::unavailable("ledger down")) }
    });
    let server = NatsServer::new(NatsOptions::new([broker.url()]))
        .durable_events(
            DurableEvents::new("PAYMENTS")
                .max_deliveries(5)
                .backoff([Duration::MAX]),
        )
        .serve(Server::new(router))
        .await
        .unwrap();
    let transport = NatsTransport::new(NatsOptions::new([broker.url()]))
        .durable_events()
        .connect()
        .await
        .unwrap();
    let client = Client::builder().build(transport);
    client.emit("payment-received", &1).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let attempts = attempts.load(Ordering::SeqCst);
    server.shutdown().await;
    assert_eq!(
        attempts, 1,
        "redelivered at once despite a backoff of Duration::MAX"
    );
}

/// A durable server shut down while NATS is paused (SIGSTOP) stops within about its grace
/// period: the pull's retry delay and the consumer's info request give way to shutdown (8 s in
/// a run before).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_server_stops_promptly_while_nats_is_paused() {
    let broker = Broker::start();
    let server = NatsServer::new(NatsOptions::new([broker.url()]))
        .durable_events(DurableEvents::new("PAYMENTS"))
        .serve(
            Server::new(
                Router::new().event("payment-received", |Payload(_): Payload<u32>| async {}),
            )
            .grace_period(Duration::from_millis(50)),
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pid = broker.pid().unwrap().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-STOP", &pid])
            .status()
            .unwrap()
            .success()
    );
    // Missed heartbeats (500 ms): the consumer pulls again.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let started = Instant::now();
    let report = server.shutdown().await;
    let took = started.elapsed();
    assert!(
        std::process::Command::new("kill")
            .args(["-CONT", &pid])
            .status()
            .unwrap()
            .success()
    );
    assert!(
        took < Duration::from_secs(2),
        "shutdown took {took:?} ({report:?})"
    );
}

/// Events a stopping server gives back (pulled ahead, or cut short by its grace period) come
/// back soon whatever the backoff: with `backoff([Duration::MAX])` they waited it out — thirty
/// years — although none of them had failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_given_back_at_shutdown_come_back_soon_whatever_the_backoff() {
    let broker = Broker::start();
    let handled = Arc::new(std::sync::Mutex::new(Vec::new()));
    let serve = |instance: u32| {
        let handled = Arc::clone(&handled);
        let router = Router::new().event("payment-received", move |Payload(n): Payload<u32>| {
            let handled = Arc::clone(&handled);
            async move {
                tokio::time::sleep(Duration::from_millis(500)).await;
                handled.lock().unwrap().push((instance, n));
            }
        });
        NatsServer::new(NatsOptions::new([broker.url()]))
            .durable_events(
                DurableEvents::new("PAYMENTS")
                    .backoff([Duration::MAX])
                    .pull_expiry(Duration::from_secs(1)),
            )
            .serve(Server::new(router).grace_period(Duration::from_millis(100)))
    };
    let first = serve(1).await.unwrap();
    let transport = NatsTransport::new(NatsOptions::new([broker.url()]))
        .durable_events()
        .connect()
        .await
        .unwrap();
    let client = Client::builder().build(transport);
    for n in 0..5u32 {
        client.emit("payment-received", &n).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    first.shutdown().await;
    let second = serve(2).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let mut seen: Vec<u32> = handled.lock().unwrap().iter().map(|(_, n)| *n).collect();
        seen.sort_unstable();
        seen.dedup();
        if seen == [0, 1, 2, 3, 4] {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not every event came back: {:?}",
            handled.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    second.shutdown().await;
}

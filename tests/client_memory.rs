//! A client that has been answered keeps nothing of the request: its memory stays flat however
//! many requests it sends, even with a long timeout. Measured with a global allocator that counts
//! the bytes alive, against real brokers; one test at a time, so that the count is this test's.
#![cfg(any(feature = "mqtt", feature = "redis", feature = "nats"))]

mod support;

use palisade::rpc::transport::{Connect, ServerTransport};
use palisade::rpc::{Client, Payload, Router, Server};
use std::time::Duration;

#[path = "support/live_bytes.rs"]
mod live_bytes;
use live_bytes::{LiveBytes, live};

#[global_allocator]
static ALLOCATOR: LiveBytes = LiveBytes;

/// Requests after the warm-up: 24 bytes kept per answered request would be 480 KB.
const REQUESTS: u64 = 20_000;
/// What the count may move by for reasons of its own (buffers resized, a task's state).
const SLACK: isize = 128 * 1024;

/// The tests measure the whole process: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// `count` echo requests, 64 in flight.
async fn echo(client: &Client, count: u64) {
    let tasks: Vec<_> = (0..64)
        .map(|lane| {
            let client = client.clone();
            tokio::spawn(async move {
                let mut x = lane;
                while x < count {
                    assert_eq!(client.send::<u64>("echo", &x).await.unwrap(), x);
                    x += 64;
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
}

/// The bytes alive once they stop moving (tasks finishing, buffers returned).
async fn settled_live_bytes() -> isize {
    let mut last = live();
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = live();
        if (now - last).abs() < 4096 {
            return now;
        }
        last = now;
    }
    last
}

fn router() -> Router {
    Router::new().message("echo", |Payload(x): Payload<u64>| async move { x })
}

/// Serves the echo router over `server`, connects a client through `connect`, warms it up, then
/// checks that `REQUESTS` more answered requests leave the process's memory flat.
async fn answered_requests_leave_nothing(
    what: &str,
    server: impl ServerTransport,
    connect: impl Connect,
) {
    let _serial = SERIAL.lock().await;
    let server = server.serve(Server::new(router())).await.unwrap();
    // A long timeout: whatever a request leaves behind until its deadline stays for the test.
    let client = Client::builder()
        .timeout(Duration::from_secs(3600))
        .connect(connect)
        .await
        .unwrap();
    echo(&client, 5_000).await;
    let before = settled_live_bytes().await;
    echo(&client, REQUESTS).await;
    let after = settled_live_bytes().await;
    let grown = after - before;
    assert!(
        grown < SLACK,
        "{what}: {grown} bytes more alive after {REQUESTS} answered requests ({} per request)",
        grown / REQUESTS as isize
    );
    server.shutdown().await;
}

#[cfg(feature = "mqtt")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mqtt_client_keeps_nothing_of_answered_requests() {
    use palisade::rpc::transport::mqtt::{MqttOptions, MqttServer};
    let broker = support::mqtt::Broker::start();
    let options = MqttOptions::new(broker.url());
    answered_requests_leave_nothing("MQTT", MqttServer::new(options.clone()), options).await;
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_client_keeps_nothing_of_answered_requests() {
    use palisade::rpc::transport::redis::{RedisOptions, RedisServer};
    let broker = support::redis::Broker::start();
    let options = RedisOptions::new(broker.url());
    answered_requests_leave_nothing("Redis", RedisServer::new(options.clone()), options).await;
}

#[cfg(feature = "nats")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_client_keeps_nothing_of_answered_requests() {
    use palisade::rpc::transport::nats::{NatsOptions, NatsServer};
    let broker = support::nats::Broker::start();
    let options = NatsOptions::new([broker.url()]);
    answered_requests_leave_nothing("NATS", NatsServer::new(options.clone()), options).await;
}

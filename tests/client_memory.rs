//! A client that has been answered keeps nothing of the request: its memory stays flat however
//! many requests it sends, even with a long timeout. Measured with a global allocator that counts
//! the bytes alive, against real brokers; one test at a time, so that the count is this test's.
#![cfg(any(feature = "mqtt", feature = "redis", feature = "nats"))]

mod support;

use palisade::rpc::transport::ServerTransport;
use palisade::rpc::{Client, Payload, Router, Server};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Duration;

/// Counts the bytes allocated and not yet freed, process-wide.
struct LiveBytes;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every method forwards to `System` with the caller's arguments unchanged, so `System`'s
// guarantees carry over; the only addition is an atomic counter, which neither allocates nor
// touches the memory being managed.
unsafe impl GlobalAlloc for LiveBytes {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: forwarded unchanged; the caller upholds `alloc`'s contract.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: forwarded unchanged.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        // SAFETY: forwarded unchanged; `ptr` came from this allocator, i.e. from `System`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: forwarded unchanged; `ptr` came from this allocator, i.e. from `System`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

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
    let mut last = LIVE.load(Ordering::Relaxed);
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = LIVE.load(Ordering::Relaxed);
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

/// Warms `client` up, then checks that `REQUESTS` more answered requests leave its memory flat.
async fn answered_requests_leave_nothing(what: &str, client: Client) {
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
}

#[cfg(feature = "mqtt")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mqtt_client_keeps_nothing_of_answered_requests() {
    use palisade::rpc::transport::mqtt::{MqttOptions, MqttServer};
    let _serial = SERIAL.lock().await;
    let broker = support::mqtt::Broker::start();
    let server = MqttServer::new(MqttOptions::new(broker.url()))
        .serve(Server::new(router()))
        .await
        .unwrap();
    // A long timeout: whatever a request leaves behind until its deadline stays for the test.
    let client = Client::builder()
        .timeout(Duration::from_secs(3600))
        .connect(MqttOptions::new(broker.url()))
        .await
        .unwrap();
    answered_requests_leave_nothing("MQTT", client).await;
    server.shutdown().await;
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_client_keeps_nothing_of_answered_requests() {
    use palisade::rpc::transport::redis::{RedisOptions, RedisServer};
    let _serial = SERIAL.lock().await;
    let broker = support::redis::Broker::start();
    let server = RedisServer::new(RedisOptions::new(broker.url()))
        .serve(Server::new(router()))
        .await
        .unwrap();
    let client = Client::builder()
        .timeout(Duration::from_secs(3600))
        .connect(RedisOptions::new(broker.url()))
        .await
        .unwrap();
    answered_requests_leave_nothing("Redis", client).await;
    server.shutdown().await;
}

#[cfg(feature = "nats")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_client_keeps_nothing_of_answered_requests() {
    use palisade::rpc::transport::nats::{NatsOptions, NatsServer};
    let _serial = SERIAL.lock().await;
    let broker = support::nats::Broker::start();
    let server = NatsServer::new(NatsOptions::new([broker.url()]))
        .serve(Server::new(router()))
        .await
        .unwrap();
    let client = Client::builder()
        .timeout(Duration::from_secs(3600))
        .connect(NatsOptions::new([broker.url()]))
        .await
        .unwrap();
    answered_requests_leave_nothing("NATS", client).await;
    server.shutdown().await;
}

//! The bare `redis` loops the Redis bench measures palisade against: a client publishing requests
//! and matching replies by id, a server answering each message in a task of its own. Shared by
//! `benches/redis.rs` and `examples/redis_cpu.rs`.

use futures::StreamExt;
use serde_json::Value;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::oneshot;

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Vec<u8>>>>>;

/// A bare `redis` client: a multiplexed connection to publish on, a subscriber on the reply
/// channel, a map of the requests waiting.
pub struct BareClient {
    publisher: redis::aio::MultiplexedConnection,
    pending: Pending,
    next: AtomicU64,
}

impl BareClient {
    pub async fn connect(url: &str) -> Arc<BareClient> {
        let client = redis::Client::open(url).unwrap();
        let (mut sink, mut replies) = client.get_async_pubsub().await.unwrap().split();
        sink.subscribe("bare-echo.reply").await.unwrap();
        let pending: Pending = Arc::default();
        let reader = Arc::clone(&pending);
        tokio::spawn(async move {
            let _sink = sink;
            while let Some(message) = replies.next().await {
                let reply: Value = serde_json::from_slice(message.get_payload_bytes()).unwrap();
                let id: u64 = reply["id"].as_str().unwrap().parse().unwrap();
                if let Some(waiting) = reader.lock().unwrap().remove(&id) {
                    let _ = waiting.send(message.get_payload_bytes().to_vec());
                }
            }
        });
        Arc::new(BareClient {
            publisher: client.get_multiplexed_async_connection().await.unwrap(),
            pending,
            next: AtomicU64::new(0),
        })
    }

    pub async fn call(&self, x: u64) -> u64 {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending.lock().unwrap().insert(id, tx);
        let body = format!(r#"{{"pattern":"bare-echo","data":{x},"id":"{id}"}}"#);
        let heard: u64 = redis::cmd("PUBLISH")
            .arg("bare-echo")
            .arg(body)
            .query_async(&mut self.publisher.clone())
            .await
            .unwrap();
        assert!(heard > 0, "no server subscribed");
        let reply: Value = serde_json::from_slice(&rx.await.unwrap()).unwrap();
        reply["response"].as_u64().unwrap()
    }

    pub async fn emit(&self, x: u64) {
        let body = format!(r#"{{"pattern":"bare-note","data":{x}}}"#);
        let _: u64 = redis::cmd("PUBLISH")
            .arg("bare-note")
            .arg(body)
            .query_async(&mut self.publisher.clone())
            .await
            .unwrap();
    }
}

/// A bare `redis` server: a subscriber on `bare-echo` and `bare-note`, each message handled in a
/// task that parses it and publishes the answer on `bare-echo.reply`.
pub async fn bare_server(url: &str) {
    let client = redis::Client::open(url).unwrap();
    let (mut sink, mut messages) = client.get_async_pubsub().await.unwrap().split();
    sink.subscribe(&["bare-echo", "bare-note"]).await.unwrap();
    let publisher = client.get_multiplexed_async_connection().await.unwrap();
    tokio::spawn(async move {
        let _sink = sink;
        while let Some(message) = messages.next().await {
            let mut publisher = publisher.clone();
            tokio::spawn(async move {
                let packet: Value = serde_json::from_slice(message.get_payload_bytes()).unwrap();
                if let Some(id) = packet.get("id") {
                    let body = format!(
                        r#"{{"id":{id},"response":{},"isDisposed":true}}"#,
                        packet["data"]
                    );
                    let _: u64 = redis::cmd("PUBLISH")
                        .arg("bare-echo.reply")
                        .arg(body)
                        .query_async(&mut publisher)
                        .await
                        .unwrap();
                } else {
                    crate::support::event_handled();
                }
            });
        }
    });
}

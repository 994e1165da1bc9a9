//! The bare `async-nats` loops the NATS bench measures palisade against: a subscriber that
//! publishes each payload back to its reply subject, and `Client::request`. Shared by
//! `benches/nats.rs` and `examples/nats_cpu.rs`.

use futures::StreamExt;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::oneshot;

/// Subscribes to `bare-echo` on its own connection and answers each request with its payload.
pub async fn serve_bare_echo(url: &str) {
    let responder = async_nats::connect(url).await.unwrap();
    let mut requests = responder.subscribe("bare-echo").await.unwrap();
    responder.flush().await.unwrap();
    tokio::spawn(async move {
        while let Some(message) = requests.next().await {
            if let Some(reply) = message.reply {
                responder.publish(reply, message.payload).await.unwrap();
            }
        }
    });
}

/// One request to the bare echo, checked.
pub async fn bare_call(client: &async_nats::Client, x: u64) {
    let reply = client
        .request("bare-echo", x.to_string().into())
        .await
        .unwrap();
    assert_eq!(reply.payload, x.to_string().as_bytes());
}

/// Subscribes to `bare-nest-echo` on its own connection and answers each request as the bare
/// Redis and MQTT servers do: the NestJS packet parsed into a `serde_json::Value`, a reply
/// packet written with its id. The same work as palisade's server, without palisade.
#[allow(dead_code)] // for nats_cpu only
pub async fn serve_bare_nest_echo(url: &str) {
    let responder = async_nats::connect(url).await.unwrap();
    let mut requests = responder.subscribe("bare-nest-echo").await.unwrap();
    responder.flush().await.unwrap();
    tokio::spawn(async move {
        while let Some(message) = requests.next().await {
            let packet: serde_json::Value = serde_json::from_slice(&message.payload).unwrap();
            if let (Some(reply), Some(id)) = (message.reply, packet.get("id")) {
                let body = format!(
                    r#"{{"response":{},"isDisposed":true,"id":{id}}}"#,
                    packet["data"]
                );
                responder.publish(reply, body.into()).await.unwrap();
            }
        }
    });
}

/// One request to the NestJS-packet echo, the packet written and the reply read as the bare
/// Redis and MQTT clients do.
#[allow(dead_code)] // for nats_cpu only
pub async fn bare_nest_call(client: &async_nats::Client, x: u64) {
    let body = format!(r#"{{"pattern":"bare-nest-echo","data":{x},"id":"{x}"}}"#);
    let reply = client.request("bare-nest-echo", body.into()).await.unwrap();
    let reply: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap();
    assert_eq!(reply["response"].as_u64(), Some(x));
}

/// Callers waiting for replies, by request number.
type Waiting = Arc<Mutex<HashMap<u64, oneshot::Sender<bytes::Bytes>>>>;

/// Bare async-nats with palisade's reply path instead of `request()`'s: one subscription on
/// `<inbox>.*`, a task reading it and handing each reply to its caller through a map of oneshot
/// channels. It shows what that extra hop costs (async-nats's own `request()` delivers replies
/// from its connection task, but keeps the entry of a request that is never answered for the
/// life of the client: nats-io/nats.rs#1617).
#[allow(dead_code)] // for nats_cpu only
pub struct HopClient {
    client: async_nats::Client,
    inbox: String,
    next: AtomicU64,
    waiting: Waiting,
}

#[allow(dead_code)] // for nats_cpu only
impl HopClient {
    pub async fn connect(url: &str) -> Arc<Self> {
        let client = async_nats::connect(url).await.unwrap();
        let inbox = client.new_inbox();
        let mut replies = client.subscribe(format!("{inbox}.*")).await.unwrap();
        client.flush().await.unwrap();
        let waiting = Waiting::default();
        let reader = Arc::clone(&waiting);
        tokio::spawn(async move {
            while let Some(message) = replies.next().await {
                let n: u64 = message.subject.rsplit('.').next().unwrap().parse().unwrap();
                if let Some(sender) = reader.lock().unwrap().remove(&n) {
                    let _ = sender.send(message.payload);
                }
            }
        });
        Arc::new(HopClient {
            client,
            inbox,
            next: AtomicU64::new(0),
            waiting,
        })
    }

    /// One request to the bare echo, checked.
    pub async fn call(&self, x: u64) {
        let reply = self.request("bare-echo", x.to_string()).await;
        assert_eq!(reply, x.to_string().as_bytes());
    }

    /// One request to the NestJS-packet echo: palisade's packet (the request number as its id,
    /// the deadline's header) and reply path, on bare async-nats.
    pub async fn nest_call(&self, x: u64) {
        // The reply subject matches the reply; the id only has to be as long as palisade's.
        let body = format!(
            r#"{{"pattern":"bare-nest-echo","data":{x},"id":"{x}","headers":{{"palisade-timeout-ms":5000}}}}"#
        );
        let reply = self.request("bare-nest-echo", body).await;
        let reply: serde_json::Value = serde_json::from_slice(&reply).unwrap();
        assert_eq!(reply["response"].as_u64(), Some(x));
    }

    /// One request to palisade's server (`echo`), with the packet of [`nest_call`](Self::nest_call):
    /// palisade's server behind a bare client.
    pub async fn call_palisade_server(&self, x: u64) {
        let body = format!(
            r#"{{"pattern":"echo","data":{x},"id":"{x}","headers":{{"palisade-timeout-ms":5000}}}}"#
        );
        let reply = self.request("echo", body).await;
        let reply: serde_json::Value = serde_json::from_slice(&reply).unwrap();
        assert_eq!(reply["response"].as_u64(), Some(x));
    }

    /// Publishes `body` on `subject` with a reply subject of its own, and waits for the reply.
    async fn request(&self, subject: &'static str, body: String) -> bytes::Bytes {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let (sender, receiver) = oneshot::channel();
        self.waiting.lock().unwrap().insert(n, sender);
        let reply_to = format!("{}.{n}", self.inbox);
        self.client
            .publish_with_reply(subject, reply_to, body.into())
            .await
            .unwrap();
        receiver.await.unwrap()
    }
}

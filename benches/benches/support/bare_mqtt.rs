//! The bare `rumqttc` loops the MQTT bench measures palisade against: a client publishing
//! requests and matching replies by id on one kept subscription, a server answering each message
//! as its event loop delivers it. Shared by `benches/mqtt.rs` and `examples/mqtt_cpu.rs`.

use rumqttc::{AsyncClient, Event, EventLoop, Packet, QoS};
use serde_json::Value;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::oneshot;

/// A rumqttc client as palisade opens one: clean session, no Nagle, a 1 024-request channel
/// to its event loop.
fn bare_session(url: &str, id: &str) -> (AsyncClient, EventLoop) {
    let port: u16 = url.rsplit(':').next().unwrap().parse().unwrap();
    let mut options = rumqttc::MqttOptions::new(id, "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(30));
    let mut network = rumqttc::NetworkOptions::new();
    network.set_tcp_nodelay(true);
    let (client, mut events) = AsyncClient::new(options, 1024);
    events.set_network_options(network);
    (client, events)
}

/// Polls `events` until the broker acknowledged the subscription just requested.
async fn until_subscribed(events: &mut EventLoop) {
    loop {
        if let Event::Incoming(Packet::SubAck(_)) = events.poll().await.unwrap() {
            return;
        }
    }
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Vec<u8>>>>>;

/// A bare rumqttc client: one kept subscription to `bare-echo/reply`, a map of the requests waiting.
pub struct BareClient {
    client: AsyncClient,
    pending: Pending,
    next: AtomicU64,
}

impl BareClient {
    pub async fn connect(url: &str) -> Arc<BareClient> {
        let (client, mut events) = bare_session(url, "bench-bare-client");
        client
            .subscribe("bare-echo/reply", QoS::AtMostOnce)
            .await
            .unwrap();
        until_subscribed(&mut events).await;
        let pending: Pending = Arc::default();
        let reader = Arc::clone(&pending);
        tokio::spawn(async move {
            while let Ok(event) = events.poll().await {
                if let Event::Incoming(Packet::Publish(message)) = event {
                    let reply: Value = serde_json::from_slice(&message.payload).unwrap();
                    let id: u64 = reply["id"].as_str().unwrap().parse().unwrap();
                    if let Some(waiting) = reader.lock().unwrap().remove(&id) {
                        let _ = waiting.send(message.payload.to_vec());
                    }
                }
            }
        });
        Arc::new(BareClient {
            client,
            pending,
            next: AtomicU64::new(0),
        })
    }

    pub async fn call(&self, x: u64) -> u64 {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending.lock().unwrap().insert(id, tx);
        let body = format!(r#"{{"pattern":"bare-echo","data":{x},"id":"{id}"}}"#);
        self.client
            .publish("bare-echo", QoS::AtMostOnce, false, body)
            .await
            .unwrap();
        let reply: Value = serde_json::from_slice(&rx.await.unwrap()).unwrap();
        reply["response"].as_u64().unwrap()
    }

    pub async fn emit(&self, x: u64) {
        let body = format!(r#"{{"pattern":"bare-note","data":{x}}}"#);
        self.client
            .publish("bare-note", QoS::AtMostOnce, false, body)
            .await
            .unwrap();
    }
}

/// A bare rumqttc server: subscribed to `bare-echo` and `bare-note`; each request parsed and its
/// answer published on `bare-echo/reply`.
pub async fn bare_server(url: &str) {
    let (client, mut events) = bare_session(url, "bench-bare-server");
    client
        .subscribe_many([
            rumqttc::SubscribeFilter::new("bare-echo".into(), QoS::AtMostOnce),
            rumqttc::SubscribeFilter::new("bare-note".into(), QoS::AtMostOnce),
        ])
        .await
        .unwrap();
    until_subscribed(&mut events).await;
    tokio::spawn(async move {
        while let Ok(event) = events.poll().await {
            if let Event::Incoming(Packet::Publish(message)) = event {
                let packet: Value = serde_json::from_slice(&message.payload).unwrap();
                if let Some(id) = packet.get("id") {
                    let body = format!(
                        r#"{{"id":{id},"response":{},"isDisposed":true}}"#,
                        packet["data"]
                    );
                    // The event loop must keep turning while the request channel is full.
                    let client = client.clone();
                    if let Err(rumqttc::ClientError::TryRequest(request)) =
                        client.try_publish("bare-echo/reply", QoS::AtMostOnce, false, body)
                    {
                        tokio::spawn(async move {
                            if let rumqttc::Request::Publish(publish) = request {
                                client
                                    .publish(publish.topic, QoS::AtMostOnce, false, publish.payload)
                                    .await
                                    .unwrap();
                            }
                        });
                    }
                } else {
                    crate::support::event_handled();
                }
            }
        }
    });
}

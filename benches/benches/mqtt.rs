//! Request/reply and events over MQTT 3.1.1 (QoS 0, as NestJS uses it): palisade's client and
//! server beside bare `rumqttc` loops doing the same work — requests published on the pattern's
//! topic, replies read from one kept subscription to `<topic>/reply` and matched by id, a server
//! answering each message as its event loop delivers it — one at a time and 64 in flight, in the
//! same run, on one `mosquitto` (started here on a free loopback port). The bare pair uses topics
//! of its own (`bare-echo`, `bare-note`), so that no server hears the other's requests.
//!
//! `cargo bench -p palisade-benches --bench mqtt`; the NestJS comparison (every pairing of a
//! palisade or NestJS client and server, requests per second) alone with
//! `cargo bench -p palisade-benches --bench mqtt -- nestjs`.

use criterion::{Criterion, criterion_group, criterion_main};
use palisade::rpc::transport::ServerTransport;
use palisade::rpc::transport::mqtt::{MqttOptions, MqttServer};
use palisade::rpc::{Client, Payload, Router, Server};
use rumqttc::{AsyncClient, Event, EventLoop, Packet, QoS};
use serde_json::Value;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::oneshot;

mod support;
use support::in_tasks;

#[path = "support/nest_pairs.rs"]
mod nest_pairs;

#[path = "../../tests/support/nestjs.rs"]
mod nestjs;

#[path = "../../tests/support/mqtt.rs"]
mod broker;

/// What `tests/support/mqtt.rs` asks of its parent.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

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
struct BareClient {
    client: AsyncClient,
    pending: Pending,
    next: AtomicU64,
}

impl BareClient {
    async fn connect(url: &str) -> Arc<BareClient> {
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

    async fn call(&self, x: u64) -> u64 {
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

    async fn emit(&self, x: u64) {
        let body = format!(r#"{{"pattern":"bare-note","data":{x}}}"#);
        self.client
            .publish("bare-note", QoS::AtMostOnce, false, body)
            .await
            .unwrap();
    }
}

/// A bare rumqttc server: subscribed to `bare-echo` and `bare-note`; each request parsed and its
/// answer published on `bare-echo/reply`.
async fn bare_server(url: &str) {
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
                }
            }
        }
    });
}

fn router() -> Router {
    Router::new()
        .message("echo", |Payload(x): Payload<u64>| async move { x })
        .event("note", |Payload(_): Payload<u64>| async {})
}

async fn palisade_server(url: &str) {
    let server = MqttServer::new(MqttOptions::new(url))
        .serve(Server::new(router()))
        .await
        .unwrap();
    std::mem::forget(server);
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn mqtt_qos0(c: &mut Criterion) {
    let broker = broker::Broker::start();
    let runtime = runtime();
    let (bare, palisade, untimed) = runtime.block_on(async {
        bare_server(&broker.url()).await;
        palisade_server(&broker.url()).await;
        let bare = BareClient::connect(&broker.url()).await;
        let client = Client::builder()
            .connect(MqttOptions::new(broker.url()))
            .await
            .unwrap();
        let untimed = Client::builder()
            .no_timeout()
            .connect(MqttOptions::new(broker.url()))
            .await
            .unwrap();
        (bare, client, untimed)
    });

    for (name, in_flight) in [("sequential", 1), ("64_in_flight", 64)] {
        let mut group = c.benchmark_group(format!("mqtt/send/{name}"));
        group.bench_function("bare rumqttc request", |b| {
            b.to_async(&runtime).iter_custom(|iters| {
                let bare = Arc::clone(&bare);
                in_tasks(iters, in_flight, move |x| {
                    let bare = Arc::clone(&bare);
                    async move { assert_eq!(bare.call(x).await, x) }
                })
            })
        });
        group.bench_function("palisade send", |b| {
            b.to_async(&runtime).iter_custom(|iters| {
                let client = palisade.clone();
                in_tasks(iters, in_flight, move |x| {
                    let client = client.clone();
                    async move { assert_eq!(client.send::<u64>("echo", &x).await.unwrap(), x) }
                })
            })
        });
        group.bench_function("palisade send, no timeout", |b| {
            b.to_async(&runtime).iter_custom(|iters| {
                let client = untimed.clone();
                in_tasks(iters, in_flight, move |x| {
                    let client = client.clone();
                    async move { assert_eq!(client.send::<u64>("echo", &x).await.unwrap(), x) }
                })
            })
        });
        group.finish();
    }
    // Events after every request: a flood of events still being handled would slow the
    // requests measured after it.
    for (name, in_flight) in [("sequential", 1), ("64_in_flight", 64)] {
        let mut group = c.benchmark_group(format!("mqtt/emit/{name}"));
        group.bench_function("bare rumqttc publish", |b| {
            b.to_async(&runtime).iter_custom(|iters| {
                let bare = Arc::clone(&bare);
                in_tasks(iters, in_flight, move |x| {
                    let bare = Arc::clone(&bare);
                    async move { bare.emit(x).await }
                })
            })
        });
        group.bench_function("palisade emit", |b| {
            b.to_async(&runtime).iter_custom(|iters| {
                let client = palisade.clone();
                in_tasks(iters, in_flight, move |x| {
                    let client = client.clone();
                    async move { client.emit("note", &x).await.unwrap() }
                })
            })
        });
        group.finish();
    }
}

/// Every pairing of a palisade or NestJS client and server over MQTT, each server on a broker of
/// its own (every server subscribed to a topic answers, so they must not share one).
fn nestjs(_: &mut Criterion) {
    if !nest_pairs::wanted("nestjs") || !nest_pairs::node_available() {
        return;
    }
    let (nest_broker, broker) = (broker::Broker::start(), broker::Broker::start());
    let nest = nestjs::NestService::start(&["mqtt", &nest_broker.url()]);
    let runtime = runtime();
    runtime.block_on(palisade_server(&broker.url()));
    let palisade_rate = |url: String, in_flight: u64| {
        runtime.block_on(async move {
            let client = Client::builder()
                .connect(MqttOptions::new(url))
                .await
                .unwrap();
            nest_pairs::palisade_rate(&client, in_flight).await
        })
    };
    nest_pairs::nest_rate("mqtt", &nest_broker.url(), 64); // warms NestJS's server up
    nest_pairs::heading("over MQTT, QoS 0");
    for (name, url) in [
        ("palisade → palisade", broker.url()),
        ("palisade → NestJS", nest_broker.url()),
    ] {
        nest_pairs::row(name, palisade_rate(url.clone(), 1), palisade_rate(url, 64));
    }
    for (name, url) in [
        ("NestJS → palisade", broker.url()),
        ("NestJS → NestJS", nest_broker.url()),
    ] {
        nest_pairs::row(
            name,
            nest_pairs::nest_rate("mqtt", &url, 1),
            nest_pairs::nest_rate("mqtt", &url, 64),
        );
    }
    drop(nest);
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    targets = mqtt_qos0, nestjs
}
criterion_main!(benches);

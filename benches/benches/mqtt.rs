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
use palisade::rpc::{Client, Server};
use rumqttc::{AsyncClient, Event, EventLoop, Packet, QoS};
use serde_json::Value;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::oneshot;

mod support;
use support::{bench_calls, echo_router, free_port, two_workers};

#[path = "support/nest_pairs.rs"]
mod nest_pairs;

#[path = "../../tests/support/nestjs.rs"]
mod nestjs;

#[path = "../../tests/support/mqtt.rs"]
mod broker;

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

async fn palisade_server(url: &str) {
    let server = MqttServer::new(MqttOptions::new(url))
        .serve(Server::new(echo_router()))
        .await
        .unwrap();
    std::mem::forget(server);
}

fn mqtt_qos0(c: &mut Criterion) {
    let broker = broker::Broker::start();
    let runtime = two_workers();
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
        let calls = [
            ("palisade send", &palisade),
            ("palisade send, no timeout", &untimed),
        ];
        bench_calls(
            &mut group,
            "bare rumqttc request",
            &runtime,
            in_flight,
            &bare,
            |bare, x| async move { assert_eq!(bare.call(x).await, x) },
        );
        for (name, client) in calls {
            bench_calls(
                &mut group,
                name,
                &runtime,
                in_flight,
                client,
                |client, x| async move { assert_eq!(client.send::<u64>("echo", &x).await.unwrap(), x) },
            );
        }
        group.finish();
    }
    // Events after every request: a flood of events still being handled would slow the
    // requests measured after it.
    for (name, in_flight) in [("sequential", 1), ("64_in_flight", 64)] {
        let mut group = c.benchmark_group(format!("mqtt/emit/{name}"));
        bench_calls(
            &mut group,
            "bare rumqttc publish",
            &runtime,
            in_flight,
            &bare,
            |bare, x| async move { bare.emit(x).await },
        );
        bench_calls(
            &mut group,
            "palisade emit",
            &runtime,
            in_flight,
            &palisade,
            |client, x| async move { client.emit("note", &x).await.unwrap() },
        );
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
    let runtime = two_workers();
    runtime.block_on(palisade_server(&broker.url()));
    nest_pairs::print_pairings(
        &runtime,
        "mqtt",
        "over MQTT, QoS 0",
        (&broker.url(), &nest_broker.url()),
        |url| async {
            Client::builder()
                .connect(MqttOptions::new(url))
                .await
                .unwrap()
        },
    );
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

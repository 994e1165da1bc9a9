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
use std::time::Duration;

mod support;
use support::{bench_calls, bench_events, echo_router, free_port, two_workers};

#[path = "support/nest_pairs.rs"]
mod nest_pairs;

#[path = "../../tests/support/nestjs.rs"]
mod nestjs;

#[path = "../../tests/support/mqtt.rs"]
mod broker;

#[path = "support/bare_mqtt.rs"]
mod bare_mqtt;
use bare_mqtt::{BareClient, bare_server};

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
            ("palisade send", &palisade, "echo"),
            // A route of its own: every client that called a route receives every reply to it.
            ("palisade send, no timeout", &untimed, "echo-untimed"),
        ];
        bench_calls(
            &mut group,
            "bare rumqttc request",
            &runtime,
            in_flight,
            &bare,
            |bare, x| async move { assert_eq!(bare.call(x).await, x) },
        );
        for (name, client, route) in calls {
            bench_calls(
                &mut group,
                name,
                &runtime,
                in_flight,
                client,
                move |client, x| async move {
                    assert_eq!(client.send::<u64>(route, &x).await.unwrap(), x)
                },
            );
        }
        group.finish();
    }
    // Events after every request: a flood of events still being handled would slow the
    // requests measured after it.
    for (name, in_flight) in [("sequential", 1), ("64_in_flight", 64)] {
        let mut group = c.benchmark_group(format!("mqtt/emit/{name}"));
        bench_events(
            &mut group,
            "bare rumqttc publish",
            &runtime,
            in_flight,
            &bare,
            |bare, x| async move { bare.emit(x).await },
        );
        bench_events(
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

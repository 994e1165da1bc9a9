//! CPU time per request (and per event: `bare-emit`, `palisade-emit`) of palisade's MQTT client
//! and server beside the bare `rumqttc` loops of the `mqtt` bench, 64 in flight on one `mosquitto` started here: steadier than wall time on
//! a shared 2-core machine, where both compete with the broker for the cores.
//!
//! ```sh
//! cargo run --release -p palisade-benches --example mqtt_cpu              # 200 000 requests (or events) each
//! cargo run --release -p palisade-benches --example mqtt_cpu -- 50000 bare
//! ```
//!
//! Prints, per round and contender, the wall time, this process's CPU time (client and server
//! together) and the broker's CPU time, each per request. The bare loops are the bench's own
//! (`benches/mqtt.rs`), included from there.
use palisade::rpc::transport::ServerTransport;
use palisade::rpc::transport::mqtt::{MqttOptions, MqttServer};
use palisade::rpc::{Client, Server};
use std::sync::Arc;

#[path = "../benches/support/mod.rs"]
mod support;
use support::{cpu_ticks, echo_router, free_port, in_tasks, two_workers};

#[path = "../../tests/support/mqtt.rs"]
mod broker;

#[path = "../benches/support/bare_mqtt.rs"]
mod bare_mqtt;
use bare_mqtt::{BareClient, bare_server};

fn main() {
    let broker = broker::Broker::start();
    let broker_pid = broker.pid().expect("the broker runs").to_string();
    let runtime = two_workers();
    let (bare, palisade) = runtime.block_on(async {
        bare_server(&broker.url()).await;
        let server = MqttServer::new(MqttOptions::new(broker.url()))
            .serve(Server::new(echo_router()))
            .await
            .unwrap();
        std::mem::forget(server);
        let bare = BareClient::connect(&broker.url()).await;
        let client = Client::builder()
            .connect(MqttOptions::new(broker.url()))
            .await
            .unwrap();
        (bare, client)
    });
    let n: u64 = std::env::args()
        .nth(1)
        .map(|a| a.parse().unwrap())
        .unwrap_or(200_000);
    let only = std::env::args().nth(2).unwrap_or_default();
    for round in 0..3 {
        for which in ["bare", "palisade", "bare-emit", "palisade-emit"] {
            if !only.is_empty() && only != which {
                continue;
            }
            let (c0, r0) = (cpu_ticks("self"), cpu_ticks(&broker_pid));
            let wall = runtime.block_on(async {
                let bare = Arc::clone(&bare);
                let client = palisade.clone();
                match which {
                    "bare" => {
                        in_tasks(n, 64, move |x| {
                            let bare = Arc::clone(&bare);
                            async move { assert_eq!(bare.call(x).await, x) }
                        })
                        .await
                    }
                    "palisade" => in_tasks(n, 64, move |x| {
                        let client = client.clone();
                        async move { assert_eq!(client.send::<u64>("echo", &x).await.unwrap(), x) }
                    })
                    .await,
                    "bare-emit" => {
                        in_tasks(n, 64, move |x| {
                            let bare = Arc::clone(&bare);
                            async move { bare.emit(x).await }
                        })
                        .await
                    }
                    _ => {
                        in_tasks(n, 64, move |x| {
                            let client = client.clone();
                            async move { client.emit("note", &x).await.unwrap() }
                        })
                        .await
                    }
                }
            });
            let (c1, r1) = (cpu_ticks("self"), cpu_ticks(&broker_pid));
            let per = |ticks: u64| ticks as f64 * 10_000.0 / n as f64; // 100 Hz ticks -> µs
            println!(
                "round {round} {which:13} wall {:6.2} µs/req  cpu(process) {:6.2} µs/req  cpu(broker) {:5.2} µs/req",
                wall.as_secs_f64() * 1e6 / n as f64,
                per(c1 - c0),
                per(r1 - r0)
            );
        }
    }
}

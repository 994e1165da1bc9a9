//! Request/reply through a local nats-server: palisade's client and server beside bare
//! `async-nats` (`request()` and a subscriber that publishes the reply), one request at a time
//! and 64 in flight, in the same run.

use criterion::{Criterion, criterion_group, criterion_main};
use palisade::rpc::transport::ServerTransport;
use palisade::rpc::transport::nats::{NatsOptions, NatsServer};
use palisade::rpc::{Client, Payload, Router, Server};
use std::time::Duration;

mod support;
use support::in_tasks;

#[path = "support/bare_nats.rs"]
mod bare_nats;
use bare_nats::{bare_call, serve_bare_echo};

#[path = "../../tests/support/nats.rs"]
mod broker;

fn request_reply(c: &mut Criterion) {
    let broker = broker::Broker::start();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (bare, palisade) = runtime.block_on(async {
        // Bare async-nats: a responder echoing the payload, and a client using request().
        serve_bare_echo(&broker.url()).await;
        let bare = async_nats::connect(broker.url()).await.unwrap();

        let server = NatsServer::new(NatsOptions::new([broker.url()]))
            .serve(Server::new(
                Router::new().message("echo", |Payload(x): Payload<u64>| async move { x }),
            ))
            .await
            .unwrap();
        std::mem::forget(server);
        let client = Client::builder()
            .connect(NatsOptions::new([broker.url()]))
            .await
            .unwrap();
        (bare, client)
    });

    for (name, in_flight) in [("sequential", 1), ("64_in_flight", 64)] {
        let mut group = c.benchmark_group(format!("nats/{name}"));
        group.bench_function("bare async-nats request", |b| {
            b.to_async(&runtime).iter_custom(|iters| {
                let bare = bare.clone();
                in_tasks(iters, in_flight, move |x| {
                    let bare = bare.clone();
                    async move { bare_call(&bare, x).await }
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
        group.finish();
    }
    drop(broker);
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    targets = request_reply
}
criterion_main!(benches);

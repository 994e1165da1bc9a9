//! Request/reply and events over Redis pub/sub: palisade's client and server beside bare `redis`
//! loops (`support/bare_redis.rs`) doing the same work — requests `PUBLISH`ed on the pattern's
//! channel (checking that someone heard them), replies read from `<channel>.reply` on a
//! subscriber connection and matched by id, a server answering each message in a task of its own
//! — one at a time and 64 in flight, in the same run, on one `redis-server` (started here on a
//! free loopback port). The bare pair uses channels of its own (`bare-echo`, `bare-note`), so
//! that no server hears the other's requests. For CPU time per request, steadier than wall time,
//! see `examples/redis_cpu.rs`.
//!
//! `cargo bench -p palisade-benches --bench redis`; the NestJS comparison (every pairing of a
//! palisade or NestJS client and server, requests per second) alone with
//! `cargo bench -p palisade-benches --bench redis -- nestjs`.

use criterion::{Criterion, criterion_group, criterion_main};
use palisade::rpc::transport::ServerTransport;
use palisade::rpc::transport::redis::{RedisOptions, RedisServer};
use palisade::rpc::{Client, Server};
use std::time::Duration;

mod support;
use support::{bench_calls, bench_events, echo_router, free_port, two_workers};

#[path = "support/nest_pairs.rs"]
mod nest_pairs;

#[path = "support/bare_redis.rs"]
mod bare_redis;
use bare_redis::{BareClient, bare_server};

#[path = "../../tests/support/nestjs.rs"]
mod nestjs;

#[path = "../../tests/support/redis.rs"]
mod broker;

async fn palisade_server(url: &str) {
    let server = RedisServer::new(RedisOptions::new(url))
        .serve(Server::new(echo_router()))
        .await
        .unwrap();
    std::mem::forget(server);
}

fn redis_pubsub(c: &mut Criterion) {
    let broker = broker::Broker::start();
    let runtime = two_workers();
    let (bare, palisade, untimed) = runtime.block_on(async {
        bare_server(&broker.url()).await;
        palisade_server(&broker.url()).await;
        let bare = BareClient::connect(&broker.url()).await;
        let client = Client::builder()
            .connect(RedisOptions::new(broker.url()))
            .await
            .unwrap();
        let untimed = Client::builder()
            .no_timeout()
            .connect(RedisOptions::new(broker.url()))
            .await
            .unwrap();
        (bare, client, untimed)
    });

    for (name, in_flight) in [("sequential", 1), ("64_in_flight", 64)] {
        let mut group = c.benchmark_group(format!("redis/send/{name}"));
        let calls = [
            ("palisade send", &palisade, "echo"),
            // A route of its own: every client that called a route receives every reply to it.
            ("palisade send, no timeout", &untimed, "echo-untimed"),
        ];
        bench_calls(
            &mut group,
            "bare redis request",
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
        let mut group = c.benchmark_group(format!("redis/emit/{name}"));
        bench_events(
            &mut group,
            "bare redis publish",
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

/// Every pairing of a palisade or NestJS client and server over Redis, each server on a broker
/// of its own (every server subscribed to a channel answers, so they must not share one).
fn nestjs(_: &mut Criterion) {
    if !nest_pairs::wanted("nestjs") || !nest_pairs::node_available() {
        return;
    }
    let (nest_broker, broker) = (broker::Broker::start(), broker::Broker::start());
    let nest = nestjs::NestService::start(&["redis", &nest_broker.url()]);
    let runtime = two_workers();
    runtime.block_on(palisade_server(&broker.url()));
    nest_pairs::print_pairings(
        &runtime,
        "redis",
        "over Redis pub/sub",
        (&broker.url(), &nest_broker.url()),
        |url| async {
            Client::builder()
                .connect(RedisOptions::new(url))
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
    targets = redis_pubsub, nestjs
}
criterion_main!(benches);

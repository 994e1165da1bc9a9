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
use palisade::rpc::{Client, Payload, Router, Server};
use std::sync::Arc;
use std::time::Duration;

mod support;
use support::in_tasks;

#[path = "support/nest_pairs.rs"]
mod nest_pairs;

#[path = "support/bare_redis.rs"]
mod bare_redis;
use bare_redis::{BareClient, bare_server};

#[path = "../../tests/support/nestjs.rs"]
mod nestjs;

#[path = "../../tests/support/redis.rs"]
mod broker;

/// What `tests/support/redis.rs` asks of its parent.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn router() -> Router {
    Router::new()
        .message("echo", |Payload(x): Payload<u64>| async move { x })
        .event("note", |Payload(_): Payload<u64>| async {})
}

async fn palisade_server(url: &str) {
    let server = RedisServer::new(RedisOptions::new(url))
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

fn redis_pubsub(c: &mut Criterion) {
    let broker = broker::Broker::start();
    let runtime = runtime();
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
        group.bench_function("bare redis request", |b| {
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
        let mut group = c.benchmark_group(format!("redis/emit/{name}"));
        group.bench_function("bare redis publish", |b| {
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

/// Every pairing of a palisade or NestJS client and server over Redis, each server on a broker
/// of its own (every server subscribed to a channel answers, so they must not share one).
fn nestjs(_: &mut Criterion) {
    if !nest_pairs::wanted("nestjs") || !nest_pairs::node_available() {
        return;
    }
    let (nest_broker, broker) = (broker::Broker::start(), broker::Broker::start());
    let nest = nestjs::NestService::start(&["redis", &nest_broker.url()]);
    let runtime = runtime();
    runtime.block_on(palisade_server(&broker.url()));
    let palisade_rate = |url: String, in_flight: u64| {
        runtime.block_on(async move {
            let client = Client::builder()
                .connect(RedisOptions::new(url))
                .await
                .unwrap();
            nest_pairs::palisade_rate(&client, in_flight).await
        })
    };
    nest_pairs::nest_rate("redis", &nest_broker.url(), 64); // warms NestJS's server up
    nest_pairs::heading("over Redis pub/sub");
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
            nest_pairs::nest_rate("redis", &url, 1),
            nest_pairs::nest_rate("redis", &url, 64),
        );
    }
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

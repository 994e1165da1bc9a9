//! CPU time per request (and per event: `bare-emit`, `palisade-emit`, and `no-timeout-emit` for
//! palisade's client without a deadline) of palisade's Redis client and server beside the bare
//! `redis` loops of the `redis` bench, 64 in flight on one `redis-server` started here: steadier
//! than wall time on a shared 2-core machine, where both compete with the broker for the cores.
//! Events are timed until the servers handled them.
//!
//! ```sh
//! cargo run --release -p palisade-benches --example redis_cpu              # 200 000 requests (or events) each
//! cargo run --release -p palisade-benches --example redis_cpu -- 50000 bare
//! cargo run --release -p palisade-benches --example redis_cpu -- 50000 bare,palisade 9 64   # 9 rounds, 64 in flight
//! cargo run --release -p palisade-benches --example redis_cpu -- 4000 bare-emit,palisade-emit 9 1
//! ```
//!
//! Arguments: calls per round, the contenders (comma-separated, or `all`), rounds, calls in flight.
//! Prints, per round and contender, the wall time, this process's CPU time (client and server
//! together) and the broker's CPU time, each per request, and the read and write system calls of
//! each per request; contenders take turns within each round, and a summary gives each one's
//! median over the rounds and the median of its per-round ratio to the first contender. The bare
//! loops are the bench's own (`benches/redis.rs`), included from there.
use palisade::rpc::transport::ServerTransport;
use palisade::rpc::transport::redis::{RedisOptions, RedisServer};
use palisade::rpc::{Client, Server};
use std::sync::Arc;

#[path = "../benches/support/mod.rs"]
mod support;
use support::{
    contender, cpu_rounds, echo_contender, echo_router, event_contender, free_port, two_workers,
};

#[path = "../../tests/support/redis.rs"]
mod broker;

#[path = "../benches/support/bare_redis.rs"]
mod bare_redis;
use bare_redis::{BareClient, bare_server};

fn main() {
    let broker = broker::Broker::start();
    let broker_pid = broker.pid().expect("the broker runs").to_string();
    let runtime = two_workers();
    let (bare, palisade, untimed) = runtime.block_on(async {
        bare_server(&broker.url()).await;
        let server = RedisServer::new(RedisOptions::new(broker.url()))
            .serve(Server::new(echo_router()))
            .await
            .unwrap();
        std::mem::forget(server);
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
    let contenders = [
        contender("bare", {
            let bare = Arc::clone(&bare);
            move |x| {
                let bare = Arc::clone(&bare);
                async move { assert_eq!(bare.call(x).await, x) }
            }
        }),
        echo_contender("palisade", palisade.clone()),
        event_contender("bare-emit", {
            let bare = Arc::clone(&bare);
            move |x| {
                let bare = Arc::clone(&bare);
                async move { bare.emit(x).await }
            }
        }),
        event_contender("palisade-emit", move |x| {
            let client = palisade.clone();
            async move { client.emit("note", &x).await.unwrap() }
        }),
        event_contender("no-timeout-emit", move |x| {
            let client = untimed.clone();
            async move { client.emit("note", &x).await.unwrap() }
        }),
    ];
    cpu_rounds(&runtime, "redis", &broker_pid, &contenders);
}

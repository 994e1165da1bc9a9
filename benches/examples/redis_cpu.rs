//! CPU time per request of palisade's Redis client and server beside the bare `redis` loops of
//! the `redis` bench, 64 in flight on one `redis-server` started here: steadier than wall time on
//! a shared 2-core machine, where both compete with the broker for the cores.
//!
//! ```sh
//! cargo run --release -p palisade-benches --example redis_cpu              # 200 000 requests each
//! cargo run --release -p palisade-benches --example redis_cpu -- 50000 bare
//! ```
//!
//! Prints, per round and contender, the wall time, this process's CPU time (client and server
//! together) and the broker's CPU time, each per request. The bare loops are the bench's own
//! (`benches/redis.rs`), included from there.
use palisade::rpc::transport::ServerTransport;
use palisade::rpc::transport::redis::{RedisOptions, RedisServer};
use palisade::rpc::{Client, Payload, Router, Server};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[path = "../benches/support/mod.rs"]
mod support;
use support::in_tasks;

#[path = "../../tests/support/redis.rs"]
mod broker;

#[path = "../benches/support/bare_redis.rs"]
#[allow(dead_code)] // events are the bench's business
mod bare_redis;
use bare_redis::{BareClient, bare_server};

/// What `tests/support/redis.rs` asks of its parent.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// User and system CPU time of process `pid` (or `self`), in clock ticks (100 per second).
fn cpu_ticks(pid: &str) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

fn router() -> Router {
    Router::new()
        .message("echo", |Payload(x): Payload<u64>| async move { x })
        .event("note", |Payload(_): Payload<u64>| async {})
}

fn main() {
    let broker = broker::Broker::start();
    let redis_pid = String::from_utf8(
        std::process::Command::new("pgrep")
            .args(["-f", &format!("redis-server.*{}", broker.port())])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap()
    .trim()
    .to_string();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (bare, palisade) = runtime.block_on(async {
        bare_server(&broker.url()).await;
        let server = RedisServer::new(RedisOptions::new(broker.url()))
            .serve(Server::new(router()))
            .await
            .unwrap();
        std::mem::forget(server);
        let bare = BareClient::connect(&broker.url()).await;
        let client = Client::builder()
            .connect(RedisOptions::new(broker.url()))
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
        for which in ["bare", "palisade"] {
            if !only.is_empty() && only != which {
                continue;
            }
            let (c0, r0) = (cpu_ticks("self"), cpu_ticks(&redis_pid));
            let start = Instant::now();
            let wall = runtime.block_on(async {
                if which == "bare" {
                    let bare = Arc::clone(&bare);
                    in_tasks(n, 64, move |x| {
                        let bare = Arc::clone(&bare);
                        async move { assert_eq!(bare.call(x).await, x) }
                    })
                    .await
                } else {
                    let client = palisade.clone();
                    in_tasks(n, 64, move |x| {
                        let client = client.clone();
                        async move { assert_eq!(client.send::<u64>("echo", &x).await.unwrap(), x) }
                    })
                    .await
                }
            });
            let _ = start;
            let (c1, r1) = (cpu_ticks("self"), cpu_ticks(&redis_pid));
            let per = |ticks: u64| ticks as f64 * 10_000.0 / n as f64; // 100 Hz ticks -> µs
            println!(
                "round {round} {which:9} wall {:6.2} µs/req  cpu(process) {:6.2} µs/req  cpu(redis) {:5.2} µs/req",
                wall.as_secs_f64() * 1e6 / n as f64,
                per(c1 - c0),
                per(r1 - r0)
            );
        }
    }
    let _ = Duration::ZERO;
}

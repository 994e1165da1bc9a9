//! CPU time per request of palisade's NATS client and server beside bare `async-nats` (the
//! `nats` bench's `request()` and echoing subscriber), 64 in flight on one `nats-server` started
//! here: steadier than wall time on a shared 2-core machine, where all three compete for the
//! cores.
//!
//! ```sh
//! cargo run --release -p palisade-benches --example nats_cpu                  # 200 000 requests each
//! cargo run --release -p palisade-benches --example nats_cpu -- 50000 no-timeout
//! cargo run --release -p palisade-benches --example nats_cpu -- 50000 bare,palisade 9 64   # 9 rounds, 64 in flight
//! ```
//!
//! Contenders:
//! - `bare`: async-nats `request()` against a bare echoing subscriber;
//! - `bare-nest`: the same async-nats loops carrying NestJS's packets, written with `format!` and
//!   read into a `serde_json::Value` on both sides, as the bare Redis and MQTT loops do;
//! - `bare-hop`: `bare` with palisade's reply path (one inbox subscription read by a task that
//!   hands each reply to its caller) instead of `request()`'s;
//! - `bare-hop-nest`: `bare-hop` carrying palisade's packets (the request number as the id, and
//!   the deadline's header) to the `bare-nest` echo;
//! - `palisade`: the default client, whose 5 s timeout travels as a deadline in the packet body;
//! - `deadline-header`: the same deadline as a NATS header (`NatsOptions::deadline_header`);
//! - `no-timeout`: `ClientBuilder::no_timeout`, so no deadline and no timer;
//! - `bare-to-server`: bare `request()` sending NestJS packets to the palisade server, which shows
//!   the server's share of palisade's cost;
//! - `hop-to-server`: `bare-hop` sending palisade's packets (written with `format!`, replies read
//!   into a `serde_json::Value`) to the palisade server: palisade's client beside a hand-written
//!   one, with the same server and reply path.
//!
//! Arguments: calls per round, the contenders (comma-separated, or `all`), rounds, calls in flight.
//! Prints, per round, the wall time, this process's CPU time (client and server together) and
//! the broker's, each per request, and the read and write system calls of each per request;
//! contenders take turns within each round, and a summary gives each one's median over the
//! rounds and the median of its per-round ratio to the first contender.
use palisade::rpc::transport::ServerTransport;
use palisade::rpc::transport::nats::{NatsOptions, NatsServer};
use palisade::rpc::{Client, Server};

#[path = "../benches/support/mod.rs"]
mod support;
use support::{contender, cpu_rounds, echo_contender, echo_router, two_workers};

#[path = "../../tests/support/nats.rs"]
mod broker;

#[path = "../benches/support/bare_nats.rs"]
mod bare_nats;
use bare_nats::{bare_call, bare_nest_call, serve_bare_echo, serve_bare_nest_echo};

fn main() {
    let broker = broker::Broker::start();
    let broker_pid = broker.pid().expect("the broker runs").to_string();
    let runtime = two_workers();
    let (bare, palisade, with_header, untimed, hop) = runtime.block_on(async {
        serve_bare_echo(&broker.url()).await;
        serve_bare_nest_echo(&broker.url()).await;
        let bare = async_nats::connect(broker.url()).await.unwrap();
        let server = NatsServer::new(NatsOptions::new([broker.url()]))
            .serve(Server::new(echo_router()))
            .await
            .unwrap();
        std::mem::forget(server);
        let client = Client::builder()
            .connect(NatsOptions::new([broker.url()]))
            .await
            .unwrap();
        let with_header = Client::builder()
            .connect(NatsOptions::new([broker.url()]).deadline_header(true))
            .await
            .unwrap();
        let untimed = Client::builder()
            .no_timeout()
            .connect(NatsOptions::new([broker.url()]))
            .await
            .unwrap();
        (
            bare,
            client,
            with_header,
            untimed,
            bare_nats::HopClient::connect(&broker.url()).await,
        )
    });
    let contenders = [
        contender("bare", {
            let bare = bare.clone();
            move |x| {
                let bare = bare.clone();
                async move { bare_call(&bare, x).await }
            }
        }),
        contender("bare-nest", {
            let bare = bare.clone();
            move |x| {
                let bare = bare.clone();
                async move { bare_nest_call(&bare, x).await }
            }
        }),
        contender("bare-hop", {
            let hop = hop.clone();
            move |x| {
                let hop = hop.clone();
                async move { hop.call(x).await }
            }
        }),
        contender("bare-hop-nest", {
            let hop = hop.clone();
            move |x| {
                let hop = hop.clone();
                async move { hop.nest_call(x).await }
            }
        }),
        contender("hop-to-server", move |x| {
            let hop = hop.clone();
            async move { hop.call_palisade_server(x).await }
        }),
        echo_contender("palisade", palisade),
        echo_contender("deadline-header", with_header),
        echo_contender("no-timeout", untimed),
        contender("bare-to-server", move |x| {
            let bare = bare.clone();
            async move {
                let packet = format!("{{\"pattern\":\"echo\",\"data\":{x},\"id\":\"{x}\"}}");
                let reply = bare.request("echo", packet.into()).await.unwrap();
                let expected = format!("{{\"response\":{x},\"isDisposed\":true,\"id\":\"{x}\"}}");
                assert_eq!(reply.payload, expected.as_bytes());
            }
        }),
    ];
    cpu_rounds(&runtime, "nats-server", &broker_pid, &contenders);
}

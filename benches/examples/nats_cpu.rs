//! CPU time per request of palisade's NATS client and server beside bare `async-nats` (the
//! `nats` bench's `request()` and echoing subscriber), 64 in flight on one `nats-server` started
//! here: steadier than wall time on a shared 2-core machine, where all three compete for the
//! cores.
//!
//! ```sh
//! cargo run --release -p palisade-benches --example nats_cpu                  # 200 000 requests each
//! cargo run --release -p palisade-benches --example nats_cpu -- 50000 no-timeout
//! ```
//!
//! Contenders:
//! - `bare`: async-nats `request()` against a bare echoing subscriber;
//! - `palisade`: the default client, whose 5 s timeout travels as a deadline in the packet body;
//! - `deadline-header`: the same deadline as a NATS header (`NatsOptions::deadline_header`);
//! - `no-timeout`: `ClientBuilder::no_timeout`, so no deadline and no timer;
//! - `bare-to-server`: bare `request()` sending NestJS packets to the palisade server, which shows
//!   the server's share of palisade's cost.
//!
//! Prints, per round, the wall time, this process's CPU time (client and server together) and
//! the broker's, each per request.
use palisade::rpc::transport::ServerTransport;
use palisade::rpc::transport::nats::{NatsOptions, NatsServer};
use palisade::rpc::{Client, Server};

#[path = "../benches/support/mod.rs"]
mod support;
use support::{cpu_ticks, echo_router, in_tasks, two_workers};

#[path = "../../tests/support/nats.rs"]
mod broker;

#[path = "../benches/support/bare_nats.rs"]
mod bare_nats;
use bare_nats::{bare_call, serve_bare_echo};

fn main() {
    let broker = broker::Broker::start();
    let nats_pid = broker.pid().expect("the broker runs").to_string();
    let runtime = two_workers();
    let (bare, palisade, with_header, untimed) = runtime.block_on(async {
        serve_bare_echo(&broker.url()).await;
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
        (bare, client, with_header, untimed)
    });
    let n: u64 = std::env::args()
        .nth(1)
        .map(|a| a.parse().unwrap())
        .unwrap_or(200_000);
    let only = std::env::args().nth(2).unwrap_or_default();
    for round in 0..3 {
        for which in [
            "bare",
            "palisade",
            "deadline-header",
            "no-timeout",
            "bare-to-server",
        ] {
            if !only.is_empty() && only != which {
                continue;
            }
            let (c0, b0) = (cpu_ticks("self"), cpu_ticks(&nats_pid));
            let wall = runtime.block_on(async {
                match which {
                    "bare-to-server" => {
                        let bare = bare.clone();
                        in_tasks(n, 64, move |x| {
                            let bare = bare.clone();
                            async move {
                                let packet =
                                    format!("{{\"pattern\":\"echo\",\"data\":{x},\"id\":\"{x}\"}}");
                                let reply = bare.request("echo", packet.into()).await.unwrap();
                                let expected = format!(
                                    "{{\"response\":{x},\"isDisposed\":true,\"id\":\"{x}\"}}"
                                );
                                assert_eq!(reply.payload, expected.as_bytes());
                            }
                        })
                        .await
                    }
                    "bare" => {
                        let bare = bare.clone();
                        in_tasks(n, 64, move |x| {
                            let bare = bare.clone();
                            async move { bare_call(&bare, x).await }
                        })
                        .await
                    }
                    _ => {
                        let client = match which {
                            "palisade" => palisade.clone(),
                            "deadline-header" => with_header.clone(),
                            _ => untimed.clone(),
                        };
                        in_tasks(n, 64, move |x| {
                            let client = client.clone();
                            async move {
                                assert_eq!(client.send::<u64>("echo", &x).await.unwrap(), x)
                            }
                        })
                        .await
                    }
                }
            });
            let (c1, b1) = (cpu_ticks("self"), cpu_ticks(&nats_pid));
            let per = |ticks: u64| ticks as f64 * 10_000.0 / n as f64; // 100 Hz ticks -> µs
            println!(
                "round {round} {which:15} wall {:6.2} µs/req  cpu(process) {:6.2} µs/req  cpu(nats-server) {:5.2} µs/req",
                wall.as_secs_f64() * 1e6 / n as f64,
                per(c1 - c0),
                per(b1 - b0)
            );
        }
    }
}

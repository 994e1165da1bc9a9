//! Message round trips: palisade's client → router → handler → reply, side by side in one run with
//! a bare tokio mpsc + oneshot round trip (the floor) and tarpc, one request at a time and 64 in
//! flight, in process and over loopback TCP.

use criterion::{Criterion, criterion_group, criterion_main};
use futures::StreamExt;
use palisade::rpc::transport::memory::MemoryTransport;
use palisade::rpc::transport::tcp::{TcpServer, TcpTransport};
use palisade::rpc::{Client, Payload, Router, Server};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tarpc::server::{BaseChannel, Channel};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Mutex, mpsc, oneshot};

const IN_FLIGHT: u64 = 64;

mod support;
use support::in_tasks;

#[path = "../../tests/support/nestjs.rs"]
mod nestjs;

#[tarpc::service]
trait Echo {
    async fn echo(x: u64) -> u64;
}

#[derive(Clone)]
struct EchoServer;

impl Echo for EchoServer {
    async fn echo(self, _: tarpc::context::Context, x: u64) -> u64 {
        x
    }
}

fn router(events: Arc<AtomicU64>) -> Router {
    Router::new()
        .message("echo", |Payload(x): Payload<u64>| async move { x })
        .event("tick", move |Payload(_): Payload<u64>| {
            events.fetch_add(1, Ordering::Relaxed);
            async {}
        })
}

fn bare_channel() -> mpsc::Sender<(u64, oneshot::Sender<u64>)> {
    let (requests, mut incoming) = mpsc::channel::<(u64, oneshot::Sender<u64>)>(1024);
    tokio::spawn(async move {
        while let Some((x, reply)) = incoming.recv().await {
            let _ = reply.send(x);
        }
    });
    requests
}

async fn bare_call(requests: &mpsc::Sender<(u64, oneshot::Sender<u64>)>, x: u64) -> u64 {
    let (reply, answer) = oneshot::channel();
    requests.send((x, reply)).await.unwrap();
    answer.await.unwrap()
}

fn tarpc_in_process() -> EchoClient {
    let (client_transport, server_transport) = tarpc::transport::channel::unbounded();
    let server = BaseChannel::with_defaults(server_transport);
    tokio::spawn(
        server
            .execute(EchoServer.serve())
            .for_each(|response| async move {
                tokio::spawn(response);
            }),
    );
    EchoClient::new(tarpc::client::Config::default(), client_transport).spawn()
}

async fn tarpc_tcp() -> EchoClient {
    let mut listener = tarpc::serde_transport::tcp::listen(
        "127.0.0.1:0",
        tarpc::tokio_serde::formats::Json::default,
    )
    .await
    .unwrap();
    let addr = listener.local_addr();
    tokio::spawn(async move {
        while let Some(Ok(transport)) = listener.next().await {
            let channel = BaseChannel::with_defaults(transport);
            tokio::spawn(
                channel
                    .execute(EchoServer.serve())
                    .for_each(|response| async move {
                        tokio::spawn(response);
                    }),
            );
        }
    });
    let transport =
        tarpc::serde_transport::tcp::connect(addr, tarpc::tokio_serde::formats::Json::default)
            .await
            .unwrap();
    EchoClient::new(tarpc::client::Config::default(), transport).spawn()
}

/// The floor over loopback: a length-prefixed echo, one connection, requests pipelined by a
/// writer and replies read in order (no ids, no JSON, no handler dispatch).
struct RawEcho {
    writer: Mutex<tokio::net::tcp::OwnedWriteHalf>,
    waiting: Mutex<std::collections::VecDeque<oneshot::Sender<u64>>>,
}

async fn raw_echo() -> Arc<RawEcho> {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            socket.set_nodelay(true).unwrap();
            tokio::spawn(async move {
                let (mut read, mut write) = socket.split();
                let mut frame = [0u8; 12];
                while read.read_exact(&mut frame).await.is_ok() {
                    if write.write_all(&frame).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    let socket = TcpStream::connect(addr).await.unwrap();
    socket.set_nodelay(true).unwrap();
    let (mut read, write) = socket.into_split();
    let echo = Arc::new(RawEcho {
        writer: Mutex::new(write),
        waiting: Mutex::new(Default::default()),
    });
    let reader = Arc::clone(&echo);
    tokio::spawn(async move {
        let mut frame = [0u8; 12];
        while read.read_exact(&mut frame).await.is_ok() {
            let x = u64::from_be_bytes(frame[4..].try_into().unwrap());
            if let Some(reply) = reader.waiting.lock().await.pop_front() {
                let _ = reply.send(x);
            }
        }
    });
    echo
}

impl RawEcho {
    async fn call(&self, x: u64) -> u64 {
        let (reply, answer) = oneshot::channel();
        let mut frame = [0u8; 12];
        frame[..4].copy_from_slice(&8u32.to_be_bytes());
        frame[4..].copy_from_slice(&x.to_be_bytes());
        {
            // Queue the waiter and write under one lock so replies match in order.
            let mut writer = self.writer.lock().await;
            self.waiting.lock().await.push_back(reply);
            writer.write_all(&frame).await.unwrap();
        }
        answer.await.unwrap()
    }
}

fn in_process(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let events = Arc::new(AtomicU64::new(0));
    let (bare, palisade, tarpc) = runtime.block_on(async {
        let transport = MemoryTransport::new();
        std::mem::forget(transport.serve_now(Server::new(router(Arc::clone(&events)))));
        let client = Client::builder().connect(transport).await.unwrap();
        (bare_channel(), client, tarpc_in_process())
    });
    for (name, in_flight) in [("sequential", 1), ("64_in_flight", IN_FLIGHT)] {
        let mut group = c.benchmark_group(format!("rpc/in_process/{name}"));
        group.bench_function("bare mpsc+oneshot", |b| {
            b.to_async(&runtime).iter_custom(|iters| {
                let bare = bare.clone();
                in_tasks(iters, in_flight, move |x| {
                    let bare = bare.clone();
                    async move { assert_eq!(bare_call(&bare, x).await, x) }
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
        group.bench_function("palisade emit", |b| {
            b.to_async(&runtime).iter_custom(|iters| {
                let client = palisade.clone();
                in_tasks(iters, in_flight, move |x| {
                    let client = client.clone();
                    async move { client.emit("tick", &x).await.unwrap() }
                })
            })
        });
        group.bench_function("tarpc", |b| {
            b.to_async(&runtime).iter_custom(|iters| {
                let client = tarpc.clone();
                in_tasks(iters, in_flight, move |x| {
                    let client = client.clone();
                    async move {
                        assert_eq!(client.echo(tarpc::context::current(), x).await.unwrap(), x)
                    }
                })
            })
        });
        group.finish();
    }
}

fn over_tcp(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (raw, palisade, tarpc) = runtime.block_on(async {
        let server = Server::new(router(Arc::default()))
            .serve(TcpServer::bind("127.0.0.1:0").await.unwrap())
            .await
            .unwrap();
        let addr = server.local_addr().unwrap();
        std::mem::forget(server);
        let client = Client::builder()
            .connect(TcpTransport::new(addr.to_string()))
            .await
            .unwrap();
        (raw_echo().await, client, tarpc_tcp().await)
    });
    for (name, in_flight) in [("sequential", 1), ("64_in_flight", IN_FLIGHT)] {
        let mut group = c.benchmark_group(format!("rpc/tcp/{name}"));
        group.bench_function("raw length-prefixed echo", |b| {
            b.to_async(&runtime).iter_custom(|iters| {
                let raw = Arc::clone(&raw);
                in_tasks(iters, in_flight, move |x| {
                    let raw = Arc::clone(&raw);
                    async move { assert_eq!(raw.call(x).await, x) }
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
        group.bench_function("tarpc", |b| {
            b.to_async(&runtime).iter_custom(|iters| {
                let client = tarpc.clone();
                in_tasks(iters, in_flight, move |x| {
                    let client = client.clone();
                    async move {
                        assert_eq!(client.echo(tarpc::context::current(), x).await.unwrap(), x)
                    }
                })
            })
        });
        group.finish();
    }
}

/// NestJS on the same machine, for the README: every pairing of {palisade, NestJS} client and
/// {palisade, NestJS} server, measured the same way — 20 000 echo requests after a warm-up (Node's
/// JIT needs one), one at a time and 64 in flight — and printed as requests per second. (Criterion
/// cannot time the Node client, so this group reports rather than samples.)
fn against_nestjs(_: &mut Criterion) {
    const REQUESTS: u64 = 20_000;
    if std::process::Command::new("node")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("node is not installed; skipping the NestJS comparison");
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let nest_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let nest = nestjs::NestService::start(&["tcp", &nest_port.to_string()]);
    let palisade_port = runtime.block_on(async {
        let server = Server::new(router(Arc::default()))
            .serve(TcpServer::bind("127.0.0.1:0").await.unwrap())
            .await
            .unwrap();
        let port = server.local_addr().unwrap().port();
        std::mem::forget(server);
        port
    });
    let palisade_client = |port: u16, in_flight: u64| -> f64 {
        runtime.block_on(async move {
            let client = Client::builder()
                .connect(TcpTransport::new(format!("127.0.0.1:{port}")))
                .await
                .unwrap();
            let call = move |x: u64| {
                let client = client.clone();
                async move { assert_eq!(client.send::<u64>("echo", &x).await.unwrap(), x) }
            };
            let run = |count: u64| {
                let call = call.clone();
                async move {
                    let start = Instant::now();
                    let per_task = count / in_flight;
                    let tasks: Vec<_> = (0..in_flight)
                        .map(|task| {
                            let call = call.clone();
                            tokio::spawn(async move {
                                for i in 0..per_task {
                                    call(task * per_task + i).await;
                                }
                            })
                        })
                        .collect();
                    for task in tasks {
                        task.await.unwrap();
                    }
                    (per_task * in_flight) as f64 / start.elapsed().as_secs_f64()
                }
            };
            run(REQUESTS / 2).await; // warm-up
            run(REQUESTS).await
        })
    };
    let node_client = |port: u16, in_flight: u64| -> f64 {
        let output = nestjs::node("bench-client.js")
            .args([
                port.to_string(),
                REQUESTS.to_string(),
                in_flight.to_string(),
            ])
            .output()
            .unwrap();
        let report: serde_json::Value =
            serde_json::from_slice(&output.stdout).expect("bench-client.js report");
        report["per_second"].as_f64().unwrap()
    };
    // Warm NestJS's server up before measuring it.
    node_client(nest_port, 64);
    println!("\nrequests/s over loopback TCP (echo), {REQUESTS} requests:");
    println!("  client → server          1 in flight   64 in flight");
    for (name, port) in [
        ("palisade → palisade", palisade_port),
        ("palisade → NestJS  ", nest_port),
    ] {
        println!(
            "  {name}   {:>11.0}   {:>12.0}",
            palisade_client(port, 1),
            palisade_client(port, 64)
        );
    }
    for (name, port) in [
        ("NestJS   → palisade", palisade_port),
        ("NestJS   → NestJS  ", nest_port),
    ] {
        println!(
            "  {name}   {:>11.0}   {:>12.0}",
            node_client(port, 1),
            node_client(port, 64)
        );
    }
    drop(nest);
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    targets = in_process, over_tcp, against_nestjs
}
criterion_main!(benches);

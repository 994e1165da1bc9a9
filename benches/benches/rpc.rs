//! Message round trips, measured the way an outside harness measures them (issue 16): each server
//! runs on an OS thread of its own with a `current_thread` runtime; the client runs on the bench's
//! runtime and keeps `in_flight` calls going from one task (a `FuturesUnordered`); the request is
//! `{"id":"42"}` and the reply `{"id":"42","username":"ada","email":"ada@example.com"}`. Side by
//! side in one run:
//!
//! - in process: a bare tokio mpsc + oneshot request/reply (the floor), palisade's in-memory
//!   transport, and tarpc's in-process channel;
//! - over loopback TCP: a raw pipelined length-delimited echo (the floor:
//!   `tokio_util::codec::LengthDelimitedCodec` over one `TcpStream` with `TCP_NODELAY`, the server
//!   forwarding frames and flushing only when no input is pending, the client feeding up to
//!   `in_flight` frames, flushing once per refill and draining whatever is readable), palisade's
//!   TCP transport, and tarpc 0.38 over TCP with its JSON codec.
//!
//! `cargo bench -p palisade-benches --bench rpc` (criterion, per-request medians). The NestJS
//! comparison (every pairing of a palisade or NestJS client and server) is printed by
//! `cargo bench -p palisade-benches --bench rpc -- nestjs`.

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use futures::stream::FuturesUnordered;
use futures::{SinkExt, StreamExt};
use palisade::rpc::transport::memory::MemoryTransport;
use palisade::rpc::transport::tcp::{TcpServer, TcpTransport};
use palisade::rpc::{Client, Payload, Router, RpcError, Server};
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tarpc::server::{BaseChannel, Channel};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::{Framed, LengthDelimitedCodec};

#[path = "../../tests/support/nestjs.rs"]
mod nestjs;

const IN_FLIGHT: usize = 64;

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct GetUser {
    id: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct User {
    id: String,
    username: String,
    email: String,
}

fn user(id: String) -> User {
    User {
        id,
        username: "ada".into(),
        email: "ada@example.com".into(),
    }
}

fn request() -> GetUser {
    GetUser { id: "42".into() }
}

#[tarpc::service]
trait Users {
    async fn get_user(request: GetUser) -> User;
}

#[derive(Clone)]
struct UsersServer;

impl Users for UsersServer {
    async fn get_user(self, _: tarpc::context::Context, request: GetUser) -> User {
        user(request.id)
    }
}

fn router() -> Router {
    Router::new()
        .message(
            "get-user",
            |Payload(request): Payload<GetUser>| async move { Ok::<_, RpcError>(user(request.id)) },
        )
        .message("echo", |Payload(x): Payload<u64>| async move { x })
}

/// Runs `serve` on an OS thread of its own with a `current_thread` runtime, for the rest of the
/// process; returns what `serve` hands back once it is up.
fn on_server_thread<T, F, Fut>(serve: F) -> T
where
    T: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = T> + 'static,
{
    let (ready, up) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let local = tokio::task::LocalSet::new();
        local.block_on(&runtime, async move {
            ready.send(serve().await).unwrap();
            std::future::pending::<()>().await;
        });
    });
    up.recv().unwrap()
}

/// Makes `iters` calls with `in_flight` of them going at once, from one task; the wall time.
async fn drive<F, Fut>(iters: u64, in_flight: usize, call: F) -> Duration
where
    F: Fn() -> Fut,
    Fut: Future<Output = ()>,
{
    let start = Instant::now();
    let mut running = FuturesUnordered::new();
    let mut started = 0;
    while started < iters || !running.is_empty() {
        while running.len() < in_flight && started < iters {
            running.push(call());
            started += 1;
        }
        running.next().await;
    }
    start.elapsed()
}

// ---- the in-process floor: mpsc + oneshot --------------------------------------------------

type BareRequest = (GetUser, oneshot::Sender<User>);

fn bare_channel() -> mpsc::Sender<BareRequest> {
    on_server_thread(|| async {
        let (requests, mut incoming) = mpsc::channel::<BareRequest>(1024);
        tokio::spawn(async move {
            while let Some((request, reply)) = incoming.recv().await {
                let _ = reply.send(user(request.id));
            }
        });
        requests
    })
}

async fn bare_call(requests: &mpsc::Sender<BareRequest>) {
    let (reply, answer) = oneshot::channel();
    requests.send((request(), reply)).await.unwrap();
    assert_eq!(answer.await.unwrap().id, "42");
}

// ---- tarpc ------------------------------------------------------------------------------------

fn tarpc_in_process() -> UsersClient {
    let (client_transport, server_transport) = tarpc::transport::channel::unbounded();
    on_server_thread(move || async move {
        let server = BaseChannel::with_defaults(server_transport);
        tokio::spawn(
            server
                .execute(UsersServer.serve())
                .for_each(|response| async move {
                    tokio::spawn(response);
                }),
        );
    });
    UsersClient::new(tarpc::client::Config::default(), client_transport).spawn()
}

async fn tarpc_tcp() -> UsersClient {
    let addr: SocketAddr = on_server_thread(|| async {
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
                tokio::spawn(channel.execute(UsersServer.serve()).for_each(
                    |response| async move {
                        tokio::spawn(response);
                    },
                ));
            }
        });
        addr
    });
    let transport =
        tarpc::serde_transport::tcp::connect(addr, tarpc::tokio_serde::formats::Json::default)
            .await
            .unwrap();
    UsersClient::new(tarpc::client::Config::default(), transport).spawn()
}

// ---- the TCP floor: a pipelined length-delimited echo -----------------------------------------

fn raw_echo_server() -> SocketAddr {
    on_server_thread(|| async {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                socket.set_nodelay(true).unwrap();
                tokio::spawn(async move {
                    let (mut sink, mut stream) =
                        Framed::new(socket, LengthDelimitedCodec::new()).split();
                    // Feed each frame back; flush only when no more input is pending.
                    let mut stream = std::pin::pin!(stream.by_ref().peekable());
                    while let Some(Ok(frame)) = stream.next().await {
                        if sink.feed(frame.freeze()).await.is_err() {
                            return;
                        }
                        let more = futures::poll!(stream.as_mut().peek()).is_ready();
                        if !more && SinkExt::<Bytes>::flush(&mut sink).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        addr
    })
}

/// `iters` echoes with up to `in_flight` frames outstanding on one connection: feed frames, one
/// flush per refill, then drain at least one reply and whatever else is readable.
async fn raw_echo_run(
    socket: &mut Framed<TcpStream, LengthDelimitedCodec>,
    iters: u64,
    in_flight: usize,
) -> Duration {
    let payload = Bytes::from(serde_json::to_vec(&request()).unwrap());
    let start = Instant::now();
    let (mut sent, mut received, mut outstanding) = (0u64, 0u64, 0usize);
    while received < iters {
        while outstanding < in_flight && sent < iters {
            socket.feed(payload.clone()).await.unwrap();
            sent += 1;
            outstanding += 1;
        }
        SinkExt::<Bytes>::flush(socket).await.unwrap();
        // At least one reply, then whatever is already readable.
        let reply = socket.next().await.unwrap().unwrap();
        assert_eq!(reply.len(), payload.len());
        received += 1;
        outstanding -= 1;
        while let std::task::Poll::Ready(Some(reply)) = futures::poll!(socket.next()) {
            assert_eq!(reply.unwrap().len(), payload.len());
            received += 1;
            outstanding -= 1;
        }
    }
    start.elapsed()
}

// ---- the benches -------------------------------------------------------------------------------

fn criterion_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn in_process(c: &mut Criterion) {
    let runtime = criterion_runtime();
    let bare = runtime.block_on(async { bare_channel() });
    let tarpc = runtime.block_on(async { tarpc_in_process() });
    let transport = MemoryTransport::new();
    let served = transport.clone();
    on_server_thread(move || async move {
        std::mem::forget(served.serve_now(Server::new(router())));
    });
    let palisade = runtime.block_on(async { Client::builder().connect(transport).await.unwrap() });
    for in_flight in [1, IN_FLIGHT] {
        let mut group = c.benchmark_group(format!("rpc/in_process/{in_flight}_in_flight"));
        group.bench_function("bare mpsc+oneshot", |b| {
            b.to_async(&runtime)
                .iter_custom(|iters| drive(iters, in_flight, || bare_call(&bare)))
        });
        group.bench_function("palisade", |b| {
            b.to_async(&runtime).iter_custom(|iters| {
                drive(iters, in_flight, || async {
                    let reply: User = palisade.send("get-user", &request()).await.unwrap();
                    assert_eq!(reply.id, "42");
                })
            })
        });
        group.bench_function("tarpc", |b| {
            b.to_async(&runtime).iter_custom(|iters| {
                drive(iters, in_flight, || async {
                    let reply = tarpc.get_user(tarpc::context::current(), request()).await;
                    assert_eq!(reply.unwrap().id, "42");
                })
            })
        });
        group.finish();
    }
}

fn over_tcp(c: &mut Criterion) {
    let runtime = criterion_runtime();
    let raw_addr = raw_echo_server();
    let raw = runtime.block_on(async {
        let socket = TcpStream::connect(raw_addr).await.unwrap();
        socket.set_nodelay(true).unwrap();
        std::sync::Arc::new(tokio::sync::Mutex::new(Framed::new(
            socket,
            LengthDelimitedCodec::new(),
        )))
    });
    let palisade_addr: SocketAddr = on_server_thread(|| async {
        let server = Server::new(router())
            .serve(TcpServer::bind("127.0.0.1:0").await.unwrap())
            .await
            .unwrap();
        let addr = server.local_addr().unwrap();
        std::mem::forget(server);
        addr
    });
    let palisade = runtime.block_on(async {
        Client::builder()
            .connect(TcpTransport::new(palisade_addr))
            .await
            .unwrap()
    });
    let tarpc = runtime.block_on(tarpc_tcp());
    for in_flight in [1, IN_FLIGHT] {
        let mut group = c.benchmark_group(format!("rpc/tcp/{in_flight}_in_flight"));
        group.bench_function("raw pipelined echo", |b| {
            b.to_async(&runtime).iter_custom(|iters| {
                let raw = std::sync::Arc::clone(&raw);
                async move { raw_echo_run(&mut *raw.lock().await, iters, in_flight).await }
            })
        });
        group.bench_function("palisade", |b| {
            b.to_async(&runtime).iter_custom(|iters| {
                drive(iters, in_flight, || async {
                    let reply: User = palisade.send("get-user", &request()).await.unwrap();
                    assert_eq!(reply.id, "42");
                })
            })
        });
        group.bench_function("tarpc", |b| {
            b.to_async(&runtime).iter_custom(|iters| {
                drive(iters, in_flight, || async {
                    let reply = tarpc.get_user(tarpc::context::current(), request()).await;
                    assert_eq!(reply.unwrap().id, "42");
                })
            })
        });
        group.finish();
    }
}

/// NestJS on the same machine, for the README: every pairing of {palisade, NestJS} client and
/// {palisade, NestJS} server — 20 000 echo requests after a warm-up (Node's JIT needs one), one
/// at a time and 64 in flight — printed as requests per second. (Criterion cannot time the Node
/// client, so this group reports rather than samples.)
fn nestjs(_: &mut Criterion) {
    const REQUESTS: u64 = 20_000;
    // Run when no filter is given, or one naming it: `... --bench rpc -- nestjs`.
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|arg| !arg.starts_with('-'))
        .collect();
    if !filters.is_empty()
        && !filters
            .iter()
            .any(|filter| "nestjs".contains(filter.as_str()))
    {
        return;
    }
    if std::process::Command::new("node")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("node is not installed; skipping the NestJS comparison");
        return;
    }
    let runtime = criterion_runtime();
    let nest_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let nest = nestjs::NestService::start(&["tcp", &nest_port.to_string()]);
    let palisade_port = on_server_thread(|| async {
        let server = Server::new(router())
            .serve(TcpServer::bind("127.0.0.1:0").await.unwrap())
            .await
            .unwrap();
        let port = server.local_addr().unwrap().port();
        std::mem::forget(server);
        port
    });
    let palisade_client = |port: u16, in_flight: usize| -> f64 {
        runtime.block_on(async move {
            let client = Client::builder()
                .connect(TcpTransport::new(("127.0.0.1", port)))
                .await
                .unwrap();
            let call = || async {
                assert_eq!(client.send::<u64>("echo", &7).await.unwrap(), 7);
            };
            drive(REQUESTS / 2, in_flight, call).await; // warm-up
            REQUESTS as f64 / drive(REQUESTS, in_flight, call).await.as_secs_f64()
        })
    };
    let node_client = |port: u16, in_flight: usize| -> f64 {
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
    node_client(nest_port, 64); // warm NestJS's server up
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
    targets = in_process, over_tcp, nestjs
}
criterion_main!(benches);

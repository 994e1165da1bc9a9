//! A TCP server process killed (SIGKILL) with requests in flight: every pending request fails
//! with `Unavailable` within a second, and the client recovers when the server is back.
//!
//! The server is this test binary run again with `PALISADE_TEST_ROLE=tcp-server`, so it is a real
//! separate process whose sockets the kernel tears down.
#![cfg(feature = "tcp")]

mod support;

use palisade::rpc::transport::ServerTransport;
use palisade::rpc::transport::tcp::{TcpServer, TcpTransport};
use palisade::rpc::{Client, Code, Payload, Router, Server};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tokio::time::Instant;

const ROLE: &str = "PALISADE_TEST_ROLE";
const ADDR: &str = "PALISADE_TEST_ADDR";

/// Not a test when run normally: the server process of the fault test.
#[test]
fn tcp_server_process() {
    if std::env::var(ROLE).as_deref() != Ok("tcp-server") {
        return;
    }
    let addr = std::env::var(ADDR).unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let router = Router::new()
            .message("echo", |Payload(x): Payload<u64>| async move { x })
            .message("slow", || async {
                tokio::time::sleep(Duration::from_secs(60)).await;
                "too late"
            });
        let _server = TcpServer::bind(&addr)
            .await
            .unwrap()
            .serve(Server::new(router))
            .await
            .unwrap();
        println!("ready");
        std::future::pending::<()>().await;
    });
}

fn spawn_server(addr: &str) -> Child {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "tcp_server_process", "--nocapture"])
        .env(ROLE, "tcp-server")
        .env(ADDR, addr)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    loop {
        let line = lines.next().expect("the server process exited").unwrap();
        if line.trim() == "ready" {
            break;
        }
    }
    // Keep draining its output so it never blocks on a full pipe.
    std::thread::spawn(move || lines.for_each(drop));
    child
}

fn free_addr() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_server_fails_pending_requests_fast_and_the_client_recovers() {
    let addr = free_addr();
    let mut server = spawn_server(&addr);
    // A long timeout: failures below must come from the lost connection, not the deadline.
    let client = Client::builder()
        .timeout(Duration::from_secs(30))
        .connect(TcpTransport::new(addr.clone()))
        .await
        .unwrap();
    assert_eq!(client.send::<u64>("echo", &1).await.unwrap(), 1);

    let pending: Vec<_> = (0..20)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move {
                let result = client.send::<String>("slow", &()).await;
                (result, Instant::now())
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.kill().unwrap();
    let killed = Instant::now();
    server.wait().unwrap();

    for call in pending {
        let (result, finished) = tokio::time::timeout(Duration::from_secs(5), call)
            .await
            .expect("a pending request hung after the server died")
            .unwrap();
        let error = result.unwrap_err();
        assert_eq!(error.code(), Code::Unavailable, "{error}");
        assert!(error.message().contains("connection closed"), "{error}");
        assert!(
            finished.duration_since(killed) < Duration::from_secs(1),
            "failed only after {:?}",
            finished.duration_since(killed)
        );
    }

    // While the server is down, requests fail fast.
    let started = Instant::now();
    let down = client.send::<u64>("echo", &2).await.unwrap_err();
    assert_eq!(down.code(), Code::Unavailable);
    assert!(started.elapsed() < Duration::from_secs(1));

    // It comes back on the same address; the client reconnects by itself.
    let mut server = spawn_server(&addr);
    support::until_echo_answers(&client, Duration::from_secs(10), Duration::from_millis(100)).await;
    server.kill().unwrap();
    server.wait().unwrap();
}

//! Misbehaving TCP peers get their own connection closed with a specific error, and well-behaved
//! clients keep being served throughout. Real sockets on loopback, real (short) timeouts.
#![cfg(feature = "tcp")]

use palisade::rpc::transport::ServerTransport;
use palisade::rpc::transport::tcp::{TcpOptions, TcpServer, TcpTransport};
use palisade::rpc::{Client, Payload, Router, Server, ServerHandle};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout};

async fn start(options: TcpOptions) -> (ServerHandle, String) {
    let router = Router::new()
        .message("echo", |Payload(x): Payload<u64>| async move { x })
        .message(
            "big",
            |Payload(n): Payload<usize>| async move { "x".repeat(n) },
        );
    let server = TcpServer::bind("127.0.0.1:0")
        .await
        .unwrap()
        .options(options)
        .serve(Server::new(router))
        .await
        .unwrap();
    let addr = server.local_addr().unwrap().to_string();
    (server, addr)
}

async fn good_client(addr: &str) -> Client {
    Client::builder()
        .timeout(Duration::from_secs(5))
        .connect(TcpTransport::new(addr))
        .await
        .unwrap()
}

/// Asserts `client` answers promptly.
async fn still_served(client: &Client) {
    let started = Instant::now();
    let reply: u64 = client
        .send("echo", &7)
        .await
        .expect("a well-behaved client was not served");
    assert_eq!(reply, 7);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "a well-behaved client waited {:?}",
        started.elapsed()
    );
}

/// Reads until the server closes the connection (EOF or reset); returns how long that took.
async fn closed_within(socket: &mut TcpStream, limit: Duration) -> Duration {
    let started = Instant::now();
    let mut sink = vec![0u8; 64 * 1024];
    loop {
        match timeout(
            limit.saturating_sub(started.elapsed()),
            socket.read(&mut sink),
        )
        .await
        {
            Err(_) => panic!("the server did not close the connection within {limit:?}"),
            Ok(Ok(0)) | Ok(Err(_)) => return started.elapsed(),
            Ok(Ok(_)) => {}
        }
    }
}

async fn bad_bytes_close_the_connection(bytes: &[u8]) {
    let (server, addr) = start(TcpOptions::new().max_frame_len(1 << 20)).await;
    let client = good_client(&addr).await;
    still_served(&client).await;
    let mut bad = TcpStream::connect(&addr).await.unwrap();
    bad.write_all(bytes).await.unwrap();
    closed_within(&mut bad, Duration::from_secs(2)).await;
    still_served(&client).await;
    server.shutdown().await;
}

#[tokio::test]
async fn a_non_numeric_length_closes_only_that_connection() {
    bad_bytes_close_the_connection(b"abc#{}").await;
}

#[tokio::test]
async fn invalid_json_closes_only_that_connection() {
    bad_bytes_close_the_connection(b"5#{bad}").await;
}

#[tokio::test]
async fn an_oversized_length_closes_at_once_without_buffering() {
    // Declares 20 million units; the server refuses on the prefix alone.
    bad_bytes_close_the_connection(b"20000000#{").await;
    bad_bytes_close_the_connection(b"99999999999#").await;
}

#[tokio::test]
async fn invalid_utf8_closes_only_that_connection() {
    bad_bytes_close_the_connection(b"2#\xff\xfe").await;
}

#[tokio::test]
async fn a_peer_that_stops_mid_frame_is_dropped_after_the_idle_timeout() {
    let (server, addr) = start(TcpOptions::new().frame_timeout(Duration::from_millis(300))).await;
    let client = good_client(&addr).await;
    let mut stalled = TcpStream::connect(&addr).await.unwrap();
    stalled.write_all(br#"50#{"pattern":"ec"#).await.unwrap();
    let took = closed_within(&mut stalled, Duration::from_secs(3)).await;
    assert!(
        took >= Duration::from_millis(250),
        "dropped too early: {took:?}"
    );
    still_served(&client).await;
    // An idle connection between frames is not a stalled one.
    let mut idle = TcpStream::connect(&addr).await.unwrap();
    assert!(
        timeout(Duration::from_millis(600), idle.read(&mut [0u8; 16]))
            .await
            .is_err(),
        "an idle connection was closed"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn a_peer_that_never_reads_is_held_back_and_then_dropped() {
    let options = TcpOptions::new()
        .write_timeout(Duration::from_millis(500))
        .max_in_flight_per_connection(8);
    let (server, addr) = start(options).await;
    let client = good_client(&addr).await;

    // The greedy peer asks for large replies without ever reading one.
    let mut greedy = TcpStream::connect(&addr).await.unwrap();
    let request = |i: usize| {
        let json = format!(r#"{{"pattern":"big","data":200000,"id":"g{i}"}}"#);
        format!("{}#{}", json.len(), json)
    };
    let writer = tokio::spawn(async move {
        for i in 0..2000 {
            if greedy.write_all(request(i).as_bytes()).await.is_err() {
                return (i, greedy);
            }
            tokio::task::yield_now().await;
        }
        (2000, greedy)
    });
    // Meanwhile the well-behaved client is served normally.
    for _ in 0..20 {
        still_served(&client).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, mut greedy) = timeout(Duration::from_secs(10), writer)
        .await
        .expect("the greedy writer blocked forever")
        .unwrap();
    // Its connection was dropped: reading now drains what was sent, then ends.
    closed_within(&mut greedy, Duration::from_secs(10)).await;
    still_served(&client).await;
    server.shutdown().await;
}

#[tokio::test]
async fn a_flood_of_connections_does_not_starve_existing_clients() {
    let (server, addr) = start(TcpOptions::new()).await;
    let client = good_client(&addr).await;
    let mut flood = Vec::new();
    for i in 0..400 {
        let mut socket = TcpStream::connect(&addr).await.unwrap();
        if i % 4 == 0 {
            let _ = socket.write_all(b"garbage#").await;
        }
        flood.push(socket);
        if i % 50 == 0 {
            still_served(&client).await;
        }
    }
    still_served(&client).await;
    drop(flood);
    still_served(&client).await;
    server.shutdown().await;
}

#[tokio::test]
async fn connections_beyond_the_limit_are_closed_and_existing_ones_served() {
    let (server, addr) = start(TcpOptions::new().max_connections(10)).await;
    let client = good_client(&addr).await;
    still_served(&client).await; // opens the client's connection: 1 of 10
    let mut idle = Vec::new();
    for _ in 0..9 {
        idle.push(TcpStream::connect(&addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut extra = TcpStream::connect(&addr).await.unwrap();
    closed_within(&mut extra, Duration::from_secs(2)).await;
    still_served(&client).await;
    // A slot frees when a connection closes.
    drop(idle.pop());
    tokio::time::sleep(Duration::from_millis(100)).await;
    let fresh = good_client(&addr).await;
    still_served(&fresh).await;
    server.shutdown().await;
}

/// A pattern nested 50 000 deep is valid JSON: NestJS reads it and routes it to
/// `[MAX_DEPTH_REACHED]` below depth 5, so it answers "no matching message handler". It once
/// overflowed the reading worker's stack and aborted the whole server process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pattern_nested_thousands_deep_is_answered_and_the_server_stays_up() {
    let (server, addr) = start(TcpOptions::new()).await;
    let client = good_client(&addr).await;
    let depth = 50_000;
    let json = format!(
        r#"{{"pattern":{}1{},"data":1,"id":"deep"}}"#,
        "[".repeat(depth),
        "]".repeat(depth)
    );
    let mut peer = TcpStream::connect(&addr).await.unwrap();
    peer.write_all(format!("{}#{json}", json.len()).as_bytes())
        .await
        .unwrap();
    let mut reply = vec![0u8; 4096];
    let read = timeout(Duration::from_secs(10), peer.read(&mut reply))
        .await
        .expect("no reply within 10 s")
        .unwrap();
    let reply = String::from_utf8_lossy(&reply[..read]);
    assert!(
        reply.contains("no matching message handler") && reply.contains(r#""id":"deep""#),
        "{reply}"
    );
    still_served(&client).await;
    server.shutdown().await;
}

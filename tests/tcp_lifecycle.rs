//! What a TCP connection holds is released, and peers that hold on to connections are dropped on
//! time. Real sockets on loopback; file descriptors and tasks counted before and after.
#![cfg(feature = "tcp")]

mod support;

use palisade::rpc::transport::tcp::{TcpOptions, TcpServer, TcpTransport};
use palisade::rpc::{Client, Code, Payload, Router, Server, ServerHandle, TransportErrorKind};
use std::time::Duration;
use support::resources::{alive_tasks, open_fds, settles_to};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, sleep, timeout};

async fn serve(options: TcpOptions, router: Router) -> (ServerHandle, String) {
    let server = Server::new(router)
        .serve(
            TcpServer::bind("127.0.0.1:0")
                .await
                .unwrap()
                .options(options),
        )
        .await
        .unwrap();
    let addr = server.local_addr().unwrap().to_string();
    (server, addr)
}

fn echo() -> Router {
    Router::new().message("echo", |Payload(x): Payload<u64>| async move { x })
}

/// Reads until the peer closes the connection; how long that took.
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
            Err(_) => panic!("the connection was not closed within {limit:?}"),
            Ok(Ok(0)) | Ok(Err(_)) => return started.elapsed(),
            Ok(Ok(_)) => {}
        }
    }
}

/// A server that reads one frame's worth of bytes from each connection and then closes it.
async fn hang_up_server() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        loop {
            let (mut socket, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let _ = socket.read(&mut [0u8; 1024]).await;
                drop(socket);
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_connections_release_their_sockets_and_tasks() {
    let addr = hang_up_server().await;
    let client = Client::builder()
        .timeout(Duration::from_secs(5))
        .connect(TcpTransport::new(addr))
        .await
        .unwrap();
    // Warm up (the runtime's own descriptors and tasks), then measure.
    let _ = client.send::<u64>("echo", &0).await;
    sleep(Duration::from_millis(100)).await;
    let (fds, tasks) = (open_fds(), alive_tasks());
    for i in 0..300u64 {
        let error = client.send::<u64>("echo", &i).await.unwrap_err();
        assert_eq!(error.code(), Code::Unavailable, "{error}");
        assert_eq!(
            error.transport_kind(),
            Some(TransportErrorKind::ConnectionLost),
            "{error}"
        );
    }
    assert!(
        settles_to(open_fds, fds + 2).await <= fds + 2,
        "300 lost connections left {} descriptors open (from {fds})",
        open_fds()
    );
    assert!(
        settles_to(alive_tasks, tasks + 2).await <= tasks + 2,
        "300 lost connections left {} tasks alive (from {tasks})",
        alive_tasks()
    );
    drop(client);
    assert!(
        settles_to(open_fds, fds).await <= fds,
        "the dropped client kept a socket"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_client_closes_its_connection_on_both_sides() {
    let (server, addr) = serve(TcpOptions::new(), echo()).await;
    sleep(Duration::from_millis(50)).await;
    let (fds, tasks) = (open_fds(), alive_tasks());
    for round in 0..20u64 {
        let client = Client::builder()
            .connect(TcpTransport::new(addr.as_str()))
            .await
            .unwrap();
        assert_eq!(client.send::<u64>("echo", &round).await.unwrap(), round);
        client.emit("echo", &round).await.unwrap();
        drop(client);
    }
    // Both ends of every connection are gone: the client's socket and the server's.
    assert!(
        settles_to(open_fds, fds).await <= fds,
        "dropped clients left {} descriptors open (from {fds})",
        open_fds()
    );
    assert!(
        settles_to(alive_tasks, tasks).await <= tasks,
        "dropped clients left {} tasks alive (from {tasks})",
        alive_tasks()
    );
    assert_eq!(server.in_flight(), 0);
    server.shutdown().await;
}

/// A client subscribed to a stream that goes quiet (one value, then nothing for good) is dropped:
/// the server stops the stream and closes its side of the connection, rather than hold the
/// handler, its slot and the socket until a value that never comes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_stream_of_a_client_that_went_away_releases_its_handler_and_socket() {
    use futures_util::StreamExt;
    use palisade::rpc::{RpcError, Streaming};
    let router = Router::new().message("watch", || async {
        Streaming(
            futures_util::stream::once(async { Ok::<_, RpcError>(1u32) })
                .chain(futures_util::stream::pending()),
        )
    });
    let (server, addr) = serve(TcpOptions::new(), router).await;
    sleep(Duration::from_millis(50)).await;
    let (fds, tasks) = (open_fds(), alive_tasks());
    for _ in 0..5 {
        let client = Client::builder()
            .no_timeout()
            .connect(TcpTransport::new(addr.as_str()))
            .await
            .unwrap();
        let mut stream = client.send_stream::<u32>("watch", &()).await.unwrap();
        assert_eq!(stream.next().await.unwrap().unwrap(), 1);
        drop(stream);
        drop(client);
    }
    assert!(
        settles_to(open_fds, fds).await <= fds,
        "clients gone from quiet streams left {} descriptors open (from {fds})",
        open_fds()
    );
    assert!(
        settles_to(alive_tasks, tasks).await <= tasks,
        "clients gone from quiet streams left {} tasks alive (from {tasks})",
        alive_tasks()
    );
    assert_eq!(server.in_flight(), 0);
    let report = server.shutdown().await;
    assert_eq!(report.cancelled, 0);
}

/// A peer that closes its side right after a streamed request (a one-shot client) gets what the
/// stream produced by then and an error saying why it stopped, then the connection closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_closes_its_side_gets_the_stream_so_far_and_why_it_stopped() {
    use futures_util::StreamExt;
    use palisade::rpc::{RpcError, Streaming};
    let router = Router::new().message("ticks", || async {
        Streaming(futures_util::stream::iter(0u32..3).then(|n| async move {
            if n > 0 {
                sleep(Duration::from_millis(30)).await;
            }
            Ok::<_, RpcError>(n)
        }))
    });
    let (server, addr) = serve(TcpOptions::new(), router).await;
    let mut socket = TcpStream::connect(&addr).await.unwrap();
    let request = r#"{"pattern":"ticks","data":null,"id":"1"}"#;
    socket
        .write_all(format!("{}#{request}", request.len()).as_bytes())
        .await
        .unwrap();
    socket.shutdown().await.unwrap();
    let mut received = String::new();
    timeout(Duration::from_secs(5), socket.read_to_string(&mut received))
        .await
        .expect("the connection stays open")
        .unwrap();
    assert!(received.contains(r#""response":0"#), "{received}");
    assert!(received.contains("closed its side"), "{received}");
    assert!(received.contains(r#""isDisposed":true"#), "{received}");
    server.shutdown().await;
}

/// A peer that breaks the protocol is disconnected: a quiet stream it had asked for stops with
/// the connection, rather than hold its handler until a next value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_stream_stops_when_its_connection_is_closed_for_bad_data() {
    use futures_util::StreamExt;
    use palisade::rpc::{RpcError, Streaming};
    let router = Router::new().message("watch", || async {
        Streaming(
            futures_util::stream::once(async { Ok::<_, RpcError>(1u32) })
                .chain(futures_util::stream::pending()),
        )
    });
    let (server, addr) = serve(TcpOptions::new(), router).await;
    let mut socket = TcpStream::connect(&addr).await.unwrap();
    let request = r#"{"pattern":"watch","data":null,"id":"1"}"#;
    socket
        .write_all(format!("{}#{request}", request.len()).as_bytes())
        .await
        .unwrap();
    let mut first = [0u8; 256];
    let read = socket.read(&mut first).await.unwrap();
    assert!(
        String::from_utf8_lossy(&first[..read]).contains(r#""response":1"#),
        "{}",
        String::from_utf8_lossy(&first[..read])
    );
    assert_eq!(server.in_flight(), 1);
    socket.write_all(b"not a frame#").await.unwrap();
    closed_within(&mut socket, Duration::from_secs(5)).await;
    let stopped = Instant::now();
    while server.in_flight() > 0 {
        assert!(
            stopped.elapsed() < Duration::from_secs(5),
            "the stream outlived its connection"
        );
        sleep(Duration::from_millis(10)).await;
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_emitted_just_before_the_client_is_dropped_is_delivered() {
    let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
    let router = Router::new().event("tick", move |Payload(n): Payload<u64>| {
        let seen = seen_tx.clone();
        async move { seen.send(n).unwrap() }
    });
    let (server, addr) = serve(TcpOptions::new(), router).await;
    let client = Client::builder()
        .connect(TcpTransport::new(addr))
        .await
        .unwrap();
    for n in 0..100u64 {
        client.emit("tick", &n).await.unwrap();
    }
    drop(client);
    for n in 0..100u64 {
        let got = timeout(Duration::from_secs(5), seen.recv()).await.unwrap();
        assert_eq!(got, Some(n));
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_peers_are_dropped_when_their_frame_is_late_however_they_trickle() {
    let options = TcpOptions::new().frame_timeout(Duration::from_millis(400));
    let (server, addr) = serve(options, echo()).await;
    let good = Client::builder()
        .timeout(Duration::from_secs(5))
        .connect(TcpTransport::new(addr.as_str()))
        .await
        .unwrap();
    // Each peer declares a 1000-unit frame and sends one byte every 50 ms: every read is
    // prompt, but the frame would take 50 s.
    let peers: Vec<_> = (0..50)
        .map(|_| {
            let addr = addr.clone();
            tokio::spawn(async move {
                let mut socket = TcpStream::connect(addr).await.unwrap();
                socket.write_all(b"1000#{").await.unwrap();
                let started = Instant::now();
                let mut buffer = [0u8; 1024];
                loop {
                    tokio::select! {
                        read = socket.read(&mut buffer) => match read {
                            Ok(0) | Err(_) => return started.elapsed(),
                            Ok(_) => {}
                        },
                        _ = sleep(Duration::from_millis(50)) => {
                            if socket.write_all(b" ").await.is_err() {
                                return started.elapsed();
                            }
                        }
                    }
                    assert!(
                        started.elapsed() < Duration::from_secs(5),
                        "a trickling peer was never dropped"
                    );
                }
            })
        })
        .collect();
    for peer in peers {
        let held = peer.await.unwrap();
        assert!(
            held >= Duration::from_millis(300),
            "dropped too early: {held:?}"
        );
        assert!(
            held < Duration::from_secs(2),
            "held the connection for {held:?}"
        );
    }
    assert_eq!(good.send::<u64>("echo", &5).await.unwrap(), 5);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_but_not_while_a_request_is_in_flight() {
    let options = TcpOptions::new().idle_timeout(Some(Duration::from_millis(300)));
    let router = echo().message("slow", || async {
        sleep(Duration::from_millis(900)).await;
        "done"
    });
    let (server, addr) = serve(options, router).await;
    let mut idle = TcpStream::connect(&addr).await.unwrap();
    let took = closed_within(&mut idle, Duration::from_secs(3)).await;
    assert!(
        took >= Duration::from_millis(250),
        "closed too early: {took:?}"
    );

    // A connection waiting for a slow reply is not idle.
    let client = Client::builder()
        .timeout(Duration::from_secs(5))
        .connect(TcpTransport::new(addr.as_str()))
        .await
        .unwrap();
    assert_eq!(client.send::<String>("slow", &()).await.unwrap(), "done");
    // After an idle close, the client reconnects on its next request.
    sleep(Duration::from_millis(700)).await;
    assert_eq!(client.send::<u64>("echo", &9).await.unwrap(), 9);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_wait_for_the_memory_budget_and_one_over_it_is_refused_with_a_reason() {
    let options = TcpOptions::new()
        .max_buffered_bytes(100_000)
        .frame_timeout(Duration::from_millis(600));
    let router = echo().message(
        "len",
        |Payload(text): Payload<String>| async move { text.len() },
    );
    let (server, addr) = serve(options, router).await;

    // A peer that declares a large frame and stalls holds most of the budget...
    let mut hog = TcpStream::connect(&addr).await.unwrap();
    hog.write_all(b"80000#{\"pattern\":\"len\",").await.unwrap();
    sleep(Duration::from_millis(100)).await;
    // ...so another large frame waits for it (its peer is not read meanwhile)...
    let client = Client::builder()
        .timeout(Duration::from_secs(5))
        .connect(TcpTransport::new(addr.as_str()))
        .await
        .unwrap();
    let started = Instant::now();
    let big = "z".repeat(60_000);
    assert_eq!(client.send::<usize>("len", &big).await.unwrap(), 60_000);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(300),
        "the frame did not wait for the budget ({waited:?})"
    );
    // ...until the staller is dropped at its frame deadline.
    closed_within(&mut hog, Duration::from_secs(2)).await;

    // A frame larger than the whole budget is refused, and the peer told why.
    let error = client
        .send::<usize>("len", &"q".repeat(150_000))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument, "{error}");
    assert!(error.message().contains("memory budget"), "{error}");
    assert_eq!(client.send::<u64>("echo", &1).await.unwrap(), 1);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_over_the_servers_limit_is_explained_to_the_client() {
    let (server, addr) = serve(TcpOptions::new().max_frame_len(1000), echo()).await;
    // The client allows larger frames than the server does.
    let client = Client::builder()
        .timeout(Duration::from_secs(5))
        .connect(TcpTransport::new(addr.as_str()))
        .await
        .unwrap();
    let error = client
        .send::<String>("echo", &"w".repeat(5000))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument, "{error}");
    assert!(
        error
            .message()
            .contains("exceeds the maximum allowed length (1000)"),
        "{error}"
    );
    // The connection was closed; the client reconnects.
    assert_eq!(client.send::<u64>("echo", &3).await.unwrap(), 3);

    // Sending a frame over the client's own limit fails before anything is sent.
    let small = Client::builder()
        .connect(TcpTransport::with_options(
            addr.as_str(),
            TcpOptions::new().max_frame_len(100),
        ))
        .await
        .unwrap();
    let error = small
        .send::<String>("echo", &"w".repeat(200))
        .await
        .unwrap_err();
    assert_eq!(
        error.transport_kind(),
        Some(TransportErrorKind::PayloadTooLarge)
    );
    assert_eq!(small.send::<u64>("echo", &4).await.unwrap(), 4);
    server.shutdown().await;
}

/// A fast request sent right after a slow one on the same connection, with `server` serving:
/// how long the fast one took.
async fn fast_behind_slow(server: Server) -> Duration {
    let server = server
        .serve(TcpServer::bind("127.0.0.1:0").await.unwrap())
        .await
        .unwrap();
    let client = Client::builder()
        .timeout(Duration::from_secs(5))
        .connect(TcpTransport::new(server.local_addr().unwrap()))
        .await
        .unwrap();
    assert_eq!(client.send::<u64>("echo", &1).await.unwrap(), 1);
    let slow = {
        let client = client.clone();
        tokio::spawn(async move { client.send::<String>("compute", &()).await })
    };
    sleep(Duration::from_millis(50)).await;
    let started = Instant::now();
    assert_eq!(client.send::<u64>("echo", &2).await.unwrap(), 2);
    let fast = started.elapsed();
    assert_eq!(slow.await.unwrap().unwrap(), "computed");
    server.shutdown().await;
    fast
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_spawned_handlers_one_busy_before_its_first_await_does_not_hold_up_the_next_frame() {
    let router = echo().message("compute", || async {
        // CPU work (a blocking sleep stands in for it) before the first `.await`.
        std::thread::sleep(Duration::from_millis(600));
        "computed"
    });
    let fast = fast_behind_slow(Server::new(router).spawn_handlers(true)).await;
    assert!(
        fast < Duration::from_millis(300),
        "a fast request on the same connection waited {fast:?} behind a busy handler"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_that_moves_its_work_to_spawn_blocking_does_not_hold_up_the_next_frame() {
    let router = echo().message("compute", || async {
        tokio::task::spawn_blocking(|| std::thread::sleep(Duration::from_millis(600)))
            .await
            .unwrap();
        "computed"
    });
    let fast = fast_behind_slow(Server::new(router)).await;
    assert!(
        fast < Duration::from_millis(300),
        "a fast request on the same connection waited {fast:?} behind a busy handler"
    );
}

/// The documented price of the default: a handler that blocks before its first `.await` holds
/// up its own connection, while other connections carry on on tokio's other worker. "Normally":
/// a task the blocked worker woke last sits in that worker's LIFO slot, which tokio never lets
/// another worker steal, and can wait with it (tokio's `Builder::disable_lifo_slot` docs). So
/// the other connection must get through in at least one of three tries (a server that read
/// every connection in one task would fail all three), and the busy handler's own connection
/// must wait in every try.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn by_default_a_handler_blocking_before_its_first_await_holds_up_only_its_connection() {
    let mut waits = Vec::new();
    for _ in 0..3 {
        let (other_waited, same_answered) = one_busy_handler_and_two_connections().await;
        assert!(
            same_answered >= Duration::from_millis(300),
            "the busy handler's own connection was not held up (answered after \
             {same_answered:?}): the documented trade-off changed"
        );
        waits.push(other_waited);
        if other_waited < Duration::from_millis(300) {
            return;
        }
    }
    panic!("another connection waited behind the busy handler in every try: {waits:?}");
}

/// While a handler blocks before its first `.await`: how long a request on another connection
/// waited, and how long after the handler started a request on its own connection (sent next)
/// was answered.
async fn one_busy_handler_and_two_connections() -> (Duration, Duration) {
    let router = echo().message("compute", || async {
        std::thread::sleep(Duration::from_millis(600));
        "computed"
    });
    let server = Server::new(router)
        .serve(TcpServer::bind("127.0.0.1:0").await.unwrap())
        .await
        .unwrap();
    let addr = server.local_addr().unwrap();
    let connect = || async move {
        Client::builder()
            .timeout(Duration::from_secs(5))
            .connect(TcpTransport::new(addr))
            .await
            .unwrap()
    };
    let (same, other) = (connect().await, connect().await);
    assert_eq!(same.send::<u64>("echo", &1).await.unwrap(), 1);
    assert_eq!(other.send::<u64>("echo", &1).await.unwrap(), 1);
    let slow = {
        let same = same.clone();
        tokio::spawn(async move { same.send::<String>("compute", &()).await })
    };
    // The busy handler is running.
    while server.in_flight() == 0 {
        tokio::task::yield_now().await;
    }
    let busy_since = Instant::now();
    assert_eq!(other.send::<u64>("echo", &2).await.unwrap(), 2);
    let other_waited = busy_since.elapsed();
    assert_eq!(same.send::<u64>("echo", &3).await.unwrap(), 3);
    let same_answered = busy_since.elapsed();
    assert_eq!(slow.await.unwrap().unwrap(), "computed");
    server.shutdown().await;
    (other_waited, same_answered)
}

/// A handler that has produced its whole reply is not stopped by its caller's deadline while the
/// reply waits for a peer that does not read: there is nothing left to stop, and the reply goes
/// out once the peer reads again (an error in its place would throw away a finished answer).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_reply_waiting_on_a_peer_that_does_not_read_outlives_the_deadline() {
    const SIZE: usize = 1 << 20;
    const REQUESTS: usize = 24;
    let router = Router::new().message(
        "big",
        |Payload(n): Payload<usize>| async move { "x".repeat(n) },
    );
    let (server, addr) = serve(TcpOptions::new(), router).await;
    let mut socket = TcpStream::connect(&addr).await.unwrap();
    // 24 MiB of replies: more than both sockets' buffers and the connection's queue hold, so the
    // last replies wait on the peer well past their 300 ms deadline.
    for id in 0..REQUESTS {
        let packet = format!(
            r#"{{"pattern":"big","data":{SIZE},"id":"{id}","headers":{{"palisade-timeout-ms":"300"}}}}"#
        );
        socket
            .write_all(format!("{}#{packet}", packet.len()).as_bytes())
            .await
            .unwrap();
    }
    sleep(Duration::from_secs(1)).await;
    let mut buffer = Vec::new();
    let mut replies = Vec::new();
    while replies.len() < REQUESTS {
        let mut chunk = vec![0u8; 256 * 1024];
        let read = timeout(Duration::from_secs(20), socket.read(&mut chunk))
            .await
            .expect("every reply arrives")
            .unwrap();
        assert!(
            read > 0,
            "the server closed after {} replies",
            replies.len()
        );
        buffer.extend_from_slice(&chunk[..read]);
        // Frames are `<length>#<JSON>`; these are ASCII, so the length counts bytes.
        while let Some(hash) = buffer.iter().position(|&b| b == b'#') {
            let length: usize = std::str::from_utf8(&buffer[..hash])
                .unwrap()
                .parse()
                .unwrap();
            if buffer.len() < hash + 1 + length {
                break;
            }
            let frame: serde_json::Value =
                serde_json::from_slice(&buffer[hash + 1..hash + 1 + length]).unwrap();
            buffer.drain(..hash + 1 + length);
            replies.push(frame);
        }
    }
    for reply in &replies {
        assert!(
            reply["err"].is_null(),
            "a reply was replaced: {}",
            reply["err"]
        );
        assert_eq!(reply["response"].as_str().map(str::len), Some(SIZE));
    }
    server.shutdown().await;
}

/// `Duration::MAX` in every timeout means "never": the deadline of a frame saturates instead of
/// overflowing the clock (which panicked the connection's reader: the server dropped every
/// connection at its first frame, and the client's requests waited out their timeouts).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_of_duration_max_mean_never() {
    let never = || {
        TcpOptions::new()
            .frame_timeout(Duration::MAX)
            .write_timeout(Duration::MAX)
            .idle_timeout(Some(Duration::MAX))
    };
    let (server, addr) = serve(
        never(),
        Router::new().message(
            "len",
            |Payload(text): Payload<String>| async move { text.len() },
        ),
    )
    .await;
    let client = Client::builder()
        .timeout(Duration::from_secs(10))
        .connect(TcpTransport::with_options(addr.as_str(), never()))
        .await
        .unwrap();
    // Large frames, many at once: they arrive in pieces, each piece starting a frame's clock.
    let calls: Vec<_> = (0..20)
        .map(|n| {
            let client = client.clone();
            tokio::spawn(async move {
                let text = "x".repeat(200_000 + n);
                client.send::<usize>("len", &text).await
            })
        })
        .collect();
    for (n, call) in calls.into_iter().enumerate() {
        assert_eq!(call.await.unwrap().unwrap(), 200_000 + n);
    }
    server.shutdown().await;
}

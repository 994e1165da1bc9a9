//! Broker faults against a private `rabbitmq-server` (free loopback ports, its own data), shared
//! by the tests of this file one at a time — they kill and restart it: in-flight requests fail at
//! once, clients and servers reconnect and consume again, persistent events survive a restart,
//! and messages over the broker's size limit are errors, with every resource released.
#![cfg(feature = "rabbitmq")]

mod support;

use palisade::rpc::transport::ServerTransport;
use palisade::rpc::transport::rabbitmq::{RmqOptions, RmqServer};
use palisade::rpc::{Client, Code, Payload, Router, Server, TransportErrorKind};
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use support::rabbitmq::{Broker, unique};
use support::resources::{alive_tasks, open_fds, settles_to, threads};
use tokio::time::{Instant, sleep};

/// The broker's `max_message_size`.
const BROKER_LIMIT: usize = 1024 * 1024;

/// One private broker for this file's tests, taken one test at a time; stopped when the last
/// test using it is done.
struct Shared {
    broker: tokio::sync::Mutex<Broker>,
}

fn shared_broker() -> Arc<Shared> {
    static SLOT: Mutex<Weak<Shared>> = Mutex::new(Weak::new());
    let mut slot = SLOT.lock().unwrap();
    if let Some(shared) = slot.upgrade() {
        return shared;
    }
    let broker = tokio::task::block_in_place(|| {
        Broker::start(&[&format!("max_message_size = {BROKER_LIMIT}")])
    });
    let shared = Arc::new(Shared {
        broker: tokio::sync::Mutex::new(broker),
    });
    *slot = Arc::downgrade(&shared);
    shared
}

fn options(broker: &Broker, queue: &str) -> RmqOptions {
    RmqOptions::new([broker.url()])
        .queue(queue)
        .reconnect_backoff(Duration::from_millis(100), Duration::from_millis(1000))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_killed_and_restarted_fails_requests_in_flight_at_once_and_everything_recovers() {
    let shared = shared_broker();
    let mut broker = shared.broker.lock().await;
    let queue = unique("restart");
    // Warm up: lapin's runtime layer (async-rs over async-compat) starts one process-wide
    // fallback runtime, once, on the first connection.
    drop(
        Client::builder()
            .connect(options(&broker, &queue))
            .await
            .unwrap(),
    );
    sleep(Duration::from_millis(300)).await;
    let (fds, tasks, threads_before) = (open_fds(), alive_tasks(), threads());
    {
        let stored: Arc<Mutex<BTreeSet<u32>>> = Arc::default();
        let router = |stored: &Arc<Mutex<BTreeSet<u32>>>| {
            let stored = Arc::clone(stored);
            Router::new()
                .message("slow", || async {
                    sleep(Duration::from_secs(60)).await;
                    "never"
                })
                .message("echo", |Payload(v): Payload<u64>| async move { v })
                .event("stored", move |Payload(n): Payload<u32>| {
                    let stored = Arc::clone(&stored);
                    async move {
                        stored.lock().unwrap().insert(n);
                    }
                })
        };
        let server = RmqServer::new(options(&broker, &queue))
            .serve(Server::new(router(&stored)).grace_period(Duration::from_millis(100)))
            .await
            .unwrap();
        let client = Client::builder()
            .timeout(Duration::from_secs(30))
            .connect(options(&broker, &queue))
            .await
            .unwrap();
        assert_eq!(client.send::<u64>("echo", &1).await.unwrap(), 1);
        let in_flight: Vec<_> = (0..5)
            .map(|_| {
                let client = client.clone();
                tokio::spawn(async move { client.send::<String>("slow", &()).await })
            })
            .collect();
        sleep(Duration::from_millis(300)).await;
        tokio::task::block_in_place(|| broker.kill());
        let killed = Instant::now();
        for call in in_flight {
            let error = tokio::time::timeout(Duration::from_secs(5), call)
                .await
                .expect("a request in flight hung when the broker died")
                .unwrap()
                .unwrap_err();
            assert_eq!(error.code(), Code::Unavailable, "{error}");
            assert_eq!(
                error.transport_kind(),
                Some(TransportErrorKind::ConnectionLost),
                "{error}"
            );
        }
        assert!(
            killed.elapsed() < Duration::from_secs(3),
            "{:?}",
            killed.elapsed()
        );
        // While it is down, calls fail fast.
        let started = Instant::now();
        let down = client.send::<u64>("echo", &2).await.unwrap_err();
        assert_eq!(down.code(), Code::Unavailable, "{down}");
        assert_eq!(
            down.transport_kind(),
            Some(TransportErrorKind::NotConnected),
            "{down}"
        );
        assert!(client.emit("stored", &0).await.is_err());
        assert!(started.elapsed() < Duration::from_secs(1));

        tokio::task::block_in_place(|| broker.restart());
        // The client reconnects, the server consumes again.
        support::until_echo_answers(&client, Duration::from_secs(30), Duration::from_millis(100))
            .await;
        // Persistent events in a durable queue survive a restart of the broker.
        server.shutdown().await;
        for n in 0..20u32 {
            client.emit("stored", &n).await.unwrap();
        }
        tokio::task::block_in_place(|| broker.restart());
        let server = RmqServer::new(options(&broker, &queue))
            .serve(Server::new(router(&stored)))
            .await
            .unwrap();
        let started = Instant::now();
        while stored.lock().unwrap().len() < 20 {
            assert!(
                started.elapsed() < Duration::from_secs(15),
                "events lost in the restart: {:?}",
                stored.lock().unwrap()
            );
            sleep(Duration::from_millis(20)).await;
        }
        server.shutdown().await;
        drop(client);
    }
    let fds_after = settles_to(open_fds, fds).await;
    if fds_after > fds {
        for entry in std::fs::read_dir("/proc/self/fd").unwrap() {
            let path = entry.unwrap().path();
            eprintln!("{} -> {:?}", path.display(), std::fs::read_link(&path));
        }
        for entry in std::fs::read_dir("/proc/self/task").unwrap() {
            let path = entry.unwrap().path();
            eprintln!("thread {:?}", std::fs::read_to_string(path.join("comm")));
        }
    }
    assert!(
        fds_after <= fds,
        "file descriptors leaked: {fds} before, {fds_after} after"
    );
    let tasks_after = settles_to(alive_tasks, tasks).await;
    assert!(
        tasks_after <= tasks,
        "tasks leaked: {tasks} before, {tasks_after} after"
    );
    assert!(
        settles_to(threads, threads_before).await <= threads_before,
        "threads leaked"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_over_the_brokers_limit_is_an_error_and_the_channel_recovers() {
    let shared = shared_broker();
    let broker = shared.broker.lock().await;
    let queue = unique("limit");
    let router = Router::new()
        .message("echo", |Payload(v): Payload<String>| async move { v.len() })
        .message(
            "big",
            |Payload(n): Payload<usize>| async move { "x".repeat(n) },
        );
    let server = RmqServer::new(options(&broker, &queue))
        .serve(Server::new(router))
        .await
        .unwrap();
    // palisade's own limit (16 MiB by default) is above the broker's: the broker refuses.
    let client = Client::builder()
        .timeout(Duration::from_secs(10))
        .connect(options(&broker, &queue))
        .await
        .unwrap();
    let big = "y".repeat(2 * BROKER_LIMIT);
    let error = client.send::<usize>("echo", &big).await.unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument, "{error}");
    assert_eq!(
        error.transport_kind(),
        Some(TransportErrorKind::PayloadTooLarge)
    );
    assert!(
        error.message().contains("larger than configured max size"),
        "{error}"
    );
    let error = client.emit("echo", &big).await;
    // The channel the broker closed is reopened; the emit meets it closed or refused.
    if let Err(error) = error {
        assert!(
            matches!(error.code(), Code::InvalidArgument | Code::Unavailable),
            "{error}"
        );
    }
    support::until_echo_answers_len(&client).await;
    // A reply over the broker's limit reaches the caller as an error saying so.
    let error = client
        .send::<String>("big", &(2 * BROKER_LIMIT))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument, "{error}");
    assert!(
        error.message().contains(&BROKER_LIMIT.to_string()),
        "{error}"
    );
    assert_eq!(client.send::<usize>("echo", &"ok").await.unwrap(), 2);

    // Told the broker's limit, the client refuses before sending: the channel stays up.
    let careful = Client::builder()
        .connect(options(&broker, &queue).max_message_size(BROKER_LIMIT))
        .await
        .unwrap();
    let refused = careful.send::<usize>("echo", &big).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(refused.message().contains("it was not sent"), "{refused}");
    assert_eq!(careful.send::<usize>("echo", &"fine").await.unwrap(), 4);
    server.shutdown().await;
}

/// A message the broker refuses for its size closes the channel, and every other message in
/// flight on it fails with the same error; only the refused one is "too large". The others used
/// to be told they were too large too (`InvalidArgument`, never retried: 59 of 100 small requests
/// beside one big one), and a stream beside a refused reply broke off with another reply's
/// "too large". Now a small request is at worst `Unavailable` (worth retrying), a reply is sent
/// again on a fresh channel, and both sides learn the broker's limit from the refusal, so a
/// second big message is refused before it closes anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_refused_for_its_size_fails_only_itself() {
    use futures_util::StreamExt;
    use palisade::rpc::{RpcError, Streaming};
    let shared = shared_broker();
    let broker = shared.broker.lock().await;
    let queue = unique("refused-alone");
    let router = Router::new()
        .message("echo", |Payload(v): Payload<String>| async move { v.len() })
        .message("big", |Payload(n): Payload<usize>| async move {
            sleep(Duration::from_millis(150)).await;
            "x".repeat(n)
        })
        .message("count", |Payload(n): Payload<u32>| async move {
            Streaming(futures_util::stream::iter(1..=n).then(|i| async move {
                sleep(Duration::from_millis(5)).await;
                Ok::<_, RpcError>(i)
            }))
        });
    let server = RmqServer::new(options(&broker, &queue))
        .serve(Server::new(router))
        .await
        .unwrap();
    let client = Client::builder()
        .timeout(Duration::from_secs(15))
        .connect(options(&broker, &queue))
        .await
        .unwrap();
    assert_eq!(client.send::<usize>("echo", &"abc").await.unwrap(), 3);

    // The server's side: a stream goes on whole beside a reply the broker refuses.
    let stream = tokio::spawn({
        let client = client.clone();
        async move {
            let values = client.send_stream::<u32>("count", &100).await?;
            Ok::<_, RpcError>(values.collect::<Vec<_>>().await)
        }
    });
    let error = client
        .send::<String>("big", &(8 * BROKER_LIMIT))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument, "{error}");
    let values: Vec<u32> = stream
        .await
        .unwrap()
        .unwrap()
        .into_iter()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(values, (1..=100).collect::<Vec<_>>());
    // Learned: the next big reply is refused by the server itself, and says the broker's limit.
    let error = client
        .send::<String>("big", &(2 * BROKER_LIMIT))
        .await
        .unwrap_err();
    assert!(
        error.message().contains(&BROKER_LIMIT.to_string()),
        "{error}"
    );

    // The client's side: small requests beside a big one are never "too large".
    let big = "y".repeat(4 * BROKER_LIMIT);
    let smalls = |count: u32| {
        futures_util::future::join_all((0..count).map(|n| {
            let client = client.clone();
            async move {
                sleep(Duration::from_micros(100 * u64::from(n))).await;
                client.send::<usize>("echo", &"small").await
            }
        }))
    };
    let (refused, beside) = tokio::join!(client.send::<usize>("echo", &big), smalls(100));
    let refused = refused.unwrap_err();
    assert_eq!(
        refused.transport_kind(),
        Some(TransportErrorKind::PayloadTooLarge),
        "{refused}"
    );
    for outcome in &beside {
        if let Err(error) = outcome {
            assert_eq!(error.code(), Code::Unavailable, "{error}");
        }
    }
    // Learned: a second big request is refused before it is sent, and closes nothing.
    support::until_echo_answers_len(&client).await;
    let (refused, beside) = tokio::join!(client.send::<usize>("echo", &big), smalls(100));
    let refused = refused.unwrap_err();
    assert!(refused.message().contains("it was not sent"), "{refused}");
    assert!(
        refused.message().contains(&BROKER_LIMIT.to_string()),
        "{refused}"
    );
    for outcome in beside {
        assert_eq!(outcome.unwrap(), 5);
    }
    server.shutdown().await;
}

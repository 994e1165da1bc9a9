//! Kafka faults, each against its own Tansu broker: a graceful restart that must not run work
//! twice, a broker that stops answering, a stream ending in `null`, topics a client sends to,
//! a pending send dropped outside its runtime, and settings past librdkafka's ranges.
#![cfg(feature = "kafka")]

mod support;

use futures_util::StreamExt as _;
use palisade::rpc::transport::ServerTransport;
use palisade::rpc::transport::kafka::{KafkaOptions, KafkaRecord, KafkaServer, KafkaTransport};
use palisade::rpc::{
    Client, Code, Payload, Router, Server, ServerHandle, Streaming, TransportErrorKind,
};
use serde_json::{Value, json};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::kafka::{Broker, options};

async fn serve(options: KafkaOptions, router: Router) -> ServerHandle {
    KafkaServer::new(options)
        .serve(Server::new(router))
        .await
        .unwrap()
}

async fn client(options: KafkaOptions, reply_to: &[&str]) -> Client {
    Client::builder()
        .timeout(Duration::from_secs(30))
        .connect(KafkaTransport::new(options).reply_to(reply_to.iter().copied()))
        .await
        .unwrap()
}

/// Waits until `done`, or fails after `within`.
async fn eventually(within: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Events queued at a graceful shutdown are handled by the next server of the group, and the
/// one finished during the grace period is not handled again: its offset is committed as the
/// consumer closes. (Once, the loop that stopped consuming marked every partition as moved
/// away, and nothing finished after it was committed.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_restart_handles_every_event_once() {
    let broker = Broker::start();
    let options = options(&broker).partitions(1);
    let seen = Arc::new(Mutex::new(Vec::<u64>::new()));
    let router = |delay: Duration| {
        let seen = Arc::clone(&seen);
        Router::new().event("queued", move |Payload(n): Payload<u64>| {
            let seen = Arc::clone(&seen);
            async move {
                tokio::time::sleep(delay).await;
                seen.lock().unwrap().push(n);
            }
        })
    };
    let first = serve(options.clone(), router(Duration::from_millis(700))).await;
    let emitter = client(options.clone(), &[]).await;
    for n in 0..6u64 {
        emitter
            .emit("queued", &KafkaRecord::new(n).partition(0))
            .await
            .unwrap();
    }
    // The first event is done, the second in hand: it finishes during the grace period.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    first.shutdown().await;
    let by_first = seen.lock().unwrap().clone();
    assert!(by_first.len() >= 2, "{by_first:?}");
    let second = serve(options, router(Duration::ZERO)).await;
    eventually(Duration::from_secs(15), "every event handled", || {
        let mut all = seen.lock().unwrap().clone();
        all.sort_unstable();
        all.dedup();
        all == (0..6).collect::<Vec<_>>()
    })
    .await;
    // Time for anything handled twice to come again.
    tokio::time::sleep(Duration::from_secs(1)).await;
    second.shutdown().await;
    let mut all = seen.lock().unwrap().clone();
    all.sort_unstable();
    assert_eq!(
        all,
        (0..6).collect::<Vec<_>>(),
        "first server: {by_first:?}"
    );
}

/// The same for a request answered during the grace period: the next server of the group does
/// not run its handler again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_answered_during_a_graceful_shutdown_is_not_run_again_after_it() {
    let broker = Broker::start();
    let options = options(&broker).partitions(1);
    let runs = Arc::new(AtomicU32::new(0));
    let router = || {
        let runs = Arc::clone(&runs);
        Router::new().message("charge", move |Payload(n): Payload<u64>| {
            runs.fetch_add(1, Ordering::SeqCst);
            async move {
                tokio::time::sleep(Duration::from_millis(800)).await;
                n
            }
        })
    };
    let first = serve(options.clone(), router()).await;
    let client = client(options.clone(), &["charge"]).await;
    let call = {
        let client = client.clone();
        tokio::spawn(async move { client.send::<u64>("charge", &7).await })
    };
    eventually(Duration::from_secs(10), "the handler started", || {
        runs.load(Ordering::SeqCst) == 1
    })
    .await;
    first.shutdown().await;
    assert_eq!(
        call.await.unwrap().unwrap(),
        7,
        "answered in the grace period"
    );
    let second = serve(options, router()).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    second.shutdown().await;
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the handler ran again");
}

/// A broker that stops answering: `emit` fails within the delivery timeout (it was sent once
/// more on a fresh producer, taking twice as long), and is not sent again — a broker that was
/// only slow stores it once, not twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_emit_the_broker_does_not_acknowledge_fails_in_time_and_is_stored_once() {
    let broker = Broker::start();
    let options = options(&broker)
        .partitions(1)
        .delivery_timeout(Duration::from_secs(3));
    let emitter = client(options.clone(), &[]).await;
    emitter.emit("slow", &json!({"n": 0})).await.unwrap();
    broker.pause();
    let resumed = broker.resume_after(Duration::from_secs(4));
    let started = Instant::now();
    let error = emitter.emit("slow", &json!({"n": 1})).await.unwrap_err();
    let took = started.elapsed();
    assert_eq!(error.code(), Code::Unavailable, "{error}");
    assert_eq!(
        error.transport_kind(),
        Some(TransportErrorKind::NotAcknowledged),
        "{error}"
    );
    // librdkafka looks for timed-out records once a second; sent once more, it took 7 s.
    assert!(took < Duration::from_secs(5), "failed after {took:?}");
    resumed.join().unwrap();
    // The producer after it is a fresh one, and works.
    emitter.emit("slow", &json!({"n": 2})).await.unwrap();
    let seen = Arc::new(Mutex::new(Vec::<Value>::new()));
    let router = {
        let seen = Arc::clone(&seen);
        Router::new().event("slow", move |Payload(v): Payload<Value>| {
            let seen = Arc::clone(&seen);
            async move { seen.lock().unwrap().push(v) }
        })
    };
    let reader = serve(options.from_beginning(true), router).await;
    eventually(Duration::from_secs(15), "the last event read", || {
        seen.lock().unwrap().contains(&json!({"n": 2}))
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    reader.shutdown().await;
    let seen = seen.lock().unwrap().clone();
    let copies = seen.iter().filter(|v| **v == json!({"n": 1})).count();
    assert!(
        copies <= 1,
        "the unacknowledged emit was stored {copies} times: {seen:?}"
    );
}

/// A stream whose last value is `null`, and a stream of one `null`: the last value is a record
/// without a value, which the completion record is too. A palisade client keeps the `null`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_last_value_of_null_is_a_value_not_the_end() {
    let broker = Broker::start();
    let options = options(&broker);
    let router = Router::new()
        .message("ending-in-null", |Payload(n): Payload<u32>| async move {
            Streaming::iter((1..=n).map(Some).chain([None]))
        })
        .message("only-null", || async { Streaming::iter([None::<u32>]) })
        .message("null", || async { None::<u32> });
    let server = serve(options.clone(), router).await;
    let client = client(options, &["ending-in-null", "only-null", "null"]).await;
    let collect = |pattern: &'static str| {
        let client = client.clone();
        async move {
            client
                .send_stream::<Option<u32>>(pattern, &2)
                .await
                .unwrap()
                .map(Result::unwrap)
                .collect::<Vec<_>>()
                .await
        }
    };
    assert_eq!(collect("ending-in-null").await, [Some(1), Some(2), None]);
    assert_eq!(collect("only-null").await, [None]);
    assert_eq!(collect("null").await, [None]);
    assert_eq!(
        client
            .send::<Option<u32>>("ending-in-null", &2)
            .await
            .unwrap(),
        None
    );
    server.shutdown().await;
}

/// The partitions of `topic`, as the broker's metadata says.
fn partitions_of(bootstrap: &str, topic: &str) -> usize {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("allow.auto.create.topics", "false")
        .create()
        .unwrap();
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap();
    metadata.topics()[0].partitions().len()
}

/// A client creates the topics it sends to, as a server creates its own, with the options'
/// partitions (it left them to the broker's auto-creation, with the broker's partitions).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_creates_the_topics_it_sends_to_with_the_options_partitions() {
    let broker = Broker::start();
    let client = client(options(&broker).partitions(1), &[]).await;
    client.emit("made-by-the-client", &json!(1)).await.unwrap();
    client.emit("made-by-the-client", &json!(2)).await.unwrap();
    let bootstrap = broker.bootstrap();
    let partitions =
        tokio::task::spawn_blocking(move || partitions_of(&bootstrap, "made-by-the-client"))
            .await
            .unwrap();
    assert_eq!(partitions, 1);
}

/// A send still waiting for the broker's acknowledgement, dropped outside any runtime (kept
/// past its runtime, or polled by another executor): the drop must not panic.
#[test]
fn a_pending_emit_dropped_outside_the_runtime_does_not_panic() {
    let broker = Broker::start();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let options = options(&broker).delivery_timeout(Duration::from_secs(5));
    let client = runtime.block_on(client(options, &[]));
    runtime.block_on(client.emit("dropped", &1)).unwrap();
    broker.pause();
    let payload = json!(2);
    let mut pending = Box::pin(client.emit("dropped", &payload));
    runtime.block_on(async {
        let waited = tokio::time::timeout(Duration::from_millis(500), &mut pending).await;
        assert!(waited.is_err(), "the emit finished against a frozen broker");
    });
    let dropped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || drop(pending)));
    broker.resume();
    drop(client);
    drop(runtime);
    assert!(
        dropped.is_ok(),
        "dropping a pending emit outside the runtime panicked"
    );
}

/// Durations past librdkafka's ranges are taken as its longest (with `Duration::MAX` the client
/// failed to connect, as `Unavailable`, which a retry policy retries), and a setting librdkafka
/// refuses is `InvalidArgument`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_past_librdkafkas_ranges_are_capped_and_refused_settings_are_invalid() {
    let broker = Broker::start();
    type Setting = fn(KafkaOptions) -> KafkaOptions;
    let cases: [(&str, Setting); 4] = [
        ("session_timeout", |o| o.session_timeout(Duration::MAX)),
        ("fetch_wait", |o| o.fetch_wait(Duration::MAX)),
        ("commit_interval", |o| o.commit_interval(Duration::MAX)),
        ("delivery_timeout", |o| o.delivery_timeout(Duration::MAX)),
    ];
    for (name, set) in cases {
        if let Err(error) = KafkaTransport::new(set(options(&broker))).connect().await {
            panic!("{name}(Duration::MAX): {error}");
        }
    }
    let refused = KafkaTransport::new(options(&broker).set("no.such.setting", "1"))
        .connect()
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused}");
}

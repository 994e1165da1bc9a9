//! The NATS transport against real `nats-server` processes: queue groups, losing and regaining
//! the broker, connection errors, subjects, and durable (JetStream) events.
#![cfg(feature = "nats")]

mod support;

use futures_util::StreamExt;
use palisade::rpc::transport::ServerTransport;
use palisade::rpc::transport::nats::{
    DEAD_LETTER_DELIVERIES, DEAD_LETTER_REASON, DurableEvents, NatsOptions, NatsServer,
    NatsTransport,
};
use palisade::rpc::{Client, Code, Payload, Router, RpcError, Server, ServerHandle};
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use support::nats::Broker;
use support::resources::{alive_tasks, settles_to};
use tokio::time::Instant;

fn options(broker: &Broker) -> NatsOptions {
    NatsOptions::new([broker.url()])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_group_spreads_requests_over_instances_and_answers_each_once() {
    let broker = Broker::start();
    let counts = [Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0))];
    let mut servers = Vec::new();
    for (instance, count) in counts.iter().enumerate() {
        let count = Arc::clone(count);
        let router = Router::new().message("which", move |Payload(n): Payload<u64>| {
            count.fetch_add(1, Ordering::SeqCst);
            async move { json!({"n": n, "instance": instance}) }
        });
        servers.push(
            NatsServer::new(options(&broker))
                .queue("which-service")
                .serve(Server::new(router))
                .await
                .unwrap(),
        );
    }
    let client = Client::builder()
        .timeout(Duration::from_secs(5))
        .connect(options(&broker))
        .await
        .unwrap();
    let replies = futures_util::future::join_all((0..400u64).map(|n| {
        let client = client.clone();
        async move { client.send::<Value>("which", &n).await.unwrap() }
    }))
    .await;
    for (n, reply) in replies.iter().enumerate() {
        assert_eq!(reply["n"], n as u64);
    }
    let (a, b) = (
        counts[0].load(Ordering::SeqCst),
        counts[1].load(Ordering::SeqCst),
    );
    assert_eq!(a + b, 400, "every request handled exactly once");
    assert!(
        a >= 80 && b >= 80,
        "the queue group did not spread the load: {a} / {b}"
    );
    for server in servers {
        server.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_queue_group_every_instance_gets_every_event() {
    let broker = Broker::start();
    let counts = [Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0))];
    let mut servers = Vec::new();
    for count in &counts {
        let count = Arc::clone(count);
        let router = Router::new().event("tick", move || {
            count.fetch_add(1, Ordering::SeqCst);
            async {}
        });
        servers.push(
            NatsServer::new(options(&broker))
                .serve(Server::new(router))
                .await
                .unwrap(),
        );
    }
    let client = Client::builder().connect(options(&broker)).await.unwrap();
    for _ in 0..20 {
        client.emit("tick", &()).await.unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while counts.iter().any(|c| c.load(Ordering::SeqCst) < 20) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        [
            counts[0].load(Ordering::SeqCst),
            counts[1].load(Ordering::SeqCst)
        ],
        [20, 20]
    );
    for server in servers {
        server.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_broker_fails_requests_fast_and_both_sides_come_back() {
    let mut broker = Broker::start();
    let router = Router::new()
        .message("echo", |Payload(n): Payload<u64>| async move { n })
        .message("slow", || async {
            tokio::time::sleep(Duration::from_secs(30)).await;
            "too late"
        });
    let server = NatsServer::new(options(&broker))
        .serve(Server::new(router))
        .await
        .unwrap();
    // A long timeout: failures must come from the lost connection, not from the deadline.
    let client = Client::builder()
        .timeout(Duration::from_secs(60))
        .connect(options(&broker))
        .await
        .unwrap();
    assert_eq!(client.send::<u64>("echo", &1).await.unwrap(), 1);

    let in_flight: Vec<_> = (0..10)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move { (client.send::<String>("slow", &()).await, Instant::now()) })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    broker.stop();
    let killed = Instant::now();
    for call in in_flight {
        let (result, finished) = tokio::time::timeout(Duration::from_secs(10), call)
            .await
            .expect("a request hung after the broker died")
            .unwrap();
        let error = result.unwrap_err();
        assert_eq!(error.code(), Code::Unavailable, "{error}");
        assert!(
            finished - killed < Duration::from_secs(2),
            "failed only after {:?}",
            finished - killed
        );
    }
    // While it is down, requests fail fast rather than hang.
    let started = Instant::now();
    let down = client.send::<u64>("echo", &2).await.unwrap_err();
    assert_eq!(down.code(), Code::Unavailable, "{down}");
    assert!(started.elapsed() < Duration::from_secs(2));

    broker.restart();
    // Client and server reconnect, and the server's subscription comes back, by themselves.
    support::until_echo_answers(&client, Duration::from_secs(20), Duration::from_millis(200)).await;
    server.shutdown().await;
}

#[tokio::test]
async fn connection_problems_are_clear_errors_at_connect_time() {
    let bad_url = Client::builder()
        .connect(NatsOptions::new(["nats://exa mple:4222"]))
        .await
        .unwrap_err();
    assert_eq!(bad_url.code(), Code::InvalidArgument, "{bad_url}");
    assert!(
        bad_url.message().contains("invalid NATS server URL"),
        "{bad_url}"
    );

    let closed_port = support::free_port();
    let started = Instant::now();
    let unreachable = Client::builder()
        .connect(NatsOptions::new([format!(
            "nats://127.0.0.1:{closed_port}"
        )]))
        .await
        .unwrap_err();
    assert_eq!(unreachable.code(), Code::Unavailable, "{unreachable}");
    assert!(
        unreachable.message().contains("cannot connect to NATS"),
        "{unreachable}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "connecting hung for {:?}",
        started.elapsed()
    );

    let broker = Broker::start_with(&["--user", "app", "--pass", "right"]);
    let refused = Client::builder()
        .connect(options(&broker).user_and_password("app", "wrong"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused}");
    let accepted = Client::builder()
        .connect(
            options(&broker)
                .user_and_password("app", "right")
                .name("tests"),
        )
        .await;
    assert!(accepted.is_ok());
}

#[tokio::test]
async fn routes_that_are_not_nats_subjects_are_refused_clearly() {
    let broker = Broker::start();
    let router = Router::new().message(json!({"q": "two words"}), || async {});
    let error = NatsServer::new(options(&broker))
        .serve(Server::new(router))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument);
    assert!(
        error.message().contains("not a valid NATS subject"),
        "{error}"
    );

    let client = Client::builder().connect(options(&broker)).await.unwrap();
    let error = client.send::<()>("has space", &()).await.unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument, "{error}");
}

fn durable(stream: &str) -> DurableEvents {
    DurableEvents::new(stream)
        .max_deliveries(4)
        .backoff([Duration::from_millis(50), Duration::from_millis(100)])
        .ack_wait(Duration::from_secs(5))
}

/// A server handling `router`'s events durably as `durable` says.
async fn serve_with(
    broker: &Broker,
    durable: DurableEvents,
    router: Router,
) -> Result<ServerHandle, RpcError> {
    NatsServer::new(options(broker))
        .durable_events(durable)
        .serve(Server::new(router))
        .await
}

/// A client emitting through JetStream.
async fn durable_client(broker: &Broker) -> Client {
    let transport = NatsTransport::new(options(broker))
        .durable_events()
        .connect()
        .await
        .unwrap();
    Client::builder().build(transport)
}

/// A server handling `router`'s events durably on `stream`, and a client emitting through
/// JetStream.
async fn serve_durably(broker: &Broker, stream: &str, router: Router) -> (ServerHandle, Client) {
    let server = serve_with(broker, durable(stream), router).await.unwrap();
    (server, durable_client(broker).await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_event_is_redelivered_until_its_handler_succeeds_then_never_again() {
    let broker = Broker::start();
    let attempts = Arc::new(AtomicUsize::new(0));
    let successes = Arc::new(AtomicUsize::new(0));
    let (attempts_c, successes_c) = (Arc::clone(&attempts), Arc::clone(&successes));
    let router = Router::new().event("order-created", move |Payload(order): Payload<Value>| {
        let attempt = attempts_c.fetch_add(1, Ordering::SeqCst) + 1;
        let successes = Arc::clone(&successes_c);
        async move {
            assert_eq!(order["id"], 7);
            if attempt <= 2 {
                return Err(RpcError::unavailable(format!(
                    "inventory down (attempt {attempt})"
                )));
            }
            successes.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    });
    let (server, client) = serve_durably(&broker, "ORDERS", router).await;
    client
        .emit("order-created", &json!({"id": 7}))
        .await
        .unwrap();

    let deadline = Instant::now() + Duration::from_secs(10);
    while successes.load(Ordering::SeqCst) == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Make sure nothing else arrives once it succeeded (acknowledged: never redelivered).
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(
        attempts.load(Ordering::SeqCst),
        3,
        "two failures, then one success"
    );
    assert_eq!(
        successes.load(Ordering::SeqCst),
        1,
        "processed exactly once more"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_that_always_fails_lands_on_the_dead_letter_subject() {
    let broker = Broker::start();
    let attempts = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&attempts);
    let router = Router::new().event("payment-received", move || {
        counter.fetch_add(1, Ordering::SeqCst);
        // A multi-line message: a NATS header is one line.
        async {
            Err::<(), _>(RpcError::exception(
                "ledger rejected the entry:\nbalance too low",
            ))
        }
    });
    // Watch the dead-letter subject with a plain subscriber.
    let watcher = async_nats::connect(broker.url()).await.unwrap();
    let mut dead_letters = watcher.subscribe("palisade.dead-letter.>").await.unwrap();
    watcher.flush().await.unwrap();
    let (server, client) = serve_durably(&broker, "PAYMENTS", router).await;
    client
        .emit("payment-received", &json!({"amount": 42}))
        .await
        .unwrap();

    let letter = tokio::time::timeout(Duration::from_secs(10), dead_letters.next())
        .await
        .expect("no dead letter arrived")
        .unwrap();
    assert_eq!(
        letter.subject.as_str(),
        "palisade.dead-letter.payment-received"
    );
    let body: Value = serde_json::from_slice(&letter.payload).unwrap();
    assert_eq!(
        body,
        json!({"pattern": "payment-received", "data": {"amount": 42}})
    );
    let headers = letter.headers.unwrap();
    assert_eq!(headers.get(DEAD_LETTER_DELIVERIES).unwrap().as_str(), "4");
    assert!(
        headers
            .get(DEAD_LETTER_REASON)
            .unwrap()
            .as_str()
            .contains("ledger rejected the entry: balance too low")
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        attempts.load(Ordering::SeqCst),
        4,
        "delivered max_deliveries times, then no more"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn durable_emit_fails_clearly_when_no_stream_stores_the_subject() {
    let broker = Broker::start();
    let client = durable_client(&broker).await;
    let error = client.emit("nobody-stores-this", &1).await.unwrap_err();
    assert_eq!(error.code(), Code::Unavailable, "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_event_with_an_idempotency_key_is_stored_once() {
    use palisade::rpc::transport::IDEMPOTENCY_KEY;
    use palisade::rpc::{Headers, Pattern, RawJson, RpcRequest};
    let broker = Broker::start();
    let handled = Arc::new(std::sync::Mutex::new(Vec::new()));
    let router = Router::new().event("payment-taken", {
        let handled = Arc::clone(&handled);
        move |headers: Headers, Payload(payment): Payload<Value>| {
            handled
                .lock()
                .unwrap()
                .push((payment, headers.get(IDEMPOTENCY_KEY).map(str::to_owned)));
            async {}
        }
    });
    let (server, client) = serve_durably(&broker, "PAYMENTS", router).await;
    let emit = |key: &str, amount: u64| {
        let mut headers = palisade::rpc::Headers::new();
        headers.insert(IDEMPOTENCY_KEY, key.to_owned());
        RpcRequest::event(
            Pattern::from("payment-taken"),
            RawJson::to_json(&json!({"amount": amount})).unwrap(),
        )
        .with_headers(headers)
    };
    // A retry after a lost acknowledgement sends the same key again: stored once.
    client.call(emit("pay-1", 10)).await.unwrap();
    client.call(emit("pay-1", 10)).await.unwrap();
    client.call(emit("pay-2", 20)).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while handled.lock().unwrap().len() < 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        *handled.lock().unwrap(),
        [
            (json!({"amount": 10}), Some("pay-1".to_owned())),
            (json!({"amount": 20}), Some("pay-2".to_owned())),
        ]
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_deliveries_configured_for_an_existing_consumer_still_end_in_a_dead_letter() {
    let broker = Broker::start();
    let attempts = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&attempts);
    let router = Router::new().event("refund-issued", move || {
        counter.fetch_add(1, Ordering::SeqCst);
        async { Err::<(), _>(RpcError::exception("ledger closed")) }
    });
    let serve = |deliveries: u32| {
        let durable = DurableEvents::new("REFUNDS")
            .max_deliveries(deliveries)
            .backoff([Duration::from_millis(50)])
            .ack_wait(Duration::from_secs(5));
        let router = router.clone();
        let broker = &broker;
        async move { serve_with(broker, durable, router).await.unwrap() }
    };
    // The first deployment made the consumer; an earlier version of palisade made it with the
    // deliveries configured, two.
    serve(2).await.shutdown().await;
    limit_deliveries(&broker, "REFUNDS", 2).await;
    let watcher = async_nats::connect(broker.url()).await.unwrap();
    let mut dead_letters = watcher.subscribe("palisade.dead-letter.>").await.unwrap();
    watcher.flush().await.unwrap();
    // The next one asks for three. A consumer left at two would stop delivering after the
    // second failure, which the server NAKs for a third try: the event would be lost, unseen.
    let server = serve(3).await;
    let client = durable_client(&broker).await;
    client
        .emit("refund-issued", &json!({"amount": 5}))
        .await
        .unwrap();
    let letter = tokio::time::timeout(Duration::from_secs(10), dead_letters.next())
        .await
        .expect("no dead letter arrived: the event was lost")
        .unwrap();
    let headers = letter.headers.unwrap();
    assert_eq!(headers.get(DEAD_LETTER_DELIVERIES).unwrap().as_str(), "3");
    assert_eq!(attempts.load(Ordering::SeqCst), 3);
    server.shutdown().await;
}

/// A router whose `payment-received` handler always fails.
fn always_failing() -> Router {
    Router::new().event("payment-received", || async {
        Err::<(), _>(RpcError::exception("card declined"))
    })
}

/// The messages a stream holds, once it holds `count` (within 10 s).
async fn stored(
    jetstream: &async_nats::jetstream::Context,
    stream: &str,
    count: u64,
) -> Vec<async_nats::jetstream::message::StreamMessage> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(mut found) = jetstream.get_stream(stream).await {
            let held = found.info().await.unwrap().state.messages;
            if held >= count {
                let mut messages = Vec::new();
                for sequence in 1..=held {
                    if let Ok(message) = found.get_raw_message(sequence).await {
                        messages.push(message);
                    }
                }
                return messages;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{stream} never held {count} messages"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Nobody watches the dead-letter subject: the dead letter is kept all the same, in the
/// dead-letter stream, with what it needs to be replayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_nobody_watches_is_kept_in_a_stream() {
    use async_nats::jetstream::stream::{RetentionPolicy, StorageType};
    use palisade::rpc::transport::nats::Storage;
    let broker = Broker::start();
    let server = serve_with(
        &broker,
        durable("PAYMENTS").storage(Storage::Memory),
        always_failing(),
    )
    .await
    .unwrap();
    let client = durable_client(&broker).await;
    client
        .emit("payment-received", &json!({"amount": 12}))
        .await
        .unwrap();
    let jetstream = async_nats::jetstream::new(async_nats::connect(broker.url()).await.unwrap());
    let letters = stored(&jetstream, "PAYMENTS_DEAD_LETTERS", 1).await;
    assert_eq!(letters.len(), 1);
    let letter = &letters[0];
    assert_eq!(
        letter.subject.as_str(),
        "palisade.dead-letter.payment-received"
    );
    assert_eq!(
        serde_json::from_slice::<Value>(&letter.payload).unwrap(),
        json!({"pattern": "payment-received", "data": {"amount": 12}})
    );
    assert_eq!(
        letter.headers.get(DEAD_LETTER_DELIVERIES).unwrap().as_str(),
        "4"
    );
    assert!(
        letter
            .headers
            .get(DEAD_LETTER_REASON)
            .unwrap()
            .as_str()
            .contains("card declined")
    );
    // Kept as the events are, for as long as the stream's limits allow.
    let mut kept = jetstream.get_stream("PAYMENTS_DEAD_LETTERS").await.unwrap();
    let config = kept.info().await.unwrap().config.clone();
    assert_eq!(config.storage, StorageType::Memory);
    assert_eq!(config.retention, RetentionPolicy::Limits);
    // Another service on the stream, with another pattern: its dead letters join the stream.
    let refunds = serve_with(
        &broker,
        durable("PAYMENTS")
            .storage(Storage::Memory)
            .consumer_prefix("refunds"),
        Router::new().event("refund-failed", || async {
            Err::<(), _>(RpcError::exception("bank closed"))
        }),
    )
    .await
    .unwrap();
    client.emit("refund-failed", &1).await.unwrap();
    let letters = stored(&jetstream, "PAYMENTS_DEAD_LETTERS", 2).await;
    assert_eq!(
        letters[1].subject.as_str(),
        "palisade.dead-letter.refund-failed"
    );
    refunds.shutdown().await;
    server.shutdown().await;
}

/// A stream of the user's own that already keeps the dead-letter subjects keeps them; none is
/// made beside it. With `dead_letter_stream(None)` none is made either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_go_to_a_stream_that_already_keeps_them_or_nowhere_if_asked() {
    let broker = Broker::start();
    let jetstream = async_nats::jetstream::new(async_nats::connect(broker.url()).await.unwrap());
    jetstream
        .create_stream(async_nats::jetstream::stream::Config {
            name: "ALL_DEAD_LETTERS".into(),
            subjects: vec!["palisade.dead-letter.>".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    let (server, client) = serve_durably(&broker, "CARDS", always_failing()).await;
    client.emit("payment-received", &1).await.unwrap();
    assert_eq!(stored(&jetstream, "ALL_DEAD_LETTERS", 1).await.len(), 1);
    assert!(jetstream.get_stream("CARDS_DEAD_LETTERS").await.is_err());
    server.shutdown().await;

    let unkept = serve_with(
        &broker,
        durable("CARDS")
            .consumer_prefix("unkept")
            .dead_letter_prefix("unkept")
            .dead_letter_stream(None::<String>),
        always_failing(),
    )
    .await
    .unwrap();
    let watcher = async_nats::connect(broker.url()).await.unwrap();
    let mut dead_letters = watcher.subscribe("unkept.>").await.unwrap();
    watcher.flush().await.unwrap();
    client.emit("payment-received", &2).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), dead_letters.next())
        .await
        .expect("no dead letter published")
        .unwrap();
    assert!(jetstream.get_stream("CARDS_DEAD_LETTERS").await.is_err());
    assert!(
        jetstream
            .stream_by_subject("unkept.payment-received")
            .await
            .is_err()
    );
    unkept.shutdown().await;
}

/// A dead letter the stream refuses (full, discarding new messages) is not lost: the event
/// stays, and is dead-lettered again at its next delivery, once there is room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_the_stream_refuses_is_dead_lettered_again_later() {
    use async_nats::jetstream::stream::{Config, DiscardPolicy};
    let broker = Broker::start();
    let jetstream = async_nats::jetstream::new(async_nats::connect(broker.url()).await.unwrap());
    let full = jetstream
        .create_stream(Config {
            name: "FULL".into(),
            subjects: vec!["palisade.dead-letter.>".into()],
            max_messages: 1,
            discard: DiscardPolicy::New,
            ..Default::default()
        })
        .await
        .unwrap();
    jetstream
        .publish("palisade.dead-letter.filler", "filler".into())
        .await
        .unwrap()
        .await
        .unwrap();
    let server = serve_with(
        &broker,
        durable("REFUSED")
            .max_deliveries(1)
            .ack_wait(Duration::from_secs(1)),
        always_failing(),
    )
    .await
    .unwrap();
    durable_client(&broker)
        .await
        .emit("payment-received", &3)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let held = stored(&jetstream, "FULL", 1).await;
    assert_eq!(held[0].subject.as_str(), "palisade.dead-letter.filler");
    full.purge().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let letter = loop {
        if let Ok(message) = full
            .get_last_raw_message_by_subject("palisade.dead-letter.payment-received")
            .await
        {
            break message;
        }
        assert!(
            Instant::now() < deadline,
            "the refused dead letter was lost"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        serde_json::from_slice::<Value>(&letter.payload).unwrap(),
        json!({"pattern": "payment-received", "data": 3})
    );
    server.shutdown().await;
}

/// The name of the one consumer `stream` has.
async fn only_consumer(stream: &async_nats::jetstream::stream::Stream) -> String {
    let names: Vec<String> = stream
        .consumer_names()
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let [name] = &names[..] else {
        panic!("one consumer expected, found {names:?}");
    };
    name.clone()
}

/// Sets the deliveries the only consumer of `stream` allows, by hand.
async fn limit_deliveries(broker: &Broker, stream: &str, deliveries: i64) {
    use async_nats::jetstream::consumer::{FromConsumer, pull};
    let jetstream = async_nats::jetstream::new(async_nats::connect(broker.url()).await.unwrap());
    let stream = jetstream.get_stream(stream).await.unwrap();
    let name = &only_consumer(&stream).await;
    let mut edited =
        pull::Config::try_from_consumer_config(stream.consumer_info(name).await.unwrap().config)
            .unwrap();
    edited.max_deliver = deliveries;
    stream.create_consumer(edited).await.unwrap();
}

/// An event whose handling never ends (it crashes or hangs its server; here the server shuts
/// down with the handler still running) is delivered again to each start: once more than
/// `max_deliveries` deliveries have ended that way it is dead-lettered without running the
/// handler again, instead of being handled forever or, with a consumer that stops delivering at
/// `max_deliveries`, left in the stream unseen. (JetStream's count is the one that decides, and
/// it does not count every delivery to a server that was stopping: the number of starts it
/// takes varies.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_no_server_ever_finishes_is_dead_lettered_after_max_deliveries() {
    let broker = Broker::start();
    let runs = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&runs);
    let router = Router::new().event("invoice-raised", move || {
        counter.fetch_add(1, Ordering::SeqCst);
        std::future::pending::<()>()
    });
    let serve = || {
        let durable = DurableEvents::new("INVOICES")
            .max_deliveries(2)
            .backoff([Duration::from_millis(100)])
            .ack_wait(Duration::from_secs(5));
        NatsServer::new(options(&broker))
            .durable_events(durable)
            .serve(Server::new(router.clone()).grace_period(Duration::from_millis(50)))
    };
    let watcher = async_nats::connect(broker.url()).await.unwrap();
    let mut dead_letters = watcher.subscribe("palisade.dead-letter.>").await.unwrap();
    watcher.flush().await.unwrap();
    let client = durable_client(&broker).await;
    let mut letter = None;
    for start in 0..8 {
        let ran = runs.load(Ordering::SeqCst);
        let server = serve().await.unwrap();
        if start == 0 {
            client
                .emit("invoice-raised", &json!({"invoice": 7}))
                .await
                .unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while runs.load(Ordering::SeqCst) == ran && Instant::now() < deadline {
            if let Ok(Some(arrived)) =
                tokio::time::timeout(Duration::from_millis(10), dead_letters.next()).await
            {
                letter = Some(arrived);
                break;
            }
        }
        server.shutdown().await;
        if letter.is_some() {
            break;
        }
    }
    let letter = letter.expect("never dead-lettered");
    let runs = runs.load(Ordering::SeqCst);
    assert!(runs >= 2, "dead-lettered after {runs} runs");
    let headers = letter.headers.unwrap();
    let deliveries: u64 = headers
        .get(DEAD_LETTER_DELIVERIES)
        .unwrap()
        .as_str()
        .parse()
        .unwrap();
    assert!(deliveries > 2, "{deliveries}");
    let reason = headers.get(DEAD_LETTER_REASON).unwrap().as_str().to_owned();
    assert!(reason.contains("without being settled"), "{reason}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_consumer_takes_the_ack_wait_and_at_least_the_deliveries_configured() {
    use async_nats::jetstream::consumer::{AckPolicy, FromConsumer, pull};
    let broker = Broker::start();
    let router = Router::new().event("audit", || async {});
    let serve = |durable: DurableEvents| serve_with(&broker, durable, router.clone());
    serve(DurableEvents::new("AUDIT").ack_wait(Duration::from_secs(30)))
        .await
        .unwrap()
        .shutdown()
        .await;
    let jetstream = async_nats::jetstream::new(async_nats::connect(broker.url()).await.unwrap());
    let stream = jetstream.get_stream("AUDIT").await.unwrap();
    let name = &only_consumer(&stream).await;
    let made = stream.consumer_info(name).await.unwrap().config;
    assert_eq!(
        made.filter_subject, "audit",
        "the consumer reads its pattern only"
    );
    assert_eq!(made.ack_wait, Duration::from_secs(30));
    assert_eq!(
        made.max_deliver, -1,
        "any number: the server settles every event"
    );
    assert_eq!(made.ack_policy, AckPolicy::Explicit);
    // An operator sets limits by hand.
    let mut edited =
        pull::Config::try_from_consumer_config(stream.consumer_info(name).await.unwrap().config)
            .unwrap();
    edited.max_ack_pending = 7;
    edited.max_deliver = 8;
    stream.create_consumer(edited).await.unwrap();

    serve(
        DurableEvents::new("AUDIT")
            .ack_wait(Duration::from_secs(2))
            .max_deliveries(8),
    )
    .await
    .unwrap()
    .shutdown()
    .await;
    let config = stream.consumer_info(name).await.unwrap().config;
    assert_eq!(config.ack_wait, Duration::from_secs(2));
    assert_eq!(
        config.max_deliver, -1,
        "as many as configured leave no delivery to dead-letter an unsettled event"
    );
    assert_eq!(config.max_ack_pending, 7, "the operator's limit stays");
    limit_deliveries(&broker, "AUDIT", 8).await;
    // Fewer deliveries leave the consumer's count alone (the server dead-letters at its own), so
    // that instances still running with the higher one are not cut short.
    serve(
        DurableEvents::new("AUDIT")
            .ack_wait(Duration::from_secs(2))
            .max_deliveries(3),
    )
    .await
    .unwrap()
    .shutdown()
    .await;
    assert_eq!(
        stream.consumer_info(name).await.unwrap().config.max_deliver,
        8
    );

    // An ack policy cannot change in place: the error names the consumer and what to do.
    stream.delete_consumer(name).await.unwrap();
    stream
        .create_consumer(pull::Config {
            durable_name: Some(name.clone()),
            filter_subject: "audit".into(),
            ack_policy: AckPolicy::None,
            ..Default::default()
        })
        .await
        .unwrap();
    let error = serve(DurableEvents::new("AUDIT")).await.unwrap_err();
    assert_eq!(error.code(), Code::FailedPrecondition, "{error}");
    assert!(error.message().contains(name.as_str()), "{error}");
    assert!(error.message().contains("policy none"), "{error}");
    assert!(!error.message().contains("  "), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_in_flight_holds_for_durable_events_too() {
    let broker = Broker::start();
    let running = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let handler = |running: Arc<AtomicUsize>, most: Arc<AtomicUsize>, done: Arc<AtomicUsize>| {
        move || {
            let (running, most, done) = (running.clone(), most.clone(), done.clone());
            async move {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(200)).await;
                running.fetch_sub(1, Ordering::SeqCst);
                done.fetch_add(1, Ordering::SeqCst);
            }
        }
    };
    // Two patterns: two durable consumers, each handing over one event at a time.
    let router = Router::new()
        .event(
            "stock-counted",
            handler(running.clone(), most.clone(), done.clone()),
        )
        .event(
            "price-changed",
            handler(running.clone(), most.clone(), done.clone()),
        );
    let server = NatsServer::new(options(&broker))
        .durable_events(durable("LIMITED"))
        .serve(Server::new(router).max_in_flight(1))
        .await
        .unwrap();
    let client = durable_client(&broker).await;
    for _ in 0..2 {
        client.emit("stock-counted", &json!({})).await.unwrap();
        client.emit("price-changed", &json!({})).await.unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while done.load(Ordering::SeqCst) < 4 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(done.load(Ordering::SeqCst), 4, "every event handled");
    assert_eq!(
        most.load(Ordering::SeqCst),
        1,
        "one event at a time, as configured"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_exists_with_other_settings_is_updated_or_refused_clearly() {
    use palisade::rpc::transport::nats::Storage;
    let broker = Broker::start();
    let router = Router::new().event("audit", || async {});
    let serve = |durable: DurableEvents| serve_with(&broker, durable, router.clone());
    let first = serve(DurableEvents::new("AUDIT").storage(Storage::Memory))
        .await
        .unwrap();
    first.shutdown().await;
    // Limits change in place...
    let limited = serve(
        DurableEvents::new("AUDIT")
            .storage(Storage::Memory)
            .max_age(Duration::from_secs(3600))
            .max_bytes(1 << 20),
    )
    .await
    .unwrap();
    limited.shutdown().await;
    // ...storage does not: the error says what differs and what to do.
    let error = serve(DurableEvents::new("AUDIT").storage(Storage::File))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::FailedPrecondition, "{error}");
    assert!(error.message().contains("\"AUDIT\""), "{error}");
    assert!(error.message().contains("storage"), "{error}");
    assert!(
        !error.message().contains("  "),
        "one line, no runs of spaces: {error}"
    );
    // A JetStream that is not clustered keeps one replica whatever is asked (logged): serving
    // works, so that one configuration runs on a developer's single node and on the cluster.
    let replicated = serve(
        DurableEvents::new("AUDIT")
            .storage(Storage::Memory)
            .replicas(3),
    )
    .await
    .unwrap();
    replicated.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_nats_cannot_carry_are_clear_errors_not_panics() {
    let broker = Broker::start();
    let _server = NatsServer::new(options(&broker))
        .serve(Server::new(
            Router::new().message("echo", |Payload(x): Payload<u64>| async move { x }),
        ))
        .await
        .unwrap();
    for (key, value) in [
        ("x-tenant", "a\r\nb"),
        ("x tenant", "a"),
        ("x:tenant", "a"),
        ("x-ténant", "a"),
    ] {
        let client = Client::builder()
            .header(key, value)
            .connect(options(&broker))
            .await
            .unwrap();
        let error = client.send::<u64>("echo", &1).await.unwrap_err();
        assert_eq!(error.code(), Code::InvalidArgument, "{key:?}: {error}");
        assert!(error.message().contains("header"), "{key:?}: {error}");
        let error = client.emit("echo", &1).await.unwrap_err();
        assert_eq!(error.code(), Code::InvalidArgument, "{key:?}: {error}");
    }
}

/// What a request looks like on the broker: the message a bare subscriber receives for a
/// palisade client built with `options`, given up on at its 200 ms timeout.
async fn request_as_seen_on_the_broker(
    broker: &Broker,
    options: NatsOptions,
    header: Option<(&'static str, &'static str)>,
) -> async_nats::Message {
    let bare = async_nats::connect(broker.url()).await.unwrap();
    let mut seen = bare.subscribe("probe").await.unwrap();
    bare.flush().await.unwrap();
    let mut builder = Client::builder().timeout(Duration::from_millis(200));
    if let Some((key, value)) = header {
        builder = builder.header(key, value);
    }
    let client = builder.connect(options).await.unwrap();
    let error = client
        .send::<Value>("probe", &json!({"x": 1}))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::DeadlineExceeded, "{error}");
    tokio::time::timeout(Duration::from_secs(5), seen.next())
        .await
        .unwrap()
        .unwrap()
}

fn body_of(message: &async_nats::Message) -> Value {
    serde_json::from_slice(&message.payload).unwrap()
}

fn millis_left(text: &str) -> u64 {
    let millis: u64 = text.parse().unwrap();
    assert!(millis > 0 && millis <= 200, "{millis}");
    millis
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deadline_travels_in_the_body_unless_asked_for_as_a_nats_header() {
    let broker = Broker::start();

    // Default: a plain PUB, no NATS headers; the deadline in the packet's `headers` field.
    let message = request_as_seen_on_the_broker(&broker, options(&broker), None).await;
    assert!(message.headers.is_none(), "{:?}", message.headers);
    let body = body_of(&message);
    millis_left(body["headers"]["palisade-timeout-ms"].as_str().unwrap());
    assert_eq!(body["pattern"], "probe");
    assert_eq!(body["data"], json!({"x": 1}));

    // The caller's own headers are NATS headers (NestJS reads them there); the deadline is not.
    let message =
        request_as_seen_on_the_broker(&broker, options(&broker), Some(("x-tenant", "acme"))).await;
    let headers = message.headers.as_ref().unwrap();
    assert_eq!(headers.get("x-tenant").unwrap().as_str(), "acme");
    assert!(headers.get("palisade-timeout-ms").is_none());
    millis_left(
        body_of(&message)["headers"]["palisade-timeout-ms"]
            .as_str()
            .unwrap(),
    );

    // A deadline header set by hand never travels beside the deadline's own value.
    let message = request_as_seen_on_the_broker(
        &broker,
        options(&broker),
        Some(("palisade-timeout-ms", "999999")),
    )
    .await;
    assert!(message.headers.is_none(), "{:?}", message.headers);
    millis_left(
        body_of(&message)["headers"]["palisade-timeout-ms"]
            .as_str()
            .unwrap(),
    );

    // Asked for as a header: there, and not in the body.
    for hand_set in [None, Some(("palisade-timeout-ms", "999999"))] {
        let message = request_as_seen_on_the_broker(
            &broker,
            options(&broker).deadline_header(true),
            hand_set,
        )
        .await;
        let headers = message.headers.as_ref().unwrap();
        let values: Vec<_> = headers
            .get_all("palisade-timeout-ms")
            .map(|value| value.as_str().to_owned())
            .collect();
        assert_eq!(values.len(), 1, "{values:?}");
        millis_left(&values[0]);
        assert!(body_of(&message).get("headers").is_none());
    }
}

/// A reply body exactly at the broker's `max_payload` goes out; one byte more is answered with
/// an error packet saying it was too large, on the same reply subject, at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_at_max_payload_goes_out_and_one_byte_more_is_an_error_packet() {
    let broker = Broker::start();
    let router =
        Router::new().message(
            "text",
            |Payload(n): Payload<usize>| async move { "x".repeat(n) },
        );
    let _server = NatsServer::new(options(&broker))
        .serve(Server::new(router))
        .await
        .unwrap();
    let bare = async_nats::connect(broker.url()).await.unwrap();
    let max_payload = bare.server_info().max_payload;
    let ask = |n: usize| {
        let bare = bare.clone();
        async move {
            let packet = format!(r#"{{"pattern":"text","data":{n},"id":"7"}}"#);
            tokio::time::timeout(Duration::from_secs(5), bare.request("text", packet.into()))
                .await
                .expect("every request is answered")
                .unwrap()
                .payload
        }
    };
    // The body around a one-character reply tells how much the envelope takes.
    let envelope = ask(1).await.len() - 1;
    let at_limit = ask(max_payload - envelope).await;
    assert_eq!(at_limit.len(), max_payload);
    assert!(at_limit.ends_with(br#"","isDisposed":true,"id":"7"}"#));
    let over = body_of_bytes(&ask(max_payload - envelope + 1).await);
    assert_eq!(over["id"], "7", "{over}");
    assert_eq!(over["isDisposed"], true, "{over}");
    let message = over["err"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("larger than the transport's limit"),
        "{over}"
    );
}

fn body_of_bytes(body: &[u8]) -> Value {
    serde_json::from_slice(body).unwrap()
}

/// A dead-letter prefix that makes no NATS subject is refused when the server starts, not found
/// out when the first event fails for good (palisade checks the subjects it publishes to itself;
/// async-nats is told not to scan them again at every publish).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_prefix_that_makes_no_subject_is_refused_at_start() {
    let broker = Broker::start();
    let router = Router::new().event("orders.created", |_: Payload<u64>| async {});
    let error = NatsServer::new(options(&broker))
        .durable_events(durable("PREFIXED").dead_letter_prefix("dead letters"))
        .serve(Server::new(router))
        .await
        .expect_err("a prefix with a space makes no subject");
    assert_eq!(error.code(), Code::InvalidArgument, "{error}");
    assert!(error.message().contains("\"dead letters\""), "{error}");
    // A good prefix on the same broker starts.
    let router = Router::new().event("orders.created", |_: Payload<u64>| async {});
    NatsServer::new(options(&broker))
        .durable_events(durable("PREFIXED").dead_letter_prefix("dead.letters"))
        .serve(Server::new(router))
        .await
        .unwrap();
}

/// A consumer prefix that makes no JetStream consumer name is refused when the server starts,
/// before it connects: the name goes into the subjects of JetStream's API, which async-nats does
/// not check, and a space or a line break there would break the protocol line. A dead-letter
/// prefix with a wildcard is refused too (an event is published there).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_or_dead_letter_prefix_that_makes_no_name_is_refused_at_start() {
    let broker = Broker::start();
    let refused = [
        durable("NAMES").consumer_prefix("my svc"),
        durable("NAMES").consumer_prefix("svc\r\nPUB x 1"),
        durable("NAMES").consumer_prefix("billing.v2"),
        durable("NAMES").consumer_prefix("billing>"),
        durable("NAMES").dead_letter_prefix("dead.*"),
        durable("NAMES").dead_letter_prefix("dead.>"),
    ];
    for config in refused {
        let shown = format!("{config:?}");
        let router = Router::new().event("orders.created", |_: Payload<u64>| async {});
        let started = Instant::now();
        let error = NatsServer::new(options(&broker))
            .durable_events(config)
            .serve(Server::new(router))
            .await
            .expect_err(&shown);
        assert_eq!(error.code(), Code::InvalidArgument, "{shown}: {error}");
        assert!(error.message().contains("prefix"), "{error}");
        assert!(started.elapsed() < Duration::from_secs(2), "{shown}");
    }
    // A server with no event names no consumer: its prefix does not matter.
    let messages_only = Router::new().message("ping", |Payload(n): Payload<u64>| async move { n });
    NatsServer::new(options(&broker))
        .durable_events(durable("NAMES").consumer_prefix("my svc"))
        .serve(Server::new(messages_only))
        .await
        .expect("no durable route, no consumer name")
        .shutdown()
        .await;
    // Good prefixes on the same broker start, and an event goes through.
    let (sender, mut received) = tokio::sync::mpsc::unbounded_channel();
    let router = Router::new().event("orders.created", move |Payload(n): Payload<u64>| {
        let sender = sender.clone();
        async move {
            let _ = sender.send(n);
        }
    });
    let server = NatsServer::new(options(&broker))
        .durable_events(
            durable("NAMES")
                .consumer_prefix("billing_v2-eu")
                .dead_letter_prefix("dead.letters"),
        )
        .serve(Server::new(router))
        .await
        .unwrap();
    let client = Client::builder()
        .connect(NatsTransport::new(options(&broker)).durable_events())
        .await
        .unwrap();
    client.emit("orders.created", &7u64).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), received.recv()).await;
    assert_eq!(got.unwrap(), Some(7));
    server.shutdown().await;
}

/// A server whose start fails after it subscribed (here: async-nats refuses the stream name when
/// the durable consumers start, after the core subscriptions were made and flushed) stops
/// what it started before it returns the error: nobody holds a handle that could stop it, so a
/// route left subscribed would be served on, unseen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_fails_to_start_serves_nothing() {
    let broker = Broker::start();
    let served = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&served);
    let router = Router::new()
        .message("ping", move |Payload(n): Payload<u64>| {
            counted.fetch_add(1, Ordering::SeqCst);
            async move { n }
        })
        .event("orders.created", |_: Payload<u64>| async {});
    let error = NatsServer::new(options(&broker))
        .durable_events(durable("NO SUCH STREAM"))
        .serve(Server::new(router))
        .await
        .expect_err("a stream name with spaces is refused");
    assert!(error.message().contains("NO SUCH STREAM"), "{error}");
    nobody_answers_ping(&broker).await;
    assert_eq!(
        served.load(Ordering::SeqCst),
        0,
        "a handler ran after the failed start"
    );
}

/// A start dropped half way (here by a timeout, anywhere from connecting to starting the
/// durable consumers) leaves nothing serving and nothing running: nobody holds a handle that
/// could stop what it started, so a route left subscribed would be served on, unseen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_whose_start_is_dropped_serves_nothing() {
    let broker = Broker::start();
    let tasks = alive_tasks();
    let router = Router::new()
        .message("ping", |Payload(n): Payload<u64>| async move { n })
        .event("orders.created", |_: Payload<u64>| async {});
    // Steps of a millisecond (tokio's timer resolution) span the whole start (a few
    // milliseconds), so that some drops come after the core subscriptions were made, while the
    // durable consumers start.
    let mut dropped = 0;
    for step in 0..40u64 {
        let start = NatsServer::new(options(&broker))
            .durable_events(durable("DROPPED"))
            .serve(Server::new(router.clone()));
        match tokio::time::timeout(Duration::from_millis(step), start).await {
            Ok(started) => {
                started.unwrap().shutdown().await;
                break;
            }
            Err(_) => {
                dropped += 1;
                nobody_answers_ping(&broker).await;
            }
        }
    }
    assert!(dropped > 0, "no start was dropped");
    // Nor does anything else run on: the durable consumers' tasks, the connections' tasks.
    let tasks_after = settles_to(alive_tasks, tasks).await;
    assert!(
        tasks_after <= tasks,
        "tasks leaked: {tasks} before, {tasks_after} after {dropped} dropped starts"
    );
}

/// Every try of `ping` meets no responders, within two seconds.
async fn nobody_answers_ping(broker: &Broker) {
    let bare = async_nats::connect(broker.url()).await.unwrap();
    let packet = r#"{"pattern":"ping","data":1,"id":"1"}"#;
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        // Each try bounded: one sent before the broker processed the unsubscription goes to a
        // subscriber that no longer reads, and is tried again.
        let answer = tokio::time::timeout(
            Duration::from_millis(200),
            bare.request("ping", packet.into()),
        )
        .await
        .map(|answer| answer.map(|reply| reply.payload));
        match answer {
            Ok(Err(error)) if error.kind() == async_nats::RequestErrorKind::NoResponders => break,
            Err(_) => assert!(
                Instant::now() < deadline,
                "no answer, but no \"no responders\" either"
            ),
            other => assert!(
                Instant::now() < deadline,
                "the route is still served after the start ended: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The futures allocated for every request and event stay within glibc's per-thread cache
/// (requests of up to 1032 bytes), whose fast path is several hundred instructions shorter. The
/// request's kept its packet's temporaries and the event's JetStream's publish beside the plain
/// one (1072 and 1328 bytes before). A durable event (to JetStream) is left out: it waits for the
/// stream's acknowledgement, a round trip, and its future is larger (about 1 350 bytes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_futures_of_a_request_and_an_event_fit_the_allocators_small_sizes() {
    use palisade::rpc::transport::ClientTransport;
    use palisade::rpc::{Pattern, RawJson, RpcRequest};
    let broker = Broker::start();
    let transport = NatsTransport::new(options(&broker))
        .connect()
        .await
        .unwrap();
    let payload = || RawJson::to_json(&7u64).unwrap();
    let request = transport.request(RpcRequest::new(Pattern::from("echo"), payload()));
    let size = std::mem::size_of_val(&*request);
    assert!(size <= 1024, "a request: {size} bytes");
    let emitted = transport.emit(RpcRequest::event(Pattern::from("seen"), payload()));
    let size = std::mem::size_of_val(&*emitted);
    assert!(size <= 1024, "an event: {size} bytes");
}

/// A dropped client closes its connection: its reply reader held the inbox subscription, which
/// holds async-nats's connection open, so every client ever dropped kept its socket, its
/// connection's task (pinging, reconnecting) and its reader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_clients_close_their_connections() {
    let broker = Broker::start();
    let server = NatsServer::new(options(&broker))
        .serve(Server::new(
            Router::new().message("ping", |Payload(n): Payload<u64>| async move { n }),
        ))
        .await
        .unwrap();
    let tasks = alive_tasks();
    for n in 0..10u64 {
        let client = Client::builder()
            .timeout(Duration::from_secs(5))
            .connect(options(&broker))
            .await
            .unwrap();
        assert_eq!(client.send::<u64>("ping", &n).await.unwrap(), n);
        // A request in flight when the client goes: its caller gets an answer (here: none).
        let late = {
            let client = client.clone();
            tokio::spawn(async move { client.send::<u64>("ping", &n).await })
        };
        drop(client);
        // The clone keeps the connection while it waits.
        assert_eq!(late.await.unwrap().unwrap(), n);
    }
    let tasks_after = settles_to(alive_tasks, tasks).await;
    assert!(
        tasks_after <= tasks,
        "tasks leaked: {tasks} before, {tasks_after} after 10 dropped clients"
    );
    server.shutdown().await;
}

/// `ack_wait` is how long an event waits after its server stopped answering for it, not how
/// long it may take: the events of a pull batch wait their turn, and a handler may run longer
/// than `ack_wait`, without being delivered again (the server tells JetStream it is still at
/// work on them). Before, the tail of each batch, and the slow event, went past `ack_wait` and
/// ran twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_waiting_in_a_batch_or_handled_slowly_are_not_delivered_again() {
    let broker = Broker::start();
    let runs: Arc<std::sync::Mutex<Vec<u64>>> = Arc::default();
    let seen = Arc::clone(&runs);
    let router = Router::new().event("order-created", move |Payload(n): Payload<u64>| {
        seen.lock().unwrap().push(n);
        async move {
            // Event 0 alone takes longer than the wait; the others add up to more than it.
            let took = if n == 0 { 3000 } else { 150 };
            tokio::time::sleep(Duration::from_millis(took)).await;
            Ok::<_, RpcError>(())
        }
    });
    let server = serve_with(
        &broker,
        durable("SLOW").ack_wait(Duration::from_secs(2)),
        router,
    )
    .await
    .unwrap();
    let client = durable_client(&broker).await;
    for n in 0..20u64 {
        client.emit("order-created", &n).await.unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while runs.lock().unwrap().len() < 20 {
        assert!(Instant::now() < deadline, "{:?}", runs.lock().unwrap());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Time for copies to show up, had any been delivered again.
    tokio::time::sleep(Duration::from_millis(3000)).await;
    assert_eq!(*runs.lock().unwrap(), (0..20).collect::<Vec<_>>());
    server.shutdown().await;
}

/// At shutdown the events a server pulled ahead go back to the stream at once (after the first
/// backoff delay) for another server, instead of waiting out `ack_wait` (30 s here) unseen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_pulled_ahead_go_back_at_shutdown() {
    let broker = Broker::start();
    let handled: Arc<std::sync::Mutex<Vec<(&'static str, u64)>>> = Arc::default();
    let router = |name: &'static str| {
        let handled = Arc::clone(&handled);
        Router::new().event("order-created", move |Payload(n): Payload<u64>| {
            handled.lock().unwrap().push((name, n));
            async move {
                tokio::time::sleep(Duration::from_millis(300)).await;
                Ok::<_, RpcError>(())
            }
        })
    };
    let first = NatsServer::new(options(&broker))
        .durable_events(durable("HANDOVER").ack_wait(Duration::from_secs(30)))
        .serve(Server::new(router("first")).grace_period(Duration::from_secs(2)))
        .await
        .unwrap();
    let client = durable_client(&broker).await;
    for n in 0..10u64 {
        client.emit("order-created", &n).await.unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while handled.lock().unwrap().is_empty() {
        assert!(Instant::now() < deadline, "nothing handled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The rest were pulled while the first one ran.
    tokio::time::sleep(Duration::from_millis(100)).await;
    first.shutdown().await;
    let second = serve_with(
        &broker,
        durable("HANDOVER").ack_wait(Duration::from_secs(30)),
        router("second"),
    )
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut done: Vec<u64> = handled.lock().unwrap().iter().map(|(_, n)| *n).collect();
        done.sort_unstable();
        done.dedup();
        if done == (0..10).collect::<Vec<_>>() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "events left with the stopped server: {:?}",
            handled.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    second.shutdown().await;
}

/// `Duration::MAX` in the durable timing options means "as long as can be": it reached
/// JetStream as a negative count of nanoseconds (no heartbeat at all), or overflowed doubling.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_timing_options_of_duration_max_still_deliver() {
    let broker = Broker::start();
    let handled = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&handled);
    let server = serve_with(
        &broker,
        durable("FOREVER")
            .heartbeat(Duration::MAX)
            .pull_expiry(Duration::MAX)
            .ack_wait(Duration::MAX),
        Router::new().event("order-created", move |Payload(_): Payload<u64>| {
            seen.fetch_add(1, Ordering::SeqCst);
            async {}
        }),
    )
    .await
    .unwrap();
    let client = durable_client(&broker).await;
    client.emit("order-created", &1).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while handled.load(Ordering::SeqCst) == 0 {
        assert!(Instant::now() < deadline, "the event was never handled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.shutdown().await;
}

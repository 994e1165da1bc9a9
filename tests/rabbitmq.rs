//! The RabbitMQ transport against the machine's broker: what goes on the wire, the exchange
//! modes, acknowledgements and prefetch, consumers killed mid-stream, retries and dead letters,
//! unroutable messages, shutdown, connection errors and resources. Every test has queues of its
//! own, deleted afterwards.
#![cfg(feature = "rabbitmq")]

mod support;

use futures_util::StreamExt;
use palisade::rpc::transport::ServerTransport;
use palisade::rpc::transport::rabbitmq::lapin::options::{
    BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, QueueDeclareOptions,
};
use palisade::rpc::transport::rabbitmq::lapin::types::{AMQPValue, FieldTable};
use palisade::rpc::transport::rabbitmq::lapin::{self, BasicProperties};
use palisade::rpc::transport::rabbitmq::{
    DEAD_LETTER_DELIVERIES, DEAD_LETTER_QUEUE, DEAD_LETTER_REASON, DEAD_LETTER_SUBJECT,
    EventRetries, ExchangeType, QueueOptions, RmqOptions, RmqServer,
};
use palisade::rpc::{
    Client, Code, NO_HANDLER_MESSAGE, Payload, Router, RpcError, Server, ServerHandle,
    TransportErrorKind,
};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::rabbitmq::{Cleanup, Proxy, machine_url, unique};
use support::resources::{alive_tasks, open_fds, settles_to, threads};
use tokio::time::{Instant, sleep};

/// A non-durable queue of the test's own, kept when its consumers go (so that a second server
/// finds what the first handed back).
fn options(url: &str, queue: &str) -> RmqOptions {
    RmqOptions::new([url])
        .queue(queue)
        .queue_options(QueueOptions::default().durable(false))
        .reconnect_backoff(Duration::from_millis(50), Duration::from_millis(500))
}

async fn raw_channel(url: &str) -> (lapin::Connection, lapin::Channel) {
    let connection = lapin::Connection::connect(url, lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    (connection, channel)
}

/// Waits (up to `within`) until `done()`; panics with `what` otherwise.
async fn wait_until(within: Duration, what: &str, done: impl Fn() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < within, "timed out waiting until {what}");
        sleep(Duration::from_millis(10)).await;
    }
}

/// Takes every message from `queue`.
async fn drain(channel: &lapin::Channel, queue: &str) -> Vec<lapin::message::BasicGetMessage> {
    let mut messages = Vec::new();
    while let Some(message) = channel
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        messages.push(message);
    }
    messages
}

fn header(properties: &BasicProperties, name: &str) -> Option<String> {
    match properties.headers().as_ref()?.inner().get(name)? {
        AMQPValue::LongString(text) => Some(String::from_utf8_lossy(text.as_bytes()).into_owned()),
        other => Some(format!("{other:?}")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_events_and_replies_on_the_wire_are_nestjs_packets() {
    let url = machine_url();
    let queue = unique("wire");
    let _cleanup = Cleanup::new(&url).service_queue(&queue, &[1000, 5000, 30000]);
    let (_raw, channel) = raw_channel(&url).await;
    channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut consumer = channel
        .basic_consume(
            queue.as_str().into(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let client = Client::builder()
        .timeout(Duration::from_secs(5))
        .header("x-tenant", "acme")
        .connect(options(&url, &queue))
        .await
        .unwrap();

    // A request: the raw pattern and an id in the body, the same id as correlation id, direct
    // reply-to, transient, the deadline as expiration and header.
    let call = tokio::spawn({
        let client = client.clone();
        async move { client.send::<Value>("get-user", &json!({"id": "42"})).await }
    });
    let request = consumer.next().await.unwrap().unwrap();
    let body: Value = serde_json::from_slice(&request.data).unwrap();
    let id = body["id"].as_str().unwrap().to_owned();
    assert_eq!(
        String::from_utf8(request.data.clone()).unwrap(),
        format!(r#"{{"pattern":"get-user","data":{{"id":"42"}},"id":"{id}"}}"#)
    );
    let properties = &request.properties;
    assert_eq!(properties.correlation_id().as_ref().unwrap().as_str(), id);
    let reply_to = properties.reply_to().clone().unwrap();
    assert!(
        reply_to.as_str().starts_with("amq.rabbitmq.reply-to."),
        "{reply_to}"
    );
    assert_eq!(*properties.delivery_mode(), Some(1));
    let expiration: u64 = properties
        .expiration()
        .as_ref()
        .unwrap()
        .as_str()
        .parse()
        .unwrap();
    assert!(expiration > 0 && expiration <= 5000, "{expiration}");
    assert_eq!(header(properties, "x-tenant").as_deref(), Some("acme"));
    assert!(header(properties, "palisade-timeout-ms").is_some());
    // Answered the way NestJS answers: no id in the body, the correlation id as property.
    channel
        .basic_publish(
            "".into(),
            reply_to,
            BasicPublishOptions::default(),
            br#"{"response":{"id":"42"},"isDisposed":true}"#,
            BasicProperties::default().with_correlation_id(id.as_str().into()),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!(call.await.unwrap().unwrap(), json!({"id": "42"}));

    // An event: no id, no reply-to, no correlation id, persistent.
    client
        .emit(json!({"cmd": "created"}), &json!({"n": 1}))
        .await
        .unwrap();
    let event = consumer.next().await.unwrap().unwrap();
    assert_eq!(
        String::from_utf8(event.data.clone()).unwrap(),
        r#"{"pattern":{"cmd":"created"},"data":{"n":1}}"#
    );
    assert_eq!(*event.properties.delivery_mode(), Some(2));
    assert!(event.properties.reply_to().is_none());
    assert!(event.properties.correlation_id().is_none());
    drop(consumer);
    channel.close(200, "done".into()).await.unwrap();

    // A palisade server's replies, read by a raw client with a reply queue of its own.
    let router = Router::new()
        .message("ok", || async { json!({"ok": true}) })
        .message("count", |Payload(n): Payload<u32>| async move {
            palisade::rpc::Streaming(futures_util::stream::iter((1..=n).map(Ok::<_, RpcError>)))
        });
    let server = RmqServer::new(options(&url, &queue))
        .serve(Server::new(router))
        .await
        .unwrap();
    let (_raw, channel) = raw_channel(&url).await;
    let replies = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut reply_consumer = channel
        .basic_consume(
            replies.name().clone(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut ask = async |body: &str, correlation: &str, expected: &[&str]| {
        channel
            .basic_publish(
                "".into(),
                queue.as_str().into(),
                BasicPublishOptions::default(),
                body.as_bytes(),
                BasicProperties::default()
                    .with_correlation_id(correlation.into())
                    .with_reply_to(replies.name().clone()),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        for want in expected {
            let reply = tokio::time::timeout(Duration::from_secs(5), reply_consumer.next())
                .await
                .expect("a reply")
                .unwrap()
                .unwrap();
            assert_eq!(String::from_utf8(reply.data).unwrap(), *want);
            assert_eq!(
                reply.properties.correlation_id().as_ref().unwrap().as_str(),
                correlation
            );
        }
    };
    ask(
        r#"{"pattern":"ok","data":null,"id":"abc"}"#,
        "corr-1",
        &[r#"{"response":{"ok":true},"isDisposed":true}"#],
    )
    .await;
    ask(
        r#"{"pattern":"count","data":2,"id":"def"}"#,
        "corr-2",
        &[
            r#"{"response":1}"#,
            r#"{"response":2}"#,
            r#"{"isDisposed":true}"#,
        ],
    )
    .await;
    ask(
        r#"{"pattern":"nope","data":{},"id":"ghi"}"#,
        "corr-3",
        &[&format!(
            r#"{{"id":"ghi","err":"{NO_HANDLER_MESSAGE}","status":"error"}}"#
        )],
    )
    .await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wildcards_mode_binds_every_pattern_and_wildcard_handlers_take_the_rest() {
    let url = machine_url();
    let queue = unique("wildcards");
    let _cleanup = Cleanup::new(&url)
        .service_queue(&queue, &[1000, 5000, 30000])
        .exchange(&queue);
    let audited = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&audited);
    let router = Router::new()
        .message("users.get", || async { "exact" })
        .message("users.*", || async { "wildcard" })
        .message(
            json!({"cmd": "sum"}),
            |Payload(xs): Payload<Vec<i64>>| async move { xs.iter().sum::<i64>() },
        )
        .event("audit.#", move |Payload(v): Payload<Value>| {
            let seen = Arc::clone(&seen);
            async move { seen.lock().unwrap().push(v) }
        });
    let wildcards = options(&url, &queue).wildcards(true);
    let server = RmqServer::new(wildcards.clone())
        .serve(Server::new(router))
        .await
        .unwrap();
    let client = Client::builder()
        .timeout(Duration::from_secs(5))
        .connect(wildcards)
        .await
        .unwrap();
    assert_eq!(
        client.send::<String>("users.get", &()).await.unwrap(),
        "exact"
    );
    assert_eq!(
        client.send::<String>("users.list", &()).await.unwrap(),
        "wildcard"
    );
    assert_eq!(
        client
            .send::<i64>(json!({"cmd": "sum"}), &[2, 3])
            .await
            .unwrap(),
        5
    );
    client
        .emit("audit.login.eu", &json!({"who": "ann"}))
        .await
        .unwrap();
    wait_until(
        Duration::from_secs(5),
        "the wildcard event handler ran",
        || audited.lock().unwrap().len() == 1,
    )
    .await;
    // The exchange is durable, as NestJS declares it: declaring it so again is accepted.
    let (_raw, channel) = raw_channel(&url).await;
    channel
        .exchange_declare(
            queue.as_str().into(),
            lapin::ExchangeKind::Topic,
            lapin::options::ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    // No binding matches: the broker returns it, and the client says so.
    let error = client.emit("billing.paid", &()).await.unwrap_err();
    assert_eq!(error.code(), Code::Unavailable, "{error}");
    assert_eq!(
        error.transport_kind(),
        Some(TransportErrorKind::NoResponders)
    );
    assert!(error.message().contains("NO_ROUTE"), "{error}");
    server.shutdown().await;

    // Without the mode, a pattern with `*` is a pattern like any other.
    let plain_queue = unique("no-wildcards");
    let _cleanup = Cleanup::new(&url).service_queue(&plain_queue, &[1000, 5000, 30000]);
    let plain = options(&url, &plain_queue);
    let server = RmqServer::new(plain.clone())
        .serve(Server::new(
            Router::new().message("users.*", || async { "star" }),
        ))
        .await
        .unwrap();
    let client = Client::builder().connect(plain).await.unwrap();
    let error = client.send::<String>("users.list", &()).await.unwrap_err();
    assert_eq!(error.message(), NO_HANDLER_MESSAGE);
    assert_eq!(client.send::<String>("users.*", &()).await.unwrap(), "star");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fanout_exchange_gives_every_service_every_event_and_a_routing_key_binds_a_queue() {
    let url = machine_url();
    let (exchange, a, b, direct, keyed) = (
        unique("fanout"),
        unique("fanout-a"),
        unique("fanout-b"),
        unique("direct"),
        unique("keyed"),
    );
    let _cleanup = Cleanup::new(&url)
        .service_queue(&a, &[1000, 5000, 30000])
        .service_queue(&b, &[1000, 5000, 30000])
        .service_queue(&keyed, &[1000, 5000, 30000])
        .exchange(&exchange)
        .exchange(&direct);
    let counts = [Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0))];
    let mut servers = Vec::new();
    for (queue, count) in [&a, &b].into_iter().zip(&counts) {
        let count = Arc::clone(count);
        let router = Router::new().event("user-created", move || {
            count.fetch_add(1, Ordering::SeqCst);
            async {}
        });
        let fanout = options(&url, queue)
            .exchange(&exchange)
            .exchange_type(ExchangeType::Fanout);
        servers.push(
            RmqServer::new(fanout)
                .serve(Server::new(router))
                .await
                .unwrap(),
        );
    }
    let client = Client::builder()
        .connect(
            options(&url, &a)
                .exchange(&exchange)
                .exchange_type(ExchangeType::Fanout),
        )
        .await
        .unwrap();
    for _ in 0..3 {
        client.emit("user-created", &()).await.unwrap();
    }
    wait_until(
        Duration::from_secs(5),
        "both services got every event",
        || counts.iter().all(|c| c.load(Ordering::SeqCst) == 3),
    )
    .await;

    // A direct exchange and a routing key: the server binds its queue, a message published to
    // the exchange reaches it; clients still send to the queue.
    let got = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&got);
    let router = Router::new()
        .event("invoice", move || {
            counter.fetch_add(1, Ordering::SeqCst);
            async {}
        })
        .message("ping", || async { "pong" });
    let keyed_options = options(&url, &keyed)
        .exchange(&direct)
        .exchange_type(ExchangeType::Direct)
        .routing_key("billing");
    servers.push(
        RmqServer::new(keyed_options.clone())
            .serve(Server::new(router))
            .await
            .unwrap(),
    );
    let (_raw, channel) = raw_channel(&url).await;
    channel
        .basic_publish(
            direct.as_str().into(),
            "billing".into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            br#"{"pattern":"invoice","data":{}}"#,
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    wait_until(
        Duration::from_secs(5),
        "the bound queue got the message",
        || got.load(Ordering::SeqCst) == 1,
    )
    .await;
    let keyed_client = Client::builder().connect(keyed_options).await.unwrap();
    assert_eq!(
        keyed_client.send::<String>("ping", &()).await.unwrap(),
        "pong"
    );
    for server in servers {
        server.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_prefetch_count_bounds_the_messages_being_handled() {
    let url = machine_url();
    let queue = unique("prefetch");
    let _cleanup = Cleanup::new(&url).service_queue(&queue, &[1000, 5000, 30000]);
    let running = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let work = {
        let (running, most, done) = (Arc::clone(&running), Arc::clone(&most), Arc::clone(&done));
        move || {
            let (running, most, done) =
                (Arc::clone(&running), Arc::clone(&most), Arc::clone(&done));
            async move {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                sleep(Duration::from_millis(60)).await;
                running.fetch_sub(1, Ordering::SeqCst);
                done.fetch_add(1, Ordering::SeqCst);
            }
        }
    };
    let router = Router::new()
        .message("work", work.clone())
        .event("work-event", work);
    let server = RmqServer::new(options(&url, &queue).prefetch_count(3))
        .serve(Server::new(router))
        .await
        .unwrap();
    let client = Client::builder()
        .timeout(Duration::from_secs(20))
        .connect(options(&url, &queue))
        .await
        .unwrap();
    let calls = futures_util::future::join_all((0..12).map(|_| client.send::<()>("work", &())));
    for event in 0..12 {
        client.emit("work-event", &event).await.unwrap();
    }
    for call in calls.await {
        call.unwrap();
    }
    wait_until(Duration::from_secs(20), "every message was handled", || {
        done.load(Ordering::SeqCst) == 24
    })
    .await;
    assert_eq!(
        most.load(Ordering::SeqCst),
        3,
        "prefetch 3 let more run at once"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_killed_mid_stream_leaves_its_messages_to_another_and_nothing_is_lost() {
    let url = machine_url();
    let queue = unique("killed");
    let _cleanup = Cleanup::new(&url).service_queue(&queue, &[1000, 5000, 30000]);
    let proxy = Proxy::start(("127.0.0.1", 5672));
    // Server A takes five messages and never finishes them.
    let started_a = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&started_a);
    let hang = move || {
        counter.fetch_add(1, Ordering::SeqCst);
        std::future::pending::<()>()
    };
    let a = RmqServer::new(options(&proxy.url(), &queue).prefetch_count(5))
        .serve(
            Server::new(
                Router::new()
                    .event("job", hang.clone())
                    .message("ask", hang),
            )
            .grace_period(Duration::from_millis(100)),
        )
        .await
        .unwrap();
    let client = Client::builder()
        .timeout(Duration::from_secs(20))
        .connect(options(&url, &queue))
        .await
        .unwrap();
    // A request first: it too is in A's hands when A dies.
    let call = tokio::spawn({
        let client = client.clone();
        async move { client.send::<String>("ask", &()).await }
    });
    for n in 0..30u32 {
        client.emit("job", &n).await.unwrap();
    }
    wait_until(Duration::from_secs(5), "A took its prefetch", || {
        started_a.load(Ordering::SeqCst) == 5
    })
    .await;
    // A's connection dies: nothing it took was acknowledged.
    proxy.cut();
    let handled: Arc<Mutex<BTreeMap<u32, usize>>> = Arc::default();
    let record = Arc::clone(&handled);
    let router = Router::new()
        .event("job", move |Payload(n): Payload<u32>| {
            *record.lock().unwrap().entry(n).or_default() += 1;
            async {}
        })
        .message("ask", || async { "answered by B" });
    let b = RmqServer::new(options(&url, &queue))
        .serve(Server::new(router))
        .await
        .unwrap();
    wait_until(Duration::from_secs(10), "B handled every job", || {
        handled.lock().unwrap().len() == 30
    })
    .await;
    assert!(
        handled.lock().unwrap().values().all(|&times| times == 1),
        "{:?}",
        handled.lock().unwrap()
    );
    // The caller still waits on its own channel: B's answer reaches it.
    assert_eq!(call.await.unwrap().unwrap(), "answered by B");
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_event_is_retried_with_backoff_then_dead_lettered_with_the_reason() {
    let url = machine_url();
    let queue = unique("poison");
    let _cleanup = Cleanup::new(&url).service_queue(&queue, &[150, 400]);
    let attempts: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let handled = Arc::new(AtomicUsize::new(0));
    let (tries, ok) = (Arc::clone(&attempts), Arc::clone(&handled));
    let router = Router::new().event("work", move |Payload(v): Payload<Value>| {
        let (tries, ok) = (Arc::clone(&tries), Arc::clone(&ok));
        async move {
            if v["poison"] == true {
                tries.lock().unwrap().push(Instant::now());
                return Err(RpcError::exception("cannot digest this"));
            }
            ok.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    });
    let retries = EventRetries::new()
        .max_deliveries(3)
        .backoff([Duration::from_millis(150), Duration::from_millis(400)]);
    let server = RmqServer::new(options(&url, &queue))
        .event_retries(retries)
        .serve(Server::new(router))
        .await
        .unwrap();
    let client = Client::builder()
        .connect(options(&url, &queue))
        .await
        .unwrap();
    client.emit("work", &json!({"poison": true})).await.unwrap();
    for n in 0..10 {
        client.emit("work", &json!({"n": n})).await.unwrap();
    }
    let (_raw, channel) = raw_channel(&url).await;
    let dead_letters = format!("{queue}.dead-letter");
    let mut dead = Vec::new();
    let started = Instant::now();
    while dead.is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no dead letter"
        );
        dead = drain(&channel, &dead_letters).await;
        sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(dead.len(), 1);
    let letter = &dead[0];
    assert_eq!(
        String::from_utf8(letter.delivery.data.clone()).unwrap(),
        r#"{"pattern":"work","data":{"poison":true}}"#
    );
    let properties = &letter.delivery.properties;
    let reason = header(properties, DEAD_LETTER_REASON).unwrap();
    assert!(reason.contains("cannot digest this"), "{reason}");
    assert_eq!(
        header(properties, DEAD_LETTER_DELIVERIES).as_deref(),
        Some("3")
    );
    assert_eq!(
        header(properties, DEAD_LETTER_SUBJECT).as_deref(),
        Some("work")
    );
    assert_eq!(
        header(properties, DEAD_LETTER_QUEUE).as_deref(),
        Some(queue.as_str())
    );
    assert_eq!(*properties.delivery_mode(), Some(2), "still persistent");
    let attempts = attempts.lock().unwrap().clone();
    assert_eq!(attempts.len(), 3);
    // Redelivered after the backoff (the broker's TTL timer is not exact: a little slack).
    assert!(
        attempts[1] - attempts[0] >= Duration::from_millis(140),
        "{attempts:?}"
    );
    assert!(
        attempts[2] - attempts[1] >= Duration::from_millis(380),
        "{attempts:?}"
    );
    assert_eq!(
        handled.load(Ordering::SeqCst),
        10,
        "the other events went through"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_that_fail_for_a_while_are_all_handled_in_the_end() {
    let url = machine_url();
    let queue = unique("flaky");
    let _cleanup = Cleanup::new(&url).service_queue(&queue, &[30]);
    let handled: Arc<Mutex<BTreeMap<u32, usize>>> = Arc::default();
    let failed: Arc<Mutex<BTreeMap<u32, usize>>> = Arc::default();
    let (ok, ko) = (Arc::clone(&handled), Arc::clone(&failed));
    let router = Router::new().event("tick", move |Payload(n): Payload<u32>| {
        let (ok, ko) = (Arc::clone(&ok), Arc::clone(&ko));
        async move {
            // Every 7th event fails twice before it goes through.
            let mut failures = ko.lock().unwrap();
            let count = failures.entry(n).or_default();
            if n % 7 == 0 && *count < 2 {
                *count += 1;
                return Err(RpcError::unavailable("the database is restarting"));
            }
            drop(failures);
            *ok.lock().unwrap().entry(n).or_default() += 1;
            Ok(())
        }
    });
    let server = RmqServer::new(options(&url, &queue))
        .event_retries(EventRetries::new().backoff([Duration::from_millis(30)]))
        .serve(Server::new(router))
        .await
        .unwrap();
    let client = Client::builder()
        .connect(options(&url, &queue))
        .await
        .unwrap();
    futures_util::future::try_join_all((0..300u32).map(|n| {
        let client = client.clone();
        async move { client.emit("tick", &n).await }
    }))
    .await
    .unwrap();
    wait_until(Duration::from_secs(20), "every event went through", || {
        handled.lock().unwrap().len() == 300
    })
    .await;
    assert!(handled.lock().unwrap().values().all(|&n| n == 1));
    let (_raw, channel) = raw_channel(&url).await;
    assert!(
        drain(&channel, &format!("{queue}.dead-letter"))
            .await
            .is_empty()
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_is_not_json_or_that_no_handler_takes_is_dead_lettered_at_once() {
    let url = machine_url();
    let queue = unique("undeliverable");
    let _cleanup = Cleanup::new(&url).service_queue(&queue, &[1000, 5000, 30000]);
    // NestJS runs a message handler for an event on its pattern: such an event is taken.
    let asked = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&asked);
    let router = Router::new()
        .event("known", || async {})
        .message("ask-only", move || {
            counter.fetch_add(1, Ordering::SeqCst);
            async {}
        });
    let server = RmqServer::new(options(&url, &queue))
        .serve(Server::new(router))
        .await
        .unwrap();
    let client = Client::builder()
        .connect(options(&url, &queue))
        .await
        .unwrap();
    client.emit("ask-only", &1).await.unwrap();
    wait_until(
        Duration::from_secs(5),
        "the message handler took the event",
        || asked.load(Ordering::SeqCst) == 1,
    )
    .await;
    client.emit("nobody-handles-this", &1).await.unwrap();
    let (_raw, channel) = raw_channel(&url).await;
    channel
        .basic_publish(
            "".into(),
            queue.as_str().into(),
            BasicPublishOptions::default(),
            b"not json at all",
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    // A request with nowhere to reply: handled (as NestJS does), and acknowledged.
    channel
        .basic_publish(
            "".into(),
            queue.as_str().into(),
            BasicPublishOptions::default(),
            br#"{"pattern":"ask-only","data":null,"id":"x"}"#,
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    wait_until(
        Duration::from_secs(5),
        "the request without reply_to ran",
        || asked.load(Ordering::SeqCst) == 2,
    )
    .await;
    let mut dead = Vec::new();
    let started = Instant::now();
    while dead.len() < 2 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{} dead letters",
            dead.len()
        );
        dead.extend(drain(&channel, &format!("{queue}.dead-letter")).await);
        sleep(Duration::from_millis(20)).await;
    }
    let reasons: Vec<String> = dead
        .iter()
        .map(|m| header(&m.delivery.properties, DEAD_LETTER_REASON).unwrap())
        .collect();
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("no matching event handler") && r.contains("nobody-handles-this")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("not a valid JSON message")),
        "{reasons:?}"
    );
    for letter in &dead {
        assert_eq!(
            header(&letter.delivery.properties, DEAD_LETTER_DELIVERIES).as_deref(),
            Some("1")
        );
    }
    server.shutdown().await;
    // Everything was acknowledged: nothing came back to the queue when the server left.
    assert!(drain(&channel, &queue).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_no_queue_takes_is_an_error_not_a_silent_drop() {
    let url = machine_url();
    // A queue nobody declared, and a client told not to declare it.
    let missing = RmqOptions::new([url.as_str()])
        .queue(unique("missing"))
        .queue_options(QueueOptions::default().no_assert(true));
    let client = Client::builder()
        .timeout(Duration::from_secs(5))
        .connect(missing)
        .await
        .unwrap();
    let started = Instant::now();
    let emitted = client.emit("order-created", &1).await.unwrap_err();
    assert_eq!(emitted.code(), Code::Unavailable);
    assert_eq!(
        emitted.transport_kind(),
        Some(TransportErrorKind::NoResponders)
    );
    assert!(emitted.message().contains("NO_ROUTE"), "{emitted}");
    let sent = client.send::<()>("get-order", &1).await.unwrap_err();
    assert_eq!(
        sent.transport_kind(),
        Some(TransportErrorKind::NoResponders)
    );
    assert!(started.elapsed() < Duration::from_secs(2), "not at once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_what_it_started_and_hands_back_the_rest() {
    let url = machine_url();
    let queue = unique("handback");
    let _cleanup = Cleanup::new(&url).service_queue(&queue, &[1000, 5000, 30000]);
    let handled: Arc<Mutex<Vec<(char, u32)>>> = Arc::default();
    let router = |who: char, handled: &Arc<Mutex<Vec<(char, u32)>>>| {
        let (events, requests) = (Arc::clone(handled), Arc::clone(handled));
        Router::new()
            .event("job", move |Payload(n): Payload<u32>| {
                let events = Arc::clone(&events);
                async move {
                    sleep(Duration::from_millis(100)).await;
                    events.lock().unwrap().push((who, n));
                }
            })
            .message("ask", move |Payload(n): Payload<u32>| {
                let requests = Arc::clone(&requests);
                async move {
                    sleep(Duration::from_millis(100)).await;
                    requests.lock().unwrap().push((who, 100 + n));
                    format!("{who}{n}")
                }
            })
    };
    let a = RmqServer::new(options(&url, &queue).prefetch_count(4))
        .serve(Server::new(router('a', &handled)).grace_period(Duration::from_secs(5)))
        .await
        .unwrap();
    let client = Client::builder()
        .timeout(Duration::from_secs(20))
        .connect(options(&url, &queue))
        .await
        .unwrap();
    let calls: Vec<_> = (0..10u32)
        .map(|n| {
            let client = client.clone();
            tokio::spawn(async move { (n, client.send::<String>("ask", &n).await) })
        })
        .collect();
    for n in 0..10u32 {
        client.emit("job", &n).await.unwrap();
    }
    sleep(Duration::from_millis(150)).await;
    let report = a.shutdown().await;
    assert!(report.drained, "{report:?}");
    let by_a = handled.lock().unwrap().len();
    assert!(by_a > 0 && by_a < 20, "A handled {by_a}");
    let b = RmqServer::new(options(&url, &queue))
        .serve(Server::new(router('b', &handled)))
        .await
        .unwrap();
    for call in calls {
        let (n, answer) = call.await.unwrap();
        let answer = answer.unwrap();
        assert!(
            answer == format!("a{n}") || answer == format!("b{n}"),
            "{answer}"
        );
    }
    wait_until(Duration::from_secs(10), "every message was handled", || {
        handled.lock().unwrap().len() >= 20
    })
    .await;
    sleep(Duration::from_millis(300)).await;
    let mut numbers: Vec<u32> = handled.lock().unwrap().iter().map(|&(_, n)| n).collect();
    numbers.sort_unstable();
    let expected: Vec<u32> = (0..10).chain(100..110).collect();
    assert_eq!(numbers, expected, "each message handled exactly once");
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_whose_handler_shutdown_cancelled_goes_back_to_the_queue() {
    let url = machine_url();
    let queue = unique("cancelled");
    let _cleanup = Cleanup::new(&url).service_queue(&queue, &[1000, 5000, 30000]);
    let a = RmqServer::new(options(&url, &queue))
        .serve(
            Server::new(Router::new().event("job", std::future::pending::<()>))
                .grace_period(Duration::from_millis(100)),
        )
        .await
        .unwrap();
    let client = Client::builder()
        .connect(options(&url, &queue))
        .await
        .unwrap();
    client.emit("job", &json!({"n": 1})).await.unwrap();
    sleep(Duration::from_millis(200)).await;
    let report = a.shutdown().await;
    assert_eq!(report.cancelled, 1, "{report:?}");
    let got: Arc<Mutex<Vec<Value>>> = Arc::default();
    let record = Arc::clone(&got);
    let b = RmqServer::new(options(&url, &queue))
        .serve(Server::new(Router::new().event(
            "job",
            move |Payload(v): Payload<Value>, headers: palisade::rpc::Headers| {
                let record = Arc::clone(&record);
                // Handed back as it was: not a failed delivery (no count), and at once.
                let counted = headers.get(DEAD_LETTER_DELIVERIES).map(str::to_owned);
                async move {
                    record
                        .lock()
                        .unwrap()
                        .push(json!({"v": v, "counted": counted}))
                }
            },
        )))
        .await
        .unwrap();
    wait_until(Duration::from_secs(5), "B got the event back", || {
        got.lock().unwrap().len() == 1
    })
    .await;
    assert_eq!(
        got.lock().unwrap()[0],
        json!({"v": {"n": 1}, "counted": null})
    );
    let (_raw, channel) = raw_channel(&url).await;
    assert!(
        drain(&channel, &format!("{queue}.dead-letter"))
            .await
            .is_empty(),
        "a cancelled handler is not a failure"
    );
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_acknowledgements_it_works_as_nestjs_does_by_default() {
    let url = machine_url();
    let queue = unique("no-ack");
    let _cleanup = Cleanup::new(&url).queue(&queue);
    let got = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&got);
    let router = Router::new()
        .message("echo", |Payload(v): Payload<Value>| async move { v })
        .event("seen", move || {
            counter.fetch_add(1, Ordering::SeqCst);
            async { Err::<(), _>(RpcError::exception("not retried without acks")) }
        });
    let nestjs_like = options(&url, &queue).no_ack(true).prefetch_count(0);
    let server = RmqServer::new(nestjs_like.clone())
        .serve(Server::new(router))
        .await
        .unwrap();
    let client = Client::builder().connect(nestjs_like).await.unwrap();
    assert_eq!(
        client.send::<Value>("echo", &json!([1])).await.unwrap(),
        json!([1])
    );
    client.emit("seen", &()).await.unwrap();
    // Messages delivered meanwhile are answered: nothing disturbs the channel they came on
    // (without acknowledgements, a message on a channel that closes is gone).
    let quick = Client::builder()
        .timeout(Duration::from_secs(3))
        .connect(options(&url, &queue).no_ack(true))
        .await
        .unwrap();
    let answers = futures_util::future::join_all((0..20u64).map(|n| {
        let quick = quick.clone();
        async move { quick.send::<u64>("echo", &n).await }
    }))
    .await;
    for (n, answer) in answers.into_iter().enumerate() {
        assert_eq!(answer.unwrap(), n as u64);
    }
    wait_until(Duration::from_secs(5), "the event was handled", || {
        got.load(Ordering::SeqCst) == 1
    })
    .await;
    sleep(Duration::from_millis(300)).await;
    assert_eq!(got.load(Ordering::SeqCst), 1);
    server.shutdown().await;
    // Acknowledged on delivery: nothing goes back to the queue when the consumer leaves.
    let (_raw, channel) = raw_channel(&url).await;
    assert!(drain(&channel, &queue).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_errors_are_clear_and_typed() {
    let url = machine_url();
    let port = support::free_port();
    let refused = Client::builder()
        .connect(
            RmqOptions::new([format!("amqp://guest:guest@127.0.0.1:{port}/%2f")])
                .queue("q")
                .connection_timeout(Duration::from_secs(2)),
        )
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused}");
    assert_eq!(refused.transport_kind(), Some(TransportErrorKind::Connect));
    assert!(refused.message().contains(&port.to_string()), "{refused}");

    let denied = Client::builder()
        .connect(RmqOptions::new(["amqp://guest:wrong@127.0.0.1:5672/%2f"]).queue("q"))
        .await
        .unwrap_err();
    assert!(
        !denied.message().contains("wrong"),
        "the password leaked: {denied}"
    );
    assert!(
        matches!(
            denied.transport_kind(),
            Some(TransportErrorKind::Authentication | TransportErrorKind::Connect)
        ),
        "{denied:?}"
    );

    // The queue exists with other options: the broker refuses, and says why.
    let queue = unique("inequivalent");
    let _cleanup = Cleanup::new(&url).queue(&queue);
    let _first = Client::builder()
        .connect(options(&url, &queue))
        .await
        .unwrap();
    let clash = Client::builder()
        .connect(RmqOptions::new([url.as_str()]).queue(&queue))
        .await
        .unwrap_err();
    assert_eq!(clash.code(), Code::FailedPrecondition, "{clash}");
    assert!(clash.message().contains("PRECONDITION_FAILED"), "{clash}");

    let unnamed = Client::builder()
        .connect(RmqOptions::new([url.as_str()]))
        .await
        .unwrap_err();
    assert_eq!(unnamed.code(), Code::InvalidArgument, "{unnamed}");
    let long = Client::builder()
        .connect(RmqOptions::new([url.as_str()]).queue("q".repeat(300)))
        .await
        .unwrap_err();
    assert_eq!(long.code(), Code::InvalidArgument, "{long}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_and_servers_release_every_connection_thread_and_task() {
    let url = machine_url();
    let queue = unique("resources");
    let _cleanup = Cleanup::new(&url).service_queue(&queue, &[1000, 5000, 30000]);
    let serve = async || -> (ServerHandle, Client) {
        let server = RmqServer::new(options(&url, &queue))
            .serve(Server::new(
                Router::new()
                    .message("echo", |Payload(v): Payload<u32>| async move { v })
                    .event("note", || async {}),
            ))
            .await
            .unwrap();
        let client = Client::builder()
            .timeout(Duration::from_secs(5))
            .connect(options(&url, &queue))
            .await
            .unwrap();
        (server, client)
    };
    // Warm up (lazy statics, the runtime's own threads).
    let (server, client) = serve().await;
    client.send::<u32>("echo", &1).await.unwrap();
    server.shutdown().await;
    drop(client);
    sleep(Duration::from_millis(300)).await;
    let (fds, tasks, threads_before) = (open_fds(), alive_tasks(), threads());
    for round in 0..3u32 {
        let (server, client) = serve().await;
        let answers = futures_util::future::join_all((0..50u32).map(|n| {
            let client = client.clone();
            async move { client.send::<u32>("echo", &n).await }
        }))
        .await;
        assert!(
            answers
                .into_iter()
                .enumerate()
                .all(|(n, a)| a.unwrap() == n as u32)
        );
        client.emit("note", &round).await.unwrap();
        server.shutdown().await;
        drop(client);
    }
    assert!(
        settles_to(open_fds, fds).await <= fds,
        "file descriptors leaked"
    );
    assert!(
        settles_to(alive_tasks, tasks).await <= tasks,
        "tasks leaked"
    );
    assert!(
        settles_to(threads, threads_before).await <= threads_before,
        "threads leaked"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_reports_pending_requests_late_replies_and_whether_it_is_connected() {
    let url = machine_url();
    let queue = unique("state");
    let _cleanup = Cleanup::new(&url).service_queue(&queue, &[1000, 5000, 30000]);
    let proxy = Proxy::start(("127.0.0.1", 5672));
    let server = RmqServer::new(options(&url, &queue))
        .serve(Server::new(Router::new().message(
            "late",
            |Payload(ms): Payload<u64>| async move {
                sleep(Duration::from_millis(ms)).await;
                ms
            },
        )))
        .await
        .unwrap();
    let connection =
        palisade::rpc::transport::rabbitmq::RmqTransport::new(options(&proxy.url(), &queue))
            .connect()
            .await
            .unwrap();
    assert!(connection.is_connected());
    assert_eq!((connection.pending(), connection.late_replies()), (0, 0));
    let client = Client::builder().connect(connection.clone()).await.unwrap();
    let slow = tokio::spawn({
        let client = client.clone();
        async move { client.send::<u64>("late", &300).await }
    });
    wait_until(Duration::from_secs(5), "the request is pending", || {
        connection.pending() == 1
    })
    .await;
    assert_eq!(slow.await.unwrap().unwrap(), 300);
    assert_eq!(connection.pending(), 0);
    // A caller that gives up: its reply comes late, and is counted.
    let gave_up =
        tokio::time::timeout(Duration::from_millis(150), client.send::<u64>("late", &600)).await;
    assert!(gave_up.is_err());
    assert_eq!(
        connection.pending(),
        0,
        "a caller that gave up is forgotten"
    );
    wait_until(Duration::from_secs(5), "the late reply is counted", || {
        connection.late_replies() == 1
    })
    .await;
    proxy.cut();
    wait_until(
        Duration::from_secs(5),
        "the client sees it is disconnected",
        || !connection.is_connected(),
    )
    .await;
    proxy.restore();
    wait_until(Duration::from_secs(10), "the client reconnects", || {
        connection.is_connected()
    })
    .await;
    assert_eq!(client.send::<u64>("late", &1).await.unwrap(), 1);
    assert!(format!("{connection:?}").contains("connected: true"));
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_size_limit_is_inclusive_both_ways() {
    let url = machine_url();
    let queue = unique("exact-size");
    let _cleanup = Cleanup::new(&url).service_queue(&queue, &[1000, 5000, 30000]);
    // The event `{"pattern":"size","data":"xx…"}` and the reply `{"response":"xx…","isDisposed":true}`
    // with 100 x's are the limit, exactly.
    let event = |n: usize| format!(r#"{{"pattern":"size","data":"{}"}}"#, "x".repeat(n)).len();
    let reply = |n: usize| format!(r#"{{"response":"{}","isDisposed":true}}"#, "x".repeat(n)).len();
    let server = RmqServer::new(options(&url, &queue).max_message_size(reply(100)))
        .serve(Server::new(
            Router::new().event("size", || async {}).message(
                "size",
                |Payload(n): Payload<usize>| async move { "x".repeat(n) },
            ),
        ))
        .await
        .unwrap();
    let client = Client::builder()
        .timeout(Duration::from_secs(5))
        .connect(options(&url, &queue).max_message_size(event(100)))
        .await
        .unwrap();
    client.emit("size", &"x".repeat(100)).await.unwrap();
    let over = client.emit("size", &"x".repeat(101)).await.unwrap_err();
    assert_eq!(
        over.transport_kind(),
        Some(TransportErrorKind::PayloadTooLarge),
        "{over}"
    );
    assert_eq!(
        client.send::<String>("size", &100).await.unwrap().len(),
        100
    );
    let over = client.send::<String>("size", &101).await.unwrap_err();
    assert_eq!(over.code(), Code::InvalidArgument, "{over}");
    assert!(over.message().contains("limit"), "{over}");
    server.shutdown().await;
}

/// Times beyond the longest time to live every RabbitMQ takes (2³² − 1 ms), `Duration::MAX`
/// included, are capped: a client with `timeout(Duration::MAX)` sent it as the request's
/// expiration, which the broker refused (every request failed, and closed the channel under the
/// others), and a server with a `Duration::MAX` redelivery delay could not declare its delay
/// queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn times_beyond_the_brokers_longest_time_to_live_are_capped() {
    let url = machine_url();
    let queue = unique("longest-ttl");
    let _cleanup = Cleanup::new(&url).service_queue(&queue, &[4_294_967_295]);
    let server = RmqServer::new(options(&url, &queue))
        .event_retries(
            EventRetries::new()
                .max_deliveries(2)
                .backoff([Duration::MAX]),
        )
        .serve(Server::new(
            Router::new()
                .event("noted", || async {})
                .message("echo", |Payload(n): Payload<u32>| async move { n }),
        ))
        .await
        .unwrap();
    let client = Client::builder()
        .timeout(Duration::MAX)
        .connect(options(&url, &queue))
        .await
        .unwrap();
    let sent = futures_util::future::join_all((0..20u32).map(|n| {
        let client = client.clone();
        async move { client.send::<u32>("echo", &n).await }
    }))
    .await;
    for (n, reply) in sent.into_iter().enumerate() {
        assert_eq!(reply.unwrap(), n as u32);
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_delay_and_dead_letter_queues_are_as_durable_as_the_service_queue() {
    let url = machine_url();
    let queue = unique("durable");
    let _cleanup = Cleanup::new(&url).service_queue(&queue, &[250]);
    let server = RmqServer::new(
        RmqOptions::new([url.as_str()]).queue(&queue), // durable, the default
    )
    .event_retries(
        EventRetries::new()
            .max_deliveries(2)
            .backoff([Duration::from_millis(250)]),
    )
    .serve(Server::new(Router::new().event("e", || async {})))
    .await
    .unwrap();
    let (_raw, channel) = raw_channel(&url).await;
    let delay_arguments = |durable: bool| {
        let mut arguments = FieldTable::default();
        arguments.insert("x-message-ttl".into(), AMQPValue::LongLongInt(250));
        arguments.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString("".into()),
        );
        arguments.insert(
            "x-dead-letter-routing-key".into(),
            AMQPValue::LongString(queue.as_str().into()),
        );
        (
            QueueDeclareOptions {
                durable,
                ..Default::default()
            },
            arguments,
        )
    };
    // Declaring them again the same way succeeds; any other way, RabbitMQ refuses.
    let (same, arguments) = delay_arguments(true);
    channel
        .queue_declare(
            format!("{queue}.retry.250").as_str().into(),
            same,
            arguments,
        )
        .await
        .unwrap();
    channel
        .queue_declare(
            format!("{queue}.dead-letter").as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    channel
        .exchange_declare(
            format!("{queue}.dead-letter").as_str().into(),
            lapin::ExchangeKind::Direct,
            lapin::options::ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let (other, arguments) = delay_arguments(false);
    assert!(
        channel
            .queue_declare(
                format!("{queue}.retry.250").as_str().into(),
                other,
                arguments
            )
            .await
            .is_err(),
        "the delay queue is not durable"
    );
    server.shutdown().await;
}

/// A server-named queue (`queue("")`) is one instance's, named anew at each start: its delay
/// queues go with its connection, and its dead letters go to names derived from the exchange,
/// the same at every start. Before, every start left a set of durable delay queues, a
/// dead-letter exchange and a dead-letter queue behind, named after a queue that no longer
/// existed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_named_queue_leaves_nothing_behind_and_dead_letters_under_stable_names() {
    let url = machine_url();
    let exchange = unique("broker-named");
    let dead_letters = format!("{exchange}.dead-letter");
    let _cleanup = Cleanup::new(&url)
        .exchange(&exchange)
        .exchange(&dead_letters)
        .queue(&dead_letters);
    let fanout = || {
        RmqOptions::new([url.as_str()])
            .queue("")
            .queue_options(
                QueueOptions::default()
                    .durable(false)
                    .exclusive(true)
                    .auto_delete(true),
            )
            .exchange(&exchange)
            .exchange_type(ExchangeType::Fanout)
    };
    let client = Client::builder().connect(fanout()).await.unwrap();
    let (_raw, channel) = raw_channel(&url).await;
    let mut queues_of_starts = Vec::new();
    for start in 0..2 {
        let server = RmqServer::new(fanout())
            .event_retries(EventRetries::new().max_deliveries(1))
            .serve(Server::new(Router::new().event("audit", || async {
                Err::<(), _>(RpcError::exception("refused"))
            })))
            .await
            .unwrap();
        client.emit("audit", &start).await.unwrap();
        let started = Instant::now();
        let letter = loop {
            let letters = drain(&channel, &dead_letters).await;
            if let Some(letter) = letters.into_iter().next() {
                break letter;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "no dead letter"
            );
            sleep(Duration::from_millis(20)).await;
        };
        let queue = header(&letter.properties, DEAD_LETTER_QUEUE).unwrap();
        assert!(queue.starts_with("amq.gen-"), "{queue}");
        queues_of_starts.push(queue);
        server.shutdown().await;
    }
    assert_ne!(queues_of_starts[0], queues_of_starts[1]);
    // Nothing named after the queues of those starts is left.
    let (_raw, mut channel) = raw_channel(&url).await;
    for queue in &queues_of_starts {
        for left in [
            format!("palisade.{queue}.retry.30000"),
            format!("palisade.{queue}.dead-letter"),
        ] {
            let found = channel
                .queue_declare(
                    left.as_str().into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await;
            assert!(found.is_err(), "{left} was left behind");
            // A failed passive declaration closes the channel.
            channel = _raw.create_channel().await.unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_go_where_they_are_told_and_are_never_lost() {
    let url = machine_url();
    let (queue, exchange, kept) = (unique("dlx"), unique("my-dlx"), unique("my-dead-letters"));
    let _cleanup = Cleanup::new(&url)
        .service_queue(&queue, &[100])
        .exchange(&exchange)
        .queue(&kept);
    let retries = EventRetries::new()
        .max_deliveries(1)
        .backoff([Duration::from_millis(100)])
        .dead_letter_exchange(&exchange)
        .dead_letter_queue(Some(&kept));
    let router = Router::new().event("e", || async { Err::<(), _>(RpcError::exception("no")) });
    let server = RmqServer::new(options(&url, &queue))
        .event_retries(retries)
        .serve(Server::new(router))
        .await
        .unwrap();
    let client = Client::builder()
        .connect(options(&url, &queue))
        .await
        .unwrap();
    client.emit("e", &1).await.unwrap();
    let (_raw, channel) = raw_channel(&url).await;
    let mut dead = Vec::new();
    let started = Instant::now();
    while dead.is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "no dead letter in {kept}"
        );
        dead = drain(&channel, &kept).await;
        sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        header(&dead[0].delivery.properties, DEAD_LETTER_DELIVERIES).as_deref(),
        Some("1")
    );
    server.shutdown().await;

    // No queue for dead letters, and none bound: the event keeps coming back after the longest
    // delay instead of being lost.
    let (queue, exchange) = (unique("nowhere"), unique("unbound-dlx"));
    let _cleanup = Cleanup::new(&url)
        .service_queue(&queue, &[100])
        .exchange(&exchange);
    let seen = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&seen);
    let router = Router::new().event("e", move || {
        counter.fetch_add(1, Ordering::SeqCst);
        async { Err::<(), _>(RpcError::exception("no")) }
    });
    let server = RmqServer::new(options(&url, &queue))
        .event_retries(
            EventRetries::new()
                .max_deliveries(1)
                .backoff([Duration::from_millis(100)])
                .dead_letter_exchange(&exchange)
                .dead_letter_queue(None::<String>),
        )
        .serve(Server::new(router))
        .await
        .unwrap();
    let client = Client::builder()
        .connect(options(&url, &queue))
        .await
        .unwrap();
    client.emit("e", &2).await.unwrap();
    wait_until(Duration::from_secs(5), "the event came back twice", || {
        seen.load(Ordering::SeqCst) >= 3
    })
    .await;
    // Once per delay (100 ms), one copy: not requeued at once, not duplicated.
    let before = seen.load(Ordering::SeqCst);
    sleep(Duration::from_millis(1000)).await;
    let during = seen.load(Ordering::SeqCst) - before;
    assert!(
        during <= 15,
        "{during} deliveries in 1 s with a 100 ms delay"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_shutdown_messages_waiting_for_capacity_go_to_another_server_at_once() {
    let url = machine_url();
    let queue = unique("waiting");
    let _cleanup = Cleanup::new(&url).service_queue(&queue, &[1000, 5000, 30000]);
    let router = |who: &'static str| {
        Router::new().message("slow", move || async move {
            if who == "a" {
                sleep(Duration::from_millis(1500)).await;
            }
            who
        })
    };
    // A runs one handler at a time; the rest of its prefetch waits for capacity.
    let a = RmqServer::new(options(&url, &queue).prefetch_count(5))
        .serve(
            Server::new(router("a"))
                .max_in_flight(1)
                .grace_period(Duration::from_secs(10)),
        )
        .await
        .unwrap();
    let client = Client::builder()
        .timeout(Duration::from_secs(20))
        .connect(options(&url, &queue))
        .await
        .unwrap();
    let started = Instant::now();
    let calls: Vec<_> = (0..5)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move {
                let who = client.send::<String>("slow", &()).await.unwrap();
                (who, started.elapsed())
            })
        })
        .collect();
    sleep(Duration::from_millis(300)).await;
    let shutdown = tokio::spawn(a.shutdown());
    let b = RmqServer::new(options(&url, &queue))
        .serve(Server::new(router("b")))
        .await
        .unwrap();
    let mut by_b = Vec::new();
    for call in calls {
        let (who, at) = call.await.unwrap();
        if who == "b" {
            by_b.push(at);
        }
    }
    assert!(shutdown.await.unwrap().drained);
    // A finished the one it was running and the one it had let in; it handed back the three
    // still waiting as soon as it stopped taking messages, not when its connection closed.
    assert_eq!(by_b.len(), 3, "{by_b:?}");
    assert!(
        by_b.iter().all(|at| *at < Duration::from_millis(2400)),
        "{by_b:?}"
    );
    b.shutdown().await;
}

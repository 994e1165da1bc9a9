//! The Redis transport beyond the conformance suite, each test against its own `redis-server`:
//! broker loss and restart, the default fan-out and the opt-in single responder, durable events
//! on Redis Streams (nothing lost when a consumer dies, poison events dead-lettered).
#![cfg(feature = "redis")]

mod support;

use futures_util::StreamExt;
use palisade::rpc::transport::redis::{
    BODY_FIELD, DurableEvents, RedisOptions, RedisServer, RedisTransport,
};
use palisade::rpc::transport::{
    DEAD_LETTER_DELIVERIES, DEAD_LETTER_REASON, DEAD_LETTER_SUBJECT, ServerTransport,
};
use palisade::rpc::{
    Client, Code, Payload, Router, RpcError, Server, Streaming, TransportErrorKind,
};
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::proxy::Proxy;
use support::redis::Broker;
use support::resources::{alive_tasks, open_sockets, settles_to};
use tokio::time::{Instant, sleep};

/// The tests count the process's sockets: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn options(broker: &Broker) -> RedisOptions {
    RedisOptions::new(broker.url())
        .reconnect_backoff(Duration::from_millis(20), Duration::from_millis(300))
}

async fn eventually(what: &str, within: Duration, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < within, "{what}: not within {within:?}");
        sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_killed_and_restarted_fails_requests_in_flight_at_once_and_everything_recovers() {
    let _serial = SERIAL.lock().await;
    let mut broker = Broker::start();
    let (sockets, tasks) = (open_sockets(), alive_tasks());
    {
        let stored: Arc<Mutex<BTreeSet<u32>>> = Arc::default();
        let seen = Arc::clone(&stored);
        let router = Router::new()
            .message("slow", || async {
                sleep(Duration::from_secs(60)).await;
                "never"
            })
            .message("echo", |Payload(v): Payload<u64>| async move { v })
            .event("stored", move |Payload(n): Payload<u32>| {
                let seen = Arc::clone(&seen);
                async move {
                    seen.lock().unwrap().insert(n);
                }
            });
        let server = RedisServer::new(options(&broker))
            .serve(Server::new(router).grace_period(Duration::from_millis(100)))
            .await
            .unwrap();
        let client = Client::builder()
            .timeout(Duration::from_secs(30))
            .connect(options(&broker))
            .await
            .unwrap();
        assert_eq!(client.send::<u64>("echo", &1).await.unwrap(), 1);
        let in_flight: Vec<_> = (0..5)
            .map(|_| {
                let client = client.clone();
                tokio::spawn(async move { client.send::<String>("slow", &()).await })
            })
            .collect();
        sleep(Duration::from_millis(200)).await;
        broker.stop();
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
            killed.elapsed() < Duration::from_secs(2),
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

        broker.restart();
        // The client reconnects and restores its reply subscription ("echo.reply" was made
        // before the loss), the server subscribes again.
        support::until_echo_answers(&client, Duration::from_secs(10), Duration::from_millis(50))
            .await;
        for n in 1..=20u32 {
            client.emit("stored", &n).await.unwrap();
        }
        eventually("events after the restart", Duration::from_secs(5), || {
            stored.lock().unwrap().len() == 20
        })
        .await;
        server.shutdown().await;
        drop(client);
    }
    let sockets_after = settles_to(open_sockets, sockets).await;
    if sockets_after > sockets {
        for entry in std::fs::read_dir("/proc/self/fd").unwrap() {
            let path = entry.unwrap().path();
            eprintln!("{} -> {:?}", path.display(), std::fs::read_link(&path));
        }
    }
    assert!(
        sockets_after <= sockets,
        "sockets leaked: {sockets} before, {sockets_after} after"
    );
    let tasks_after = settles_to(alive_tasks, tasks).await;
    assert!(
        tasks_after <= tasks,
        "tasks leaked: {tasks} before, {tasks_after} after"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connecting_to_no_redis_fails_at_once_with_a_clear_error() {
    let _serial = SERIAL.lock().await;
    let port = support::free_port();
    let started = Instant::now();
    let error = Client::builder()
        .connect(RedisOptions::new(format!("redis://127.0.0.1:{port}")))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::Unavailable, "{error}");
    assert_eq!(error.transport_kind(), Some(TransportErrorKind::Connect));
    assert!(
        error.message().contains("cannot connect to Redis"),
        "{error}"
    );
    let error = RedisServer::new(RedisOptions::new(format!("redis://127.0.0.1:{port}")))
        .serve(Server::new(Router::new().message("echo", || async { 1 })))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::Unavailable, "{error}");
    assert!(started.elapsed() < Duration::from_secs(3));
    for url in ["not a url", "rediss://127.0.0.1:6379"] {
        let error = Client::builder()
            .connect(RedisOptions::new(url))
            .await
            .unwrap_err();
        assert_eq!(error.code(), Code::InvalidArgument, "{url}: {error}");
    }
}

fn instance_router(name: &'static str, events: Arc<Mutex<Vec<&'static str>>>) -> Router {
    Router::new()
        .message("whoami", move || async move { name })
        .message("count", |Payload(n): Payload<u32>| async move {
            Streaming(futures_util::stream::iter(1..=n).then(|i| async move {
                sleep(Duration::from_millis(5)).await;
                Ok::<u32, RpcError>(i)
            }))
        })
        .event("tick", move || {
            let events = Arc::clone(&events);
            async move { events.lock().unwrap().push(name) }
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn by_default_every_instance_gets_every_event() {
    let _serial = SERIAL.lock().await;
    let broker = Broker::start();
    let events = Arc::new(Mutex::new(Vec::new()));
    let a = RedisServer::new(options(&broker))
        .serve(Server::new(instance_router("a", Arc::clone(&events))))
        .await
        .unwrap();
    let b = RedisServer::new(options(&broker))
        .serve(Server::new(instance_router("b", Arc::clone(&events))))
        .await
        .unwrap();
    let client = Client::builder().connect(options(&broker)).await.unwrap();
    client.emit("tick", &()).await.unwrap();
    eventually(
        "both instances get the event",
        Duration::from_secs(5),
        || events.lock().unwrap().len() == 2,
    )
    .await;
    let mut got = events.lock().unwrap().clone();
    got.sort();
    assert_eq!(got, ["a", "b"]);
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_responder_answers_each_request_once_and_another_takes_over_when_it_stops() {
    let _serial = SERIAL.lock().await;
    let broker = Broker::start();
    let events = Arc::new(Mutex::new(Vec::new()));
    let ttl = Duration::from_millis(300);
    let a = RedisServer::new(options(&broker))
        .single_responder("users", ttl)
        .serve(Server::new(instance_router("a", Arc::clone(&events))))
        .await
        .unwrap();
    let client = Client::builder()
        .timeout(Duration::from_secs(5))
        .connect(options(&broker))
        .await
        .unwrap();
    // "a" is alone: it takes the lease at once.
    let deadline = Instant::now() + Duration::from_secs(5);
    while client.send::<String>("whoami", &()).await.is_err() {
        assert!(Instant::now() < deadline, "no responder elected");
        sleep(Duration::from_millis(20)).await;
    }
    let b = RedisServer::new(options(&broker))
        .single_responder("users", ttl)
        .serve(Server::new(instance_router("b", Arc::clone(&events))))
        .await
        .unwrap();
    sleep(ttl).await;
    for _ in 0..10 {
        assert_eq!(client.send::<String>("whoami", &()).await.unwrap(), "a");
        // Not doubled, as it would be with two subscribed instances.
        let counts: Vec<u32> = client
            .send_stream::<u32>("count", &3)
            .await
            .unwrap()
            .map(Result::unwrap)
            .collect()
            .await;
        assert_eq!(counts, [1, 2, 3]);
    }
    client.emit("tick", &()).await.unwrap();
    sleep(Duration::from_millis(100)).await;
    assert_eq!(*events.lock().unwrap(), ["a"]);

    // The responder stops (and gives the lease up): "b" takes over within a renewal period.
    a.shutdown().await;
    let stopped = Instant::now();
    loop {
        match client.send::<String>("whoami", &()).await {
            Ok(name) => {
                assert_eq!(name, "b");
                break;
            }
            Err(error) => {
                assert_eq!(error.code(), Code::Unavailable, "{error}");
                assert!(stopped.elapsed() < ttl * 4, "nobody took over: {error}");
                sleep(Duration::from_millis(10)).await;
            }
        }
    }
    b.shutdown().await;
}

async fn durable_server(
    broker: &Broker,
    durable: DurableEvents,
    router: Router,
) -> palisade::rpc::ServerHandle {
    RedisServer::new(options(broker))
        .durable_events(durable)
        .serve(Server::new(router).grace_period(Duration::from_millis(50)))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_reader_whose_connection_goes_silent_reconnects() {
    let _serial = SERIAL.lock().await;
    let broker = Broker::start();
    let proxy = Proxy::start(broker.port()).await;
    let handled: Arc<Mutex<Vec<u64>>> = Arc::default();
    let router = Router::new().event("shipment", {
        let handled = Arc::clone(&handled);
        move |Payload(n): Payload<u64>| {
            handled.lock().unwrap().push(n);
            async {}
        }
    });
    let has = |n: u64| handled.lock().unwrap().contains(&n);
    let server = RedisServer::new(
        RedisOptions::new(format!("redis://127.0.0.1:{}", proxy.port()))
            .response_timeout(Duration::from_millis(500))
            .reconnect_backoff(Duration::from_millis(20), Duration::from_millis(300)),
    )
    .durable_events(DurableEvents::new("logistics"))
    .serve(Server::new(router).grace_period(Duration::from_millis(50)))
    .await
    .unwrap();
    let emitter = Client::builder()
        .connect(RedisTransport::new(options(&broker)).durable_events())
        .await
        .unwrap();
    emitter.emit("shipment", &1).await.unwrap();
    eventually("the first event", Duration::from_secs(10), || has(1)).await;
    // Its acknowledgement reaches Redis before the stall (a stalled acknowledgement would fail
    // the commands connection, and the reader would reconnect whatever it does).
    sleep(Duration::from_millis(300)).await;
    // The server's connections go silent; the next event must still be read, through a new one.
    proxy.stall();
    emitter.emit("shipment", &2).await.unwrap();
    eventually(
        "the event after the connection went silent",
        Duration::from_secs(10),
        || has(2),
    )
    .await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_events_stored_without_a_server_survive_a_consumer_killed_mid_handling() {
    let _serial = SERIAL.lock().await;
    let broker = Broker::start();
    let emitter = Client::builder()
        .connect(RedisTransport::new(options(&broker)).durable_events())
        .await
        .unwrap();
    // Stored by Redis although no server runs yet.
    for n in 0..10u32 {
        emitter.emit("order", &n).await.unwrap();
    }
    // The first consumer takes events and dies while handling the first one.
    let taken = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&taken);
    let doomed = durable_server(
        &broker,
        DurableEvents::new("billing").consumer("doomed"),
        Router::new().event("order", move |Payload(_): Payload<u32>| {
            counter.fetch_add(1, Ordering::SeqCst);
            std::future::pending::<()>()
        }),
    )
    .await;
    eventually(
        "the first consumer takes an event",
        Duration::from_secs(5),
        || taken.load(Ordering::SeqCst) > 0,
    )
    .await;
    doomed.shutdown().await;
    // More events while nobody reads.
    for n in 10..15u32 {
        emitter.emit("order", &n).await.unwrap();
    }
    let handled: Arc<Mutex<HashMap<u32, usize>>> = Arc::default();
    let seen = Arc::clone(&handled);
    let survivor = durable_server(
        &broker,
        DurableEvents::new("billing")
            .consumer("survivor")
            .claim_idle(Duration::from_millis(300)),
        Router::new().event("order", move |Payload(n): Payload<u32>| {
            let seen = Arc::clone(&seen);
            async move {
                *seen.lock().unwrap().entry(n).or_default() += 1;
            }
        }),
    )
    .await;
    eventually("every event handled", Duration::from_secs(10), || {
        handled.lock().unwrap().len() == 15
    })
    .await;
    sleep(Duration::from_millis(700)).await;
    // Every one exactly once here: the survivor acknowledged them, nothing is claimed again.
    assert!(
        handled.lock().unwrap().values().all(|&times| times == 1),
        "{:?}",
        handled.lock().unwrap()
    );
    survivor.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_durable_event_is_retried_with_backoff_and_a_poison_one_is_dead_lettered() {
    let _serial = SERIAL.lock().await;
    let broker = Broker::start();
    let attempts: Arc<Mutex<HashMap<String, Vec<Instant>>>> = Arc::default();
    let seen = Arc::clone(&attempts);
    let durable = DurableEvents::new("billing")
        .max_deliveries(3)
        .backoff([Duration::from_millis(100), Duration::from_millis(200)]);
    let dead_letters = durable.dead_letter_stream("order");
    let server = durable_server(
        &broker,
        durable,
        Router::new().event("order", move |Payload(kind): Payload<String>| {
            let seen = Arc::clone(&seen);
            async move {
                let tries = {
                    let mut seen = seen.lock().unwrap();
                    let tries = seen.entry(kind.clone()).or_default();
                    tries.push(Instant::now());
                    tries.len()
                };
                match kind.as_str() {
                    "poison" => Err(RpcError::exception("cannot bill this")),
                    "flaky" if tries == 1 => Err(RpcError::unavailable("database restarting")),
                    _ => Ok(()),
                }
            }
        }),
    )
    .await;
    let emitter = Client::builder()
        .connect(RedisTransport::new(options(&broker)).durable_events())
        .await
        .unwrap();
    for kind in ["poison", "flaky", "fine"] {
        emitter.emit("order", &kind).await.unwrap();
    }
    let redis = redis::Client::open(broker.url()).unwrap();
    let mut connection = redis.get_multiplexed_async_connection().await.unwrap();
    let started = Instant::now();
    let dead: Vec<(String, HashMap<String, String>)> = loop {
        let reply: redis::Value = redis::cmd("XRANGE")
            .arg(&dead_letters)
            .arg("-")
            .arg("+")
            .query_async(&mut connection)
            .await
            .unwrap();
        let entries: Vec<(String, HashMap<String, String>)> =
            redis::FromRedisValue::from_redis_value(reply).unwrap();
        if !entries.is_empty() {
            break entries;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "nothing dead-lettered"
        );
        sleep(Duration::from_millis(20)).await;
    };
    sleep(Duration::from_millis(300)).await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    let fields = &dead[0].1;
    assert_eq!(fields[BODY_FIELD], r#"{"pattern":"order","data":"poison"}"#);
    assert_eq!(fields[DEAD_LETTER_DELIVERIES], "3");
    assert_eq!(fields[DEAD_LETTER_SUBJECT], "order");
    assert!(
        fields[DEAD_LETTER_REASON].contains("cannot bill this"),
        "{fields:?}"
    );
    let attempts = attempts.lock().unwrap().clone();
    let poison = &attempts["poison"];
    assert_eq!(poison.len(), 3, "poison delivered 3 times");
    // Retried after the backoff, not at once.
    assert!(poison[1] - poison[0] >= Duration::from_millis(90));
    assert!(poison[2] - poison[1] >= Duration::from_millis(190));
    assert_eq!(attempts["flaky"].len(), 2, "flaky retried once, then done");
    assert_eq!(attempts["fine"].len(), 1);
    // Everything is acknowledged: nothing pending in the group.
    nothing_pending(&mut connection, "order", "billing").await;
    server.shutdown().await;
}

/// The reader's connections break while a failed event waits out its retry delay: the new
/// session takes up the consumer's history, but that event keeps its delay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_durable_event_keeps_its_retry_delay_when_the_reader_reconnects() {
    let _serial = SERIAL.lock().await;
    let broker = Broker::start();
    let attempts: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let seen = Arc::clone(&attempts);
    const DELAY: Duration = Duration::from_secs(3);
    let server = durable_server(
        &broker,
        DurableEvents::new("billing").backoff([DELAY]),
        Router::new().event("order", move |Payload(_): Payload<u32>| {
            let seen = Arc::clone(&seen);
            async move {
                let tries = {
                    let mut seen = seen.lock().unwrap();
                    seen.push(Instant::now());
                    seen.len()
                };
                if tries == 1 {
                    Err(RpcError::unavailable("database restarting"))
                } else {
                    Ok(())
                }
            }
        }),
    )
    .await;
    let emitter = Client::builder()
        .connect(RedisTransport::new(options(&broker)).durable_events())
        .await
        .unwrap();
    emitter.emit("order", &1u32).await.unwrap();
    eventually("the first delivery", Duration::from_secs(10), || {
        !attempts.lock().unwrap().is_empty()
    })
    .await;
    let redis = redis::Client::open(broker.url()).unwrap();
    let mut admin = redis.get_multiplexed_async_connection().await.unwrap();
    let killed = kill_normal_clients(&mut admin).await;
    assert!(killed >= 2, "{killed}");
    eventually("the retry", Duration::from_secs(10), || {
        attempts.lock().unwrap().len() == 2
    })
    .await;
    let attempts = attempts.lock().unwrap().clone();
    assert!(
        attempts[1] - attempts[0] >= DELAY - Duration::from_millis(100),
        "retried after {:?}, not after its delay",
        attempts[1] - attempts[0]
    );
    sleep(Duration::from_millis(300)).await;
    nothing_pending(&mut admin, "order", "billing").await;
    server.shutdown().await;
}

/// Has Redis kill every "normal" client connection but `admin`'s own: how many it killed.
async fn kill_normal_clients(admin: &mut redis::aio::MultiplexedConnection) -> u64 {
    redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("normal")
        .arg("SKIPME")
        .arg("yes")
        .query_async(admin)
        .await
        .unwrap()
}

/// Asserts that the group has acknowledged every entry of the stream.
async fn nothing_pending(
    connection: &mut redis::aio::MultiplexedConnection,
    stream: &str,
    group: &str,
) {
    let pending: redis::Value = redis::cmd("XPENDING")
        .arg(stream)
        .arg(group)
        .query_async(connection)
        .await
        .unwrap();
    let summary: (u64, Option<String>, Option<String>, redis::Value) =
        redis::FromRedisValue::from_redis_value(pending).unwrap();
    assert_eq!(summary.0, 0, "entries left unacknowledged: {summary:?}");
}

/// The entries of a stream, with their fields.
async fn stream_entries(
    connection: &mut redis::aio::MultiplexedConnection,
    stream: &str,
) -> Vec<(String, HashMap<String, String>)> {
    let reply: redis::Value = redis::cmd("XRANGE")
        .arg(stream)
        .arg("-")
        .arg("+")
        .query_async(connection)
        .await
        .unwrap();
    redis::FromRedisValue::from_redis_value(reply).unwrap()
}

/// An event whose handling never ends (it crashes or hangs its consumer; here the server shuts
/// down with the handler still running, which leaves it pending as a crash would) is taken up
/// by each start of the consumer: once more than `max_deliveries` deliveries have ended that
/// way it is dead-lettered without running the handler again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_no_consumer_ever_finishes_is_dead_lettered_after_max_deliveries() {
    never_finished_is_dead_lettered(false).await;
}

/// The same, with the last delivery claimed by another consumer (`XAUTOCLAIM`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_no_consumer_ever_finishes_is_dead_lettered_when_another_consumer_claims_it() {
    never_finished_is_dead_lettered(true).await;
}

async fn never_finished_is_dead_lettered(claimed_at_last: bool) {
    let _serial = SERIAL.lock().await;
    let broker = Broker::start();
    let consumer = |start: usize| {
        let name = if claimed_at_last && start == 3 {
            "billing-2"
        } else {
            "billing-1"
        };
        DurableEvents::new("billing")
            .consumer(name)
            .max_deliveries(2)
            .claim_idle(Duration::from_millis(100))
    };
    let durable = || consumer(1);
    let dead_letters = durable().dead_letter_stream("order");
    let emitter = Client::builder()
        .connect(RedisTransport::new(options(&broker)).durable_events())
        .await
        .unwrap();
    emitter.emit("order", &"crasher").await.unwrap();
    let redis = redis::Client::open(broker.url()).unwrap();
    let mut connection = redis.get_multiplexed_async_connection().await.unwrap();
    let runs = Arc::new(AtomicUsize::new(0));
    for start in 1..=3 {
        let counter = Arc::clone(&runs);
        let server = durable_server(
            &broker,
            consumer(start),
            Router::new().event("order", move |Payload(_): Payload<String>| {
                counter.fetch_add(1, Ordering::SeqCst);
                std::future::pending::<()>()
            }),
        )
        .await;
        if start < 3 {
            eventually("the handler runs", Duration::from_secs(10), || {
                runs.load(Ordering::SeqCst) == start
            })
            .await;
        } else {
            let started = Instant::now();
            while stream_entries(&mut connection, &dead_letters)
                .await
                .is_empty()
            {
                assert!(
                    started.elapsed() < Duration::from_secs(10),
                    "not dead-lettered; the handler ran {} times",
                    runs.load(Ordering::SeqCst)
                );
                sleep(Duration::from_millis(20)).await;
            }
        }
        server.shutdown().await;
    }
    assert_eq!(runs.load(Ordering::SeqCst), 2, "the handler ran again");
    let dead = stream_entries(&mut connection, &dead_letters).await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    let fields = &dead[0].1;
    assert_eq!(
        fields[BODY_FIELD],
        r#"{"pattern":"order","data":"crasher"}"#
    );
    assert_eq!(fields[DEAD_LETTER_DELIVERIES], "3");
    assert!(
        fields[DEAD_LETTER_REASON].contains("without an outcome"),
        "{fields:?}"
    );
    // Acknowledged: nothing pending in the group.
    nothing_pending(&mut connection, "order", "billing").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_restarted_under_its_name_takes_up_its_unacknowledged_events_at_once() {
    let _serial = SERIAL.lock().await;
    let broker = Broker::start();
    let emitter = Client::builder()
        .connect(RedisTransport::new(options(&broker)).durable_events())
        .await
        .unwrap();
    let taken = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&taken);
    let doomed = durable_server(
        &broker,
        DurableEvents::new("billing").consumer("billing-1"),
        Router::new().event("order", move |Payload(_): Payload<u32>| {
            counter.fetch_add(1, Ordering::SeqCst);
            std::future::pending::<()>()
        }),
    )
    .await;
    for n in 0..40u32 {
        emitter.emit("order", &n).await.unwrap();
    }
    eventually(
        "the consumer takes an event",
        Duration::from_secs(5),
        || taken.load(Ordering::SeqCst) > 0,
    )
    .await;
    doomed.shutdown().await;
    let handled: Arc<Mutex<HashMap<u32, usize>>> = Arc::default();
    let seen = Arc::clone(&handled);
    // The default claim_idle is a minute: only its own pending list can give it the events
    // in time.
    let back = durable_server(
        &broker,
        DurableEvents::new("billing").consumer("billing-1"),
        Router::new().event("order", move |Payload(n): Payload<u32>| {
            let seen = Arc::clone(&seen);
            async move {
                *seen.lock().unwrap().entry(n).or_default() += 1;
            }
        }),
    )
    .await;
    eventually("every event handled", Duration::from_secs(5), || {
        handled.lock().unwrap().len() == 40
    })
    .await;
    back.shutdown().await;
}

/// The publishing connections break while the subscriber connections stay up (Redis kills the
/// "normal" clients): both sides open new ones by themselves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishing_connections_killed_alone_are_reopened() {
    let _serial = SERIAL.lock().await;
    let broker = Broker::start();
    let server = RedisServer::new(options(&broker))
        .serve(Server::new(
            Router::new().message("echo", |Payload(v): Payload<u64>| async move { v }),
        ))
        .await
        .unwrap();
    let client = Client::builder()
        .timeout(Duration::from_secs(2))
        .connect(options(&broker))
        .await
        .unwrap();
    assert_eq!(client.send::<u64>("echo", &1).await.unwrap(), 1);
    let redis = redis::Client::open(broker.url()).unwrap();
    let mut admin = redis.get_multiplexed_async_connection().await.unwrap();
    let killed = kill_normal_clients(&mut admin).await;
    assert!(killed >= 2, "{killed}");
    // The client's publisher fails once (Unavailable), is reopened, then the server's reply
    // publisher (its caller times out once at most), then everything answers again.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut answered = 0;
    while answered < 3 {
        match client.send::<u64>("echo", &3).await {
            Ok(answer) => {
                assert_eq!(answer, 3);
                answered += 1;
            }
            Err(error) => {
                assert!(
                    matches!(error.code(), Code::Unavailable | Code::DeadlineExceeded),
                    "{error}"
                );
                assert!(Instant::now() < deadline, "never answered again: {error}");
            }
        }
    }
    server.shutdown().await;
}

/// A responder that loses its lease (here: it expired and a third party holds it, as when the
/// responder stalled) stops answering before anyone else takes over; once that lease expires (as
/// a crashed responder's does), an instance takes over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_responder_that_lost_its_lease_stands_by_and_an_expired_lease_is_taken_over() {
    let _serial = SERIAL.lock().await;
    let broker = Broker::start();
    let events = Arc::new(Mutex::new(Vec::new()));
    let ttl = Duration::from_millis(300);
    let a = RedisServer::new(options(&broker))
        .single_responder("users", ttl)
        .serve(Server::new(instance_router("a", Arc::clone(&events))))
        .await
        .unwrap();
    let b = RedisServer::new(options(&broker))
        .single_responder("users", ttl)
        .serve(Server::new(instance_router("b", Arc::clone(&events))))
        .await
        .unwrap();
    let client = Client::builder()
        .timeout(Duration::from_secs(2))
        .connect(options(&broker))
        .await
        .unwrap();
    let answers = |client: Client| async move { client.send::<String>("whoami", &()).await };
    let deadline = Instant::now() + Duration::from_secs(5);
    while answers(client.clone()).await.is_err() {
        assert!(Instant::now() < deadline, "no responder elected");
        sleep(Duration::from_millis(20)).await;
    }
    // A third party holds the lease for a while, as a stalled or crashed responder would.
    let redis = redis::Client::open(broker.url()).unwrap();
    let mut admin = redis.get_multiplexed_async_connection().await.unwrap();
    let hold = Duration::from_millis(1500);
    let _: () = redis::cmd("SET")
        .arg("palisade:responder:users")
        .arg("someone-else")
        .arg("PX")
        .arg(hold.as_millis() as u64)
        .query_async(&mut admin)
        .await
        .unwrap();
    let stolen = Instant::now();
    // The holder finds out at its next renewal and stops answering; nobody else may answer.
    loop {
        match answers(client.clone()).await {
            Ok(_) => assert!(
                stolen.elapsed() < ttl,
                "still answered {:?} after losing the lease",
                stolen.elapsed()
            ),
            Err(error) => {
                assert_eq!(error.code(), Code::Unavailable, "{error}");
                break;
            }
        }
        sleep(Duration::from_millis(10)).await;
    }
    while stolen.elapsed() < hold - Duration::from_millis(200) {
        let error = answers(client.clone()).await.unwrap_err();
        assert_eq!(
            error.code(),
            Code::Unavailable,
            "answered while another held the lease"
        );
        sleep(Duration::from_millis(50)).await;
    }
    // The foreign lease expires: an instance takes it and answers.
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        match answers(client.clone()).await {
            Ok(name) => {
                assert!(name == "a" || name == "b");
                break;
            }
            Err(error) => {
                assert!(Instant::now() < deadline, "nobody took over: {error}");
                sleep(Duration::from_millis(20)).await;
            }
        }
    }
    a.shutdown().await;
    b.shutdown().await;
}

/// Redis goes silent without closing the connections (here: `CLIENT PAUSE`, as a network
/// partition would): the health check notices, requests in flight fail instead of waiting for
/// their deadline, and everything comes back once Redis answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_redis_is_noticed_by_the_health_check() {
    let _serial = SERIAL.lock().await;
    let broker = Broker::start();
    let options = || {
        options(&broker)
            .health_check(Duration::from_millis(100))
            .response_timeout(Duration::from_millis(300))
    };
    let server = RedisServer::new(options())
        .serve(
            Server::new(
                Router::new()
                    .message("slow", || async {
                        sleep(Duration::from_secs(60)).await;
                        "never"
                    })
                    .message("echo", |Payload(v): Payload<u64>| async move { v }),
            )
            .grace_period(Duration::from_millis(100)),
        )
        .await
        .unwrap();
    let client = Client::builder()
        .timeout(Duration::from_secs(30))
        .connect(options())
        .await
        .unwrap();
    assert_eq!(client.send::<u64>("echo", &1).await.unwrap(), 1);
    let slow = {
        let client = client.clone();
        tokio::spawn(async move { client.send::<String>("slow", &()).await })
    };
    sleep(Duration::from_millis(100)).await;
    let redis = redis::Client::open(broker.url()).unwrap();
    let mut admin = redis.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(2000)
        .arg("ALL")
        .query_async(&mut admin)
        .await
        .unwrap();
    let paused = Instant::now();
    let error = tokio::time::timeout(Duration::from_secs(5), slow)
        .await
        .expect("the request in flight waited for its deadline")
        .unwrap()
        .unwrap_err();
    assert_eq!(
        error.transport_kind(),
        Some(TransportErrorKind::ConnectionLost),
        "{error}"
    );
    assert!(
        paused.elapsed() < Duration::from_millis(1500),
        "{:?}",
        paused.elapsed()
    );
    support::until_echo_answers(&client, Duration::from_secs(10), Duration::from_millis(50)).await;
    server.shutdown().await;
}

/// `Duration::MAX` means "never" in the timing options: a health check never due, events never
/// claimed from another consumer, a retry never due. Each overflowed the clock and panicked a
/// task: the client's supervisor (no reply was ever delivered), and the durable reader (its
/// route stopped with no error anywhere).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timing_options_of_duration_max_mean_never() {
    let _serial = SERIAL.lock().await;
    let broker = Broker::start();
    let never = || options(&broker).health_check(Duration::MAX);
    let handled: Arc<Mutex<Vec<String>>> = Arc::default();
    let seen = Arc::clone(&handled);
    let server = RedisServer::new(never())
        .durable_events(
            DurableEvents::new("billing")
                .claim_idle(Duration::MAX)
                .max_deliveries(5)
                .backoff([Duration::MAX]),
        )
        .serve(Server::new(
            Router::new()
                .message("echo", |Payload(v): Payload<u64>| async move { v })
                .event("order", move |Payload(kind): Payload<String>| {
                    let seen = Arc::clone(&seen);
                    async move {
                        seen.lock().unwrap().push(kind.clone());
                        if kind == "flaky" {
                            return Err(RpcError::unavailable("database restarting"));
                        }
                        Ok(())
                    }
                }),
        ))
        .await
        .unwrap();
    let client = Client::builder()
        .timeout(Duration::from_secs(5))
        .connect(RedisTransport::new(never()).durable_events())
        .await
        .unwrap();
    assert_eq!(client.send::<u64>("echo", &7).await.unwrap(), 7);
    // The flaky event waits for a retry that is never due; the next one is handled.
    client.emit("order", &"flaky").await.unwrap();
    client.emit("order", &"fine").await.unwrap();
    eventually("the next event", Duration::from_secs(5), || {
        handled.lock().unwrap().iter().any(|kind| kind == "fine")
    })
    .await;
    sleep(Duration::from_millis(300)).await;
    assert_eq!(client.send::<u64>("echo", &8).await.unwrap(), 8);
    let handled = handled.lock().unwrap().clone();
    assert_eq!(handled, ["flaky", "fine"]);
    server.shutdown().await;
}

/// A single responder busy to its limit (`max_in_flight`) keeps renewing its lease: the
/// renewals ran in its read loop, which waits for a free slot before it reads on, so a busy
/// responder let its lease expire, a standby took over, and both answered the requests that
/// followed (each handled twice).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_single_responder_keeps_its_lease_and_each_request_is_handled_once() {
    let _serial = SERIAL.lock().await;
    let broker = Broker::start();
    let ttl = Duration::from_millis(300);
    let runs: Arc<Mutex<Vec<(&'static str, u32)>>> = Arc::default();
    let router = |name: &'static str| {
        let runs = Arc::clone(&runs);
        Router::new()
            .message("whoami", move || async move { name })
            .message("slow", move |Payload(n): Payload<u32>| {
                runs.lock().unwrap().push((name, n));
                async move {
                    sleep(Duration::from_millis(400)).await;
                    n
                }
            })
    };
    let a = RedisServer::new(options(&broker))
        .single_responder("users", ttl)
        .serve(Server::new(router("a")).max_in_flight(1))
        .await
        .unwrap();
    let client = Client::builder()
        .timeout(Duration::from_secs(30))
        .connect(options(&broker))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while client.send::<String>("whoami", &()).await.ok().as_deref() != Some("a") {
        assert!(Instant::now() < deadline, "a never took the lease");
        sleep(Duration::from_millis(50)).await;
    }
    let b = RedisServer::new(options(&broker))
        .single_responder("users", ttl)
        .serve(Server::new(router("b")).max_in_flight(1))
        .await
        .unwrap();
    // Requests keep coming while "a" is busy: more than it handles in the lease's time.
    let mut calls = Vec::new();
    for n in 0..10u32 {
        let client = client.clone();
        calls.push(tokio::spawn(
            async move { client.send::<u32>("slow", &n).await },
        ));
        sleep(Duration::from_millis(150)).await;
    }
    for (n, call) in calls.into_iter().enumerate() {
        assert_eq!(call.await.unwrap().unwrap(), n as u32);
    }
    sleep(Duration::from_millis(500)).await;
    let runs = runs.lock().unwrap().clone();
    let mut handled: Vec<u32> = runs.iter().map(|(_, n)| *n).collect();
    handled.sort_unstable();
    assert_eq!(handled, (0..10).collect::<Vec<_>>(), "{runs:?}");
    a.shutdown().await;
    b.shutdown().await;
}

/// The reply channels of routes no longer called are unsubscribed once idle (never while a
/// request on them waits), and subscribed again when called again: before, every route ever
/// called kept its `<route>.reply` subscription for the life of the client, so a process
/// calling patterns that carry ids gathered subscriptions, memory and other clients' replies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reply_channels_of_routes_no_longer_called_are_dropped() {
    let _serial = SERIAL.lock().await;
    let broker = Broker::start();
    let server = RedisServer::new(options(&broker))
        .serve(Server::new(
            Router::new()
                .message("echo", |Payload(n): Payload<u64>| async move { n })
                .message("slow", || async {
                    sleep(Duration::from_millis(2500)).await;
                    "done"
                }),
        ))
        .await
        .unwrap();
    let client = Client::builder()
        .timeout(Duration::from_secs(10))
        .connect(options(&broker).reply_idle(Duration::from_secs(1)))
        .await
        .unwrap();
    let redis = redis::Client::open(broker.url()).unwrap();
    let mut commands = redis.get_multiplexed_async_connection().await.unwrap();
    let mut reply_channels = async || -> Vec<String> {
        let mut channels: Vec<String> = redis::cmd("PUBSUB")
            .arg("CHANNELS")
            .arg("*.reply")
            .query_async(&mut commands)
            .await
            .unwrap();
        channels.sort();
        channels
    };
    // Routes carrying ids: nobody serves them, each is called once.
    for n in 0..50 {
        let error = client
            .send::<u64>(format!("user.{n}").as_str(), &n)
            .await
            .unwrap_err();
        assert_eq!(error.code(), Code::Unavailable, "{error}");
    }
    assert_eq!(client.send::<u64>("echo", &1).await.unwrap(), 1);
    // Not idle yet (the sweeps run every tenth of the idle time).
    sleep(Duration::from_millis(400)).await;
    assert_eq!(reply_channels().await.len(), 51);
    // A request waiting longer than the idle time keeps its channel.
    let slow = {
        let client = client.clone();
        tokio::spawn(async move { client.send::<String>("slow", &()).await })
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while reply_channels().await != ["slow.reply"] {
        assert!(
            Instant::now() < deadline,
            "idle channels kept: {:?}",
            reply_channels().await
        );
        sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(slow.await.unwrap().unwrap(), "done");
    // Called again: subscribed again, answered.
    assert_eq!(client.send::<u64>("echo", &2).await.unwrap(), 2);
    assert!(reply_channels().await.contains(&"echo.reply".to_owned()));
    server.shutdown().await;
}

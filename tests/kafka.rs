//! Kafka's own guarantees on a real broker (Tansu, memory storage): partitions handled
//! concurrently and each in order, failing events retried then dead-lettered, and a consumer
//! killed in the middle of a stream losing no event.
#![cfg(feature = "kafka")]

mod support;

use palisade::rpc::transport::ServerTransport;
use palisade::rpc::transport::kafka::{
    DEAD_LETTER_OFFSET, DEAD_LETTER_PARTITION, KafkaEvents, KafkaOptions, KafkaRecord, KafkaServer,
    KafkaTransport,
};
use palisade::rpc::transport::{DEAD_LETTER_DELIVERIES, DEAD_LETTER_REASON, DEAD_LETTER_SUBJECT};
use palisade::rpc::{Client, Code, Headers, Payload, Router, RpcError, Server, ServerHandle};
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::kafka::Broker;

async fn client(options: KafkaOptions) -> Client {
    Client::builder()
        .timeout(Duration::from_secs(10))
        .connect(KafkaTransport::new(options))
        .await
        .unwrap()
}

async fn serve(options: KafkaOptions, router: Router) -> ServerHandle {
    KafkaServer::new(options)
        .serve(Server::new(router))
        .await
        .unwrap()
}

/// What the process holds: threads (librdkafka runs threads of its own per client, a main thread
/// and one per broker), tasks of the current runtime, and sockets.
struct Held {
    threads: usize,
    tasks: usize,
    sockets: usize,
}

impl Held {
    fn now() -> Held {
        use support::resources::{alive_tasks, open_sockets, threads};
        Held {
            threads: threads(),
            tasks: alive_tasks(),
            sockets: open_sockets(),
        }
    }

    /// Asserts that the process holds no more than it did, once it settled.
    async fn are_all_released_again(&self) {
        use support::resources::{alive_tasks, open_sockets, settles_to, threads};
        let leaks = [
            ("threads", self.threads, threads as fn() -> usize),
            ("tasks", self.tasks, alive_tasks),
            ("sockets", self.sockets, open_sockets),
        ];
        for (what, before, count) in leaks {
            let after = settles_to(count, before).await;
            assert!(
                after <= before,
                "{what} leaked: {before} before, {after} after"
            );
        }
    }
}

/// Waits until `done` holds, for at most `within`.
async fn eventually(within: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_are_handled_concurrently_and_the_records_of_each_in_order() {
    let broker = Broker::start();
    let options = support::kafka::options(&broker);
    let seen: Arc<Mutex<Vec<(String, u64)>>> = Arc::default();
    let other_partition_ran = Arc::new(tokio::sync::Notify::new());
    let blocked_for = Arc::new(Mutex::new(None));
    let router = Router::new().event("orders", {
        let (seen, other, blocked_for) = (
            Arc::clone(&seen),
            Arc::clone(&other_partition_ran),
            Arc::clone(&blocked_for),
        );
        move |Payload(event): Payload<Value>| {
            let (seen, other, blocked_for) = (
                Arc::clone(&seen),
                Arc::clone(&other),
                Arc::clone(&blocked_for),
            );
            async move {
                let key = event["key"].as_str().unwrap().to_owned();
                let seq = event["seq"].as_u64().unwrap();
                if key == "blocker" {
                    // Holds partition 0 until a record of partition 1 was handled: a server that
                    // handled one record at a time (as NestJS's does) would never get there.
                    let started = Instant::now();
                    let woke =
                        tokio::time::timeout(Duration::from_secs(10), other.notified()).await;
                    *blocked_for.lock().unwrap() = Some((woke.is_ok(), started.elapsed()));
                } else if key == "other" {
                    other.notify_one();
                } else {
                    // Uneven handling times, so that a reordering would show.
                    tokio::time::sleep(Duration::from_millis(seq * 7 % 5)).await;
                }
                seen.lock().unwrap().push((key, seq));
            }
        }
    });
    let server = serve(options.clone(), router).await;
    let client = client(options).await;

    client
        .emit(
            "orders",
            &KafkaRecord::new(json!({"key": "blocker", "seq": 0})).partition(0),
        )
        .await
        .unwrap();
    client
        .emit(
            "orders",
            &KafkaRecord::new(json!({"key": "other", "seq": 0})).partition(1),
        )
        .await
        .unwrap();
    // Records with a key: each key's records land on one partition, in the order produced.
    let keys = ["k1", "k2", "k3", "k4", "k5", "k6"];
    for seq in 0..30u64 {
        for key in keys {
            client
                .emit(
                    "orders",
                    &KafkaRecord::new(json!({"key": key, "seq": seq})).key(key),
                )
                .await
                .unwrap();
        }
    }
    eventually(Duration::from_secs(30), "every record", || {
        seen.lock().unwrap().len() == 2 + 30 * keys.len()
    })
    .await;
    server.shutdown().await;

    let (woke, waited) = blocked_for.lock().unwrap().unwrap();
    assert!(woke, "partition 1 waited for partition 0 ({waited:?})");
    let mut per_key: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for (key, seq) in seen.lock().unwrap().iter() {
        per_key.entry(key.clone()).or_default().push(*seq);
    }
    for key in keys {
        assert_eq!(
            per_key[key],
            (0..30).collect::<Vec<_>>(),
            "records of {key}"
        );
    }
}

/// Records beyond a partition's queue (256): the records each handler saw, as `(key, seq)`.
type Seen = Arc<Mutex<Vec<(String, u64)>>>;

/// Emits `count` records `{"key": key, "seq": 0..count}` to `partition` of `orders`, in order.
async fn emit_sequence(client: &Client, key: &str, partition: i32, count: u64) {
    for seq in 0..count {
        client
            .emit(
                "orders",
                &KafkaRecord::new(json!({"key": key, "seq": seq})).partition(partition),
            )
            .await
            .unwrap();
    }
}

/// A server's router that records each `orders` event it handles in `seen`.
fn recording(seen: &Seen) -> Router {
    let seen = Arc::clone(seen);
    Router::new().event("orders", move |Payload(event): Payload<Value>| {
        let seen = Arc::clone(&seen);
        async move {
            let key = event["key"].as_str().unwrap().to_owned();
            seen.lock()
                .unwrap()
                .push((key, event["seq"].as_u64().unwrap()));
        }
    })
}

/// The `seq`s of `key`'s records in the order they were handled.
fn sequence_of(seen: &Seen, key: &str) -> Vec<u64> {
    seen.lock()
        .unwrap()
        .iter()
        .filter(|(k, _)| k == key)
        .map(|(_, seq)| *seq)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_far_behind_is_paused_and_the_others_go_on_then_it_resumes_in_order() {
    let broker = Broker::start();
    let options = support::kafka::options(&broker);
    let seen: Seen = Arc::default();
    let other_partition_ran = Arc::new(tokio::sync::Notify::new());
    let blocked_for = Arc::new(Mutex::new(None));
    let router = Router::new().event("orders", {
        let (seen, other, blocked_for) = (
            Arc::clone(&seen),
            Arc::clone(&other_partition_ran),
            Arc::clone(&blocked_for),
        );
        move |Payload(event): Payload<Value>| {
            let (seen, other, blocked_for) = (
                Arc::clone(&seen),
                Arc::clone(&other),
                Arc::clone(&blocked_for),
            );
            async move {
                let key = event["key"].as_str().unwrap().to_owned();
                if key == "blocker" {
                    // Holds partition 0, its queue filling up behind it, until a record of
                    // partition 1 read after all of them was handled.
                    let started = Instant::now();
                    let woke =
                        tokio::time::timeout(Duration::from_secs(20), other.notified()).await;
                    *blocked_for.lock().unwrap() = Some((woke.is_ok(), started.elapsed()));
                } else if key == "other" {
                    other.notify_one();
                }
                seen.lock()
                    .unwrap()
                    .push((key, event["seq"].as_u64().unwrap()));
            }
        }
    });
    let server = serve(options.clone(), router).await;
    let client = client(options).await;

    emit_sequence(&client, "blocker", 0, 1).await;
    // More than the queue holds, so that a consumer loop waiting for room would never read on.
    const BEHIND: u64 = 700;
    emit_sequence(&client, "behind", 0, BEHIND).await;
    emit_sequence(&client, "other", 1, 1).await;
    eventually(Duration::from_secs(60), "every record", || {
        seen.lock().unwrap().len() == 2 + BEHIND as usize
    })
    .await;
    server.shutdown().await;

    let (woke, waited) = blocked_for.lock().unwrap().unwrap();
    assert!(
        woke,
        "partition 1 waited for partition 0's queue ({waited:?})"
    );
    // Held while the partition was paused, then fetched again from after them: each record once,
    // in order.
    assert_eq!(
        sequence_of(&seen, "behind"),
        (0..BEHIND).collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_partition_that_moves_away_and_comes_back_is_read_again_and_its_commit_kept() {
    let broker = Broker::start();
    let options = support::kafka::options(&broker);
    let (release, released) = tokio::sync::watch::channel(false);
    let blockers_started = Arc::new(AtomicU32::new(0));
    let seen_by_a: Seen = Arc::default();
    let router_a = Router::new().event("orders", {
        let (seen, started) = (Arc::clone(&seen_by_a), Arc::clone(&blockers_started));
        move |Payload(event): Payload<Value>| {
            let (seen, started, mut released) =
                (Arc::clone(&seen), Arc::clone(&started), released.clone());
            async move {
                let key = event["key"].as_str().unwrap().to_owned();
                if key == "blocker" {
                    started.fetch_add(1, Ordering::SeqCst);
                    let _ =
                        tokio::time::timeout(Duration::from_secs(60), released.wait_for(|r| *r))
                            .await;
                }
                seen.lock()
                    .unwrap()
                    .push((key, event["seq"].as_u64().unwrap()));
            }
        }
    });
    let a = serve(options.clone(), router_a).await;
    let client = client(options.clone()).await;
    emit_sequence(&client, "blocker", 0, 1).await;
    emit_sequence(&client, "blocker", 1, 1).await;
    eventually(Duration::from_secs(20), "both partitions blocked", || {
        blockers_started.load(Ordering::SeqCst) == 2
    })
    .await;
    // Both partitions' queues overflow: server A pauses both.
    const BEHIND: u64 = 400;
    emit_sequence(&client, "behind-0", 0, BEHIND).await;
    emit_sequence(&client, "behind-1", 1, BEHIND).await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Server B joins the group and takes one of the two partitions, with the records A held.
    let seen_by_b: Seen = Arc::default();
    let router_b = recording(&seen_by_b);
    let b = serve(options.clone(), router_b).await;
    eventually(
        Duration::from_secs(30),
        "server B through one partition",
        || {
            [
                sequence_of(&seen_by_b, "behind-0"),
                sequence_of(&seen_by_b, "behind-1"),
            ]
            .iter()
            .any(|sequence| sequence.len() == BEHIND as usize)
        },
    )
    .await;
    let moved: i32 = if sequence_of(&seen_by_b, "behind-0").len() == BEHIND as usize {
        0
    } else {
        1
    };
    let kept = 1 - moved;
    // Server B leaves: the partition goes back to A, which paused it before it moved, and whose
    // revoked worker there still holds its blocker.
    b.shutdown().await;
    emit_sequence(&client, &format!("after-{moved}"), moved, 1).await;
    eventually(
        Duration::from_secs(30),
        "server A reading the partition that came back",
        || sequence_of(&seen_by_a, &format!("after-{moved}")).len() == 1,
    )
    .await;
    // The revoked worker finishes its record only now, after the partition's new worker went
    // further: it must not set the partition's commit back.
    release.send_replace(true);
    emit_sequence(&client, &format!("after-{kept}"), kept, 1).await;
    eventually(
        Duration::from_secs(30),
        "server A through the partition it kept",
        || sequence_of(&seen_by_a, &format!("after-{kept}")).len() == 1,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    a.shutdown().await;

    // Server C starts where the group's commits say: it gets what comes now, and nothing again.
    let seen_by_c: Seen = Arc::default();
    let router_c = recording(&seen_by_c);
    let c = serve(options.clone(), router_c).await;
    emit_sequence(&client, "last-0", 0, 1).await;
    emit_sequence(&client, "last-1", 1, 1).await;
    eventually(
        Duration::from_secs(30),
        "server C at the new records",
        || {
            sequence_of(&seen_by_c, "last-0").len() == 1
                && sequence_of(&seen_by_c, "last-1").len() == 1
        },
    )
    .await;
    c.shutdown().await;
    let again: Vec<String> = seen_by_c
        .lock()
        .unwrap()
        .iter()
        .map(|(key, _)| key.clone())
        .filter(|key| !key.starts_with("last-"))
        .collect();
    assert!(
        again.is_empty(),
        "{} records handled again after a restart, from {:?}",
        again.len(),
        again.first()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitions_first_record_still_in_hand_when_it_moves_is_handled_by_its_next_owner() {
    let broker = Broker::start();
    let options = support::kafka::options(&broker);
    let (release, released) = tokio::sync::watch::channel(false);
    let started = Arc::new(AtomicU32::new(0));
    let router_a = Router::new().event("orders", {
        let started = Arc::clone(&started);
        move |Payload(_): Payload<Value>| {
            let (started, mut released) = (Arc::clone(&started), released.clone());
            async move {
                started.fetch_add(1, Ordering::SeqCst);
                let _ =
                    tokio::time::timeout(Duration::from_secs(60), released.wait_for(|r| *r)).await;
            }
        }
    });
    let a = serve(options.clone(), router_a).await;
    let client = client(options.clone()).await;
    // The first records ever of both partitions: the group has committed no offset for them.
    emit_sequence(&client, "first-0", 0, 1).await;
    emit_sequence(&client, "first-1", 1, 1).await;
    eventually(Duration::from_secs(20), "server A at both records", || {
        started.load(Ordering::SeqCst) == 2
    })
    .await;

    let seen_by_b: Seen = Arc::default();
    let router_b = recording(&seen_by_b);
    // B takes one partition from A, which has not finished its record: B must start before it,
    // not at the partition's end.
    let b = serve(options.clone(), router_b).await;
    eventually(
        Duration::from_secs(30),
        "server B at the record A had not finished",
        || !seen_by_b.lock().unwrap().is_empty(),
    )
    .await;
    release.send_replace(true);
    b.shutdown().await;
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_event_is_retried_then_dead_lettered_and_the_partition_goes_on() {
    let broker = Broker::start();
    let options = support::kafka::options(&broker);
    let attempts = Arc::new(AtomicU32::new(0));
    let handled: Arc<Mutex<Vec<u64>>> = Arc::default();
    let router = Router::new().event("payments", {
        let (attempts, handled) = (Arc::clone(&attempts), Arc::clone(&handled));
        move |Payload(event): Payload<Value>| {
            let (attempts, handled) = (Arc::clone(&attempts), Arc::clone(&handled));
            async move {
                if event["poison"] == true {
                    attempts.fetch_add(1, Ordering::SeqCst);
                    return Err(RpcError::invalid_argument("card number is not a number"));
                }
                handled.lock().unwrap().push(event["n"].as_u64().unwrap());
                Ok(())
            }
        }
    });
    let server = KafkaServer::new(options.clone())
        .events(
            KafkaEvents::new()
                .max_deliveries(3)
                .backoff([Duration::from_millis(20), Duration::from_millis(40)]),
        )
        .serve(Server::new(router))
        .await
        .unwrap();

    // A second service reads the dead letters, with their headers.
    let dead: Arc<Mutex<Vec<(Value, Headers)>>> = Arc::default();
    let dead_letters = Router::new().event("palisade.dead-letter.payments", {
        let dead = Arc::clone(&dead);
        move |headers: Headers, Payload(event): Payload<Value>| {
            dead.lock().unwrap().push((event, headers));
            async {}
        }
    });
    let auditor_options = support::kafka::options(&broker).from_beginning(true);
    let auditor = serve(auditor_options, dead_letters).await;

    let client = client(options).await;
    for n in 0..3u64 {
        client
            .emit("payments", &KafkaRecord::new(json!({"n": n})).partition(0))
            .await
            .unwrap();
    }
    client
        .emit(
            "payments",
            &KafkaRecord::new(json!({"n": 3, "poison": true})).partition(0),
        )
        .await
        .unwrap();
    for n in 4..7u64 {
        client
            .emit("payments", &KafkaRecord::new(json!({"n": n})).partition(0))
            .await
            .unwrap();
    }

    eventually(Duration::from_secs(30), "the dead letter", || {
        !dead.lock().unwrap().is_empty()
    })
    .await;
    eventually(Duration::from_secs(10), "the events after it", || {
        handled.lock().unwrap().len() == 6
    })
    .await;
    // In order around the poison event, each once.
    assert_eq!(*handled.lock().unwrap(), [0, 1, 2, 4, 5, 6]);
    assert_eq!(attempts.load(Ordering::SeqCst), 3);
    let (event, headers) = dead.lock().unwrap()[0].clone();
    assert_eq!(event, json!({"n": 3, "poison": true}));
    assert!(
        headers
            .get(DEAD_LETTER_REASON)
            .is_some_and(|reason| reason.contains("card number is not a number")),
        "{headers:?}"
    );
    assert_eq!(headers.get(DEAD_LETTER_DELIVERIES), Some("3"));
    assert_eq!(headers.get(DEAD_LETTER_SUBJECT), Some("payments"));
    assert_eq!(headers.get(DEAD_LETTER_PARTITION), Some("0"));
    assert_eq!(headers.get(DEAD_LETTER_OFFSET), Some("3"));
    // Only one dead letter, and nothing more tried after it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(dead.lock().unwrap().len(), 1);
    assert_eq!(attempts.load(Ordering::SeqCst), 3);
    server.shutdown().await;
    auditor.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_too_large_for_its_headers_still_goes_out_and_names_the_record() {
    use palisade::rpc::transport::kafka::DEAD_LETTER_VALUE_OMITTED;
    let broker = Broker::start();
    let options = support::kafka::options(&broker);
    let router = Router::new().event("scans", || async {
        Err::<(), _>(RpcError::invalid_argument("unreadable scan"))
    });
    // The server's producer takes records of up to 2 000 bytes: the failed record fits, and
    // with the dead letter's headers it does not.
    let server = KafkaServer::new(options.clone().max_message_bytes(2_000))
        .events(KafkaEvents::new().max_deliveries(1))
        .serve(Server::new(router))
        .await
        .unwrap();
    let dead: Arc<Mutex<Vec<(Value, Headers)>>> = Arc::default();
    let auditor = serve(
        support::kafka::options(&broker).from_beginning(true),
        Router::new().event("palisade.dead-letter.scans", {
            let dead = Arc::clone(&dead);
            move |headers: Headers, Payload(event): Payload<Value>| {
                dead.lock().unwrap().push((event, headers));
                async {}
            }
        }),
    )
    .await;
    let scan = "x".repeat(1_800);
    client(options)
        .await
        .emit(
            "scans",
            &KafkaRecord::new(json!({"scan": scan})).partition(1),
        )
        .await
        .unwrap();
    eventually(Duration::from_secs(30), "the dead letter", || {
        !dead.lock().unwrap().is_empty()
    })
    .await;
    let (event, headers) = dead.lock().unwrap()[0].clone();
    assert_eq!(event, Value::Null, "sent without the record's value");
    assert_eq!(headers.get(DEAD_LETTER_VALUE_OMITTED), Some("true"));
    assert_eq!(headers.get(DEAD_LETTER_PARTITION), Some("1"));
    assert_eq!(headers.get(DEAD_LETTER_OFFSET), Some("0"));
    assert!(
        headers
            .get(DEAD_LETTER_REASON)
            .is_some_and(|reason| reason.contains("unreadable scan")),
        "{headers:?}"
    );
    server.shutdown().await;
    auditor.shutdown().await;
}

/// A server on a runtime of its own, which the test can kill as a crash would: its tasks are
/// dropped wherever they are, handlers included.
struct Instance {
    runtime: Option<tokio::runtime::Runtime>,
}

impl Instance {
    fn start(options: KafkaOptions, router: Router) -> Instance {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let handle = runtime.block_on(async move {
            KafkaServer::new(options)
                .serve(Server::new(router))
                .await
                .unwrap()
        });
        // Dropping a handle leaves the server running.
        drop(handle);
        Instance {
            runtime: Some(runtime),
        }
    }

    fn kill(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.kill();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_still_failing_when_its_server_shuts_down_is_handled_after_the_restart() {
    use std::sync::atomic::AtomicBool;
    let broker = Broker::start();
    // From the beginning: a group with nothing committed starts a restarted server there, so
    // an event committed by mistake is the only way to miss it.
    let options = support::kafka::options(&broker).from_beginning(true);
    let attempts = Arc::new(AtomicU32::new(0));
    let healthy = Arc::new(AtomicBool::new(false));
    let handled = Arc::new(AtomicU32::new(0));
    let router = Router::new().event("invoices", {
        let (attempts, healthy, handled) = (
            Arc::clone(&attempts),
            Arc::clone(&healthy),
            Arc::clone(&handled),
        );
        move || {
            attempts.fetch_add(1, Ordering::SeqCst);
            let outcome = if healthy.load(Ordering::SeqCst) {
                handled.fetch_add(1, Ordering::SeqCst);
                Ok(())
            } else {
                Err(RpcError::unavailable("ledger down"))
            };
            async move { outcome }
        }
    });
    let events = || {
        KafkaEvents::new()
            .max_deliveries(5)
            .backoff([Duration::from_secs(1)])
    };
    let first = KafkaServer::new(options.clone())
        .events(events())
        .serve(Server::new(router.clone()))
        .await
        .unwrap();
    client(options.clone())
        .await
        .emit("invoices", &KafkaRecord::new(json!({"n": 1})).partition(0))
        .await
        .unwrap();
    eventually(Duration::from_secs(30), "the first failure", || {
        attempts.load(Ordering::SeqCst) >= 1
    })
    .await;
    // Shut down while the event waits for its next try: it is neither handled nor
    // dead-lettered, so it must not be committed.
    first.shutdown().await;
    healthy.store(true, Ordering::SeqCst);
    let second = KafkaServer::new(options)
        .events(events())
        .serve(Server::new(router))
        .await
        .unwrap();
    eventually(
        Duration::from_secs(30),
        "the event, after the restart",
        || handled.load(Ordering::SeqCst) == 1,
    )
    .await;
    second.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_killed_mid_stream_loses_no_event_and_the_group_shares_the_partitions() {
    let broker = Broker::start();
    // One group for both instances.
    let options = support::kafka::options(&broker).partitions(4);
    let recorder = |name: &'static str, seen: Arc<Mutex<Vec<(&'static str, u64)>>>| {
        Router::new().event("readings", move |Payload(event): Payload<Value>| {
            let seen = Arc::clone(&seen);
            async move {
                // Slower than the emits, so that the killed instance leaves records fetched but
                // not handled (a server that committed on receipt would lose them).
                tokio::time::sleep(Duration::from_millis(10)).await;
                seen.lock()
                    .unwrap()
                    .push((name, event["n"].as_u64().unwrap()));
            }
        })
    };
    let seen: Arc<Mutex<Vec<(&'static str, u64)>>> = Arc::default();
    let (a_options, a_router) = (options.clone(), recorder("a", Arc::clone(&seen)));
    let mut a = tokio::task::spawn_blocking(move || Instance::start(a_options, a_router))
        .await
        .unwrap();
    let (b_options, b_router) = (options.clone(), recorder("b", Arc::clone(&seen)));
    let b = tokio::task::spawn_blocking(move || Instance::start(b_options, b_router))
        .await
        .unwrap();

    let client = client(options).await;
    const EVENTS: u64 = 600;
    for n in 0..EVENTS {
        client
            .emit(
                "readings",
                &KafkaRecord::new(json!({"n": n})).partition((n % 4) as i32),
            )
            .await
            .unwrap();
        if n == EVENTS / 3 {
            // Both instances took part before the kill.
            eventually(Duration::from_secs(20), "both instances at work", || {
                let seen = seen.lock().unwrap();
                seen.iter().any(|(i, _)| *i == "a") && seen.iter().any(|(i, _)| *i == "b")
            })
            .await;
            tokio::task::spawn_blocking(move || a.kill()).await.unwrap();
            a = Instance { runtime: None };
        }
    }
    drop(a);
    eventually(
        Duration::from_secs(60),
        "every event, after the rebalance",
        || {
            let seen = seen.lock().unwrap();
            seen.iter().map(|(_, n)| *n).collect::<BTreeSet<_>>().len() == EVENTS as usize
        },
    )
    .await;
    let seen = seen.lock().unwrap().clone();
    // At least once: every event handled; a redelivery happens only to events the killed
    // instance had not committed.
    let distinct: BTreeSet<u64> = seen.iter().map(|(_, n)| *n).collect();
    assert_eq!(distinct, (0..EVENTS).collect());
    drop(b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_topic_creation_off_missing_topics_are_clear_errors() {
    let broker = Broker::start();
    let options = support::kafka::options(&broker)
        .create_topics(false)
        .join_timeout(Duration::from_secs(10));
    let served = tokio::time::timeout(
        Duration::from_secs(30),
        KafkaServer::new(options.clone())
            .serve(Server::new(Router::new().event("not-created", || async {}))),
    )
    .await
    .expect("serving fails at once instead of waiting for topics that will never come");
    let error = served.unwrap_err();
    assert_eq!(error.code(), Code::NotFound, "{error}");
    assert!(error.message().contains("not-created"), "{error}");
    assert!(error.message().contains("create_topics"), "{error}");
    // A client's emit to a missing topic fails the same way, with librdkafka's reason.
    let client = client(options).await;
    let error = client
        .emit("never-created", &json!({"x": 1}))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::NotFound, "{error}");
    assert!(error.message().contains("never-created"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_and_a_client_release_their_threads_tasks_and_sockets() {
    let broker = Broker::start();
    let options = support::kafka::options(&broker);
    let before = Held::now();
    for _ in 0..2 {
        let server = serve(
            options.clone(),
            Router::new()
                .message("echo", |Payload(v): Payload<Value>| async move { v })
                .event("noted", || async {}),
        )
        .await;
        let client = Client::builder()
            .connect(KafkaTransport::new(options.clone()).reply_to(["echo"]))
            .await
            .unwrap();
        let echoed: Value = client.send("echo", &json!({"n": 1})).await.unwrap();
        assert_eq!(echoed, json!({"n": 1}));
        client.emit("noted", &1).await.unwrap();
        drop(client);
        server.shutdown().await;
    }
    before.are_all_released_again().await;
}

/// A start dropped half way (here by timeouts spanning the start, the last ones while it waits
/// for the group to assign partitions, its consumer already running) leaves nothing running:
/// nobody holds a handle that could stop its consumer, which would otherwise take records on,
/// unseen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_whose_start_is_dropped_releases_its_threads_tasks_and_sockets() {
    let broker = Broker::start();
    let options = support::kafka::options(&broker);
    // The topic exists before the sweep, so that the starts spend their time joining the group.
    serve(options.clone(), Router::new().event("noted", || async {}))
        .await
        .shutdown()
        .await;
    let before = Held::now();
    let mut dropped = 0;
    for wait in [10, 20, 40, 80, 160, 320, 640, 1280, 2560] {
        let start = KafkaServer::new(options.clone())
            .serve(Server::new(Router::new().event("noted", || async {})));
        match tokio::time::timeout(Duration::from_millis(wait), start).await {
            Ok(started) => {
                started.unwrap().shutdown().await;
                break;
            }
            Err(_) => dropped += 1,
        }
    }
    assert!(dropped > 0, "no start was dropped");
    before.are_all_released_again().await;
}

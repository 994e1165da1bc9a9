//! Kafka through a Tansu broker of the bench's own (memory storage, loopback; the one
//! `cargo xtask deps` installs, or `PALISADE_TANSU`):
//!
//! - events: palisade's `emit` into a server's event handler, beside bare rdkafka loops doing the
//!   same work — an idempotent `acks=all` producer, a consumer group reading the topic — each
//!   measured from the first send until the consumer has seen the last event;
//! - request/reply: palisade's `send` to a server's handler and back.
//!
//! Both one at a time and 64 in flight, in the same run.

use criterion::{Criterion, criterion_group, criterion_main};
use futures::StreamExt;
use palisade::rpc::transport::ServerTransport;
use palisade::rpc::transport::kafka::{KafkaOptions, KafkaServer, KafkaTransport};
use palisade::rpc::{Client, Payload, Router, Server};
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

mod support;
use support::{in_tasks, until_count};

#[path = "../../tests/support/kafka.rs"]
mod kafka;

const PARTITIONS: i32 = 2;

/// The settings palisade's transport uses, for the bare loops.
fn bare_config(bootstrap: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "0")
        .set("message.timeout.ms", "5000");
    config
}

/// Counts the records of `topic` read by a consumer group of its own.
async fn bare_consumer(bootstrap: &str, topic: &str, seen: Arc<AtomicU64>) {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("bare-{}", std::process::id()))
        .set("session.timeout.ms", "2000")
        .set("heartbeat.interval.ms", "500")
        .set("fetch.wait.max.ms", "10")
        .set("auto.offset.reset", "earliest")
        .set("partition.assignment.strategy", "cooperative-sticky")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    tokio::spawn(async move {
        let mut stream = consumer.stream();
        // Ends when the broker goes away with the bench (a record missing before that shows as
        // `until` timing out).
        while let Some(Ok(_)) = stream.next().await {
            seen.fetch_add(1, Ordering::Relaxed);
        }
    });
}

fn kafka(c: &mut Criterion) {
    let broker = kafka::Broker::start();
    let bootstrap = broker.bootstrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let palisade_seen = Arc::new(AtomicU64::new(0));
    let bare_seen = Arc::new(AtomicU64::new(0));
    let (client, producer) = runtime.block_on(async {
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .create()
            .unwrap();
        admin
            .create_topics(
                &[NewTopic::new(
                    "bare-events",
                    PARTITIONS,
                    TopicReplication::Fixed(1),
                )],
                &AdminOptions::new(),
            )
            .await
            .unwrap();
        bare_consumer(&bootstrap, "bare-events", Arc::clone(&bare_seen)).await;
        let producer: FutureProducer = bare_config(&bootstrap).create().unwrap();

        let options = KafkaOptions::new([bootstrap.as_str()])
            .group_id(format!("bench-{}", std::process::id()))
            .session_timeout(Duration::from_secs(2))
            .fetch_wait(Duration::from_millis(10))
            .partitions(PARTITIONS);
        let seen = Arc::clone(&palisade_seen);
        let server = KafkaServer::new(options.clone())
            .serve(Server::new(
                Router::new()
                    .message("echo", |Payload(x): Payload<u64>| async move { x })
                    .event("note", move |Payload(_): Payload<u64>| {
                        seen.fetch_add(1, Ordering::Relaxed);
                        async {}
                    }),
            ))
            .await
            .unwrap();
        std::mem::forget(server);
        let client = Client::builder()
            .connect(KafkaTransport::new(options).reply_to(["echo"]))
            .await
            .unwrap();
        // The bare group joined and reads: one event through before measuring.
        producer
            .send(
                FutureRecord::<(), _>::to("bare-events").payload("0"),
                Duration::from_secs(5),
            )
            .await
            .unwrap();
        until_count(&bare_seen, 1).await;
        (client, producer)
    });
    let producer = Arc::new(producer);

    for (name, in_flight) in [("sequential", 1), ("64_in_flight", 64)] {
        let mut group = c.benchmark_group(format!("kafka/{name}"));
        group.bench_function("bare rdkafka produce + group consume", |b| {
            b.to_async(&runtime).iter_custom(|iters| {
                let (producer, seen) = (Arc::clone(&producer), Arc::clone(&bare_seen));
                async move {
                    let start = Instant::now();
                    let target = seen.load(Ordering::Relaxed) + iters;
                    in_tasks(iters, in_flight, move |x| {
                        let producer = Arc::clone(&producer);
                        async move {
                            let payload = x.to_string();
                            producer
                                .send(
                                    FutureRecord::<(), _>::to("bare-events").payload(&payload),
                                    Duration::from_secs(5),
                                )
                                .await
                                .unwrap();
                        }
                    })
                    .await;
                    until_count(&seen, target).await;
                    start.elapsed()
                }
            })
        });
        group.bench_function("palisade emit + event handler", |b| {
            b.to_async(&runtime).iter_custom(|iters| {
                let (client, seen) = (client.clone(), Arc::clone(&palisade_seen));
                async move {
                    let start = Instant::now();
                    let target = seen.load(Ordering::Relaxed) + iters;
                    in_tasks(iters, in_flight, move |x| {
                        let client = client.clone();
                        async move { client.emit("note", &x).await.unwrap() }
                    })
                    .await;
                    until_count(&seen, target).await;
                    start.elapsed()
                }
            })
        });
        group.bench_function("palisade send (request/reply)", |b| {
            b.to_async(&runtime).iter_custom(|iters| {
                let client = client.clone();
                in_tasks(iters, in_flight, move |x| {
                    let client = client.clone();
                    async move { assert_eq!(client.send::<u64>("echo", &x).await.unwrap(), x) }
                })
            })
        });
        group.finish();
    }
    drop(broker);
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
    targets = kafka
}
criterion_main!(benches);

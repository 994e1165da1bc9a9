//! Request/reply and confirmed events through the machine's RabbitMQ (127.0.0.1:5672,
//! guest/guest; `PALISADE_RABBITMQ_URL` overrides it): palisade's client and server beside bare
//! `lapin` loops doing the same work — requests published mandatory and confirmed, replies on
//! direct reply-to matched by correlation id, a server acknowledging after its confirmed reply,
//! the same prefetch — one at a time and 64 in flight, in the same run.

use criterion::{Criterion, criterion_group, criterion_main};
use futures::StreamExt;
use palisade::rpc::transport::ServerTransport;
use palisade::rpc::transport::rabbitmq::lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions,
};
use palisade::rpc::transport::rabbitmq::lapin::types::FieldTable;
use palisade::rpc::transport::rabbitmq::lapin::{self, BasicProperties, Confirmation};
use palisade::rpc::transport::rabbitmq::{QueueOptions, RmqOptions, RmqServer};
use palisade::rpc::{Client, Payload, Router, Server};
use serde_json::Value;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::oneshot;

mod support;
use support::in_tasks;

#[path = "../../tests/support/rabbitmq.rs"]
mod rabbitmq;

const PREFETCH: u16 = 64;

/// A bare lapin client: one confirm channel, direct reply-to, a correlation map.
struct BareClient {
    channel: lapin::Channel,
    queue: String,
    pending: Arc<Mutex<HashMap<String, oneshot::Sender<Vec<u8>>>>>,
    next: AtomicU64,
    _connection: lapin::Connection,
}

impl BareClient {
    async fn connect(url: &str, queue: &str) -> Arc<BareClient> {
        let connection = lapin::Connection::connect(url, lapin::ConnectionProperties::default())
            .await
            .unwrap();
        let channel = connection.create_channel().await.unwrap();
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        let mut replies = channel
            .basic_consume(
                "amq.rabbitmq.reply-to".into(),
                "".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        let pending: Arc<Mutex<HashMap<String, oneshot::Sender<Vec<u8>>>>> = Arc::default();
        let reader = Arc::clone(&pending);
        tokio::spawn(async move {
            while let Some(Ok(delivery)) = replies.next().await {
                let id = delivery.properties.correlation_id().clone().unwrap();
                if let Some(waiting) = reader.lock().unwrap().remove(id.as_str()) {
                    let _ = waiting.send(delivery.data);
                }
            }
        });
        Arc::new(BareClient {
            channel,
            queue: queue.to_owned(),
            pending,
            next: AtomicU64::new(0),
            _connection: connection,
        })
    }

    async fn call(&self, x: u64) -> u64 {
        let id = format!("{:021x}", self.next.fetch_add(1, Ordering::Relaxed));
        let (tx, rx) = oneshot::channel();
        self.pending.lock().unwrap().insert(id.clone(), tx);
        let body = format!(r#"{{"pattern":"echo","data":{x},"id":"{id}"}}"#);
        let confirmed = self
            .channel
            .basic_publish(
                "".into(),
                self.queue.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                body.as_bytes(),
                BasicProperties::default()
                    .with_correlation_id(id.as_str().into())
                    .with_reply_to("amq.rabbitmq.reply-to".into())
                    .with_delivery_mode(1),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert_eq!(confirmed, Confirmation::Ack(None));
        let reply: Value = serde_json::from_slice(&rx.await.unwrap()).unwrap();
        reply["response"].as_u64().unwrap()
    }

    async fn emit(&self, x: u64) {
        let body = format!(r#"{{"pattern":"note","data":{x}}}"#);
        let confirmed = self
            .channel
            .basic_publish(
                "".into(),
                self.queue.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                body.as_bytes(),
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert_eq!(confirmed, Confirmation::Ack(None));
    }
}

/// A bare lapin server: consumes with manual acks and the same prefetch, answers requests on a
/// confirm channel, acknowledges after the confirmation (events at once).
async fn bare_server(url: &str, queue: &str) -> lapin::Connection {
    let connection = lapin::Connection::connect(url, lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let consume = connection.create_channel().await.unwrap();
    consume
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    consume
        .basic_qos(PREFETCH, BasicQosOptions::default())
        .await
        .unwrap();
    let replies = connection.create_channel().await.unwrap();
    replies
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let mut deliveries = consume
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    tokio::spawn(async move {
        let _consume = consume;
        while let Some(Ok(delivery)) = deliveries.next().await {
            let replies = replies.clone();
            tokio::spawn(async move {
                let packet: Value = serde_json::from_slice(&delivery.data).unwrap();
                if let Some(reply_to) = delivery.properties.reply_to() {
                    let body = format!(r#"{{"response":{},"isDisposed":true}}"#, packet["data"]);
                    replies
                        .basic_publish(
                            "".into(),
                            reply_to.clone(),
                            BasicPublishOptions::default(),
                            body.as_bytes(),
                            BasicProperties::default().with_correlation_id(
                                delivery.properties.correlation_id().clone().unwrap(),
                            ),
                        )
                        .await
                        .unwrap()
                        .await
                        .unwrap();
                }
                delivery.ack(BasicAckOptions::default()).await.unwrap();
            });
        }
    });
    connection
}

fn rabbitmq(c: &mut Criterion) {
    let url = rabbitmq::machine_url();
    let (bare_queue, queue) = (rabbitmq::unique("bench-bare"), rabbitmq::unique("bench"));
    let _cleanup = rabbitmq::Cleanup::new(&url)
        .queue(&bare_queue)
        .service_queue(&queue, &[1000, 5000, 30000]);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (bare, palisade, _bare_server) = runtime.block_on(async {
        let bare_server = bare_server(&url, &bare_queue).await;
        let bare = BareClient::connect(&url, &bare_queue).await;
        let options = RmqOptions::new([url.as_str()])
            .queue(&queue)
            .queue_options(QueueOptions::default().durable(false).auto_delete(true))
            .prefetch_count(PREFETCH);
        let server = RmqServer::new(options.clone())
            .serve(Server::new(
                Router::new()
                    .message("echo", |Payload(x): Payload<u64>| async move { x })
                    .event("note", |Payload(_): Payload<u64>| async {}),
            ))
            .await
            .unwrap();
        std::mem::forget(server);
        let client = Client::builder().connect(options).await.unwrap();
        (bare, client, bare_server)
    });

    for (name, in_flight) in [("sequential", 1), ("64_in_flight", 64)] {
        let mut group = c.benchmark_group(format!("rabbitmq/{name}"));
        group.bench_function("bare lapin request", |b| {
            b.to_async(&runtime).iter_custom(|iters| {
                let bare = Arc::clone(&bare);
                in_tasks(iters, in_flight, move |x| {
                    let bare = Arc::clone(&bare);
                    async move { assert_eq!(bare.call(x).await, x) }
                })
            })
        });
        group.bench_function("palisade send", |b| {
            b.to_async(&runtime).iter_custom(|iters| {
                let client = palisade.clone();
                in_tasks(iters, in_flight, move |x| {
                    let client = client.clone();
                    async move { assert_eq!(client.send::<u64>("echo", &x).await.unwrap(), x) }
                })
            })
        });
        group.bench_function("bare lapin confirmed publish", |b| {
            b.to_async(&runtime).iter_custom(|iters| {
                let bare = Arc::clone(&bare);
                in_tasks(iters, in_flight, move |x| {
                    let bare = Arc::clone(&bare);
                    async move { bare.emit(x).await }
                })
            })
        });
        group.bench_function("palisade emit", |b| {
            b.to_async(&runtime).iter_custom(|iters| {
                let client = palisade.clone();
                in_tasks(iters, in_flight, move |x| {
                    let client = client.clone();
                    async move { client.emit("note", &x).await.unwrap() }
                })
            })
        });
        group.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    targets = rabbitmq
}
criterion_main!(benches);

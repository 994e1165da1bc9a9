//! An order service on NATS, NestJS-compatible: two instances in one queue group share the
//! requests (a NestJS `ClientProxy` with `Transport.NATS` could call them), and order events are
//! durable — stored in a JetStream stream, acknowledged only once handled, retried, then
//! dead-lettered.
//!
//! ```text
//! cargo run --example nats_orders --features nats    # NATS_URL, default nats://127.0.0.1:4222
//! ```
//!
//! On a cluster, give every instance all the nodes and the stream three replicas:
//! `DurableEvents::new("ORDERS").replicas(3)` (see the README's "Running on a NATS cluster").

use palisade::rpc::transport::IDEMPOTENCY_KEY;
use palisade::rpc::transport::nats::{DurableEvents, NatsOptions, NatsServer, NatsTransport};
use palisade::rpc::{
    Client, Headers, Pattern, Payload, RawJson, Router, RpcError, RpcRequest, Server,
};
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

fn instance(name: &'static str, served: Arc<AtomicU64>) -> Router {
    Router::new()
        .message("create-order", move |Payload(order): Payload<Value>| {
            served.fetch_add(1, Ordering::Relaxed);
            async move { json!({"accepted": order, "by": name}) }
        })
        .event(
            "order-created",
            move |headers: Headers, Payload(order): Payload<Value>| async move {
                if order["sku"] == "poison" {
                    return Err(RpcError::exception("this order cannot be shipped"));
                }
                println!(
                    "{name} ships {order} (key {:?})",
                    headers.get(IDEMPOTENCY_KEY).unwrap_or("-")
                );
                Ok(())
            },
        )
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned());
    let options = NatsOptions::new([url]).name("orders-example");
    let durable = || {
        DurableEvents::new("ORDERS_EXAMPLE")
            .consumer_prefix("shipping")
            .max_deliveries(3)
            .backoff([Duration::from_millis(200), Duration::from_secs(1)])
    };
    let (a, b) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut servers = Vec::new();
    for (name, served) in [("instance-a", &a), ("instance-b", &b)] {
        servers.push(
            Server::new(instance(name, Arc::clone(served)))
                .serve(
                    NatsServer::new(options.clone())
                        .queue("orders")
                        .durable_events(durable()),
                )
                .await?,
        );
    }

    let client = Client::builder()
        .timeout(Duration::from_secs(2))
        .connect(NatsTransport::new(options).durable_events())
        .await?;
    for n in 0..10 {
        let _: Value = client.send("create-order", &json!({"n": n})).await?;
    }
    println!(
        "requests shared by the queue group: a {}, b {}",
        a.load(Ordering::Relaxed),
        b.load(Ordering::Relaxed)
    );
    // A durable emit with an idempotency key: sent twice (a retry), stored once.
    for _ in 0..2 {
        let mut headers = Headers::new();
        headers.insert(IDEMPOTENCY_KEY, "order-7-created");
        let event = RpcRequest::event(
            Pattern::from("order-created"),
            RawJson::to_json(&json!({"order": 7, "sku": "book"}))?,
        )
        .with_headers(headers);
        client.call(event).await?;
    }
    // Fails three times, then lands on palisade.dead-letter.order-created.
    client
        .emit("order-created", &json!({"order": 8, "sku": "poison"}))
        .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    for server in servers {
        server.shutdown().await;
    }
    Ok(())
}

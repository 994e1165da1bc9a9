//! An order service on RabbitMQ, NestJS-compatible: a NestJS `ClientProxy` with
//! `Transport.RMQ` and `queue: 'orders'` can call it, and the client below could call a NestJS
//! service on that queue instead.
//!
//! Events are acknowledged only once handled; a failing one is retried with backoff and, after
//! its last delivery, dead-lettered to `orders.dead-letter` with the reason in its headers.
//!
//! ```text
//! cargo run --example rabbitmq_orders --features rabbitmq    # AMQP_URL, default amqp://127.0.0.1:5672
//! ```

use palisade::rpc::transport::rabbitmq::{EventRetries, QueueOptions, RmqOptions, RmqServer};
use palisade::rpc::{Client, Payload, Router, RpcError, Server};
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned());
    let options = RmqOptions::new([url])
        .queue("orders")
        // A demo queue: gone with the broker's restart. Production queues stay durable.
        .queue_options(QueueOptions::default().durable(false))
        .prefetch_count(16)
        .connection_name("orders-example");

    let next_id = Arc::new(AtomicU64::new(1));
    let router = Router::new()
        .message("create-order", move |Payload(order): Payload<Value>| {
            let id = next_id.fetch_add(1, Ordering::Relaxed);
            async move { json!({"id": id, "order": order}) }
        })
        .event(
            "order-created",
            |Payload(order): Payload<Value>| async move {
                if order["sku"] == "poison" {
                    // Retried after 200 ms and 1 s, then dead-lettered.
                    return Err(RpcError::exception("this order cannot be shipped"));
                }
                println!("shipping {order}");
                Ok(())
            },
        );
    let server = Server::new(router)
        .serve(
            RmqServer::new(options.clone()).event_retries(
                EventRetries::new()
                    .max_deliveries(3)
                    .backoff([Duration::from_millis(200), Duration::from_secs(1)]),
            ),
        )
        .await?;

    let client = Client::builder()
        .timeout(Duration::from_secs(5))
        .connect(options)
        .await?;
    let created: Value = client
        .send("create-order", &json!({"sku": "book", "quantity": 2}))
        .await?;
    println!("created {created}");
    // Resolves once RabbitMQ has the event (publisher confirms).
    client.emit("order-created", &created["order"]).await?;
    client
        .emit("order-created", &json!({"sku": "poison"}))
        .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    println!("the poison order is in the queue orders.dead-letter by now");
    server.shutdown().await;
    Ok(())
}

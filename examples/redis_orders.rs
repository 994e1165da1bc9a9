//! An order service on Redis, NestJS-compatible: a NestJS `ClientProxy` with `Transport.REDIS`
//! can call it, and the client below could call a NestJS Redis service instead.
//!
//! Two instances run with a single responder (a lease in Redis), so each request is answered
//! once — plain Redis pub/sub, like NestJS, would have both answer. Events go through Redis
//! Streams: stored until handled, retried with backoff, and dead-lettered to
//! `palisade:dead-letter:order-created` after their last delivery.
//!
//! ```text
//! cargo run --example redis_orders --features redis    # REDIS_URL, default redis://127.0.0.1:6379
//! ```

use palisade::rpc::transport::redis::{DurableEvents, RedisOptions, RedisServer, RedisTransport};
use palisade::rpc::{Client, Payload, Router, RpcError, Server, ServerHandle};
use serde_json::{Value, json};
use std::time::Duration;

fn router(instance: &'static str) -> Router {
    Router::new()
        .message(
            "create-order",
            move |Payload(order): Payload<Value>| async move {
                json!({"order": order, "accepted by": instance})
            },
        )
        .event(
            "order-created",
            move |Payload(order): Payload<Value>| async move {
                if order["sku"] == "poison" {
                    // Retried after 200 ms and 1 s, then dead-lettered.
                    return Err(RpcError::exception("this order cannot be shipped"));
                }
                println!("{instance} ships {order}");
                Ok(())
            },
        )
}

async fn instance(options: &RedisOptions, name: &'static str) -> Result<ServerHandle, RpcError> {
    Server::new(router(name))
        .serve(
            RedisServer::new(options.clone())
                .single_responder("orders", Duration::from_secs(3))
                .durable_events(
                    DurableEvents::new("orders")
                        .consumer(name)
                        .max_deliveries(3)
                        .backoff([Duration::from_millis(200), Duration::from_secs(1)]),
                ),
        )
        .await
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    let options = RedisOptions::new(url);
    let first = instance(&options, "orders-1").await?;
    let second = instance(&options, "orders-2").await?;

    let client = Client::builder()
        .timeout(Duration::from_secs(5))
        // Events are added to Redis Streams (XADD), stored even while no server runs.
        .connect(RedisTransport::new(options).durable_events())
        .await?;
    // The instances elect a responder; until then a request finds no subscriber.
    let created: Value = loop {
        match client
            .send("create-order", &json!({"sku": "book", "quantity": 2}))
            .await
        {
            Ok(created) => break created,
            Err(error) => {
                println!("{error}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    println!("created {created}");
    client.emit("order-created", &created["order"]).await?;
    client
        .emit("order-created", &json!({"sku": "poison"}))
        .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    println!("the poison order is in the stream palisade:dead-letter:order-created by now");
    first.shutdown().await;
    second.shutdown().await;
    Ok(())
}

//! Event-driven order processing in one process: `create-order` answers the caller, then an
//! `order-created` event fans out to the inventory and notification handlers; `order-status`
//! streams the order's progress.
//!
//! `cargo run --example order_events`

use futures_util::StreamExt;
use palisade::rpc::transport::memory::MemoryTransport;
use palisade::rpc::{Client, Payload, Router, RpcError, Server, Streaming};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::mpsc;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Order {
    id: u64,
    sku: String,
    quantity: u32,
}

#[tokio::main]
async fn main() -> Result<(), RpcError> {
    let (log, mut lines) = mpsc::unbounded_channel::<String>();
    let next_id = Arc::new(AtomicU64::new(1));
    let (inventory_log, notify_log) = (log.clone(), log.clone());

    let router = Router::new()
        .message(
            "create-order",
            move |Payload(order): Payload<serde_json::Value>| {
                let id = next_id.fetch_add(1, Ordering::Relaxed);
                async move {
                    let sku = order["sku"]
                        .as_str()
                        .ok_or_else(|| RpcError::invalid_argument("sku is required"))?;
                    let quantity = order["quantity"].as_u64().unwrap_or(1) as u32;
                    Ok::<_, RpcError>(Order {
                        id,
                        sku: sku.to_owned(),
                        quantity,
                    })
                }
            },
        )
        .event("order-created", move |Payload(order): Payload<Order>| {
            let log = inventory_log.clone();
            async move {
                log.send(format!(
                    "inventory: reserved {} x {} for order {}",
                    order.quantity, order.sku, order.id
                ))
                .ok();
            }
        })
        .event("order-created", move |Payload(order): Payload<Order>| {
            let log = notify_log.clone();
            async move {
                log.send(format!(
                    "notifications: confirmation sent for order {}",
                    order.id
                ))
                .ok();
            }
        })
        .message("order-status", |Payload(id): Payload<u64>| async move {
            let steps = ["received", "paid", "packed", "shipped"];
            Streaming(
                futures_util::stream::iter(steps).then(move |step| async move {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    Ok::<_, RpcError>(format!("order {id}: {step}"))
                }),
            )
        });

    let transport = MemoryTransport::new();
    let server = transport.serve_now(Server::new(router));
    let orders = Client::builder()
        .timeout(Duration::from_secs(2))
        .connect(transport)
        .await?;

    for (sku, quantity) in [("book", 2), ("lamp", 1)] {
        let order: Order = orders
            .send(
                "create-order",
                &serde_json::json!({"sku": sku, "quantity": quantity}),
            )
            .await?;
        println!("created {order:?}");
        orders.emit("order-created", &order).await?;
    }
    let invalid = orders
        .send::<Order>("create-order", &serde_json::json!({"quantity": 3}))
        .await
        .unwrap_err();
    println!("rejected: {invalid}");

    let mut status = orders.send_stream::<String>("order-status", &1).await?;
    while let Some(step) = status.next().await {
        println!("status: {}", step?);
    }

    drop(log);
    let report = server.shutdown().await;
    while let Ok(line) = lines.try_recv() {
        println!("{line}");
    }
    println!("server stopped (drained: {})", report.drained);
    Ok(())
}

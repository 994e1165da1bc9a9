//! palisade's counterpart of `tests/nestjs/service.js`: the handlers of the NestJS service the
//! wire capture was taken from, answering exactly as NestJS does.

use futures_util::StreamExt;
use palisade::rpc::{Payload, Reply, Router, RpcError, RpcRequest, Streaming};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Serialize)]
struct User {
    id: String,
    username: String,
    email: String,
}

#[derive(Deserialize)]
struct GetUser {
    id: String,
}

/// The router; events received on `user-created` are appended to `events` (and listed by the
/// `last-events` pattern, as the NestJS service does).
pub fn router(events: Arc<Mutex<Vec<Value>>>) -> Router {
    let sum = |Payload(xs): Payload<Vec<i64>>| async move { xs.iter().sum::<i64>() };
    string_routes(events)
        .message(json!({"cmd": "sum"}), sum)
        .message(json!({"role": "math", "cmd": "sum"}), sum)
}

/// The router without its object patterns, as the NestJS service has it on Kafka, where an
/// object pattern cannot be a topic.
pub fn string_routes(events: Arc<Mutex<Vec<Value>>>) -> Router {
    let recorded = Arc::clone(&events);
    Router::new()
        .message("get-user", |Payload(req): Payload<GetUser>| async move {
            if req.id == "missing" {
                return Err(RpcError::exception_object(
                    json!({"code": "USER_NOT_FOUND", "message": format!("user {} not found", req.id)}),
                ));
            }
            Ok(User {
                username: format!("user{}", req.id),
                email: format!("user{}@example.com", req.id),
                id: req.id,
            })
        })
        .message("fail", || async { Err::<(), _>(RpcError::exception("boom")) })
        .message("crash", || async {
            Err::<(), _>(std::io::Error::other("the database password is hunter2"))
        })
        .message("slow", |request: RpcRequest| async move {
            // Echoed as received, key order included (NestJS echoes the object it parsed).
            let payload = request.payload().clone();
            let ms = payload.to_value()["ms"].as_u64().unwrap_or(0);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Reply::Value(payload)
        })
        .message("count", |Payload(n): Payload<u32>| async move {
            // Asynchronous values, as NestJS's `timer` pipeline: one frame each, then completion.
            Streaming(futures_util::stream::iter(1..=n).then(|i| async move {
                tokio::time::sleep(Duration::from_millis(5)).await;
                Ok::<_, RpcError>(i)
            }))
        })
        .message("nothing", || async {})
        .event("user-created", move |Payload(event): Payload<Value>| {
            let events = Arc::clone(&recorded);
            async move { events.lock().unwrap().push(event) }
        })
        .message("last-events", move || {
            let events = events.lock().unwrap().clone();
            async move { Value::Array(events) }
        })
}

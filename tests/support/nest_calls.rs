//! The calls every transport's test makes against the sample NestJS service (`tests/nestjs`), with
//! the answers NestJS gives.

use futures_util::StreamExt;
use palisade::rpc::{Client, Code, INTERNAL_SERVER_ERROR};
use serde_json::{Value, json};
use std::time::Duration;

/// Request/response, an `RpcException` with an object, object patterns in either key order, both
/// error shapes, unicode, a stream and an event, checked against the sample service's answers.
pub async fn exercise_the_sample_service(client: &Client) {
    let user: Value = client.send("get-user", &json!({"id": "42"})).await.unwrap();
    assert_eq!(
        user,
        json!({"id": "42", "username": "user42", "email": "user42@example.com"})
    );
    let missing = client
        .send::<Value>("get-user", &json!({"id": "missing"}))
        .await
        .unwrap_err();
    assert_eq!(
        missing.err(),
        json!({"code": "USER_NOT_FOUND", "message": "user missing not found"})
    );
    assert_eq!(
        client
            .send::<i64>(json!({"cmd": "sum"}), &[5, 6])
            .await
            .unwrap(),
        11
    );
    assert_eq!(
        client
            .send::<i64>(json!({"cmd": "sum", "role": "math"}), &[20, 22])
            .await
            .unwrap(),
        42
    );
    let fail = client.send::<()>("fail", &json!({})).await.unwrap_err();
    assert_eq!(fail.err(), json!({"status": "error", "message": "boom"}));
    let crash = client.send::<()>("crash", &json!({})).await.unwrap_err();
    assert_eq!(
        (crash.code(), crash.message()),
        (Code::Internal, INTERNAL_SERVER_ERROR)
    );
    let unicode = json!({"ms": 0, "text": "héllo wörld ✓ € 日本語 😀🚀 end", "nested": {"ключ": "значение", "emoji": "👍🏽"}});
    assert_eq!(
        client.send::<Value>("slow", &unicode).await.unwrap(),
        unicode
    );
    let counts: Vec<u32> = client
        .send_stream::<u32>("count", &3)
        .await
        .unwrap()
        .map(Result::unwrap)
        .collect()
        .await;
    assert_eq!(counts, [1, 2, 3]);
    client
        .emit("user-created", &json!({"id": "ev-1", "name": "Ann"}))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let events: Value = client.send("last-events", &json!({})).await.unwrap();
    assert_eq!(events, json!([{"id": "ev-1", "name": "Ann"}]));
}

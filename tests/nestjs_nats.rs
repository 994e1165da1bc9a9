//! palisade and real NestJS 11 processes (`Transport.NATS`, nats.js 2.29) calling each other in
//! both directions through a real `nats-server`.
#![cfg(feature = "nats")]

mod support;

use futures_util::StreamExt;
use palisade::rpc::transport::nats::{NatsOptions, NatsServer};
use palisade::rpc::{Client, Code, INTERNAL_SERVER_ERROR, Server};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;
use support::nats::Broker;
use support::nestjs::{NestService, run_client};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_palisade_client_calls_a_nestjs_service_over_nats() {
    // Tracing on: the client propagates a trace context, which must reach NestJS too.
    support::trace_to_nowhere();
    let broker = Broker::start();
    let _nest = NestService::start(&["nats", &broker.url()]);
    let client = Client::builder()
        .timeout(Duration::from_secs(10))
        .header("x-tenant", "acme")
        .connect(NatsOptions::new([broker.url()]))
        .await
        .unwrap();

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
    let unknown = client
        .send::<()>("no-such-pattern", &json!({"x": 1}))
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::Unavailable);
    assert_eq!(
        unknown.message(),
        r#"There are no subscribers listening to that message ("no-such-pattern")"#
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

    // palisade's headers reach a NestJS handler as NATS headers (NatsContext.getHeaders()).
    let headers: Value = client.send("headers", &json!({})).await.unwrap();
    assert_eq!(headers["x-tenant"], "acme");
    assert!(
        headers["traceparent"]
            .as_str()
            .is_some_and(|t| t.starts_with("00-")),
        "{headers}"
    );
    let left: u64 = headers["palisade-timeout-ms"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(left > 0 && left <= 10_000, "{headers}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nestjs_client_sees_a_palisade_server_exactly_as_a_nestjs_server_over_nats() {
    let nest_broker = Broker::start();
    let nest = NestService::start(&["nats", &nest_broker.url()]);
    let url = nest_broker.url();
    let expected = tokio::task::spawn_blocking(move || run_client(&["nats", &url]))
        .await
        .unwrap();
    drop(nest);

    let broker = Broker::start();
    let server = NatsServer::new(NatsOptions::new([broker.url()]))
        .serve(Server::new(support::nest_like::router(Arc::default())))
        .await
        .unwrap();
    let url = broker.url();
    let report = tokio::task::spawn_blocking(move || run_client(&["nats", &url]))
        .await
        .unwrap();
    server.shutdown().await;

    assert_eq!(report, expected);
    assert_eq!(report["getUser"]["value"]["email"], "user42@example.com");
    assert_eq!(report["sum"]["value"], 11);
    assert_eq!(report["sumRouteString"]["value"], 3);
    assert_eq!(
        report["fail"]["error"],
        json!({"status": "error", "message": "boom"})
    );
    assert_eq!(report["count"]["value"], json!([1, 2, 3]));
    assert_eq!(
        report["events"]["value"],
        json!([{"id": "ev-1", "name": "Ann"}])
    );
    assert_eq!(
        report["unknown"]["error"]["errorMessage"],
        r#"Empty response. There are no subscribers listening to that message ("no-such-pattern")"#
    );
}

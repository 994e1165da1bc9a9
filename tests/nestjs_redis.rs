//! palisade and real NestJS 11 processes (`Transport.REDIS`, ioredis 5.9) calling each other in
//! both directions through a real `redis-server`.
#![cfg(feature = "redis")]

mod support;

use palisade::rpc::transport::ServerTransport;
use palisade::rpc::transport::redis::{RedisOptions, RedisServer};
use palisade::rpc::{Client, Code, Payload, Router, Server};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::nestjs::{NestService, run_client};
use support::redis::Broker;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_palisade_client_calls_a_nestjs_service_over_redis() {
    support::trace_to_nowhere();
    let broker = Broker::start();
    let _nest = NestService::start(&["redis", &broker.url()]);
    let client = Client::builder()
        .timeout(Duration::from_secs(10))
        .header("x-tenant", "acme")
        .connect(RedisOptions::new(broker.url()))
        .await
        .unwrap();

    support::nest_calls::exercise_the_sample_service(&client).await;

    // NestJS's own client would wait for its timeout here; PUBLISH told palisade's that nobody
    // listens.
    let started = Instant::now();
    let unknown = client
        .send::<()>("no-such-pattern", &json!({"x": 1}))
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::Unavailable, "{unknown}");
    assert!(
        unknown.message().starts_with(
            r#"There are no subscribers listening to that message ("no-such-pattern")"#
        ),
        "{unknown}"
    );
    assert!(started.elapsed() < Duration::from_secs(2));

    // palisade's headers travel in the envelope, which NestJS ignores: the handler still answers.
    let headers: Value = client.send("headers", &json!({})).await.unwrap();
    assert_eq!(headers, Value::Null);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nestjs_client_sees_a_palisade_server_exactly_as_a_nestjs_server_over_redis() {
    let nest_broker = Broker::start();
    let nest = NestService::start(&["redis", &nest_broker.url()]);
    let url = nest_broker.url();
    let expected = tokio::task::spawn_blocking(move || run_client(&["redis", &url]))
        .await
        .unwrap();
    drop(nest);

    let broker = Broker::start();
    let server = RedisServer::new(RedisOptions::new(broker.url()))
        .serve(Server::new(support::nest_like::router(Arc::default())))
        .await
        .unwrap();
    let url = broker.url();
    let report = tokio::task::spawn_blocking(move || run_client(&["redis", &url]))
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
    // Silence, as from a NestJS server: the NestJS client's own timeout fires.
    assert_eq!(
        report["unknown"]["error"]["errorMessage"],
        "Timeout has occurred"
    );
}

/// A producer that is not NestJS publishes plain text or bare JSON: as a NestJS server does, the
/// whole message is the data of an event on the channel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_that_are_not_nestjs_packets_are_events_with_the_whole_message_as_data() {
    let broker = Broker::start();
    let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
    let server = RedisServer::new(RedisOptions::new(broker.url()))
        .serve(Server::new(Router::new().event(
            "user-created",
            move |Payload(data): Payload<Value>| {
                let seen_tx = seen_tx.clone();
                async move {
                    let _ = seen_tx.send(data);
                }
            },
        )))
        .await
        .unwrap();
    let redis = redis::Client::open(broker.url()).unwrap();
    let mut connection = redis.get_multiplexed_async_connection().await.unwrap();
    for message in ["plain text, not JSON", r#"{"id":"bare-object"}"#] {
        let receivers: u64 = redis::cmd("PUBLISH")
            .arg("user-created")
            .arg(message)
            .query_async(&mut connection)
            .await
            .unwrap();
        assert_eq!(receivers, 1);
    }
    let first = tokio::time::timeout(Duration::from_secs(5), seen.recv()).await;
    let second = tokio::time::timeout(Duration::from_secs(5), seen.recv()).await;
    assert_eq!(first.unwrap().unwrap(), json!("plain text, not JSON"));
    assert_eq!(second.unwrap().unwrap(), json!({"id": "bare-object"}));
    server.shutdown().await;
}

/// Two palisade instances with a single responder look like one NestJS service to a NestJS
/// client: every answer once (two NestJS servers would double the `count` stream).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nestjs_client_sees_two_palisade_instances_with_a_single_responder_as_one_service() {
    let broker = Broker::start();
    let nest = NestService::start(&["redis", &broker.url()]);
    let url = broker.url();
    let expected = tokio::task::spawn_blocking(move || run_client(&["redis", &url]))
        .await
        .unwrap();
    drop(nest);

    let events = Arc::default();
    let mut instances = Vec::new();
    for _ in 0..2 {
        instances.push(
            RedisServer::new(RedisOptions::new(broker.url()))
                .single_responder("nest-like", Duration::from_millis(600))
                .serve(Server::new(support::nest_like::router(Arc::clone(&events))))
                .await
                .unwrap(),
        );
    }
    // Wait for the election.
    let probe = Client::builder()
        .timeout(Duration::from_secs(1))
        .connect(RedisOptions::new(broker.url()))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while probe
        .send::<Value>("last-events", &json!({}))
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "no responder elected");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let url = broker.url();
    let report = tokio::task::spawn_blocking(move || run_client(&["redis", &url]))
        .await
        .unwrap();
    for instance in instances {
        instance.shutdown().await;
    }
    assert_eq!(report, expected);
    assert_eq!(report["count"]["value"], json!([1, 2, 3]));
}

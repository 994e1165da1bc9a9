//! palisade and real NestJS 11 processes (`Transport.MQTT`, mqtt.js 5.16) calling each other in
//! both directions through a real `mosquitto`.
#![cfg(feature = "mqtt")]

mod support;

use palisade::rpc::transport::ServerTransport;
use palisade::rpc::transport::mqtt::{MqttOptions, MqttServer, MqttVersion};
use palisade::rpc::{Client, Code, Payload, Router, Server};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;
use support::mqtt::Broker;
use support::nestjs::{NestService, run_client};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_palisade_client_calls_a_nestjs_service_over_mqtt() {
    support::trace_to_nowhere();
    let broker = Broker::start();
    let _nest = NestService::start(&["mqtt", &broker.url()]);
    let client = Client::builder()
        .timeout(Duration::from_secs(10))
        .header("x-tenant", "acme")
        .connect(MqttOptions::new(broker.url()))
        .await
        .unwrap();

    support::nest_calls::exercise_the_sample_service(&client).await;

    // Silence, as with NestJS's own client: the deadline passes...
    let impatient = Client::builder()
        .timeout(Duration::from_millis(500))
        .connect(MqttOptions::new(broker.url()))
        .await
        .unwrap();
    let unknown = impatient
        .send::<()>("no-such-pattern", &json!({"x": 1}))
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::DeadlineExceeded, "{unknown}");
    // ...and the error says what probably happened.
    assert!(
        unknown
            .message()
            .contains(r#"MQTT cannot tell whether a server subscribed to "no-such-pattern""#),
        "{unknown}"
    );

    // palisade's headers travel in the envelope, which NestJS ignores: the handler still answers.
    let headers: Value = client.send("headers", &json!({})).await.unwrap();
    assert_eq!(headers, Value::Null);
}

/// The broker translates between protocol versions: a palisade MQTT 5 client calls NestJS's
/// MQTT 3.1.1 service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_palisade_mqtt5_client_calls_a_nestjs_service() {
    let broker = Broker::start();
    let _nest = NestService::start(&["mqtt", &broker.url()]);
    let client = Client::builder()
        .timeout(Duration::from_secs(10))
        .connect(MqttOptions::new(broker.url()).version(MqttVersion::V5))
        .await
        .unwrap();
    support::nest_calls::exercise_the_sample_service(&client).await;
}

/// NestJS's own MQTT client loses replies in bursts on one pattern (reply-topic reference
/// counting, nestjs-wire-brokers.md §3.5); palisade's keeps one subscription per reply topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_parallel_requests_to_a_nestjs_service_are_all_answered() {
    let broker = Broker::start();
    let _nest = NestService::start(&["mqtt", &broker.url()]);
    let client = Client::builder()
        .timeout(Duration::from_secs(30))
        .connect(MqttOptions::new(broker.url()))
        .await
        .unwrap();
    // A pattern never called before: its reply subscription is made by this burst.
    let calls: Vec<_> = (0..1000i64)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move { client.send::<i64>(json!({"cmd": "sum"}), &[i, 1]).await })
        })
        .collect();
    for (i, call) in calls.into_iter().enumerate() {
        assert_eq!(call.await.unwrap().unwrap(), i as i64 + 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nestjs_client_sees_a_palisade_server_exactly_as_a_nestjs_server_over_mqtt() {
    let nest_broker = Broker::start();
    let nest = NestService::start(&["mqtt", &nest_broker.url()]);
    let url = nest_broker.url();
    let expected = tokio::task::spawn_blocking(move || run_client(&["mqtt", &url]))
        .await
        .unwrap();
    drop(nest);

    let broker = Broker::start();
    let server = MqttServer::new(MqttOptions::new(broker.url()))
        .serve(Server::new(support::nest_like::router(Arc::default())))
        .await
        .unwrap();
    let url = broker.url();
    let report = tokio::task::spawn_blocking(move || run_client(&["mqtt", &url]))
        .await
        .unwrap();
    server.shutdown().await;
    // The same from a palisade server speaking MQTT 5 (the broker translates).
    let mqtt5 = Broker::start();
    let server = MqttServer::new(MqttOptions::new(mqtt5.url()).version(MqttVersion::V5))
        .serve(Server::new(support::nest_like::router(Arc::default())))
        .await
        .unwrap();
    let url = mqtt5.url();
    let report5 = tokio::task::spawn_blocking(move || run_client(&["mqtt", &url]))
        .await
        .unwrap();
    server.shutdown().await;
    assert_eq!(report5, expected);

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
        "Timeout has occurred"
    );
}

/// A device that is not NestJS publishes plain text or bare JSON: as a NestJS server does, the
/// whole message is the data of an event on the topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_that_are_not_nestjs_packets_are_events_with_the_whole_message_as_data() {
    let broker = Broker::start();
    let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
    let server = MqttServer::new(MqttOptions::new(broker.url()))
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
    let mut options = rumqttc::MqttOptions::new("device-1", "127.0.0.1", port(&broker.url()));
    options.set_keep_alive(Duration::from_secs(5));
    let (device, mut events) = rumqttc::AsyncClient::new(options, 10);
    let polling = tokio::spawn(async move { while events.poll().await.is_ok() {} });
    for message in ["plain text, not JSON", r#"{"id":"bare-object"}"#] {
        device
            .publish("user-created", rumqttc::QoS::AtLeastOnce, false, message)
            .await
            .unwrap();
    }
    let first = tokio::time::timeout(Duration::from_secs(5), seen.recv()).await;
    let second = tokio::time::timeout(Duration::from_secs(5), seen.recv()).await;
    assert_eq!(first.unwrap().unwrap(), json!("plain text, not JSON"));
    assert_eq!(second.unwrap().unwrap(), json!({"id": "bare-object"}));
    polling.abort();
    server.shutdown().await;
}

fn port(url: &str) -> u16 {
    url.rsplit(':').next().unwrap().parse().unwrap()
}

/// Two palisade instances in a shared group look like one NestJS service to a NestJS client:
/// every answer once (two NestJS servers would double the `count` stream).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nestjs_client_sees_two_palisade_instances_in_a_shared_group_as_one_service() {
    let broker = Broker::start();
    let nest = NestService::start(&["mqtt", &broker.url()]);
    let url = broker.url();
    let expected = tokio::task::spawn_blocking(move || run_client(&["mqtt", &url]))
        .await
        .unwrap();
    drop(nest);

    // One event store: the group gives the event to one instance, `last-events` may go to the
    // other.
    let events = Arc::default();
    let mut instances = Vec::new();
    for _ in 0..2 {
        instances.push(
            MqttServer::new(MqttOptions::new(broker.url()))
                .shared_group("nest-like")
                .serve(Server::new(support::nest_like::router(Arc::clone(&events))))
                .await
                .unwrap(),
        );
    }
    let url = broker.url();
    let report = tokio::task::spawn_blocking(move || run_client(&["mqtt", &url]))
        .await
        .unwrap();
    for instance in instances {
        instance.shutdown().await;
    }
    assert_eq!(report, expected);
    assert_eq!(report["count"]["value"], json!([1, 2, 3]));
}

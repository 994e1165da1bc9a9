//! palisade and real NestJS 11 processes (`Transport.KAFKA`, kafkajs 2.2.4) calling each other in
//! both directions, through a Kafka broker of the test's own (Tansu, memory storage).
#![cfg(feature = "kafka")]

mod support;

use futures_util::StreamExt;
use palisade::rpc::transport::ServerTransport;
use palisade::rpc::transport::kafka::{KafkaServer, KafkaTransport};
use palisade::rpc::{Client, Code, INTERNAL_SERVER_ERROR, Server};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::kafka::Broker;
use support::nestjs::{NestService, run_client};

/// The patterns the palisade client calls (a Kafka client reads the reply topic of each).
const CALLED: &[&str] = &[
    "get-user",
    "fail",
    "crash",
    "slow",
    "count",
    "nothing",
    "last-events",
    "headers",
    "no-such-pattern",
];

/// Calls `get-user` until the service answers: a new kafkajs group starts at the latest offset,
/// so a request produced before the NestJS server's first fetch is never seen by it.
async fn until_answered(client: &Client) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match client.send::<Value>("get-user", &json!({"id": "1"})).await {
            Ok(_) => return,
            Err(error) if Instant::now() < deadline => {
                assert!(
                    matches!(error.code(), Code::DeadlineExceeded | Code::Unavailable),
                    "{error}"
                );
            }
            Err(error) => panic!("the NestJS service never answered: {error}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_palisade_client_calls_a_nestjs_service_over_kafka() {
    // Tracing on: the client propagates a trace context, which must reach NestJS too.
    support::trace_to_nowhere();
    let broker = Broker::start();
    let _nest = NestService::start(&["kafka", &broker.bootstrap(), "nest-service"]);
    let client = Client::builder()
        .timeout(Duration::from_secs(3))
        .header("x-tenant", "acme")
        .connect(
            KafkaTransport::new(support::kafka::options(&broker)).reply_to(CALLED.iter().copied()),
        )
        .await
        .unwrap();
    until_answered(&client).await;

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
    // NestJS sends scalars as text (`3`, then `1`, `2`, `3`) and ends the stream with a record of
    // its own (null value, `kafka_nest-is-disposed`): palisade reads numbers back and invents no
    // trailing null.
    let counts: Vec<u32> = client
        .send_stream::<u32>("count", &3)
        .await
        .unwrap()
        .map(Result::unwrap)
        .collect()
        .await;
    assert_eq!(counts, [1, 2, 3]);
    let nothing: Option<Value> = client.send("nothing", &json!({})).await.unwrap();
    assert_eq!(nothing, None);

    // An event is a record without correlation headers; the service lists what it received.
    client
        .emit("user-created", &json!({"id": "ev-1", "name": "Ann"}))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let events: Value = client.send("last-events", &json!({})).await.unwrap();
        if events != json!([]) {
            assert_eq!(events, json!([{"id": "ev-1", "name": "Ann"}]));
            break;
        }
        assert!(Instant::now() < deadline, "the event never arrived");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // palisade's headers reach a NestJS handler as record headers (KafkaContext's message), next
    // to NestJS's own.
    let headers: Value = client.send("headers", &json!({})).await.unwrap();
    assert_eq!(headers["x-tenant"], "acme", "{headers}");
    assert_eq!(headers["kafka_replyTopic"], "headers.reply", "{headers}");
    assert!(
        headers["traceparent"]
            .as_str()
            .is_some_and(|t| t.starts_with("00-")),
        "{headers}"
    );

    // Nobody consumes an unknown pattern's topic; NestJS answers with silence, so the caller's
    // deadline ends it, with an error that says what probably happened.
    let started = Instant::now();
    let unknown = client
        .send::<()>("no-such-pattern", &json!({"x": 1}))
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::DeadlineExceeded, "{unknown}");
    assert!(started.elapsed() >= Duration::from_secs(2), "{unknown}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nestjs_client_sees_a_palisade_server_exactly_as_a_nestjs_server_over_kafka() {
    let broker = Broker::start();
    let bootstrap = broker.bootstrap();
    let nest = NestService::start(&["kafka", &bootstrap, "nest-server"]);
    let address = bootstrap.clone();
    let mut expected =
        tokio::task::spawn_blocking(move || run_client(&["kafka", &address, "nest-client"]))
            .await
            .unwrap();
    // NestJS's own Kafka server ends `count` on its last value, or now and then (a race in its
    // reply buffer; the wire notes saw both) with a completion record of its own, which its
    // client turns into a trailing null. palisade ends a stream that is over on its last value.
    if let Some(values) = expected["count"]["value"].as_array_mut()
        && values.len() == 4
        && values[3].is_null()
    {
        values.pop();
    }
    drop(nest);

    let server = KafkaServer::new(support::kafka::options(&broker))
        .serve(Server::new(support::nest_like::string_routes(
            Arc::default(),
        )))
        .await
        .unwrap();
    let address = bootstrap.clone();
    let report =
        tokio::task::spawn_blocking(move || run_client(&["kafka", &address, "nest-client-2"]))
            .await
            .unwrap();
    server.shutdown().await;

    assert_eq!(report, expected);
    // What NestJS's own client makes of a Kafka service (§5.4 of the wire notes): scalars come
    // back as text; a stream that ends right after its last value ends on that record (a
    // completion record of its own would add a trailing null).
    assert_eq!(report["getUser"]["value"]["email"], "user42@example.com");
    assert_eq!(
        report["missing"]["error"],
        json!({"code": "USER_NOT_FOUND", "message": "user missing not found"})
    );
    assert_eq!(
        report["fail"]["error"],
        json!({"status": "error", "message": "boom"})
    );
    assert_eq!(
        report["crash"]["error"],
        json!({"status": "error", "message": "Internal server error"})
    );
    assert_eq!(report["count"]["value"], json!(["1", "2", "3"]));
    assert_eq!(report["unicode"]["value"]["nested"]["emoji"], "👍🏽");
    assert_eq!(
        report["events"]["value"],
        json!([{"id": "ev-1", "name": "Ann"}])
    );
    assert_eq!(report["objectEmit"], "refused");
}

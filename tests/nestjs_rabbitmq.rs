//! palisade and real NestJS 11 processes (`Transport.RMQ`, amqplib 0.10 with
//! amqp-connection-manager 4) calling each other in both directions through the machine's
//! RabbitMQ, each test on queues of its own.
#![cfg(feature = "rabbitmq")]

mod support;

use palisade::rpc::transport::ServerTransport;
use palisade::rpc::transport::rabbitmq::{QueueOptions, RmqOptions, RmqServer};
use palisade::rpc::{Client, Code, NO_HANDLER_MESSAGE, Server};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;
use support::nestjs::{NestService, run_client};
use support::rabbitmq::{Cleanup, machine_url, unique};

/// The options `tests/nestjs/transports.js` gives NestJS: a named, non-durable queue.
fn options(queue: &str) -> RmqOptions {
    RmqOptions::new([machine_url()])
        .queue(queue)
        .queue_options(QueueOptions::default().durable(false))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_palisade_client_calls_a_nestjs_service_over_rabbitmq() {
    // Tracing on: the client propagates a trace context, which must reach NestJS too.
    support::trace_to_nowhere();
    let queue = unique("nest-service");
    let _cleanup = Cleanup::new(machine_url()).queue(&queue);
    let _nest = NestService::start(&["rmq", &machine_url(), &queue]);
    let client = Client::builder()
        .timeout(Duration::from_secs(10))
        .header("x-tenant", "acme")
        .connect(options(&queue))
        .await
        .unwrap();

    support::nest_calls::exercise_the_sample_service(&client).await;
    let unknown = client
        .send::<()>("no-such-pattern", &json!({"x": 1}))
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::Unimplemented);
    assert_eq!(unknown.message(), NO_HANDLER_MESSAGE);

    // palisade's headers reach a NestJS handler as AMQP headers (RmqContext's message).
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
async fn a_nestjs_client_sees_a_palisade_server_exactly_as_a_nestjs_server_over_rabbitmq() {
    let nest_queue = unique("nest-server");
    let queue = unique("palisade-server");
    let _cleanup = Cleanup::new(machine_url())
        .queue(&nest_queue)
        .service_queue(&queue, &[1000, 5000, 30000]);
    let nest = NestService::start(&["rmq", &machine_url(), &nest_queue]);
    let (url, q) = (machine_url(), nest_queue.clone());
    let expected = tokio::task::spawn_blocking(move || run_client(&["rmq", &url, &q]))
        .await
        .unwrap();
    drop(nest);

    let server = RmqServer::new(options(&queue))
        .serve(Server::new(support::nest_like::router(Arc::default())))
        .await
        .unwrap();
    let (url, q) = (machine_url(), queue.clone());
    let report = tokio::task::spawn_blocking(move || run_client(&["rmq", &url, &q]))
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
    assert_eq!(report["nothing"]["value"], json!([]));
    assert_eq!(
        report["events"]["value"],
        json!([{"id": "ev-1", "name": "Ann"}])
    );
    // NestJS's client errors with the bare string of the no-handler reply, as on TCP.
    assert_eq!(report["unknown"]["error"], json!(NO_HANDLER_MESSAGE));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_palisade_client_in_wildcards_mode_calls_a_nestjs_service_in_wildcards_mode() {
    // NestJS binds its queue to a topic exchange named after the queue with every handler's
    // pattern; clients publish to the exchange with the pattern as routing key.
    let queue = unique("nest-wildcards");
    let _cleanup = Cleanup::new(machine_url()).queue(&queue).exchange(&queue);
    let _nest = NestService::start(&["rmq", &machine_url(), &format!("{queue}:wildcards")]);
    let client = Client::builder()
        .timeout(Duration::from_secs(10))
        .connect(options(&queue).wildcards(true))
        .await
        .unwrap();
    support::nest_calls::exercise_the_sample_service(&client).await;
    // No binding for the pattern: the broker returns the request, and the caller knows at once.
    let unknown = client
        .send::<()>("no-such-pattern", &json!({"x": 1}))
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::Unavailable, "{unknown}");
    assert!(unknown.message().contains("NO_ROUTE"), "{unknown}");
}

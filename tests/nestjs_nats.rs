//! palisade and real NestJS 11 processes (`Transport.NATS`, nats.js 2.29) calling each other in
//! both directions through a real `nats-server`.
#![cfg(feature = "nats")]

mod support;

use palisade::rpc::transport::ServerTransport;
use palisade::rpc::transport::nats::{NatsOptions, NatsServer};
use palisade::rpc::{Client, Code, Server};
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

    support::nest_calls::exercise_the_sample_service(&client).await;
    let unknown = client
        .send::<()>("no-such-pattern", &json!({"x": 1}))
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::Unavailable);
    assert_eq!(
        unknown.message(),
        r#"There are no subscribers listening to that message ("no-such-pattern")"#
    );

    // palisade's headers reach a NestJS handler as NATS headers (NatsContext.getHeaders()).
    let headers: Value = client.send("headers", &json!({})).await.unwrap();
    assert_eq!(headers["x-tenant"], "acme");
    assert!(
        headers["traceparent"]
            .as_str()
            .is_some_and(|t| t.starts_with("00-")),
        "{headers}"
    );
    // The deadline travels in the packet body, which NestJS ignores (every call above carried
    // it), unless the client asks for it as a NATS header.
    assert!(headers.get("palisade-timeout-ms").is_none(), "{headers}");
    let client = Client::builder()
        .timeout(Duration::from_secs(10))
        .connect(NatsOptions::new([broker.url()]).deadline_header(true))
        .await
        .unwrap();
    let headers: Value = client.send("headers", &json!({})).await.unwrap();
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

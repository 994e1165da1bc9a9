//! Closing Kafka clients and servers while their broker does not answer (a binary of its own: it
//! counts the process's consumer closes, which other tests' would disturb).
//!
//! Closing a group consumer commits the offsets stored by then and leaves the group, and
//! librdkafka waits for the broker with no bound. Found in CI: a test whose broker was gone when
//! its runtime shut down never finished, the runtime's shutdown waiting on that close.
#![cfg(feature = "kafka")]

mod support;

use palisade::rpc::transport::ServerTransport;
use palisade::rpc::transport::kafka::{
    KafkaOptions, KafkaServer, KafkaTransport, consumers_closing,
};
use palisade::rpc::{Client, Payload, Router, Server, ServerHandle};
use serde_json::{Value, json};
use std::time::{Duration, Instant};
use support::kafka::Broker;

fn new_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn echo() -> Router {
    Router::new().message("echo", |Payload(v): Payload<Value>| async move { v })
}

/// A server and a client of it, after one request: a handled request leaves an offset stored
/// for the server's next commit.
async fn serving(options: &KafkaOptions) -> (ServerHandle, Client) {
    let server = KafkaServer::new(options.clone())
        .serve(Server::new(echo()))
        .await
        .unwrap();
    let client = Client::builder()
        .timeout(Duration::from_secs(10))
        .connect(KafkaTransport::new(options.clone()).reply_to(["echo"]))
        .await
        .unwrap();
    assert_eq!(
        client.send::<Value>("echo", &json!(1)).await.unwrap(),
        json!(1)
    );
    (server, client)
}

/// How long something that must not wait on the broker may take (a producer's drop flushes for
/// up to half a second; librdkafka's waits on an unanswering broker are a minute or more).
const PROMPT: Duration = Duration::from_secs(5);

/// Runs `work` on a thread and fails if it takes longer than `limit` (it is left behind then: a
/// test that waited with it would never fail, only hang).
fn within(limit: Duration, what: &str, work: impl FnOnce() + Send + 'static) {
    let (done, finished) = std::sync::mpsc::channel();
    let started = Instant::now();
    std::thread::spawn(move || {
        work();
        let _ = done.send(());
    });
    if finished.recv_timeout(limit).is_err() {
        panic!("{what} took longer than {limit:?}: it waits on the broker");
    }
    eprintln!("{what}: {:?}", started.elapsed());
}

#[test]
fn nothing_waits_on_a_broker_that_stopped_answering_and_the_closes_finish_once_it_answers() {
    let broker = Broker::start();
    let options = support::kafka::options(&broker);

    // A server and a client dropped while running: their tasks end with the runtime.
    let runtime = new_runtime();
    let (server, client) = runtime.block_on(serving(&options));
    broker.pause();
    within(
        PROMPT,
        "dropping the client, the server and the runtime",
        move || {
            drop(client);
            drop(server);
            drop(runtime);
        },
    );
    assert!(
        consumers_closing() > 0,
        "the closes completed without the broker answering"
    );

    // A server shut down gracefully: it flushes its last replies, then waits for its consumer's
    // close, each up to the delivery timeout (5 s in these tests), and no longer. Its own group,
    // once the first two's closes are over.
    broker.resume();
    all_closed_within(Duration::from_secs(60));
    let options = support::kafka::options(&broker);
    let runtime = new_runtime();
    let (server, client) = runtime.block_on(serving(&options));
    drop(client);
    broker.pause();
    within(
        Duration::from_secs(10) + PROMPT,
        "the server's shutdown, then the runtime's",
        move || {
            runtime.block_on(server.shutdown());
            drop(runtime);
        },
    );
    assert!(
        consumers_closing() > 0,
        "a close completed without the broker answering"
    );

    // Once the broker answers, every close completes and frees what it held.
    broker.resume();
    all_closed_within(Duration::from_secs(60));
}

fn all_closed_within(limit: Duration) {
    let deadline = Instant::now() + limit;
    while consumers_closing() > 0 {
        assert!(
            Instant::now() < deadline,
            "{} consumer closes still waiting {limit:?} after the broker came back",
            consumers_closing()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

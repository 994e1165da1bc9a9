//! Without a `tracing` subscriber, `tracing` forwards spans to a `log` logger (its `log` feature).
//! palisade skips making its spans when nothing could see them; this checks that a `log` logger
//! taking INFO records still gets the client's and the server's. Its own binary: the logger and
//! `tracing`'s "a dispatcher was set" flag are process-wide.

use palisade::rpc::transport::memory::MemoryTransport;
use palisade::rpc::{Client, Payload, Router, Server};
use std::sync::Mutex;

static RECORDS: Mutex<Vec<(String, String)>> = Mutex::new(Vec::new());

struct Capture;

impl log::Log for Capture {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::Level::Info
    }

    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            let entry = (record.target().to_owned(), record.args().to_string());
            RECORDS.lock().unwrap().push(entry);
        }
    }

    fn flush(&self) {}
}

fn spans_logged(name: &str) -> Vec<String> {
    let prefix = format!("{name};");
    RECORDS
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, message)| message.starts_with(&prefix))
        .map(|(target, message)| format!("{target}: {message}"))
        .collect()
}

#[tokio::test]
async fn spans_reach_a_log_logger_when_no_subscriber_is_set() {
    let transport = MemoryTransport::new();
    let server = Server::new(
        Router::new().message("double", |Payload(n): Payload<u32>| async move { n * 2 }),
    )
    .serve(&transport)
    .await
    .unwrap();
    let client = Client::builder().connect(transport).await.unwrap();

    // No logger yet: nothing is logged (whether a span is made then is not observable; making
    // none is only cheaper).
    assert_eq!(client.send::<u32>("double", &1).await.unwrap(), 2);
    assert!(RECORDS.lock().unwrap().is_empty());

    log::set_logger(&Capture).unwrap();
    log::set_max_level(log::LevelFilter::Info);
    assert_eq!(client.send::<u32>("double", &21).await.unwrap(), 42);
    let client_spans = spans_logged("rpc.client");
    let server_spans = spans_logged("rpc.server");
    assert_eq!(client_spans.len(), 1, "{client_spans:?}");
    assert!(
        client_spans[0].contains("pattern=double"),
        "{client_spans:?}"
    );
    assert_eq!(server_spans.len(), 1, "{server_spans:?}");
    assert!(
        server_spans[0].starts_with("palisade::rpc::server: rpc.server;"),
        "{server_spans:?}"
    );

    // A logger that takes only warnings gets no INFO span.
    log::set_max_level(log::LevelFilter::Warn);
    RECORDS.lock().unwrap().clear();
    assert_eq!(client.send::<u32>("double", &2).await.unwrap(), 4);
    assert!(spans_logged("rpc.client").is_empty());
    server.shutdown().await;
}

//! One tracing span per request on both sides, carrying the pattern, outcome and latency.
//!
//! Alone in its binary: tracing caches callsite interest process-wide.

use palisade::rpc::transport::memory::MemoryTransport;
use palisade::rpc::{Client, Router, RpcError, Server};
use std::sync::{Arc, Mutex};
use tracing_subscriber::fmt::format::FmtSpan;

#[derive(Clone, Default)]
struct Buffer(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Buffer {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// What `work` logs at DEBUG and above (and the span events asked for), run to completion on a
/// current-thread runtime.
fn log_of(span_events: FmtSpan, work: impl std::future::Future<Output = ()>) -> String {
    let buffer = Buffer::default();
    let writer = buffer.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_span_events(span_events)
        .with_max_level(tracing::Level::DEBUG)
        .finish();
    tracing::subscriber::with_default(subscriber, || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(work)
    });
    String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap()
}

#[test]
fn each_request_has_a_client_span_and_a_server_span() {
    let log = log_of(FmtSpan::CLOSE, async {
        let transport = MemoryTransport::new();
        let router = Router::new()
            .message("ping", || async {
                tracing::info!("handler ran");
                "pong"
            })
            .message("refuse", || async {
                Err::<(), _>(RpcError::not_found("nope"))
            });
        let server = transport.serve_now(Server::new(router));
        let client = Client::builder().connect(transport).await.unwrap();
        client.send::<String>("ping", &()).await.unwrap();
        client.send::<()>("refuse", &()).await.unwrap_err();
        server.shutdown().await;
    });
    // The fields of the span that closed: its own `{...}`, the innermost on the line.
    let closed = |name: &str, pattern: &str, outcome: &str| {
        let side = name.trim_start_matches("rpc.");
        log.lines().any(|line| {
            let Some(end) = line.find(&format!("}}: palisade::rpc::{side}: close")) else {
                return false;
            };
            let Some(start) = line[..end].rfind(&format!("{name}{{")) else {
                return false;
            };
            let fields = &line[start..end];
            fields.contains(&format!("pattern={pattern} "))
                && fields.contains(&format!("outcome={outcome}"))
                && fields.contains("latency_us=")
        })
    };
    assert!(closed("rpc.client", "ping", "ok"), "{log}");
    assert!(closed("rpc.server", "ping", "ok"), "{log}");
    assert!(closed("rpc.client", "refuse", "NOT_FOUND"), "{log}");
    assert!(closed("rpc.server", "refuse", "NOT_FOUND"), "{log}");
    // A handler runs inside both spans (the memory transport handles the request in the
    // client's task), so its events carry them.
    let handler_line = log
        .lines()
        .find(|line| line.contains("handler ran"))
        .unwrap_or_else(|| panic!("the handler's event is missing: {log}"));
    assert!(
        handler_line.contains("rpc.client{") && handler_line.contains("rpc.server{"),
        "the handler's event is outside the request's spans: {handler_line}"
    );
    assert!(
        log.contains("trace=00-"),
        "the server span lacks the trace context: {log}"
    );
}

/// A handler's error that its caller was told about is a debug line on the server; an internal
/// error (a bug) is a warning.
#[test]
fn handler_errors_are_warnings_only_when_they_are_bugs() {
    let log = log_of(FmtSpan::NONE, async {
        let transport = MemoryTransport::new();
        let router = Router::new()
            .message("refuse", || async {
                Err::<(), _>(RpcError::not_found("nope"))
            })
            .message("crash", || async { Err::<(), _>(RpcError::internal()) });
        let server = transport.serve_now(Server::new(router));
        let client = Client::builder().connect(transport).await.unwrap();
        client.send::<()>("refuse", &()).await.unwrap_err();
        client.send::<()>("crash", &()).await.unwrap_err();
        server.shutdown().await;
    });
    let line = |pattern: &str, message: &str| {
        log.lines()
            .find(|line| line.contains(&format!("pattern={pattern} ")) && line.contains(message))
            .unwrap_or_else(|| panic!("no {message:?} line for {pattern}: {log}"))
            .to_owned()
    };
    let refused = line("refuse", "replied with an error");
    assert!(refused.contains(" DEBUG "), "{refused}");
    assert!(
        !log.lines()
            .any(|l| l.contains("pattern=refuse ") && l.contains("handler failed")),
        "{log}"
    );
    let crashed = line("crash", "handler failed");
    assert!(crashed.contains(" WARN "), "{crashed}");
}

/// A request that already carries a trace context keeps it when the client's span is observed:
/// the client adds a `traceparent` only to a request without one.
#[test]
fn a_request_that_carries_a_trace_context_keeps_it() {
    use palisade::rpc::Headers;
    const CALLERS: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = log_of(FmtSpan::NONE, {
        let seen = Arc::clone(&seen);
        async move {
            let transport = MemoryTransport::new();
            let router = Router::new().message("headers", move |headers: Headers| {
                let seen = Arc::clone(&seen);
                async move {
                    let traceparent = headers.get("traceparent").map(str::to_owned);
                    seen.lock().unwrap().push(traceparent);
                }
            });
            let server = transport.serve_now(Server::new(router));
            let carrying = Client::builder()
                .header("traceparent", CALLERS)
                .connect(transport.clone())
                .await
                .unwrap();
            carrying.send::<()>("headers", &()).await.unwrap();
            let bare = Client::builder().connect(transport).await.unwrap();
            bare.send::<()>("headers", &()).await.unwrap();
            server.shutdown().await;
        }
    });
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2, "{log}");
    assert_eq!(seen[0].as_deref(), Some(CALLERS), "{log}");
    let added = seen[1]
        .as_deref()
        .expect("a traceparent for a request without one");
    assert!(added.starts_with("00-") && added != CALLERS, "{added}");
}

/// A failed event is logged once, by the dispatcher it is reported to, with its error: not a
/// second time by the router. With several handlers, the failures after the first (which the
/// dispatcher reports) are logged by the router.
#[test]
fn a_failed_event_is_logged_once() {
    let log = log_of(FmtSpan::NONE, async {
        let transport = MemoryTransport::new();
        let router = Router::new()
            .event("alone", || async {
                Err::<(), _>(RpcError::unavailable("the only one failed"))
            })
            .event("pair", || async {
                Err::<(), _>(RpcError::unavailable("the first failed"))
            })
            .event("pair", || async {
                Err::<(), _>(RpcError::unavailable("the second failed"))
            });
        let server = transport.serve_now(Server::new(router));
        let client = Client::builder().connect(transport).await.unwrap();
        client.emit("alone", &()).await.unwrap();
        client.emit("pair", &()).await.unwrap();
        server.shutdown().await;
    });
    let count = |text: &str| log.lines().filter(|line| line.contains(text)).count();
    assert_eq!(count("the only one failed"), 1, "{log}");
    assert_eq!(count("the first failed"), 1, "{log}");
    assert_eq!(count("the second failed"), 1, "{log}");
}

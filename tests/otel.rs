//! One OpenTelemetry trace across a client, a real TCP socket and a server: the request carries
//! the caller's context, and the server's span is a child of the client's.
#![cfg(all(feature = "opentelemetry", feature = "tcp"))]

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};
use palisade::rpc::transport::tcp::{TcpServer, TcpTransport};
use palisade::rpc::{Client, Headers, Router, Server};
use tracing::Instrument;
use tracing_subscriber::layer::SubscriberExt;

#[tokio::test(flavor = "current_thread")]
async fn one_trace_from_the_caller_through_tcp_to_the_handler() {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
    let _guard = tracing::subscriber::set_default(subscriber);

    let listener = TcpServer::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr();
    let server = Server::new(
        Router::new().message("headers", |headers: Headers| async move {
            serde_json::json!({"traceparent": headers.get("traceparent")})
        }),
    )
    .serve(listener)
    .await
    .unwrap();
    let client = Client::builder()
        .connect(TcpTransport::new(addr))
        .await
        .unwrap();

    let reply: serde_json::Value = client
        .send("headers", &())
        .instrument(tracing::info_span!("checkout"))
        .await
        .unwrap();
    server.shutdown().await;
    drop(client);
    let _ = provider.force_flush();

    let spans = exporter.get_finished_spans().unwrap();
    let find = |name: &str| {
        spans
            .iter()
            .find(|span| span.name == name)
            .unwrap_or_else(|| {
                panic!(
                    "no {name} span among {:?}",
                    spans.iter().map(|s| &s.name).collect::<Vec<_>>()
                )
            })
    };
    let (checkout, client_span, server_span) =
        (find("checkout"), find("rpc.client"), find("rpc.server"));
    let trace = checkout.span_context.trace_id();
    assert_eq!(client_span.span_context.trace_id(), trace);
    assert_eq!(
        server_span.span_context.trace_id(),
        trace,
        "the server continues the caller's trace"
    );
    assert_eq!(client_span.parent_span_id, checkout.span_context.span_id());
    assert_eq!(
        server_span.parent_span_id,
        client_span.span_context.span_id()
    );
    // What went on the wire is the client span's context, in W3C form.
    assert_eq!(
        reply["traceparent"],
        format!("00-{}-{}-01", trace, client_span.span_context.span_id())
    );
}

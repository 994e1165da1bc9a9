//! The conformance suite over the in-memory transport.

mod support;

use palisade::conformance::Harness;
use palisade::rpc::transport::memory::MemoryTransport;
use palisade::rpc::{Client, ClientBuilder, Server, ServerHandle};

struct Memory(MemoryTransport);

impl Harness for Memory {
    async fn serve(&mut self, server: Server) -> ServerHandle {
        self.0.serve_now(server)
    }

    async fn client(&self, builder: ClientBuilder) -> Client {
        builder.connect(self.0.clone()).await.unwrap()
    }
}

palisade::conformance_tests!(Memory(MemoryTransport::new()));

/// A transport served again (a restarted service) sends to the new server, even through a client
/// connected before.
#[tokio::test]
async fn a_server_served_later_replaces_the_first() {
    use palisade::rpc::{Code, Router};
    let transport = MemoryTransport::new();
    let client = Client::builder().connect(transport.clone()).await.unwrap();
    let no_server = client.send::<String>("who", &()).await.unwrap_err();
    assert_eq!(no_server.code(), Code::Unavailable);

    let first = transport.serve_now(Server::new(
        Router::new().message("who", || async { "first" }),
    ));
    assert_eq!(client.send::<String>("who", &()).await.unwrap(), "first");
    first.shutdown().await;
    let stopped = client.send::<String>("who", &()).await.unwrap_err();
    assert_eq!(stopped.code(), Code::Unavailable);

    for name in ["second", "third"] {
        let _server = transport.serve_now(Server::new(
            Router::new().message("who", move || async move { name }),
        ));
        assert_eq!(client.send::<String>("who", &()).await.unwrap(), name);
    }
}

/// Received patterns route as a NestJS server routes them, in memory as on the wire: a string
/// that parses as JSON routes like the value it holds, and a boolean or `null` reaches no handler,
/// not even one registered under `"true"` or `"null"`.
#[tokio::test]
async fn string_patterns_route_the_way_a_nest_server_routes_them() {
    use palisade::rpc::{Code, Pattern, Router};
    use serde_json::json;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    let transport = MemoryTransport::new();
    let events = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&events);
    let pings = Arc::new(AtomicUsize::new(0));
    let pinged = Arc::clone(&pings);
    let _server = transport.serve_now(Server::new(
        Router::new()
            .message("42", || async { "forty-two" })
            .message(json!({"role": "math", "cmd": "sum"}), || async { "sum" })
            .message("true", || async { "true, as a route" })
            .message("null", || async { "null, as a route" })
            .event("true", move || {
                counted.fetch_add(1, Ordering::SeqCst);
                async {}
            })
            .event("ping", move || {
                pinged.fetch_add(1, Ordering::SeqCst);
                async {}
            }),
    ));
    let client = Client::builder().connect(transport.clone()).await.unwrap();

    let reaches = [
        (Pattern::from("42"), "forty-two"),
        (Pattern::from(42), "forty-two"),
        (Pattern::from(json!(42)), "forty-two"),
        (Pattern::from(r#"{"cmd":"sum","role":"math"}"#), "sum"),
        (Pattern::from(r#" {"role":"math","cmd":"sum"}"#), "sum"),
        (Pattern::from(json!({"cmd": "sum", "role": "math"})), "sum"),
    ];
    for (pattern, expected) in reaches {
        let answer = client.send::<String>(pattern.clone(), &()).await;
        assert_eq!(answer.as_deref(), Ok(expected), "{pattern:?}");
    }

    let unroutable = [
        Pattern::from("true"),
        Pattern::from(json!(true)),
        Pattern::from(json!(false)),
        Pattern::from("null"),
        Pattern::from(json!(null)),
        Pattern::from(" true"),
    ];
    for pattern in unroutable {
        let error = client
            .send::<String>(pattern.clone(), &())
            .await
            .unwrap_err();
        assert_eq!(error.code(), Code::Unimplemented, "{pattern:?}: {error}");
        client.emit(pattern, &()).await.unwrap();
    }
    // An event the router can route, sent last, is handled: the events before it were
    // dispatched too, and none reached the handler under "true".
    client.emit("ping", &()).await.unwrap();
    for _ in 0..100 {
        if pings.load(Ordering::SeqCst) > 0 {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(pings.load(Ordering::SeqCst), 1);
    assert_eq!(
        events.load(Ordering::SeqCst),
        0,
        "no event reached the handler under \"true\""
    );
    assert!(Pattern::from("true").is_string());
    assert!(!Pattern::from(json!(true)).is_string());
}

/// glibc serves requests of up to 1032 bytes from a per-thread cache, in a few dozen
/// instructions; a larger one takes its general path, several hundred instructions more, and
/// sometimes a consolidation of its free lists.
const SMALL_ALLOCATION: usize = 1024;

/// The futures allocated for every call stay small enough for the allocator's fast path: a call's
/// future (inside the caller's task, or in a box of its own), and the transport's. An `async fn`
/// keeps each argument twice, and a local that was borrowed until its scope ends, so a request
/// (144 bytes) was kept two or three times in each (1016 bytes for `send`, 1064 for the
/// transport's, before). A tokio task adds about 100 bytes of its own to the future it runs, in
/// steps of 128, hence the smaller bound for a task around `send`.
#[tokio::test]
async fn the_futures_of_a_call_fit_the_allocators_small_sizes() {
    use palisade::rpc::transport::ClientTransport;
    use palisade::rpc::{Pattern, RawJson, RpcRequest};
    const IN_A_TASK: usize = SMALL_ALLOCATION - 128;
    let transport = MemoryTransport::new();
    let client = Client::builder().connect(transport.clone()).await.unwrap();

    let send = client.send::<u64>("echo", &7u64);
    let size = std::mem::size_of_val(&send);
    assert!(size <= IN_A_TASK - 128, "send: {size} bytes");
    drop(send);
    let spawned = {
        let client = client.clone();
        async move { client.send::<u64>("echo", &7u64).await }
    };
    let size = std::mem::size_of_val(&spawned);
    assert!(size <= IN_A_TASK, "a task around send: {size} bytes");
    drop(spawned);
    let emit = client.emit("seen", &7u64);
    let size = std::mem::size_of_val(&emit);
    assert!(size <= IN_A_TASK - 128, "emit: {size} bytes");
    drop(emit);

    let payload = || RawJson::to_json(&7u64).unwrap();
    let request = transport.request(RpcRequest::new(Pattern::from("echo"), payload()));
    let size = std::mem::size_of_val(&*request);
    assert!(
        size <= SMALL_ALLOCATION,
        "the transport's request: {size} bytes"
    );
    let emitted = transport.emit(RpcRequest::event(Pattern::from("seen"), payload()));
    let size = std::mem::size_of_val(&*emitted);
    assert!(
        size <= SMALL_ALLOCATION,
        "the transport's emit: {size} bytes"
    );
}

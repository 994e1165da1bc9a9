//! The messaging API of issue 14 — safe defaults, reply helpers, state and extensions, layers,
//! NestJS's request pipeline — over the in-memory transport, on the paused clock where time
//! matters.

use futures_core::Stream;
use futures_util::StreamExt;
use palisade::rpc::transport::memory::MemoryTransport;
use palisade::rpc::{
    Client, Code, DEFAULT_TIMEOUT, Payload, Router, RpcError, Server, ServerHandle, Streaming,
};
use std::time::Duration;

/// A client and a server for `router`, in memory.
async fn serve(router: Router) -> (Client, ServerHandle) {
    let transport = MemoryTransport::new();
    let server = Server::new(router).serve(&transport).await.unwrap();
    let client = Client::builder().connect(transport).await.unwrap();
    (client, server)
}

// ---- 1. Safe defaults ----

#[tokio::test(start_paused = true)]
async fn a_hung_handler_fails_after_the_default_timeout() {
    let router = Router::new().message("hang", std::future::pending::<()>);
    let (client, _server) = serve(router).await;
    let started = tokio::time::Instant::now();
    let error = client.send::<()>("hang", &()).await.unwrap_err();
    assert_eq!(error.code(), Code::DeadlineExceeded);
    assert_eq!(started.elapsed(), DEFAULT_TIMEOUT);
    assert_eq!(DEFAULT_TIMEOUT, Duration::from_secs(5));
}

#[tokio::test(start_paused = true)]
async fn the_default_timeout_can_be_changed_or_removed() {
    let transport = MemoryTransport::new();
    let _server = Server::new(Router::new().message("slow", || async {
        tokio::time::sleep(Duration::from_secs(8)).await;
        "done"
    }))
    .serve(&transport)
    .await
    .unwrap();
    let short = Client::builder()
        .timeout(Duration::from_secs(1))
        .connect(transport.clone())
        .await
        .unwrap();
    let started = tokio::time::Instant::now();
    let error = short.send::<String>("slow", &()).await.unwrap_err();
    assert_eq!(
        (error.code(), started.elapsed()),
        (Code::DeadlineExceeded, Duration::from_secs(1))
    );

    for patient in [
        Client::builder()
            .timeout(None)
            .connect(transport.clone())
            .await
            .unwrap(),
        Client::builder()
            .no_timeout()
            .connect(transport.clone())
            .await
            .unwrap(),
    ] {
        assert_eq!(patient.timeout(), None);
        let reply: String = patient.send("slow", &()).await.unwrap();
        assert_eq!(reply, "done");
    }
}

// ---- 2. Replies and errors ----

async fn numbers(Payload(n): Payload<u32>) -> Streaming<impl Stream<Item = Result<u32, RpcError>>> {
    Streaming::iter(1..=n)
}

async fn until_missing() -> Streaming<impl Stream<Item = Result<u32, RpcError>>> {
    Streaming::try_iter([
        Ok(1),
        Ok(2),
        Err(RpcError::not_found("page 3 is gone")),
        Ok(4),
    ])
}

async fn from_channel() -> Streaming<impl Stream<Item = Result<String, RpcError>>> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    for word in ["a", "b"] {
        tx.send(word.to_owned()).unwrap();
    }
    let mut rx = rx;
    Streaming::from_stream(futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx)))
}

#[tokio::test]
async fn streams_from_values_results_and_streams() {
    let router = Router::new()
        .message("numbers", numbers)
        .message("pages", until_missing)
        .message("words", from_channel);
    let (client, _server) = serve(router).await;

    let values: Vec<u32> = client
        .send_stream::<u32>("numbers", &3)
        .await
        .unwrap()
        .map(Result::unwrap)
        .collect()
        .await;
    assert_eq!(values, [1, 2, 3]);

    let pages: Vec<Result<u32, RpcError>> = client
        .send_stream::<u32>("pages", &())
        .await
        .unwrap()
        .collect()
        .await;
    assert_eq!(pages.len(), 3, "the stream ends at its error: {pages:?}");
    assert_eq!(pages[1].as_ref().unwrap(), &2);
    assert_eq!(pages[2].as_ref().unwrap_err().code(), Code::NotFound);

    let words: Vec<String> = client
        .send_stream::<String>("words", &())
        .await
        .unwrap()
        .map(Result::unwrap)
        .take(2)
        .collect()
        .await;
    assert_eq!(words, ["a", "b"]);
}

#[tokio::test]
async fn internal_with_hides_the_message_from_the_caller() {
    let router = Router::new().message("fail", || async {
        Err::<(), _>(RpcError::internal_with("connection pool exhausted at db-3"))
    });
    let (client, _server) = serve(router).await;
    let error = client.send::<()>("fail", &()).await.unwrap_err();
    assert_eq!(error.code(), Code::Internal);
    assert_eq!(error.message(), "Internal server error");
}

#[cfg(feature = "tcp")]
#[tokio::test]
async fn the_default_deadline_travels_over_tcp() {
    use palisade::rpc::transport::tcp::{TcpServer, TcpTransport};
    use palisade::timeout::Deadline;

    let router = Router::new().message("time-left", |deadline: Option<Deadline>| async move {
        deadline.map(|deadline| deadline.remaining().as_millis() as u64)
    });
    let server = Server::new(router)
        .serve(TcpServer::bind("127.0.0.1:0").await.unwrap())
        .await
        .unwrap();
    let address = server.local_addr().unwrap();
    let client = Client::builder()
        .connect(TcpTransport::new(address))
        .await
        .unwrap();
    let left: Option<u64> = client.send("time-left", &()).await.unwrap();
    let left = left.expect("the default timeout is sent as the request's deadline");
    assert!((4000..=5000).contains(&left), "{left} ms left");

    // Events carry no deadline: nobody waits for their handlers.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let events = Server::new(Router::new().event(
        "time-left",
        move |deadline: Option<Deadline>| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(deadline.is_some());
            }
        },
    ))
    .serve(TcpServer::bind("127.0.0.1:0").await.unwrap())
    .await
    .unwrap();
    let emitter = Client::builder()
        .connect(TcpTransport::new(events.local_addr().unwrap()))
        .await
        .unwrap();
    emitter.emit("time-left", &()).await.unwrap();
    assert_eq!(
        rx.recv().await,
        Some(false),
        "an event arrives without a deadline"
    );

    let unbounded = Client::builder()
        .no_timeout()
        .connect(TcpTransport::new(address))
        .await
        .unwrap();
    let left: Option<u64> = unbounded.send("time-left", &()).await.unwrap();
    assert_eq!(left, None);
}

// ---- 3. State and extensions ----

mod state_and_extensions {
    use super::*;
    use palisade::rpc::{Extension, FromRef, GuardLayer, Handler, RpcRequest, State};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    #[derive(Clone)]
    struct AppState {
        hits: Arc<AtomicU64>,
        greeting: Greeting,
    }

    #[derive(Clone)]
    struct Greeting(&'static str);

    impl FromRef<AppState> for Greeting {
        fn from_ref(state: &AppState) -> Self {
            state.greeting.clone()
        }
    }

    async fn hit(State(app): State<AppState>) -> u64 {
        app.hits.fetch_add(1, Ordering::SeqCst) + 1
    }

    async fn greet(
        State(Greeting(greeting)): State<Greeting>,
        Payload(name): Payload<String>,
    ) -> String {
        format!("{greeting}, {name}")
    }

    #[tokio::test]
    async fn handlers_share_the_routers_state_and_its_parts() {
        let hits = Arc::new(AtomicU64::new(0));
        let router = Router::stateful()
            .message("hit", hit)
            .message("greet", greet)
            .event("hit", hit)
            .with_state(AppState {
                hits: Arc::clone(&hits),
                greeting: Greeting("hello"),
            });
        let (client, _server) = serve(router).await;
        assert_eq!(client.send::<u64>("hit", &()).await.unwrap(), 1);
        assert_eq!(client.send::<u64>("hit", &()).await.unwrap(), 2);
        assert_eq!(
            client.send::<String>("greet", "ann").await.unwrap(),
            "hello, ann"
        );
        client.emit("hit", &()).await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), async {
            while hits.load(Ordering::SeqCst) < 3 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the event handler shares the state");
    }

    #[derive(Clone, Debug, PartialEq)]
    struct Principal(String);

    fn authenticate(request: &mut RpcRequest) -> Result<(), RpcError> {
        let name = request
            .headers()
            .get("authorization")
            .ok_or_else(|| RpcError::unauthenticated("no token"))?
            .to_owned();
        request.extensions_mut().insert(Principal(name));
        Ok(())
    }

    async fn whoami(Extension(Principal(name)): Extension<Principal>) -> String {
        name
    }

    #[tokio::test]
    async fn a_layer_hands_values_to_handlers_through_extensions() {
        let router = Router::new()
            .message("whoami", whoami.layer(GuardLayer::new(authenticate)))
            .message("bare-whoami", whoami);
        let transport = MemoryTransport::new();
        let _server = Server::new(router).serve(&transport).await.unwrap();
        let ann = Client::builder()
            .header("authorization", "ann")
            .connect(transport.clone())
            .await
            .unwrap();
        assert_eq!(ann.send::<String>("whoami", &()).await.unwrap(), "ann");
        // Without the layer that inserts it, the extension is missing: a server bug, answered
        // as one.
        let error = ann.send::<String>("bare-whoami", &()).await.unwrap_err();
        assert_eq!(error.code(), Code::Internal);
    }

    #[tokio::test]
    async fn extensions_never_cross_to_the_server() {
        let router = Router::new().message(
            "has-principal",
            |principal: Option<Extension<Principal>>| async move { principal.is_some() },
        );
        let transport = MemoryTransport::new();
        let _server = Server::new(router).serve(&transport).await.unwrap();
        let client = Client::builder().connect(transport).await.unwrap();
        let mut request = RpcRequest::new("has-principal".into(), palisade::rpc::RawJson::null());
        request
            .extensions_mut()
            .insert(Principal("client-side".into()));
        let response = client.call(request).await.unwrap();
        assert_eq!(response.first().unwrap().as_str(), "false");
    }
}

// ---- 4. Layers ----

mod layers {
    use super::*;
    use palisade::circuit_breaker::{CircuitBreakerConfig, CircuitBreakerLayer, CircuitState};
    use palisade::rpc::{GuardLayer, Handler, RpcRequest};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    async fn pay(Payload(cents): Payload<i64>) -> Result<i64, RpcError> {
        if cents < 0 {
            Err(RpcError::unavailable("the bank is down"))
        } else {
            Ok(cents)
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_breaker_on_one_pattern_in_one_line() {
        let breaker = CircuitBreakerLayer::new(
            CircuitBreakerConfig::new("payments")
                .max_failures(2)
                .reset_timeout(Duration::from_secs(10)),
        );
        let handle = breaker.handle();
        let router = Router::new()
            .message("pay", pay.layer(breaker))
            .message("ping", || async { "pong" });
        let (client, _server) = serve(router).await;
        for _ in 0..2 {
            let error = client.send::<i64>("pay", &-1).await.unwrap_err();
            assert_eq!(error.message(), "the bank is down");
        }
        assert_eq!(handle.state(), CircuitState::Open);
        // The breaker is shared by every message of the pattern (built once per route)...
        let open = client.send::<i64>("pay", &5).await.unwrap_err();
        assert_eq!(open.code(), Code::Unavailable);
        assert!(
            open.message().contains("circuit 'payments' is open"),
            "{open}"
        );
        // ...and other patterns do not wear it.
        assert_eq!(client.send::<String>("ping", &()).await.unwrap(), "pong");
    }

    /// Counts the messages that pass through it.
    fn counting(
        count: &Arc<AtomicUsize>,
    ) -> GuardLayer<impl Fn(&mut RpcRequest) -> Result<(), RpcError> + use<>> {
        let count = Arc::clone(count);
        GuardLayer::new(move |_: &mut RpcRequest| {
            count.fetch_add(1, Ordering::SeqCst);
            Ok(())
        })
    }

    #[tokio::test]
    async fn router_layers_wrap_every_route_and_route_layers_only_matched_ones() {
        let (all, matched) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let router = Router::new()
            .message("a", || async { 1 })
            .event("e", || async {})
            .route_layer(counting(&matched))
            .layer(counting(&all))
            .message("added-later", || async { 2 });
        let (client, _server) = serve(router).await;

        assert_eq!(client.send::<i32>("a", &()).await.unwrap(), 1);
        assert_eq!(
            (all.load(Ordering::SeqCst), matched.load(Ordering::SeqCst)),
            (1, 1)
        );
        let unknown = client.send::<i32>("nope", &()).await.unwrap_err();
        assert_eq!(unknown.code(), Code::Unimplemented);
        assert_eq!(
            (all.load(Ordering::SeqCst), matched.load(Ordering::SeqCst)),
            (2, 1)
        );
        // Routes added after a layer do not wear it.
        assert_eq!(client.send::<i32>("added-later", &()).await.unwrap(), 2);
        assert_eq!(
            (all.load(Ordering::SeqCst), matched.load(Ordering::SeqCst)),
            (2, 1)
        );
    }

    #[tokio::test]
    async fn a_guard_on_the_router_turns_away_unknown_patterns_too() {
        let router = Router::new()
            .message("a", || async { 1 })
            .layer(GuardLayer::new(|_: &mut RpcRequest| {
                Err(RpcError::permission_denied("closed"))
            }));
        let (client, _server) = serve(router).await;
        for pattern in ["a", "nope"] {
            let error = client.send::<i32>(pattern, &()).await.unwrap_err();
            assert_eq!(error.code(), Code::PermissionDenied, "{pattern}");
        }
    }

    #[tokio::test]
    async fn handler_layers_nest_outermost_last() {
        let order = Arc::new(std::sync::Mutex::new(Vec::new()));
        let step = |name: &'static str| {
            let order = Arc::clone(&order);
            GuardLayer::new(move |_: &mut RpcRequest| {
                order.lock().unwrap().push(name);
                Ok(())
            })
        };
        let handler = (|| async { "done" })
            .layer(step("inner"))
            .layer(step("outer"));
        let (client, _server) = serve(Router::new().message("go", handler)).await;
        assert_eq!(client.send::<String>("go", &()).await.unwrap(), "done");
        assert_eq!(*order.lock().unwrap(), ["outer", "inner"]);
    }

    #[tokio::test]
    async fn a_handler_layer_is_built_once_so_a_concurrency_limit_holds_across_messages() {
        use tower::limit::ConcurrencyLimitLayer;
        let (running, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (now, peak) = (Arc::clone(&running), Arc::clone(&most));
        let slow = move || {
            let (now, peak) = (Arc::clone(&now), Arc::clone(&peak));
            async move {
                let at_once = now.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(at_once, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(20)).await;
                now.fetch_sub(1, Ordering::SeqCst);
            }
        };
        let router = Router::new().message("slow", slow.layer(ConcurrencyLimitLayer::new(1)));
        let (client, _server) = serve(router).await;
        let calls = (0..4).map(|_| client.send::<()>("slow", &()));
        for result in futures_util::future::join_all(calls).await {
            result.unwrap();
        }
        assert_eq!(
            most.load(Ordering::SeqCst),
            1,
            "one at a time, across messages"
        );
    }

    #[tokio::test]
    async fn a_layered_handler_called_directly_still_wears_its_layer() {
        let guarded = (|| async { "inside" }).layer(GuardLayer::new(|_: &mut RpcRequest| {
            Err(RpcError::permission_denied("no"))
        }));
        let request = RpcRequest::new("p".into(), palisade::rpc::RawJson::null());
        let error = Handler::<(), ()>::call(guarded, request, ())
            .await
            .unwrap_err();
        assert_eq!(error.code(), Code::PermissionDenied);
    }

    #[tokio::test]
    async fn router_layers_wrap_event_handlers_too() {
        let count = Arc::new(AtomicUsize::new(0));
        let handled = Arc::new(tokio::sync::Notify::new());
        let notify = Arc::clone(&handled);
        let router = Router::new()
            .event("e", move || {
                let notify = Arc::clone(&notify);
                async move { notify.notify_one() }
            })
            .layer(counting(&count));
        let (client, _server) = serve(router).await;
        client.emit("e", &()).await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), handled.notified())
            .await
            .unwrap();
        assert_eq!(count.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn layers_on_a_stateful_router_wrap_the_stateful_handlers() {
        use palisade::rpc::State;
        let count = Arc::new(AtomicUsize::new(0));
        let router = Router::stateful()
            .message("state", |State(n): State<u32>| async move { n })
            .route_layer(counting(&count))
            .with_state(7_u32);
        let (client, _server) = serve(router).await;
        assert_eq!(client.send::<u32>("state", &()).await.unwrap(), 7);
        assert_eq!(count.load(Ordering::SeqCst), 1);
    }
}

// ---- 5. NestJS's pipeline: guards, interceptors, pipes, exception filters ----

mod pipeline {
    use super::*;
    use palisade::rpc::{
        ExceptionFilterLayer, GuardLayer, Handler, InterceptorLayer, Next, RawJson, Reply,
        RpcRequest, Valid, Validate, ValidationErrors,
    };
    use serde::Deserialize;
    use serde_json::{Value, json};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn roles(request: &mut RpcRequest) -> Result<(), RpcError> {
        match request.headers().get("role") {
            Some("admin") => Ok(()),
            Some(_) => Err(RpcError::permission_denied("admins only")),
            None => Err(RpcError::unauthenticated("no role")),
        }
    }

    #[tokio::test]
    async fn a_guard_answers_before_the_handler_runs() {
        let calls = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&calls);
        let handler = move || {
            counter.fetch_add(1, Ordering::SeqCst);
            async { "ran" }
        };
        let router = Router::new().message("admin", handler.layer(GuardLayer::new(roles)));
        let transport = MemoryTransport::new();
        let _server = Server::new(router).serve(&transport).await.unwrap();
        let client = |role: Option<&'static str>| {
            let builder = Client::builder();
            let builder = match role {
                Some(role) => builder.header("role", role),
                None => builder,
            };
            builder.connect(transport.clone())
        };
        let anonymous = client(None).await.unwrap();
        let error = anonymous.send::<String>("admin", &()).await.unwrap_err();
        assert_eq!(error.code(), Code::Unauthenticated);
        let guest = client(Some("guest")).await.unwrap();
        let error = guest.send::<String>("admin", &()).await.unwrap_err();
        assert_eq!(error.code(), Code::PermissionDenied);
        assert_eq!(calls.load(Ordering::SeqCst), 0, "the handler never ran");
        let admin = client(Some("admin")).await.unwrap();
        assert_eq!(admin.send::<String>("admin", &()).await.unwrap(), "ran");
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    /// Adds a header on the way in; doubles every number on the way out.
    async fn doubling(mut request: RpcRequest, next: Next) -> Result<Reply, RpcError> {
        request.headers_mut().insert("seen-by", "interceptor");
        let reply = next.run(request).await?;
        Ok(reply.map_values(|value| match value.as_i64() {
            Some(n) => Ok(json!(n * 2)),
            None => Err(RpcError::internal_with("not a number")),
        }))
    }

    #[tokio::test]
    async fn an_interceptor_maps_the_request_and_every_reply_value_of_a_stream() {
        let router = Router::new()
            .message("count", |Payload(n): Payload<i64>| async move {
                Streaming::iter(1..=n)
            })
            .message("seen-by", |headers: palisade::rpc::Headers| async move {
                if headers.get("seen-by") == Some("interceptor") {
                    21
                } else {
                    0
                }
            })
            .message("text", || async { "not a number" })
            .route_layer(InterceptorLayer::new(doubling));
        let (client, _server) = serve(router).await;
        let values: Vec<i64> = client
            .send_stream::<i64>("count", &3)
            .await
            .unwrap()
            .map(Result::unwrap)
            .collect()
            .await;
        assert_eq!(values, [2, 4, 6]);
        // The interceptor's header reached the handler, whose reply it doubled.
        assert_eq!(client.send::<i64>("seen-by", &()).await.unwrap(), 42);
        // An error from the mapping replaces the value.
        let error = client.send::<Value>("text", &()).await.unwrap_err();
        assert_eq!(error.code(), Code::Internal);
    }

    /// A reply nested deeper than a `serde_json::Value` holds (valid JSON, 130 deep) cannot be
    /// mapped: the caller gets an error, not the reply mapped from `null`.
    #[tokio::test]
    async fn a_reply_too_deep_to_map_is_an_error_not_null() {
        let router = Router::new()
            .message("deep", || async {
                Reply::Value(
                    RawJson::from_text(format!("{}7{}", "[".repeat(130), "]".repeat(130))).unwrap(),
                )
            })
            .route_layer(InterceptorLayer::new(
                |request: RpcRequest, next: Next| async move {
                    let reply = next.run(request).await?;
                    Ok::<_, RpcError>(reply.map_values(|value| Ok(json!({ "data": value }))))
                },
            ));
        let (client, _server) = serve(router).await;
        let error = client.send::<Value>("deep", &()).await.unwrap_err();
        assert_eq!(error.code(), Code::Internal);
    }

    #[derive(Debug)]
    struct Missing(u64);
    impl std::fmt::Display for Missing {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "row {} is missing", self.0)
        }
    }
    impl std::error::Error for Missing {}

    fn missing_is_not_found(error: RpcError) -> RpcError {
        match error.handler_error::<Missing>() {
            Some(Missing(id)) => RpcError::not_found(format!("no row {id}")),
            None => error,
        }
    }

    #[tokio::test]
    async fn an_exception_filter_maps_errors_of_any_type_once_per_router() {
        let router = || {
            Router::new()
                .message("one", || async { Err::<u32, _>(Missing(1)) })
                .message("stream", || async {
                    Streaming::try_iter([Ok(1), Err(Missing(2))])
                })
                .message("rpc", || async {
                    Err::<u32, _>(RpcError::exception("as is"))
                })
        };
        let (filtered, _server) =
            serve(router().route_layer(ExceptionFilterLayer::new(missing_is_not_found))).await;
        let error = filtered.send::<u32>("one", &()).await.unwrap_err();
        assert_eq!(
            (error.code(), error.message()),
            (Code::NotFound, "no row 1")
        );
        let streamed: Vec<Result<u32, RpcError>> = filtered
            .send_stream::<u32>("stream", &())
            .await
            .unwrap()
            .collect()
            .await;
        assert_eq!(streamed[0].as_ref().unwrap(), &1);
        assert_eq!(streamed[1].as_ref().unwrap_err().message(), "no row 2");
        let untouched = filtered.send::<u32>("rpc", &()).await.unwrap_err();
        assert_eq!(
            untouched.err(),
            json!({"status": "error", "message": "as is"})
        );

        // Without the filter, the handler's error stays on the server.
        let (bare, _server) = serve(router()).await;
        let error = bare.send::<u32>("one", &()).await.unwrap_err();
        assert_eq!(
            (error.code(), error.message()),
            (Code::Internal, "Internal server error")
        );
        assert!(
            error.handler_error::<Missing>().is_none(),
            "never sent over the wire"
        );
    }

    #[derive(Deserialize)]
    struct Line {
        sku: String,
        quantity: u32,
    }

    impl Validate for Line {
        fn validate(&self) -> Result<(), ValidationErrors> {
            let mut errors = ValidationErrors::new();
            errors.check(!self.sku.is_empty(), "sku", "should not be empty");
            errors.check(self.quantity > 0, "quantity", "must be a positive number");
            errors.into_result()
        }
    }

    async fn order(Valid(Payload(lines)): Valid<Payload<Vec<Line>>>) -> u32 {
        lines.iter().map(|line| line.quantity).sum()
    }

    #[tokio::test]
    async fn a_pipe_answers_invalid_payloads_with_nests_bad_request_and_the_field_paths() {
        let (client, _server) = serve(Router::new().message("order", order)).await;
        let total: u32 = client
            .send(
                "order",
                &json!([{"sku": "a", "quantity": 2}, {"sku": "b", "quantity": 3}]),
            )
            .await
            .unwrap();
        assert_eq!(total, 5);

        let error = client
            .send::<u32>(
                "order",
                &json!([{"sku": "a", "quantity": 1}, {"sku": "", "quantity": 0}]),
            )
            .await
            .unwrap_err();
        assert_eq!(error.code(), Code::InvalidArgument);
        assert_eq!(
            error.err(),
            json!({
                "statusCode": 400,
                "message": ["[1].sku should not be empty", "[1].quantity must be a positive number"],
                "error": "Bad Request",
                "code": "INVALID_ARGUMENT",
            })
        );
        // A payload that does not decode never reaches validation.
        let error = client
            .send::<u32>("order", &json!({"not": "a list"}))
            .await
            .unwrap_err();
        assert_eq!(error.code(), Code::InvalidArgument);
        assert!(error.message().contains("does not decode"), "{error}");
    }
}

// ---- 5b. Validation with the `validator` crate ----

#[cfg(feature = "validator")]
mod validator_pipe {
    use super::*;
    use palisade::rpc::{Validated, ValidationErrors};
    use serde::Deserialize;
    use serde_json::json;
    use validator::Validate;

    #[derive(Deserialize, Validate)]
    struct Address {
        #[validate(length(min = 2, max = 40))]
        city: String,
    }

    #[derive(Deserialize, Validate)]
    struct Line {
        #[validate(length(min = 1, message = "should not be empty"))]
        sku: String,
        #[validate(range(min = 1))]
        quantity: u32,
    }

    #[derive(Deserialize, Validate)]
    #[validate(schema(function = "total_is_positive"))]
    struct Order {
        #[validate(email)]
        contact: String,
        #[validate(nested)]
        address: Address,
        #[validate(nested)]
        lines: Vec<Line>,
    }

    fn total_is_positive(order: &Order) -> Result<(), validator::ValidationError> {
        if order.lines.iter().map(|line| line.quantity).sum::<u32>() > 1_000 {
            return Err(validator::ValidationError::new("too_large")
                .with_message("orders more than 1000 items".into()));
        }
        Ok(())
    }

    async fn order(Validated(Payload(order)): Validated<Payload<Order>>) -> u32 {
        order.lines.iter().map(|line| line.quantity).sum()
    }

    #[tokio::test]
    async fn a_valid_payload_reaches_the_handler() {
        let (client, _server) = serve(Router::new().message("order", order)).await;
        let total: u32 = client
            .send(
                "order",
                &json!({"contact": "a@b.io", "address": {"city": "Lyon"},
                        "lines": [{"sku": "a", "quantity": 2}, {"sku": "b", "quantity": 3}]}),
            )
            .await
            .unwrap();
        assert_eq!(total, 5);
    }

    #[tokio::test]
    async fn every_failing_field_is_named_by_its_full_path_in_nests_bad_request() {
        let (client, _server) = serve(Router::new().message("order", order)).await;
        let error = client
            .send::<u32>(
                "order",
                &json!({"contact": "nobody", "address": {"city": "X"},
                        "lines": [{"sku": "a", "quantity": 1}, {"sku": "", "quantity": 0}]}),
            )
            .await
            .unwrap_err();
        assert_eq!(error.code(), Code::InvalidArgument);
        assert_eq!(
            error.err(),
            json!({
                "statusCode": 400,
                "message": [
                    "address.city must pass length (max 40, min 2)",
                    "contact must pass email",
                    "lines[1].quantity must pass range (min 1)",
                    "lines[1].sku should not be empty",
                ],
                "error": "Bad Request",
                "code": "INVALID_ARGUMENT",
            })
        );
    }

    #[test]
    fn a_schema_check_belongs_to_the_payload_and_the_offending_value_is_not_echoed() {
        let order = Order {
            contact: "a@b.io".into(),
            address: Address {
                city: "Lyon".into(),
            },
            lines: vec![Line {
                sku: "a".into(),
                quantity: 2_000,
            }],
        };
        let errors = ValidationErrors::from(order.validate().unwrap_err());
        let fields: Vec<String> = errors.fields().iter().map(ToString::to_string).collect();
        assert_eq!(fields, ["payload orders more than 1000 items"]);

        let secret = Address { city: "S".into() };
        let errors = ValidationErrors::from(secret.validate().unwrap_err());
        assert_eq!(errors.fields()[0].path, "city");
        assert!(!errors.fields()[0].message.contains('S'), "{errors}");
    }
}

// ---- 5c. #[debug_handler] ----

#[cfg(feature = "macros")]
mod debug_handler {
    use super::*;
    use palisade::debug_handler;
    use palisade::rpc::State;

    #[debug_handler]
    async fn echo(Payload(text): Payload<String>) -> String {
        text
    }

    #[derive(Clone)]
    struct Greeting(&'static str);

    #[debug_handler(state = Greeting)]
    async fn greet(
        State(Greeting(greeting)): State<Greeting>,
        Payload(name): Payload<String>,
    ) -> String {
        format!("{greeting} {name}")
    }

    #[debug_handler]
    async fn nothing() {}

    /// A reply naming `impl Trait`, as `Streaming`'s docs write one (it may not appear in a
    /// bound, where the other replies are checked).
    #[debug_handler]
    async fn count(
        Payload(n): Payload<u32>,
    ) -> Streaming<impl Stream<Item = Result<u32, RpcError>>> {
        Streaming::iter(1..=n)
    }

    #[tokio::test]
    async fn a_checked_handler_is_the_same_handler() {
        let router = Router::new()
            .message("echo", echo)
            .message("nothing", nothing)
            .message("count", count)
            .merge(
                Router::stateful()
                    .message("greet", greet)
                    .with_state(Greeting("hello")),
            );
        let (client, _server) = serve(router).await;
        assert_eq!(client.send::<String>("echo", "hi").await.unwrap(), "hi");
        assert_eq!(
            client.send::<String>("greet", "ada").await.unwrap(),
            "hello ada"
        );
        assert_eq!(
            client.send::<Option<()>>("nothing", &()).await.unwrap(),
            None
        );
        let counted: Vec<u32> = client
            .send_stream::<u32>("count", &3)
            .await
            .unwrap()
            .map(Result::unwrap)
            .collect()
            .await;
        assert_eq!(counted, [1, 2, 3]);
    }

    /// Each mistake is reported where it stands, with the trait's hint (the expected compiler
    /// output is in `tests/debug_handler/*.stderr`; `TRYBUILD=overwrite` rewrites it). The
    /// compiler lists the extractors it knows, and names them by path where a transport's crate
    /// has a type of the same name: the output is recorded with every feature on
    /// (`cargo test --all-features`), as CI runs it.
    #[cfg(all(
        feature = "validator",
        feature = "nats",
        feature = "kafka",
        feature = "rabbitmq",
        feature = "redis",
        feature = "mqtt",
        feature = "metrics",
        feature = "opentelemetry"
    ))]
    #[test]
    fn mistakes_are_reported_where_they_stand() {
        let cases = trybuild::TestCases::new();
        cases.compile_fail("tests/debug_handler/*.rs");
        // Not a handler, but the same kind of check: a tower policy given to palisade's retry
        // without `FinalResult` is told what to add.
        cases.compile_fail("tests/retry_ui/*.rs");
    }
}

// ---- 6. Typed contracts ----

mod contracts {
    use super::*;
    use palisade::rpc::{Contract, Pattern, State};
    use serde::{Deserialize, Serialize};
    use serde_json::json;

    /// `{"cmd": "sum"}`: an object pattern, declared once for both sides.
    struct Sum;

    #[derive(Serialize, Deserialize)]
    struct Numbers(Vec<i64>);

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct Total {
        total: i64,
        offset: i64,
    }

    impl Contract for Sum {
        type Request = Numbers;
        type Reply = Total;
        fn pattern() -> Pattern {
            json!({"cmd": "sum"}).into()
        }
    }

    async fn sum(
        Payload(Numbers(numbers)): Payload<Numbers>,
        State(offset): State<i64>,
    ) -> Result<Total, RpcError> {
        Ok(Total {
            total: numbers.iter().sum::<i64>() + offset,
            offset,
        })
    }

    #[tokio::test]
    async fn a_contract_ties_the_clients_call_to_its_handler() {
        let router = Router::stateful()
            .contract::<Sum, _, _>(sum)
            .with_state(100_i64);
        let (client, _server) = serve(router).await;
        let total = client.invoke::<Sum>(&Numbers(vec![1, 2, 3])).await.unwrap();
        assert_eq!(
            total,
            Total {
                total: 106,
                offset: 100
            }
        );
        // The same pattern answers untyped callers (a NestJS client) as well.
        let raw: serde_json::Value = client.send(json!({"cmd": "sum"}), &[1]).await.unwrap();
        assert_eq!(raw, json!({"total": 101, "offset": 100}));
    }
}

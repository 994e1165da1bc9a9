//! Message services beyond the transport contract: layers on handlers and servers, and the
//! client's resilience stack, over the in-memory transport on the paused clock.

use palisade::builder::ServiceBuilderExt;
use palisade::circuit_breaker::{CircuitBreakerConfig, CircuitState};
use palisade::fault::FaultLayer;
use palisade::retry::{Backoff, Jitter, RetryPolicy};
use palisade::rpc::transport::memory::MemoryTransport;
use palisade::rpc::{Client, Code, Payload, Router, RpcError, Server, handler_service};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

const MS: Duration = Duration::from_millis(1);

fn retry(attempts: u32) -> RetryPolicy {
    RetryPolicy::new(attempts)
        .backoff(Backoff::constant(10 * MS))
        .jitter(Jitter::None)
}

#[tokio::test(start_paused = true)]
async fn a_breaker_on_one_handler_like_nests_circuit_breaker_decorator() {
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&calls);
    let create_user = move |Payload(name): Payload<String>| {
        counter.fetch_add(1, Ordering::SeqCst);
        async move {
            if name == "boom" {
                Err(std::io::Error::other("database down"))
            } else {
                Ok(name.len())
            }
        }
    };
    let router = Router::new()
        .message(
            "create-user",
            tower::ServiceBuilder::new()
                .circuit_breaker(
                    CircuitBreakerConfig::new("user-service")
                        .ttl(Duration::from_secs(5))
                        .max_failures(3)
                        .reset_timeout(Duration::from_secs(10)),
                )
                .service(handler_service(create_user)),
        )
        .message("ping", || async { "pong" });
    let transport = MemoryTransport::new();
    let _server = transport.serve_now(Server::new(router));
    let client = Client::builder().connect(transport).await.unwrap();
    for _ in 0..3 {
        let error = client
            .send::<usize>("create-user", "boom")
            .await
            .unwrap_err();
        assert_eq!(error.code(), Code::Internal);
    }
    let open = client
        .send::<usize>("create-user", "ann")
        .await
        .unwrap_err();
    assert_eq!(open.code(), Code::Unavailable);
    assert!(
        open.message().starts_with("circuit 'user-service' is open"),
        "{open}"
    );
    assert_eq!(open.retry_after(), Some(Duration::from_secs(10)));
    assert_eq!(
        calls.load(Ordering::SeqCst),
        3,
        "the open breaker let a call through"
    );
    // Other patterns are unaffected.
    assert_eq!(client.send::<String>("ping", &()).await.unwrap(), "pong");
    tokio::time::advance(Duration::from_secs(10)).await;
    assert_eq!(client.send::<usize>("create-user", "ann").await.unwrap(), 3);
}

use palisade::classify::FailureKind;

#[tokio::test]
async fn the_server_limits_messages_in_flight() {
    let running = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let (running_c, peak_c) = (Arc::clone(&running), Arc::clone(&peak));
    let router = Router::new().message("work", move || {
        let (running, peak) = (Arc::clone(&running_c), Arc::clone(&peak_c));
        async move {
            let now = running.fetch_add(1, Ordering::SeqCst) + 1;
            peak.fetch_max(now, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(20)).await;
            running.fetch_sub(1, Ordering::SeqCst);
        }
    });
    let transport = MemoryTransport::new();
    let _server = transport.serve_now(Server::new(router).max_in_flight(2));
    let client = Client::builder().connect(transport).await.unwrap();
    let calls: Vec<_> = (0..10)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move { client.send::<()>("work", &()).await })
        })
        .collect();
    for call in calls {
        call.await.unwrap().unwrap();
    }
    assert_eq!(peak.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_counts_requests_in_flight_across_threads() {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let gate_c = Arc::clone(&gate);
    let router = Router::new()
        .message("wait", move || {
            let gate = Arc::clone(&gate_c);
            async move {
                gate.acquire().await.unwrap().forget();
            }
        })
        .message("quick", || async { 1u8 });
    let transport = MemoryTransport::new();
    let server = transport.serve_now(Server::new(router));
    let client = Client::builder().connect(transport).await.unwrap();
    // Quick requests from many tasks: started and finished on whichever thread ran them.
    let quick: Vec<_> = (0..200)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move { client.send::<u8>("quick", &()).await })
        })
        .collect();
    for call in quick {
        call.await.unwrap().unwrap();
    }
    assert_eq!(server.in_flight(), 0);
    let waiting: Vec<_> = (0..5)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move { client.send::<()>("wait", &()).await })
        })
        .collect();
    while server.in_flight() < 5 {
        tokio::task::yield_now().await;
    }
    assert_eq!(server.in_flight(), 5);
    gate.add_permits(5);
    for call in waiting {
        call.await.unwrap().unwrap();
    }
    // A spawned handler counts as finished just after its reply is sent.
    tokio::time::timeout(Duration::from_secs(5), async {
        while server.in_flight() != 0 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the in-flight count returns to zero");
}

#[tokio::test(start_paused = true)]
async fn the_client_retries_transient_failures_and_its_breaker_counts_only_faults() {
    // The server fails its first two calls as if briefly unavailable.
    let fault = FaultLayer::seeded(1).fail_calls(1..=2);
    let router = Router::new()
        .message("get", || async { 7u32 })
        .message("missing", || async {
            Err::<u32, _>(RpcError::not_found("no such thing"))
        });
    let transport = MemoryTransport::new();
    let _server = transport.serve_now(Server::new(
        tower::ServiceBuilder::new()
            .fault(fault.clone())
            .service(router),
    ));
    let client = Client::builder()
        .timeout(Duration::from_secs(5))
        .retry(retry(3))
        .circuit_breaker(CircuitBreakerConfig::new("client").max_failures(3))
        .connect(transport)
        .await
        .unwrap();
    assert_eq!(client.send::<u32>("get", &()).await.unwrap(), 7);
    assert_eq!(fault.handle().calls(), 3, "two transient failures retried");
    let breaker = client.circuit_breaker().unwrap();
    assert_eq!(breaker.metrics().failures, 2);

    // NotFound is an answer, not an outage: not retried, not counted.
    for _ in 0..5 {
        let error = client.send::<u32>("missing", &()).await.unwrap_err();
        assert_eq!(error.code(), Code::NotFound);
    }
    assert_eq!(fault.handle().calls(), 8);
    assert_eq!(breaker.state(), CircuitState::Closed);
    assert_eq!(breaker.metrics().failures, 2);
}

#[tokio::test(start_paused = true)]
async fn the_client_breaker_opens_on_an_unreachable_server() {
    let transport = MemoryTransport::new(); // nobody serves it
    let client = Client::builder()
        .timeout(Duration::from_secs(1))
        .retry(retry(2))
        .circuit_breaker(
            CircuitBreakerConfig::new("nobody")
                .max_failures(2)
                .reset_timeout(Duration::from_secs(30)),
        )
        .connect(transport)
        .await
        .unwrap();
    let first = client.send::<u32>("get", &()).await.unwrap_err();
    assert_eq!(first.code(), Code::Unavailable);
    assert!(first.message().contains("no server"), "{first}");
    let second = client.send::<u32>("get", &()).await.unwrap_err();
    assert!(
        second.message().starts_with("circuit 'nobody' is open"),
        "{second}"
    );
    assert_eq!(
        client.circuit_breaker().unwrap().state(),
        CircuitState::Open
    );
}

#[tokio::test]
async fn a_payload_that_does_not_decode_never_reaches_the_handler() {
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&calls);
    let router = Router::new().message("sum", move |Payload(xs): Payload<Vec<i64>>| {
        counter.fetch_add(1, Ordering::SeqCst);
        async move { xs.iter().sum::<i64>() }
    });
    let transport = MemoryTransport::new();
    let _server = transport.serve_now(Server::new(router));
    let client = Client::builder().connect(transport).await.unwrap();
    let error = client
        .send::<i64>("sum", &serde_json::json!([1, "two", 3]))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument);
    assert!(error.message().contains("field `[1]`"), "{error}");
    assert_eq!(calls.load(Ordering::SeqCst), 0);
}

/// An order whose validation assumes an item (and panics without one).
#[derive(serde::Deserialize)]
struct Order {
    items: Vec<u32>,
}

impl palisade::rpc::Validate for Order {
    fn validate(&self) -> Result<(), palisade::rpc::ValidationErrors> {
        let mut errors = palisade::rpc::ValidationErrors::new();
        errors.check(self.items[0] > 0, "items[0]", "must be positive");
        errors.into_result()
    }
}

/// A panic in an event's extractor (here a validator) happens while the handler's future is
/// made, before it runs. For a transport that acknowledges events it must be a failed event
/// (retried, then dead-lettered), not a panic unwinding into the transport's consumer task.
#[tokio::test]
async fn a_panic_while_an_acknowledged_event_is_extracted_is_a_failure_of_the_event() {
    use palisade::rpc::{Pattern, RawJson, RpcRequest, Valid};
    let handled = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&handled);
    let dispatcher = Server::new(Router::new().event(
        "order",
        move |Valid(Payload(_)): Valid<Payload<Order>>| {
            counter.fetch_add(1, Ordering::SeqCst);
            async {}
        },
    ))
    .into_dispatcher("probe");
    let event = |order: serde_json::Value| {
        RpcRequest::event(Pattern::from("order"), RawJson::to_json(&order).unwrap())
    };
    let reader = dispatcher.clone();
    let poison = tokio::spawn(async move {
        reader
            .handle_event(event(serde_json::json!({"items": []})))
            .await
    })
    .await
    .expect("the panic unwound into the transport's task");
    assert_eq!(poison.unwrap_err().code(), Code::Internal);
    dispatcher
        .handle_event(event(serde_json::json!({"items": [1]})))
        .await
        .unwrap();
    assert_eq!(handled.load(Ordering::SeqCst), 1);
}

/// A caller holds a streamed reply and stops reading it: once the grace period is over, the
/// handler is cancelled and its last error finds the stream full. Shutdown must still end.
#[tokio::test(start_paused = true)]
async fn shutdown_ends_while_a_caller_holds_a_full_stream_it_no_longer_reads() {
    use futures_util::StreamExt;
    use palisade::rpc::Streaming;
    let transport = MemoryTransport::new();
    let server = Server::new(Router::new().message("feed", || async { Streaming::iter(0u64..) }))
        .grace_period(Duration::from_millis(100))
        .serve(&transport)
        .await
        .unwrap();
    let client = Client::builder()
        .no_timeout()
        .connect(transport)
        .await
        .unwrap();
    let mut stream = client.send_stream::<u64>("feed", &()).await.unwrap();
    assert_eq!(stream.next().await.unwrap().unwrap(), 0);
    tokio::time::sleep(10 * MS).await;
    let started = tokio::time::Instant::now();
    let report = tokio::time::timeout(Duration::from_secs(3600), server.shutdown())
        .await
        .expect("shutdown waits for a caller that does not read");
    // The grace period, then one more for the handler's last error.
    assert_eq!(started.elapsed(), 200 * MS);
    assert!(!report.drained);
    assert_eq!(report.cancelled, 1);
    drop(stream);
}

/// With `max_in_flight`, a request waiting for a slot when shutdown starts is handled within the
/// grace period, as one already running is, and shutdown waits for it: it used to run after
/// shutdown reported everything drained.
#[tokio::test(start_paused = true)]
async fn a_request_waiting_for_a_slot_at_shutdown_is_handled_before_it_ends() {
    let started: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
    let noted = Arc::clone(&started);
    let transport = MemoryTransport::new();
    let server = Server::new(Router::new().message(
        "work",
        move |Payload(name): Payload<String>| {
            let noted = Arc::clone(&noted);
            async move {
                noted.lock().unwrap().push(format!("{name} started"));
                tokio::time::sleep(200 * MS).await;
                noted.lock().unwrap().push(format!("{name} done"));
                name
            }
        },
    ))
    .max_in_flight(1)
    .serve(&transport)
    .await
    .unwrap();
    let client = Client::builder().connect(transport).await.unwrap();
    let send = |name: &'static str| {
        let client = client.clone();
        tokio::spawn(async move { client.send::<String>("work", &name).await })
    };
    let first = send("first");
    tokio::time::sleep(50 * MS).await;
    let queued = send("queued");
    tokio::time::sleep(50 * MS).await;
    let report = server.shutdown().await;
    assert!(report.drained, "{report:?}");
    assert_eq!(report.cancelled, 0);
    assert_eq!(
        *started.lock().unwrap(),
        [
            "first started",
            "first done",
            "queued started",
            "queued done"
        ],
        "shutdown returned before the queued request was handled"
    );
    assert_eq!(first.await.unwrap().unwrap(), "first");
    assert_eq!(queued.await.unwrap().unwrap(), "queued");
}

/// A caller that starts a request, parks it waiting for a `max_in_flight` slot and then never
/// polls it again (a future held in a struct, a `select!` that went the other way) does not keep
/// shutdown waiting past its grace period: such a request has not started, so once running
/// handlers are cancelled there is nothing of it to wait for. Shutdown used to wait for it for
/// good.
#[tokio::test(start_paused = true)]
async fn a_request_parked_for_a_slot_and_never_polled_again_does_not_hold_shutdown() {
    let handled = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&handled);
    let transport = MemoryTransport::new();
    let server = Server::new(Router::new().message("hang", move || {
        counter.fetch_add(1, Ordering::SeqCst);
        std::future::pending::<()>()
    }))
    .max_in_flight(1)
    .grace_period(100 * MS)
    .serve(&transport)
    .await
    .unwrap();
    let client = Client::builder()
        .no_timeout()
        .connect(transport)
        .await
        .unwrap();
    let running = tokio::spawn({
        let client = client.clone();
        async move { client.send::<()>("hang", &()).await }
    });
    tokio::time::sleep(MS).await;
    let mut parked = Box::pin(client.send::<()>("hang", &()));
    assert!(futures_util::poll!(parked.as_mut()).is_pending());
    assert_eq!(server.in_flight(), 1);
    let started = tokio::time::Instant::now();
    let report = tokio::time::timeout(Duration::from_secs(60), server.shutdown())
        .await
        .expect("shutdown waited for a request that was never polled again");
    assert_eq!(started.elapsed(), 100 * MS);
    assert!(!report.drained);
    assert_eq!(report.cancelled, 1);
    let error = running.await.unwrap().unwrap_err();
    assert_eq!(error.code(), Code::Unavailable, "{error}");
    // Polled at last, the parked request is refused; its handler never ran.
    let error = parked.await.unwrap_err();
    assert_eq!(error.code(), Code::Unavailable, "{error}");
    assert_eq!(handled.load(Ordering::SeqCst), 1);
}

/// A stream's handler state, dropped when the server stops the stream.
struct Subscription(Arc<std::sync::atomic::AtomicBool>);

impl Drop for Subscription {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// A subscription-like stream (one value, then quiet for good) whose caller drops it: the server
/// stops the stream then, not at a next value that never comes (its task, its state and its
/// `max_in_flight` slot would be held for good).
#[tokio::test(start_paused = true)]
async fn a_quiet_stream_whose_caller_went_away_is_stopped() {
    use futures_util::StreamExt;
    use palisade::rpc::Streaming;
    let dropped = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = Arc::clone(&dropped);
    let transport = MemoryTransport::new();
    let server = Server::new(Router::new().message("watch", move || {
        let subscription = Subscription(Arc::clone(&flag));
        async move {
            let values = futures_util::stream::once(async { Ok::<_, RpcError>(1u32) })
                .chain(futures_util::stream::pending())
                .map(move |value| {
                    let _held = &subscription;
                    value
                });
            Streaming(values)
        }
    }))
    .max_in_flight(1)
    .serve(&transport)
    .await
    .unwrap();
    let client = Client::builder()
        .no_timeout()
        .connect(transport)
        .await
        .unwrap();
    for round in 0..2 {
        let mut stream = client.send_stream::<u32>("watch", &()).await.unwrap();
        assert_eq!(stream.next().await.unwrap().unwrap(), 1);
        assert_eq!(server.in_flight(), 1);
        drop(stream);
        tokio::time::sleep(MS).await;
        assert!(
            dropped.swap(false, Ordering::SeqCst),
            "round {round}: still running"
        );
        assert_eq!(server.in_flight(), 0);
    }
    let report = server.shutdown().await;
    assert_eq!(report.cancelled, 0);
}

/// An event with several handlers runs every one of them, whatever one of them does: a panic
/// while it runs, a panic while its future is made (in an extractor), or an error. For an
/// acknowledged event the first failure is the event's.
#[tokio::test]
async fn a_panicking_event_handler_does_not_stop_the_handlers_after_it() {
    use palisade::rpc::{Pattern, RawJson, RpcRequest, Valid};
    let ran = Arc::new(AtomicUsize::new(0));
    let last = Arc::clone(&ran);
    let dispatcher = Server::new(
        Router::new()
            .event("order", || async {
                if true {
                    panic!("the first handler blew up");
                }
            })
            .event("order", |Valid(Payload(_)): Valid<Payload<Order>>| async {})
            .event("order", || async {
                Err::<(), _>(RpcError::unavailable("down"))
            })
            .event("order", move || {
                last.fetch_add(1, Ordering::SeqCst);
                async {}
            }),
    )
    .into_dispatcher("probe");
    let event = RpcRequest::event(
        Pattern::from("order"),
        RawJson::to_json(&serde_json::json!({"items": []})).unwrap(),
    );
    let outcome = dispatcher.handle_event(event).await;
    assert_eq!(outcome.unwrap_err().code(), Code::Internal);
    assert_eq!(ran.load(Ordering::SeqCst), 1, "the last handler never ran");

    // The same over a transport, for an event nobody acknowledges.
    let transport = MemoryTransport::new();
    let last = Arc::clone(&ran);
    let server = Server::new(
        Router::new()
            .event("order", || async {
                if true {
                    panic!("the first handler blew up");
                }
            })
            .event("order", move || {
                last.fetch_add(1, Ordering::SeqCst);
                async {}
            }),
    )
    .serve(&transport)
    .await
    .unwrap();
    let client = Client::builder().connect(transport).await.unwrap();
    client.emit("order", &()).await.unwrap();
    server.shutdown().await;
    assert_eq!(ran.load(Ordering::SeqCst), 2, "the last handler never ran");
}

/// An event handler may answer with a stream: its work happens as it is polled (NestJS
/// subscribes to an Observable an event handler returns), so it is run to its end, and for an
/// acknowledged event an error in it is the event's failure, not a success. With one handler,
/// with several, and from a service that is not a router.
#[tokio::test]
async fn an_event_handlers_stream_is_run_to_its_end_and_its_error_fails_the_event() {
    use futures_util::StreamExt;
    use palisade::rpc::{Pattern, RawJson, Reply, RpcRequest, Streaming};
    let polled = Arc::new(AtomicUsize::new(0));
    let counting = |polled: &Arc<AtomicUsize>| {
        let polled = Arc::clone(polled);
        move || {
            let polled = Arc::clone(&polled);
            async move {
                Streaming::from_stream(futures_util::stream::iter(0..3).map(move |n| {
                    polled.fetch_add(1, Ordering::SeqCst);
                    n
                }))
            }
        }
    };
    let failing = || async { Streaming::try_iter([Ok(1), Err(RpcError::unavailable("db down"))]) };
    let event = |pattern: &str| RpcRequest::event(Pattern::from(pattern), RawJson::null());

    let one = Server::new(
        Router::new()
            .event("counted", counting(&polled))
            .event("failing", failing),
    )
    .into_dispatcher("probe");
    one.handle_event(event("counted")).await.unwrap();
    assert_eq!(polled.load(Ordering::SeqCst), 3);
    let error = one.handle_event(event("failing")).await.unwrap_err();
    assert_eq!(error.code(), Code::Unavailable);

    let several = Server::new(
        Router::new()
            .event("both", failing)
            .event("both", counting(&polled)),
    )
    .into_dispatcher("probe");
    let error = several.handle_event(event("both")).await.unwrap_err();
    assert_eq!(error.code(), Code::Unavailable);
    assert_eq!(polled.load(Ordering::SeqCst), 6);

    let service = tower::service_fn(|_: RpcRequest| async {
        Ok::<_, RpcError>(Reply::Stream(
            futures_util::stream::iter([
                Ok(RawJson::null()),
                Err(RpcError::unavailable("db down")),
            ])
            .boxed(),
        ))
    });
    let bare = Server::new(service).into_dispatcher("probe");
    let error = bare.handle_event(event("any")).await.unwrap_err();
    assert_eq!(error.code(), Code::Unavailable);

    // Over a transport, for events nobody acknowledges.
    let transport = MemoryTransport::new();
    let server = Server::new(Router::new().event("counted", counting(&polled)))
        .serve(&transport)
        .await
        .unwrap();
    let client = Client::builder().connect(transport).await.unwrap();
    client.emit("counted", &()).await.unwrap();
    server.shutdown().await;
    assert_eq!(polled.load(Ordering::SeqCst), 9);
}

/// The handlers of an event run together, started in registration order, as NestJS forks them:
/// one whose stream goes on for good holds up none of the others.
#[tokio::test(start_paused = true)]
async fn an_event_handler_whose_stream_never_ends_holds_up_none_of_the_others() {
    use palisade::rpc::{Pattern, RawJson, RpcRequest, Streaming};
    let order = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (first, second) = (Arc::clone(&order), Arc::clone(&order));
    let dispatcher = Server::new(
        Router::new()
            .event("tick", move || {
                first.lock().unwrap().push("endless");
                async { Streaming::from_stream(futures_util::stream::pending::<u32>()) }
            })
            .event("tick", move || {
                second.lock().unwrap().push("after it");
                async {}
            }),
    )
    .into_dispatcher("probe");
    let event = RpcRequest::event(Pattern::from("tick"), RawJson::null());
    let handling = tokio::spawn(async move { dispatcher.handle_event(event).await });
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(*order.lock().unwrap(), ["endless", "after it"]);
    assert!(
        !handling.is_finished(),
        "the event ended with a stream still going"
    );
    handling.abort();
}

//! A conformance suite for transports, the way `tower-test` serves tower: the behaviour every
//! transport in this crate has, as tests a transport written elsewhere runs too (feature
//! `conformance`).
//!
//! A transport's test file implements [`Harness`] — how to serve a [`Server`] on the transport and
//! how to connect a [`Client`] to it — and expands [`conformance_tests!`](crate::conformance_tests)
//! with a harness; that makes one `#[tokio::test]` per case. The test crate needs `tokio` with the
//! `macros` and `rt-multi-thread` features.
//!
//! ```ignore
//! // tests/my_transport.rs
//! use palisade::conformance::Harness;
//! use palisade::rpc::{Client, ClientBuilder, Server, ServerHandle};
//!
//! struct Mine { /* a broker, an address... */ }
//!
//! impl Harness for Mine {
//!     async fn serve(&mut self, server: Server) -> ServerHandle {
//!         server.serve(my_transport::Server::new(/* ... */)).await.unwrap()
//!     }
//!     async fn client(&self, builder: ClientBuilder) -> Client {
//!         builder.connect(my_transport::Client::new(/* ... */)).await.unwrap()
//!     }
//! }
//!
//! palisade::conformance_tests!(Mine::new());
//! ```
//!
//! The cases use short real durations (network transports cannot run on tokio's paused clock:
//! it would jump ahead while a task waits on a socket) and never assert exact timings. Each case
//! is also a public `async fn` taking the harness, to run on its own.
//!
//! What is checked: requests and replies (unicode, numbers, object patterns in any key order),
//! decode errors that name the field or type, NestJS's error shapes both ways, unknown patterns,
//! events reaching every handler, streams (values, errors, empty), a thousand requests in flight
//! answered out of order, two clients whose replies never cross, late replies dropped without
//! harm, deadlines carried to and honoured by the server, graceful shutdown (draining, and
//! answering everyone past the grace period), headers, unit replies, panicking handlers, and —
//! where the harness says the transport has them — message size limits (a reply too large is an
//! error, a request too large fails at once and is not retried) and lost connections (requests in
//! flight fail at once, and the client recovers).

use crate::circuit_breaker::{CircuitBreakerConfig, CircuitState};
use crate::retry::RetryPolicy;
use crate::rpc::{
    Client, ClientBuilder, Code, Headers, INTERNAL_SERVER_ERROR, MessagePattern,
    NO_HANDLER_MESSAGE, Payload, Router, RpcError, Server, ServerHandle, Streaming,
};
use crate::timeout::Deadline;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;
use tokio::sync::mpsc;

/// Every string pattern the cases send requests to: for transports whose clients must declare
/// the patterns they will call before connecting (NestJS's `ClientKafka.subscribeToResponseOf`).
pub const REQUEST_PATTERNS: &[&str] = &[
    "big",
    "count",
    "count-then-fail",
    "crash",
    "echo",
    "explode",
    "fail",
    "forever",
    "get-user",
    "late",
    "maybe",
    "missing",
    "no-such-pattern",
    "noop",
    "ping",
    "size",
    "slow",
    "slow-echo",
    "tag",
    "whoami",
    "work",
];

/// What a request for a pattern no server handles meets on a transport.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnknownPatterns {
    /// NestJS's no-handler reply (TCP, RabbitMQ, the in-memory transport).
    NoHandlerReply,
    /// No responder at all, reported at once (NATS: "There are no subscribers listening to that
    /// message").
    NoResponders,
    /// Silence: the caller's deadline passes (brokers that cannot tell, like MQTT).
    Silence,
}

/// How a transport serves a server and builds clients for it.
pub trait Harness: Send + 'static {
    /// Serves `server`.
    fn serve(&mut self, server: Server) -> impl Future<Output = ServerHandle> + Send;

    /// A client, configured by `builder`, connected to what `serve` serves.
    fn client(&self, builder: ClientBuilder) -> impl Future<Output = Client> + Send;

    /// What a request for an unknown pattern meets. Default: NestJS's no-handler reply.
    fn unknown_patterns(&self) -> UnknownPatterns {
        UnknownPatterns::NoHandlerReply
    }

    /// Whether object patterns (`{"cmd":"sum"}`) can be served (Kafka topics cannot be named
    /// after them). Default: they can.
    fn object_patterns(&self) -> bool {
        true
    }

    /// Whether the transport acknowledges events only once every handler succeeded, delivering a
    /// failed event again (Kafka; durable events on NATS, Redis Streams, RabbitMQ with manual
    /// acks), rather than running each handler once and logging failures. Default: it does not.
    fn acknowledged_events(&self) -> bool {
        false
    }

    /// The largest message body the transport carries, in bytes (or in its own unit, such as
    /// UTF-16 units on TCP), if it has a limit: the size-limit cases run only then.
    fn max_message_size(&self) -> Option<usize> {
        None
    }

    /// Cuts the connections between clients and the server, as a crashed broker or a broken
    /// network would (`false`: the harness cannot; the case is skipped).
    fn interrupt(&mut self) -> impl Future<Output = bool> + Send {
        std::future::ready(false)
    }

    /// Undoes [`interrupt`](Self::interrupt).
    fn restore(&mut self) -> impl Future<Output = ()> + Send {
        std::future::ready(())
    }
}

/// Expands to one `#[tokio::test]` per conformance case, each with a fresh harness from `$make`.
///
/// See the [module documentation](crate::conformance).
#[macro_export]
macro_rules! conformance_tests {
    ($make:expr) => {
        $crate::conformance_tests!(@cases $make;
            request_response, object_patterns_in_any_key_order, payload_decode_errors_name_the_field,
            reply_decode_errors_name_the_type, rpc_error_shapes_cross_the_boundary,
            unknown_patterns, events_reach_every_handler, a_failing_event_handler_does_not_stop_the_others, streams,
            thousand_requests_in_flight_out_of_order, two_clients_never_see_each_others_replies,
            late_replies_are_dropped_without_harm, deadlines_are_honoured_by_the_server,
            graceful_shutdown_drains_in_flight_requests, shutdown_past_the_grace_period_answers_everyone,
            headers_reach_handlers, unit_replies_and_empty_streams, a_panicking_handler_still_answers,
            a_reply_too_large_becomes_an_error, a_request_too_large_fails_at_once_and_is_not_retried,
            a_lost_connection_fails_requests_in_flight_and_the_client_recovers);
    };
    (@cases $make:expr; $($case:ident),*) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $case() {
            $crate::conformance::$case($make).await;
        }
    )*};
}

/// The request of the `get-user` pattern the cases serve.
#[derive(Serialize, Deserialize, Debug, PartialEq, Clone)]
pub struct GetUser {
    /// The user's id; 404 is not found.
    pub id: u64,
}

/// The reply of the `get-user` pattern the cases serve.
#[derive(Serialize, Deserialize, Debug, PartialEq, Clone)]
pub struct User {
    /// The id asked for.
    pub id: u64,
    /// `user<id>`.
    pub username: String,
    /// `user<id>@example.com`.
    pub email: String,
}

async fn get_user(Payload(request): Payload<GetUser>) -> Result<User, RpcError> {
    if request.id == 404 {
        return Err(RpcError::exception_object(
            json!({"code": "USER_NOT_FOUND", "message": "user 404 not found"}),
        ));
    }
    Ok(User {
        id: request.id,
        username: format!("user{}", request.id),
        email: format!("user{}@example.com", request.id),
    })
}

fn palisade_route(pattern: &Value) -> String {
    crate::rpc::Pattern::from(pattern.clone())
        .route()
        .to_owned()
}

async fn start<H: Harness>(harness: &mut H, router: Router) -> ServerHandle {
    harness.serve(Server::new(router)).await
}

/// Requests and replies: structs, unicode in every plane, negative numbers.
pub async fn request_response<H: Harness>(mut harness: H) {
    let server = start(
        &mut harness,
        Router::new()
            .message("get-user", get_user)
            .message("echo", |Payload(v): Payload<Value>| async move { v }),
    )
    .await;
    let client = harness.client(Client::builder()).await;
    let user: User = client.send("get-user", &GetUser { id: 42 }).await.unwrap();
    assert_eq!(user.email, "user42@example.com");
    let unicode = json!({"text": "héllo wörld ✓ € 日本語 😀🚀", "nested": {"ключ": "значение", "emoji": "👍🏽"}});
    let echoed: Value = client.send("echo", &unicode).await.unwrap();
    assert_eq!(echoed, unicode);
    let number: i64 = client.send("echo", &-7).await.unwrap();
    assert_eq!(number, -7);
    server.shutdown().await;
}

/// Object patterns route by NestJS's normalised route, whatever the key order, and so does the route string sent as a string pattern.
pub async fn object_patterns_in_any_key_order<H: Harness>(mut harness: H) {
    if !harness.object_patterns() {
        return;
    }
    let router = Router::new()
        .message(
            json!({"role": "math", "cmd": "sum"}),
            |Payload(xs): Payload<Vec<i64>>| async move { xs.iter().sum::<i64>() },
        )
        .message(
            json!({"cmd": "sum"}),
            |Payload(xs): Payload<Vec<i64>>| async move { -xs.iter().sum::<i64>() },
        );
    let server = start(&mut harness, router).await;
    let client = harness.client(Client::builder()).await;
    let a: i64 = client
        .send(json!({"cmd": "sum", "role": "math"}), &[20, 22])
        .await
        .unwrap();
    let b: i64 = client
        .send(json!({"role": "math", "cmd": "sum"}), &[20, 22])
        .await
        .unwrap();
    // The normalised route string, sent as a string pattern, routes to the same handler.
    let c: i64 = client
        .send(r#"{"cmd":"sum","role":"math"}"#, &[20, 22])
        .await
        .unwrap();
    let d: i64 = client.send(json!({"cmd": "sum"}), &[5, 6]).await.unwrap();
    assert_eq!((a, b, c, d), (42, 42, 42, -11));
    server.shutdown().await;
}

/// A payload that does not decode is `InvalidArgument` naming the pattern and the field.
pub async fn payload_decode_errors_name_the_field<H: Harness>(mut harness: H) {
    let server = start(&mut harness, Router::new().message("get-user", get_user)).await;
    let client = harness.client(Client::builder()).await;
    let error = client
        .send::<User>("get-user", &json!({"id": "forty-two"}))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument);
    assert!(error.message().contains("get-user"), "{error}");
    assert!(error.message().contains("field `id`"), "{error}");
    let missing = client
        .send::<User>("get-user", &json!({}))
        .await
        .unwrap_err();
    assert!(
        missing.message().contains("missing field `id`"),
        "{missing}"
    );
    server.shutdown().await;
}

/// A reply that does not decode names the expected type.
pub async fn reply_decode_errors_name_the_type<H: Harness>(mut harness: H) {
    let server = start(&mut harness, Router::new().message("get-user", get_user)).await;
    let client = harness.client(Client::builder()).await;
    let error = client
        .send::<Vec<u8>>("get-user", &GetUser { id: 1 })
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::Internal);
    assert!(
        error
            .message()
            .contains("does not decode as alloc::vec::Vec<u8>"),
        "{error}"
    );
    server.shutdown().await;
}

/// NestJS's error shapes cross intact; an unexpected error is "Internal server error" and leaks nothing.
pub async fn rpc_error_shapes_cross_the_boundary<H: Harness>(mut harness: H) {
    let router = Router::new()
        .message("get-user", get_user)
        .message("fail", || async {
            Err::<(), _>(RpcError::exception("boom"))
        })
        .message("crash", || async {
            Err::<(), _>(std::io::Error::other("database password is hunter2"))
        })
        .message("missing", || async {
            Err::<(), _>(RpcError::not_found("no such order"))
        });
    let server = start(&mut harness, router).await;
    let client = harness.client(Client::builder()).await;

    let domain = client
        .send::<User>("get-user", &GetUser { id: 404 })
        .await
        .unwrap_err();
    assert_eq!(domain.code(), Code::Application);
    assert_eq!(
        domain.err(),
        json!({"code": "USER_NOT_FOUND", "message": "user 404 not found"})
    );
    assert_eq!(domain.domain_code(), Some("USER_NOT_FOUND"));

    let plain = client.send::<()>("fail", &()).await.unwrap_err();
    assert_eq!(plain.err(), json!({"status": "error", "message": "boom"}));
    assert_eq!((plain.code(), plain.message()), (Code::Application, "boom"));

    let internal = client.send::<()>("crash", &()).await.unwrap_err();
    assert_eq!(internal.code(), Code::Internal);
    assert_eq!(
        internal.err(),
        json!({"status": "error", "message": INTERNAL_SERVER_ERROR})
    );
    assert!(
        !internal.to_string().contains("hunter2"),
        "internals leaked: {internal}"
    );

    let coded = client.send::<()>("missing", &()).await.unwrap_err();
    assert_eq!(
        (coded.code(), coded.message()),
        (Code::NotFound, "no such order")
    );
    server.shutdown().await;
}

/// A request for an unknown pattern fails the way the transport reports it ([`Harness::unknown_patterns`]); an unknown event disturbs nothing.
pub async fn unknown_patterns<H: Harness>(mut harness: H) {
    let server = start(&mut harness, Router::new().message("get-user", get_user)).await;
    let client = harness
        .client(Client::builder().timeout(Duration::from_millis(800)))
        .await;
    let error = client
        .send::<Value>("no-such-pattern", &json!({"x": 1}))
        .await
        .unwrap_err();
    match harness.unknown_patterns() {
        UnknownPatterns::NoHandlerReply => {
            assert_eq!(error.code(), Code::Unimplemented);
            assert_eq!(error.message(), NO_HANDLER_MESSAGE);
            assert_eq!(error.err(), json!(NO_HANDLER_MESSAGE));
        }
        UnknownPatterns::NoResponders => {
            assert_eq!(error.code(), Code::Unavailable, "{error}");
            assert!(
                error.message().contains(
                    r#"There are no subscribers listening to that message ("no-such-pattern")"#
                ),
                "{error}"
            );
        }
        UnknownPatterns::Silence => {
            assert_eq!(error.code(), Code::DeadlineExceeded, "{error}");
        }
    }
    // An event nobody handles is dropped without disturbing anything.
    client
        .emit("no-such-event", &json!({"x": 1}))
        .await
        .unwrap();
    let user: User = client.send("get-user", &GetUser { id: 1 }).await.unwrap();
    assert_eq!(user.id, 1);
    server.shutdown().await;
}

/// Every handler of an event pattern runs, a failing one does not stop the others, object patterns route events too.
pub async fn events_reach_every_handler<H: Harness>(mut harness: H) {
    let (seen_tx, mut seen) = mpsc::unbounded_channel::<(String, u64)>();
    let welcome = seen_tx.clone();
    let stats = seen_tx.clone();
    let router = Router::new()
        .event("user-created", move |Payload(user): Payload<User>| {
            let welcome = welcome.clone();
            async move { welcome.send(("welcome".into(), user.id)).unwrap() }
        })
        .event("user-created", move |Payload(user): Payload<User>| {
            let stats = stats.clone();
            async move { stats.send(("stats".into(), user.id)).unwrap() }
        });
    let audit = if harness.object_patterns() {
        json!({"cmd": "audit"})
    } else {
        json!("audit")
    };
    let router = router.event(
        audit.clone(),
        move |MessagePattern(pattern): MessagePattern| {
            let seen = seen_tx.clone();
            async move { seen.send((pattern.route().to_owned(), 0)).unwrap() }
        },
    );
    let audit_route = palisade_route(&audit);
    let server = start(&mut harness, router).await;
    let client = harness.client(Client::builder()).await;
    for id in 1..=3 {
        let user = User {
            id,
            username: format!("u{id}"),
            email: String::new(),
        };
        client.emit("user-created", &user).await.unwrap();
    }
    client.emit(audit, &()).await.unwrap();
    let mut received = Vec::new();
    for _ in 0..7 {
        let item = tokio::time::timeout(Duration::from_secs(5), seen.recv())
            .await
            .expect("an event handler ran")
            .unwrap();
        received.push(item);
    }
    received.sort();
    let mut expected: Vec<(String, u64)> = vec![
        ("stats".into(), 1),
        ("stats".into(), 2),
        ("stats".into(), 3),
        ("welcome".into(), 1),
        ("welcome".into(), 2),
        ("welcome".into(), 3),
        (audit_route, 0),
    ];
    expected.sort();
    assert_eq!(received, expected);
    server.shutdown().await;
}

/// Streamed replies: values in order, an error ending a stream, an empty stream, `send` taking the last value.
pub async fn streams<H: Harness>(mut harness: H) {
    let router = Router::new()
        .message("count", |Payload(n): Payload<u32>| async move {
            Streaming(
                futures_util::stream::iter((1..=n).map(Ok::<_, RpcError>)).then(|i| async move {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    i
                }),
            )
        })
        .message("count-then-fail", |Payload(n): Payload<u32>| async move {
            let items = (1..=n)
                .map(Ok)
                .chain(std::iter::once(Err(RpcError::exception("ran dry"))));
            Streaming(futures_util::stream::iter(items))
        });
    let server = start(&mut harness, router).await;
    let client = harness
        .client(Client::builder().timeout(Duration::from_secs(10)))
        .await;
    let counts: Vec<u32> = client
        .send_stream::<u32>("count", &5)
        .await
        .unwrap()
        .map(Result::unwrap)
        .collect()
        .await;
    assert_eq!(counts, [1, 2, 3, 4, 5]);
    // `send` takes the last value of a stream, like `lastValueFrom`.
    assert_eq!(client.send::<u32>("count", &3).await.unwrap(), 3);
    let items: Vec<Result<u32, RpcError>> = client
        .send_stream("count-then-fail", &2)
        .await
        .unwrap()
        .collect()
        .await;
    assert_eq!(items.len(), 3);
    assert_eq!(items[0].as_ref().unwrap(), &1);
    assert_eq!(items[2].as_ref().unwrap_err().message(), "ran dry");
    let empty: Vec<Result<u32, RpcError>> = client
        .send_stream("count", &0)
        .await
        .unwrap()
        .collect()
        .await;
    assert!(empty.is_empty());
    server.shutdown().await;
}

/// A thousand requests in flight, answered out of order, each matched to its caller.
pub async fn thousand_requests_in_flight_out_of_order<H: Harness>(mut harness: H) {
    let started = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&started);
    let router = Router::new().message("slow-echo", move |Payload(n): Payload<u64>| {
        counter.fetch_add(1, Ordering::SeqCst);
        async move {
            // Later requests often finish first.
            tokio::time::sleep(Duration::from_millis((n * 7919) % 50)).await;
            n
        }
    });
    let server = start(&mut harness, router).await;
    let client = harness
        .client(Client::builder().timeout(Duration::from_secs(30)))
        .await;
    let calls = (0..1000u64).map(|n| {
        let client = client.clone();
        tokio::spawn(async move { (n, client.send::<u64>("slow-echo", &n).await) })
    });
    let results = futures_util::future::join_all(calls).await;
    for result in results {
        let (n, reply) = result.unwrap();
        assert_eq!(reply.unwrap(), n, "reply matched to the wrong request");
    }
    assert_eq!(started.load(Ordering::SeqCst), 1000);
    server.shutdown().await;
}

/// The caller's deadline reaches the handler, and the server stops the handler when it passes,
/// even a handler that spent its task's cooperative budget before it waits.
pub async fn deadlines_are_honoured_by_the_server<H: Harness>(mut harness: H) {
    let finished = Arc::new(AtomicBool::new(false));
    let saw_deadline = Arc::new(AtomicBool::new(false));
    let (finished_flag, deadline_flag) = (Arc::clone(&finished), Arc::clone(&saw_deadline));
    let router = Router::new().message("slow", move |deadline: Option<Deadline>| {
        let (finished, saw_deadline) = (Arc::clone(&finished_flag), Arc::clone(&deadline_flag));
        async move {
            saw_deadline.store(
                deadline.is_some_and(|d| d.remaining() <= Duration::from_millis(300)),
                Ordering::SeqCst,
            );
            // A ready channel answers until the task's budget runs out: the server's timer is
            // first polled in a poll whose budget is spent.
            let (sender, mut receiver) = tokio::sync::mpsc::unbounded_channel();
            for n in 0..1000 {
                let _ = sender.send(n);
            }
            drop(sender);
            while receiver.recv().await.is_some() {}
            tokio::time::sleep(Duration::from_millis(800)).await;
            finished.store(true, Ordering::SeqCst);
            "too late"
        }
    });
    let server = start(&mut harness, router).await;
    let client = harness
        .client(Client::builder().timeout(Duration::from_millis(300)))
        .await;
    let error = client.send::<String>("slow", &()).await.unwrap_err();
    assert_eq!(error.code(), Code::DeadlineExceeded, "{error}");
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert!(
        saw_deadline.load(Ordering::SeqCst),
        "the handler did not see the caller's deadline"
    );
    assert!(
        !finished.load(Ordering::SeqCst),
        "the server kept working past the caller's deadline"
    );
    server.shutdown().await;
}

/// Shutdown answers requests in flight within the grace period, then refuses new ones with `Unavailable`.
pub async fn graceful_shutdown_drains_in_flight_requests<H: Harness>(mut harness: H) {
    let server = harness
        .serve(
            Server::new(
                Router::new().message("work", |Payload(ms): Payload<u64>| async move {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    ms
                }),
            )
            .grace_period(Duration::from_secs(5)),
        )
        .await;
    let client = harness
        .client(Client::builder().timeout(Duration::from_secs(10)))
        .await;
    let calls: Vec<_> = (0..5u64)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move { client.send::<u64>("work", &(200 + i * 20)).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(80)).await;
    let report = server.shutdown().await;
    assert!(report.drained, "{report:?}");
    assert_eq!(report.cancelled, 0);
    for (i, call) in calls.into_iter().enumerate() {
        assert_eq!(call.await.unwrap().unwrap(), 200 + i as u64 * 20);
    }
    // A stopped server answers nothing more: refused at once, or — on a broker where nobody
    // consumes the pattern any more — silence.
    match tokio::time::timeout(Duration::from_secs(1), client.send::<u64>("work", &1)).await {
        Ok(after) => {
            let after = after.unwrap_err();
            assert!(
                after.code() == Code::Unavailable
                    || harness.unknown_patterns() == UnknownPatterns::Silence
                        && after.code() == Code::DeadlineExceeded,
                "{after}"
            );
        }
        Err(_) => assert_eq!(
            harness.unknown_patterns(),
            UnknownPatterns::Silence,
            "a request to a stopped server was neither refused nor answered"
        ),
    }
}

/// A failing event handler does not stop the other handlers of its pattern. A transport that
/// acknowledges events ([`Harness::acknowledged_events`]) delivers the event again until every
/// handler succeeds; one that does not runs each handler once and logs the failure.
pub async fn a_failing_event_handler_does_not_stop_the_others<H: Harness>(mut harness: H) {
    let acknowledged = harness.acknowledged_events();
    let (seen_tx, mut seen) = mpsc::unbounded_channel::<(&'static str, u64)>();
    let failed_once = Arc::new(std::sync::Mutex::new(std::collections::HashSet::new()));
    let recorder = seen_tx.clone();
    let router = Router::new()
        .event("order-paid", move |Payload(id): Payload<u64>| {
            let seen = seen_tx.clone();
            let failed_once = Arc::clone(&failed_once);
            async move {
                seen.send(("flaky", id)).unwrap();
                // Fails the first delivery of every event.
                if failed_once.lock().unwrap().insert(id) {
                    return Err(RpcError::exception(
                        "a failing handler does not stop the others",
                    ));
                }
                Ok(())
            }
        })
        .event("order-paid", move |Payload(id): Payload<u64>| {
            let recorder = recorder.clone();
            async move { recorder.send(("recorder", id)).unwrap() }
        });
    let server = start(&mut harness, router).await;
    let client = harness.client(Client::builder()).await;
    for id in 1..=3u64 {
        client.emit("order-paid", &id).await.unwrap();
    }
    let expected = if acknowledged { 12 } else { 6 };
    let mut received = Vec::new();
    while received.len() < expected {
        let item = tokio::time::timeout(Duration::from_secs(30), seen.recv())
            .await
            .unwrap_or_else(|_| panic!("the handlers ran only {received:?}"))
            .unwrap();
        received.push(item);
    }
    // Nothing more: a fire-and-forget transport does not retry, an acknowledging one stops once
    // every handler succeeded.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        seen.try_recv().is_err(),
        "handlers ran more often than expected: {received:?}"
    );
    received.sort();
    let times = if acknowledged { 2 } else { 1 };
    let mut want: Vec<(&str, u64)> = (1..=3)
        .flat_map(|id| std::iter::repeat_n([("flaky", id), ("recorder", id)], times).flatten())
        .collect();
    want.sort();
    assert_eq!(received, want);
    server.shutdown().await;
}

/// Handlers still running when the grace period ends are cancelled, and their callers answered with `Unavailable`.
pub async fn shutdown_past_the_grace_period_answers_everyone<H: Harness>(mut harness: H) {
    let server = harness
        .serve(
            Server::new(Router::new().message("forever", || async {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                "never"
            }))
            .grace_period(Duration::from_millis(100)),
        )
        .await;
    let client = harness
        .client(Client::builder().timeout(Duration::from_secs(30)))
        .await;
    let call = {
        let client = client.clone();
        tokio::spawn(async move { client.send::<String>("forever", &()).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let report = server.shutdown().await;
    assert!(!report.drained);
    assert_eq!(report.cancelled, 1);
    let error = tokio::time::timeout(Duration::from_secs(5), call)
        .await
        .expect("the caller was left hanging")
        .unwrap()
        .unwrap_err();
    assert_eq!(error.code(), Code::Unavailable, "{error}");
    assert!(
        error
            .message()
            .contains("shut down before the handler finished"),
        "{error}"
    );
}

/// Headers reach handlers (the deadline's header is consumed, not shown).
pub async fn headers_reach_handlers<H: Harness>(mut harness: H) {
    let server = start(
        &mut harness,
        Router::new().message("whoami", |headers: Headers| async move {
            json!({
                "tenant": headers.get("x-tenant"),
                "trace": headers.get("traceparent"),
                "deadline_header_hidden": headers.get(crate::rpc::TIMEOUT_HEADER).is_none(),
            })
        }),
    )
    .await;
    let trace = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let client = harness
        .client(
            Client::builder()
                .timeout(Duration::from_secs(5))
                .header("x-tenant", "acme")
                .header("traceparent", trace),
        )
        .await;
    let reply: Value = client.send("whoami", &()).await.unwrap();
    assert_eq!(
        reply,
        json!({"tenant": "acme", "trace": trace, "deadline_header_hidden": true})
    );
    server.shutdown().await;
}

/// A handler answering nothing decodes as `()` or `None`, and is an error for a type that needs a value.
pub async fn unit_replies_and_empty_streams<H: Harness>(mut harness: H) {
    let server = start(
        &mut harness,
        Router::new()
            .message("noop", || async {})
            .message("maybe", || async { None::<u32> }),
    )
    .await;
    let client = harness.client(Client::builder()).await;
    client.send::<()>("noop", &()).await.unwrap();
    assert_eq!(client.send::<Option<u32>>("noop", &()).await.unwrap(), None);
    assert_eq!(
        client.send::<Option<u32>>("maybe", &()).await.unwrap(),
        None
    );
    let error = client.send::<u32>("noop", &()).await.unwrap_err();
    assert!(error.message().contains("no value"), "{error}");
    server.shutdown().await;
}

/// A handler that panics while its future is made, before it is ever polled (a handler of one's
/// own, or a layer's `call`).
#[derive(Clone)]
struct PanicsWhenCalled;

impl crate::rpc::Handler<()> for PanicsWhenCalled {
    fn call(
        self,
        _: crate::rpc::RpcRequest,
        _: (),
    ) -> futures_util::future::BoxFuture<'static, Result<crate::rpc::Reply, RpcError>> {
        panic!("handler bug before its future")
    }
}

/// A panicking handler answers "Internal server error", whether it panics while it runs, while
/// its future is made or while its reply stream is read (after the items before the panic); the
/// server, the route and the connection carry on.
pub async fn a_panicking_handler_still_answers<H: Harness>(mut harness: H) {
    let router = Router::new()
        .message("explode", || async {
            if true {
                panic!("handler bug");
            }
            "unreachable"
        })
        .message("explode-early", PanicsWhenCalled)
        .message("explode-mid-stream", || async {
            Streaming(futures_util::stream::iter(1..=3u32).map(|n| {
                assert!(n < 2, "stream bug");
                Ok::<_, RpcError>(n)
            }))
        })
        .message("ping", || async { "pong" });
    let server = start(&mut harness, router).await;
    let client = harness.client(Client::builder()).await;
    let error = tokio::time::timeout(
        Duration::from_secs(5),
        client.send::<String>("explode", &()),
    )
    .await
    .expect("the caller of a panicking handler was left waiting")
    .unwrap_err();
    assert_eq!(error.code(), Code::Internal);
    assert_eq!(
        error.err(),
        json!({"status": "error", "message": INTERNAL_SERVER_ERROR})
    );
    let error = tokio::time::timeout(
        Duration::from_secs(5),
        client.send::<String>("explode-early", &()),
    )
    .await
    .expect("the caller of a handler that panicked before its future was left waiting")
    .unwrap_err();
    assert_eq!(error.code(), Code::Internal, "{error}");
    assert_eq!(
        error.err(),
        json!({"status": "error", "message": INTERNAL_SERVER_ERROR})
    );
    // A stream that panics ends with "Internal server error" after the items before the panic;
    // twice, as the route is still served.
    for _ in 0..2 {
        let items: Vec<Result<u32, RpcError>> =
            tokio::time::timeout(Duration::from_secs(5), async {
                match client.send_stream::<u32>("explode-mid-stream", &()).await {
                    Ok(stream) => stream.collect().await,
                    Err(error) => vec![Err(error)],
                }
            })
            .await
            .expect("the caller of a stream that panicked was left waiting");
        assert_eq!(items.len(), 2, "{items:?}");
        assert_eq!(items[0].as_ref().ok(), Some(&1), "{items:?}");
        let error = items[1].as_ref().unwrap_err();
        assert_eq!(error.code(), Code::Internal, "{error}");
        assert_eq!(
            error.err(),
            json!({"status": "error", "message": INTERNAL_SERVER_ERROR})
        );
    }
    // The server and the connection are fine.
    assert_eq!(client.send::<String>("ping", &()).await.unwrap(), "pong");
    server.shutdown().await;
}

/// Two clients calling the same pattern concurrently each get their own replies (transports whose clients share a reply channel must filter by id).
pub async fn two_clients_never_see_each_others_replies<H: Harness>(mut harness: H) {
    let router = Router::new().message(
        "tag",
        |Payload((who, n)): Payload<(String, u64)>| async move {
            tokio::time::sleep(Duration::from_millis(n % 7)).await;
            format!("{who}-{n}")
        },
    );
    let server = start(&mut harness, router).await;
    let builder = || Client::builder().timeout(Duration::from_secs(20));
    let (a, b) = (
        harness.client(builder()).await,
        harness.client(builder()).await,
    );
    let calls = (0..200u64).flat_map(|n| {
        [("a", a.clone()), ("b", b.clone())].map(|(who, client)| {
            tokio::spawn(async move {
                let reply: String = client.send("tag", &(who, n)).await.unwrap();
                assert_eq!(
                    reply,
                    format!("{who}-{n}"),
                    "a reply reached the wrong client"
                );
            })
        })
    });
    for call in futures_util::future::join_all(calls).await {
        call.unwrap();
    }
    server.shutdown().await;
}

/// A reply that comes after its caller gave up is dropped; requests sent meanwhile get their own answers.
pub async fn late_replies_are_dropped_without_harm<H: Harness>(mut harness: H) {
    let router = Router::new()
        .message("late", |Payload(ms): Payload<u64>| async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            ms
        })
        .message("echo", |Payload(v): Payload<Value>| async move { v });
    // The server does not stop the handler: the deadline does not travel (a caller that gives up
    // on its own, not by a deadline the server knows).
    let server = start(&mut harness, router).await;
    let client = harness.client(Client::builder()).await;
    let gave_up =
        tokio::time::timeout(Duration::from_millis(100), client.send::<u64>("late", &400)).await;
    assert!(gave_up.is_err(), "the slow reply came too soon");
    // Requests sent while the late reply arrives get their own answers.
    for i in 0..20 {
        let echoed: Value = client.send("echo", &json!({ "i": i })).await.unwrap();
        assert_eq!(echoed, json!({ "i": i }));
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    server.shutdown().await;
}

/// A reply over the transport's limit reaches the caller as `InvalidArgument` instead of never arriving.
pub async fn a_reply_too_large_becomes_an_error<H: Harness>(mut harness: H) {
    let Some(limit) = harness.max_message_size() else {
        return;
    };
    let router = Router::new()
        .message(
            "big",
            |Payload(n): Payload<usize>| async move { "x".repeat(n) },
        )
        .message("ping", || async { "pong" });
    let server = start(&mut harness, router).await;
    let client = harness
        .client(Client::builder().timeout(Duration::from_secs(10)))
        .await;
    let error = client
        .send::<String>("big", &(limit + 1024))
        .await
        .expect_err("a reply over the transport's limit cannot arrive");
    assert_eq!(error.code(), Code::InvalidArgument, "{error}");
    assert!(error.message().contains("limit"), "{error}");
    // The connection is fine.
    assert_eq!(client.send::<String>("ping", &()).await.unwrap(), "pong");
    let fits: String = client.send("big", &(limit / 2)).await.unwrap();
    assert_eq!(fits.len(), limit / 2);
    server.shutdown().await;
}

/// A request over the transport's limit fails at once with `InvalidArgument`: it is never sent, never retried, and opens no breaker.
pub async fn a_request_too_large_fails_at_once_and_is_not_retried<H: Harness>(mut harness: H) {
    let Some(limit) = harness.max_message_size() else {
        return;
    };
    let reached = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&reached);
    let router = Router::new().message("size", move |Payload(text): Payload<String>| {
        counter.fetch_add(1, Ordering::SeqCst);
        async move { text.len() }
    });
    let server = start(&mut harness, router).await;
    let client = harness
        .client(
            Client::builder()
                .timeout(Duration::from_secs(10))
                .retry(RetryPolicy::new(4))
                .circuit_breaker(CircuitBreakerConfig::new("conformance").max_failures(2)),
        )
        .await;
    for _ in 0..3 {
        let error = client
            .send::<usize>("size", &"y".repeat(limit + 1024))
            .await
            .unwrap_err();
        assert_eq!(error.code(), Code::InvalidArgument, "{error}");
    }
    assert_eq!(
        reached.load(Ordering::SeqCst),
        0,
        "a request over the limit was sent"
    );
    let breaker = client.circuit_breaker().unwrap();
    assert_eq!(
        breaker.state(),
        CircuitState::Closed,
        "size errors opened the breaker"
    );
    assert_eq!(client.send::<usize>("size", &"small").await.unwrap(), 5);
    server.shutdown().await;
}

/// When the connection is lost, requests in flight fail at once with `Unavailable`, and the client recovers once it is back.
pub async fn a_lost_connection_fails_requests_in_flight_and_the_client_recovers<H: Harness>(
    mut harness: H,
) {
    let router = Router::new()
        .message("slow", || async {
            tokio::time::sleep(Duration::from_secs(60)).await;
            "never"
        })
        .message("echo", |Payload(v): Payload<u64>| async move { v });
    let server = harness
        .serve(Server::new(router).grace_period(Duration::from_millis(100)))
        .await;
    let client = harness
        .client(Client::builder().timeout(Duration::from_secs(30)))
        .await;
    assert_eq!(client.send::<u64>("echo", &1).await.unwrap(), 1);
    let pending: Vec<_> = (0..10)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move { client.send::<String>("slow", &()).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    if !harness.interrupt().await {
        for call in pending {
            call.abort();
        }
        server.shutdown().await;
        return;
    }
    let cut = tokio::time::Instant::now();
    for call in pending {
        let error = tokio::time::timeout(Duration::from_secs(10), call)
            .await
            .expect("a request in flight hung after its connection was lost")
            .unwrap()
            .unwrap_err();
        assert_eq!(error.code(), Code::Unavailable, "{error}");
    }
    assert!(
        cut.elapsed() < Duration::from_secs(10),
        "requests in flight failed only after {:?}",
        cut.elapsed()
    );
    harness.restore().await;
    let recovered = tokio::time::Instant::now();
    loop {
        match client.send::<u64>("echo", &2).await {
            Ok(answer) => {
                assert_eq!(answer, 2);
                break;
            }
            Err(error) => {
                assert_eq!(error.code(), Code::Unavailable, "{error}");
                assert!(
                    recovered.elapsed() < Duration::from_secs(20),
                    "the client did not recover: {error}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    server.shutdown().await;
}

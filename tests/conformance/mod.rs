//! The transport conformance suite: the same behaviour over every transport.
//!
//! A transport's test file implements [`Harness`] and expands [`conformance_tests!`]. Network
//! transports run on the real clock (tokio's paused clock would jump ahead while a task waits on a
//! socket), so the suite uses short real durations and never asserts exact timings.
#![allow(dead_code)]

use futures_util::StreamExt;
use palisade::rpc::{
    Client, ClientBuilder, Code, Headers, INTERNAL_SERVER_ERROR, MessagePattern,
    NO_HANDLER_MESSAGE, Payload, Router, RpcError, Server, ServerHandle, Streaming,
};
use palisade::timeout::Deadline;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;
use tokio::sync::mpsc;

/// How a transport serves a server and builds clients for it.
pub trait Harness: Send + 'static {
    /// Serves `server`.
    fn serve(&mut self, server: Server) -> impl Future<Output = ServerHandle> + Send;
    /// A client, configured by `builder`, connected to what `serve` serves.
    fn client(&self, builder: ClientBuilder) -> impl Future<Output = Client> + Send;

    /// Whether a request for a pattern nobody handles meets no responder at all (brokers that
    /// route by subject, like NATS: NestJS reports "There are no subscribers listening to that
    /// message") rather than NestJS's no-handler reply.
    fn unknown_patterns_have_no_responders(&self) -> bool {
        false
    }
}

/// Expands to one `#[tokio::test]` per conformance case, each with a fresh harness from `$make`.
#[macro_export]
macro_rules! conformance_tests {
    ($make:expr) => {
        $crate::conformance_tests!(@cases $make;
            request_response, object_patterns_in_any_key_order, payload_decode_errors_name_the_field,
            reply_decode_errors_name_the_type, rpc_error_shapes_cross_the_boundary,
            unknown_pattern_gets_nests_reply, events_reach_every_handler, streams,
            thousand_requests_in_flight_out_of_order, deadlines_are_honoured_by_the_server,
            graceful_shutdown_drains_in_flight_requests, shutdown_past_the_grace_period_answers_everyone,
            headers_reach_handlers, unit_replies_and_empty_streams, a_panicking_handler_still_answers);
    };
    (@cases $make:expr; $($case:ident),*) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $case() {
            $crate::conformance::$case($make).await;
        }
    )*};
}

#[derive(Serialize, Deserialize, Debug, PartialEq, Clone)]
pub struct GetUser {
    pub id: u64,
}

#[derive(Serialize, Deserialize, Debug, PartialEq, Clone)]
pub struct User {
    pub id: u64,
    pub username: String,
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

async fn start<H: Harness>(harness: &mut H, router: Router) -> ServerHandle {
    harness.serve(Server::new(router)).await
}

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

pub async fn object_patterns_in_any_key_order<H: Harness>(mut harness: H) {
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

pub async fn unknown_pattern_gets_nests_reply<H: Harness>(mut harness: H) {
    let server = start(&mut harness, Router::new().message("get-user", get_user)).await;
    let client = harness.client(Client::builder()).await;
    let error = client
        .send::<Value>("no-such-pattern", &json!({"x": 1}))
        .await
        .unwrap_err();
    if harness.unknown_patterns_have_no_responders() {
        assert_eq!(error.code(), Code::Unavailable, "{error}");
        assert_eq!(
            error.message(),
            r#"There are no subscribers listening to that message ("no-such-pattern")"#
        );
    } else {
        assert_eq!(error.code(), Code::Unimplemented);
        assert_eq!(error.message(), NO_HANDLER_MESSAGE);
        assert_eq!(error.err(), json!(NO_HANDLER_MESSAGE));
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
            async move {
                stats.send(("stats".into(), user.id)).unwrap();
                Err::<(), _>(RpcError::exception(
                    "a failing handler does not stop the others",
                ))
            }
        })
        .event(
            json!({"cmd": "audit"}),
            move |MessagePattern(pattern): MessagePattern| {
                let seen = seen_tx.clone();
                async move { seen.send((pattern.route().to_owned(), 0)).unwrap() }
            },
        );
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
    client.emit(json!({"cmd": "audit"}), &()).await.unwrap();
    let mut received = Vec::new();
    for _ in 0..7 {
        let item = tokio::time::timeout(Duration::from_secs(5), seen.recv())
            .await
            .expect("an event handler ran")
            .unwrap();
        received.push(item);
    }
    received.sort();
    assert_eq!(
        received,
        [
            ("stats".into(), 1),
            ("stats".into(), 2),
            ("stats".into(), 3),
            ("welcome".into(), 1),
            ("welcome".into(), 2),
            ("welcome".into(), 3),
            (r#"{"cmd":"audit"}"#.into(), 0),
        ]
    );
    server.shutdown().await;
}

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
    let after = client.send::<u64>("work", &1).await.unwrap_err();
    assert_eq!(after.code(), Code::Unavailable, "{after}");
}

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

pub async fn headers_reach_handlers<H: Harness>(mut harness: H) {
    // With tracing on, the client propagates a trace context.
    crate::support::trace_to_nowhere();
    let server = start(
        &mut harness,
        Router::new().message("whoami", |headers: Headers| async move {
            json!({
                "tenant": headers.get("x-tenant"),
                "traced": headers.get("traceparent").is_some_and(|t| t.starts_with("00-") && t.len() == 55),
            })
        }),
    )
    .await;
    let client = harness
        .client(Client::builder().header("x-tenant", "acme"))
        .await;
    let reply: Value = client.send("whoami", &()).await.unwrap();
    assert_eq!(reply, json!({"tenant": "acme", "traced": true}));
    server.shutdown().await;
}

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

pub async fn a_panicking_handler_still_answers<H: Harness>(mut harness: H) {
    let router = Router::new()
        .message("explode", || async {
            if true {
                panic!("handler bug");
            }
            "unreachable"
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
    // The server and the connection are fine.
    assert_eq!(client.send::<String>("ping", &()).await.unwrap(), "pong");
    server.shutdown().await;
}

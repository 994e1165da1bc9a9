//! The `palisade` tool driven as a user would, against a palisade service and a real NestJS 11
//! service (`tests/nestjs/service.js`), over TCP.

#[path = "../../tests/support/nestjs.rs"]
mod nestjs;

use palisade::rpc::transport::tcp::{TcpServer, TcpTransport};
use palisade::rpc::{Client, Payload, Router, RpcError, Server, Streaming};
use serde_json::{Value, json};
use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn palisade(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_palisade"))
        .args(args)
        .output()
        .expect("run the palisade tool")
}

async fn run(args: &[&str]) -> Output {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        palisade(&args)
    })
    .await
    .unwrap()
}

fn stdout(output: &Output) -> String {
    String::from_utf8(output.stdout.clone()).unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8(output.stderr.clone()).unwrap()
}

/// A palisade service with the sample service's patterns; the events it received.
async fn palisade_service() -> (String, Arc<Mutex<Vec<Value>>>, palisade::rpc::ServerHandle) {
    let events: Arc<Mutex<Vec<Value>>> = Arc::default();
    let recorded = Arc::clone(&events);
    let listed = Arc::clone(&events);
    let router = Router::new()
        .message("get-user", |Payload(user): Payload<Value>| async move {
            let id = user["id"].as_str().unwrap_or_default().to_owned();
            json!({"id": id, "username": format!("user{id}"), "email": format!("user{id}@example.com")})
        })
        .message("fail", || async {
            Err::<(), _>(RpcError::exception_object(json!({"status": "error", "message": "boom"})))
        })
        .message("count", |Payload(n): Payload<u64>| async move {
            Streaming(futures_util::stream::iter((1..=n).map(Ok::<_, RpcError>)))
        })
        .event("user-created", move |Payload(event): Payload<Value>| {
            recorded.lock().unwrap().push(event);
            async {}
        })
        .message("last-events", move || {
            let events = listed.lock().unwrap().clone();
            async move { Value::Array(events) }
        });
    let listener = TcpServer::bind("127.0.0.1:0").await.unwrap();
    let url = format!("tcp://{}", listener.local_addr());
    let server = Server::new(router).serve(listener).await.unwrap();
    (url, events, server)
}

/// The calls every service must answer the same way, NestJS's or palisade's.
async fn exercise(url: &str) {
    let user = run(&["call", url, "get-user", r#"{"id":"42"}"#]).await;
    assert!(user.status.success(), "{}", stderr(&user));
    let user: Value = serde_json::from_str(stdout(&user).trim()).unwrap();
    assert_eq!(user["email"], "user42@example.com");

    let counted = run(&["stream", url, "count", "3"]).await;
    assert!(counted.status.success(), "{}", stderr(&counted));
    assert_eq!(
        stdout(&counted).lines().collect::<Vec<_>>(),
        ["1", "2", "3"]
    );

    // An error: exit status 1, the code, the message and NestJS's `err` on stderr.
    let failed = run(&["call", url, "fail"]).await;
    assert_eq!(failed.status.code(), Some(1));
    let said = stderr(&failed);
    assert!(said.contains("boom"), "{said}");
    assert!(said.starts_with("error: "), "{said}");

    let emitted = run(&["emit", url, "user-created", r#"{"id":"ev-1","name":"Ann"}"#]).await;
    assert!(emitted.status.success(), "{}", stderr(&emitted));
    let mut events = Value::Null;
    for _ in 0..50 {
        let listed = run(&["call", url, "last-events", "{}"]).await;
        events = serde_json::from_str(stdout(&listed).trim()).unwrap();
        if events != json!([]) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(events, json!([{"id": "ev-1", "name": "Ann"}]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_streams_and_emits_against_a_palisade_service() {
    let (url, _events, server) = palisade_service().await;
    exercise(&url).await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_streams_and_emits_against_a_nestjs_service() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let _nest = nestjs::NestService::start(&["tcp", &port.to_string()]);
    let url = format!("tcp://127.0.0.1:{port}");
    exercise(&url).await;
    // An object pattern, in either key order, as NestJS routes it.
    let sum = run(&["call", &url, r#"{"role":"math","cmd":"sum"}"#, "[20,22]"]).await;
    assert!(sum.status.success(), "{}", stderr(&sum));
    assert_eq!(stdout(&sum).trim(), "42");
}

#[tokio::test]
async fn mistakes_are_usage_errors_that_say_what_to_do() {
    let not_json = run(&["call", "tcp://127.0.0.1:1", "get-user", "{id: 42}"]).await;
    assert_eq!(not_json.status.code(), Some(2));
    assert!(
        stderr(&not_json).contains("is not JSON"),
        "{}",
        stderr(&not_json)
    );

    let no_scheme = run(&["call", "127.0.0.1:3000", "get-user"]).await;
    assert_eq!(no_scheme.status.code(), Some(2));
    assert!(
        stderr(&no_scheme).contains("tcp://"),
        "{}",
        stderr(&no_scheme)
    );

    let unknown = run(&["call", "smtp://127.0.0.1:25", "x"]).await;
    assert_eq!(unknown.status.code(), Some(2));
    assert!(
        stderr(&unknown).contains("unknown scheme"),
        "{}",
        stderr(&unknown)
    );

    let bad_timeout = run(&["call", "tcp://127.0.0.1:1", "x", "--timeout", "5 parsecs"]).await;
    assert_eq!(bad_timeout.status.code(), Some(2));

    // Nobody listening: a clear transport error, exit status 1.
    let refused = run(&["call", "tcp://127.0.0.1:1", "get-user", "--timeout", "2s"]).await;
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        stderr(&refused).starts_with("error: "),
        "{}",
        stderr(&refused)
    );

    let help = run(&["--help"]).await;
    assert!(help.status.success());
    assert!(stdout(&help).contains("Examples:"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_prints_each_event_as_a_json_line() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut listener = Command::new(env!("CARGO_BIN_EXE_palisade"))
        .args([
            "listen",
            &format!("tcp://127.0.0.1:{port}"),
            "user-created",
            r#"{"cmd":"audit"}"#,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = listener.stderr.take().unwrap();
    let mut stderr = BufReader::new(stderr).lines();
    let announced = tokio::task::spawn_blocking(move || {
        let first = stderr.next().unwrap().unwrap();
        // Keep reading, so that the tool's later lines do not meet a closed pipe.
        std::thread::spawn(move || stderr.for_each(drop));
        first
    })
    .await
    .unwrap();
    assert!(announced.starts_with("listening on tcp://"), "{announced}");

    let client = Client::builder()
        .connect(TcpTransport::new(format!("127.0.0.1:{port}")))
        .await
        .unwrap();
    client
        .emit("user-created", &json!({"id": 7}))
        .await
        .unwrap();
    client
        .emit(json!({"cmd": "audit"}), &json!("logged in"))
        .await
        .unwrap();
    let stdout = listener.stdout.take().unwrap();
    let lines = tokio::task::spawn_blocking(move || {
        BufReader::new(stdout)
            .lines()
            .take(2)
            .map(Result::unwrap)
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    let _ = listener.kill();
    let _ = listener.wait();
    let events: Vec<Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        events,
        [
            json!({"pattern": "user-created", "data": {"id": 7}}),
            json!({"pattern": {"cmd": "audit"}, "data": "logged in"}),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_reports_throughput_and_a_latency_histogram() {
    let (url, _events, server) = palisade_service().await;
    let output = run(&[
        "bench",
        &url,
        "get-user",
        r#"{"id":"1"}"#,
        "--concurrency",
        "4",
        "--duration",
        "1s",
    ])
    .await;
    assert!(output.status.success(), "{}", stderr(&output));
    let report = stdout(&output);
    assert!(report.contains("requests/s"), "{report}");
    assert!(report.contains("with 4 in flight"), "{report}");
    assert!(report.contains(", 0 failed"), "{report}");
    for quantile in ["p50", "p99", "max"] {
        assert!(report.contains(quantile), "{report}");
    }
    let requests: u64 = report.split_whitespace().next().unwrap().parse().unwrap();
    assert!(requests > 100, "{report}");
    server.shutdown().await;

    // A pattern nobody answers fails before the run, with the reason.
    let (url, _events, server) = palisade_service().await;
    let output = run(&["bench", &url, "no-such-pattern", "--duration", "1s"]).await;
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("error: "));
    server.shutdown().await;
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_a_service_over_redis() {
    use palisade::rpc::transport::redis::{RedisOptions, RedisServer};
    let url = "redis://127.0.0.1:6379";
    let pattern = format!("cli-echo-{}", std::process::id());
    let server = Server::new(Router::new().message(
        pattern.as_str(),
        |Payload(v): Payload<Value>| async move { v },
    ))
    .serve(RedisServer::new(RedisOptions::new(url)))
    .await
    .unwrap();
    let output = run(&["call", url, &pattern, r#"{"n":1}"#]).await;
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(stdout(&output).trim(), r#"{"n":1}"#);
    // Nobody subscribed: Redis says so at once.
    let output = run(&["call", url, "cli-nobody-listens"]).await;
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("no subscribers"),
        "{}",
        stderr(&output)
    );
    server.shutdown().await;
}

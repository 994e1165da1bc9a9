//! palisade and real NestJS 11 processes (`@nestjs/microservices`, `Transport.TCP`) calling each
//! other in both directions.
#![cfg(feature = "tcp")]

mod support;

use palisade::rpc::transport::ServerTransport;
use palisade::rpc::transport::tcp::{TcpServer, TcpTransport};
use palisade::rpc::{Client, Code, Server};
use serde::Deserialize;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;
use support::free_port;
use support::nestjs::{NestService, run_client};

#[derive(Deserialize, Debug, PartialEq)]
struct User {
    id: String,
    username: String,
    email: String,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_palisade_client_calls_a_nestjs_service() {
    let port = free_port();
    let _nest = NestService::start(&["tcp", &port.to_string()]);
    let client = Client::builder()
        .timeout(Duration::from_secs(10))
        .connect(TcpTransport::new(format!("127.0.0.1:{port}")))
        .await
        .unwrap();

    support::nest_calls::exercise_the_sample_service(&client).await;

    // A typed reply, and the codes of NestJS's error shapes.
    let user: User = client.send("get-user", &json!({"id": "42"})).await.unwrap();
    assert_eq!(
        user,
        User {
            id: "42".into(),
            username: "user42".into(),
            email: "user42@example.com".into()
        }
    );
    let missing = client
        .send::<User>("get-user", &json!({"id": "missing"}))
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::Application);
    let fail = client.send::<()>("fail", &json!({})).await.unwrap_err();
    assert_eq!((fail.code(), fail.message()), (Code::Application, "boom"));

    // An object pattern given as its route string.
    assert_eq!(
        client
            .send::<i64>(r#"{"cmd":"sum","role":"math"}"#, &[1, 2])
            .await
            .unwrap(),
        3
    );
    let unknown = client
        .send::<()>("no-such-pattern", &json!({"x": 1}))
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::Unimplemented);
    assert_eq!(
        client.send::<u32>("count", &4).await.unwrap(),
        4,
        "send takes the last value"
    );
    client.send::<()>("nothing", &json!({})).await.unwrap();

    // Many requests in flight on the one connection, answered out of order by NestJS.
    let calls = (0..200u64).map(|i| {
        let client = client.clone();
        tokio::spawn(async move {
            let echo: Value = client
                .send("slow", &json!({"ms": (i * 37) % 40, "i": i}))
                .await
                .unwrap();
            assert_eq!(echo["i"], i);
        })
    });
    for call in futures_util::future::join_all(calls).await {
        call.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nestjs_client_sees_a_palisade_server_exactly_as_a_nestjs_server() {
    // The NestJS client's report against NestJS itself...
    let port = free_port();
    let nest = NestService::start(&["tcp", &port.to_string()]);
    let expected = tokio::task::spawn_blocking(move || run_client(&["tcp", &port.to_string()]))
        .await
        .unwrap();
    drop(nest);

    // ...and against palisade.
    let server = TcpServer::bind("127.0.0.1:0")
        .await
        .unwrap()
        .serve(Server::new(support::nest_like::router(Arc::default())))
        .await
        .unwrap();
    let port = server.local_addr().unwrap().port().to_string();
    let report = tokio::task::spawn_blocking(move || run_client(&["tcp", &port]))
        .await
        .unwrap();
    server.shutdown().await;

    assert_eq!(report, expected);
    // And they are what the wire notes say NestJS produces.
    assert_eq!(
        report["getUser"]["value"],
        json!({"id": "42", "username": "user42", "email": "user42@example.com"})
    );
    assert_eq!(
        report["missing"]["error"],
        json!({"code": "USER_NOT_FOUND", "message": "user missing not found"})
    );
    assert_eq!(report["sum"]["value"], 11);
    assert_eq!(report["sumReordered"]["value"], 42);
    assert_eq!(report["sumRouteString"]["value"], 3);
    assert_eq!(
        report["fail"]["error"],
        json!({"status": "error", "message": "boom"})
    );
    assert_eq!(
        report["crash"]["error"],
        json!({"status": "error", "message": "Internal server error"})
    );
    assert_eq!(
        report["unknown"]["error"],
        "There is no matching message handler defined in the remote service."
    );
    assert_eq!(report["count"]["value"], json!([1, 2, 3]));
    assert_eq!(report["nothing"]["value"], json!([]));
    assert_eq!(
        report["events"]["value"],
        json!([{"id": "ev-1", "name": "Ann"}])
    );
    assert_eq!(
        report["unicode"]["value"]["text"],
        "héllo wörld ✓ € 日本語 😀🚀 end"
    );
}

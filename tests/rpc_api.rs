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

    let unbounded = Client::builder()
        .no_timeout()
        .connect(TcpTransport::new(address))
        .await
        .unwrap();
    let left: Option<u64> = unbounded.send("time-left", &()).await.unwrap();
    assert_eq!(left, None);
}

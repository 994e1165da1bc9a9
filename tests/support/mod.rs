//! Helpers shared by the integration tests.
#![allow(dead_code)]

#[cfg(feature = "kafka")]
pub mod kafka;
#[cfg(feature = "mqtt")]
pub mod mqtt;
pub mod nats;
pub mod nest_calls;
pub mod nest_like;
pub mod nestjs;
pub mod proxy;
#[cfg(feature = "rabbitmq")]
pub mod rabbitmq;
#[cfg(feature = "redis")]
pub mod redis;
pub mod resources;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::sync::oneshot;
use tower::BoxError;
use tower::util::BoxCloneService;

/// A loopback port nothing listens on (a moment ago).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Sends `echo` until the service answers (it is coming back after a fault), allowing only
/// `Unavailable` meanwhile; panics if it has not answered `within`.
pub async fn until_echo_answers(client: &palisade::rpc::Client, within: Duration, pause: Duration) {
    let deadline = std::time::Instant::now() + within;
    loop {
        match client.send::<u64>("echo", &3).await {
            Ok(answer) => {
                assert_eq!(answer, 3);
                return;
            }
            Err(error) if std::time::Instant::now() < deadline => {
                assert_eq!(error.code(), palisade::rpc::Code::Unavailable, "{error}");
                tokio::time::sleep(pause).await;
            }
            Err(error) => panic!("the service never answered again: {error}"),
        }
    }
}

/// Sends `echo` with a short string until the service answers with its length (the RabbitMQ
/// tests' `echo`), allowing only `Unavailable` meanwhile; panics after 20 s.
pub async fn until_echo_answers_len(client: &palisade::rpc::Client) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        match client.send::<usize>("echo", &"abc").await {
            Ok(answer) => {
                assert_eq!(answer, 3);
                return;
            }
            Err(error) if std::time::Instant::now() < deadline => {
                assert_eq!(error.code(), palisade::rpc::Code::Unavailable, "{error}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(error) => panic!("the service never answered again: {error}"),
        }
    }
}

/// What the scripted inner service does with a call.
#[derive(Debug)]
pub enum Call {
    /// Succeed at once.
    Ok,
    /// Fail at once.
    Fail,
    /// Fail with an error the test classifiers treat as "ignored".
    Ignore,
    /// Never finish.
    Hang,
    /// Succeed after sleeping.
    Sleep(Duration),
    /// Finish when the test says so: `Ok(())` succeeds, `Err(())` fails.
    Wait(oneshot::Receiver<Result<(), ()>>),
}

/// The error the scripted service returns for [`Call::Ignore`].
pub const IGNORED: &str = "ignored by the classifier";

/// A service scripted by its requests; counts how many calls reached it.
pub fn scripted() -> (
    BoxCloneService<Call, &'static str, BoxError>,
    Arc<AtomicUsize>,
) {
    let reached = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&reached);
    let service = tower::service_fn(move |call: Call| {
        counter.fetch_add(1, Ordering::SeqCst);
        async move {
            match call {
                Call::Ok => Ok("ok"),
                Call::Fail => Err::<_, BoxError>("boom".into()),
                Call::Ignore => Err(IGNORED.into()),
                Call::Hang => std::future::pending().await,
                Call::Sleep(d) => {
                    tokio::time::sleep(d).await;
                    Ok("slept")
                }
                Call::Wait(rx) => match rx.await {
                    Ok(Ok(())) => Ok("waited"),
                    _ => Err("failed after waiting".into()),
                },
            }
        }
    });
    (BoxCloneService::new(service), reached)
}

/// A pair for [`Call::Wait`].
pub fn gate() -> (oneshot::Sender<Result<(), ()>>, Call) {
    let (tx, rx) = oneshot::channel();
    (tx, Call::Wait(rx))
}

/// Installs (once per test binary) a global tracing subscriber that collects palisade's spans and
/// writes them nowhere: with tracing on, clients propagate a trace context.
pub fn trace_to_nowhere() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let subscriber = tracing_subscriber::fmt()
            .with_writer(std::io::sink)
            .with_max_level(tracing::Level::INFO)
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("no other global subscriber");
    });
}

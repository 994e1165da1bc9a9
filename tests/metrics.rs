//! Client and server metrics through the `metrics` facade, read back with a debugging recorder.
#![cfg(feature = "metrics")]

use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use palisade::rpc::transport::memory::MemoryTransport;
use palisade::rpc::{Client, Payload, Router, RpcError, Server};
use std::collections::BTreeMap;

/// (metric name, rpc.method, status code) → counter value or histogram sample count.
fn snapshot(snapshotter: &Snapshotter) -> BTreeMap<(String, String, String), u64> {
    snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .map(|(key, _, _, value)| {
            let key = key.key();
            let label = |name: &str| {
                key.labels()
                    .find(|l| l.key() == name)
                    .map(|l| l.value().to_owned())
                    .unwrap_or_default()
            };
            assert_eq!(label("rpc.system"), "nestjs");
            if key.name().starts_with("rpc.server") {
                assert_eq!(label("rpc.transport"), "memory");
            }
            let value = match value {
                DebugValue::Counter(n) => n,
                DebugValue::Histogram(samples) => {
                    assert!(samples.iter().all(|s| s.into_inner() >= 0.0));
                    samples.len() as u64
                }
                DebugValue::Gauge(_) => panic!("no gauges expected"),
            };
            (
                (
                    key.name().to_owned(),
                    label("rpc.method"),
                    label("rpc.response.status_code"),
                ),
                value,
            )
        })
        .collect()
}

#[test]
fn calls_are_counted_and_timed_per_pattern_and_status_on_both_sides() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    metrics::with_local_recorder(&recorder, || {
        runtime.block_on(async {
            let transport = MemoryTransport::new();
            let router = Router::new()
                .message("double", |Payload(n): Payload<i64>| async move { n * 2 })
                .message("fail", || async {
                    Err::<(), _>(RpcError::not_found("no such user"))
                })
                .event("noted", || async {});
            let server = Server::new(router).serve(&transport).await.unwrap();
            let client = Client::builder().connect(transport).await.unwrap();
            for n in 0..3 {
                assert_eq!(client.send::<i64>("double", &n).await.unwrap(), n * 2);
            }
            client.send::<()>("fail", &()).await.unwrap_err();
            client.emit("noted", &1).await.unwrap();
            server.shutdown().await;
        })
    });
    let seen = snapshot(&snapshotter);
    let get = |name: &str, method: &str, status: &str| {
        seen.get(&(name.to_owned(), method.to_owned(), status.to_owned()))
            .copied()
    };
    assert_eq!(get("rpc.server.requests", "double", "OK"), Some(3));
    assert_eq!(get("rpc.server.call.duration", "double", "OK"), Some(3));
    assert_eq!(get("rpc.server.requests", "fail", "NOT_FOUND"), Some(1));
    assert_eq!(
        get("rpc.server.call.duration", "fail", "NOT_FOUND"),
        Some(1)
    );
    assert_eq!(get("rpc.server.requests", "noted", "OK"), Some(1));
    // The client's side of the same calls.
    assert_eq!(get("rpc.client.requests", "double", "OK"), Some(3));
    assert_eq!(get("rpc.client.call.duration", "double", "OK"), Some(3));
    assert_eq!(get("rpc.client.requests", "fail", "NOT_FOUND"), Some(1));
    assert_eq!(get("rpc.client.requests", "noted", "OK"), Some(1));
    assert_eq!(seen.len(), 12, "{seen:?}");
}

/// Callers naming patterns no handler is registered for are counted under `rpc.method`
/// `_OTHER` on the server (OpenTelemetry's rule): 200 made-up patterns make one series, not
/// 200, in a process that runs for months. Routes with handlers keep their name, events too.
#[test]
fn unknown_patterns_are_counted_as_other_in_one_series() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    metrics::with_local_recorder(&recorder, || {
        runtime.block_on(async {
            let transport = MemoryTransport::new();
            let router = Router::new()
                .message("known", || async { 1 })
                .event("noted", || async {});
            let server = Server::new(router).serve(&transport).await.unwrap();
            let client = Client::builder().connect(transport).await.unwrap();
            for n in 0..200 {
                client
                    .send::<()>(format!("probe-{n}"), &())
                    .await
                    .unwrap_err();
            }
            client.emit("unheard", &1).await.unwrap();
            client.send::<i64>("known", &()).await.unwrap();
            client.emit("noted", &1).await.unwrap();
            server.shutdown().await;
        })
    });
    let seen = snapshot(&snapshotter);
    let server_methods: std::collections::BTreeSet<_> = seen
        .keys()
        .filter(|(name, ..)| name == "rpc.server.requests")
        .map(|(_, method, _)| method.as_str())
        .collect();
    assert_eq!(
        server_methods,
        ["_OTHER", "known", "noted"].into_iter().collect()
    );
    let get = |method: &str, status: &str| {
        seen.get(&(
            "rpc.server.requests".to_owned(),
            method.to_owned(),
            status.to_owned(),
        ))
        .copied()
    };
    assert_eq!(get("_OTHER", "UNIMPLEMENTED"), Some(200));
    assert_eq!(get("_OTHER", "OK"), Some(1), "the unheard event");
}

/// A failed event is counted with its error's code, as a failed request is (it was counted `OK`:
/// the router swallowed the failure, which only a durable event reported).
#[test]
fn a_failed_event_is_counted_with_its_code() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    metrics::with_local_recorder(&recorder, || {
        runtime.block_on(async {
            let transport = MemoryTransport::new();
            let router = Router::new()
                .event("flaky", |Payload(fail): Payload<bool>| async move {
                    if fail {
                        Err(RpcError::unavailable("the database is down"))
                    } else {
                        Ok(())
                    }
                })
                .event("both", || async {})
                .event("both", || async {
                    Err::<(), _>(RpcError::not_found("gone"))
                });
            let server = Server::new(router).serve(&transport).await.unwrap();
            let client = Client::builder().connect(transport).await.unwrap();
            client.emit("flaky", &true).await.unwrap();
            client.emit("flaky", &false).await.unwrap();
            client.emit("both", &()).await.unwrap();
            server.shutdown().await;
        })
    });
    let seen = snapshot(&snapshotter);
    let get = |method: &str, status: &str| {
        seen.get(&(
            "rpc.server.requests".to_owned(),
            method.to_owned(),
            status.to_owned(),
        ))
        .copied()
    };
    assert_eq!(get("flaky", "UNAVAILABLE"), Some(1), "{seen:?}");
    assert_eq!(get("flaky", "OK"), Some(1), "{seen:?}");
    assert_eq!(get("both", "NOT_FOUND"), Some(1), "{seen:?}");
    assert_eq!(get("both", "OK"), None, "{seen:?}");
}

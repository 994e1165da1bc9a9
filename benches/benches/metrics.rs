//! What the `metrics` feature costs a round trip: `send` → handler → reply through the in-memory
//! transport (client and server record a duration and a count each per call), one call at a time
//! on a `current_thread` runtime, so the recording is a visible share of the call.
//!
//! ```sh
//! cargo bench -p palisade-benches --bench metrics                     # the feature off
//! cargo bench -p palisade-benches --bench metrics --features metrics  # on: no recorder, then Prometheus
//! ```
//!
//! With the feature off, recording is not compiled at all. With it on, the bench measures the
//! call with no recorder installed (the facade's no-op) and then with the Prometheus exporter's
//! recorder installed, as an application would export them.

use criterion::{Criterion, criterion_group, criterion_main};
use palisade::rpc::transport::memory::MemoryTransport;
use palisade::rpc::{Client, Payload, Router, Server};
use std::time::Duration;

fn round_trip(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let client = runtime.block_on(async {
        let transport = MemoryTransport::new();
        let server =
            Server::new(Router::new().message("echo", |Payload(x): Payload<u64>| async move { x }))
                .serve(&transport)
                .await
                .unwrap();
        std::mem::forget(server);
        Client::builder().connect(transport).await.unwrap()
    });
    let mut group = c.benchmark_group("metrics/memory_round_trip");
    let mut call = |name: &str| {
        group.bench_function(name, |b| {
            b.to_async(&runtime).iter(|| {
                let client = client.clone();
                async move { assert_eq!(client.send::<u64>("echo", &7).await.unwrap(), 7) }
            })
        });
    };
    if cfg!(feature = "metrics") {
        call("feature on, no recorder");
        #[cfg(feature = "metrics")]
        {
            let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).unwrap();
            call("feature on, Prometheus recorder");
            let exported = handle.render();
            assert!(
                exported.contains("rpc_server_requests")
                    && exported.contains("rpc_client_requests"),
                "nothing was recorded:\n{exported}"
            );
        }
    } else {
        call("feature off");
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    targets = round_trip
}
criterion_main!(benches);

//! What the benches share.

use std::future::Future;
use std::time::{Duration, Instant};

/// Runs exactly `iters` calls of `call`, `in_flight` at a time, in runtime tasks (a caller parked
/// on the bench's main thread would add a thread wake-up to every call), and returns the wall time.
pub async fn in_tasks<F, Fut>(iters: u64, in_flight: u64, call: F) -> Duration
where
    F: Fn(u64) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    let start = Instant::now();
    let tasks: Vec<_> = (0..in_flight.min(iters))
        .map(|task| {
            let call = call.clone();
            let share = iters / in_flight + u64::from(task < iters % in_flight);
            tokio::spawn(async move {
                for i in 0..share {
                    call(task + i * in_flight).await;
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    start.elapsed()
}

/// Benches `call` as `name` in `group`: `in_flight` at a time in runtime tasks (see
/// [`in_tasks`]), each call handed its own clone of `state` (a client, say).
#[allow(dead_code)] // not every bench measures calls this way
pub fn bench_calls<T, F, Fut>(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    runtime: &tokio::runtime::Runtime,
    in_flight: u64,
    state: &T,
    call: F,
) where
    T: Clone + Send + Sync + 'static,
    F: Fn(T, u64) -> Fut + Copy + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send,
{
    group.bench_function(name, |b| {
        b.to_async(runtime).iter_custom(|iters| {
            let state = state.clone();
            in_tasks(iters, in_flight, move |x| call(state.clone(), x))
        })
    });
}

/// The runtime the broker benches drive clients and servers on: two workers, as many as the
/// machine has cores.
#[allow(dead_code)] // for the benches that build their own runtime
pub fn two_workers() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A free loopback port, for a broker a bench starts (what `tests/support/<broker>.rs` asks of
/// its parent module).
#[allow(dead_code)] // for the benches that start no broker
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The service the broker benches call: `echo` answers its number, `note` takes an event.
#[allow(dead_code)] // for the benches with services of their own
pub fn echo_router() -> palisade::rpc::Router {
    use palisade::rpc::Payload;
    palisade::rpc::Router::new()
        .message("echo", |Payload(x): Payload<u64>| async move { x })
        .event("note", |Payload(_): Payload<u64>| async {})
}

/// User and system CPU time of process `pid` (or `"self"`), in clock ticks (100 per second), from
/// `/proc/<pid>/stat`: what the `*_cpu` examples compare.
#[allow(dead_code)] // for the examples only
pub fn cpu_ticks(pid: &str) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// One contender of a `*_cpu` example: a name and one call with its number.
#[allow(dead_code)] // for the examples only
pub type CpuContender = (
    &'static str,
    std::sync::Arc<dyn Fn(u64) -> futures::future::BoxFuture<'static, ()> + Send + Sync>,
);

/// A `*_cpu` example's contender from a call.
#[allow(dead_code)] // for the examples only
pub fn contender<F, Fut>(name: &'static str, call: F) -> CpuContender
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    (
        name,
        std::sync::Arc::new(move |x| Box::pin(call(x)) as futures::future::BoxFuture<'static, ()>),
    )
}

/// A `*_cpu` example's contender that sends each number to `echo` through `client` and checks the
/// answer.
#[allow(dead_code)] // for the examples only
pub fn echo_contender(name: &'static str, client: palisade::rpc::Client) -> CpuContender {
    contender(name, move |x| {
        let client = client.clone();
        async move { assert_eq!(client.send::<u64>("echo", &x).await.unwrap(), x) }
    })
}

/// What the `*_cpu` examples print: three rounds of every contender (or only the one named by the
/// second argument), each running the first argument's number of calls (default 200 000), 64 in
/// flight, with the wall time, this process's CPU time and the broker's (`broker_pid`), each per
/// call.
#[allow(dead_code)] // for the examples only
pub fn cpu_rounds(
    runtime: &tokio::runtime::Runtime,
    broker: &str,
    broker_pid: &str,
    contenders: &[CpuContender],
) {
    let n: u64 = std::env::args()
        .nth(1)
        .map(|a| a.parse().unwrap())
        .unwrap_or(200_000);
    let only = std::env::args().nth(2).unwrap_or_default();
    let width = contenders
        .iter()
        .map(|(name, _)| name.len())
        .max()
        .unwrap_or(0);
    for round in 0..3 {
        for (name, call) in contenders {
            if !only.is_empty() && only != *name {
                continue;
            }
            let (c0, b0) = (cpu_ticks("self"), cpu_ticks(broker_pid));
            let call = std::sync::Arc::clone(call);
            let wall = runtime.block_on(in_tasks(n, 64, move |x| call(x)));
            let (c1, b1) = (cpu_ticks("self"), cpu_ticks(broker_pid));
            let per = |ticks: u64| ticks as f64 * 10_000.0 / n as f64; // 100 Hz ticks -> µs
            println!(
                "round {round} {name:width$} wall {:6.2} µs/req  cpu(process) {:6.2} µs/req  cpu({broker}) {:5.2} µs/req",
                wall.as_secs_f64() * 1e6 / n as f64,
                per(c1 - c0),
                per(b1 - b0)
            );
        }
    }
}

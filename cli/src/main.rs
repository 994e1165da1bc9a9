//! `palisade`: call, stream, emit, listen to and load-test NestJS-style message services from a
//! shell — NestJS services and palisade services alike, over any transport palisade speaks.

use clap::{Args, Parser, Subcommand};
use futures_util::StreamExt;
use palisade::rpc::transport::ServerTransport;
use palisade::rpc::transport::tcp::{TcpServer, TcpTransport};
use palisade::rpc::{
    Client, MessagePattern, Pattern, Payload, Router, RpcError, Server, ServerHandle,
};
use serde_json::Value;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

const EXAMPLES: &str = "\
Examples:
  palisade call tcp://127.0.0.1:3000 get-user '{\"id\":\"42\"}'
  palisade call tcp://127.0.0.1:3000 '{\"cmd\":\"sum\"}' '[1,2,3]'
  palisade stream nats://127.0.0.1:4222 count 3
  palisade emit nats://127.0.0.1:4222 user-created '{\"id\":7}'
  palisade listen tcp://127.0.0.1:3001 user-created order-paid
  palisade bench tcp://127.0.0.1:3000 get-user '{\"id\":\"42\"}' --concurrency 64 --duration 10s

URLs:
  tcp://HOST:PORT                       NestJS Transport.TCP
  nats://HOST:PORT[,nats://HOST:PORT]   NestJS Transport.NATS (build feature `nats`, on by default)
  amqp://USER:PASS@HOST:PORT/VHOST?queue=NAME
                                        NestJS Transport.RMQ (build feature `rabbitmq`)
  kafka://HOST:PORT[,HOST:PORT][?group=NAME]
                                        NestJS Transport.KAFKA (build feature `kafka`)
  redis://HOST:PORT                     NestJS Transport.REDIS (build feature `redis`)
  mqtt://HOST:PORT                      NestJS Transport.MQTT (build feature `mqtt`)

A pattern that starts with `{` is an object pattern (`{\"cmd\":\"sum\"}`); anything else is a
string pattern. Payloads are JSON: quote a string payload ('\"abc\"'). No payload sends null.";

#[derive(Parser)]
#[command(
    name = "palisade",
    version,
    about = "Call, stream, emit, listen to and load-test NestJS-style message services",
    after_help = EXAMPLES
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Sends a request and prints its reply (the last value of a stream) as JSON.
    Call(Call),
    /// Sends a request and prints every value of its reply stream, one JSON value per line.
    Stream(Call),
    /// Publishes an event.
    Emit(Call),
    /// Receives the events of these patterns and prints each as a JSON line
    /// `{"pattern": …, "data": …}` until interrupted (Ctrl-C).
    Listen(Listen),
    /// Sends a request over and over from many callers for a while, then prints the throughput
    /// and a latency histogram.
    Bench(Bench),
}

#[derive(Args)]
struct Target {
    /// Where the service is: tcp://, nats://, amqp://, kafka:// (see below).
    url: String,
    /// How long a request may take.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    timeout: Duration,
    /// A header sent with every message, `key=value` (repeatable).
    #[arg(long = "header", short = 'H', value_parser = parse_header)]
    headers: Vec<(String, String)>,
}

#[derive(Args)]
struct Call {
    #[command(flatten)]
    target: Target,
    /// The message pattern: a string, or a JSON object.
    pattern: String,
    /// The payload, as JSON (default: null).
    payload: Option<String>,
}

#[derive(Args)]
struct Listen {
    /// Where to listen: tcp://HOST:PORT binds a server there; the broker URLs subscribe.
    url: String,
    /// The event patterns to receive.
    #[arg(required = true)]
    patterns: Vec<String>,
}

#[derive(Args)]
struct Bench {
    #[command(flatten)]
    call: Call,
    /// Requests in flight at once.
    #[arg(long, short = 'c', default_value_t = 64)]
    concurrency: usize,
    /// How long to send for.
    #[arg(long, short = 'd', default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let (number, unit) = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((text, "s"), |at| text.split_at(at));
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration: write 500ms, 5s or 2m"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        other => {
            return Err(format!(
                "unknown unit {other:?} in {text:?}: use ms, s or m"
            ));
        }
    };
    Duration::try_from_secs_f64(seconds).map_err(|error| format!("{text:?}: {error}"))
}

fn parse_header(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(key, value)| (key.trim().to_owned(), value.to_owned()))
        .filter(|(key, _)| !key.is_empty())
        .ok_or_else(|| format!("{text:?} is not a header: write key=value"))
}

/// A line on stderr for the person watching; nobody watching (a closed pipe) is no error.
fn say(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// A usage problem, said with what to do about it.
#[derive(Debug)]
struct Usage(String);

fn pattern(text: &str) -> Result<Pattern, Usage> {
    if text.trim_start().starts_with('{') {
        let value: Value = serde_json::from_str(text).map_err(|error| {
            Usage(format!(
                "the pattern {text:?} starts with '{{' but is not a JSON object: {error}"
            ))
        })?;
        Ok(Pattern::from(value))
    } else {
        Ok(Pattern::from(text))
    }
}

fn payload(text: Option<&str>) -> Result<Value, Usage> {
    match text {
        None => Ok(Value::Null),
        Some(text) => serde_json::from_str(text).map_err(|error| {
            Usage(format!(
                "the payload {text:?} is not JSON ({error}); quote a string payload: '\"{text}\"'"
            ))
        }),
    }
}

/// The scheme of `url` and the rest.
fn scheme(url: &str) -> Result<(&str, &str), Usage> {
    url.split_once("://").ok_or_else(|| {
        Usage(format!(
            "{url:?} has no scheme: write tcp://HOST:PORT, nats://HOST:PORT, amqp://… or kafka://…"
        ))
    })
}

#[cfg_attr(
    all(
        feature = "nats",
        feature = "rabbitmq",
        feature = "kafka",
        feature = "redis",
        feature = "mqtt"
    ),
    allow(dead_code)
)]
fn not_built(scheme: &str, feature: &str) -> Usage {
    Usage(format!(
        "{scheme}:// needs the `{feature}` feature: cargo install --path cli --features {feature}"
    ))
}

async fn connect(
    target: &Target,
    patterns: &[Pattern],
) -> Result<Client, Box<dyn std::error::Error>> {
    let mut builder = Client::builder().timeout(target.timeout);
    for (key, value) in &target.headers {
        builder = builder.header(key.clone(), value.clone());
    }
    let (scheme, rest) = scheme(&target.url)?;
    let client = match scheme {
        "tcp" => builder.connect(TcpTransport::new(rest.to_owned())).await?,
        #[cfg(feature = "nats")]
        "nats" | "tls" => {
            use palisade::rpc::transport::nats::NatsOptions;
            let servers: Vec<String> = target.url.split(',').map(str::to_owned).collect();
            builder.connect(NatsOptions::new(servers)).await?
        }
        #[cfg(feature = "rabbitmq")]
        "amqp" | "amqps" => builder.connect(rabbitmq::options(&target.url)?).await?,
        #[cfg(feature = "kafka")]
        "kafka" => {
            use palisade::rpc::transport::kafka::KafkaTransport;
            let options = kafka::options(rest)?;
            builder
                .connect(KafkaTransport::new(options).reply_to(patterns.iter().cloned()))
                .await?
        }
        #[cfg(feature = "redis")]
        "redis" => {
            use palisade::rpc::transport::redis::RedisOptions;
            builder
                .connect(RedisOptions::new(target.url.clone()))
                .await?
        }
        #[cfg(feature = "mqtt")]
        "mqtt" => {
            use palisade::rpc::transport::mqtt::MqttOptions;
            builder
                .connect(MqttOptions::new(target.url.clone()))
                .await?
        }
        #[cfg(not(feature = "redis"))]
        "redis" => return Err(not_built("redis", "redis").into()),
        #[cfg(not(feature = "mqtt"))]
        "mqtt" => return Err(not_built("mqtt", "mqtt").into()),
        #[cfg(not(feature = "nats"))]
        "nats" | "tls" => return Err(not_built("nats", "nats").into()),
        #[cfg(not(feature = "rabbitmq"))]
        "amqp" | "amqps" => return Err(not_built("amqp", "rabbitmq").into()),
        #[cfg(not(feature = "kafka"))]
        "kafka" => return Err(not_built("kafka", "kafka").into()),
        other => {
            return Err(Usage(format!(
                "unknown scheme {other}://: use tcp://, nats://, amqp://, kafka://, redis:// or mqtt://"
            ))
            .into());
        }
    };
    let _ = patterns;
    Ok(client)
}

#[cfg(feature = "rabbitmq")]
mod rabbitmq {
    use super::Usage;
    use palisade::rpc::transport::rabbitmq::RmqOptions;

    /// `amqp://…?queue=NAME`: the queue is NestJS's `queue` option, the rest the broker URL.
    pub fn options(url: &str) -> Result<RmqOptions, Usage> {
        let (broker, query) = url.split_once('?').unwrap_or((url, ""));
        let queue = query
            .split('&')
            .find_map(|pair| pair.strip_prefix("queue="))
            .ok_or_else(|| {
                Usage(format!(
                    "{url:?} names no queue: add ?queue=NAME (NestJS's `queue` option)"
                ))
            })?;
        Ok(RmqOptions::new([broker]).queue(queue))
    }
}

#[cfg(feature = "kafka")]
mod kafka {
    use super::Usage;
    use palisade::rpc::transport::kafka::KafkaOptions;

    /// `HOST:PORT[,HOST:PORT][?group=NAME]`.
    pub fn options(rest: &str) -> Result<KafkaOptions, Usage> {
        let (servers, query) = rest.split_once('?').unwrap_or((rest, ""));
        if servers.is_empty() {
            return Err(Usage("kafka:// needs HOST:PORT".into()));
        }
        let group = query
            .split('&')
            .find_map(|pair| pair.strip_prefix("group="))
            .map_or_else(
                || format!("palisade-cli-{}", std::process::id()),
                str::to_owned,
            );
        Ok(KafkaOptions::new(servers.split(',')).group_id(group))
    }
}

/// How a failed call is shown: the code, the message, and NestJS's `err` value when there is one.
fn report(error: &RpcError) -> String {
    let mut text = format!("error: {}: {}", error.code(), error.message());
    if !error.err().is_null() {
        text.push_str(&format!("\n  err: {}", error.err()));
    }
    text
}

async fn call(call: Call, kind: &str) -> Result<(), Box<dyn std::error::Error>> {
    let pattern = pattern(&call.pattern)?;
    let payload = payload(call.payload.as_deref())?;
    let client = connect(&call.target, std::slice::from_ref(&pattern)).await?;
    match kind {
        "call" => {
            let reply: Value = client.send(pattern, &payload).await?;
            println!("{reply}");
        }
        "stream" => {
            let mut values = client.send_stream::<Value>(pattern, &payload).await?;
            while let Some(value) = values.next().await {
                println!("{}", value?);
            }
        }
        _ => client.emit(pattern, &payload).await?,
    }
    Ok(())
}

async fn listen(listen: Listen) -> Result<(), Box<dyn std::error::Error>> {
    let mut router = Router::new();
    for text in &listen.patterns {
        router = router.event(
            pattern(text)?,
            |MessagePattern(pattern): MessagePattern, Payload(data): Payload<Value>| async move {
                // Object patterns print as objects (their normalised route), others as strings.
                let route = pattern.route();
                let pattern = if route.starts_with('{') {
                    serde_json::from_str(route).unwrap_or_else(|_| Value::from(route))
                } else {
                    Value::from(route)
                };
                println!("{}", serde_json::json!({"pattern": pattern, "data": data}));
            },
        );
    }
    let server = Server::new(router);
    let (scheme, rest) = scheme(&listen.url)?;
    let handle: ServerHandle = match scheme {
        "tcp" => {
            let listener = TcpServer::bind(rest)
                .await
                .map_err(|error| Usage(format!("cannot listen on {rest}: {error}")))?;
            say(&format!("listening on tcp://{}", listener.local_addr()));
            listener.serve(server).await?
        }
        #[cfg(feature = "nats")]
        "nats" | "tls" => {
            use palisade::rpc::transport::nats::{NatsOptions, NatsServer};
            let servers: Vec<String> = listen.url.split(',').map(str::to_owned).collect();
            NatsServer::new(NatsOptions::new(servers))
                .serve(server)
                .await?
        }
        #[cfg(feature = "rabbitmq")]
        "amqp" | "amqps" => {
            use palisade::rpc::transport::rabbitmq::RmqServer;
            RmqServer::new(rabbitmq::options(&listen.url)?)
                .serve(server)
                .await?
        }
        #[cfg(feature = "kafka")]
        "kafka" => {
            use palisade::rpc::transport::kafka::KafkaServer;
            KafkaServer::new(kafka::options(rest)?)
                .serve(server)
                .await?
        }
        #[cfg(feature = "redis")]
        "redis" => {
            use palisade::rpc::transport::redis::{RedisOptions, RedisServer};
            RedisServer::new(RedisOptions::new(listen.url.clone()))
                .serve(server)
                .await?
        }
        #[cfg(feature = "mqtt")]
        "mqtt" => {
            use palisade::rpc::transport::mqtt::{MqttOptions, MqttServer};
            MqttServer::new(MqttOptions::new(listen.url.clone()))
                .serve(server)
                .await?
        }
        #[cfg(not(feature = "redis"))]
        "redis" => return Err(not_built("redis", "redis").into()),
        #[cfg(not(feature = "mqtt"))]
        "mqtt" => return Err(not_built("mqtt", "mqtt").into()),
        #[cfg(not(feature = "nats"))]
        "nats" | "tls" => return Err(not_built("nats", "nats").into()),
        #[cfg(not(feature = "rabbitmq"))]
        "amqp" | "amqps" => return Err(not_built("amqp", "rabbitmq").into()),
        #[cfg(not(feature = "kafka"))]
        "kafka" => return Err(not_built("kafka", "kafka").into()),
        other => {
            return Err(Usage(format!(
                "unknown scheme {other}://: use tcp://, nats://, amqp://, kafka://, redis:// or mqtt://"
            ))
            .into());
        }
    };
    say(&format!(
        "receiving {}; Ctrl-C stops",
        listen.patterns.join(", ")
    ));
    tokio::signal::ctrl_c().await?;
    handle.shutdown().await;
    Ok(())
}

async fn bench(bench: Bench) -> Result<(), Box<dyn std::error::Error>> {
    if bench.concurrency == 0 {
        return Err(Usage("--concurrency must be at least 1".into()).into());
    }
    let pattern = pattern(&bench.call.pattern)?;
    let payload = Arc::new(payload(bench.call.payload.as_deref())?);
    let client = connect(&bench.call.target, std::slice::from_ref(&pattern)).await?;
    // One call first: a wrong pattern or a missing service shows at once, not as 100% errors.
    client.send::<Value>(pattern.clone(), &*payload).await?;

    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let stop_at = started + bench.duration;
    let workers: Vec<_> = (0..bench.concurrency)
        .map(|_| {
            let (client, pattern, payload) =
                (client.clone(), pattern.clone(), Arc::clone(&payload));
            let (done, failed) = (Arc::clone(&done), Arc::clone(&failed));
            tokio::spawn(async move {
                let mut latencies =
                    hdrhistogram::Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3)
                        .expect("valid histogram bounds");
                let mut first_error = None;
                while Instant::now() < stop_at {
                    let sent = Instant::now();
                    match client.send::<Value>(pattern.clone(), &*payload).await {
                        Ok(_) => {
                            latencies.saturating_record(sent.elapsed().as_micros() as u64);
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(error) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            first_error.get_or_insert(error);
                        }
                    }
                }
                (latencies, first_error)
            })
        })
        .collect();

    // Progress, once a second, on one line of the terminal.
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.tick().await;
    while Instant::now() < stop_at {
        ticker.tick().await;
        let elapsed = started.elapsed().min(bench.duration);
        let width = 30usize;
        let filled = (width as f64 * elapsed.as_secs_f64() / bench.duration.as_secs_f64()) as usize;
        eprint!(
            "\r[{}{}] {:>5.1}s  {} ok  {} failed  {:.0}/s   ",
            "#".repeat(filled.min(width)),
            " ".repeat(width - filled.min(width)),
            elapsed.as_secs_f64(),
            done.load(Ordering::Relaxed),
            failed.load(Ordering::Relaxed),
            done.load(Ordering::Relaxed) as f64 / elapsed.as_secs_f64().max(1e-9),
        );
    }
    eprintln!();
    let mut latencies = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3)?;
    let mut first_error = None;
    for worker in workers {
        let (histogram, error) = worker.await?;
        latencies.add(&histogram)?;
        if first_error.is_none() {
            first_error = error;
        }
    }
    let elapsed = started.elapsed();
    let ok = done.load(Ordering::Relaxed);
    println!(
        "{ok} requests in {:.2}s with {} in flight: {:.0} requests/s, {} failed",
        elapsed.as_secs_f64(),
        bench.concurrency,
        ok as f64 / elapsed.as_secs_f64(),
        failed.load(Ordering::Relaxed)
    );
    if let Some(error) = first_error {
        println!("first failure: {}", report(&error));
    }
    if !latencies.is_empty() {
        println!("latency (µs)");
        for (label, quantile) in [("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p99.9", 0.999)] {
            println!("  {label:<6} {:>10}", latencies.value_at_quantile(quantile));
        }
        println!("  {:<6} {:>10}", "max", latencies.max());
        // The histogram itself: a bar per power-of-two bucket.
        let total = latencies.len() as f64;
        for bucket in latencies.iter_log(1, 2.0) {
            let count = bucket.count_since_last_iteration();
            if count == 0 {
                continue;
            }
            let share = count as f64 / total;
            println!(
                "  ≤{:>9} {:>6.2}% {}",
                bucket.value_iterated_to(),
                share * 100.0,
                "█".repeat(((share * 50.0).ceil() as usize).min(50))
            );
        }
    }
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Call(call_args) => call(call_args, "call").await,
        Command::Stream(call_args) => call(call_args, "stream").await,
        Command::Emit(call_args) => call(call_args, "emit").await,
        Command::Listen(args) => listen(args).await,
        Command::Bench(args) => bench(args).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            if let Some(error) = error.downcast_ref::<RpcError>() {
                eprintln!("{}", report(error));
                ExitCode::from(1)
            } else if let Some(Usage(message)) = error.downcast_ref::<Usage>() {
                eprintln!("palisade: {message}");
                ExitCode::from(2)
            } else {
                eprintln!("palisade: {error}");
                ExitCode::from(1)
            }
        }
    }
}

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Usage {}

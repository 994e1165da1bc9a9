//! NestJS beside palisade on one transport, for the README: every pairing of a {palisade, NestJS}
//! client and a {palisade, NestJS} server, echo requests one at a time and 64 in flight, printed
//! as requests per second. Criterion cannot time the Node client, so these report rather than
//! sample. A bench including this declares `mod nestjs` (tests/support/nestjs.rs).

use crate::support::in_tasks;
use palisade::rpc::Client;
use std::time::Duration;

/// Echo requests per measurement, after a warm-up of half as many (Node's JIT needs one).
pub const REQUESTS: u64 = 20_000;

/// Whether the command line's filter (none: everything) asks for the group `name`, as
/// `cargo bench --bench redis -- nestjs` does. The values of criterion's options
/// (`--measurement-time 1`) are not filters.
pub fn wanted(name: &str) -> bool {
    const TAKES_VALUE: &[&str] = &[
        "--warm-up-time",
        "--measurement-time",
        "--sample-size",
        "--nresamples",
        "--noise-threshold",
        "--confidence-level",
        "--significance-level",
        "--save-baseline",
        "-s",
        "--baseline",
        "-b",
        "--baseline-lenient",
        "--load-baseline",
        "--profile-time",
        "--color",
        "-c",
        "--plotting-backend",
        "--output-format",
        "--format",
    ];
    let mut filters = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if TAKES_VALUE.contains(&arg.as_str()) {
            args.next();
        } else if !arg.starts_with('-') {
            filters.push(arg);
        }
    }
    filters.is_empty() || filters.iter().any(|filter| name.contains(filter.as_str()))
}

/// Whether `node` runs here; says so when it does not.
pub fn node_available() -> bool {
    let available = std::process::Command::new("node")
        .arg("--version")
        .output()
        .is_ok_and(|output| output.status.success());
    if !available {
        eprintln!("node is not installed; skipping the NestJS comparison");
    }
    available
}

/// How one client did: requests per second, or how far it got before a reply never came.
pub enum Rate {
    /// Every request answered, this many per second.
    PerSecond(f64),
    /// A reply did not come within the reply timeout after this many answers, and the run
    /// stopped there.
    LostReply { answered: u64 },
}

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rate::PerSecond(rate) => write!(f, "{rate:.0}"),
            Rate::LostReply { answered } => write!(f, "lost a reply after {answered}"),
        }
    }
}

/// How long the NestJS client waits for one reply before counting it lost.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// Requests per second of palisade's `client` calling `echo`, `in_flight` at a time.
async fn palisade_rate(client: &Client, in_flight: u64) -> Rate {
    let call = |client: Client| {
        move |x: u64| {
            let client = client.clone();
            async move { assert_eq!(client.send::<u64>("echo", &x).await.unwrap(), x) }
        }
    };
    in_tasks(REQUESTS / 2, in_flight, call(client.clone())).await;
    let elapsed = in_tasks(REQUESTS, in_flight, call(client.clone())).await;
    Rate::PerSecond(REQUESTS as f64 / elapsed.as_secs_f64())
}

/// Requests per second of a NestJS `ClientProxy` (`tests/nestjs/bench-client.js`) calling `echo`
/// over `transport` at `address`, `in_flight` at a time.
fn nest_rate(transport: &str, address: &str, in_flight: u64) -> Rate {
    let output = crate::nestjs::node("bench-client.js")
        .env(
            "BENCH_REPLY_TIMEOUT_MS",
            REPLY_TIMEOUT.as_millis().to_string(),
        )
        .args([
            transport,
            address,
            &REQUESTS.to_string(),
            &in_flight.to_string(),
        ])
        .output()
        .expect("run node");
    assert!(
        output.status.success(),
        "bench-client.js failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    // NestJS may log before the report: the report is the line that is a JSON object.
    let stdout = String::from_utf8_lossy(&output.stdout);
    let report: serde_json::Value = stdout
        .lines()
        .rev()
        .find_map(|line| serde_json::from_str(line).ok())
        .unwrap_or_else(|| panic!("no report from bench-client.js in {stdout:?}"));
    match report["lost"].as_u64() {
        Some(0) | None => Rate::PerSecond(report["per_second"].as_f64().unwrap()),
        Some(_) => Rate::LostReply {
            answered: report["requests"].as_u64().unwrap(),
        },
    }
}

/// Prints one table row: requests per second with 1 and 64 in flight.
fn row(name: &str, one: Rate, sixty_four: Rate) {
    let (one, sixty_four) = (one.to_string(), sixty_four.to_string());
    println!("  {name:<21}   {one:>11}   {sixty_four:>12}");
}

/// Prints the table's heading.
fn heading(what: &str) {
    println!("\nrequests/s {what} (echo), {REQUESTS} requests:");
    println!("  client → server           1 in flight   64 in flight");
}

/// Prints the table of every pairing over `transport` (as `bench-client.js` names it): a
/// palisade server listens at `palisade_url`, a NestJS one at `nest_url` (on brokers of their
/// own: every server subscribed to a pattern answers it), and `connect` makes a palisade client
/// for either address.
pub fn print_pairings<C, Fut>(
    runtime: &tokio::runtime::Runtime,
    transport: &str,
    what: &str,
    (palisade_url, nest_url): (&str, &str),
    connect: C,
) where
    C: Fn(String) -> Fut,
    Fut: std::future::Future<Output = Client>,
{
    let palisade_client = |url: &str, in_flight: u64| {
        runtime.block_on(async { palisade_rate(&connect(url.to_owned()).await, in_flight).await })
    };
    nest_rate(transport, nest_url, 64); // warms NestJS's server up
    heading(what);
    for (name, url) in [
        ("palisade → palisade", palisade_url),
        ("palisade → NestJS", nest_url),
    ] {
        row(name, palisade_client(url, 1), palisade_client(url, 64));
    }
    for (name, url) in [
        ("NestJS → palisade", palisade_url),
        ("NestJS → NestJS", nest_url),
    ] {
        row(
            name,
            nest_rate(transport, url, 1),
            nest_rate(transport, url, 64),
        );
    }
}

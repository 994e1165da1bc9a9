//! NestJS beside palisade on one transport, for the README: every pairing of a {palisade, NestJS}
//! client and a {palisade, NestJS} server, echo requests one at a time and 64 in flight, printed
//! as requests per second. Criterion cannot time the Node client, so these report rather than
//! sample. A bench including this declares `mod nestjs` (tests/support/nestjs.rs).

use crate::support::in_tasks;
use palisade::rpc::Client;
use std::time::Duration;

/// Echo requests per measurement, after a warm-up of half as many (Node's JIT needs one).
pub const REQUESTS: u64 = 20_000;

/// Whether the command line's filters (none: everything) ask for the group `name`, as
/// `cargo bench --bench redis -- nestjs` does.
pub fn wanted(name: &str) -> bool {
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|arg| !arg.starts_with('-'))
        .collect();
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
pub async fn palisade_rate(client: &Client, in_flight: u64) -> Rate {
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
pub fn nest_rate(transport: &str, address: &str, in_flight: u64) -> Rate {
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
pub fn row(name: &str, one: Rate, sixty_four: Rate) {
    let (one, sixty_four) = (one.to_string(), sixty_four.to_string());
    println!("  {name:<21}   {one:>11}   {sixty_four:>12}");
}

/// Prints the table's heading.
pub fn heading(what: &str) {
    println!("\nrequests/s {what} (echo), {REQUESTS} requests:");
    println!("  client → server           1 in flight   64 in flight");
}

//! Instruction counts of the layer benches, under callgrind: exact and repeatable where wall-clock
//! figures on a shared 2-core machine move by ±20%, so before/after comparisons are honest.
//!
//! ```sh
//! cargo bench -p palisade-benches --bench layers_icount            # every contender
//! cargo bench -p palisade-benches --bench layers_icount -- preset  # names containing "preset"
//! ```
//!
//! Each contender runs twice under `valgrind --tool=callgrind`, with `SHORT` and `LONG` calls; the
//! difference divided by `LONG - SHORT` is the cost of one call, free of set-up and tear-down.
//! Overhead is the contender's count minus the bare service's (same request type), as in the
//! criterion bench (`layers.rs`), which shares these contenders.

use std::hint::black_box;
use std::process::Command;
use std::task::{Context, Waker};
use tower::{Layer, Service};

#[path = "layer_support/mod.rs"]
mod layer_support;
use layer_support::*;

use palisade::circuit_breaker::CircuitBreakerConfig;
use palisade::retry::RetryPolicy;
use palisade::timeout::{Deadlined, TimeoutLayer};
use std::time::Duration;

const SHORT: u64 = 2_000;
const LONG: u64 = 22_000;

/// (name, request type of its floor) in the order printed.
const CONTENDERS: &[(&str, &str)] = &[
    ("bare", "bare"),
    ("breaker/closed_success/palisade", "bare"),
    ("breaker/closed_success/failsafe", "bare"),
    ("breaker/closed_success/tower-resilience", "bare"),
    ("breaker/closed_success/bare+arc-per-call", "bare"),
    ("breaker/closed_failure/palisade", "bare-fail"),
    ("breaker/closed_failure/failsafe", "bare-fail"),
    ("breaker/closed_failure/tower-resilience", "bare-fail"),
    ("breaker/open_rejection/palisade", "bare"),
    ("breaker/open_rejection/failsafe", "bare"),
    ("retry/never_retries/palisade", "bare"),
    ("retry/never_retries/tower", "bare"),
    ("retry/never_retries/tower-with-palisade-policy", "bare"),
    ("retry/never_retries/tower-resilience", "bare"),
    ("retry/never_retries/palisade-with-attempts", "bare"),
    ("retry/budget/palisade", "bare"),
    ("retry/budget/tower-tps-budget", "bare"),
    ("timeout/ready/palisade", "bare"),
    ("timeout/ready/tower", "bare"),
    ("bare-deadlined", "bare-deadlined"),
    ("preset/readme/palisade", "bare-deadlined"),
    ("preset/readme-no-budget/palisade", "bare-deadlined"),
    ("bare-fail", "bare-fail"),
];

fn run<R, S: Service<R>>(mut service: S, calls: u64, request: impl Fn() -> R) {
    let mut cx = Context::from_waker(Waker::noop());
    for _ in 0..calls {
        black_box(drive_with(&mut service, &mut cx, request()));
    }
}

fn child(name: &str, calls: u64) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let _guard = runtime.enter();
    let mut cx = Context::from_waker(Waker::noop());
    let ok = || false;
    let fail = || true;
    let deadlined = || Deadlined::new(false);
    match name {
        "bare" => run(Bare, calls, ok),
        "bare-fail" => run(Bare, calls, fail),
        "bare-deadlined" => run(Bare, calls, deadlined),
        "breaker/closed_success/palisade" => run(palisade_breaker(never_trips()), calls, ok),
        "breaker/closed_success/failsafe" => run(failsafe_breaker(u32::MAX), calls, ok),
        "breaker/closed_success/tower-resilience" => run(resilience_breaker(), calls, ok),
        "breaker/closed_success/bare+arc-per-call" => run(ArcPerCall::new(Bare), calls, ok),
        "breaker/closed_failure/palisade" => run(palisade_breaker(never_trips()), calls, fail),
        "breaker/closed_failure/failsafe" => run(failsafe_breaker(u32::MAX), calls, fail),
        "breaker/closed_failure/tower-resilience" => run(resilience_breaker(), calls, fail),
        "breaker/open_rejection/palisade" => {
            let mut breaker = palisade_breaker(
                CircuitBreakerConfig::new("bench")
                    .max_failures(1)
                    .reset_timeout(Duration::from_secs(3600)),
            );
            drive(&mut breaker, &mut cx, true);
            assert!(!drive(&mut breaker, &mut cx, false));
            run(breaker, calls, ok)
        }
        "breaker/open_rejection/failsafe" => {
            let mut breaker = failsafe_breaker(1);
            drive(&mut breaker, &mut cx, true);
            assert!(!drive(&mut breaker, &mut cx, false));
            run(breaker, calls, ok)
        }
        "retry/never_retries/palisade" => run(RetryPolicy::new(3).layer().layer(Bare), calls, ok),
        "retry/never_retries/palisade-with-attempts" => {
            run(palisade::retry::Retry::new(Bare, Attempts(2)), calls, ok)
        }
        "retry/never_retries/tower" => run(tower::retry::Retry::new(Attempts(2), Bare), calls, ok),
        "retry/never_retries/tower-with-palisade-policy" => run(
            tower::retry::Retry::new(RetryPolicy::new(3), Bare),
            calls,
            ok,
        ),
        "retry/never_retries/tower-resilience" => run(
            tower_resilience::retry::RetryLayer::<bool, u64, BenchError>::builder()
                .max_attempts(3)
                .fixed_backoff(Duration::from_millis(10))
                .build()
                .layer(Bare),
            calls,
            ok,
        ),
        "retry/budget/palisade" => run(palisade_retry_with_budget(), calls, ok),
        "retry/budget/tower-tps-budget" => run(tower_retry_with_budget(), calls, ok),
        "timeout/ready/palisade" => run(
            TimeoutLayer::new(Duration::from_secs(1)).layer(Bare),
            calls,
            ok,
        ),
        "timeout/ready/tower" => run(
            tower::timeout::Timeout::new(Bare, Duration::from_secs(1)),
            calls,
            ok,
        ),
        "preset/readme/palisade" => run(readme_preset().layer(Bare), calls, deadlined),
        "preset/readme-no-budget/palisade" => {
            run(readme_preset_without_budget().layer(Bare), calls, deadlined)
        }
        other => panic!("unknown contender {other}"),
    }
}

/// Instructions executed by the whole child process running `calls` calls of `name`.
fn instructions(name: &str, calls: u64) -> u64 {
    let out = std::env::temp_dir().join(format!(
        "palisade-icount-{}-{}.out",
        std::process::id(),
        calls
    ));
    let status = Command::new("valgrind")
        .arg("--tool=callgrind")
        .arg(format!("--callgrind-out-file={}", out.display()))
        .arg(std::env::current_exe().unwrap())
        .args(["--child", name, &calls.to_string()])
        .output()
        .expect("valgrind is needed: apt-get install valgrind");
    assert!(
        status.status.success(),
        "callgrind run of {name} failed: {}",
        String::from_utf8_lossy(&status.stderr)
    );
    let text = std::fs::read_to_string(&out).unwrap();
    let _ = std::fs::remove_file(&out);
    text.lines()
        .find_map(|line| {
            line.strip_prefix("summary:")
                .or(line.strip_prefix("totals:"))
        })
        .and_then(|n| n.split_whitespace().next()?.parse().ok())
        .expect("callgrind output has a summary line")
}

fn per_call(name: &str) -> f64 {
    let short = instructions(name, SHORT);
    let long = instructions(name, LONG);
    (long as f64 - short as f64) / (LONG - SHORT) as f64
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(position) = args.iter().position(|a| a == "--child") {
        child(&args[position + 1], args[position + 2].parse().unwrap());
        return;
    }
    let filters: Vec<&String> = args.iter().filter(|a| !a.starts_with("--")).collect();
    let mut floors = std::collections::HashMap::new();
    println!(
        "{:<45} {:>12} {:>12}",
        "contender", "instr/call", "over floor"
    );
    for (name, floor) in CONTENDERS {
        let is_floor = name == floor;
        if !is_floor && !filters.is_empty() && !filters.iter().any(|f| name.contains(f.as_str())) {
            continue;
        }
        if !floors.contains_key(floor) {
            floors.insert(*floor, per_call(floor));
        }
        let count = if is_floor {
            floors[floor]
        } else {
            per_call(name)
        };
        println!(
            "{:<45} {:>12.1} {:>12.1}",
            name,
            count,
            count - floors[floor]
        );
    }
}

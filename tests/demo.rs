//! The quick start's demo, run as a user runs it: it explains itself, rejects what it does not
//! understand, and leaves a picture of the run.
#![cfg(feature = "tcp")]

use std::path::PathBuf;
use std::process::Command;

/// The demo binary `cargo test` built next to this test (`target/<profile>/examples/demo`).
fn demo() -> Command {
    let deps = std::env::current_exe().unwrap();
    let profile_dir = deps.parent().unwrap().parent().unwrap();
    let binary: PathBuf = profile_dir
        .join("examples")
        .join(format!("demo{}", std::env::consts::EXE_SUFFIX));
    assert!(
        binary.is_file(),
        "{} is missing: `cargo test` builds the examples",
        binary.display()
    );
    Command::new(binary)
}

#[test]
fn the_demo_runs_explains_its_columns_and_draws_the_run() {
    let svg = std::env::temp_dir().join(format!("palisade-demo-test-{}.svg", std::process::id()));
    let output = demo()
        .args(["--svg", svg.to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for expected in [
        "need not add up",
        "timeouts",
        "summary",
        "calls let through",
        "attempts timed out",
        "timeline picture:",
    ] {
        assert!(
            stdout.contains(expected),
            "{expected:?} missing from\n{stdout}"
        );
    }
    let picture = std::fs::read_to_string(&svg).unwrap();
    let _ = std::fs::remove_file(&svg);
    assert!(picture.starts_with("<svg"), "{picture}");
    assert!(picture.trim_end().ends_with("</svg>"));
    // A bar per second, the breaker band, the timeouts line.
    assert_eq!(picture.matches("s: breaker ").count(), 10, "{picture}");
    assert!(picture.contains("<polyline"));
    assert!(picture.contains("breaker open") || picture.contains("breaker band"));
}

#[test]
fn the_demo_rejects_what_it_does_not_understand() {
    for args in [
        &["--transport", "bogus"][..],
        &["--transprot", "tcp"][..],
        &["extra"][..],
        &["--transport"][..],
    ] {
        let output = demo().args(args).output().unwrap();
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8(output.stderr).unwrap();
        assert!(stderr.contains("usage:"), "{args:?}: {stderr}");
    }
    let help = demo().arg("--help").output().unwrap();
    assert!(help.status.success());
    assert!(
        String::from_utf8(help.stdout)
            .unwrap()
            .contains("--transport")
    );
}

//! The axum health example, run as a user runs it: 200 while everything is up, 503 with the open
//! breaker named once the service it calls is gone, on both of its routes.
#![cfg(feature = "tcp")]

use std::path::PathBuf;
use std::process::Command;

#[test]
fn the_http_health_endpoint_turns_503_when_the_breaker_opens() {
    let deps = std::env::current_exe().unwrap();
    let binary: PathBuf = deps
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples")
        .join(format!("health_http{}", std::env::consts::EXE_SUFFIX));
    assert!(
        binary.is_file(),
        "{} is missing: `cargo test` builds the examples",
        binary.display()
    );
    let output = Command::new(binary).output().unwrap();
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let answers: Vec<&str> = stdout.lines().filter(|l| l.starts_with("GET ")).collect();
    assert_eq!(answers.len(), 4, "{stdout}");
    for up in &answers[..2] {
        assert!(up.contains("-> 200 {\"status\":\"ok\""), "{up}");
    }
    for down in &answers[2..] {
        assert!(down.contains("-> 503 {\"status\":\"error\""), "{down}");
        assert!(
            down.contains("\"error\":{\"inventory\":{\"status\":\"down\",\"state\":\"open\"}}"),
            "{down}"
        );
    }
}

//! Real NestJS peers: the pinned `@nestjs/microservices` install under `tests/nestjs`.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;

/// `tests/nestjs` of the palisade package (also when compiled into the benches, a package of
/// its own one directory down).
pub fn dir() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest
        .ancestors()
        .map(|dir| dir.join("tests").join("nestjs"))
        .find(|dir| dir.join("package.json").is_file())
        .expect("tests/nestjs in the palisade workspace")
}

/// Installs the pinned packages (`npm ci`) unless they are there already. Test binaries run in
/// parallel, so the install happens under a file lock.
pub fn ensure_installed() {
    let dir = dir();
    let marker = dir.join("node_modules/@nestjs/microservices/package.json");
    if marker.exists() {
        return;
    }
    let lock = std::fs::File::create(dir.join(".install.lock"))
        .expect("create tests/nestjs/.install.lock");
    lock.lock().expect("lock tests/nestjs/.install.lock");
    if !marker.exists() {
        let status = Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
            .current_dir(&dir)
            .status()
            .expect("NestJS interop tests need Node.js and npm on PATH (https://nodejs.org)");
        assert!(status.success(), "`npm ci` in {} failed", dir.display());
    }
}

/// `node <script>` in `tests/nestjs`, with the packages installed.
pub fn node(script: &str) -> Command {
    ensure_installed();
    let mut command = Command::new("node");
    command.arg(script).current_dir(dir());
    command
}

/// A running NestJS service (`tests/nestjs/service.js`); killed when dropped.
pub struct NestService {
    child: std::process::Child,
}

impl NestService {
    /// Starts `node service.js <args>` and waits until it listens.
    pub fn start(args: &[&str]) -> NestService {
        use std::io::{BufRead, BufReader};
        let mut child = node("service.js")
            .args(args)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("run node");
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        loop {
            match lines.next() {
                Some(Ok(line)) if line.trim() == "ready" => break,
                Some(_) => {}
                None => panic!(
                    "the NestJS service exited before listening: {:?}",
                    child.wait()
                ),
            }
        }
        std::thread::spawn(move || lines.for_each(drop));
        NestService { child }
    }
}

impl Drop for NestService {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `node client.js <args>` (a NestJS ClientProxy going through the interop cases) and
/// returns its JSON report.
pub fn run_client(args: &[&str]) -> serde_json::Value {
    let output = node("client.js").args(args).output().expect("run node");
    assert!(
        output.status.success(),
        "the NestJS client failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8(output.stdout).unwrap();
    let line = stdout
        .lines()
        .find(|l| l.starts_with('{'))
        .expect("a JSON report");
    serde_json::from_str(line).unwrap()
}

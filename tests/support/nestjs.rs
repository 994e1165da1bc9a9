//! Real NestJS peers: the pinned `@nestjs/microservices` install under `tests/nestjs`.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;

/// `tests/nestjs`.
pub fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("nestjs")
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

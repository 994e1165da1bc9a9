//! A real `mosquitto` per test, on a free loopback port; it can be killed and restarted on the
//! same port to test broker loss.
#![allow(dead_code)]

use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The `mosquitto` binary: on PATH, or where Debian installs it.
fn binary() -> PathBuf {
    let candidates = std::env::var_os("PATH")
        .map(|path| {
            std::env::split_paths(&path)
                .map(|dir| dir.join("mosquitto"))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    candidates
        .into_iter()
        .chain(["/usr/sbin/mosquitto".into(), "/usr/bin/mosquitto".into()])
        .find(|candidate| candidate.is_file())
        .expect("the MQTT tests need mosquitto (Debian: `apt-get install mosquitto`; `cargo xtask deps` installs it)")
}

/// A running broker; killed when dropped.
pub struct Broker {
    child: Option<Child>,
    port: u16,
    config: PathBuf,
}

impl Broker {
    /// Starts a broker on a free port (anonymous access, no persistence).
    pub fn start() -> Broker {
        Broker::start_with("")
    }

    /// [`start`](Self::start) with more lines of configuration.
    pub fn start_with(extra_config: &str) -> Broker {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let port = super::free_port();
        let config = std::env::temp_dir().join(format!(
            "palisade-mosquitto-{}-{}.conf",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&config, Broker::config_text(port, extra_config))
            .expect("write the mosquitto configuration");
        let mut broker = Broker {
            child: None,
            port,
            config,
        };
        broker.restart();
        broker
    }

    /// `mqtt://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// The port it listens on (loopback).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The broker's process id, while it runs.
    #[allow(dead_code)] // for `examples/mqtt_cpu.rs`
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills the broker (as a crash would: no goodbye to clients).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Freezes the broker (SIGSTOP): its connections stay open, nothing is answered, as in a
    /// network partition.
    pub fn freeze(&self) {
        self.signal("-STOP");
    }

    /// Undoes [`freeze`](Self::freeze) (SIGCONT).
    pub fn thaw(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("the broker runs").id();
        let status = Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {signal} {pid} failed");
    }

    /// Restarts it on the same port with `extra_config` instead of what it had.
    pub fn restart_with(&mut self, extra_config: &str) {
        std::fs::write(&self.config, Broker::config_text(self.port, extra_config))
            .expect("write the mosquitto configuration");
        self.restart();
    }

    fn config_text(port: u16, extra_config: &str) -> String {
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\nmax_queued_messages 10000\nmax_inflight_messages 100\nset_tcp_nodelay true\n{extra_config}"
        )
    }

    /// Starts it again on the same port (empty); returns once it accepts connections.
    pub fn restart(&mut self) {
        self.stop();
        let child = Command::new(binary())
            .arg("-c")
            .arg(&self.config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start mosquitto");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "mosquitto did not start listening on {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_file(&self.config);
    }
}

//! A real `nats-server` per test, on a free loopback port, with JetStream and a store of its own;
//! it can be stopped and restarted (same port, same store) to test broker loss.
#![allow(dead_code)]

use std::io::Read;
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The `nats-server` binary: on PATH, or where Debian installs it.
fn binary() -> PathBuf {
    let candidates = std::env::var_os("PATH")
        .map(|path| {
            std::env::split_paths(&path)
                .map(|dir| dir.join("nats-server"))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    candidates
        .into_iter()
        .chain(["/usr/sbin/nats-server".into(), "/usr/bin/nats-server".into()])
        .find(|candidate| candidate.is_file())
        .expect("the NATS tests need nats-server (Debian: `apt-get install nats-server`; .ci/run installs it)")
}

/// A running broker; stopped when dropped.
pub struct Broker {
    child: Option<Child>,
    port: u16,
    store: PathBuf,
    extra: Vec<String>,
}

impl Broker {
    /// Starts a broker on a free port.
    pub fn start() -> Broker {
        Broker::start_with(&[])
    }

    /// Starts a broker with extra command-line arguments (`--user`, `--pass`, ...).
    ///
    /// The free port is found by binding port 0 and letting it go, so another process can take it
    /// before `nats-server` binds it; then `nats-server` exits and the broker starts again on
    /// another port.
    pub fn start_with(extra: &[&str]) -> Broker {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let store = std::env::temp_dir().join(format!(
            "palisade-nats-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let extra = extra.iter().map(|s| s.to_string()).collect();
        let mut broker = Broker {
            child: None,
            port: 0,
            store,
            extra,
        };
        for _ in 0..5 {
            broker.port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            if broker.launch() {
                return broker;
            }
        }
        panic!("nats-server exited at start on five free ports in a row");
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The broker's process id, while it runs.
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

    /// Starts it again on the same port and store; returns once it accepts connections.
    pub fn restart(&mut self) {
        self.stop();
        assert!(
            self.launch(),
            "nats-server exited at start (is port {} taken?)",
            self.port
        );
    }

    /// Starts `nats-server` on `self.port`: `true` once it answers there, `false` if it exited
    /// first (the port was taken).
    fn launch(&mut self) -> bool {
        let child = Command::new(binary())
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(&self.store)
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nats-server");
        let child = self.child.insert(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        // Whatever accepts on the port must be this nats-server: it greets with `INFO`, and a
        // listener of another process that took the port does not.
        while !greets_as_nats(self.port) {
            if child.try_wait().ok().flatten().is_some() {
                self.child = None;
                return false;
            }
            assert!(
                Instant::now() < deadline,
                "nats-server did not start listening on {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        true
    }
}

/// Whether a NATS server answers on `port` (its first words on a connection are `INFO`).
fn greets_as_nats(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    let mut greeting = [0u8; 4];
    stream.read_exact(&mut greeting).is_ok() && &greeting == b"INFO"
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.store);
    }
}

/// A three-node NATS cluster with JetStream on every node, on free loopback ports; nodes can be
/// killed and started again (same ports, same stores).
pub struct Cluster {
    nodes: Vec<Node>,
}

struct Node {
    name: String,
    port: u16,
    cluster_port: u16,
    store: PathBuf,
    child: Option<Child>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Cluster {
    /// Starts three nodes and waits until JetStream has a meta leader.
    pub fn start() -> Cluster {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let id = NEXT.fetch_add(1, Ordering::Relaxed);
        let nodes = (0..3)
            .map(|n| Node {
                name: format!("n{n}"),
                port: free_port(),
                cluster_port: free_port(),
                store: std::env::temp_dir().join(format!(
                    "palisade-nats-cluster-{}-{id}-n{n}",
                    std::process::id()
                )),
                child: None,
            })
            .collect();
        let mut cluster = Cluster { nodes };
        for n in 0..3 {
            cluster.start_node(n);
        }
        cluster
    }

    /// `nats://127.0.0.1:<port>` of node `n`.
    pub fn url(&self, n: usize) -> String {
        format!("nats://127.0.0.1:{}", self.nodes[n].port)
    }

    /// Every node's URL, node `first` first.
    pub fn urls_from(&self, first: usize) -> Vec<String> {
        (0..3).map(|i| self.url((first + i) % 3)).collect()
    }

    /// The node called `name` (`n0`, `n1`, `n2`: JetStream's server names).
    pub fn node_named(&self, name: &str) -> usize {
        self.nodes
            .iter()
            .position(|node| node.name == name)
            .unwrap_or_else(|| panic!("no node named {name}"))
    }

    /// Kills node `n` (as a crash would).
    pub fn kill(&mut self, n: usize) {
        if let Some(mut child) = self.nodes[n].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts node `n` (again); returns once it accepts connections.
    pub fn start_node(&mut self, n: usize) {
        self.kill(n);
        let routes: Vec<String> = self
            .nodes
            .iter()
            .map(|node| format!("nats://127.0.0.1:{}", node.cluster_port))
            .collect();
        let node = &mut self.nodes[n];
        let child = Command::new(binary())
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &node.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(&node.store)
            .args([
                "--server_name",
                &node.name,
                "--cluster_name",
                "palisade-test",
            ])
            .args([
                "--cluster",
                &format!("nats://127.0.0.1:{}", node.cluster_port),
                "--routes",
                &routes.join(","),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nats-server");
        node.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", node.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "nats-server did not start listening on {}",
                node.port
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for n in 0..self.nodes.len() {
            self.kill(n);
            let _ = std::fs::remove_dir_all(&self.nodes[n].store);
        }
    }
}

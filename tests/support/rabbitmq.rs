//! RabbitMQ for the tests: the machine's broker (127.0.0.1:5672, guest/guest) with names unique
//! to each test and deleted afterwards; a TCP proxy in front of it that can cut every connection;
//! and a private `rabbitmq-server` on free loopback ports, with its own node name, data, logs,
//! configuration, Erlang cookie and epmd, that a test can kill and restart.
#![allow(dead_code)]

use palisade::rpc::transport::rabbitmq::lapin;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The machine's broker (`PALISADE_RABBITMQ_URL` overrides it).
pub fn machine_url() -> String {
    std::env::var("PALISADE_RABBITMQ_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

/// A name no other test (or test run) uses: `palisade-<pid>-<n>-<what>`.
pub fn unique(what: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "palisade-{}-{}-{what}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Deletes queues and exchanges on drop (also when the test panics), with a connection of its
/// own. A queue `q` brings its derived names: `q.dead-letter` (queue and exchange) and the delay
/// queues `q.retry.<ms>` for the given delays.
pub struct Cleanup {
    url: String,
    queues: Vec<String>,
    exchanges: Vec<String>,
}

impl Cleanup {
    pub fn new(url: impl Into<String>) -> Cleanup {
        Cleanup {
            url: url.into(),
            queues: Vec::new(),
            exchanges: Vec::new(),
        }
    }

    /// `queue` and everything palisade derives from it.
    pub fn service_queue(mut self, queue: &str, delays_ms: &[u64]) -> Cleanup {
        self.queues.push(queue.to_owned());
        self.queues.push(format!("{queue}.dead-letter"));
        self.exchanges.push(format!("{queue}.dead-letter"));
        for delay in delays_ms {
            self.queues.push(format!("{queue}.retry.{delay}"));
        }
        self
    }

    pub fn queue(mut self, queue: &str) -> Cleanup {
        self.queues.push(queue.to_owned());
        self
    }

    pub fn exchange(mut self, exchange: &str) -> Cleanup {
        self.exchanges.push(exchange.to_owned());
        self
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let (url, queues, exchanges) = (
            self.url.clone(),
            std::mem::take(&mut self.queues),
            std::mem::take(&mut self.exchanges),
        );
        // A runtime of its own: drop may run inside (or outside) the test's runtime.
        let done = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let connect =
                    lapin::Connection::connect(&url, lapin::ConnectionProperties::default());
                let Ok(Ok(connection)) =
                    tokio::time::timeout(Duration::from_secs(5), connect).await
                else {
                    return;
                };
                for queue in queues {
                    // A channel per deletion: a failed one closes its channel.
                    if let Ok(channel) = connection.create_channel().await {
                        let _ = channel
                            .queue_delete(queue.as_str().into(), Default::default())
                            .await;
                    }
                }
                for exchange in exchanges {
                    if let Ok(channel) = connection.create_channel().await {
                        let _ = channel
                            .exchange_delete(exchange.as_str().into(), Default::default())
                            .await;
                    }
                }
                let _ = connection.close(200, "cleaned up".into()).await;
            });
        });
        let _ = done.join();
    }
}

/// A TCP proxy on a free loopback port in front of `target`: [`cut`](Self::cut) drops every
/// connection and refuses new ones (a network partition, a crashed broker, as the clients see
/// it) until [`restore`](Self::restore).
pub struct Proxy {
    port: u16,
    cut: Arc<AtomicBool>,
    connections: Arc<Mutex<Vec<TcpStream>>>,
    stop: Arc<AtomicBool>,
}

impl Proxy {
    pub fn start(target: (&str, u16)) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let connections: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let target = (target.0.to_owned(), target.1);
        {
            let (cut, stop, connections) = (
                Arc::clone(&cut),
                Arc::clone(&stop),
                Arc::clone(&connections),
            );
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((client, _)) => {
                            if cut.load(Ordering::Relaxed) {
                                drop(client);
                                continue;
                            }
                            client.set_nonblocking(false).unwrap();
                            let Ok(upstream) = TcpStream::connect((target.0.as_str(), target.1))
                            else {
                                continue;
                            };
                            let _ = client.set_nodelay(true);
                            let _ = upstream.set_nodelay(true);
                            {
                                let mut all = connections.lock().unwrap();
                                all.push(client.try_clone().unwrap());
                                all.push(upstream.try_clone().unwrap());
                            }
                            pipe(client.try_clone().unwrap(), upstream.try_clone().unwrap());
                            pipe(upstream, client);
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            });
        }
        Proxy {
            port,
            cut,
            connections,
            stop,
        }
    }

    /// `amqp://guest:guest@127.0.0.1:<port>/%2f`.
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// Drops every connection, refuses new ones.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for stream in self.connections.lock().unwrap().drain(..) {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }

    /// Accepts connections again.
    pub fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.cut();
    }
}

fn pipe(mut from: TcpStream, mut to: TcpStream) {
    std::thread::spawn(move || {
        let mut buffer = [0u8; 64 * 1024];
        loop {
            match from.read(&mut buffer) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if to.write_all(&buffer[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = to.shutdown(Shutdown::Both);
        let _ = from.shutdown(Shutdown::Both);
    });
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `rabbitmq-server` (the Debian package's real script, not the wrapper that switches user).
fn server_script() -> PathBuf {
    ["/usr/lib/rabbitmq/bin/rabbitmq-server", "/usr/sbin/rabbitmq-server"]
        .into_iter()
        .map(PathBuf::from)
        .find(|path| path.is_file())
        .expect("the RabbitMQ fault tests need rabbitmq-server (Debian: `apt-get install rabbitmq-server`; `cargo xtask deps` installs it)")
}

/// A private RabbitMQ node; killed (and its files removed) on drop.
pub struct Broker {
    dir: PathBuf,
    port: u16,
    dist_port: u16,
    epmd_port: u16,
    node: String,
    child: Option<Child>,
}

impl Broker {
    /// Starts a node on free loopback ports; `config` lines are added to its `rabbitmq.conf`.
    pub fn start(config: &[&str]) -> Broker {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("palisade-rabbitmq-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let port = free_port();
        let mut conf = format!("listeners.tcp.1 = 127.0.0.1:{port}\nloopback_users = none\n");
        for line in config {
            conf.push_str(line);
            conf.push('\n');
        }
        std::fs::write(dir.join("rabbitmq.conf"), conf).unwrap();
        std::fs::write(dir.join("env.conf"), "").unwrap();
        std::fs::write(dir.join("enabled_plugins"), "[].\n").unwrap();
        let mut broker = Broker {
            port,
            dist_port: free_port(),
            epmd_port: free_port(),
            node: format!("palisade-{}-{n}@localhost", std::process::id()),
            dir,
            child: None,
        };
        broker.restart();
        broker
    }

    /// `amqp://guest:guest@127.0.0.1:<port>/%2f`.
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Kills the node at once (a crash: no goodbye to clients).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // The script, erl and beam.smp are one process group.
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", child.id())])
                .status();
            let _ = child.kill();
            let _ = child.wait();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", self.port)).is_ok() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the node again (same ports, same data: durable queues and persistent messages
    /// survive); returns once it accepts AMQP connections.
    pub fn restart(&mut self) {
        use std::os::unix::process::CommandExt;
        self.kill();
        let dir = &self.dir;
        let log = std::fs::File::create(dir.join("server.out")).unwrap();
        let child = Command::new(server_script())
            .env_clear()
            .env("PATH", "/usr/bin:/bin:/usr/sbin:/sbin")
            .env("HOME", dir) // the Erlang cookie goes here
            .env("RABBITMQ_CONF_ENV_FILE", dir.join("env.conf"))
            .env("RABBITMQ_CONFIG_FILE", dir.join("rabbitmq.conf"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("enabled_plugins"))
            .env("RABBITMQ_NODENAME", &self.node)
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("ERL_EPMD_PORT", self.epmd_port.to_string())
            .env("ERL_EPMD_ADDRESS", "127.0.0.1")
            .env("ERL_FLAGS", "-kernel inet_dist_use_interface {127,0,0,1}")
            .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", dir.join("log"))
            .env("RABBITMQ_PID_FILE", dir.join("pid"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .process_group(0)
            .spawn()
            .expect("start rabbitmq-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if amqp_answers(self.port) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "rabbitmq-server did not start on {}: {}",
                self.port,
                std::fs::read_to_string(dir.join("server.out")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Whether the broker on `port` answers the AMQP protocol header (it listens a moment before it
/// accepts logins; a Connection.Start frame means it is ready).
fn amqp_answers(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    if stream.write_all(b"AMQP\x00\x00\x09\x01").is_err() {
        return false;
    }
    let mut frame = [0u8; 8];
    stream.read_exact(&mut frame).is_ok() && frame[0] == 1
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
        // The node's own epmd (on its own port) outlives it: stop it too.
        let _ = Command::new("epmd")
            .args(["-port", &self.epmd_port.to_string(), "-kill"])
            .env("ERL_EPMD_PORT", self.epmd_port.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

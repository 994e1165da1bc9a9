//! A TCP proxy on a free loopback port in front of a local port: it faults one client's
//! connections while the broker behind it runs on.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

/// The proxy; it stops accepting when the test's runtime ends.
pub struct Proxy {
    port: u16,
    control: Arc<Control>,
}

struct Control {
    /// The number the next connection gets.
    next: AtomicU64,
    /// Connections numbered below this forward nothing.
    stall_below: AtomicU64,
    /// Connections numbered below this are closed.
    cut_below: AtomicU64,
    /// Wakes the pumps when either limit moves.
    changed: watch::Sender<()>,
}

impl Control {
    fn stalled(&self, id: u64) -> bool {
        id < self.stall_below.load(Ordering::SeqCst)
    }

    fn cut(&self, id: u64) -> bool {
        id < self.cut_below.load(Ordering::SeqCst)
    }
}

impl Proxy {
    /// Listens on a free loopback port and forwards each connection to `target` on loopback.
    pub async fn start(target: u16) -> Proxy {
        Proxy::start_with_delay(target, Duration::ZERO).await
    }

    /// [`start`](Self::start), holding what the target sends back for `delay` before forwarding
    /// it (a slow link, or a slow broker).
    pub async fn start_with_delay(target: u16, delay: Duration) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let control = Arc::new(Control {
            next: AtomicU64::new(0),
            stall_below: AtomicU64::new(0),
            cut_below: AtomicU64::new(0),
            changed: watch::channel(()).0,
        });
        let accepting = Arc::clone(&control);
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let id = accepting.next.fetch_add(1, Ordering::SeqCst);
                let Ok(upstream) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await
                else {
                    continue;
                };
                let (client_read, client_write) = client.into_split();
                let (upstream_read, upstream_write) = upstream.into_split();
                tokio::spawn(pump(
                    client_read,
                    upstream_write,
                    id,
                    Arc::clone(&accepting),
                    Duration::ZERO,
                ));
                tokio::spawn(pump(
                    upstream_read,
                    client_write,
                    id,
                    Arc::clone(&accepting),
                    delay,
                ));
            }
        });
        Proxy { port, control }
    }

    /// The port clients connect to.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Freezes every connection made so far, as a host that vanished without a word would:
    /// nothing more is forwarded either way, and the sockets stay open. Later connections are
    /// forwarded.
    pub fn stall(&self) {
        self.control
            .stall_below
            .store(self.control.next.load(Ordering::SeqCst), Ordering::SeqCst);
        self.control.changed.send_replace(());
    }

    /// Closes every connection made so far, on both sides; what a stalled one held back is
    /// lost. Later connections are forwarded.
    pub fn cut(&self) {
        self.control
            .cut_below
            .store(self.control.next.load(Ordering::SeqCst), Ordering::SeqCst);
        self.control.changed.send_replace(());
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    id: u64,
    control: Arc<Control>,
    delay: Duration,
) {
    let mut changed = control.changed.subscribe();
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let read = tokio::select! {
            read = from.read(&mut buffer) => match read {
                Ok(0) | Err(_) => return,
                Ok(read) => read,
            },
            _ = changed.changed() => {
                if control.cut(id) {
                    return;
                }
                continue;
            }
        };
        // Held back while stalled; dropped with the connection if it is cut.
        while control.stalled(id) && !control.cut(id) {
            if changed.changed().await.is_err() {
                return;
            }
        }
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        if control.cut(id) || to.write_all(&buffer[..read]).await.is_err() {
            return;
        }
    }
}

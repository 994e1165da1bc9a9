//! A running server.

use super::Dispatcher;
use futures_util::future::BoxFuture;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

/// What happened at shutdown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Whether every in-flight message finished within the grace period.
    pub drained: bool,
    /// How many handlers were cancelled when the grace period ran out.
    pub cancelled: usize,
    /// How long shutdown took.
    pub took: Duration,
}

/// A running server. Dropping it leaves the server running; call [`shutdown`](Self::shutdown) to
/// stop it gracefully.
///
/// Transports make one with [`new`](Self::new) from their [`Dispatcher`] once they are serving.
pub struct ServerHandle {
    dispatcher: Dispatcher,
    local_addr: Option<SocketAddr>,
    /// Runs after everything drained (a broker transport flushes the last replies).
    on_shutdown: Option<BoxFuture<'static, ()>>,
}

impl ServerHandle {
    /// The handle of a server running messages through `dispatcher`.
    pub fn new(dispatcher: Dispatcher) -> Self {
        ServerHandle {
            dispatcher,
            local_addr: None,
            on_shutdown: None,
        }
    }

    /// With the address the server listens on (network transports that listen).
    pub fn with_local_addr(mut self, addr: SocketAddr) -> Self {
        self.local_addr = Some(addr);
        self
    }

    /// Runs `finish` at the end of shutdown, after the last handler is done and the transport's
    /// tasks ended (a broker transport flushes its last replies and closes its connection there).
    pub fn on_shutdown(mut self, finish: impl Future<Output = ()> + Send + 'static) -> Self {
        self.on_shutdown = Some(Box::pin(finish));
        self
    }

    /// The address the server listens on: `Some` for transports that listen on a socket (TCP),
    /// `None` for broker transports.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local_addr
    }

    /// Messages being handled right now.
    pub fn in_flight(&self) -> usize {
        self.dispatcher.in_flight()
    }

    /// Stops taking new messages (new requests are answered with `Unavailable`), waits up to the
    /// grace period for in-flight ones, then cancels what is left — their callers get
    /// `Unavailable` — and closes the transport.
    pub async fn shutdown(self) -> ShutdownReport {
        let report = self.dispatcher.shutdown().await;
        if let Some(finish) = self.on_shutdown {
            finish.await;
        }
        report
    }
}

impl fmt::Debug for ServerHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerHandle")
            .field("transport", &self.dispatcher.transport())
            .field("local_addr", &self.local_addr)
            .field("in_flight", &self.in_flight())
            .finish()
    }
}

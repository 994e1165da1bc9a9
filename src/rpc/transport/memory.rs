//! Client and server in one process: the embedded default.
//!
//! Nothing is simulated away: payloads cross as serialised JSON (a type mismatch between client
//! and handler shows up here exactly as over TCP), patterns are routed the way a NestJS server
//! routes what arrives on the wire, deadlines travel as the relative timeout header, unknown
//! patterns get NestJS's no-handler reply, errors cross as their wire `err` value, handlers run in
//! tasks of their own, and graceful shutdown drains them.

use super::{
    ClientTransport, ReplyPacket, ReplyReceiver, ReplySender, ServerTransport, reply_channel,
};
use crate::rpc::{
    Dispatcher, Kind, ReplySink, RpcError, RpcRequest, SendError, Server, ServerHandle,
};
use futures_util::future::BoxFuture;
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, RwLock};

/// Packets a streamed reply may run ahead of its reader.
const STREAM_BUFFER: usize = 16;

/// An in-process transport: serve a [`Server`] on it and connect [`Client`](crate::rpc::Client)s
/// to it. Clones are the same transport.
///
/// ```
/// use palisade::rpc::transport::memory::MemoryTransport;
/// use palisade::rpc::{Client, Router, Server};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), palisade::rpc::RpcError> {
/// let transport = MemoryTransport::new();
/// let server = Server::new(Router::new().message("ping", || async { "pong" }))
///     .serve(&transport)
///     .await?;
/// let client = Client::builder().connect(transport.clone()).await?;
/// assert_eq!(client.send::<String>("ping", &()).await?, "pong");
/// server.shutdown().await;
/// assert!(client.send::<String>("ping", &()).await.is_err()); // Unavailable: nobody serves
/// # Ok(()) }
/// ```
#[derive(Clone, Default)]
pub struct MemoryTransport {
    served: Arc<Served>,
}

/// The server a transport hands requests to. Most transports are served once, so the first
/// server is read without a lock (a read lock is a contended atomic write on every request when
/// many threads send); a server served later replaces it behind the lock.
#[derive(Default)]
struct Served {
    first: OnceLock<Dispatcher>,
    replaced: AtomicBool,
    later: RwLock<Option<Dispatcher>>,
}

impl MemoryTransport {
    /// A transport with no server yet.
    pub fn new() -> Self {
        MemoryTransport::default()
    }

    /// Serves `server` on this transport (replacing a server served before); what
    /// [`ServerTransport::serve`] does, without waiting, as nothing is there to wait for.
    pub fn serve_now(&self, server: Server) -> ServerHandle {
        let dispatcher = server.into_dispatcher("memory");
        let served = &*self.served;
        if served.first.set(dispatcher.clone()).is_err() {
            *served
                .later
                .write()
                .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(dispatcher.clone());
            served.replaced.store(true, Ordering::Release);
        }
        ServerHandle::new(dispatcher)
    }

    fn dispatcher(&self) -> Result<Dispatcher, RpcError> {
        let served = &*self.served;
        let dispatcher = if served.replaced.load(Ordering::Acquire) {
            served
                .later
                .read()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .clone()
        } else {
            served.first.get().cloned()
        };
        match dispatcher {
            Some(dispatcher) if !dispatcher.is_draining() => Ok(dispatcher),
            Some(_) => Err(RpcError::unavailable(
                "the in-memory server is shutting down",
            )),
            None => Err(RpcError::unavailable(
                "no server is serving this in-memory transport",
            )),
        }
    }
}

impl fmt::Debug for MemoryTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryTransport").finish_non_exhaustive()
    }
}

/// The request as a server receives it (routed as received from the wire; the deadline is handed
/// over as is, where a wire transport sends the time left).
fn as_received(request: RpcRequest) -> RpcRequest {
    request.into_received()
}

struct MemorySink(ReplySender);

impl ReplySink for MemorySink {
    async fn send(&mut self, packet: ReplyPacket) -> Result<(), SendError> {
        if self.0.send(packet).await {
            Ok(())
        } else {
            Err(SendError::CallerGone)
        }
    }

    async fn caller_gone(&mut self) {
        self.0.closed().await;
    }
}

impl ServerTransport for MemoryTransport {
    fn serve(self, server: Server) -> impl Future<Output = Result<ServerHandle, RpcError>> + Send {
        std::future::ready(Ok(self.serve_now(server)))
    }
}

impl ServerTransport for &MemoryTransport {
    fn serve(self, server: Server) -> impl Future<Output = Result<ServerHandle, RpcError>> + Send {
        std::future::ready(Ok(self.serve_now(server)))
    }
}

impl ClientTransport for MemoryTransport {
    fn request(&self, request: RpcRequest) -> BoxFuture<'static, Result<ReplyReceiver, RpcError>> {
        let dispatcher = self.dispatcher();
        Box::pin(async move {
            let dispatcher = dispatcher?;
            let (sender, receiver) = reply_channel(Some(STREAM_BUFFER));
            debug_assert_eq!(request.kind(), Kind::Request);
            // The client's own task calls: its handler may take its first step right here.
            dispatcher
                .dispatch_inline(as_received(request), Some(MemorySink(sender)))
                .await;
            Ok(receiver)
        })
    }

    fn emit(&self, event: RpcRequest) -> BoxFuture<'static, Result<(), RpcError>> {
        let dispatcher = self.dispatcher();
        Box::pin(async move {
            dispatcher?
                .dispatch_inline::<MemorySink>(as_received(event), None)
                .await;
            Ok(())
        })
    }
}

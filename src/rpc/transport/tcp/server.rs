use super::codec::framed;
use super::outbox::{FrameSender, outbox};
use super::{FrameReader, TcpOptions};
use crate::rpc::packet::{decode_incoming, encode_reply};
use crate::rpc::pattern::Pattern;
use crate::rpc::server::{Dispatcher, ReplySink, Server, ServerHandle};
use crate::rpc::transport::ReplyPacket;
use crate::rpc::{Kind, RawJson, RpcRequest};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream, ToSocketAddrs};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// A NestJS-compatible TCP server: bind, then [`serve`](Self::serve) a [`Server`].
#[derive(Debug)]
pub struct TcpServer {
    listener: TcpListener,
    options: TcpOptions,
}

impl TcpServer {
    /// Binds to `addr` (use port 0 for any free port; see [`local_addr`](Self::local_addr)).
    pub async fn bind(addr: impl ToSocketAddrs) -> std::io::Result<Self> {
        Ok(TcpServer {
            listener: TcpListener::bind(addr).await?,
            options: TcpOptions::default(),
        })
    }

    /// With these options.
    pub fn options(mut self, options: TcpOptions) -> Self {
        self.options = options;
        self
    }

    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Starts serving `server`; returns at once.
    pub fn serve(self, server: Server) -> ServerHandle {
        let local_addr = self.listener.local_addr().ok();
        let dispatcher = server.into_dispatcher("tcp");
        let accept = dispatcher.spawn_tracked(accept_loop(
            self.listener,
            Arc::clone(&dispatcher),
            Arc::new(self.options),
        ));
        ServerHandle::new(dispatcher, vec![accept], local_addr)
    }
}

async fn accept_loop(listener: TcpListener, dispatcher: Arc<Dispatcher>, options: Arc<TcpOptions>) {
    let connections = Arc::new(Semaphore::new(options.max_connections));
    let mut draining = std::pin::pin!(dispatcher.draining());
    loop {
        let accepted = tokio::select! {
            biased;
            _ = &mut draining => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of file descriptors and the like: pause instead of spinning.
                tracing::warn!(%error, "accepting a connection failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = Arc::clone(&connections).try_acquire_owned() else {
            tracing::warn!(%peer, limit = options.max_connections, "connection limit reached; closing the new connection");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let dispatcher_for_connection = Arc::clone(&dispatcher);
        let options = Arc::clone(&options);
        dispatcher.spawn_tracked(async move {
            serve_connection(stream, peer, dispatcher_for_connection, &options).await;
            drop(slot);
        });
    }
}

struct TcpSink {
    id: RawJson,
    frames: FrameSender,
    /// Held until the request is answered: bounds a connection's requests in flight.
    slot: OwnedSemaphorePermit,
    /// The connection's limit of requests in flight (its number of slots).
    slots: usize,
    /// No further frame had arrived when this one was read.
    last_read: bool,
}

impl ReplySink for TcpSink {
    async fn send(&mut self, packet: ReplyPacket) -> bool {
        let frame = framed(|json| encode_reply(json, &packet, &self.id));
        // Nothing else in flight on the connection, and nothing read behind this request: no
        // other reply to batch this one with.
        let alone = self.last_read && self.slot.semaphore().available_permits() + 1 >= self.slots;
        self.frames.send(&frame, alone).await.is_ok()
    }
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    dispatcher: Arc<Dispatcher>,
    options: &TcpOptions,
) {
    let (read, write) = stream.into_split();
    let (frames, writer) = outbox(write);
    let mut writer = tokio::spawn(writer.run(options.write_timeout));
    let slots = Arc::new(Semaphore::new(options.max_in_flight_per_connection));
    let mut reader = FrameReader::new(read, options);
    tracing::debug!(%peer, "connection opened");
    // Waiting for shutdown takes the token's lock at every poll, so it is polled only when no
    // frame is waiting; the flag (a plain load) stops a connection that never runs dry.
    let mut draining = std::pin::pin!(dispatcher.draining());

    let broken = loop {
        if dispatcher.is_draining() {
            break false;
        }
        let next = tokio::select! {
            biased;
            written = &mut writer => {
                if let Ok(Err(error)) = written {
                    tracing::warn!(%peer, %error, "closing connection: replies could not be written");
                }
                return;
            }
            next = reader.next() => next,
            _ = &mut draining => break false,
        };
        let frame = match next {
            None => break false,
            Some(Ok(frame)) => frame,
            Some(Err(error)) => {
                tracing::warn!(%peer, %error, "closing connection: invalid data received");
                break true;
            }
        };
        let packet = match decode_incoming(&frame) {
            Ok(packet) => packet,
            Err(error) => {
                tracing::warn!(%peer, %error, "closing connection: the received message is not valid JSON");
                break true;
            }
        };
        let slot = tokio::select! {
            biased;
            slot = Arc::clone(&slots).acquire_owned() => slot.expect("the semaphore is never closed"),
            _ = &mut draining => break false,
        };
        let kind = if packet.id.is_some() {
            Kind::Request
        } else {
            Kind::Event
        };
        let pattern = Pattern::from_wire(packet.pattern.unwrap_or_else(RawJson::null));
        let request = RpcRequest::received(pattern, packet.data, kind, packet.headers);
        let sink = packet.id.clone().map(|id| TcpSink {
            id,
            frames: frames.clone(),
            slot,
            slots: options.max_in_flight_per_connection,
            last_read: !reader.has_buffered(),
        });
        dispatcher.dispatch(request, packet.id.as_ref(), sink).await;
    };
    if broken {
        // A peer that sends garbage gets no more replies.
        frames.close();
    }
    drop(frames);
    drop(reader);
    if !broken {
        // Replies of requests still in flight go out; the writer half-closes when the last is sent.
        if let Ok(Err(error)) = writer.await {
            tracing::debug!(%peer, %error, "connection closed while writing replies");
        }
    }
    tracing::debug!(%peer, "connection closed");
}

use super::codec::{FrameError, framed, framed_binary};
use super::outbox::{FrameSender, outbox};
use super::{FrameReader, Read, TcpOptions};
use crate::rpc::transport::{ReplyPacket, ServerTransport, error_json};
use crate::rpc::wire::{SharedCodec, encode_reply};
use crate::rpc::{
    Code, Dispatcher, RawJson, ReplySink, RpcError, RpcRequest, SendError, Server, ServerHandle,
    TransportErrorKind,
};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream, ToSocketAddrs};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

/// A NestJS-compatible TCP server: [`bind`](Self::bind), then serve a [`Server`] on it
/// ([`ServerTransport::serve`]).
#[derive(Debug)]
pub struct TcpServer {
    listener: TcpListener,
    local_addr: SocketAddr,
    options: TcpOptions,
}

impl TcpServer {
    /// Binds to `addr` (use port 0 for any free port; see [`local_addr`](Self::local_addr)).
    pub async fn bind(addr: impl ToSocketAddrs) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let local_addr = listener.local_addr()?;
        Ok(TcpServer {
            listener,
            local_addr,
            options: TcpOptions::default(),
        })
    }

    /// With these options.
    pub fn options(mut self, options: TcpOptions) -> Self {
        self.options = options;
        self
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }
}

impl ServerTransport for TcpServer {
    /// Starts accepting connections; resolves at once (the socket is bound already).
    fn serve(self, server: Server) -> impl Future<Output = Result<ServerHandle, RpcError>> + Send {
        let dispatcher = server.into_dispatcher("tcp");
        dispatcher.spawn(accept_loop(
            self.listener,
            dispatcher.clone(),
            Arc::new(self.options),
        ));
        let handle = ServerHandle::new(dispatcher).with_local_addr(self.local_addr);
        std::future::ready(Ok(handle))
    }
}

async fn accept_loop(listener: TcpListener, dispatcher: Dispatcher, options: Arc<TcpOptions>) {
    let connections = Arc::new(Semaphore::new(options.max_connections));
    let budget = Arc::new(Semaphore::new(options.max_buffered_bytes));
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
        let connection = Connection {
            dispatcher: dispatcher.clone(),
            options: Arc::clone(&options),
            budget: Arc::clone(&budget),
            peer,
        };
        dispatcher.spawn(async move {
            connection.serve(stream).await;
            drop(slot);
        });
    }
}

struct TcpSink {
    id: RawJson,
    codec: SharedCodec,
    frames: FrameSender,
    max_frame_len: usize,
    /// Held until the request is answered: bounds a connection's requests in flight.
    slot: OwnedSemaphorePermit,
    /// The connection's limit of requests in flight (its number of slots).
    slots: usize,
    /// No further frame had arrived when this one was read.
    last_read: bool,
    /// The request's frame's share of the memory budget, held until it is answered.
    _budget: Option<OwnedSemaphorePermit>,
}

/// A reply's frame, in the connection's codec.
fn reply_frame(
    codec: &SharedCodec,
    max_frame_len: usize,
    packet: &ReplyPacket,
    id: Option<&RawJson>,
) -> Result<Vec<u8>, SendError> {
    let too_large = |size| SendError::TooLarge {
        size,
        limit: max_frame_len,
    };
    if codec.is_json() {
        return framed(max_frame_len, |json| encode_reply(json, packet, id)).map_err(too_large);
    }
    framed_binary(max_frame_len, |body| codec.encode_reply(body, packet, id))
        .map_err(|error| {
            SendError::Failed(RpcError::internal_with(format!(
                "cannot encode the reply: {error}"
            )))
        })?
        .map_err(too_large)
}

impl ReplySink for TcpSink {
    async fn send(&mut self, packet: ReplyPacket) -> Result<(), SendError> {
        let frame = reply_frame(&self.codec, self.max_frame_len, &packet, Some(&self.id))?;
        // Nothing else in flight on the connection, and nothing read behind this request: no
        // other reply to batch this one with.
        let alone = self.last_read && self.slot.semaphore().available_permits() + 1 >= self.slots;
        self.frames
            .send(&frame, alone)
            .await
            .map_err(|_| SendError::CallerGone)
    }

    async fn caller_gone(&mut self) {
        self.frames.peer_gone().await;
    }
}

struct Connection {
    dispatcher: Dispatcher,
    options: Arc<TcpOptions>,
    budget: Arc<Semaphore>,
    peer: SocketAddr,
}

/// How a connection's read loop ended.
enum End {
    /// The peer closed, the server is shutting down, or the connection was idle: replies of
    /// requests in flight still go out.
    Quiet,
    /// The peer broke the protocol: it is told why, and gets nothing more.
    Broken(RpcError),
}

impl Connection {
    async fn serve(self, stream: TcpStream) {
        let Connection {
            dispatcher,
            options,
            budget,
            peer,
        } = self;
        let (read, write) = stream.into_split();
        let (frames, writer) = outbox(write);
        let mut writer = tokio::spawn(writer.run(options.write_timeout));
        let slots = Arc::new(Semaphore::new(options.max_in_flight_per_connection));
        let mut reader = FrameReader::new(read, &options)
            .idle_after(options.idle_timeout)
            .within(budget, options.max_buffered_bytes);
        tracing::debug!(%peer, "connection opened");
        // Waiting for shutdown takes the token's lock at every poll, so it is polled only when no
        // frame is waiting; the flag (a plain load) stops a connection that never runs dry.
        let mut draining = std::pin::pin!(dispatcher.draining());
        // Events go through a lane of their own, opened at the first one: they start in the order
        // they arrived, and a handler busy before its first `.await` holds up only later events,
        // never the connection's requests.
        let mut events: Option<mpsc::Sender<(RpcRequest, Option<OwnedSemaphorePermit>)>> = None;

        let end = loop {
            if dispatcher.is_draining() {
                break End::Quiet;
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
                _ = &mut draining => break End::Quiet,
            };
            let frame = match next {
                Ok(Read::Frame(frame)) => frame,
                Ok(Read::Closed) => {
                    // A streamed reply waiting for its next value stops: the peer is gone (or
                    // closed its side, and reads what was produced before, no more).
                    frames.peer_closed();
                    break End::Quiet;
                }
                Ok(Read::Idle) => {
                    // Idle only if nothing is in flight either; otherwise keep waiting.
                    if slots.available_permits() == options.max_in_flight_per_connection {
                        tracing::debug!(%peer, idle = ?options.idle_timeout, "closing an idle connection");
                        break End::Quiet;
                    }
                    continue;
                }
                Err(error) => {
                    tracing::warn!(%peer, %error, "closing connection: invalid data received");
                    break End::Broken(frame_error(&error));
                }
            };
            let packet = match options.codec.decode_incoming(&frame.json) {
                Ok(packet) => packet,
                Err(error) if options.codec.is_json() => {
                    tracing::warn!(%peer, %error, "closing connection: the received message is not valid JSON");
                    break End::Broken(RpcError::transport(
                        TransportErrorKind::Protocol,
                        "The invalid received message from tcp server: the packet is not valid JSON",
                    ));
                }
                Err(error) => {
                    tracing::warn!(%peer, %error, "closing connection: the received message could not be read");
                    break End::Broken(RpcError::transport(
                        TransportErrorKind::Protocol,
                        format!(
                            "the server could not read the message (does the client use the \
                             server's codec, {}?): {error}",
                            options.codec.name()
                        ),
                    ));
                }
            };
            let slot = tokio::select! {
                biased;
                slot = Arc::clone(&slots).acquire_owned() => slot.expect("the semaphore is never closed"),
                _ = &mut draining => break End::Quiet,
            };
            let last_read = !reader.has_buffered();
            let (request, id) = packet.into_request();
            match id {
                Some(id) => {
                    let sink = TcpSink {
                        id,
                        codec: options.codec.clone(),
                        frames: frames.clone(),
                        max_frame_len: options.max_frame_len,
                        slot,
                        slots: options.max_in_flight_per_connection,
                        last_read,
                        _budget: frame.budget,
                    };
                    dispatcher.dispatch(request, Some(sink)).await;
                }
                None => {
                    drop(slot);
                    let lane = events.get_or_insert_with(|| event_lane(&dispatcher));
                    // A full lane holds the connection back, like a full server.
                    if lane.send((request, frame.budget)).await.is_err() {
                        break End::Quiet;
                    }
                }
            }
        };
        match end {
            End::Broken(error) => {
                // A last packet without an id says why (NestJS clients ignore it), then the
                // connection closes; replies still in flight are not sent.
                let explanation = reply_frame(
                    &options.codec,
                    usize::MAX,
                    &ReplyPacket::Error(error_json(&error)),
                    None,
                )
                .unwrap_or_default();
                frames.close_with(&explanation);
                drop(frames);
                drop(reader);
                let _ = tokio::time::timeout(options.write_timeout, writer).await;
            }
            End::Quiet => {
                drop(frames);
                drop(reader);
                // Replies of requests still in flight go out; the writer half-closes when the
                // last is sent.
                if let Ok(Err(error)) = writer.await {
                    tracing::debug!(%peer, %error, "connection closed while writing replies");
                }
            }
        }
        tracing::debug!(%peer, "connection closed");
    }
}

/// A connection's event lane: events are handled in the order they arrived, each holding its
/// frame's share of the memory budget until it is handled.
fn event_lane(dispatcher: &Dispatcher) -> mpsc::Sender<(RpcRequest, Option<OwnedSemaphorePermit>)> {
    let (lane, mut events) = mpsc::channel::<(RpcRequest, Option<OwnedSemaphorePermit>)>(256);
    let dispatcher_for_lane = dispatcher.clone();
    dispatcher.spawn(async move {
        while let Some((event, _budget)) = events.recv().await {
            dispatcher_for_lane.dispatch::<TcpSink>(event, None).await;
        }
    });
    lane
}

/// What a peer whose data broke the protocol is told.
fn frame_error(error: &FrameError) -> RpcError {
    let kind = match error {
        FrameError::TooLarge { .. } | FrameError::OverBudget { .. } => {
            TransportErrorKind::PayloadTooLarge
        }
        FrameError::Io(_) => TransportErrorKind::Io,
        _ => TransportErrorKind::Protocol,
    };
    let error = RpcError::transport(kind, error.to_string());
    debug_assert!(error.code() == Code::InvalidArgument || error.code() == Code::Unavailable);
    error
}

//! Transports: how messages travel between clients and servers.
//!
//! - [`memory`]: client and server in one process — the embedded default, with the same
//!   semantics as the wire transports (payloads are serialised, patterns normalised, deadlines
//!   carried, unknown patterns answered the NestJS way).
//! - `tcp` (feature `tcp`): NestJS's `Transport.TCP`.
//! - `nats` (feature `nats`): NestJS's `Transport.NATS`, with optional durable (JetStream) events.
//!
//! A client talks to a transport through [`ClientTransport`]; implement it to add your own.

pub mod memory;
#[cfg(feature = "nats")]
pub mod nats;
#[cfg(feature = "tcp")]
pub mod tcp;

use super::{RawJson, RpcError, RpcRequest};
use futures_util::future::BoxFuture;
use std::fmt;
use std::future::Future;
use tokio::sync::{mpsc, oneshot};

/// One reply packet for a request, as a client transport delivers it.
#[derive(Clone, Debug, PartialEq)]
pub enum ReplyPacket {
    /// A value; `last` when no packet follows (NestJS's `isDisposed` on the value).
    Value {
        /// The value.
        response: RawJson,
        /// Whether this is the final packet.
        last: bool,
    },
    /// The reply stream ended (NestJS's standalone `{"isDisposed":true}`).
    Complete,
    /// The handler failed; the raw `err` value.
    Error(RawJson),
    /// No handler for the pattern (NestJS's no-handler reply).
    NoHandler,
}

impl ReplyPacket {
    /// Whether no packet follows this one.
    pub fn is_last(&self) -> bool {
        !matches!(self, ReplyPacket::Value { last: false, .. })
    }
}

enum RestReceiver {
    Bounded(mpsc::Receiver<ReplyPacket>),
    Unbounded(mpsc::UnboundedReceiver<ReplyPacket>),
}

enum RestSender {
    Bounded(mpsc::Sender<ReplyPacket>),
    Unbounded(mpsc::UnboundedSender<ReplyPacket>),
}

type First = (ReplyPacket, Option<RestReceiver>);

/// A channel for one request's reply packets: [`ReplySender`] for the transport,
/// [`ReplyReceiver`] for the caller.
///
/// Most replies are a single packet, so the first packet travels through a oneshot; a channel for
/// the rest is opened only when the first packet is not the last. `stream_buffer` bounds how far a
/// streamed reply may run ahead of its reader (`None`: unbounded, for transports that cannot push
/// back, like a connection's reader serving many requests).
pub fn reply_channel(stream_buffer: Option<usize>) -> (ReplySender, ReplyReceiver) {
    let (first, receiver) = oneshot::channel();
    (
        ReplySender {
            first: Some(first),
            rest: None,
            stream_buffer,
        },
        ReplyReceiver {
            state: ReceiverState::First(receiver),
            _registration: None,
        },
    )
}

/// The transport's end of a [`reply_channel`].
pub struct ReplySender {
    first: Option<oneshot::Sender<First>>,
    rest: Option<RestSender>,
    stream_buffer: Option<usize>,
}

impl ReplySender {
    /// Sends a packet, waiting for room if a bounded stream is full; `false` if the caller is gone.
    pub async fn send(&mut self, packet: ReplyPacket) -> bool {
        match &self.rest {
            Some(RestSender::Bounded(rest)) => match rest.try_send(packet) {
                Ok(()) => true,
                // Waiting for room is rare; boxing it keeps every sender's future small.
                Err(mpsc::error::TrySendError::Full(packet)) => {
                    Box::pin(rest.send(packet)).await.is_ok()
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            },
            _ => self.try_send(packet),
        }
    }

    /// Sends a packet without waiting; `false` if the caller is gone, or a bounded stream is full.
    pub fn try_send(&mut self, packet: ReplyPacket) -> bool {
        if let Some(first) = self.first.take() {
            let rest = if packet.is_last() {
                None
            } else {
                let (sender, receiver) = match self.stream_buffer {
                    Some(buffer) => {
                        let (tx, rx) = mpsc::channel(buffer.max(1));
                        (RestSender::Bounded(tx), RestReceiver::Bounded(rx))
                    }
                    None => {
                        let (tx, rx) = mpsc::unbounded_channel();
                        (RestSender::Unbounded(tx), RestReceiver::Unbounded(rx))
                    }
                };
                self.rest = Some(sender);
                Some(receiver)
            };
            return first.send((packet, rest)).is_ok();
        }
        match &self.rest {
            Some(RestSender::Bounded(rest)) => rest.try_send(packet).is_ok(),
            Some(RestSender::Unbounded(rest)) => rest.send(packet).is_ok(),
            None => false,
        }
    }
}

impl fmt::Debug for ReplySender {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplySender").finish_non_exhaustive()
    }
}

enum ReceiverState {
    First(oneshot::Receiver<First>),
    Rest(RestReceiver),
    Done,
}

/// The reply packets of one request, in order. Dropping it tells the transport the caller is no
/// longer interested (later packets for the request are discarded).
pub struct ReplyReceiver {
    state: ReceiverState,
    // Held for its `Drop` (a transport unregisters the request there).
    _registration: Option<Box<dyn Send + Sync>>,
}

impl ReplyReceiver {
    /// With `registration`, dropped together with the receiver (a transport forgets the request
    /// there).
    pub fn with_registration(mut self, registration: Box<dyn Send + Sync>) -> Self {
        self._registration = Some(registration);
        self
    }

    /// The next packet; `None` if the transport lost the request (it reports why by sending an
    /// `Unavailable` error packet first when it can).
    pub async fn recv(&mut self) -> Option<ReplyPacket> {
        match &mut self.state {
            ReceiverState::First(first) => match first.await {
                Ok((packet, rest)) => {
                    self.state = rest.map_or(ReceiverState::Done, ReceiverState::Rest);
                    Some(packet)
                }
                Err(_) => {
                    self.state = ReceiverState::Done;
                    None
                }
            },
            ReceiverState::Rest(RestReceiver::Bounded(rest)) => rest.recv().await,
            ReceiverState::Rest(RestReceiver::Unbounded(rest)) => rest.recv().await,
            ReceiverState::Done => None,
        }
    }
}

impl fmt::Debug for ReplyReceiver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplyReceiver").finish_non_exhaustive()
    }
}

/// The client side of a transport.
pub trait ClientTransport: Send + Sync + 'static {
    /// Sends a request (`Kind::Request`); the receiver yields its reply packets.
    fn request(&self, request: RpcRequest) -> BoxFuture<'static, Result<ReplyReceiver, RpcError>>;

    /// Publishes an event (`Kind::Event`); resolves once it is handed to the transport.
    fn emit(&self, event: RpcRequest) -> BoxFuture<'static, Result<(), RpcError>>;
}

/// Something a [`Client`](crate::rpc::Client) can connect through: a transport, or the
/// configuration of one that needs connecting first.
pub trait Connect {
    /// The connected transport.
    type Transport: ClientTransport;

    /// Connects.
    fn connect(self) -> impl Future<Output = Result<Self::Transport, RpcError>> + Send;
}

impl<T: ClientTransport> Connect for T {
    type Transport = T;

    fn connect(self) -> impl Future<Output = Result<T, RpcError>> + Send {
        std::future::ready(Ok(self))
    }
}

/// The `err` JSON for `error`.
pub(crate) fn error_json(error: &RpcError) -> RawJson {
    RawJson::to_json(&error.err()).unwrap_or_else(|_| RawJson::null())
}

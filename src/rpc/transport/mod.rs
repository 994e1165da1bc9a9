//! Transports: how messages travel between clients and servers.
//!
//! - [`memory`]: client and server in one process — the embedded default, with the same
//!   semantics as the wire transports (payloads are serialised, patterns normalised, deadlines
//!   carried, unknown patterns answered the NestJS way).
//! - [`tcp`](crate::rpc::transport::tcp) (feature `tcp`): NestJS's `Transport.TCP`.
//! - `nats` (feature `nats`): NestJS's `Transport.NATS`.
//!
//! A client talks to a transport through [`ClientTransport`]; implement it to add your own.

pub mod memory;
#[cfg(feature = "tcp")]
pub mod tcp;

use super::{RawJson, RpcError, RpcRequest};
use futures_util::future::BoxFuture;
use std::fmt;
use std::future::Future;
use tokio::sync::mpsc;

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

enum Channel {
    Bounded(mpsc::Receiver<ReplyPacket>),
    Unbounded(mpsc::UnboundedReceiver<ReplyPacket>),
}

/// The reply packets of one request, in order. Dropping it tells the transport the caller is no
/// longer interested (later packets for the request are discarded).
pub struct ReplyReceiver {
    channel: Channel,
    // Held for its `Drop` (a transport unregisters the request there).
    _registration: Option<Box<dyn Send + Sync>>,
}

impl ReplyReceiver {
    /// Packets from a bounded channel; `registration` is dropped with the receiver.
    pub fn bounded(
        receiver: mpsc::Receiver<ReplyPacket>,
        registration: Option<Box<dyn Send + Sync>>,
    ) -> Self {
        ReplyReceiver {
            channel: Channel::Bounded(receiver),
            _registration: registration,
        }
    }

    /// Packets from an unbounded channel; `registration` is dropped with the receiver.
    pub fn unbounded(
        receiver: mpsc::UnboundedReceiver<ReplyPacket>,
        registration: Option<Box<dyn Send + Sync>>,
    ) -> Self {
        ReplyReceiver {
            channel: Channel::Unbounded(receiver),
            _registration: registration,
        }
    }

    /// The next packet; `None` if the transport lost the request (it reports why by sending an
    /// `Unavailable` error packet first when it can).
    pub async fn recv(&mut self) -> Option<ReplyPacket> {
        match &mut self.channel {
            Channel::Bounded(receiver) => receiver.recv().await,
            Channel::Unbounded(receiver) => receiver.recv().await,
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

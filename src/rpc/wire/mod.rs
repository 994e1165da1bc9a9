//! The wire pieces every transport shares, written once: NestJS's JSON envelope, packet ids and
//! the correlation map of a request/reply client.
//!
//! A transport written outside this crate uses these the way the built-in ones do:
//!
//! - **The envelope** (nestjs-wire.md §1): [`encode_request`] and [`encode_reply`] write NestJS's
//!   packets byte for byte in Nest's key order; [`decode_incoming`] and [`decode_reply`] read them
//!   with Nest's rules (external messages, JavaScript truthiness of `err` and `isDisposed`, the
//!   last of duplicated keys). The request's deadline travels as the relative
//!   [`TIMEOUT_HEADER`](crate::rpc::TIMEOUT_HEADER): [`RpcRequest::wire_headers`] adds it when
//!   sending, [`RpcRequest::received`] turns it back into a deadline (the JSON codec reads it
//!   apart from the other headers, into [`IncomingPacket::timeout_ms`], without making it a
//!   header first).
//! - **The codec seam**: [`Codec`] is how the envelope transports turn packets into message
//!   bodies: [`JsonCodec`] (NestJS's packets, the default) or, feature `msgpack`,
//!   [`MessagePackCodec`] for palisade-to-palisade traffic.
//! - **Packet ids**: [`PacketIds`] makes NestJS-style ids from request numbers and reads them back.
//! - **Correlation**: [`PendingRequests`] registers requests, routes replies to them, forgets
//!   requests whose callers gave up, counts late replies and fails everything in flight when the
//!   connection is lost.
//!
//! [`RpcRequest::wire_headers`]: crate::rpc::RpcRequest::wire_headers
//! [`RpcRequest::received`]: crate::rpc::RpcRequest::received

mod codec;
mod envelope;
mod ids;
mod pending;
mod scan;

#[cfg(feature = "msgpack")]
#[cfg_attr(docsrs, doc(cfg(feature = "msgpack")))]
pub use self::codec::MessagePackCodec;
pub use self::codec::{Codec, CodecError, JsonCodec, SharedCodec};
pub use self::envelope::{
    IncomingPacket, decode_incoming, decode_reply, encode_reply, encode_request,
    encode_request_within, wire_pattern,
};
pub use self::ids::{PACKET_ID_LEN, PacketId, PacketIds};
pub use self::pending::{Delivery, PendingRequests, Registered};
pub use crate::rpc::json::encoded;

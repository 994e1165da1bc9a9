//! NestJS's JSON packets (nestjs-wire.md §1.1–1.4), encoded with Nest's key order so that frames
//! are byte-identical to Nest's, and decoded with Nest's rules.

use super::scan::{self, Fields, Key};
use crate::rpc::error::NO_HANDLER_MESSAGE;
use crate::rpc::request::LINEAR_HEADERS;
use crate::rpc::transport::ReplyPacket;
use crate::rpc::{Headers, Kind, Pattern, RawJson, RpcRequest, TIMEOUT_HEADER};
use bytes::{BufMut, Bytes};
use serde::Deserialize;
use serde::de::{IgnoredAny, MapAccess, Visitor};
use serde_json::value::RawValue;
use std::fmt;
use std::sync::Arc;

/// `,"headers":{..}` when there are headers or a deadline: `headers` in their order, and the
/// deadline's [`TIMEOUT_HEADER`] with `timeout_ms` — in place of a header of that name, else
/// last — exactly as writing `headers` with the timeout inserted would.
fn put_headers<B: BufMut>(out: &mut B, headers: &Headers, timeout_ms: Option<u64>) {
    if headers.is_empty() && timeout_ms.is_none() {
        return;
    }
    out.put_slice(b",\"headers\":{");
    let mut timeout = timeout_ms;
    for (i, (key, value)) in headers.iter().enumerate() {
        if i > 0 {
            out.put_u8(b',');
        }
        put_string(out, key);
        out.put_u8(b':');
        match timeout.filter(|_| key.eq_ignore_ascii_case(TIMEOUT_HEADER)) {
            Some(millis) => {
                put_millis(out, millis);
                timeout = None;
            }
            None => put_string(out, value),
        }
    }
    if let Some(millis) = timeout {
        if !headers.is_empty() {
            out.put_u8(b',');
        }
        out.put_slice(QUOTED_TIMEOUT_KEY);
        put_millis(out, millis);
    }
    out.put_u8(b'}');
}

/// [`TIMEOUT_HEADER`] as a JSON object's key, colon included: written into every request that
/// carries a deadline, and a constant needs no scan for characters to escape.
const QUOTED_TIMEOUT_KEY: &[u8] = b"\"palisade-timeout-ms\":";

/// `millis` as a JSON string of its decimal digits, as `millis.to_string()` would be written.
fn put_millis<B: BufMut>(out: &mut B, millis: u64) {
    let mut digits = [0u8; 20];
    out.put_u8(b'"');
    out.put_slice(crate::rpc::json::decimal(millis, &mut digits));
    out.put_u8(b'"');
}

/// `text` as a JSON string, exactly as `serde_json` writes it. Ids, header names and most
/// values need no escape, and copying them whole costs a fraction of escaping byte by byte
/// through an `io::Write` adapter.
fn put_string<B: BufMut>(out: &mut B, text: &str) {
    // serde_json escapes exactly these: control characters, the quote and the backslash. A fold
    // without an early exit, so that the compiler checks many bytes at a time.
    let needs_escape = text.bytes().fold(false, |found, byte| {
        found | (byte < 0x20) | (byte == b'"') | (byte == b'\\')
    });
    if !needs_escape {
        out.put_u8(b'"');
        out.put_slice(text.as_bytes());
        out.put_u8(b'"');
        return;
    }
    let mut writer = out.writer();
    serde_json::to_writer(&mut writer, text).expect("writing a string to memory cannot fail");
}

/// Writes a request `{"pattern":P,"data":D,"id":ID}` (with `id`) or an event
/// `{"pattern":P,"data":D}` (without), followed by palisade's `"headers"` extension when there are
/// headers (NestJS ignores it). Transports with headers of their own (Kafka, AMQP) pass empty
/// headers and carry them natively; NATS passes only the deadline's.
///
/// ```
/// use palisade::rpc::wire::encode_request;
/// use palisade::rpc::{Headers, RawJson};
///
/// let mut frame = Vec::new();
/// let pattern = RawJson::from_text(r#""get-user""#).unwrap();
/// let data = RawJson::from_text(r#"{"id":"42"}"#).unwrap();
/// encode_request(&mut frame, &pattern, &data, Some("ae27e2a42bb78600f9957"), &Headers::new());
/// assert_eq!(frame, br#"{"pattern":"get-user","data":{"id":"42"},"id":"ae27e2a42bb78600f9957"}"#);
/// ```
pub fn encode_request<B: BufMut>(
    out: &mut B,
    pattern: &RawJson,
    data: &RawJson,
    id: Option<&str>,
    headers: &Headers,
) {
    encode_request_within(out, pattern, data, id, headers, None);
}

/// [`encode_request`] with the deadline's [`TIMEOUT_HEADER`] (`timeout_ms`, when there is one)
/// among the headers, written as [`RpcRequest::wire_headers`] would add it but without copying
/// the headers.
///
/// ```
/// use palisade::rpc::wire::encode_request_within;
/// use palisade::rpc::{Headers, RawJson};
///
/// let mut frame = Vec::new();
/// let pattern = RawJson::from_text(r#""get-user""#).unwrap();
/// let data = RawJson::from_text("42").unwrap();
/// encode_request_within(&mut frame, &pattern, &data, Some("7"), &Headers::new(), Some(4999));
/// assert_eq!(
///     frame,
///     br#"{"pattern":"get-user","data":42,"id":"7","headers":{"palisade-timeout-ms":"4999"}}"#
/// );
/// ```
pub fn encode_request_within<B: BufMut>(
    out: &mut B,
    pattern: &RawJson,
    data: &RawJson,
    id: Option<&str>,
    headers: &Headers,
    timeout_ms: Option<u64>,
) {
    out.put_slice(b"{\"pattern\":");
    out.put_slice(pattern.as_bytes());
    out.put_slice(b",\"data\":");
    out.put_slice(data.as_bytes());
    if let Some(id) = id {
        out.put_slice(b",\"id\":");
        put_string(out, id);
    }
    put_headers(out, headers, timeout_ms);
    out.put_u8(b'}');
}

/// The pattern a NestJS client puts in a request's body: the raw pattern for requests, the route
/// string for events (nestjs-wire.md §1.5, as NestJS's TCP client does).
pub fn wire_pattern(request: &RpcRequest) -> RawJson {
    match request.kind() {
        Kind::Request => request.pattern().raw().clone(),
        Kind::Event => RawJson::to_json(request.pattern().route()).expect("a string serialises"),
    }
}

/// Writes a reply packet: `{"response":R,"isDisposed":true,"id":ID}` and its siblings
/// (nestjs-wire.md §1.1). The id is echoed verbatim (raw JSON); `None` leaves it out, as NestJS's
/// RabbitMQ server does, except in the no-handler reply.
///
/// ```
/// use palisade::rpc::transport::ReplyPacket;
/// use palisade::rpc::wire::encode_reply;
/// use palisade::rpc::RawJson;
///
/// let id = RawJson::from_text(r#""ae27e2a42bb78600f9957""#).unwrap();
/// let mut frame = Vec::new();
/// let value = ReplyPacket::Value { response: RawJson::from_text("11").unwrap(), last: true };
/// encode_reply(&mut frame, &value, Some(&id));
/// assert_eq!(frame, br#"{"response":11,"isDisposed":true,"id":"ae27e2a42bb78600f9957"}"#);
/// ```
pub fn encode_reply<B: BufMut>(out: &mut B, packet: &ReplyPacket, id: Option<&RawJson>) {
    match packet {
        ReplyPacket::Value { response, last } => {
            out.put_slice(b"{\"response\":");
            out.put_slice(response.as_bytes());
            if *last {
                out.put_slice(b",\"isDisposed\":true");
            }
        }
        ReplyPacket::Complete => out.put_slice(b"{\"isDisposed\":true"),
        ReplyPacket::Error(err) => {
            out.put_slice(b"{\"err\":");
            out.put_slice(err.as_bytes());
            out.put_slice(b",\"isDisposed\":true");
        }
        ReplyPacket::Failed(error) => {
            out.put_slice(b"{\"err\":");
            out.put_slice(crate::rpc::transport::error_json(error).as_bytes());
            out.put_slice(b",\"isDisposed\":true");
        }
        ReplyPacket::NoHandler => {
            out.put_slice(b"{\"id\":");
            out.put_slice(id.map_or(b"null".as_slice(), RawJson::as_bytes));
            out.put_slice(b",\"status\":\"error\",\"err\":");
            put_string(out, NO_HANDLER_MESSAGE);
            out.put_u8(b'}');
            return;
        }
    }
    if let Some(id) = id {
        out.put_slice(b",\"id\":");
        out.put_slice(id.as_bytes());
    }
    out.put_u8(b'}');
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;

        impl Visitor<'_> for KeyVisitor {
            type Value = Key;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a key")
            }

            // Read without allocating: escaped or not, a key is only compared.
            fn visit_str<E: serde::de::Error>(self, key: &str) -> Result<Key, E> {
                Ok(match key {
                    "pattern" => Key::Pattern,
                    "data" => Key::Data,
                    "id" => Key::Id,
                    "response" => Key::Response,
                    "err" => Key::Err,
                    "isDisposed" => Key::IsDisposed,
                    "headers" => Key::Headers,
                    _ => Key::Other,
                })
            }
        }

        deserializer.deserialize_identifier(KeyVisitor)
    }
}

/// A packet's fields as `serde_json` reads them, for what the fast reader leaves to it: values
/// stay raw (borrowed from the frame); `Some` means present — even `null` (JavaScript's
/// `undefined` and `null` differ here: a `null` id still makes a request), `None` absent. A key
/// that appears twice keeps its last value, as `JSON.parse` does.
impl<'de: 'a, 'a> Deserialize<'de> for Fields<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct PacketVisitor<'a>(std::marker::PhantomData<&'a ()>);

        impl<'de: 'a, 'a> Visitor<'de> for PacketVisitor<'a> {
            type Value = Fields<'a>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Fields<'a>, M::Error> {
                let mut fields = Fields::default();
                while let Some(key) = map.next_key::<Key>()? {
                    match fields.slot(key) {
                        Some(slot) => {
                            *slot = Some(map.next_value::<&'de RawValue>()?.get().as_bytes());
                        }
                        None => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(fields)
            }
        }

        deserializer.deserialize_map(PacketVisitor(std::marker::PhantomData))
    }
}

/// Reads a packet's fields: with the fast reader when it answers, else with `serde_json`, which
/// reads the same fields or says why the frame is not JSON. `serde_json` is given the frame as
/// text when it is UTF-8: read from bytes, every raw field would be checked again on its own.
fn parse_packet(frame: &[u8]) -> Result<Fields<'_>, serde_json::Error> {
    if let Some(fields) = scan::packet(frame, TIMEOUT_HEADER) {
        return Ok(fields);
    }
    match std::str::from_utf8(frame) {
        Ok(text) => serde_json::from_str::<Fields<'_>>(text),
        // The parser's own error; or, when the bad bytes sit in a field it skips, the packet as
        // it reads it.
        Err(_) => serde_json::from_slice::<Fields<'_>>(frame),
    }
}

/// The fields as `serde_json` alone reads them, for the fast reader's tests.
#[cfg(test)]
pub(super) fn fields_by_serde(text: &str) -> Result<Fields<'_>, serde_json::Error> {
    serde_json::from_str::<Fields<'_>>(text)
}

/// The deadline of a `headers` value as `serde_json` alone reads it, when it holds no other
/// header; for the fast reader's tests.
#[cfg(test)]
pub(super) fn deadline_by_serde(raw: &str) -> Option<Option<u64>> {
    let wire = serde_json::from_str::<WireHeaders>(raw).unwrap_or_default();
    wire.headers.is_empty().then_some(wire.timeout_ms)
}

/// JavaScript truthiness of a JSON value.
fn is_truthy(raw: &str) -> bool {
    match raw.trim() {
        "null" | "false" | "\"\"" => false,
        text if text.starts_with(|c: char| c == '-' || c.is_ascii_digit()) => {
            text.parse::<f64>().map(|n| n != 0.0).unwrap_or(true)
        }
        _ => true,
    }
}

/// A slice of `frame` as raw JSON, without copying.
fn slice(frame: &Bytes, raw: &[u8]) -> RawJson {
    RawJson::from_trusted(frame.slice_ref(raw))
}

/// palisade's `"headers"` object: string values as they are, numbers as their JSON text, other
/// values dropped; a key given twice (in any case) keeps its last value, and a later value of
/// another kind drops it. Anything but an object is no headers. [`TIMEOUT_HEADER`] is read on
/// its own, into milliseconds, and not kept among the headers (the request's deadline replaces it).
fn parse_headers(raw: Option<&[u8]>, deadline_only: Option<Option<u64>>) -> WireHeaders {
    // Most packets carry the deadline alone, or nothing: the fast reader read those already.
    if let Some(timeout_ms) = deadline_only {
        return WireHeaders {
            headers: Headers::new(),
            timeout_ms,
        };
    }
    raw.and_then(|raw| serde_json::from_slice::<WireHeaders>(raw).ok())
        .unwrap_or_default()
}

/// [`Headers`] read straight from the packet, without building a JSON map first, and the
/// deadline's header apart from them.
#[derive(Default)]
struct WireHeaders {
    headers: Headers,
    timeout_ms: Option<u64>,
}

impl<'de> Deserialize<'de> for WireHeaders {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct HeadersVisitor;

        impl<'de> Visitor<'de> for HeadersVisitor {
            type Value = WireHeaders;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<WireHeaders, M::Error> {
                let mut wire = WireHeaders::default();
                // Each header sets its key, or drops it (a value that is not a string), in turn;
                // the last occurrence wins. Past a few, they are gathered, to be applied in
                // linear time.
                let mut more = Vec::new();
                while let Some(key) = map.next_key::<HeaderKey>()? {
                    match key {
                        // As any header: the last occurrence wins, a value that is not a number
                        // of milliseconds drops it.
                        HeaderKey::Timeout => wire.timeout_ms = map.next_value::<Millis>()?.0,
                        HeaderKey::Other(key) => {
                            let value = map.next_value::<HeaderValue>()?.0;
                            if more.is_empty() && wire.headers.len() < LINEAR_HEADERS {
                                wire.headers.apply([(key.into(), value)]);
                            } else {
                                more.push((key.into(), value));
                            }
                        }
                    }
                }
                wire.headers.apply(more);
                Ok(wire)
            }
        }

        deserializer.deserialize_map(HeadersVisitor)
    }
}

/// A header's name: the deadline's, or another (kept).
enum HeaderKey {
    Timeout,
    Other(String),
}

impl<'de> Deserialize<'de> for HeaderKey {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;

        impl Visitor<'_> for KeyVisitor {
            type Value = HeaderKey;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a header name")
            }

            fn visit_str<E: serde::de::Error>(self, key: &str) -> Result<HeaderKey, E> {
                Ok(if key.eq_ignore_ascii_case(TIMEOUT_HEADER) {
                    HeaderKey::Timeout
                } else {
                    HeaderKey::Other(key.to_owned())
                })
            }
        }

        deserializer.deserialize_identifier(KeyVisitor)
    }
}

/// [`TIMEOUT_HEADER`]'s value: milliseconds as a string (what palisade sends) or a number;
/// `None` for anything else, as [`RpcRequest::received`] reads the header.
struct Millis(Option<u64>);

impl<'de> Deserialize<'de> for Millis {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct MillisVisitor;

        // Each arm reads what `HeaderValue` would make of the value, then parses that text as
        // `u64`, without making the text: a float's text (`5.0`, `1e300`) never parses.
        impl<'de> Visitor<'de> for MillisVisitor {
            type Value = Millis;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON value")
            }

            fn visit_str<E: serde::de::Error>(self, value: &str) -> Result<Millis, E> {
                Ok(Millis(value.trim().parse().ok()))
            }

            fn visit_u64<E: serde::de::Error>(self, value: u64) -> Result<Millis, E> {
                Ok(Millis(Some(value)))
            }

            fn visit_i64<E: serde::de::Error>(self, value: i64) -> Result<Millis, E> {
                Ok(Millis(u64::try_from(value).ok()))
            }

            fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<Millis, E> {
                Ok(Millis(None))
            }

            fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<Millis, E> {
                Ok(Millis(None))
            }

            fn visit_unit<E: serde::de::Error>(self) -> Result<Millis, E> {
                Ok(Millis(None))
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Millis, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Millis(None))
            }

            fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Millis, M::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Millis(None))
            }
        }

        deserializer.deserialize_any(MillisVisitor)
    }
}

/// A header's value: a string, or a number's JSON text; `None` for any other value.
struct HeaderValue(Option<String>);

impl<'de> Deserialize<'de> for HeaderValue {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ValueVisitor;

        impl<'de> Visitor<'de> for ValueVisitor {
            type Value = HeaderValue;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON value")
            }

            fn visit_str<E: serde::de::Error>(self, value: &str) -> Result<HeaderValue, E> {
                Ok(HeaderValue(Some(value.to_owned())))
            }

            fn visit_u64<E: serde::de::Error>(self, value: u64) -> Result<HeaderValue, E> {
                Ok(HeaderValue(Some(value.to_string())))
            }

            fn visit_i64<E: serde::de::Error>(self, value: i64) -> Result<HeaderValue, E> {
                Ok(HeaderValue(Some(value.to_string())))
            }

            fn visit_f64<E: serde::de::Error>(self, value: f64) -> Result<HeaderValue, E> {
                // As `serde_json::Number` writes it (`1.0`, `1e300`).
                Ok(HeaderValue(
                    serde_json::Number::from_f64(value).map(|n| n.to_string()),
                ))
            }

            fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<HeaderValue, E> {
                Ok(HeaderValue(None))
            }

            fn visit_unit<E: serde::de::Error>(self) -> Result<HeaderValue, E> {
                Ok(HeaderValue(None))
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<HeaderValue, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(HeaderValue(None))
            }

            fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<HeaderValue, M::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(HeaderValue(None))
            }
        }

        deserializer.deserialize_any(ValueVisitor)
    }
}

/// A message as a server reads it; see [`decode_incoming`].
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct IncomingPacket {
    /// The raw pattern; `None` when the packet has none (it then matches no handler).
    pub pattern: Option<RawJson>,
    /// The payload (`null` when absent).
    pub data: RawJson,
    /// Present (even `null`) makes the message a request; absent, an event.
    pub id: Option<RawJson>,
    /// palisade's `"headers"` extension.
    pub headers: Headers,
    /// The milliseconds left to the caller's deadline, when the packet's headers gave them
    /// ([`TIMEOUT_HEADER`]) and the codec read them apart from `headers` (the JSON codec does).
    /// [`into_request`](Self::into_request) and [`into_request_on`](Self::into_request_on) make
    /// them the request's deadline; a request built from the parts takes them with
    /// [`RpcRequest::with_timeout_ms`].
    pub timeout_ms: Option<u64>,
    /// Not a NestJS packet (not an object, or neither `pattern` nor `data`): transports with a
    /// channel treat the whole message as `data` sent to the channel's pattern.
    pub external: bool,
}

impl IncomingPacket {
    /// The message as a server dispatches it when routing by the packet's `pattern` (TCP,
    /// RabbitMQ), and the id to reply with (`None` for an event).
    pub fn into_request(self) -> (RpcRequest, Option<RawJson>) {
        let kind = if self.id.is_some() {
            Kind::Request
        } else {
            Kind::Event
        };
        let pattern = Pattern::received(self.pattern.unwrap_or_else(RawJson::null));
        let request = RpcRequest::received(pattern, self.data, kind, self.headers)
            .with_timeout_ms(self.timeout_ms);
        (request, self.id)
    }

    /// The message as a server dispatches it when routing by the channel it arrived on (NATS
    /// subjects, Redis channels, MQTT topics): `route` is the channel's route string, `message` the
    /// whole message body, which becomes the data of an external message (NestJS treats a body
    /// that is not its packet as the data of an event on the channel). `headers` are the
    /// transport's native headers, added to the packet's own.
    pub fn into_request_on(
        self,
        route: &Arc<str>,
        message: &Bytes,
        headers: Headers,
    ) -> (RpcRequest, Option<RawJson>) {
        let route_json = || RawJson::to_json(&**route).expect("a string serialises");
        let (raw, data, id) = if self.external {
            (route_json(), RawJson::from_trusted(message.clone()), None)
        } else {
            (self.pattern.unwrap_or_else(route_json), self.data, self.id)
        };
        let kind = if id.is_some() {
            Kind::Request
        } else {
            Kind::Event
        };
        // The transport's headers win over any the body carries; most bodies carry none.
        let all = if self.headers.is_empty() {
            headers
        } else {
            let mut all = self.headers;
            all.extend(
                headers
                    .iter()
                    .map(|(key, value)| (key.to_owned(), value.to_owned())),
            );
            all
        };
        // A deadline among the transport's headers wins too.
        let request = RpcRequest::received(
            Pattern::received_on(Arc::clone(route), raw),
            data,
            kind,
            all,
        )
        .with_timeout_ms(self.timeout_ms);
        (request, id)
    }
}

/// Reads a message from a frame holding JSON. Like a NestJS server: a value that is not an object,
/// or has neither `pattern` nor `data`, is an "external" message with no pattern.
///
/// Fails when the frame is not valid JSON.
pub fn decode_incoming(frame: &Bytes) -> Result<IncomingPacket, serde_json::Error> {
    // JSON's whitespace is these four bytes; the first other byte says whether it is an object
    // (the parser checks the rest, so the frame is not validated as UTF-8 twice).
    let first = frame
        .iter()
        .find(|byte| !matches!(byte, b' ' | b'\t' | b'\n' | b'\r'));
    if first != Some(&b'{') {
        // null, a number, an array...: valid JSON (checked here), external.
        serde_json::from_slice::<IgnoredAny>(frame)?;
        return Ok(IncomingPacket {
            pattern: None,
            data: RawJson::null(),
            id: None,
            headers: Headers::new(),
            timeout_ms: None,
            external: true,
        });
    }
    let packet = parse_packet(frame)?;
    // NestJS: "external" when both are undefined (a present null does not count as undefined).
    let external = packet.pattern.is_none() && packet.data.is_none();
    let WireHeaders {
        headers,
        timeout_ms,
    } = parse_headers(packet.headers, packet.deadline);
    Ok(IncomingPacket {
        pattern: packet.pattern.map(|raw| slice(frame, raw)),
        data: packet
            .data
            .map_or_else(RawJson::null, |raw| slice(frame, raw)),
        id: if external {
            None
        } else {
            packet.id.map(|raw| slice(frame, raw))
        },
        headers,
        timeout_ms,
        external,
    })
}

/// Reads a reply the way NestJS's `ClientProxy` does (nestjs-wire.md §1.2): the id (as raw JSON,
/// `None` when absent) and the packet.
///
/// ```
/// use bytes::Bytes;
/// use palisade::rpc::transport::ReplyPacket;
/// use palisade::rpc::wire::decode_reply;
///
/// let (id, packet) = decode_reply(&Bytes::from_static(br#"{"response":1,"id":"a"}"#)).unwrap();
/// assert_eq!(id.unwrap().as_str(), r#""a""#);
/// assert!(matches!(packet, ReplyPacket::Value { last: false, .. }));
/// ```
pub fn decode_reply(frame: &Bytes) -> Result<(Option<RawJson>, ReplyPacket), serde_json::Error> {
    let packet = parse_packet(frame)?;
    let id = packet.id.map(|raw| slice(frame, raw));
    let reply = reply_from_fields(
        packet.response,
        packet.err,
        packet.is_disposed,
        |raw| slice(frame, raw),
        || RawJson::from_trusted(frame.clone()),
    );
    Ok((id, reply))
}

/// A field of a packet as read by a codec: its value as JSON text.
pub(super) trait Field {
    /// The JSON text.
    fn text(&self) -> &str;
}

impl Field for &[u8] {
    fn text(&self) -> &str {
        // A field of a frame read as JSON, which is UTF-8.
        debug_assert!(
            std::str::from_utf8(self).is_ok(),
            "a field that is not UTF-8"
        );
        std::str::from_utf8(self).unwrap_or("null")
    }
}

impl Field for RawJson {
    fn text(&self) -> &str {
        self.as_str()
    }
}

/// NestJS's `ClientProxy` rules for a reply's fields (nestjs-wire.md §1.2), whatever the codec:
/// a truthy `err` is an error (or the no-handler reply), a packet with none of the fields is
/// itself the one value (`whole`), a truthy `isDisposed` ends the stream.
pub(super) fn reply_from_fields<T: Field>(
    response: Option<T>,
    err: Option<T>,
    is_disposed: Option<T>,
    to_raw: impl Fn(T) -> RawJson,
    whole: impl FnOnce() -> RawJson,
) -> ReplyPacket {
    let err_present = err.is_some();
    if let Some(err) = err.filter(|err| is_truthy(err.text())) {
        return match serde_json::from_str::<String>(err.text()) {
            Ok(text) if text == NO_HANDLER_MESSAGE => ReplyPacket::NoHandler,
            _ => ReplyPacket::Error(to_raw(err)),
        };
    }
    if response.is_none() && !err_present && is_disposed.is_none() {
        // Neither a value nor a terminal marker: NestJS takes the whole thing as the one value.
        return ReplyPacket::Value {
            response: whole(),
            last: true,
        };
    }
    if is_disposed.is_some_and(|mark| is_truthy(mark.text())) {
        return match response {
            Some(response) => ReplyPacket::Value {
                response: to_raw(response),
                last: true,
            },
            None => ReplyPacket::Complete,
        };
    }
    ReplyPacket::Value {
        response: response.map_or_else(RawJson::null, to_raw),
        last: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::timeout::HasDeadline;
    use bytes::BytesMut;
    use std::time::Duration;

    fn raw(text: &str) -> RawJson {
        RawJson::from_text(text.to_owned()).unwrap()
    }

    #[test]
    fn the_quoted_timeout_key_is_the_timeout_header_as_serde_json_writes_a_key() {
        let key = format!("{}:", serde_json::to_string(TIMEOUT_HEADER).unwrap());
        assert_eq!(QUOTED_TIMEOUT_KEY, key.as_bytes());
    }

    fn encoded(f: impl FnOnce(&mut BytesMut)) -> String {
        let mut out = BytesMut::new();
        f(&mut out);
        String::from_utf8(out.to_vec()).unwrap()
    }

    #[test]
    fn encodes_nests_packets_byte_for_byte() {
        let id = raw(r#""ae27e2a42bb78600f9957""#);
        assert_eq!(
            encoded(|out| encode_request(
                out,
                &raw(r#""get-user""#),
                &raw(r#"{"id":"42"}"#),
                Some("ae27e2a42bb78600f9957"),
                &Headers::new()
            )),
            r#"{"pattern":"get-user","data":{"id":"42"},"id":"ae27e2a42bb78600f9957"}"#
        );
        assert_eq!(
            encoded(|out| encode_request(
                out,
                &raw(r#""user-created""#),
                &raw(r#"{"id":"ev-hsklovpf-1","name":"Ann"}"#),
                None,
                &Headers::new()
            )),
            r#"{"pattern":"user-created","data":{"id":"ev-hsklovpf-1","name":"Ann"}}"#
        );
        assert_eq!(
            encoded(|out| encode_reply(
                out,
                &ReplyPacket::Value {
                    response: raw("11"),
                    last: true
                },
                Some(&id)
            )),
            r#"{"response":11,"isDisposed":true,"id":"ae27e2a42bb78600f9957"}"#
        );
        assert_eq!(
            encoded(|out| encode_reply(
                out,
                &ReplyPacket::Value {
                    response: raw("1"),
                    last: false
                },
                Some(&id)
            )),
            r#"{"response":1,"id":"ae27e2a42bb78600f9957"}"#
        );
        assert_eq!(
            encoded(|out| encode_reply(out, &ReplyPacket::Complete, Some(&id))),
            r#"{"isDisposed":true,"id":"ae27e2a42bb78600f9957"}"#
        );
        assert_eq!(
            encoded(|out| encode_reply(
                out,
                &ReplyPacket::Error(raw(r#"{"status":"error","message":"boom"}"#)),
                Some(&id)
            )),
            r#"{"err":{"status":"error","message":"boom"},"isDisposed":true,"id":"ae27e2a42bb78600f9957"}"#
        );
        assert_eq!(
            encoded(|out| encode_reply(out, &ReplyPacket::NoHandler, Some(&id))),
            r#"{"id":"ae27e2a42bb78600f9957","status":"error","err":"There is no matching message handler defined in the remote service."}"#
        );
    }

    #[test]
    fn decodes_replies_like_nests_client() {
        let decode = |text: &str| decode_reply(&Bytes::from(text.to_owned())).unwrap().1;
        assert_eq!(
            decode(r#"{"response":1,"id":"a"}"#),
            ReplyPacket::Value {
                response: raw("1"),
                last: false
            }
        );
        assert_eq!(
            decode(r#"{"response":null,"id":"a"}"#),
            ReplyPacket::Value {
                response: raw("null"),
                last: false
            }
        );
        assert_eq!(
            decode(r#"{"isDisposed":true,"id":"a"}"#),
            ReplyPacket::Complete
        );
        assert_eq!(
            decode(r#"{"err":"","isDisposed":true,"id":"a"}"#),
            ReplyPacket::Complete,
            "falsy err is ignored"
        );
        assert_eq!(
            decode(r#"{"err":0,"response":5,"id":"a"}"#),
            ReplyPacket::Value {
                response: raw("5"),
                last: false
            }
        );
        assert_eq!(
            decode(r#"{"err":{"a":1},"id":"a"}"#),
            ReplyPacket::Error(raw(r#"{"a":1}"#))
        );
        assert_eq!(
            decode(
                r#"{"id":"a","status":"error","err":"There is no matching message handler defined in the remote service."}"#
            ),
            ReplyPacket::NoHandler
        );
        assert_eq!(
            decode(r#"{"id":"a","other":1}"#),
            ReplyPacket::Value {
                response: raw(r#"{"id":"a","other":1}"#),
                last: true
            }
        );
    }

    #[test]
    fn truthiness_headers_and_error_strings_follow_javascript() {
        let truthy = |text: &str| is_truthy(serde_json::from_str::<&RawValue>(text).unwrap().get());
        for falsy in ["null", "false", "\"\"", "0", "-0", "0.0"] {
            assert!(!truthy(falsy), "{falsy}");
        }
        for true_ in ["true", "1", "-1", "\"0\"", "{}", "[]", "\"x\""] {
            assert!(truthy(true_), "{true_}");
        }
        // Header values that are numbers arrive as their text; others are dropped.
        let request = decode_incoming(&Bytes::from_static(
            br#"{"pattern":"p","data":1,"id":"i","headers":{"palisade-timeout-ms":250,"x":"y","o":{}}}"#,
        ))
        .unwrap();
        assert_eq!(request.timeout_ms, Some(250));
        assert_eq!(request.headers.get("palisade-timeout-ms"), None);
        assert_eq!(request.headers.get("x"), Some("y"));
        assert_eq!(request.headers.get("o"), None);
        // A string error is an error; only NestJS's exact no-handler text means "no handler".
        let (_, packet) = decode_reply(&Bytes::from_static(br#"{"err":"boom","id":"i"}"#)).unwrap();
        assert!(matches!(packet, ReplyPacket::Error(_)), "{packet:?}");
    }

    #[test]
    fn strings_are_written_as_serde_json_writes_them() {
        let mut texts: Vec<String> = [
            "",
            "ae27e2a42bb78600f9957",
            "palisade-timeout-ms",
            "say \"hi\"",
            "back\\slash",
            "tab\there",
            "two\t\tcontrols",
            "nul\u{0}",
            "unit\u{1f}sep",
            "del\u{7f}",
            "é€😀",
            "</script>",
        ]
        .map(str::to_owned)
        .into();
        texts.extend((0u8..=0x7f).map(|byte| format!("a{}b", byte as char)));
        for text in texts {
            let mut out = Vec::new();
            put_string(&mut out, &text);
            assert_eq!(
                String::from_utf8(out).unwrap(),
                serde_json::to_string(&text).unwrap(),
                "{text:?}"
            );
        }
    }

    #[test]
    fn a_reply_that_is_not_an_object_says_so() {
        // (An incoming message that is not a packet is an external message, not an error.)
        assert!(
            decode_incoming(&Bytes::from_static(b"[1,2]"))
                .unwrap()
                .external
        );
        let error = decode_reply(&Bytes::from_static(b"\"text\"")).unwrap_err();
        assert!(
            error.to_string().contains("expected a JSON object"),
            "{error}"
        );
    }

    #[test]
    fn the_deadline_header_is_written_as_inserting_it_into_the_headers_would() {
        let pattern = RawJson::from_text(r#""p""#).unwrap();
        let data = RawJson::from_text("1").unwrap();
        let header_sets: Vec<Vec<(&str, &str)>> = vec![
            vec![],
            vec![("x", "y")],
            vec![("a", "1"), ("say \"hi\"", "line\nbreak")],
            vec![("Palisade-Timeout-MS", "old"), ("b", "2")],
            vec![("b", "2"), ("palisade-timeout-ms", "old")],
        ];
        // Written out in full once, so that the comparison below cannot agree on nothing.
        let mut one = Vec::new();
        let mut x = Headers::new();
        x.insert("x", "y");
        encode_request_within(&mut one, &pattern, &data, None, &x, Some(4999));
        assert_eq!(
            String::from_utf8(one).unwrap(),
            r#"{"pattern":"p","data":1,"headers":{"x":"y","palisade-timeout-ms":"4999"}}"#
        );
        let mut alone = Vec::new();
        encode_request_within(&mut alone, &pattern, &data, None, &Headers::new(), Some(0));
        assert_eq!(
            String::from_utf8(alone).unwrap(),
            r#"{"pattern":"p","data":1,"headers":{"palisade-timeout-ms":"0"}}"#
        );
        for set in header_sets {
            let mut headers = Headers::new();
            for (key, value) in &set {
                headers.insert(key.to_string(), *value);
            }
            for millis in [None, Some(0), Some(7), Some(4999), Some(u64::MAX)] {
                let mut written = Vec::new();
                encode_request_within(&mut written, &pattern, &data, Some("i"), &headers, millis);
                let mut expected_headers = headers.clone();
                if let Some(millis) = millis {
                    expected_headers.insert(TIMEOUT_HEADER, millis.to_string());
                }
                let mut expected = Vec::new();
                encode_request(&mut expected, &pattern, &data, Some("i"), &expected_headers);
                assert_eq!(
                    String::from_utf8(written).unwrap(),
                    String::from_utf8(expected).unwrap(),
                    "{set:?} {millis:?}"
                );
            }
        }
    }

    #[test]
    fn the_deadline_header_is_read_as_any_header_would_be_then_parsed() {
        let millis = |headers: &str| {
            let frame = format!(r#"{{"pattern":"p","data":1,"id":"i","headers":{headers}}}"#);
            let packet = decode_incoming(&Bytes::from(frame)).unwrap();
            assert_eq!(packet.headers.get(TIMEOUT_HEADER), None, "{headers}");
            let read = packet.timeout_ms;
            // The request made from the packet has that deadline.
            let request = packet.into_request().0;
            (
                read,
                request.deadline().map(|deadline| deadline.remaining()),
            )
        };
        let cases: [(&str, Option<u64>); 14] = [
            (r#"{"palisade-timeout-ms":"250"}"#, Some(250)),
            (r#"{"palisade-timeout-ms":" 250 "}"#, Some(250)),
            (r#"{"Palisade-Timeout-MS":"250"}"#, Some(250)),
            (r#"{"palisade-timeout-ms":250}"#, Some(250)),
            (r#"{"palisade-timeout-ms":"250"}"#, Some(250)),
            (r#"{"palisade-timeout-ms":"250"}"#, Some(250)),
            // The last occurrence wins, and a value of another kind drops it.
            (
                r#"{"palisade-timeout-ms":"1","PALISADE-TIMEOUT-MS":"250"}"#,
                Some(250),
            ),
            (
                r#"{"palisade-timeout-ms":"250","palisade-timeout-ms":null}"#,
                None,
            ),
            (
                r#"{"palisade-timeout-ms":"250","palisade-timeout-ms":[1]}"#,
                None,
            ),
            (r#"{"palisade-timeout-ms":-5}"#, None),
            (r#"{"palisade-timeout-ms":2.5}"#, None),
            (r#"{"palisade-timeout-ms":1e3}"#, None),
            (r#"{"palisade-timeout-ms":"soon"}"#, None),
            (r#"{"palisade-timeout-ms":{"ms":250}}"#, None),
        ];
        for (headers, expected) in cases {
            let (read, remaining) = millis(headers);
            assert_eq!(read, expected, "{headers}");
            assert_eq!(remaining.is_some(), expected.is_some(), "{headers}");
            if let Some(remaining) = remaining {
                assert!(
                    remaining <= Duration::from_millis(250),
                    "{headers}: {remaining:?}"
                );
                assert!(
                    remaining > Duration::from_millis(200),
                    "{headers}: {remaining:?}"
                );
            }
        }
        // The other headers are kept as they were.
        let packet = decode_incoming(&Bytes::from_static(
            br#"{"data":1,"headers":{"a":"1","palisade-timeout-ms":"9","b":2}}"#,
        ))
        .unwrap();
        assert_eq!(packet.headers.get("a"), Some("1"));
        assert_eq!(packet.headers.get("b"), Some("2"));
        assert_eq!(packet.timeout_ms, Some(9));
    }

    #[test]
    fn decodes_requests_events_and_external_messages() {
        let decode = |text: &str| decode_incoming(&Bytes::from(text.to_owned())).unwrap();
        let request = decode(
            r#"{"pattern":{"cmd":"sum"},"data":[5,6],"id":"x","headers":{"palisade-timeout-ms":"250"}}"#,
        );
        assert_eq!(request.pattern, Some(raw(r#"{"cmd":"sum"}"#)));
        assert_eq!(request.data, raw("[5,6]"));
        assert_eq!(request.id, Some(raw(r#""x""#)));
        assert_eq!(request.timeout_ms, Some(250));
        assert!(request.headers.is_empty());
        let event = decode(r#"{"pattern":"user-created","data":{"id":1}}"#);
        assert!(event.id.is_none());
        let no_pattern = decode(r#"{"data":1,"id":"z"}"#);
        assert_eq!(
            (no_pattern.pattern, no_pattern.id),
            (None, Some(raw(r#""z""#)))
        );
        let null = decode("null");
        assert!(null.pattern.is_none() && null.id.is_none());
        let external = decode(r#"{"id":"q"}"#);
        assert!(
            external.id.is_none(),
            "neither pattern nor data: an external message"
        );
        // JSON whitespace before the object: still a packet.
        let spaced = decode(" \t\r\n{\"pattern\":\"p\",\"data\":2,\"id\":\"w\"}");
        assert!(!spaced.external);
        assert_eq!(
            (spaced.pattern, spaced.data),
            (Some(raw(r#""p""#)), raw("2"))
        );
        assert!(decode(" [1]").external);
        // A byte that is not UTF-8 in a field nobody reads does not turn the packet into an
        // external message (NestJS decodes it as U+FFFD and routes the packet).
        let stray = decode_incoming(&Bytes::from_static(
            b"{\"pattern\":\"p\",\"data\":3,\"id\":\"v\",\"junk\":\"\xff\"}",
        ))
        .unwrap();
        assert!(!stray.external);
        assert_eq!((stray.pattern, stray.data), (Some(raw(r#""p""#)), raw("3")));
        for bad in [&b""[..], b"   ", b"{", b"\xff"] {
            assert!(
                decode_incoming(&Bytes::from_static(bad)).is_err(),
                "{bad:?}"
            );
        }
    }

    fn headers_of(frame: &str) -> Vec<(String, String)> {
        let packet = decode_incoming(&Bytes::copy_from_slice(frame.as_bytes())).unwrap();
        packet
            .headers
            .iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect()
    }

    fn pairs(expected: &[(&str, &str)]) -> Vec<(String, String)> {
        expected
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn headers_keep_strings_and_numbers_in_wire_order_and_drop_other_values() {
        assert_eq!(
            headers_of(
                r#"{"pattern":"p","data":1,"headers":{"b":"x","a":-5,"f":1.5,"e":1e2,"big":18446744073709551615,"t":true,"n":null,"o":{"k":[1]},"l":[1,{"k":2}],"s":"\u00e9\n"}}"#
            ),
            pairs(&[
                ("b", "x"),
                ("a", "-5"),
                ("f", "1.5"),
                ("e", "100.0"),
                ("big", "18446744073709551615"),
                ("s", "é\n"),
            ])
        );
    }

    #[test]
    fn a_header_given_twice_keeps_its_last_value_whatever_its_case() {
        assert_eq!(
            headers_of(r#"{"pattern":"p","data":1,"headers":{"k":"1","x":"x","K":"2"}}"#),
            pairs(&[("k", "2"), ("x", "x")])
        );
        // A later value that is not a header value takes the earlier one away, as the object's
        // last value for the key is what JavaScript sees.
        assert_eq!(
            headers_of(r#"{"pattern":"p","data":1,"headers":{"k":"1","x":"x","k":false}}"#),
            pairs(&[("x", "x")])
        );
    }

    #[test]
    fn headers_that_are_not_an_object_are_no_headers() {
        for headers in ["null", "[]", r#"["a","b"]"#, "\"text\"", "7", "true"] {
            let frame = format!(r#"{{"pattern":"p","data":1,"headers":{headers}}}"#);
            assert!(headers_of(&frame).is_empty(), "{frame}");
        }
    }

    #[test]
    fn escaped_keys_are_read_as_the_keys_they_spell() {
        let frame =
            Bytes::from_static(br#"{"p\u0061ttern":"ping","d\u0061ta":3,"\u0069d":"i","x\"y":1}"#);
        let packet = decode_incoming(&frame).unwrap();
        assert_eq!(packet.pattern.unwrap().as_str(), r#""ping""#);
        assert_eq!(packet.data.as_str(), "3");
        assert_eq!(packet.id.unwrap().as_str(), r#""i""#);
        let (id, reply) =
            decode_reply(&Bytes::from_static(br#"{"\u0069d":"a","resp\u006fnse":2}"#)).unwrap();
        assert_eq!(id.unwrap().as_str(), r#""a""#);
        assert!(
            matches!(reply, ReplyPacket::Value { response, last: false } if response.as_str() == "2")
        );
    }

    #[test]
    fn invalid_utf8_fails_where_it_is_read_and_passes_where_it_is_skipped() {
        // In a field palisade reads: an error, as before the frame was checked up front.
        let mut bad_data = br#"{"pattern":"p","data":"#.to_vec();
        bad_data.extend_from_slice(b"\"\xff\"}");
        assert!(decode_incoming(&Bytes::from(bad_data)).is_err());
        let mut bad_response = br#"{"id":"a","response":"#.to_vec();
        bad_response.extend_from_slice(b"\"\xff\"}");
        assert!(decode_reply(&Bytes::from(bad_response)).is_err());
        // In a field it skips: the packet still reads, as JSON.parse in NestJS reads it.
        let mut skipped = br#"{"pattern":"p","data":1,"id":"i","extra":"#.to_vec();
        skipped.extend_from_slice(b"\"\xff\"}");
        let packet = decode_incoming(&Bytes::from(skipped)).unwrap();
        assert_eq!(packet.pattern.unwrap().as_str(), r#""p""#);
        assert_eq!(packet.data.as_str(), "1");
        let mut skipped_reply = br#"{"id":"a","response":5,"extra":"#.to_vec();
        skipped_reply.extend_from_slice(b"\"\xff\"}");
        let (id, reply) = decode_reply(&Bytes::from(skipped_reply)).unwrap();
        assert_eq!(id.unwrap().as_str(), r#""a""#);
        assert!(
            matches!(reply, ReplyPacket::Value { response, last: false } if response.as_str() == "5")
        );
    }
}

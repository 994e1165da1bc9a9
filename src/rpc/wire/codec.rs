//! The serialization seam of the envelope transports: how a request and its replies become a
//! message body and back. NestJS has serializers and deserializers for the same purpose.

use super::envelope::{
    IncomingPacket, decode_incoming, decode_reply, encode_reply, encode_request,
    encode_request_within,
};
use crate::rpc::transport::ReplyPacket;
use crate::rpc::{Headers, RawJson};
use bytes::Bytes;
use std::fmt;
use std::sync::Arc;

/// A codec failed to read a message body (or, rarely, to write one).
#[derive(Debug)]
pub struct CodecError {
    codec: &'static str,
    source: Box<dyn std::error::Error + Send + Sync>,
}

impl CodecError {
    /// A failure of the codec named `codec`.
    pub fn new(
        codec: &'static str,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        CodecError {
            codec,
            source: source.into(),
        }
    }

    /// The name of the codec that failed ([`Codec::name`]).
    pub fn codec(&self) -> &'static str {
        self.codec
    }
}

impl fmt::Display for CodecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "not a valid {} message: {}", self.codec, self.source)
    }
}

impl std::error::Error for CodecError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.source)
    }
}

/// How the envelope transports (NATS, Redis, MQTT, RabbitMQ) write a request and its replies into
/// a message body, and read them back: the packet's pattern, data, id and headers one way, its
/// response, error and end-of-stream mark the other.
///
/// The default, [`JsonCodec`], is NestJS's JSON packet, byte for byte: keep it wherever a NestJS
/// service is on the other end. [`MessagePackCodec`] (feature `msgpack`) is for palisade talking
/// to palisade. Both ends of a conversation must use the same codec. Payloads stay [`RawJson`] on
/// either side of the seam, so handlers and clients do not change with the codec.
///
/// Every transport that serializes takes one on its options: `TcpOptions::codec`,
/// `NatsOptions::codec`, `RmqOptions::codec`, `RedisOptions::codec`, `MqttOptions::codec` and
/// `KafkaOptions::codec`. On TCP a non-JSON codec's frames count their length in bytes
/// (NestJS's count UTF-16 units of JSON text); on Kafka only the record value (and an error
/// reply's header) changes, the envelope staying in record headers, through
/// [`encode_value`](Self::encode_value). A server that cannot read a request answers at once
/// with an error naming its codec on NATS, RabbitMQ and Kafka, and closes the connection after
/// saying so on TCP; on Redis and MQTT replies are matched by the id inside the body, so it
/// cannot, and the caller waits for its timeout.
///
/// ```
/// # #[cfg(feature = "nats")] {
/// use palisade::rpc::transport::nats::NatsOptions;
/// use palisade::rpc::wire::JsonCodec;
///
/// let options = NatsOptions::new(["nats://127.0.0.1:4222"]).codec(JsonCodec);
/// # let _ = options; }
/// ```
pub trait Codec: fmt::Debug + Send + Sync + 'static {
    /// The codec's name, for errors and logs (`"JSON"`, `"MessagePack"`).
    fn name(&self) -> &'static str;

    /// Writes a request (with `id`) or an event (without) into `out`.
    fn encode_request(
        &self,
        out: &mut Vec<u8>,
        pattern: &RawJson,
        data: &RawJson,
        id: Option<&str>,
        headers: &Headers,
    ) -> Result<(), CodecError>;

    /// Writes a request as [`encode_request`](Self::encode_request) does, with the deadline's
    /// [`TIMEOUT_HEADER`](crate::rpc::TIMEOUT_HEADER) (`timeout_ms`, when there is one) among
    /// the headers. The default writes a copy of the headers with it inserted; the JSON codec
    /// writes it without the copy.
    fn encode_request_within(
        &self,
        out: &mut Vec<u8>,
        pattern: &RawJson,
        data: &RawJson,
        id: Option<&str>,
        headers: &Headers,
        timeout_ms: Option<u64>,
    ) -> Result<(), CodecError> {
        match timeout_ms {
            None => self.encode_request(out, pattern, data, id, headers),
            Some(millis) => {
                let mut all = headers.clone();
                all.insert(crate::rpc::TIMEOUT_HEADER, millis.to_string());
                self.encode_request(out, pattern, data, id, &all)
            }
        }
    }

    /// Writes a reply packet into `out`, with the request's id (raw, as it came).
    fn encode_reply(
        &self,
        out: &mut Vec<u8>,
        packet: &ReplyPacket,
        id: Option<&RawJson>,
    ) -> Result<(), CodecError>;

    /// Reads a message as a server does.
    fn decode_incoming(&self, body: &Bytes) -> Result<IncomingPacket, CodecError>;

    /// Reads a reply as a client does: the id it answers, and the packet.
    fn decode_reply(&self, body: &Bytes) -> Result<(Option<RawJson>, ReplyPacket), CodecError>;

    /// Writes a payload alone, with no envelope: a Kafka record's value (and its error header),
    /// where NestJS sends the data itself and the envelope travels in record headers. The JSON
    /// text as it is, unless the codec says otherwise. (palisade's Kafka transport writes JSON
    /// values NestJS's way, strings unquoted; it calls this only for other codecs.)
    fn encode_value(&self, out: &mut Vec<u8>, value: &RawJson) -> Result<(), CodecError> {
        out.extend_from_slice(value.as_bytes());
        Ok(())
    }

    /// Reads a payload written by [`encode_value`](Self::encode_value).
    fn decode_value(&self, bytes: &[u8]) -> Result<RawJson, CodecError> {
        RawJson::from_text(bytes.to_vec()).map_err(|error| CodecError::new(self.name(), error))
    }
}

/// NestJS's JSON packets (the default): `{"pattern":..,"data":..,"id":..}` and
/// `{"response":..,"isDisposed":true,"id":..}`, byte for byte as NestJS writes them, read with
/// NestJS's rules. See [`encode_request`] and [`decode_reply`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct JsonCodec;

impl Codec for JsonCodec {
    fn name(&self) -> &'static str {
        "JSON"
    }

    #[inline]
    fn encode_request(
        &self,
        out: &mut Vec<u8>,
        pattern: &RawJson,
        data: &RawJson,
        id: Option<&str>,
        headers: &Headers,
    ) -> Result<(), CodecError> {
        encode_request(out, pattern, data, id, headers);
        Ok(())
    }

    #[inline]
    fn encode_request_within(
        &self,
        out: &mut Vec<u8>,
        pattern: &RawJson,
        data: &RawJson,
        id: Option<&str>,
        headers: &Headers,
        timeout_ms: Option<u64>,
    ) -> Result<(), CodecError> {
        encode_request_within(out, pattern, data, id, headers, timeout_ms);
        Ok(())
    }

    #[inline]
    fn encode_reply(
        &self,
        out: &mut Vec<u8>,
        packet: &ReplyPacket,
        id: Option<&RawJson>,
    ) -> Result<(), CodecError> {
        encode_reply(out, packet, id);
        Ok(())
    }

    #[inline]
    fn decode_incoming(&self, body: &Bytes) -> Result<IncomingPacket, CodecError> {
        decode_incoming(body).map_err(|error| CodecError::new("JSON", error))
    }

    #[inline]
    fn decode_reply(&self, body: &Bytes) -> Result<(Option<RawJson>, ReplyPacket), CodecError> {
        decode_reply(body).map_err(|error| CodecError::new("JSON", error))
    }
}

/// A transport's codec, shared by its clones: [`JsonCodec`] unless set.
#[derive(Clone)]
pub struct SharedCodec(Arc<dyn Codec>);

impl SharedCodec {
    /// Shares `codec`.
    pub fn new(codec: impl Codec) -> Self {
        SharedCodec(Arc::new(codec))
    }

    /// Whether this is NestJS's JSON (the only codec a NestJS peer reads).
    pub fn is_json(&self) -> bool {
        self.0.name() == JsonCodec.name()
    }

    /// Encodes a request into an exact-size body.
    pub fn request_body(
        &self,
        pattern: &RawJson,
        data: &RawJson,
        id: Option<&str>,
        headers: &Headers,
    ) -> Result<Bytes, CodecError> {
        crate::rpc::json::encode_exact(|out| self.0.encode_request(out, pattern, data, id, headers))
    }

    /// Encodes a request with the deadline's header into an exact-size body
    /// ([`Codec::encode_request_within`]).
    pub fn request_body_within(
        &self,
        pattern: &RawJson,
        data: &RawJson,
        id: Option<&str>,
        headers: &Headers,
        timeout_ms: Option<u64>,
    ) -> Result<Bytes, CodecError> {
        crate::rpc::json::encode_exact(|out| {
            self.0
                .encode_request_within(out, pattern, data, id, headers, timeout_ms)
        })
    }

    /// Encodes a payload alone ([`Codec::encode_value`]).
    pub fn value_body(&self, value: &RawJson) -> Result<Vec<u8>, CodecError> {
        let mut out = Vec::with_capacity(value.as_bytes().len());
        self.0.encode_value(&mut out, value)?;
        Ok(out)
    }

    /// Encodes a reply into an exact-size body.
    pub fn reply_body(
        &self,
        packet: &ReplyPacket,
        id: Option<&RawJson>,
    ) -> Result<Bytes, CodecError> {
        crate::rpc::json::encode_exact(|out| self.0.encode_reply(out, packet, id))
    }
}

impl Default for SharedCodec {
    fn default() -> Self {
        SharedCodec::new(JsonCodec)
    }
}

impl std::ops::Deref for SharedCodec {
    type Target = dyn Codec;

    fn deref(&self) -> &dyn Codec {
        &*self.0
    }
}

impl fmt::Debug for SharedCodec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.name())
    }
}

#[cfg(feature = "msgpack")]
pub use self::msgpack::MessagePackCodec;

#[cfg(feature = "msgpack")]
mod msgpack {
    use super::super::envelope::reply_from_fields;
    use super::*;
    use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};

    const NAME: &str = "MessagePack";

    /// MessagePack packets, for palisade talking to palisade (feature `msgpack`): the same fields
    /// as NestJS's JSON packets (`pattern`, `data`, `id`, `headers`; `response`, `err`,
    /// `isDisposed`) in a MessagePack map, with the payload itself in MessagePack (numbers and
    /// booleans as binary, not text), so any MessagePack reader can read a message.
    ///
    /// A NestJS service reads only JSON: use this only where both ends are palisade with this
    /// codec. It saves bytes on the wire — a quarter of a page of 100 records, 8 154 bytes
    /// against 11 061 — and costs time: payloads stay JSON inside palisade (handlers decode JSON),
    /// so the codec translates each body, 2.3× JSON's codec time for a small message and 6.5× for
    /// the page; over NATS with 64 requests in flight, a small round trip took 6% longer
    /// (`cargo bench -p palisade-benches --bench codec`).
    ///
    /// ```
    /// use bytes::Bytes;
    /// use palisade::rpc::transport::ReplyPacket;
    /// use palisade::rpc::wire::{Codec, MessagePackCodec};
    /// use palisade::rpc::{Headers, RawJson};
    ///
    /// let codec = MessagePackCodec;
    /// let mut body = Vec::new();
    /// let pattern = RawJson::to_json("sum").unwrap();
    /// let data = RawJson::to_json(&[1, 2, 3]).unwrap();
    /// codec.encode_request(&mut body, &pattern, &data, Some("7"), &Headers::new()).unwrap();
    /// // A map of 3: "pattern" → "sum", "data" → [1, 2, 3], "id" → "7".
    /// assert_eq!(body[0], 0x83);
    ///
    /// let packet = codec.decode_incoming(&Bytes::from(body)).unwrap();
    /// assert_eq!(packet.data.as_str(), "[1,2,3]");
    /// assert_eq!(packet.id.unwrap().as_str(), r#""7""#);
    /// ```
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct MessagePackCodec;

    fn failed(error: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> CodecError {
        CodecError::new(NAME, error)
    }

    /// Writes a JSON value as MessagePack.
    fn put_value(out: &mut Vec<u8>, json: &RawJson) -> Result<(), CodecError> {
        let mut from = serde_json::Deserializer::from_slice(json.as_bytes());
        let mut to = rmp_serde::Serializer::new(&mut *out);
        serde_transcode::transcode(&mut from, &mut to).map_err(failed)
    }

    fn put_str(out: &mut Vec<u8>, text: &str) -> Result<(), CodecError> {
        rmp::encode::write_str(out, text).map_err(failed)
    }

    fn put_key_true(out: &mut Vec<u8>, key: &str) -> Result<(), CodecError> {
        put_str(out, key)?;
        rmp::encode::write_bool(out, true).map_err(failed)
    }

    fn map_len(out: &mut Vec<u8>, len: u32) -> Result<(), CodecError> {
        rmp::encode::write_map_len(out, len)
            .map(drop)
            .map_err(failed)
    }

    impl Codec for MessagePackCodec {
        fn name(&self) -> &'static str {
            NAME
        }

        fn encode_request(
            &self,
            out: &mut Vec<u8>,
            pattern: &RawJson,
            data: &RawJson,
            id: Option<&str>,
            headers: &Headers,
        ) -> Result<(), CodecError> {
            let fields = 2 + u32::from(id.is_some()) + u32::from(!headers.is_empty());
            map_len(out, fields)?;
            put_str(out, "pattern")?;
            put_value(out, pattern)?;
            put_str(out, "data")?;
            put_value(out, data)?;
            if let Some(id) = id {
                put_str(out, "id")?;
                put_str(out, id)?;
            }
            if !headers.is_empty() {
                put_str(out, "headers")?;
                let len = u32::try_from(headers.len()).map_err(failed)?;
                map_len(out, len)?;
                for (key, value) in headers.iter() {
                    put_str(out, key)?;
                    put_str(out, value)?;
                }
            }
            Ok(())
        }

        fn encode_reply(
            &self,
            out: &mut Vec<u8>,
            packet: &ReplyPacket,
            id: Option<&RawJson>,
        ) -> Result<(), CodecError> {
            let with_id = u32::from(id.is_some());
            match packet {
                ReplyPacket::Value { response, last } => {
                    map_len(out, 1 + u32::from(*last) + with_id)?;
                    put_str(out, "response")?;
                    put_value(out, response)?;
                    if *last {
                        put_key_true(out, "isDisposed")?;
                    }
                }
                ReplyPacket::Complete => {
                    map_len(out, 1 + with_id)?;
                    put_key_true(out, "isDisposed")?;
                }
                ReplyPacket::Error(err) => {
                    map_len(out, 2 + with_id)?;
                    put_str(out, "err")?;
                    put_value(out, err)?;
                    put_key_true(out, "isDisposed")?;
                }
                ReplyPacket::Failed(error) => {
                    map_len(out, 2 + with_id)?;
                    put_str(out, "err")?;
                    put_value(out, &crate::rpc::transport::error_json(error))?;
                    put_key_true(out, "isDisposed")?;
                }
                ReplyPacket::NoHandler => {
                    // NestJS's shape: the id even when null, a status, the message as `err`.
                    map_len(out, 3)?;
                    put_str(out, "id")?;
                    put_value(out, &id.cloned().unwrap_or_else(RawJson::null))?;
                    put_str(out, "status")?;
                    put_str(out, "error")?;
                    put_str(out, "err")?;
                    put_str(out, crate::rpc::error::NO_HANDLER_MESSAGE)?;
                    return Ok(());
                }
            }
            if let Some(id) = id {
                put_str(out, "id")?;
                put_value(out, id)?;
            }
            Ok(())
        }

        fn encode_value(&self, out: &mut Vec<u8>, value: &RawJson) -> Result<(), CodecError> {
            put_value(out, value)
        }

        fn decode_value(&self, bytes: &[u8]) -> Result<RawJson, CodecError> {
            to_json(bytes)
        }

        fn decode_incoming(&self, body: &Bytes) -> Result<IncomingPacket, CodecError> {
            match read(body)? {
                Some(packet) if packet.pattern.is_some() || packet.data.is_some() => {
                    Ok(IncomingPacket {
                        pattern: packet.pattern,
                        data: packet.data.unwrap_or_else(RawJson::null),
                        id: packet.id,
                        headers: packet
                            .headers
                            .map(|headers| headers_of(&headers))
                            .unwrap_or_default(),
                        timeout_ms: None,
                        external: false,
                    })
                }
                // Not a packet: the whole value is the data of an event without a pattern of its
                // own (on a channel transport, the channel's), as NestJS reads an external message.
                _ => Ok(IncomingPacket {
                    pattern: None,
                    data: to_json(body)?,
                    id: None,
                    headers: Headers::new(),
                    timeout_ms: None,
                    external: false,
                }),
            }
        }

        fn decode_reply(&self, body: &Bytes) -> Result<(Option<RawJson>, ReplyPacket), CodecError> {
            let packet = read(body)?.unwrap_or_default();
            let whole = || to_json(body).unwrap_or_else(|_| RawJson::null());
            let reply = reply_from_fields(
                packet.response,
                packet.err,
                packet.is_disposed,
                |raw| raw,
                whole,
            );
            Ok((packet.id, reply))
        }
    }

    /// The whole body, as JSON.
    fn to_json(body: &[u8]) -> Result<RawJson, CodecError> {
        let mut from = rmp_serde::Deserializer::new(std::io::Cursor::new(body));
        let json = ToJson.deserialize(&mut from).map_err(failed)?;
        if from.position() != body.len() as u64 {
            return Err(failed("bytes after the value"));
        }
        Ok(json)
    }

    fn headers_of(raw: &RawJson) -> Headers {
        match raw.to_value() {
            serde_json::Value::Object(map) => map
                .into_iter()
                .filter_map(|(key, value)| match value {
                    serde_json::Value::String(text) => Some((key, text)),
                    serde_json::Value::Number(number) => Some((key, number.to_string())),
                    _ => None,
                })
                .collect(),
            _ => Headers::new(),
        }
    }

    #[derive(Default)]
    struct Fields {
        pattern: Option<RawJson>,
        data: Option<RawJson>,
        id: Option<RawJson>,
        response: Option<RawJson>,
        err: Option<RawJson>,
        is_disposed: Option<RawJson>,
        headers: Option<RawJson>,
    }

    /// The body's fields when it is a map, `None` for any other value.
    fn read(body: &[u8]) -> Result<Option<Fields>, CodecError> {
        let mut from = rmp_serde::Deserializer::new(std::io::Cursor::new(body));
        let read = from.deserialize_any(PacketVisitor).map_err(failed)?;
        if from.position() != body.len() as u64 {
            return Err(failed("bytes after the message"));
        }
        Ok(read)
    }

    struct PacketVisitor;

    impl<'de> Visitor<'de> for PacketVisitor {
        type Value = Option<Fields>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a MessagePack value")
        }

        fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Option<Fields>, M::Error> {
            let mut packet = Fields::default();
            while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                let slot = match &*key {
                    "pattern" => &mut packet.pattern,
                    "data" => &mut packet.data,
                    "id" => &mut packet.id,
                    "response" => &mut packet.response,
                    "err" => &mut packet.err,
                    "isDisposed" => &mut packet.is_disposed,
                    "headers" => &mut packet.headers,
                    _ => {
                        map.next_value::<IgnoredAny>()?;
                        continue;
                    }
                };
                *slot = Some(map.next_value_seed(ToJson)?);
            }
            Ok(Some(packet))
        }

        fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Option<Fields>, A::Error> {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            Ok(None)
        }

        fn visit_bool<E: de::Error>(self, _: bool) -> Result<Option<Fields>, E> {
            Ok(None)
        }
        fn visit_i64<E: de::Error>(self, _: i64) -> Result<Option<Fields>, E> {
            Ok(None)
        }
        fn visit_u64<E: de::Error>(self, _: u64) -> Result<Option<Fields>, E> {
            Ok(None)
        }
        fn visit_f64<E: de::Error>(self, _: f64) -> Result<Option<Fields>, E> {
            Ok(None)
        }
        fn visit_str<E: de::Error>(self, _: &str) -> Result<Option<Fields>, E> {
            Ok(None)
        }
        fn visit_bytes<E: de::Error>(self, _: &[u8]) -> Result<Option<Fields>, E> {
            Ok(None)
        }
        fn visit_unit<E: de::Error>(self) -> Result<Option<Fields>, E> {
            Ok(None)
        }
        fn visit_none<E: de::Error>(self) -> Result<Option<Fields>, E> {
            Ok(None)
        }
    }

    /// One MessagePack value, translated to JSON text as it is read.
    struct ToJson;

    impl<'de> DeserializeSeed<'de> for ToJson {
        type Value = RawJson;

        fn deserialize<D: Deserializer<'de>>(self, from: D) -> Result<RawJson, D::Error> {
            let mut out = Vec::new();
            let mut to = serde_json::Serializer::new(&mut out);
            serde_transcode::transcode(from, &mut to).map_err(de::Error::custom)?;
            Ok(RawJson::from_trusted(Bytes::from(out)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

    /// A codec that writes requests as JSON through `encode_request` alone, so that the trait's
    /// default `encode_request_within` is the one used.
    #[derive(Debug)]
    struct JsonByDefault;

    impl Codec for JsonByDefault {
        fn name(&self) -> &'static str {
            "JSON by default"
        }
        fn encode_request(
            &self,
            out: &mut Vec<u8>,
            pattern: &RawJson,
            data: &RawJson,
            id: Option<&str>,
            headers: &Headers,
        ) -> Result<(), CodecError> {
            JsonCodec.encode_request(out, pattern, data, id, headers)
        }
        fn encode_reply(
            &self,
            out: &mut Vec<u8>,
            packet: &ReplyPacket,
            id: Option<&RawJson>,
        ) -> Result<(), CodecError> {
            JsonCodec.encode_reply(out, packet, id)
        }
        fn decode_incoming(&self, body: &Bytes) -> Result<IncomingPacket, CodecError> {
            JsonCodec.decode_incoming(body)
        }
        fn decode_reply(&self, body: &Bytes) -> Result<(Option<RawJson>, ReplyPacket), CodecError> {
            JsonCodec.decode_reply(body)
        }
    }

    #[test]
    fn the_deadline_header_goes_into_the_body_with_every_codec() {
        let pattern = RawJson::to_json("p").unwrap();
        let data = RawJson::from_text("1").unwrap();
        let mut headers = Headers::new();
        headers.insert("x", "y");
        let expected: &[u8] =
            br#"{"pattern":"p","data":1,"id":"7","headers":{"x":"y","palisade-timeout-ms":"250"}}"#;
        for codec in [SharedCodec::new(JsonCodec), SharedCodec::new(JsonByDefault)] {
            let body = codec
                .request_body_within(&pattern, &data, Some("7"), &headers, Some(250))
                .unwrap();
            assert_eq!(body, expected, "{codec:?}");
            let packet = codec.decode_incoming(&body).unwrap();
            assert_eq!(packet.timeout_ms, Some(250), "{codec:?}");
            assert_eq!(packet.headers.get("x"), Some("y"), "{codec:?}");
            let without = codec
                .request_body_within(&pattern, &data, Some("7"), &headers, None)
                .unwrap();
            assert_eq!(
                without,
                br#"{"pattern":"p","data":1,"id":"7","headers":{"x":"y"}}"#.as_slice(),
                "{codec:?}"
            );
        }
    }

    #[test]
    fn the_default_codec_is_nests_json_and_says_so() {
        assert_eq!(JsonCodec.name(), "JSON");
        assert!(SharedCodec::default().is_json());
        assert!(SharedCodec::new(JsonCodec).is_json());
        assert_eq!(format!("{:?}", SharedCodec::default()), "JSON");
        let data = RawJson::from_text(r#"{"b":1,"a":[2]}"#).unwrap();
        // A payload alone is its JSON text, as it came.
        assert_eq!(
            SharedCodec::default().value_body(&data).unwrap(),
            data.as_bytes()
        );
        assert_eq!(JsonCodec.decode_value(data.as_bytes()).unwrap(), data);
        let body = SharedCodec::default()
            .request_body(
                &RawJson::to_json("p").unwrap(),
                &data,
                Some("7"),
                &Headers::new(),
            )
            .unwrap();
        assert_eq!(
            &body[..],
            br#"{"pattern":"p","data":{"b":1,"a":[2]},"id":"7"}"#
        );
        let reply = SharedCodec::default()
            .reply_body(
                &ReplyPacket::Complete,
                Some(&RawJson::to_json("7").unwrap()),
            )
            .unwrap();
        assert_eq!(&reply[..], br#"{"isDisposed":true,"id":"7"}"#);
    }

    #[test]
    fn a_codec_error_names_its_codec_and_keeps_its_cause() {
        let error = JsonCodec
            .decode_reply(&Bytes::from_static(b"{nope"))
            .unwrap_err();
        assert_eq!(error.codec(), "JSON");
        assert!(
            error.to_string().starts_with("not a valid JSON message: "),
            "{error}"
        );
        assert!(error.source().is_some());
        assert!(JsonCodec.decode_value(b"{nope").is_err());
        assert!(
            JsonCodec
                .decode_incoming(&Bytes::from_static(b"{nope"))
                .is_err()
        );
    }

    #[cfg(feature = "msgpack")]
    #[test]
    fn messagepack_is_not_json_and_round_trips_values() {
        let codec = SharedCodec::new(MessagePackCodec);
        assert!(!codec.is_json());
        assert_eq!(format!("{codec:?}"), "MessagePack");
        let value = RawJson::from_text(r#"{"n":300,"s":"x","l":[true,null,1.5]}"#).unwrap();
        let body = codec.value_body(&value).unwrap();
        assert_ne!(body, value.as_bytes());
        assert_eq!(codec.decode_value(&body).unwrap(), value);
        let mut trailing = body.clone();
        trailing.push(0xc0);
        assert!(codec.decode_value(&trailing).is_err());
    }
}

//! Record values and headers the way NestJS's Kafka transport encodes and decodes them
//! (nestjs-wire-brokers.md §5): no envelope, the value is the data alone.

use crate::rpc::RawJson;
use crate::rpc::wire::{CodecError, SharedCodec};
use serde_json::Value;

/// NestJS's request and reply headers.
pub(crate) const CORRELATION_ID: &str = "kafka_correlationId";
pub(crate) const REPLY_TOPIC: &str = "kafka_replyTopic";
pub(crate) const REPLY_PARTITION: &str = "kafka_replyPartition";
pub(crate) const NEST_ERR: &str = "kafka_nest-err";
pub(crate) const NEST_IS_DISPOSED: &str = "kafka_nest-is-disposed";

/// The record value NestJS sends for `data`: objects and arrays as JSON text, a string as its raw
/// text (no quotes), a number or boolean as its text, `null` as no value at all.
pub(crate) fn encode_nest(data: &RawJson) -> Option<Vec<u8>> {
    let bytes = data.as_bytes();
    match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
        // Valid JSON starting with `n` is `null` (and nothing at all is no value either).
        None | Some(b'n') => None,
        Some(b'"') => match serde_json::from_slice::<String>(bytes) {
            Ok(text) => Some(text.into_bytes()),
            Err(_) => Some(bytes.to_vec()),
        },
        // Numbers and booleans: JSON's text is JavaScript's `toString()` for the values JSON can
        // hold, except numbers serde_json writes differently (`1e21` vs `1e+21`); those are rare
        // in payloads and both parse back to the same number.
        _ => Some(bytes.to_vec()),
    }
}

/// The data a record value carries: NestJS's decoding, made useful to Rust types:
///
/// - no value → `null`;
/// - a value starting with a 0x00 byte (schema-registry framing) stays binary: Node's JSON form of
///   a `Buffer`, `{"type":"Buffer","data":[...]}`;
/// - text starting with `{` or `[` that parses as JSON → that JSON;
/// - text that parses as a JSON number, `true`, `false` or `null` → that value (NestJS hands its
///   handlers the text — `"3"` — which a Rust handler expecting `u32` could not take);
/// - any other text → a JSON string.
pub(crate) fn decode(value: Option<&[u8]>) -> RawJson {
    let Some(bytes) = value else {
        return RawJson::null();
    };
    if bytes.first() == Some(&0) {
        // Node's key order, whatever `serde_json`'s map order.
        let data = serde_json::to_string(bytes).unwrap_or_else(|_| "[]".to_owned());
        return RawJson::from_trusted(format!(r#"{{"type":"Buffer","data":{data}}}"#).into());
    }
    let text = String::from_utf8_lossy(bytes);
    let trimmed = text.trim();
    let structured = trimmed.starts_with(['{', '[']);
    let scalar = trimmed
        .chars()
        .next()
        .is_some_and(|c| c == '-' || c.is_ascii_digit())
        || matches!(trimmed, "true" | "false" | "null");
    if (structured || scalar)
        && let Ok(json) = RawJson::from_text(text.as_bytes().to_vec())
    {
        return json;
    }
    RawJson::to_json(&Value::String(text.into_owned())).unwrap_or_else(|_| RawJson::null())
}

/// The `kafka_nest-err` header of an error reply: JSON text for an object or array, the raw text
/// for a string.
pub(crate) fn encode_err(err: &RawJson) -> Vec<u8> {
    encode_nest(err).unwrap_or_else(|| b"null".to_vec())
}

/// The `err` value a `kafka_nest-err` header stands for (NestJS's decoding: JSON for `{`/`[`, else
/// the string).
pub(crate) fn decode_err(bytes: &[u8]) -> RawJson {
    let text = String::from_utf8_lossy(bytes);
    if text.trim_start().starts_with(['{', '['])
        && let Ok(json) = RawJson::from_text(text.as_bytes().to_vec())
    {
        return json;
    }
    RawJson::to_json(&Value::String(text.into_owned())).unwrap_or_else(|_| RawJson::null())
}

/// Whether `topic` is a valid Kafka topic name: 1 to 249 characters of `[A-Za-z0-9._-]`, not `.`
/// or `..`.
pub(crate) fn valid_topic(topic: &str) -> bool {
    !topic.is_empty()
        && topic.len() <= 249
        && topic != "."
        && topic != ".."
        && topic
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(text: &str) -> RawJson {
        RawJson::from_text(text.to_owned()).unwrap()
    }

    #[test]
    fn values_are_encoded_as_nestjs_does() {
        assert_eq!(
            encode_nest(&raw(r#"{"id":"42"}"#)).unwrap(),
            br#"{"id":"42"}"#
        );
        assert_eq!(encode_nest(&raw("[1,2]")).unwrap(), b"[1,2]");
        assert_eq!(encode_nest(&raw(r#""abc""#)).unwrap(), b"abc");
        assert_eq!(
            encode_nest(&raw(r#""say \"hi\"""#)).unwrap(),
            br#"say "hi""#
        );
        assert_eq!(encode_nest(&raw("3")).unwrap(), b"3");
        assert_eq!(encode_nest(&raw("-1.5")).unwrap(), b"-1.5");
        assert_eq!(encode_nest(&raw("true")).unwrap(), b"true");
        assert_eq!(encode_nest(&raw("null")), None);
    }

    #[test]
    fn values_are_decoded_like_nestjs_and_usable_from_rust() {
        assert_eq!(decode(None), RawJson::null());
        assert_eq!(decode(Some(br#"{"id":"42"}"#)), raw(r#"{"id":"42"}"#));
        assert_eq!(decode(Some(b"[1,2]")), raw("[1,2]"));
        assert_eq!(decode(Some(b"3")), raw("3"));
        assert_eq!(decode(Some(b"-2.5")), raw("-2.5"));
        assert_eq!(decode(Some(b"true")), raw("true"));
        assert_eq!(decode(Some(b"abc")), raw(r#""abc""#));
        assert_eq!(decode(Some(b"{not json")), raw(r#""{not json""#));
        assert_eq!(decode(Some(b"12 apples")), raw(r#""12 apples""#));
        assert_eq!(decode(Some("héllo".as_bytes())), raw(r#""héllo""#));
        assert_eq!(
            decode(Some(&[0, 1, 2])),
            raw(r#"{"type":"Buffer","data":[0,1,2]}"#)
        );
    }

    #[test]
    fn errors_travel_as_nestjs_headers() {
        assert_eq!(
            encode_err(&raw(r#"{"status":"error","message":"boom"}"#)),
            br#"{"status":"error","message":"boom"}"#
        );
        assert_eq!(encode_err(&raw(r#""no handler""#)), b"no handler");
        assert_eq!(decode_err(br#"{"code":"X"}"#), raw(r#"{"code":"X"}"#));
        assert_eq!(
            decode_err(b"There is no matching"),
            raw(r#""There is no matching""#)
        );
    }

    #[test]
    fn topic_names() {
        for ok in [
            "get-user",
            "orders.created",
            "a_b",
            "x".repeat(249).as_str(),
        ] {
            assert!(valid_topic(ok), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            r#"{"cmd":"sum"}"#,
            "a b",
            "ü",
            &"x".repeat(250),
        ] {
            assert!(!valid_topic(bad), "{bad}");
        }
    }
}

/// Header marking a value that is a JSON string, so that a palisade peer decodes `123` sent as
/// a string as the string `"123"`; NestJS ignores it.
pub(crate) const TYPE_HEADER: &str = "palisade-type";

/// [`TYPE_HEADER`]'s value on a request's last reply when that is `null`: a record without a
/// value, which a completion record is too.
pub(crate) const NULL_TYPE: &[u8] = b"null";

/// A record to produce for `data`: NestJS's message shape (`{key, value, headers, partition}`,
/// see `KafkaRecord`) taken apart, the value encoded as NestJS encodes it.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Outgoing {
    pub(crate) key: Option<Vec<u8>>,
    pub(crate) value: Option<Vec<u8>>,
    pub(crate) headers: Vec<(String, Vec<u8>)>,
    pub(crate) partition: Option<i32>,
}

impl Outgoing {
    /// The record for `data`, as NestJS's `ClientKafka` builds it: an object with a `key` or
    /// `value` field is the message itself.
    pub(crate) fn of(data: &RawJson) -> Outgoing {
        match Outgoing::of_with(data, |value| {
            Ok::<_, std::convert::Infallible>(Outgoing::value(value))
        }) {
            Ok(outgoing) => outgoing,
            Err(never) => match never {},
        }
    }

    /// [`of`](Self::of) with the value (and its headers) made by `value_of`.
    pub(crate) fn of_with<E>(
        data: &RawJson,
        value_of: impl Fn(&RawJson) -> Result<Outgoing, E>,
    ) -> Result<Outgoing, E> {
        let bytes = data.as_bytes();
        let may_be_message = bytes.first() == Some(&b'{')
            && (memmem(bytes, b"\"key\"") || memmem(bytes, b"\"value\""));
        if may_be_message
            && let Ok(Value::Object(mut message)) = serde_json::from_slice::<Value>(bytes)
            && (message.contains_key("key") || message.contains_key("value"))
        {
            let value = message.remove("value").unwrap_or(Value::Null);
            let mut outgoing =
                value_of(&RawJson::to_json(&value).unwrap_or_else(|_| RawJson::null()))?;
            outgoing.key = message
                .remove("key")
                .filter(|key| !key.is_null())
                .and_then(|key| RawJson::to_json(&key).ok())
                .and_then(|key| encode_nest(&key));
            if let Some(Value::Object(headers)) = message.remove("headers") {
                for (name, value) in headers {
                    let text = match value {
                        Value::String(text) => text,
                        other => other.to_string(),
                    };
                    outgoing.headers.push((name, text.into_bytes()));
                }
            }
            outgoing.partition = message
                .get("partition")
                .and_then(Value::as_i64)
                .and_then(|p| i32::try_from(p).ok());
            return Ok(outgoing);
        }
        value_of(data)
    }

    /// A record whose value is `data`.
    pub(crate) fn value(data: &RawJson) -> Outgoing {
        let mut headers = Vec::new();
        if data.as_bytes().first() == Some(&b'"') {
            headers.push((TYPE_HEADER.to_owned(), b"string".to_vec()));
        }
        Outgoing {
            key: None,
            value: encode_nest(data),
            headers,
            partition: None,
        }
    }
}

fn memmem(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}

/// The data of a received record: exact for a value a palisade peer marked as a string, decoded
/// as [`decode`] does otherwise.
pub(crate) fn decode_received(value: Option<&[u8]>, string: bool) -> RawJson {
    match value {
        Some(bytes) if string => {
            RawJson::to_json(&String::from_utf8_lossy(bytes)).unwrap_or_else(|_| RawJson::null())
        }
        other => decode(other),
    }
}

/// The record for `data`: NestJS's (JSON) unless `codec` is another, whose
/// [`encode_value`](crate::rpc::wire::Codec::encode_value) then writes the value.
pub(crate) fn outgoing(codec: &SharedCodec, data: &RawJson) -> Result<Outgoing, CodecError> {
    if codec.is_json() {
        return Ok(Outgoing::of(data));
    }
    Outgoing::of_with(data, |value| {
        Ok(Outgoing {
            value: Some(codec.value_body(value)?),
            ..Outgoing::default()
        })
    })
}

/// A reply's record for `response`.
pub(crate) fn reply_value(codec: &SharedCodec, response: &RawJson) -> Result<Outgoing, CodecError> {
    if codec.is_json() {
        return Ok(Outgoing::value(response));
    }
    Ok(Outgoing {
        value: Some(codec.value_body(response)?),
        ..Outgoing::default()
    })
}

/// The data of a received record, read with `codec`.
pub(crate) fn received(
    codec: &SharedCodec,
    value: Option<&[u8]>,
    string: bool,
) -> Result<RawJson, CodecError> {
    match value {
        _ if codec.is_json() => Ok(decode_received(value, string)),
        None => Ok(RawJson::null()),
        Some(bytes) => codec.decode_value(bytes),
    }
}

/// The `kafka_nest-err` header for `err`.
pub(crate) fn err_header(codec: &SharedCodec, err: &RawJson) -> Result<Vec<u8>, CodecError> {
    if codec.is_json() {
        return Ok(encode_err(err));
    }
    codec.value_body(err)
}

/// The `err` a `kafka_nest-err` header carries.
pub(crate) fn received_err(codec: &SharedCodec, bytes: &[u8]) -> Result<RawJson, CodecError> {
    if codec.is_json() {
        return Ok(decode_err(bytes));
    }
    codec.decode_value(bytes)
}

#[cfg(test)]
mod outgoing_tests {
    use super::*;

    fn raw(text: &str) -> RawJson {
        RawJson::from_text(text.to_owned()).unwrap()
    }

    #[test]
    fn records_are_built_as_nestjs_builds_them() {
        let plain = Outgoing::of(&raw(r#"{"id":"42"}"#));
        assert_eq!(plain.value.as_deref(), Some(&br#"{"id":"42"}"#[..]));
        assert_eq!((plain.key, plain.partition), (None, None));
        assert!(plain.headers.is_empty());

        let text = Outgoing::of(&raw(r#""123""#));
        assert_eq!(text.value.as_deref(), Some(&b"123"[..]));
        assert_eq!(text.headers, [(TYPE_HEADER.to_owned(), b"string".to_vec())]);
        assert_eq!(
            decode_received(text.value.as_deref(), true),
            raw(r#""123""#)
        );
        assert_eq!(decode_received(text.value.as_deref(), false), raw("123"));

        let message = Outgoing::of(&raw(
            r#"{"key":"order-7","value":{"n":1},"headers":{"h":"v","n":2},"partition":3}"#,
        ));
        assert_eq!(message.key.as_deref(), Some(&b"order-7"[..]));
        assert_eq!(message.value.as_deref(), Some(&br#"{"n":1}"#[..]));
        assert_eq!(
            message.headers,
            [
                ("h".to_owned(), b"v".to_vec()),
                ("n".to_owned(), b"2".to_vec())
            ]
        );
        assert_eq!(message.partition, Some(3));

        // A key alone, or a value alone, makes the object a message too (NestJS: `'key' in data ||
        // 'value' in data`); what is missing is null.
        let keyed = Outgoing::of(&raw(r#"{"key":"k","other":1}"#));
        assert_eq!((keyed.key.as_deref(), keyed.value), (Some(&b"k"[..]), None));
        let valued = Outgoing::of(&raw(r#"{"value":5}"#));
        assert_eq!(
            (valued.key, valued.value.as_deref()),
            (None, Some(&b"5"[..]))
        );

        // A field named "key" deeper down is not a message.
        let nested = Outgoing::of(&raw(r#"{"data":{"key":1}}"#));
        assert_eq!(nested.value.as_deref(), Some(&br#"{"data":{"key":1}}"#[..]));
        assert_eq!(nested.key, None);
        let null_value = Outgoing::of(&raw(r#"{"key":"k","value":null}"#));
        assert_eq!(
            (null_value.key.as_deref(), null_value.value),
            (Some(&b"k"[..]), None)
        );
    }
}

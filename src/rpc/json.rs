use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::cell::RefCell;
use std::fmt;

/// A scratch buffer larger than this is not kept for the next message.
const SCRATCH_KEPT: usize = 64 * 1024;

thread_local! {
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Runs `encode` on this thread's scratch buffer (cleared), or on a fresh one if the scratch
/// buffer is unavailable (thread teardown, or an encoder that re-enters).
///
/// A fresh buffer grows several times while a message is written and then, being larger than its
/// contents, needs a reference-count header of its own when frozen: four or five allocations per
/// message, each freed later by whichever thread drops the message. Encoding into a warm scratch
/// buffer and copying out an exact-size result is one allocation.
pub(crate) fn with_scratch<R>(encode: impl FnOnce(&mut Vec<u8>) -> R) -> R {
    let mut encode = Some(encode);
    let scratched = SCRATCH.try_with(|scratch| {
        let mut scratch = scratch.try_borrow_mut().ok()?;
        scratch.clear();
        let result = encode.take().map(|encode| encode(&mut scratch));
        if scratch.capacity() > SCRATCH_KEPT {
            *scratch = Vec::new();
        }
        result
    });
    match (scratched, encode) {
        (Ok(Some(result)), _) => result,
        (_, Some(encode)) => encode(&mut Vec::new()),
        (_, None) => unreachable!("the encoder ran but gave no result"),
    }
}

/// `n` in decimal, written at the end of `digits`: for numbers that go on the wire as text (a
/// frame's length, a deadline's milliseconds, a reply subject's request number) without
/// formatting a `String`.
pub(crate) fn decimal(mut n: u64, digits: &mut [u8; 20]) -> &[u8] {
    let mut start = digits.len();
    loop {
        start -= 1;
        digits[start] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &digits[start..];
        }
    }
}

/// Encodes with `encode` into a per-thread scratch buffer and returns exactly the bytes written,
/// in one allocation: a message body for a transport that sends `Bytes`.
///
/// A fresh buffer would grow several times while a message is written and then, being larger than
/// its contents, need a reference-count header of its own when frozen: four or five allocations
/// per message. Encoding into a warm scratch buffer and copying out an exact-size result is one.
///
/// ```
/// use palisade::rpc::wire::{encode_request, encoded};
/// use palisade::rpc::{Headers, RawJson};
///
/// let body = encoded(|out| {
///     encode_request(out, &RawJson::to_json("ping").unwrap(), &RawJson::null(), None, &Headers::new())
/// });
/// assert_eq!(&body[..], br#"{"pattern":"ping","data":null}"#);
/// ```
pub fn encoded(encode: impl FnOnce(&mut Vec<u8>)) -> Bytes {
    with_scratch(|scratch| {
        encode(scratch);
        Bytes::copy_from_slice(scratch)
    })
}

/// [`encoded`] for an encoder that can fail.
pub(crate) fn encode_exact<E>(
    encode: impl FnOnce(&mut Vec<u8>) -> Result<(), E>,
) -> Result<Bytes, E> {
    with_scratch(|scratch| encode(scratch).map(|()| Bytes::copy_from_slice(scratch)))
}

/// A JSON value kept as its text: payloads travel from the caller's `Serialize` to the handler's
/// `Deserialize` without being parsed in between (a transport only copies the bytes into its frame).
///
/// Cheap to clone (reference-counted bytes).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct RawJson(Bytes);

impl RawJson {
    /// `null`.
    pub fn null() -> Self {
        RawJson(Bytes::from_static(b"null"))
    }

    /// Serialises `value`.
    pub fn to_json<T: Serialize + ?Sized>(value: &T) -> Result<Self, serde_json::Error> {
        encode_exact(|out| serde_json::to_writer(out, value)).map(RawJson)
    }

    /// Validates `text` as JSON.
    pub fn from_text(text: impl Into<Bytes>) -> Result<Self, serde_json::Error> {
        let bytes = text.into();
        serde_json::from_slice::<serde::de::IgnoredAny>(&bytes)?;
        Ok(RawJson(bytes))
    }

    /// Bytes already known to hold one valid JSON value (cut out of a parsed frame).
    pub(crate) fn from_trusted(bytes: Bytes) -> Self {
        RawJson(bytes)
    }

    /// Deserialises into `T`; on failure the error names the path of the offending field.
    ///
    /// A string holding a lone UTF-16 surrogate (`"x\ud800y"`, which JavaScript accepts and NestJS
    /// echoes) cannot be a Rust string: each lone surrogate decodes as U+FFFD, the replacement
    /// character, as `String::from_utf16_lossy` does, instead of failing the whole value.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, DecodeError> {
        decode_slice(&self.0).or_else(|error| match replace_lone_surrogates(&self.0) {
            Some(repaired) => decode_slice(&repaired),
            None => Err(error),
        })
    }

    /// Parses into a [`serde_json::Value`]; `Null` for a value `serde_json` cannot hold (one
    /// nested more than 128 deep, or holding a number beyond a double's range such as `1e400`,
    /// both valid JSON): see [`try_to_value`](Self::try_to_value) to tell the two apart.
    pub fn to_value(&self) -> serde_json::Value {
        self.try_to_value().unwrap_or(serde_json::Value::Null)
    }

    /// Parses into a [`serde_json::Value`], or fails for a value `serde_json` cannot hold (one
    /// nested more than 128 deep, or holding a number beyond a double's range such as `1e400`).
    ///
    /// ```
    /// use palisade::rpc::RawJson;
    ///
    /// let shallow = RawJson::from_text("[[1]]").unwrap();
    /// assert_eq!(shallow.try_to_value().unwrap(), serde_json::json!([[1]]));
    /// let deep = RawJson::from_text(format!("{}{}", "[".repeat(200), "]".repeat(200))).unwrap();
    /// assert!(deep.try_to_value().is_err());
    /// ```
    pub fn try_to_value(&self) -> Result<serde_json::Value, serde_json::Error> {
        serde_json::from_slice(&self.0)
    }

    /// The JSON text.
    pub fn as_str(&self) -> &str {
        // The bytes came from serde_json (UTF-8) or were validated as JSON, which is UTF-8.
        std::str::from_utf8(&self.0).unwrap_or("null")
    }

    /// The JSON text as bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Whether the value is `null`.
    pub fn is_null(&self) -> bool {
        self.0.as_ref() == b"null"
    }
}

impl fmt::Debug for RawJson {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for RawJson {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

fn decode_slice<T: DeserializeOwned>(json: &[u8]) -> Result<T, DecodeError> {
    let mut deserializer = serde_json::Deserializer::from_slice(json);
    serde_path_to_error::deserialize(&mut deserializer).map_err(|error| DecodeError {
        path: error.path().to_string(),
        message: without_position(&error.inner().to_string()).to_owned(),
    })
}

/// serde_json's message without its " at line 1 column 17": a position in a text the caller
/// never saw helps nobody, and the field path says where.
fn without_position(message: &str) -> &str {
    match message.rfind(" at line ") {
        Some(at)
            if message[at + 9..]
                .split_once(" column ")
                .is_some_and(|(line, column)| {
                    !line.is_empty()
                        && !column.is_empty()
                        && line
                            .bytes()
                            .chain(column.bytes())
                            .all(|b| b.is_ascii_digit())
                }) =>
        {
            &message[..at]
        }
        _ => message,
    }
}

/// `json` with every `\uD800`–`\uDFFF` escape that is not half of a surrogate pair replaced by
/// `\uFFFD`; `None` when there is none.
fn replace_lone_surrogates(json: &[u8]) -> Option<Vec<u8>> {
    fn escape_at(json: &[u8], at: usize) -> Option<u16> {
        let hex = json.get(at..at + 6)?;
        if hex[0] != b'\\' || hex[1] != b'u' {
            return None;
        }
        u16::from_str_radix(std::str::from_utf8(&hex[2..]).ok()?, 16).ok()
    }
    let mut out: Option<Vec<u8>> = None;
    let mut copied = 0;
    let mut i = 0;
    while i < json.len() {
        if json[i] != b'\\' {
            i += 1;
            continue;
        }
        match escape_at(json, i) {
            // A pair: kept.
            Some(0xD800..=0xDBFF) if matches!(escape_at(json, i + 6), Some(0xDC00..=0xDFFF)) => {
                i += 12;
            }
            Some(0xD800..=0xDFFF) => {
                let out = out.get_or_insert_with(|| Vec::with_capacity(json.len()));
                out.extend_from_slice(&json[copied..i]);
                out.extend_from_slice(b"\\uFFFD");
                i += 6;
                copied = i;
            }
            // Any other escape, `\\` included, is two characters at least: skip both.
            _ => i += 2,
        }
    }
    let mut out = out?;
    out.extend_from_slice(&json[copied..]);
    Some(out)
}

/// A JSON value that did not decode into the expected type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodeError {
    path: String,
    message: String,
}

impl DecodeError {
    /// Where in the value decoding failed (`.` for the value itself, `user.address.zip`, `items[2]`).
    pub fn path(&self) -> &str {
        &self.path
    }

    /// What went wrong (serde's message).
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path == "." {
            f.write_str(&self.message)
        } else {
            write!(f, "field `{}`: {}", self.path, self.message)
        }
    }
}

impl std::error::Error for DecodeError {}

#[cfg(test)]
mod tests {
    use super::*;

    /// Serialises by encoding another message in the middle, as a `Serialize` impl could.
    struct Reentrant;

    impl Serialize for Reentrant {
        fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            let inner = RawJson::to_json(&[1, 2, 3]).map_err(serde::ser::Error::custom)?;
            serializer.serialize_str(inner.as_str())
        }
    }

    #[test]
    fn encoders_see_a_clean_buffer_and_may_reenter() {
        assert_eq!(
            RawJson::to_json(&"a long first value").unwrap().as_str(),
            "\"a long first value\""
        );
        assert_eq!(RawJson::to_json(&7).unwrap().as_str(), "7");
        assert_eq!(
            RawJson::to_json(&[Reentrant, Reentrant]).unwrap().as_str(),
            r#"["[1,2,3]","[1,2,3]"]"#
        );
        let big = "x".repeat(SCRATCH_KEPT * 2);
        assert_eq!(
            RawJson::to_json(&big).unwrap().as_bytes().len(),
            big.len() + 2
        );
        // The oversized scratch buffer was not kept.
        SCRATCH.with(|scratch| assert!(scratch.borrow().capacity() <= SCRATCH_KEPT));
    }

    #[test]
    fn lone_surrogates_decode_as_replacement_characters() {
        let decode = |text: &str| {
            RawJson::from_text(text.to_owned())
                .unwrap()
                .decode::<String>()
        };
        assert_eq!(decode(r#""x\ud800y""#).unwrap(), "x\u{FFFD}y");
        assert_eq!(decode(r#""\udc00""#).unwrap(), "\u{FFFD}");
        assert_eq!(decode(r#""a\ud83d""#).unwrap(), "a\u{FFFD}");
        assert_eq!(
            decode(r#""\ud83d\ude00 ok""#).unwrap(),
            "😀 ok",
            "a pair is kept"
        );
        assert_eq!(
            decode(r#""\\ud800""#).unwrap(),
            "\\ud800",
            "an escaped backslash is not an escape"
        );
        assert_eq!(
            decode(r#""\ud800\ud800\udc00""#).unwrap(),
            "\u{FFFD}\u{10000}",
            "a lone high surrogate before a pair"
        );
        let nested: serde_json::Value = RawJson::from_text(r#"{"k\udfff":["\ud800"]}"#)
            .unwrap()
            .decode()
            .unwrap();
        assert_eq!(nested, serde_json::json!({"k\u{FFFD}": ["\u{FFFD}"]}));
        assert_eq!(replace_lone_surrogates(br#""plain \n text""#), None);
    }

    #[test]
    fn decode_errors_name_the_field_without_a_text_position() {
        #[derive(serde::Deserialize, Debug)]
        #[allow(dead_code)]
        struct User {
            id: u64,
        }
        let error = RawJson::from_text(r#"{"id":"x"}"#)
            .unwrap()
            .decode::<User>()
            .unwrap_err();
        assert_eq!(error.path(), "id");
        assert_eq!(error.message(), r#"invalid type: string "x", expected u64"#);
        assert_eq!(without_position("a at line 3 column 9"), "a");
        assert_eq!(without_position("at line x column 9"), "at line x column 9");
        assert_eq!(without_position("no position"), "no position");
    }

    #[test]
    fn encoded_bytes_are_exactly_what_was_written() {
        let bytes = encoded(|out| out.extend_from_slice(b"{\"response\":1}"));
        assert_eq!(&bytes[..], b"{\"response\":1}");
        let failed: Result<Bytes, &str> = encode_exact(|out| {
            out.extend_from_slice(b"partial");
            Err("no")
        });
        assert_eq!(failed, Err("no"));
        assert_eq!(&encoded(|_| {})[..], b"");
    }
}

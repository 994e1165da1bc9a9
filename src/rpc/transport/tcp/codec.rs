//! NestJS's TCP framing: `<length>#<json>`, where the length counts UTF-16 code units of the JSON
//! text (JavaScript's `string.length`), not bytes.

use crate::rpc::json::{decimal, with_scratch};
use crate::rpc::wire::CodecError;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use std::fmt;
use tokio_util::codec::{Decoder, Encoder};

/// The longest length prefix accepted (digits).
const MAX_PREFIX_DIGITS: usize = 10;

/// Why a connection's byte stream could not be read as frames. The connection is closed; other
/// connections are unaffected.
#[derive(Debug)]
pub enum FrameError {
    /// The length prefix is not a decimal number.
    CorruptedLength(String),
    /// The declared length exceeds the configured maximum.
    TooLarge {
        /// The declared length (UTF-16 units).
        declared: u64,
        /// The maximum (UTF-16 units).
        max: usize,
    },
    /// The frame is not valid UTF-8.
    InvalidUtf8,
    /// The declared length ends in the middle of a character (half of a UTF-16 surrogate pair).
    SplitCharacter,
    /// The peer did not send a whole frame within the frame timeout (it stalled, or trickled).
    Incomplete {
        /// Bytes of the unfinished frame received.
        buffered: usize,
        /// The frame timeout.
        timeout: std::time::Duration,
    },
    /// The frame does not fit in the server's memory budget for received frames
    /// ([`TcpOptions::max_buffered_bytes`](super::TcpOptions::max_buffered_bytes)).
    OverBudget {
        /// Bytes the frame needs at least.
        needed: usize,
        /// The whole budget.
        budget: usize,
    },
    /// Reading or writing the socket failed.
    Io(std::io::Error),
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::CorruptedLength(raw) => {
                write!(f, "Corrupted length value {raw:?} supplied in a packet")
            }
            FrameError::TooLarge { declared, max } => write!(
                f,
                "The packet length ({declared}) exceeds the maximum allowed length ({max})"
            ),
            FrameError::InvalidUtf8 => f.write_str("the packet is not valid UTF-8"),
            FrameError::SplitCharacter => {
                f.write_str("the packet length ends in the middle of a character")
            }
            FrameError::Incomplete { buffered, timeout } => write!(
                f,
                "The remote peer did not send a whole packet within {}ms ({buffered} byte(s) of it buffered)",
                timeout.as_millis()
            ),
            FrameError::OverBudget { needed, budget } => write!(
                f,
                "The packet needs {needed} bytes, more than the server's memory budget for received packets ({budget} bytes)"
            ),
            FrameError::Io(error) => write!(f, "socket error: {error}"),
        }
    }
}

impl std::error::Error for FrameError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            FrameError::Io(error) => Some(error),
            _ => None,
        }
    }
}

impl From<std::io::Error> for FrameError {
    fn from(error: std::io::Error) -> Self {
        FrameError::Io(error)
    }
}

/// UTF-16 code units of a UTF-8 text: one per character, two for characters outside the BMP
/// (four-byte sequences). Counted from the bytes: every byte that does not continue a sequence
/// starts a character, and four-byte leads count twice.
pub(crate) fn utf16_len(text: &[u8]) -> usize {
    text.iter()
        .map(|&b| usize::from(b & 0xC0 != 0x80) + usize::from(b >= 0xF0))
        .sum()
}

enum State {
    /// Reading the length prefix.
    Length,
    /// Reading the body: `units` still to come; `scanned` bytes of it already counted.
    Body { units: usize, scanned: usize },
}

/// Encoder and decoder of NestJS TCP frames. Decoded items are the JSON texts (valid UTF-8,
/// not yet parsed).
pub struct JsonFrameCodec {
    state: State,
    max_units: usize,
    /// The length counts bytes and the body is opaque: frames of a binary [`Codec`]
    /// (crate::rpc::wire::Codec), palisade to palisade.
    binary: bool,
}

impl JsonFrameCodec {
    /// A codec refusing frames longer than `max_units` UTF-16 units.
    pub fn new(max_units: usize) -> Self {
        JsonFrameCodec {
            state: State::Length,
            max_units,
            binary: false,
        }
    }

    /// A codec of `<length>#<body>` frames whose length counts bytes and whose body may be any
    /// bytes (a binary codec's, such as MessagePack's), refusing frames longer than `max_bytes`.
    /// Not NestJS's framing: palisade to palisade only.
    ///
    /// ```
    /// use bytes::{Bytes, BytesMut};
    /// use palisade::rpc::transport::tcp::JsonFrameCodec;
    /// use tokio_util::codec::{Decoder, Encoder};
    ///
    /// let mut codec = JsonFrameCodec::counting_bytes(16);
    /// let mut out = BytesMut::new();
    /// codec.encode(Bytes::from_static(&[0x81, 0xa1, b'a', 0xff]), &mut out).unwrap();
    /// assert_eq!(&out[..], b"4#\x81\xa1a\xff");
    /// assert_eq!(codec.decode(&mut out).unwrap().unwrap(), &[0x81, 0xa1, b'a', 0xff][..]);
    /// ```
    pub fn counting_bytes(max_bytes: usize) -> Self {
        JsonFrameCodec {
            state: State::Length,
            max_units: max_bytes,
            binary: true,
        }
    }

    /// Whether part of a frame has been received and the rest is still to come.
    pub fn is_mid_frame(&self) -> bool {
        matches!(self.state, State::Body { .. })
    }

    /// The bytes the frame at the start of `buffer` takes at least (each UTF-16 unit is one byte
    /// or more), once its length prefix is known; `None` while it is not. Errors as
    /// [`decode`](Decoder::decode) would for a bad prefix. A reader that budgets memory asks this
    /// before decoding, which reserves room for the whole frame.
    pub fn frame_bytes_at_least(&self, buffer: &[u8]) -> Result<Option<usize>, FrameError> {
        match self.state {
            State::Body { units, scanned } => Ok(Some(scanned.saturating_add(units))),
            State::Length => Ok(self
                .prefix(buffer)?
                .map(|(digits, declared)| digits + 1 + declared)),
        }
    }

    /// The length prefix at the start of `buffer`: its digits and the declared length; `None`
    /// while incomplete.
    fn prefix(&self, buffer: &[u8]) -> Result<Option<(usize, usize)>, FrameError> {
        let digits = buffer
            .iter()
            .take(MAX_PREFIX_DIGITS + 1)
            .take_while(|b| b.is_ascii_digit())
            .count();
        match buffer.get(digits) {
            None if digits <= MAX_PREFIX_DIGITS => Ok(None),
            Some(b'#') if digits > 0 && digits <= MAX_PREFIX_DIGITS => {
                let text = std::str::from_utf8(&buffer[..digits]).expect("ASCII digits");
                let declared: u64 = text.parse().expect("at most ten digits fit in u64");
                if declared > self.max_units as u64 {
                    return Err(FrameError::TooLarge {
                        declared,
                        max: self.max_units,
                    });
                }
                Ok(Some((digits, declared as usize)))
            }
            _ => {
                let end = buffer
                    .iter()
                    .position(|b| *b == b'#')
                    .unwrap_or(buffer.len())
                    .min(32);
                let raw = String::from_utf8_lossy(&buffer[..end]).into_owned();
                Err(FrameError::CorruptedLength(raw))
            }
        }
    }

    /// The longest frame accepted, in UTF-16 units.
    pub fn max_units(&self) -> usize {
        self.max_units
    }
}

impl fmt::Debug for JsonFrameCodec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JsonFrameCodec")
            .field("max_units", &self.max_units)
            .finish_non_exhaustive()
    }
}

impl Decoder for JsonFrameCodec {
    type Item = Bytes;
    type Error = FrameError;

    fn decode(&mut self, buffer: &mut BytesMut) -> Result<Option<Bytes>, FrameError> {
        loop {
            match &mut self.state {
                State::Length => {
                    let Some((digits, declared)) = self.prefix(buffer)? else {
                        return Ok(None);
                    };
                    buffer.advance(digits + 1);
                    // Room for the whole body at once (it takes a byte per unit at least), as
                    // tokio-util's length-delimited decoder reserves.
                    buffer.reserve(declared.saturating_sub(buffer.len()));
                    self.state = State::Body {
                        units: declared,
                        scanned: 0,
                    };
                }
                State::Body { units, .. } if self.binary => {
                    if buffer.len() < *units {
                        return Ok(None);
                    }
                    let frame = buffer.split_to(*units).freeze();
                    self.state = State::Length;
                    return Ok(Some(frame));
                }
                State::Body { units, scanned } => {
                    // Count UTF-16 units character by character, never past the end of what arrived:
                    // a frame may end, or a read may stop, inside a multi-byte character.
                    while *units > 0 {
                        let Some(&lead) = buffer.get(*scanned) else {
                            return Ok(None);
                        };
                        let (bytes, weight) = match lead {
                            0x00..=0x7F => (1, 1),
                            0xC2..=0xDF => (2, 1),
                            0xE0..=0xEF => (3, 1),
                            0xF0..=0xF4 => (4, 2),
                            _ => return Err(FrameError::InvalidUtf8),
                        };
                        if weight > *units {
                            return Err(FrameError::SplitCharacter);
                        }
                        if buffer.len() < *scanned + bytes {
                            return Ok(None);
                        }
                        *scanned += bytes;
                        *units -= weight;
                    }
                    let frame = buffer.split_to(*scanned).freeze();
                    self.state = State::Length;
                    if std::str::from_utf8(&frame).is_err() {
                        return Err(FrameError::InvalidUtf8);
                    }
                    return Ok(Some(frame));
                }
            }
        }
    }
}

/// Encodes a JSON text as a frame; a text longer than the maximum fails with
/// [`FrameError::TooLarge`] and writes nothing.
///
/// ```
/// use bytes::{Bytes, BytesMut};
/// use palisade::rpc::transport::tcp::{FrameError, JsonFrameCodec};
/// use tokio_util::codec::Encoder;
///
/// let mut codec = JsonFrameCodec::new(8);
/// let mut out = BytesMut::new();
/// codec.encode(Bytes::from_static("\"é😀\"".as_bytes()), &mut out).unwrap();
/// assert_eq!(&out[..], "5#\"é😀\"".as_bytes()); // 5 UTF-16 units, 8 bytes
/// let long = Bytes::from_static(b"\"123456789\"");
/// assert!(matches!(codec.encode(long, &mut out), Err(FrameError::TooLarge { declared: 11, max: 8 })));
/// ```
impl Encoder<Bytes> for JsonFrameCodec {
    type Error = FrameError;

    fn encode(&mut self, json: Bytes, out: &mut BytesMut) -> Result<(), FrameError> {
        let units = if self.binary {
            json.len()
        } else {
            utf16_len(&json)
        };
        if units > self.max_units {
            return Err(FrameError::TooLarge {
                declared: units as u64,
                max: self.max_units,
            });
        }
        let mut digits = [0u8; 20];
        out.put_slice(decimal(units as u64, &mut digits));
        out.put_u8(b'#');
        out.put_slice(&json);
        Ok(())
    }
}

/// Appends `<utf16 length>#<json>` to `out`.
#[cfg(test)]
pub(crate) fn put_frame<B: BufMut>(out: &mut B, json: &[u8]) {
    let mut digits = [0u8; 20];
    out.put_slice(decimal(utf16_len(json) as u64, &mut digits));
    out.put_u8(b'#');
    out.put_slice(json);
}

/// The frame of the JSON text `encode` writes, in one exact-size allocation (the JSON itself is
/// written to a scratch buffer: its UTF-16 length must be known before the frame can start); the
/// text's length in UTF-16 units when it is longer than `max_units`.
pub(crate) fn framed(
    max_units: usize,
    encode: impl FnOnce(&mut Vec<u8>),
) -> Result<Vec<u8>, usize> {
    with_scratch(|json| {
        encode(json);
        let units = utf16_len(json);
        if units > max_units {
            return Err(units);
        }
        let mut digits = [0u8; 20];
        let prefix = decimal(units as u64, &mut digits);
        let mut frame = Vec::with_capacity(prefix.len() + 1 + json.len());
        frame.extend_from_slice(prefix);
        frame.push(b'#');
        frame.extend_from_slice(json);
        Ok(frame)
    })
}

/// The frame of a binary codec's body (`encode` writes it): `<byte length>#<body>`; the body's
/// length when it is longer than `max_bytes`, or the codec's error.
pub(crate) fn framed_binary(
    max_bytes: usize,
    encode: impl FnOnce(&mut Vec<u8>) -> Result<(), CodecError>,
) -> Result<Result<Vec<u8>, usize>, CodecError> {
    with_scratch(|body| {
        encode(body)?;
        if body.len() > max_bytes {
            return Ok(Err(body.len()));
        }
        let mut digits = [0u8; 20];
        let prefix = decimal(body.len() as u64, &mut digits);
        let mut frame = Vec::with_capacity(prefix.len() + 1 + body.len());
        frame.extend_from_slice(prefix);
        frame.push(b'#');
        frame.extend_from_slice(body);
        Ok(Ok(frame))
    })
}

/// `<utf16 length>#<json>` in one buffer.
#[cfg(test)]
pub(crate) fn frame(json: &[u8]) -> Bytes {
    let mut out = BytesMut::new();
    put_frame(&mut out, json);
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(codec: &mut JsonFrameCodec, input: &[u8]) -> Result<Vec<String>, FrameError> {
        let mut buffer = BytesMut::from(input);
        let mut frames = Vec::new();
        while let Some(frame) = codec.decode(&mut buffer)? {
            frames.push(String::from_utf8(frame.to_vec()).unwrap());
        }
        Ok(frames)
    }

    #[test]
    fn a_byte_counting_codec_takes_any_bytes_split_anywhere_and_checks_its_limit() {
        let body = [0xff_u8, 0x00, b'#', 0xc3, 0x28, 0x81];
        let mut wire = BytesMut::new();
        JsonFrameCodec::counting_bytes(6)
            .encode(Bytes::copy_from_slice(&body), &mut wire)
            .unwrap();
        assert_eq!(&wire[..2], b"6#");
        let wire = [&wire[..], &wire[..]].concat();
        for cut in 0..wire.len() {
            let mut codec = JsonFrameCodec::counting_bytes(6);
            let mut buffer = BytesMut::from(&wire[..cut]);
            let mut frames = Vec::new();
            while let Some(frame) = codec.decode(&mut buffer).unwrap() {
                frames.push(frame);
            }
            buffer.extend_from_slice(&wire[cut..]);
            while let Some(frame) = codec.decode(&mut buffer).unwrap() {
                frames.push(frame);
            }
            assert_eq!(frames, [&body[..], &body[..]], "cut at {cut}");
        }
        assert!(matches!(
            JsonFrameCodec::counting_bytes(5).decode(&mut BytesMut::from(&b"6#"[..])),
            Err(FrameError::TooLarge {
                declared: 6,
                max: 5
            })
        ));
        assert!(matches!(
            JsonFrameCodec::counting_bytes(5)
                .encode(Bytes::copy_from_slice(&body), &mut BytesMut::new()),
            Err(FrameError::TooLarge {
                declared: 6,
                max: 5
            })
        ));
        let framed = framed_binary(6, |out| {
            out.extend_from_slice(&body);
            Ok(())
        });
        assert_eq!(framed.unwrap().unwrap(), wire[..wire.len() / 2].to_vec());
        let framed = framed_binary(5, |out| {
            out.extend_from_slice(&body);
            Ok(())
        });
        assert_eq!(framed.unwrap(), Err(6));
    }

    #[test]
    fn counts_utf16_units_not_bytes() {
        let json = r#"{"pattern":"e","data":"é😀","id":"u"}"#;
        assert_eq!(json.encode_utf16().count(), 37);
        assert_eq!(utf16_len(json.as_bytes()), 37);
        assert_eq!(json.len(), 40);
        assert_eq!(&frame(json.as_bytes())[..3], b"37#");
    }

    #[test]
    fn decodes_coalesced_frames() {
        let mut codec = JsonFrameCodec::new(1 << 20);
        let frames = decode_all(&mut codec, b"2#{}4#null1#1").unwrap();
        assert_eq!(frames, ["{}", "null", "1"]);
    }

    #[test]
    fn rejects_bad_prefixes_and_oversized_frames() {
        let mut codec = JsonFrameCodec::new(100);
        assert!(
            matches!(decode_all(&mut codec, b"abc#{}"), Err(FrameError::CorruptedLength(raw)) if raw == "abc")
        );
        let mut codec = JsonFrameCodec::new(100);
        assert!(matches!(
            decode_all(&mut codec, b"#{}"),
            Err(FrameError::CorruptedLength(_))
        ));
        let mut codec = JsonFrameCodec::new(100);
        assert!(matches!(
            decode_all(&mut codec, b"12345678901#"),
            Err(FrameError::CorruptedLength(_))
        ));
        let mut codec = JsonFrameCodec::new(100);
        assert!(matches!(
            decode_all(&mut codec, b"101#"),
            Err(FrameError::TooLarge {
                declared: 101,
                max: 100
            })
        ));
        // Still waiting for the rest of a valid prefix.
        let mut codec = JsonFrameCodec::new(100);
        assert!(decode_all(&mut codec, b"12").unwrap().is_empty());
    }

    #[test]
    fn length_prefix_edges() {
        // A peer that stops right after `N#`: waiting for the body, mid-frame.
        let mut codec = JsonFrameCodec::new(100);
        let mut buffer = BytesMut::from(&b"5#"[..]);
        assert!(codec.decode(&mut buffer).unwrap().is_none());
        assert!(codec.is_mid_frame());
        assert_eq!(codec.frame_bytes_at_least(&buffer).unwrap(), Some(5));
        // A declared length equal to the maximum is accepted...
        let mut codec = JsonFrameCodec::new(4);
        assert_eq!(decode_all(&mut codec, b"4#null").unwrap(), ["null"]);
        // ...one more is not.
        let mut codec = JsonFrameCodec::new(4);
        assert!(matches!(
            decode_all(&mut codec, b"5#"),
            Err(FrameError::TooLarge {
                declared: 5,
                max: 4
            })
        ));
        // Ten digits are a length (too large here), not a corrupted one.
        let mut codec = JsonFrameCodec::new(100);
        assert!(matches!(
            decode_all(&mut codec, b"9999999999#"),
            Err(FrameError::TooLarge {
                declared: 9_999_999_999,
                max: 100
            })
        ));
        assert!(matches!(
            JsonFrameCodec::new(100).frame_bytes_at_least(b"9999999999#"),
            Err(FrameError::TooLarge { .. })
        ));
        // Ten digits and nothing after yet: still a possible prefix.
        let mut codec = JsonFrameCodec::new(100);
        assert!(decode_all(&mut codec, b"1234567890").unwrap().is_empty());
        assert_eq!(codec.frame_bytes_at_least(b"1234567890").unwrap(), None);
        // Eleven digits are rejected at once, without waiting for a `#`.
        let mut codec = JsonFrameCodec::new(100);
        assert!(matches!(
            decode_all(&mut codec, b"12345678901"),
            Err(FrameError::CorruptedLength(raw)) if raw == "12345678901"
        ));
        assert!(matches!(
            JsonFrameCodec::new(100).frame_bytes_at_least(b"12345678901"),
            Err(FrameError::CorruptedLength(_))
        ));
        // The whole frame's bytes, prefix included, once the prefix is known.
        assert_eq!(
            JsonFrameCodec::new(100)
                .frame_bytes_at_least(b"12#{")
                .unwrap(),
            Some(15)
        );
    }

    #[test]
    fn the_maximum_is_inclusive_when_writing_too() {
        let mut codec = JsonFrameCodec::new(4);
        assert_eq!(codec.max_units(), 4);
        assert!(format!("{codec:?}").contains("max_units: 4"));
        let mut out = BytesMut::new();
        codec.encode(Bytes::from_static(b"null"), &mut out).unwrap();
        assert_eq!(&out[..], b"4#null");
        assert!(matches!(
            codec.encode(Bytes::from_static(b"false"), &mut out),
            Err(FrameError::TooLarge {
                declared: 5,
                max: 4
            })
        ));
        assert_eq!(
            framed(4, |json| json.extend_from_slice(b"true")).unwrap(),
            b"4#true"
        );
        assert_eq!(framed(4, |json| json.extend_from_slice(b"false")), Err(5));
    }

    #[test]
    fn an_io_error_is_the_source_of_a_frame_error() {
        use std::error::Error as _;
        let error = FrameError::from(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "reset by peer",
        ));
        let source = error.source().expect("the I/O error");
        assert_eq!(source.to_string(), "reset by peer");
        assert_eq!(error.to_string(), "socket error: reset by peer");
        assert!(FrameError::SplitCharacter.source().is_none());
        assert!(FrameError::CorruptedLength("x".into()).source().is_none());
    }

    #[test]
    fn a_length_ending_inside_a_surrogate_pair_is_an_error() {
        let mut codec = JsonFrameCodec::new(100);
        let emoji = "😀".as_bytes();
        let mut input = b"1#".to_vec();
        input.extend_from_slice(emoji);
        assert!(matches!(
            decode_all(&mut codec, &input),
            Err(FrameError::SplitCharacter)
        ));
    }
}

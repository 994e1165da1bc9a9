//! A fast reader for the packets the envelope carries, in front of `serde_json`.
//!
//! Most of a small packet's cost under `serde_json` is the machinery around each field (a
//! visitor per key, a raw value per field, a second parse of `headers`), not the bytes. This
//! reader walks the bytes once and finds each field's raw text, checking the JSON grammar as it
//! goes, and checks the frame as UTF-8 only if it holds a byte that is not ASCII.
//!
//! It is conservative by design: it answers only for input `serde_json` accepts, and then with
//! the fields `serde_json` reads from it. Anything else — invalid JSON or UTF-8, an escape in a
//! key, a `\u` escape anywhere, nesting deeper than [`MAX_DEPTH`] — makes it answer `None`, and
//! the caller asks `serde_json`, which gives the same fields or the error. The tests hold the two
//! readers to that on generated and mutated packets.

/// Deeper values are left to `serde_json` (whose own limit is 128).
const MAX_DEPTH: u32 = 64;

/// A packet's fields as raw JSON text, without the whitespace around them. `Some` means present
/// (even `null`); a key that appears twice keeps its last value, as `JSON.parse` does.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Fields<'a> {
    pub(super) pattern: Option<&'a [u8]>,
    pub(super) data: Option<&'a [u8]>,
    pub(super) id: Option<&'a [u8]>,
    pub(super) response: Option<&'a [u8]>,
    pub(super) err: Option<&'a [u8]>,
    pub(super) is_disposed: Option<&'a [u8]>,
    pub(super) headers: Option<&'a [u8]>,
    /// `Some` when `headers` held nothing but the deadline's header (`Some(None)`: nothing at
    /// all), read on the way; `None` leaves `headers` to be read.
    pub(super) deadline: Option<Option<u64>>,
}

impl<'a> Fields<'a> {
    /// Where the value of `key` goes (the last occurrence wins); `None` for a key that is not
    /// one of NestJS's fields.
    pub(super) fn slot(&mut self, key: Key) -> Option<&mut Option<&'a [u8]>> {
        match key {
            Key::Pattern => Some(&mut self.pattern),
            Key::Data => Some(&mut self.data),
            Key::Id => Some(&mut self.id),
            Key::Response => Some(&mut self.response),
            Key::Err => Some(&mut self.err),
            Key::IsDisposed => Some(&mut self.is_disposed),
            Key::Headers => Some(&mut self.headers),
            Key::Other => None,
        }
    }
}

/// The fields of `frame`, a JSON object; `None` when this reader leaves `frame` to `serde_json`.
/// `deadline_header` names the header [`Fields::deadline`] looks for.
pub(super) fn packet<'a>(frame: &'a [u8], deadline_header: &str) -> Option<Fields<'a>> {
    let mut cursor = Cursor::new(frame);
    cursor.whitespace();
    cursor.expect(b'{')?;
    let mut fields = Fields::default();
    cursor.whitespace();
    if !cursor.eat(b'}') {
        loop {
            // Any key `known_key` does not know is another key: each of the packet's keys, unescaped,
            // is one it knows.
            let key = match cursor.known_key() {
                Some(key) => key,
                None => {
                    cursor.plain_string()?;
                    Key::Other
                }
            };
            cursor.whitespace();
            cursor.expect(b':')?;
            cursor.whitespace();
            let start = cursor.at;
            if let Key::Headers = key {
                let mut probe = cursor;
                fields.deadline = probe.deadline_only(deadline_header);
                match fields.deadline {
                    Some(_) => cursor = probe,
                    None => cursor.value(1)?,
                }
            } else {
                cursor.value(1)?;
            }
            if let Some(slot) = fields.slot(key) {
                *slot = Some(&frame[start..cursor.at]);
            }
            if !cursor.next_member(b'}')? {
                break;
            }
        }
    }
    cursor.whitespace();
    cursor.at_end().then_some(fields)
}

/// The milliseconds of a `headers` object whose only member is the deadline's header (named
/// `name`, in any case), as a string of digits or a whole number: `Some(None)` for `{}`,
/// `Some(Some(ms))` for the deadline; `None` for anything else, left to `serde_json`.
#[cfg(test)]
pub(super) fn deadline_only(raw: &str, name: &str) -> Option<Option<u64>> {
    let mut cursor = Cursor::new(raw.as_bytes());
    let deadline = cursor.deadline_only(name)?;
    cursor.at_end().then_some(deadline)
}

/// A key of a packet: one of NestJS's fields, or another (whose value is checked, then dropped).
#[derive(Clone, Copy)]
pub(super) enum Key {
    Pattern,
    Data,
    Id,
    Response,
    Err,
    IsDisposed,
    Headers,
    Other,
}

#[derive(Clone, Copy)]
struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
    /// The whole frame is known to be UTF-8: checked when the first byte that is not ASCII
    /// turned up (before that, every byte read was ASCII, and any byte outside a string that is
    /// not ASCII is no JSON).
    utf8: bool,
}

impl<'a> Cursor<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Cursor {
            bytes,
            at: 0,
            utf8: false,
        }
    }

    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.at).copied()
    }

    fn at_end(&self) -> bool {
        self.at == self.bytes.len()
    }

    /// JSON's whitespace is these four bytes.
    #[inline(always)]
    fn whitespace(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.at += 1;
        }
    }

    fn eat(&mut self, byte: u8) -> bool {
        let found = self.peek() == Some(byte);
        self.at += usize::from(found);
        found
    }

    fn expect(&mut self, byte: u8) -> Option<()> {
        self.eat(byte).then_some(())
    }

    /// After a member or an element: `true` at a `,` (and the whitespace after it), `false` at
    /// `close`.
    #[inline(always)]
    fn next_member(&mut self, close: u8) -> Option<bool> {
        self.whitespace();
        match self.peek()? {
            b',' => {
                self.at += 1;
                self.whitespace();
                Some(true)
            }
            byte if byte == close => {
                self.at += 1;
                Some(false)
            }
            _ => None,
        }
    }

    /// The key at the cursor when its bytes are one of the packet's keys, quoted, exactly: the
    /// keys NestJS and palisade write, compared whole rather than read as strings. Any other
    /// key (or one with an escape, which `serde_json` reads) is left to
    /// [`plain_string`](Self::plain_string).
    #[inline(always)]
    fn known_key(&mut self) -> Option<Key> {
        let rest = self.bytes.get(self.at..)?;
        let (quoted, key): (&[u8], Key) = match rest.get(1)? {
            b'p' => (b"\"pattern\"", Key::Pattern),
            b'd' => (b"\"data\"", Key::Data),
            b'i' if rest.get(2) == Some(&b'd') => (b"\"id\"", Key::Id),
            b'i' => (b"\"isDisposed\"", Key::IsDisposed),
            b'r' => (b"\"response\"", Key::Response),
            b'e' => (b"\"err\"", Key::Err),
            b'h' => (b"\"headers\"", Key::Headers),
            _ => return None,
        };
        rest.starts_with(quoted).then(|| {
            self.at += quoted.len();
            key
        })
    }

    /// [`deadline_only`] at the cursor, which it leaves after the object when it answers.
    fn deadline_only(&mut self, name: &str) -> Option<Option<u64>> {
        self.expect(b'{')?;
        self.whitespace();
        if self.eat(b'}') {
            return Some(None);
        }
        let key = self.plain_string()?;
        if key != name.as_bytes() && !key.eq_ignore_ascii_case(name.as_bytes()) {
            return None;
        }
        self.whitespace();
        self.expect(b':')?;
        self.whitespace();
        let quoted = self.eat(b'"');
        let start = self.at;
        let digits = self.digits();
        // Twenty digits may not fit a u64; `serde_json` decides those.
        if digits == 0 || digits > 19 || (quoted && !self.eat(b'"')) {
            return None;
        }
        let millis = &self.bytes[start..start + digits];
        // A number's leading zero is no JSON; a string's is only a digit.
        if !quoted && digits > 1 && millis[0] == b'0' {
            return None;
        }
        self.whitespace();
        self.expect(b'}')?;
        Some(Some(
            millis
                .iter()
                .fold(0, |n, digit| n * 10 + u64::from(digit - b'0')),
        ))
    }

    /// Moves to the first quote, backslash or control character from the cursor on (or the
    /// end), eight bytes at a time: a string's plain run. Stops at a byte that is not ASCII too,
    /// until the frame is known to be UTF-8; `false` if it is not.
    #[inline(always)]
    fn plain_run(&mut self) -> bool {
        const ONES: u64 = u64::from_ne_bytes([1; 8]);
        const HIGHS: u64 = ONES << 7;
        loop {
            let high = if self.utf8 { 0 } else { HIGHS };
            let mut stopped = false;
            while let Some(chunk) = self.bytes.get(self.at..self.at + 8) {
                let word = u64::from_le_bytes(chunk.try_into().expect("eight bytes"));
                let quote = word ^ (ONES * u64::from(b'"'));
                let backslash = word ^ (ONES * u64::from(b'\\'));
                // A byte of `x` is zero, or below 0x20, where `x - ONES` (`x - 0x20..`) borrows
                // into its high bit while `x`'s was clear. Borrows only flag bytes after the
                // first real one, so the lowest flag is exact. A byte with its high bit set is
                // not ASCII.
                let special = ((quote.wrapping_sub(ONES) & !quote)
                    | (backslash.wrapping_sub(ONES) & !backslash)
                    | (word.wrapping_sub(ONES * 0x20) & !word)
                    | (word & high))
                    & HIGHS;
                if special != 0 {
                    self.at += (special.trailing_zeros() / 8) as usize;
                    stopped = true;
                    break;
                }
                self.at += 8;
            }
            // The last bytes, fewer than eight.
            while !stopped
                && self.peek().is_some_and(|byte| {
                    byte != b'"' && byte != b'\\' && byte >= 0x20 && (self.utf8 || byte < 0x80)
                })
            {
                self.at += 1;
            }
            match self.peek() {
                Some(byte) if byte >= 0x80 => {
                    if std::str::from_utf8(self.bytes).is_err() {
                        return false;
                    }
                    self.utf8 = true;
                }
                _ => return true,
            }
        }
    }

    /// A string with no escape in it, at its opening quote; its bytes.
    #[inline(always)]
    fn plain_string(&mut self) -> Option<&'a [u8]> {
        self.expect(b'"')?;
        let start = self.at;
        if !self.plain_run() || self.peek()? != b'"' {
            return None;
        }
        let text = &self.bytes[start..self.at];
        self.at += 1;
        Some(text)
    }

    /// A string at its opening quote, with the escapes `serde_json` accepts but `\u`.
    #[inline(always)]
    fn string(&mut self) -> Option<()> {
        self.expect(b'"')?;
        loop {
            if !self.plain_run() {
                return None;
            }
            match self.peek()? {
                b'"' => break,
                b'\\' => {
                    self.at += 1;
                    match self.peek()? {
                        b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => self.at += 1,
                        _ => return None,
                    }
                }
                _ => return None,
            }
        }
        self.at += 1;
        Some(())
    }

    fn digits(&mut self) -> usize {
        let start = self.at;
        while self.peek().is_some_and(|byte| byte.is_ascii_digit()) {
            self.at += 1;
        }
        self.at - start
    }

    /// `-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`. What may follow is the container's
    /// business: a digit after a leading `0` is no separator, so `01` fails there.
    fn number(&mut self) -> Option<()> {
        self.eat(b'-');
        match self.peek()? {
            b'0' => self.at += 1,
            b'1'..=b'9' => {
                self.digits();
            }
            _ => return None,
        }
        if self.eat(b'.') && self.digits() == 0 {
            return None;
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.at += 1;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.at += 1;
            }
            if self.digits() == 0 {
                return None;
            }
        }
        Some(())
    }

    fn literal(&mut self, word: &[u8]) -> Option<()> {
        let end = self.at + word.len();
        (self.bytes.get(self.at..end)? == word).then(|| self.at = end)
    }

    /// Any JSON value at the cursor, `depth` containers deep.
    fn value(&mut self, depth: u32) -> Option<()> {
        match self.peek()? {
            b'"' => self.string(),
            b'-' | b'0'..=b'9' => self.number(),
            b't' => self.literal(b"true"),
            b'f' => self.literal(b"false"),
            b'n' => self.literal(b"null"),
            b'{' if depth < MAX_DEPTH => {
                self.at += 1;
                self.whitespace();
                if self.eat(b'}') {
                    return Some(());
                }
                loop {
                    self.string()?;
                    self.whitespace();
                    self.expect(b':')?;
                    self.whitespace();
                    self.value(depth + 1)?;
                    if !self.next_member(b'}')? {
                        return Some(());
                    }
                }
            }
            b'[' if depth < MAX_DEPTH => {
                self.at += 1;
                self.whitespace();
                if self.eat(b']') {
                    return Some(());
                }
                loop {
                    self.value(depth + 1)?;
                    if !self.next_member(b']')? {
                        return Some(());
                    }
                }
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::envelope::{deadline_by_serde, fields_by_serde};
    use super::*;
    use proptest::prelude::*;

    const DEADLINE: &str = crate::rpc::TIMEOUT_HEADER;

    fn read(text: &str) -> Option<Fields<'_>> {
        packet(text.as_bytes(), DEADLINE)
    }

    fn raw(text: &str) -> Option<&[u8]> {
        Some(text.as_bytes())
    }

    #[test]
    fn reads_the_packets_palisade_and_nestjs_write() {
        let request = r#"{"pattern":"echo","data":{"a":[1,-2.5e3,true,null,"x\"y"]},"id":"12","headers":{"palisade-timeout-ms":"4999"}}"#;
        assert_eq!(
            read(request),
            Some(Fields {
                pattern: raw(r#""echo""#),
                data: raw(r#"{"a":[1,-2.5e3,true,null,"x\"y"]}"#),
                id: raw(r#""12""#),
                headers: raw(r#"{"palisade-timeout-ms":"4999"}"#),
                deadline: Some(Some(4999)),
                ..Fields::default()
            })
        );
        let reply = " {\"response\" : 7 ,\n\"isDisposed\":true,\"id\":\"12\",\"id\":3}\t";
        assert_eq!(
            read(reply),
            Some(Fields {
                response: raw("7"),
                is_disposed: raw("true"),
                id: raw("3"),
                ..Fields::default()
            })
        );
        assert_eq!(read("{}"), Some(Fields::default()));
        assert_eq!(
            read(r#"{"other":{"deep":[[]]},"err":"é"}"#),
            Some(Fields {
                err: raw(r#""é""#),
                ..Fields::default()
            })
        );
    }

    #[test]
    fn leaves_to_serde_json_what_it_does_not_read_itself() {
        for text in [
            r#"{"pattern":"a","data":1"#,
            r#"{"pattern":"a",}"#,
            r#"{"pattern":"a"} x"#,
            r#"{"pat\u0074ern":"a"}"#,
            r#"{"pattern":"\u0061"}"#,
            r#"{"data":01}"#,
            r#"{"data":1.}"#,
            r#"{"data":1e}"#,
            r#"{"data":-}"#,
            r#"{"data":tru}"#,
            r#"{"data":[1,]}"#,
            r#"{"data":1]"#,
            r#"{"data":[1}}"#,
            r#"{"data":{"a":1]}"#,
            r#"{"data":1 x"#,
            r#"{"data":1,"headers":{"palisade-timeout-ms":017}}"#,
            r#"{"a\:1}"#,
            "{\"a\u{1}:1}",
            r#"{"data":{1:2}}"#,
            "{\"data\":\"a\u{1}b\"}",
            r#"{"data":"\x"}"#,
            "[1]",
        ] {
            assert_eq!(read(text), None, "{text}");
        }
        // `data` is one deep; its values may nest to MAX_DEPTH, arrays and objects alike.
        let arrays = |n: usize| format!("{{\"data\":{}{}}}", "[".repeat(n), "]".repeat(n));
        let objects = |n: usize| format!("{{\"data\":{}1{}}}", "{\"a\":".repeat(n), "}".repeat(n));
        for nested in [arrays, objects] {
            assert!(read(&nested(MAX_DEPTH as usize - 1)).is_some());
            assert_eq!(read(&nested(MAX_DEPTH as usize)), None);
            assert_eq!(read(&nested(200)), None);
        }
    }

    #[test]
    fn a_plain_run_stops_at_the_first_quote_backslash_or_control_character() {
        for length in 0..24 {
            for special in [b'"', b'\\', 0x00, 0x1f] {
                for after in [b'a', b'"', 0x01] {
                    // Bytes that look special to a careless word trick: 0x20, 0x7f, 0xa0, 0xe9.
                    let mut bytes: Vec<u8> =
                        (0..length).map(|i| [b'a', b' ', 0x7f][i % 3]).collect();
                    bytes.push(special);
                    bytes.push(after);
                    bytes.extend_from_slice("é\u{a0}".as_bytes());
                    let text = String::from_utf8(bytes).unwrap();
                    let mut cursor = Cursor::new(text.as_bytes());
                    assert!(cursor.plain_run());
                    assert_eq!(cursor.at, length, "{text:?}");
                }
            }
        }
        let mut cursor = Cursor::new("abcdefghijé\u{a0}klm".as_bytes());
        assert!(cursor.plain_run());
        assert!(cursor.at_end());
        let mut cursor = Cursor::new(b"abc\xe9z\"");
        assert!(!cursor.plain_run(), "not UTF-8");
    }

    #[test]
    fn leaves_bytes_that_are_not_utf8_to_serde_json() {
        for frame in [
            b"{\"data\":\"\x80\"}".as_slice(),
            b"{\"data\":\"abcdefgh\xff\"}",
            b"{\"d\xc3\":1}",
            b"{\"data\":\"\xe9t\xc3\xa9\"}",
        ] {
            assert_eq!(packet(frame, DEADLINE), None, "{frame:?}");
        }
        let text = "{\"data\":\"\u{e9}t\u{e9}\"}";
        assert_eq!(read(text).unwrap().data, raw("\"\u{e9}t\u{e9}\""));
    }

    #[test]
    fn reads_a_deadline_alone_and_leaves_the_rest() {
        assert_eq!(deadline_only("{}", DEADLINE), Some(None));
        assert_eq!(
            deadline_only(r#"{"palisade-timeout-ms":"4999"}"#, DEADLINE),
            Some(Some(4999))
        );
        assert_eq!(
            deadline_only(r#"{ "Palisade-Timeout-MS" : 17 }"#, DEADLINE),
            Some(Some(17))
        );
        assert_eq!(
            deadline_only(r#"{"palisade-timeout-ms":0}"#, DEADLINE),
            Some(Some(0))
        );
        assert_eq!(
            deadline_only(r#"{"palisade-timeout-ms":"007"}"#, DEADLINE),
            Some(Some(7))
        );
        // Nineteen digits always fit a u64.
        assert_eq!(
            deadline_only(r#"{"palisade-timeout-ms":"9999999999999999999"}"#, DEADLINE),
            Some(Some(9_999_999_999_999_999_999))
        );
        for other in [
            r#"{"palisade-timeout-ms":"4999","a":"b"}"#,
            r#"{"a":"b"}"#,
            r#"{"palisade-timeout-ms":"12345678901234567890"}"#,
            r#"{"palisade-timeout-ms":"-1"}"#,
            r#"{"palisade-timeout-ms":" 1"}"#,
            r#"{"palisade-timeout-ms":1.5}"#,
            r#"{"palisade-timeout-ms":""}"#,
            r#"{"palisade-timeout-ms":null}"#,
            "7",
        ] {
            assert_eq!(deadline_only(other, DEADLINE), None, "{other}");
        }
    }

    /// A JSON value as text, with whitespace here and there.
    fn json_value() -> impl Strategy<Value = String> {
        let space = prop::sample::select(vec!["", "", " ", "\n", "\t "]);
        let leaf = prop_oneof![
            Just("null".to_owned()),
            Just("true".to_owned()),
            Just("false".to_owned()),
            any::<i64>().prop_map(|n| n.to_string()),
            any::<f64>().prop_map(|n| serde_json::to_string(&n).unwrap()),
            prop::sample::select(vec![
                "0",
                "-0",
                "1e5",
                "2.50E-3",
                "-7.0e+2",
                "123456789012345678901234"
            ])
            .prop_map(str::to_owned),
            "[a-z\"\\\\/é€\u{1F600}\n\t]{0,6}".prop_map(|s| serde_json::to_string(&s).unwrap()),
        ];
        leaf.prop_recursive(4, 24, 4, move |inner| {
            let space = space.clone();
            prop_oneof![
                (prop::collection::vec(inner.clone(), 0..4), space.clone())
                    .prop_map(|(items, s)| format!("[{s}{}{s}]", items.join(&format!("{s},")))),
                (prop::collection::vec(("[a-z]{0,4}", inner), 0..4), space).prop_map(
                    |(members, s)| {
                        let members: Vec<String> = members
                            .into_iter()
                            .map(|(key, value)| format!("\"{key}\"{s}:{s}{value}"))
                            .collect();
                        format!("{{{s}{}}}", members.join(","))
                    }
                ),
            ]
        })
    }

    /// A packet: some of NestJS's keys (and others, repeated or not) with any values.
    fn json_packet() -> impl Strategy<Value = String> {
        let key = prop::sample::select(vec![
            "pattern",
            "data",
            "id",
            "response",
            "err",
            "isDisposed",
            "headers",
            "status",
            "x",
        ]);
        let headers = prop_oneof![
            json_value(),
            Just(r#"{"palisade-timeout-ms":"4999"}"#.to_owned()),
            (0u64..u64::MAX).prop_map(|n| format!(r#"{{"PALISADE-timeout-ms" : {n} }}"#)),
            "[0-9 -]{0,21}".prop_map(|n| format!(r#"{{"palisade-timeout-ms":"{n}"}}"#)),
            Just(r#"{"palisade-timeout-ms":"1","trace":"t"}"#.to_owned()),
        ];
        prop::collection::vec((key, json_value(), headers), 0..6).prop_map(|members| {
            let members: Vec<String> = members
                .into_iter()
                .map(|(key, value, headers)| {
                    let value = if key == "headers" { headers } else { value };
                    format!("\"{key}\":{value}")
                })
                .collect();
            format!("{{{}}}", members.join(","))
        })
    }

    /// `text` with one byte-level edit at `at`: a byte dropped, or one of JSON's own inserted.
    fn mutated(frame: &[u8], at: usize, edit: u8) -> Vec<u8> {
        let mut bytes = frame.to_vec();
        let at = at % (bytes.len() + 1);
        const INSERTS: &[u8] = b"{}[]\":,\\u0-.eE+ \x01\x7fn\x80\xff";
        match edit as usize % (INSERTS.len() + 1) {
            0 if at < bytes.len() => {
                bytes.remove(at);
            }
            0 => {}
            i => bytes.insert(at, INSERTS[i - 1]),
        }
        bytes
    }

    /// What the fast reader answers, `serde_json` answers too.
    fn agrees_with_serde(frame: &[u8]) -> Result<(), TestCaseError> {
        if let Some(fields) = packet(frame, DEADLINE) {
            let text = std::str::from_utf8(frame);
            prop_assert!(text.is_ok(), "read bytes that are not UTF-8: {frame:?}");
            let text = text.unwrap();
            let by_serde = fields_by_serde(text);
            prop_assert!(
                by_serde.is_ok(),
                "serde_json rejects {text:?}: {by_serde:?}"
            );
            let deadline = fields.deadline;
            prop_assert_eq!(
                Ok(&Fields {
                    deadline: None,
                    ..fields
                }),
                by_serde.as_ref().map_err(|_| ())
            );
            if let Some(timeout_ms) = deadline {
                let headers = std::str::from_utf8(by_serde.unwrap().headers.unwrap()).unwrap();
                prop_assert_eq!(Some(timeout_ms), deadline_by_serde(headers), "{}", headers);
            }
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn reads_every_packet_without_u_escapes_as_serde_json_does(text in json_packet()) {
            agrees_with_serde(text.as_bytes())?;
            // Only a `\u` escape (from a generated control character) sends a valid packet to
            // serde_json.
            prop_assert!(read(&text).is_some() || text.contains("\\u"), "not read: {text:?}");
        }

        #[test]
        fn answers_for_broken_packets_only_as_serde_json_does(
            text in json_packet(),
            edits in prop::collection::vec((any::<usize>(), any::<u8>()), 1..4),
        ) {
            // Edits inside a character leave bytes that are not UTF-8: read those too.
            let mut frame = text.into_bytes();
            for (at, edit) in edits {
                frame = mutated(&frame, at, edit);
            }
            agrees_with_serde(&frame)?;
        }
    }
}

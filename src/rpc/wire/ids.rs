//! Packet ids: NestJS's 21 lowercase hex digits, made from a request number so that a reply's id
//! leads straight back to its request.

use crate::rng::SharedRng;
use std::fmt;

/// Hex digits in a packet id, as NestJS's `uid(21)` makes them.
pub const PACKET_ID_LEN: usize = 21;

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Makes packet ids for one client and reads them back.
///
/// An id is 21 lowercase hex digits, like NestJS's: 5 digits that differ between clients (so that
/// clients sharing a reply channel, as on Redis, can tell their replies apart at a glance) and 16
/// digits of the request number scrambled with a per-client salt. [`parse`](Self::parse) inverts
/// it, so a correlation map can be keyed by the request number and nothing is stored per id.
///
/// ```
/// use palisade::rpc::wire::PacketIds;
///
/// let ids = PacketIds::new();
/// let id = ids.format(42);
/// assert_eq!(id.as_str().len(), 21);
/// assert_eq!(ids.parse(id.as_str()), Some(42));
/// assert_eq!(ids.parse("not-one-of-ours"), None);
/// ```
#[derive(Clone, Copy)]
pub struct PacketIds {
    /// 20 bits, the first five digits.
    prefix: u32,
    salt: u64,
}

impl PacketIds {
    /// Ids with a random prefix and salt.
    pub fn new() -> Self {
        let seed = SharedRng::entropy();
        PacketIds::seeded(seed, crate::rng::mix(seed ^ 0x5DEE_CE66_D1CE_4E5B))
    }

    /// Ids from a fixed prefix and salt (reproducible ids for tests).
    pub fn seeded(prefix: u64, salt: u64) -> Self {
        PacketIds {
            prefix: (prefix & 0xF_FFFF) as u32,
            salt,
        }
    }

    /// The id of request `n`.
    pub fn format(&self, n: u64) -> PacketId {
        let mut id = [0u8; PACKET_ID_LEN];
        let mut digits = (u128::from(self.prefix) << 64) | u128::from(n ^ self.salt);
        for byte in id.iter_mut().rev() {
            *byte = HEX[(digits & 0xF) as usize];
            digits >>= 4;
        }
        PacketId(id)
    }

    /// The request number of an id this generator made; `None` for any other text (another
    /// client's id, or not an id at all).
    pub fn parse(&self, id: &str) -> Option<u64> {
        self.parse_bytes(id.as_bytes())
    }

    /// [`parse`](Self::parse) on the id's bytes: any byte that is not a lowercase hex digit makes
    /// it someone else's, so the text needs no UTF-8 check first.
    fn parse_bytes(&self, bytes: &[u8]) -> Option<u64> {
        if bytes.len() != PACKET_ID_LEN {
            return None;
        }
        let mut value: u128 = 0;
        for &byte in bytes {
            let digit = match byte {
                b'0'..=b'9' => byte - b'0',
                b'a'..=b'f' => byte - b'a' + 10,
                _ => return None,
            };
            value = (value << 4) | u128::from(digit);
        }
        if (value >> 64) as u32 != self.prefix {
            return None;
        }
        Some(value as u64 ^ self.salt)
    }

    /// [`parse`](Self::parse) for an id as it appears in JSON: a quoted string.
    pub fn parse_json(&self, id: &[u8]) -> Option<u64> {
        let inner = id.strip_prefix(b"\"")?.strip_suffix(b"\"")?;
        self.parse_bytes(inner)
    }
}

impl Default for PacketIds {
    fn default() -> Self {
        PacketIds::new()
    }
}

impl fmt::Debug for PacketIds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PacketIds")
            .field("prefix", &format_args!("{:05x}", self.prefix))
            .finish_non_exhaustive()
    }
}

/// One packet id, formatted on the stack.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PacketId([u8; PACKET_ID_LEN]);

impl PacketId {
    /// The id's text.
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).expect("hex digits are ASCII")
    }
}

impl fmt::Debug for PacketId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for PacketId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_21_hex_digits_that_parse_back() {
        let ids = PacketIds::seeded(0xABCDE, 0x0123_4567_89AB_CDEF);
        assert_eq!(ids.format(0).as_str(), "abcde0123456789abcdef");
        for n in [0, 1, 2, 41, u64::MAX, 1 << 63] {
            let id = ids.format(n);
            assert_eq!(id.as_str().len(), PACKET_ID_LEN);
            assert!(
                id.as_str()
                    .bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
            );
            assert_eq!(ids.parse(id.as_str()), Some(n), "{id}");
            assert_eq!(ids.parse_json(format!("\"{id}\"").as_bytes()), Some(n));
        }
        let unique: std::collections::HashSet<_> = (0..1000).map(|n| ids.format(n)).collect();
        assert_eq!(unique.len(), 1000);
    }

    #[test]
    fn debug_shows_the_prefix_and_the_id_but_never_the_salt() {
        let ids = PacketIds::seeded(0x0ABCD, 0x5A17);
        let debug = format!("{ids:?}");
        assert_eq!(debug, "PacketIds { prefix: 0abcd, .. }");
        assert!(!debug.contains("5a17"));
        let id = ids.format(1);
        assert_eq!(format!("{id:?}"), id.as_str());
        assert_eq!(format!("{id}"), id.as_str());
    }

    #[test]
    fn json_ids_that_are_not_quoted_hex_text_do_not_parse() {
        let ids = PacketIds::seeded(0x11111, 7);
        let id = ids.format(9);
        let mut bytes = format!("\"{id}\"").into_bytes();
        assert_eq!(ids.parse_json(&bytes), Some(9));
        bytes[3] = 0xff; // not UTF-8, let alone a hex digit
        assert_eq!(ids.parse_json(&bytes), None);
        assert_eq!(ids.parse_json(id.as_str().as_bytes()), None, "unquoted");
        assert_eq!(ids.parse_json(b"\"\""), None);
        let upper = format!("\"{}\"", id.as_str().to_ascii_uppercase());
        assert_eq!(ids.parse_json(upper.as_bytes()), None);
    }

    #[test]
    fn foreign_ids_do_not_parse() {
        let ours = PacketIds::seeded(0x11111, 7);
        let theirs = PacketIds::seeded(0x22222, 7);
        assert_eq!(ours.parse(theirs.format(5).as_str()), None);
        for bad in [
            "",
            "abc",
            "ABCDE0123456789ABCDEF",
            "abcde0123456789abcdeg",
            "abcde0123456789abcdef0",
        ] {
            assert_eq!(ours.parse(bad), None, "{bad:?}");
        }
        assert_eq!(ours.format(0).as_str(), "111110000000000000007");
        assert_eq!(ours.parse_json(b"111110000000000000007"), None, "unquoted");
        assert_eq!(ours.parse_json(b"\"111110000000000000007\""), Some(0));
    }
}

//! A fast hasher for maps whose keys this process chooses: routes, request numbers.
//!
//! std's SipHash resists keys chosen to collide, at about 150 instructions a short key, and a
//! request takes three to five such lookups (the router, a broker transport's channel map, the
//! correlation map). Here every key in a map was put there by this process (the routes a server
//! declared, the request numbers a client handed out); a peer only chooses what it looks up, and
//! a lookup walks at most the probe sequence of a table that holds those few keys, so a crafted
//! key cannot make the table degenerate. One folded multiply per eight bytes does.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// 2^64 / φ, odd: multiplying by it spreads every input bit over the product.
const SPREAD: u64 = 0x9E37_79B9_7F4A_7C15;

/// Both halves of the 128-bit product, mixed: a map takes its bucket from a hash's low bits and
/// its tag from the high ones, and keys that differ only in their high bits (or, like the request
/// numbers of one shard, share their low bits) must differ in both.
#[inline]
fn fold(word: u64) -> u64 {
    let product = u128::from(word) * u128::from(SPREAD);
    (product as u64) ^ ((product >> 64) as u64)
}

/// The [`Hasher`] of [`KeyMap`].
#[derive(Clone, Copy, Default)]
pub(crate) struct KeyHasher(u64);

impl Hasher for KeyHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut words = bytes.chunks_exact(8);
        for word in &mut words {
            let word: [u8; 8] = word.try_into().expect("chunks of eight bytes");
            self.0 = fold(self.0 ^ u64::from_le_bytes(word));
        }
        let rest = words.remainder();
        if !rest.is_empty() {
            let mut word = [0; 8];
            word[..rest.len()].copy_from_slice(rest);
            // The length keeps "a" apart from "a\0".
            self.0 = fold(self.0 ^ u64::from_le_bytes(word) ^ ((rest.len() as u64) << 59));
        }
    }

    #[inline]
    fn write_u8(&mut self, byte: u8) {
        self.write_u64(u64::from(byte));
    }

    #[inline]
    fn write_u64(&mut self, n: u64) {
        self.0 = fold(self.0 ^ n);
    }

    #[inline]
    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }

    #[inline]
    fn finish(&self) -> u64 {
        self.0
    }
}

/// A `HashMap` hashing with [`KeyHasher`]: for keys this process chose (see the module docs).
pub(crate) type KeyMap<K, V> = HashMap<K, V, BuildHasherDefault<KeyHasher>>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::hash::BuildHasher;

    fn spread(hashes: &[u64]) -> (usize, usize) {
        let buckets: HashSet<u64> = hashes.iter().map(|hash| hash & 0xff).collect();
        let tags: HashSet<u64> = hashes.iter().map(|hash| hash >> 57).collect();
        (buckets.len(), tags.len())
    }

    #[test]
    fn numbers_that_share_their_low_bits_spread_over_buckets_and_tags() {
        let build = BuildHasherDefault::<KeyHasher>::default();
        // The request numbers one shard of the correlation map holds.
        let hashes: Vec<u64> = (0..1024u64).map(|i| build.hash_one(i * 16 + 5)).collect();
        let (buckets, tags) = spread(&hashes);
        assert!(buckets > 200, "{buckets} of 256 buckets");
        assert!(tags > 100, "{tags} of 128 tags");
    }

    #[test]
    fn routes_spread_and_differ_from_their_neighbours() {
        let build = BuildHasherDefault::<KeyHasher>::default();
        let routes: Vec<String> = (0..1024)
            .map(|i| format!(r#"{{"cmd":"route-{i}"}}"#))
            .collect();
        let hashes: Vec<u64> = routes.iter().map(|route| build.hash_one(route)).collect();
        let (buckets, tags) = spread(&hashes);
        assert!(buckets > 200, "{buckets} of 256 buckets");
        assert!(tags > 100, "{tags} of 128 tags");
        // No two of them collide in all 64 bits, nor keys that differ only after a first full
        // word: each word must be mixed into the state, not just set its bits.
        let distinct: HashSet<u64> = hashes.iter().copied().collect();
        assert_eq!(distinct.len(), hashes.len());
        let tails: Vec<u64> = (0..4096u32)
            .map(|i| build.hash_one(format!("{{\"cmd\":{i:x}")))
            .collect();
        let distinct: HashSet<u64> = tails.iter().copied().collect();
        assert_eq!(distinct.len(), tails.len());
        // Short keys, keys that differ only in their last or first byte, and a key beside the
        // same key with a trailing zero byte all hash apart.
        let keys: [&[u8]; 8] = [
            b"",
            b"a",
            b"a\0",
            b"b",
            b"abcdefgh",
            b"abcdefgi",
            b"bbcdefgh",
            b"abcdefgh\0",
        ];
        let hashes: HashSet<u64> = keys
            .iter()
            .map(|key| {
                let mut hasher = KeyHasher::default();
                hasher.write(key);
                hasher.finish()
            })
            .collect();
        assert_eq!(hashes.len(), keys.len());
    }

    #[test]
    fn every_write_changes_the_state_and_sequences_do_not_collide() {
        let fresh = KeyHasher::default().finish();
        let writes: [fn(&mut KeyHasher); 4] = [
            |hasher| hasher.write_u8(1),
            |hasher| hasher.write_u64(1),
            |hasher| hasher.write_usize(1),
            |hasher| hasher.write(b"x"),
        ];
        for write in writes {
            let mut hasher = KeyHasher::default();
            write(&mut hasher);
            assert_ne!(hasher.finish(), fresh);
        }
        // Keys hashed as several numbers (a tuple, a length and its bytes) mix each one in.
        let build = BuildHasherDefault::<KeyHasher>::default();
        let pairs: HashSet<u64> = (0..64u64)
            .flat_map(|a| (0..64u64).map(move |b| (a, b)))
            .map(|pair| build.hash_one(pair))
            .collect();
        assert_eq!(pairs.len(), 64 * 64);
    }

    #[test]
    fn a_key_map_finds_what_it_holds() {
        let mut map: KeyMap<String, usize> = KeyMap::default();
        for i in 0..500 {
            map.insert(format!("route-{i}"), i);
        }
        for i in 0..500 {
            assert_eq!(map.get(&format!("route-{i}")), Some(&i));
        }
        assert_eq!(map.get("route-500"), None);
    }
}

//! A small, seedable random number generator shared by jitter and fault injection.
//!
//! SplitMix64: its state advances by a constant, so a generator shared between threads is one
//! `fetch_add` per draw, and a given seed always yields the same sequence of draws.

use std::sync::atomic::{AtomicU64, Ordering};

const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// The SplitMix64 output function: a well-mixed 64-bit value from any 64-bit input.
pub(crate) fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A generator shared by clones (behind an `Arc`) and threads.
#[derive(Debug)]
pub(crate) struct SharedRng {
    state: AtomicU64,
}

impl SharedRng {
    pub(crate) fn seeded(seed: u64) -> Self {
        SharedRng {
            state: AtomicU64::new(seed),
        }
    }

    /// A seed that differs between processes and between calls.
    pub(crate) fn entropy() -> u64 {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let time = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let local = 0u8;
        mix(time ^ (std::ptr::addr_of!(local) as u64) ^ COUNTER.fetch_add(GAMMA, Ordering::Relaxed))
    }

    /// A generator that continues from this one's current state, independently.
    pub(crate) fn fork(&self) -> Self {
        SharedRng::seeded(self.state.load(Ordering::Relaxed))
    }

    pub(crate) fn next_u64(&self) -> u64 {
        mix(self
            .state
            .fetch_add(GAMMA, Ordering::Relaxed)
            .wrapping_add(GAMMA))
    }
}

/// A uniform draw from `low..=high` (nanoseconds) without modulo bias.
pub(crate) fn uniform_between(random: u64, low: u64, high: u64) -> u64 {
    if high <= low {
        return low;
    }
    let span = u128::from(high - low) + 1;
    low + ((u128::from(random) * span) >> 64) as u64
}

/// A uniform draw from `[0, 1)`.
pub(crate) fn unit_interval(random: u64) -> f64 {
    (random >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_sequence() {
        let a = SharedRng::seeded(42);
        let b = SharedRng::seeded(42);
        let xs: Vec<u64> = (0..5).map(|_| a.next_u64()).collect();
        let ys: Vec<u64> = (0..5).map(|_| b.next_u64()).collect();
        assert_eq!(xs, ys);
        assert_ne!(xs[0], xs[1]);
    }

    #[test]
    fn uniform_stays_in_bounds() {
        for r in [0, 1, u64::MAX / 2, u64::MAX] {
            let x = uniform_between(r, 10, 20);
            assert!((10..=20).contains(&x));
        }
        assert_eq!(uniform_between(u64::MAX, 0, u64::MAX), u64::MAX);
        assert_eq!(uniform_between(0, 5, 5), 5);
        assert!(unit_interval(u64::MAX) < 1.0);
    }
}

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::time::Instant;

/// Units one retry costs. A request deposits `ratio * UNITS_PER_RETRY` units, rounded, so ratios
/// with up to three decimals are exact (0.6 allows exactly 6 retries per 10 requests).
const UNITS_PER_RETRY: i64 = 1000;
/// The window is kept as this many slots.
const SLOTS: u64 = 10;
const INDEX_BITS: u32 = 24;
const UNIT_BITS: u32 = 64 - INDEX_BITS;
const INDEX_MASK: u64 = (1 << INDEX_BITS) - 1;
const UNIT_MASK: u64 = (1 << UNIT_BITS) - 1;

fn pack(index: u64, units: i64) -> u64 {
    (index & INDEX_MASK) << UNIT_BITS | (units as u64 & UNIT_MASK)
}

fn unpack(word: u64) -> (u64, i64) {
    let index = word >> UNIT_BITS;
    // Sign-extend the low UNIT_BITS.
    let units = ((word << INDEX_BITS) as i64) >> INDEX_BITS;
    (index, units)
}

/// A Finagle-style retry budget: retries may be at most `ratio` of the requests seen in the last
/// `ttl`, plus a floor of `min_per_sec` retries per second so that quiet clients can still retry.
///
/// Shared by every clone of a retry policy, so a failing dependency sees at most
/// `(1 + ratio) × requests + floor` calls however many attempts each request may make: retries
/// cannot multiply an outage.
///
/// Each request deposits once (not once per attempt); each retry withdraws once. The arithmetic is
/// integer and exact — unlike `tower::retry::budget::TpsBudget`, which truncates `1 / ratio` for
/// ratios below one and so allows every request a full retry at `ratio = 0.6`
/// (tower-rs/tower#857). The window is ten slots of `ttl / 10`.
///
/// ```
/// use palisade::retry::RetryBudget;
/// use std::time::Duration;
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
/// let budget = RetryBudget::new(Duration::from_secs(10), 0, 0.6);
/// for _ in 0..10 {
///     budget.deposit();
/// }
/// let allowed = (0..10).filter(|_| budget.withdraw()).count();
/// assert_eq!(allowed, 6);
/// # }
/// ```
pub struct RetryBudget {
    epoch: Instant,
    slot_nanos: u64,
    slots: [AtomicU64; SLOTS as usize],
    reserve: i64,
    deposit: i64,
    ttl: Duration,
    min_per_sec: u32,
    ratio: f64,
}

impl RetryBudget {
    /// A budget allowing `ratio` retries per request over the last `ttl` (clamped to 1 s – 60 s),
    /// plus `min_per_sec` retries per second.
    ///
    /// # Panics
    /// If `ratio` is negative, above 1000, or not finite.
    pub fn new(ttl: Duration, min_per_sec: u32, ratio: f64) -> Self {
        assert!(
            ratio.is_finite() && (0.0..=1000.0).contains(&ratio),
            "retry budget ratio must be between 0 and 1000, got {ratio}"
        );
        let ttl = ttl.clamp(Duration::from_secs(1), Duration::from_secs(60));
        let slot_nanos = (ttl.as_nanos() / u128::from(SLOTS)) as u64;
        let reserve = i64::from(min_per_sec)
            .saturating_mul(ttl.as_secs() as i64)
            .saturating_mul(UNITS_PER_RETRY);
        RetryBudget {
            epoch: Instant::now(),
            slot_nanos,
            slots: [const { AtomicU64::new(0) }; SLOTS as usize],
            reserve,
            deposit: (ratio * UNITS_PER_RETRY as f64).round() as i64,
            ttl,
            min_per_sec,
            ratio,
        }
    }

    fn current_index(&self) -> u64 {
        let elapsed = Instant::now()
            .saturating_duration_since(self.epoch)
            .as_nanos();
        // The first slot is index SLOTS, so that an untouched slot (index 0) is never in the window.
        (elapsed / u128::from(self.slot_nanos)) as u64 + SLOTS
    }

    fn in_window(slot_index: u64, current: u64) -> bool {
        (current.wrapping_sub(slot_index) & INDEX_MASK) < SLOTS
    }

    /// Records one request (call once per request, not per attempt).
    pub fn deposit(&self) {
        if self.deposit == 0 {
            return;
        }
        let index = self.current_index();
        let slot = &self.slots[(index % SLOTS) as usize];
        let mut word = slot.load(Ordering::Relaxed);
        loop {
            let (slot_index, units) = unpack(word);
            let units = if slot_index == index & INDEX_MASK {
                units
            } else {
                0
            };
            let new = pack(index, units.saturating_add(self.deposit));
            match slot.compare_exchange_weak(word, new, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => return,
                Err(actual) => word = actual,
            }
        }
    }

    /// Takes one retry from the budget; `false` if none is left.
    pub fn withdraw(&self) -> bool {
        let index = self.current_index();
        let current = &self.slots[(index % SLOTS) as usize];
        loop {
            let current_word = current.load(Ordering::Acquire);
            let balance = self.balance_with(index, current_word);
            if balance < UNITS_PER_RETRY {
                return false;
            }
            let (slot_index, units) = unpack(current_word);
            let units = if slot_index == index & INDEX_MASK {
                units
            } else {
                0
            };
            let new = pack(index, units - UNITS_PER_RETRY);
            // Every withdrawal at this instant lands on `current`, so a concurrent one makes this
            // exchange fail and the balance is checked again: the budget is never overdrawn.
            if current
                .compare_exchange(current_word, new, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                return true;
            }
        }
    }

    fn balance_with(&self, index: u64, current_word: u64) -> i64 {
        let current_slot = (index % SLOTS) as usize;
        let mut balance = self.reserve;
        for (i, slot) in self.slots.iter().enumerate() {
            let word = if i == current_slot {
                current_word
            } else {
                slot.load(Ordering::Acquire)
            };
            let (slot_index, units) = unpack(word);
            if Self::in_window(slot_index, index & INDEX_MASK) {
                balance = balance.saturating_add(units);
            }
        }
        balance
    }

    /// How many retries the budget would allow right now.
    pub fn remaining(&self) -> u64 {
        let index = self.current_index();
        let word = self.slots[(index % SLOTS) as usize].load(Ordering::Acquire);
        (self.balance_with(index, word).max(0) / UNITS_PER_RETRY) as u64
    }
}

impl fmt::Debug for RetryBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryBudget")
            .field("ttl", &self.ttl)
            .field("min_per_sec", &self.min_per_sec)
            .field("ratio", &self.ratio)
            .field("remaining", &self.remaining())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packing_round_trips_negative_units() {
        for units in [0i64, 1, -1, 1000, -1000, (1 << 38), -(1 << 38)] {
            assert_eq!(unpack(pack(12345, units)), (12345, units));
        }
    }
}

use std::cell::Cell;
use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;
use tokio::time::Instant;

/// Units one retry costs. A request deposits `ratio * UNITS_PER_RETRY` units, rounded, so ratios
/// with up to three decimals are exact (0.6 allows exactly 6 retries per 10 requests).
const UNITS_PER_RETRY: i64 = 1000;
/// The window is kept as this many slots.
const SLOTS: u64 = 10;
/// Deposits are spread over this many stripes (each on its own cache line), so threads that
/// deposit at once do not contend for one word.
const STRIPES: usize = 8;
const INDEX_BITS: u32 = 24;
const UNIT_BITS: u32 = 64 - INDEX_BITS;
const INDEX_MASK: u64 = (1 << INDEX_BITS) - 1;
const UNIT_MASK: u64 = (1 << UNIT_BITS) - 1;
/// The units a slot holds at most (and at least, negated): its signed `UNIT_BITS`-bit range.
const SLOT_UNITS_MAX: i64 = (1 << (UNIT_BITS - 1)) - 1;

fn pack(index: u64, units: i64) -> u64 {
    (index & INDEX_MASK) << UNIT_BITS | (units as u64 & UNIT_MASK)
}

fn unpack(word: u64) -> (u64, i64) {
    let index = word >> UNIT_BITS;
    // Sign-extend the low UNIT_BITS.
    let units = ((word << INDEX_BITS) as i64) >> INDEX_BITS;
    (index, units)
}

/// One window of slots, alone on its cache line(s).
#[repr(align(128))]
struct Window {
    slots: [AtomicU64; SLOTS as usize],
}

impl Window {
    const fn new() -> Self {
        Window {
            slots: [const { AtomicU64::new(0) }; SLOTS as usize],
        }
    }

    /// Adds `units` to the slot of `index`, starting it afresh if it held an older index.
    fn add(&self, index: u64, units: i64) {
        let slot = &self.slots[(index % SLOTS) as usize];
        let mut word = slot.load(Ordering::Relaxed);
        loop {
            // Clamped to what the slot can hold: a sum beyond it would wrap to a negative
            // balance (at ratio 1000, after about 550 000 requests in one slot of one stripe),
            // and the budget would then refuse every retry.
            let sum = current_units(word, index).saturating_add(units);
            let new = pack(index, sum.clamp(-SLOT_UNITS_MAX, SLOT_UNITS_MAX));
            match slot.compare_exchange_weak(word, new, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => return,
                Err(actual) => word = actual,
            }
        }
    }

    /// The units of the slots within the window ending at `index`; the slot of `index` is read
    /// from `current_word` if given.
    fn sum(&self, index: u64, current_word: Option<u64>) -> i64 {
        let current_slot = (index % SLOTS) as usize;
        let mut total = 0i64;
        for (i, slot) in self.slots.iter().enumerate() {
            let word = match current_word {
                Some(word) if i == current_slot => word,
                _ => slot.load(Ordering::Acquire),
            };
            let (slot_index, units) = unpack(word);
            if in_window(slot_index, index & INDEX_MASK) {
                total = total.saturating_add(units);
            }
        }
        total
    }
}

fn current_units(word: u64, index: u64) -> i64 {
    let (slot_index, units) = unpack(word);
    if slot_index == index & INDEX_MASK {
        units
    } else {
        0
    }
}

fn in_window(slot_index: u64, current: u64) -> bool {
    (current.wrapping_sub(slot_index) & INDEX_MASK) < SLOTS
}

/// This thread's deposit stripe.
fn stripe() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static STRIPE: Cell<usize> = const { Cell::new(usize::MAX) };
    }
    STRIPE
        .try_with(|stripe| {
            if stripe.get() == usize::MAX {
                stripe.set(NEXT.fetch_add(1, Ordering::Relaxed) % STRIPES);
            }
            stripe.get()
        })
        .unwrap_or(0)
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
/// (tower-rs/tower#857). The window is ten slots of `ttl / 10`: a deposit or withdrawal made at
/// the start of a slot counts for exactly `ttl`, one made later in the slot for between
/// `0.9 × ttl` and `ttl`.
///
/// Deposits (the hot path, one per request) go to one of eight stripes chosen per thread, so
/// threads sharing a budget do not contend for one word; withdrawals (rare: one per retry) read
/// every stripe and are serialised by a compare-and-swap, so the budget is never overdrawn.
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
    /// Tells budgets apart in the per-thread slot cache (addresses can be reused).
    id: u64,
    epoch: Instant,
    slot_nanos: u64,
    deposits: [Window; STRIPES],
    withdrawals: Window,
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
        // `UNITS_PER_RETRY` is 1000: `min_per_sec` retries per second are that many units per
        // millisecond of the window (whole seconds only would give a 1.9 s window 1 s's worth).
        let reserve = i64::from(min_per_sec).saturating_mul(ttl.as_millis() as i64);
        static IDS: AtomicU64 = AtomicU64::new(0);
        RetryBudget {
            id: IDS.fetch_add(1, Ordering::Relaxed),
            epoch: Instant::now(),
            slot_nanos,
            deposits: [const { Window::new() }; STRIPES],
            withdrawals: Window::new(),
            reserve,
            deposit: (ratio * UNITS_PER_RETRY as f64).round() as i64,
            ttl,
            min_per_sec,
            ratio,
        }
    }

    fn current_index(&self, now: Instant) -> u64 {
        let elapsed = now.saturating_duration_since(self.epoch);
        // Nanoseconds in a u64 last 584 years; the division stays in 64 bits.
        let elapsed = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        // The first slot is index SLOTS, so that an untouched slot (index 0) is never in the window.
        elapsed / self.slot_nanos + SLOTS
    }

    /// [`current_index`](Self::current_index) for a deposit: the slot this thread last deposited
    /// in is remembered with the instant it ends, so that most deposits compare two instants
    /// instead of converting one into a slot number.
    #[inline]
    fn deposit_index(&self, now: Instant) -> u64 {
        thread_local! {
            static LAST: Cell<Option<(u64, Instant, u64)>> = const { Cell::new(None) };
        }
        if let Ok(Some((id, end, index))) = LAST.try_with(Cell::get)
            && id == self.id
            && now < end
        {
            return index;
        }
        let index = self.current_index(now);
        let end = self
            .epoch
            .checked_add(Duration::from_nanos(
                (index + 1 - SLOTS).saturating_mul(self.slot_nanos),
            ))
            .unwrap_or(now);
        let _ = LAST.try_with(|last| last.set(Some((self.id, end, index))));
        index
    }

    /// Records one request (call once per request, not per attempt).
    pub fn deposit(&self) {
        if self.deposit == 0 {
            return;
        }
        // Inside a deadline layer's call, the clock it read a moment ago.
        let index = self.deposit_index(crate::timeout::now());
        self.deposits[stripe()].add(index, self.deposit);
    }

    /// Takes one retry from the budget; `false` if none is left.
    pub fn withdraw(&self) -> bool {
        let index = self.current_index(Instant::now());
        let current = &self.withdrawals.slots[(index % SLOTS) as usize];
        loop {
            let current_word = current.load(Ordering::Acquire);
            let balance = self
                .deposited(index)
                .saturating_add(self.withdrawals.sum(index, Some(current_word)));
            if balance < UNITS_PER_RETRY {
                return false;
            }
            // A slot that cannot record one more withdrawal (over 500 million in it) refuses it
            // rather than wrap.
            let units = current_units(current_word, index) - UNITS_PER_RETRY;
            if units < -SLOT_UNITS_MAX {
                return false;
            }
            let new = pack(index, units);
            // Every withdrawal at this instant lands on `current`, so a concurrent one makes this
            // exchange fail and the balance is checked again: the budget is never overdrawn.
            // (Deposits racing with it only add to the balance.)
            if current
                .compare_exchange(current_word, new, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                return true;
            }
        }
    }

    /// The reserve plus every deposit within the window ending at `index`.
    fn deposited(&self, index: u64) -> i64 {
        self.deposits.iter().fold(self.reserve, |total, stripe| {
            total.saturating_add(stripe.sum(index, None))
        })
    }

    /// How many retries the budget would allow right now.
    pub fn remaining(&self) -> u64 {
        let index = self.current_index(Instant::now());
        let balance = self
            .deposited(index)
            .saturating_add(self.withdrawals.sum(index, None));
        (balance.max(0) / UNITS_PER_RETRY) as u64
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

    /// A slot's sum is clamped to what it can hold: at ratio 1000, 600 000 requests in one slot
    /// of one stripe wrapped it to a negative balance, and every retry was refused.
    #[tokio::test(start_paused = true)]
    async fn a_slot_full_of_deposits_saturates_instead_of_wrapping() {
        let budget = RetryBudget::new(Duration::from_secs(60), 0, 1000.0);
        for _ in 0..600_000 {
            budget.deposit();
        }
        assert_eq!(
            budget.remaining(),
            (SLOT_UNITS_MAX / UNITS_PER_RETRY) as u64
        );
        assert!(budget.withdraw());
        // Withdrawals saturate the same way: a slot at its floor refuses.
        let slot =
            &budget.withdrawals.slots[(budget.current_index(Instant::now()) % SLOTS) as usize];
        let index = budget.current_index(Instant::now());
        slot.store(pack(index, -SLOT_UNITS_MAX + 1), Ordering::Relaxed);
        assert!(!budget.withdraw());
        slot.store(
            pack(index, -SLOT_UNITS_MAX + UNITS_PER_RETRY),
            Ordering::Relaxed,
        );
        assert!(budget.withdraw());
        assert_eq!(unpack(slot.load(Ordering::Relaxed)).1, -SLOT_UNITS_MAX);
    }

    /// `min_per_sec` counts for the window's whole length, not its whole seconds only.
    #[tokio::test(start_paused = true)]
    async fn the_reserve_counts_a_windows_fraction_of_a_second() {
        let budget = RetryBudget::new(Duration::from_millis(1900), 10, 0.0);
        assert_eq!(budget.remaining(), 19);
    }

    #[tokio::test(start_paused = true)]
    async fn deposits_from_many_threads_all_count_and_never_overdraw() {
        let budget = std::sync::Arc::new(RetryBudget::new(Duration::from_secs(10), 0, 1.0));
        let threads: Vec<_> = (0..12)
            .map(|_| {
                let budget = std::sync::Arc::clone(&budget);
                std::thread::spawn(move || {
                    for _ in 0..100 {
                        budget.deposit();
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        assert_eq!(budget.remaining(), 1200);
        let withdrawn: usize = (0..4)
            .map(|_| {
                let budget = std::sync::Arc::clone(&budget);
                std::thread::spawn(move || (0..500).filter(|_| budget.withdraw()).count())
            })
            .map(|thread| thread.join().unwrap())
            .sum();
        assert_eq!(withdrawn, 1200);
        assert_eq!(budget.remaining(), 0);
    }
}

//! Event counters that many threads bump on a hot path without contending.
//!
//! A shared `AtomicU64::fetch_add` costs a locked read-modify-write per event, and when two threads
//! share the counter its cache line bounces between cores; on a breaker's success path that would
//! dominate the cost of the whole layer. Instead every thread owns a *slab* of cells and bumps only its
//! own cell with a plain load and store (no lock prefix, no contention); a reader sums the cell of every
//! slab. A slab is owned by at most one live thread at a time: a thread takes one on first use and
//! hands it back to a spare pool when it exits, so the next thread keeps counting on top of the same
//! values and nothing is lost.
//!
//! A dropped counter's cell index is zeroed in every slab and handed to the next counter, so the
//! number of indices in use is bounded by the number of counters alive at once. A slab's cells
//! come in chunks of 1024, the first inline and the others allocated the first time the thread
//! counts in them, so there is no
//! cliff at a fixed number of breakers: up to 65 536 counters alive at once each keep their own
//! cells. Beyond that (logged once), or when a thread-local is no longer reachable (thread
//! teardown), a counter falls back to a shared atomic: slower, still exact.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

/// Cells per chunk: 8 KiB per thread that counts, for each chunk in use.
const CHUNK: usize = 1024;
/// Chunks per slab: up to `CHUNK * CHUNKS` (65 536) counters alive at once keep their own cells.
const CHUNKS: usize = 64;
/// Counters beyond this many alive at once share an atomic each (slower, still exact).
const CELLS: usize = CHUNK * CHUNKS;

type Chunk = [AtomicU64; CHUNK];

/// One thread's cells: the first chunk inline (the hot path is one indexed store, as with a flat
/// array), the others allocated the first time the thread counts in them, so a thread pays for
/// the chunks of the counters it bumps, not for the whole index space.
struct Slab {
    first: Chunk,
    more: [OnceLock<Box<Chunk>>; CHUNKS - 1],
}

impl Slab {
    #[inline(always)]
    fn chunk(&self, index: usize) -> Option<&Chunk> {
        if index < CHUNK {
            Some(&self.first)
        } else {
            self.more_chunk(index)
        }
    }

    #[inline(never)]
    fn more_chunk(&self, index: usize) -> Option<&Chunk> {
        self.more
            .get(index / CHUNK - 1)?
            .get()
            .map(|chunk| &**chunk)
    }

    #[cold]
    fn chunk_or_init(&self, index: usize) -> Option<&Chunk> {
        if index < CHUNK {
            return Some(&self.first);
        }
        let chunk = self.more.get(index / CHUNK - 1)?;
        Some(chunk.get_or_init(|| Box::new([const { AtomicU64::new(0) }; CHUNK])))
    }
}

/// Every slab ever created; readers sum over all of them.
static SLABS: Mutex<Vec<&'static Slab>> = Mutex::new(Vec::new());
/// Slabs released by threads that exited, waiting for a new owner.
static SPARE: Mutex<Vec<&'static Slab>> = Mutex::new(Vec::new());
/// The next never-assigned cell index.
static NEXT_INDEX: AtomicUsize = AtomicUsize::new(0);
/// Indices of dropped counters, their cells zeroed, waiting for a new counter.
static FREE_INDICES: Mutex<Vec<usize>> = Mutex::new(Vec::new());
/// Whether the "too many counters" warning was logged.
static WARNED: AtomicBool = AtomicBool::new(false);

thread_local! {
    /// This thread's slab. No destructor, so reaching it is a single TLS load on the hot path.
    static LOCAL: Cell<Option<&'static Slab>> = const { Cell::new(None) };
    /// Hands this thread's slab back at thread exit. Touched only when adopting a slab.
    static RETURN_AT_EXIT: SlabGuard = const { SlabGuard };
}

struct SlabGuard;

impl Drop for SlabGuard {
    fn drop(&mut self) {
        if let Ok(Some(slab)) = LOCAL.try_with(|local| local.take()) {
            lock(&SPARE).push(slab);
        }
    }
}

#[inline]
fn bump_local(index: usize) -> bool {
    LOCAL
        .try_with(|local| {
            let cell = match local.get().and_then(|slab| slab.chunk(index)) {
                Some(chunk) => &chunk[index % CHUNK],
                None => match first_bump(local, index) {
                    Some(cell) => cell,
                    None => return false,
                },
            };
            // Only this thread writes this cell (see the module docs), so load + store loses nothing.
            cell.store(
                cell.load(Ordering::Relaxed).wrapping_add(1),
                Ordering::Relaxed,
            );
            true
        })
        .unwrap_or(false)
}

/// The first bump of this thread, or of this thread in a chunk it has not used yet.
#[cold]
#[inline(never)]
fn first_bump(local: &Cell<Option<&'static Slab>>, index: usize) -> Option<&'static AtomicU64> {
    let slab = match local.get() {
        Some(slab) => slab,
        None => {
            let slab = adopt()?;
            local.set(Some(slab));
            slab
        }
    };
    Some(&slab.chunk_or_init(index)?[index % CHUNK])
}

/// Takes a slab for this thread, unless the thread is already tearing down (then its slab could
/// not be handed back, and the caller counts on the shared fallback instead).
fn adopt() -> Option<&'static Slab> {
    // Registers the guard's destructor; fails once thread-locals are being destroyed.
    RETURN_AT_EXIT.try_with(|_| ()).ok()?;
    let spare = lock(&SPARE).pop();
    Some(spare.unwrap_or_else(|| {
        let slab: &'static Slab = Box::leak(Box::new(Slab {
            first: [const { AtomicU64::new(0) }; CHUNK],
            more: [const { OnceLock::new() }; CHUNKS - 1],
        }));
        lock(&SLABS).push(slab);
        slab
    }))
}

/// Locks a registry mutex; the data behind it (lists of leaked slabs) stays valid even if a holder
/// panicked, so poisoning is ignored.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A monotonically increasing event counter, cheap to bump from many threads at once.
#[derive(Debug)]
pub(crate) struct StripedCounter {
    /// The cell in every slab; `CELLS` or more means "no cell, use the fallback".
    index: usize,
    fallback: AtomicU64,
}

impl StripedCounter {
    pub(crate) fn new() -> Self {
        // The lock orders the zeroing of a reused index's cells (done before it was freed) before
        // this counter's first increment on any thread.
        let reused = lock(&FREE_INDICES).pop();
        let index = reused.unwrap_or_else(|| NEXT_INDEX.fetch_add(1, Ordering::Relaxed));
        if index >= CELLS && !WARNED.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                counters = index,
                "more than {CELLS} striped counters alive at once; later ones share an atomic"
            );
        }
        StripedCounter {
            index,
            fallback: AtomicU64::new(0),
        }
    }

    /// Adds one.
    #[inline]
    pub(crate) fn increment(&self) {
        if !bump_local(self.index) {
            self.fallback.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The total so far. Increments racing with this call may or may not be included.
    pub(crate) fn sum(&self) -> u64 {
        let mut total = self.fallback.load(Ordering::Relaxed);
        if self.index < CELLS {
            for slab in lock(&SLABS).iter() {
                if let Some(chunk) = slab.chunk(self.index) {
                    total = total.wrapping_add(chunk[self.index % CHUNK].load(Ordering::Relaxed));
                }
            }
        }
        total
    }
}

impl Drop for StripedCounter {
    fn drop(&mut self) {
        if self.index >= CELLS {
            return;
        }
        // Nothing can increment a counter that is being dropped, so no owner thread writes this
        // cell until a new counter takes the index (after the lock below).
        for slab in lock(&SLABS).iter() {
            if let Some(chunk) = slab.chunk(self.index) {
                chunk[self.index % CHUNK].store(0, Ordering::Relaxed);
            }
        }
        lock(&FREE_INDICES).push(self.index);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn counts_exactly_across_threads_including_exited_ones() {
        let counter = Arc::new(StripedCounter::new());
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let counter = Arc::clone(&counter);
                std::thread::spawn(move || {
                    for _ in 0..10_000 {
                        counter.increment();
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        counter.increment();
        assert_eq!(counter.sum(), 80_001);
    }

    #[test]
    fn a_reused_index_starts_from_zero() {
        let first = StripedCounter::new();
        let index = first.index;
        let counted = std::thread::spawn(move || {
            for _ in 0..5 {
                first.increment();
            }
            first
        })
        .join()
        .unwrap();
        assert_eq!(counted.sum(), 5);
        drop(counted);
        // Hold every counter taken until the freed index comes back (other tests may take
        // indices at the same time).
        let mut held = Vec::new();
        let reused = loop {
            let counter = StripedCounter::new();
            if counter.index == index {
                break counter;
            }
            assert!(
                held.len() < 4 * CHUNK,
                "the freed index was not handed out again"
            );
            held.push(counter);
        };
        assert_eq!(reused.sum(), 0);
        reused.increment();
        assert_eq!(reused.sum(), 1);
    }

    #[test]
    fn thousands_of_live_counters_keep_their_own_cells() {
        // Past the first chunk (the old cliff was at 1024 cells, 512 breakers).
        let counters: Vec<_> = (0..3 * CHUNK).map(|_| StripedCounter::new()).collect();
        for (i, counter) in counters.iter().enumerate() {
            for _ in 0..(i % 3) {
                counter.increment();
            }
        }
        for (i, counter) in counters.iter().enumerate() {
            assert_eq!(counter.sum(), (i % 3) as u64);
            assert_eq!(
                counter.fallback.load(Ordering::Relaxed),
                0,
                "counter {i} fell back"
            );
        }
    }

    #[test]
    fn counters_are_independent() {
        let a = StripedCounter::new();
        let b = StripedCounter::new();
        a.increment();
        a.increment();
        b.increment();
        assert_eq!((a.sum(), b.sum()), (2, 1));
    }
}

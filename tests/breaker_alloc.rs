//! The breaker's hot paths make no heap allocation: proven under a counting global allocator.

use palisade::circuit_breaker::{CircuitBreakerConfig, CircuitBreakerLayer, CircuitOpen};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::future::{Future, Ready, ready};
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use tower::{Layer, Service};

struct CountingAllocator;

thread_local! {
    /// Allocations made by this thread while counting is on (other threads — the test harness —
    /// are not ours to count).
    static COUNTED: Cell<Option<usize>> = const { Cell::new(None) };
    /// Deallocations made by this thread while counting them is on.
    static FREED: Cell<Option<usize>> = const { Cell::new(None) };
}

fn note_allocation() {
    // `try_with`: the allocator may run during thread teardown, when the thread-local is gone.
    let _ = COUNTED.try_with(|counted| {
        if let Some(n) = counted.get() {
            counted.set(Some(n + 1));
        }
    });
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged, so `System`'s
// guarantees carry over; the only addition is bumping a thread-local `Cell`, which neither
// allocates (const-initialised, no destructor) nor touches the memory being managed.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note_allocation();
        // SAFETY: forwarded unchanged; the caller upholds `alloc`'s contract.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note_allocation();
        // SAFETY: forwarded unchanged.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note_allocation();
        // SAFETY: forwarded unchanged; `ptr` came from this allocator, i.e. from `System`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let _ = FREED.try_with(|freed| {
            if let Some(n) = freed.get() {
                freed.set(Some(n + 1));
            }
        });
        // SAFETY: forwarded unchanged; `ptr` came from this allocator, i.e. from `System`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

fn deallocations_during(work: impl FnOnce()) -> usize {
    FREED.with(|c| c.set(Some(0)));
    work();
    FREED.with(|c| c.replace(None)).unwrap()
}

fn allocations_during(work: impl FnOnce()) -> usize {
    COUNTED.with(|c| c.set(Some(0)));
    work();
    COUNTED.with(|c| c.replace(None)).unwrap()
}

#[derive(Debug)]
enum Error {
    Open(CircuitOpen),
    Inner,
}

impl From<CircuitOpen> for Error {
    fn from(open: CircuitOpen) -> Self {
        Error::Open(open)
    }
}

fn bare(fail: bool) -> Ready<Result<u64, Error>> {
    ready(if fail { Err(Error::Inner) } else { Ok(7) })
}

fn call_once<S>(service: &mut S, cx: &mut Context<'_>, fail: bool) -> Result<u64, Error>
where
    S: Service<bool, Response = u64, Error = Error>,
{
    assert!(service.poll_ready(cx).is_ready());
    let future = pin!(service.call(fail));
    match future.poll(cx) {
        Poll::Ready(result) => result,
        Poll::Pending => panic!("an always-ready service returned Pending"),
    }
}

#[test]
fn closed_success_and_open_rejection_do_not_allocate() {
    let mut cx = Context::from_waker(Waker::noop());
    let layer = CircuitBreakerLayer::new(CircuitBreakerConfig::new("no-alloc").max_failures(3));
    let handle = layer.handle();
    let mut service = layer.layer(tower::service_fn(bare));

    // Warm up: the first count on a thread adopts that thread's counter slab.
    call_once(&mut service, &mut cx, false).unwrap();

    let closed = allocations_during(|| {
        for _ in 0..10_000 {
            assert_eq!(call_once(&mut service, &mut cx, false).unwrap(), 7);
        }
    });
    assert_eq!(closed, 0, "closed-state successes allocated");

    for _ in 0..3 {
        assert!(matches!(
            call_once(&mut service, &mut cx, true),
            Err(Error::Inner)
        ));
    }
    assert_eq!(
        handle.state(),
        palisade::circuit_breaker::CircuitState::Open
    );

    let open = allocations_during(|| {
        for _ in 0..10_000 {
            match call_once(&mut service, &mut cx, false) {
                Err(Error::Open(open)) => assert_eq!(open.name(), "no-alloc"),
                other => panic!("expected a rejection, got {other:?}"),
            }
        }
    });
    assert_eq!(open, 0, "open-state rejections allocated");

    // The counting is real: an allocation inside the window is seen.
    let boxed = allocations_during(|| drop(std::hint::black_box(Box::new(1u8))));
    assert_eq!(boxed, 1);
}

/// A rejected call's future holds the breaker's name; dropped without being polled, after the
/// breaker itself is gone, it frees it (the name is not leaked).
#[test]
fn a_rejected_future_dropped_unpolled_frees_the_name() {
    let mut cx = Context::from_waker(Waker::noop());
    let layer = CircuitBreakerLayer::new(CircuitBreakerConfig::new("freed-with-its-last-holder"));
    let handle = layer.handle();
    let mut service = layer.layer(tower::service_fn(bare));
    handle.force_open();
    assert!(service.poll_ready(&mut cx).is_ready());
    let rejected = service.call(false);
    drop((service, layer, handle));
    let freed = deallocations_during(|| drop(rejected));
    assert_eq!(freed, 1, "the name was not freed with the future");
}

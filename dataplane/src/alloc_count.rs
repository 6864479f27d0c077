//! A counting global allocator, so that "the hot loop does not allocate" is a measured fact.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

thread_local! {
    // A const-initialised Cell without a destructor: reading it never allocates, so the
    // allocator can use it without recursing.
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

/// The system allocator, counting allocations per thread.
///
/// A binary opts in with `#[global_allocator] static A: CountingAllocator = CountingAllocator;`.
/// Every allocation then adds one to a counter of the calling thread; the hot loops publish
/// their thread's count in [`crate::Counters`] (`tx_loop_allocations`, `rx_loop_allocations`),
/// and a test reads it before and after pushing traffic. Without the allocator installed the
/// counts stay at zero, which is why the tests check [`is_installed`].
#[derive(Debug, Default, Clone, Copy)]
pub struct CountingAllocator;

#[inline]
fn count() {
    // `try_with` fails only while the thread is being torn down; those allocations are not
    // the hot loop's.
    let _ = ALLOCATIONS.try_with(|c| c.set(c.get() + 1));
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged, so the
// `GlobalAlloc` contract holds exactly as it does for `System`; counting touches only a
// thread-local `Cell` and never allocates.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: forwarded unchanged; the caller upholds `alloc`'s contract.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: forwarded unchanged; the caller upholds `alloc_zeroed`'s contract.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        // SAFETY: forwarded unchanged; the caller upholds `realloc`'s contract.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded unchanged; the caller upholds `dealloc`'s contract.
        unsafe { System.dealloc(ptr, layout) }
    }
}

/// Allocations made so far by the calling thread (zero unless [`CountingAllocator`] is the
/// global allocator).
#[inline]
pub fn thread_allocations() -> u64 {
    ALLOCATIONS.try_with(Cell::get).unwrap_or(0)
}

/// Whether [`CountingAllocator`] is the global allocator of this process.
pub fn is_installed() -> bool {
    let before = thread_allocations();
    let probe = std::hint::black_box(Box::new(0u8));
    drop(probe);
    thread_allocations() != before
}

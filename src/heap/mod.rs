//! A cache of large freed buffers in front of the system allocator. A forward pass allocates
//! its activations anew in every op (candle has no arena), and in a prefill step of thousands
//! of tokens many are tens to hundreds of MiB. glibc serves each of those as a fresh `mmap`
//! (over its 32 MiB ceiling for the heap, or over the 64 MiB of a worker thread's arena, where
//! candle runs the pass), page-faulted in as it is written and unmapped when freed: millions of
//! page faults a run. Telling glibc to serve everything from its one main heap and keep freed
//! memory (`mallopt`) removed the faults but made the default run 2-8% slower, the one arena
//! shared by all threads being the cost (docs/cpu-performance.md). So only large buffers are
//! kept here, where they are few (a handful per layer per step) and one short lock is cheap;
//! the rest goes straight to the system allocator, per-thread arenas and all.
//!
//! Buffers from `MIN_LINE_ALIGNED` up (weights, activations, the KV cache) start on a cache
//! line. glibc's own alignment is 16 bytes, and its mapped chunks start 16 bytes into a page,
//! so every 64-byte load of the 512-bit kernels straddled two lines: 8-15% slower f32 decode
//! products in a scratch program, a 32-sequence decode step about 7% (docs/cpu-performance.md).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Mutex;

use line::{LINE, line_alloc, line_dealloc, line_realloc};

mod line;

/// Buffers from this size up are kept when freed: above what glibc keeps in its heap once its
/// mmap threshold has adapted (up to 32 MiB), and few enough per step to share one lock.
pub const MIN_CACHED: usize = 4 << 20;
/// The most bytes of freed buffers held at once: those freed longest ago go back to the system
/// first, so that buffers of shapes no longer run (the prefill chunk before a shorter one) do
/// not pile up. Measured on SmolLM2 (docs/cpu-performance.md): 512 MiB kept the prefill's gain
/// of 1 GiB with about half its extra resident memory (default run +0.3 GB against +0.6).
pub const MAX_HELD: usize = 512 << 20;
/// Buffers from this size up start on a cache line: the rows of a decode step of two sequences
/// and more (SmolLM2: 2.3 KB a row), at a cost of at most 1/64 of slack.
pub const MIN_LINE_ALIGNED: usize = 4 << 10;
/// Freed buffers held at once.
const SLOTS: usize = 64;

/// The process's allocator in `main`: large buffers are recycled by size class (sizes rounded
/// up by at most 1/8), everything else is the system allocator's.
pub struct ActivationCache {
    free: Mutex<Held>,
}

/// A freed buffer held for reuse.
#[derive(Clone, Copy)]
struct Slot {
    /// Its size class (`route`), the size it was allocated with.
    class: Layout,
    ptr: usize,
    /// When it was freed, in frees of large buffers.
    freed: u64,
}

struct Held {
    slots: [Option<Slot>; SLOTS],
    frees: u64,
}

impl Held {
    fn bytes(&self) -> usize {
        self.slots.iter().flatten().map(|s| s.class.size()).sum()
    }

    /// Gives buffers back to the system, those freed longest ago first, until `room` more bytes
    /// fit under `MAX_HELD` and a slot is empty.
    fn make_room(&mut self, room: usize) {
        while self.bytes() + room > MAX_HELD || self.slots.iter().all(Option::is_some) {
            let Some(oldest) = self
                .slots
                .iter_mut()
                .filter(|s| s.is_some())
                .min_by_key(|s| s.map(|s| s.freed))
            else {
                return;
            };
            if let Some(slot) = oldest.take() {
                // SAFETY: a held buffer came from `line_alloc` with its class's size. The
                // system allocator does not call back into this one.
                unsafe { line_dealloc(slot.ptr as *mut u8, slot.class.size()) };
            }
        }
    }
}

impl ActivationCache {
    pub const fn new() -> Self {
        Self {
            free: Mutex::new(Held {
                slots: [None; SLOTS],
                frees: 0,
            }),
        }
    }

    /// Bytes of freed buffers held for reuse.
    pub fn held_bytes(&self) -> usize {
        self.free.lock().map_or(0, |h| h.bytes())
    }

    /// A held buffer of layout `class`, if there is one; otherwise makes room under the cap for
    /// the one about to be allocated.
    fn take(&self, class: Layout) -> Option<*mut u8> {
        let mut held = self.free.lock().ok()?;
        let found = held
            .slots
            .iter_mut()
            .find(|s| s.is_some_and(|s| s.class == class))
            .and_then(Option::take);
        if found.is_none() {
            held.make_room(class.size());
        }
        found.map(|s| s.ptr as *mut u8)
    }

    /// Keeps a freed buffer, or gives it back to the system if it alone is over the cap.
    fn keep(&self, ptr: *mut u8, class: Layout) {
        if class.size() <= MAX_HELD
            && let Ok(mut held) = self.free.lock()
        {
            held.make_room(class.size());
            held.frees += 1;
            let freed = held.frees;
            if let Some(empty) = held.slots.iter_mut().find(|s| s.is_none()) {
                *empty = Some(Slot {
                    class,
                    ptr: ptr as usize,
                    freed,
                });
                return;
            }
        }
        // SAFETY: the buffer came from `line_alloc` with this size (see `alloc_cached`).
        unsafe { line_dealloc(ptr, class.size()) };
    }

    /// # Safety
    /// As `GlobalAlloc::alloc`, for a class from `route`.
    unsafe fn alloc_cached(&self, class: Layout, zeroed: bool) -> *mut u8 {
        if let Some(ptr) = self.take(class) {
            if zeroed {
                // SAFETY: the held buffer has `class.size()` bytes.
                unsafe { ptr.write_bytes(0, class.size()) };
            }
            return ptr;
        }
        // SAFETY: `class` has a non-zero size.
        unsafe { line_alloc(class.size(), zeroed) }
    }
}

impl Default for ActivationCache {
    fn default() -> Self {
        Self::new()
    }
}

/// How a request is served.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Route {
    /// By the system allocator, as asked.
    System,
    /// By `line_alloc`, with the request's size.
    Line,
    /// From the cache: a buffer of this size class (the size rounded up by at most 1/8, and
    /// `LINE`).
    Cached(Layout),
}

fn route(layout: &Layout) -> Route {
    if layout.size() < MIN_LINE_ALIGNED || layout.align() > LINE {
        return Route::System;
    }
    if layout.size() < MIN_CACHED {
        return Route::Line;
    }
    // Steps of 1/8 of the request's power of two.
    let step = 1usize << (usize::BITS - 4 - layout.size().leading_zeros());
    layout
        .size()
        .checked_next_multiple_of(step)
        .and_then(|size| Layout::from_size_align(size, LINE).ok())
        .map_or(Route::System, Route::Cached)
}

// SAFETY: small (or over-aligned) requests are the system allocator's, untouched. A larger
// request gets a line-aligned buffer of at least its size (its class's, if cached), at least
// its alignment; it is freed (kept or given back) by the same route, computed again from the
// layout `dealloc` receives, which is the one it was allocated with.
unsafe impl GlobalAlloc for ActivationCache {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as the trait's contract (a non-zero size).
        match route(&layout) {
            Route::System => unsafe { System.alloc(layout) },
            Route::Line => unsafe { line_alloc(layout.size(), false) },
            Route::Cached(class) => unsafe { self.alloc_cached(class, false) },
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as the trait's contract (a non-zero size).
        match route(&layout) {
            Route::System => unsafe { System.alloc_zeroed(layout) },
            Route::Line => unsafe { line_alloc(layout.size(), true) },
            Route::Cached(class) => unsafe { self.alloc_cached(class, true) },
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as the trait's contract; allocated by the same route.
        match route(&layout) {
            Route::System => unsafe { System.dealloc(ptr, layout) },
            Route::Line => unsafe { line_dealloc(ptr, layout.size()) },
            Route::Cached(class) => self.keep(ptr, class),
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let Ok(new_layout) = Layout::from_size_align(new_size, layout.align()) else {
            return std::ptr::null_mut();
        };
        match (route(&layout), route(&new_layout)) {
            // SAFETY: both the system's; as the trait's contract.
            (Route::System, Route::System) => unsafe { System.realloc(ptr, layout, new_size) },
            (Route::Cached(a), Route::Cached(b)) if a == b => ptr,
            // SAFETY: allocated by `line_alloc` with this size; as the trait's contract.
            (Route::Line, Route::Line) => unsafe { line_realloc(ptr, layout.size(), new_size) },
            _ => {
                // SAFETY: as the trait's contract; the copy is within both buffers.
                unsafe {
                    let moved = self.alloc(new_layout);
                    if !moved.is_null() {
                        std::ptr::copy_nonoverlapping(ptr, moved, layout.size().min(new_size));
                        self.dealloc(ptr, layout);
                    }
                    moved
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_round_up_by_at_most_an_eighth() {
        let class = |size| match route(&Layout::from_size_align(size, 8).unwrap()) {
            Route::Cached(l) => Some(l.size()),
            _ => None,
        };
        assert_eq!(class(MIN_CACHED - 1), None);
        assert_eq!(class(MIN_CACHED), Some(MIN_CACHED));
        assert_eq!(class(MIN_CACHED + 1), Some(MIN_CACHED + MIN_CACHED / 8));
        for size in [5 << 20, (100 << 20) + 3, 8192 * 3072 * 4, (1 << 30) - 1] {
            let c = class(size).unwrap();
            assert!(c >= size && c - size <= size / 8, "{size} -> {c}");
            assert_eq!(class(c), Some(c), "a class is its own class");
        }
        let aligned = Layout::from_size_align(MIN_CACHED, 4096).unwrap();
        assert_eq!(
            route(&aligned),
            Route::System,
            "over-aligned requests are the system's"
        );
        let small = Layout::from_size_align(MIN_LINE_ALIGNED - 1, 8).unwrap();
        assert_eq!(route(&small), Route::System);
        let line = Layout::from_size_align(MIN_LINE_ALIGNED, 64).unwrap();
        assert_eq!(route(&line), Route::Line);
    }
}

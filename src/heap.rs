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

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Mutex;

/// Buffers from this size up are kept when freed: above what glibc keeps in its heap once its
/// mmap threshold has adapted (up to 32 MiB), and few enough per step to share one lock.
pub const MIN_CACHED: usize = 4 << 20;
/// The most bytes of freed buffers held at once: those freed longest ago go back to the system
/// first, so that buffers of shapes no longer run (the prefill chunk before a shorter one) do
/// not pile up. Measured on SmolLM2 (docs/cpu-performance.md): 512 MiB kept the prefill's gain
/// of 1 GiB with about half its extra resident memory (default run +0.3 GB against +0.6).
pub const MAX_HELD: usize = 512 << 20;
/// Alignment of every cached buffer, so that any request up to it can reuse any of them: the
/// system allocator's own, since over it `System.alloc_zeroed` writes the zeros itself, where
/// `calloc` leaves fresh pages untouched.
const ALIGN: usize = 16;
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
    /// The layout it was allocated with (`class_of`).
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
                // SAFETY: a held buffer came from `System` with this layout. The system
                // allocator does not call back into this one.
                unsafe { System.dealloc(slot.ptr as *mut u8, slot.class) };
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
        // SAFETY: the buffer came from `System` with this layout (see `alloc_cached`).
        unsafe { System.dealloc(ptr, class) };
    }

    /// # Safety
    /// As `GlobalAlloc::alloc`, for a layout from `class_of`.
    unsafe fn alloc_cached(&self, class: Layout, zeroed: bool) -> *mut u8 {
        if let Some(ptr) = self.take(class) {
            if zeroed {
                // SAFETY: the held buffer has `class.size()` bytes.
                unsafe { ptr.write_bytes(0, class.size()) };
            }
            return ptr;
        }
        // SAFETY: `class` has a non-zero size. A fresh zeroed buffer comes from the system
        // lazily zeroed (no page touched): the CPU's KV cache of gigabytes relies on it.
        unsafe {
            if zeroed {
                System.alloc_zeroed(class)
            } else {
                System.alloc(class)
            }
        }
    }
}

impl Default for ActivationCache {
    fn default() -> Self {
        Self::new()
    }
}

/// The layout a cached request is served with (its size class: the size rounded up by at most
/// 1/8, and `ALIGN`), or `None` for a request the system serves directly.
fn class_of(layout: &Layout) -> Option<Layout> {
    if layout.size() < MIN_CACHED || layout.align() > ALIGN {
        return None;
    }
    // Steps of 1/8 of the request's power of two.
    let step = 1usize << (usize::BITS - 4 - layout.size().leading_zeros());
    let size = layout.size().checked_next_multiple_of(step)?;
    Layout::from_size_align(size, ALIGN).ok()
}

// SAFETY: requests below `MIN_CACHED` (or over-aligned) are the system allocator's, untouched.
// A cached request gets a buffer of its class from `System`, at least its size and alignment;
// it is freed (kept or given back) with the same class, computed again from the layout
// `dealloc` receives, which is the one it was allocated with.
unsafe impl GlobalAlloc for ActivationCache {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        match class_of(&layout) {
            // SAFETY: as the trait's contract.
            Some(class) => unsafe { self.alloc_cached(class, false) },
            None => unsafe { System.alloc(layout) },
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        match class_of(&layout) {
            // SAFETY: as the trait's contract.
            Some(class) => unsafe { self.alloc_cached(class, true) },
            None => unsafe { System.alloc_zeroed(layout) },
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        match class_of(&layout) {
            Some(class) => self.keep(ptr, class),
            // SAFETY: as the trait's contract.
            None => unsafe { System.dealloc(ptr, layout) },
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let Ok(new_layout) = Layout::from_size_align(new_size, layout.align()) else {
            return std::ptr::null_mut();
        };
        match (class_of(&layout), class_of(&new_layout)) {
            // SAFETY: both the system's; as the trait's contract.
            (None, None) => unsafe { System.realloc(ptr, layout, new_size) },
            (Some(a), Some(b)) if a == b => ptr,
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
        let class = |size| class_of(&Layout::from_size_align(size, 8).unwrap()).map(|l| l.size());
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
            class_of(&aligned),
            None,
            "over-aligned requests are the system's"
        );
    }
}

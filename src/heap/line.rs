//! Buffers that start on a cache line, carved from the system allocator's: a line more is
//! asked for, the start rounded up to a line, and the system's pointer kept in the 8 bytes
//! before it, so that freeing and resizing find it again.

use std::alloc::{GlobalAlloc, Layout, System};

/// A cache line, the alignment of these buffers (any request aligned up to it can use any).
pub(super) const LINE: usize = 64;
/// The alignment asked of the system: its own, since over it `System.alloc_zeroed` writes the
/// zeros itself, where `calloc` leaves fresh pages untouched.
const SYSTEM_ALIGN: usize = 16;

/// The system layout behind a line-aligned buffer of `size` bytes: a line more, for the room
/// to align and to keep the system's pointer.
fn line_layout(size: usize) -> Option<Layout> {
    Layout::from_size_align(size.checked_add(LINE)?, SYSTEM_ALIGN).ok()
}

/// `size` bytes from the system starting on a cache line, the system's pointer stored in the
/// 8 bytes before. A zeroed buffer comes from `calloc`, lazily zeroed (no page touched): the
/// CPU's KV cache of gigabytes relies on it.
///
/// # Safety
/// `size` is not zero.
pub(super) unsafe fn line_alloc(size: usize, zeroed: bool) -> *mut u8 {
    let Some(layout) = line_layout(size) else {
        return std::ptr::null_mut();
    };
    // SAFETY: a non-zero size.
    let base = unsafe {
        if zeroed {
            System.alloc_zeroed(layout)
        } else {
            System.alloc(layout)
        }
    };
    // SAFETY: a buffer of `line_layout(size)`, or null.
    unsafe { place(base) }
}

/// The first line boundary in `base` at least 8 bytes in, with `base` stored in the 8 bytes
/// before it; null for a null `base`.
///
/// # Safety
/// `base` is null or a 16-aligned buffer from `line_layout`, a line longer than what it holds.
unsafe fn place(base: *mut u8) -> *mut u8 {
    if base.is_null() {
        return base;
    }
    // SAFETY: within the buffer (`line_offset`); the stored pointer's 8 bytes lie before
    // `ptr`, 8-aligned and at or after `base`.
    unsafe {
        let ptr = base.add(line_offset(base));
        ptr.cast::<*mut u8>().sub(1).write(base);
        ptr
    }
}

/// The system's pointer that `place` stored before `ptr`.
///
/// # Safety
/// `ptr` came from `line_alloc` (or `line_realloc`).
unsafe fn system_pointer(ptr: *mut u8) -> *mut u8 {
    // SAFETY: `place` wrote the pointer in the 8 bytes before `ptr`, 8-aligned.
    unsafe { ptr.cast::<*mut u8>().sub(1).read() }
}

/// Where `place` puts a buffer's start: `base` is 16-aligned, so the boundary is at most 64
/// in, and what a buffer from `line_layout` holds fits after it.
fn line_offset(base: *mut u8) -> usize {
    (base as usize + 8).next_multiple_of(LINE) - base as usize
}

/// Resizes a buffer from `line_alloc` by the system's `realloc` (in place, or by remapping,
/// where it can), moving the contents where the line boundary's offset changed.
///
/// # Safety
/// `ptr` came from `line_alloc(size, _)`; `new_size` is not zero.
pub(super) unsafe fn line_realloc(ptr: *mut u8, size: usize, new_size: usize) -> *mut u8 {
    let (Some(layout), Some(new_layout)) = (line_layout(size), line_layout(new_size)) else {
        return std::ptr::null_mut();
    };
    // SAFETY: `line_alloc` stored the system's pointer before `ptr`, allocated with `layout`.
    // The kept bytes lie at the old offset (at most 64 in) and are moved to the new one (also
    // at most 64 in), both within the new buffer of `new_size` + 64 bytes.
    unsafe {
        let base = system_pointer(ptr);
        let old_offset = ptr.offset_from(base) as usize;
        let new_base = System.realloc(base, layout, new_layout.size());
        if new_base.is_null() {
            return new_base;
        }
        // Moved before `place` stores the pointer, which may lie in the kept bytes.
        let offset = line_offset(new_base);
        if offset != old_offset {
            std::ptr::copy(
                new_base.add(old_offset),
                new_base.add(offset),
                size.min(new_size),
            );
        }
        place(new_base)
    }
}

/// Frees a buffer from `line_alloc`.
///
/// # Safety
/// `ptr` came from `line_alloc(size, _)` and is not used again.
pub(super) unsafe fn line_dealloc(ptr: *mut u8, size: usize) {
    // SAFETY: `line_alloc` stored the system's pointer just before `ptr`, and got it with
    // `line_layout(size)`, which was then `Some`.
    unsafe {
        let base = system_pointer(ptr);
        if let Some(layout) = line_layout(size) {
            System.dealloc(base, layout);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_buffers_keep_their_contents_through_resizes() {
        let mut size = 5000;
        // The bytes still holding what was written: those no resize has cut off.
        let mut kept = size;
        // SAFETY: non-zero sizes; each pointer is used only until resized, then freed once.
        unsafe {
            let mut ptr = line_alloc(size, true);
            assert!(
                std::slice::from_raw_parts(ptr, size)
                    .iter()
                    .all(|&b| b == 0)
            );
            for (i, b) in std::slice::from_raw_parts_mut(ptr, size)
                .iter_mut()
                .enumerate()
            {
                *b = i as u8;
            }
            for new_size in [9000, 3 << 20, 70_000, 4097, 1 << 20, 4500] {
                ptr = line_realloc(ptr, size, new_size);
                assert!(!ptr.is_null());
                assert_eq!(ptr as usize % LINE, 0, "{size} -> {new_size}");
                kept = kept.min(new_size);
                let bytes = std::slice::from_raw_parts(ptr, kept);
                assert!(
                    bytes.iter().enumerate().all(|(i, &b)| b == i as u8),
                    "{size} -> {new_size} lost bytes"
                );
                size = new_size;
            }
            line_dealloc(ptr, size);
        }
    }
}

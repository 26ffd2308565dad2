//! `heap::ActivationCache` as the process's allocator, as `main` installs it. A test without the
//! harness, in a process of its own, since what the cache holds is the process's.

use offline_bench::heap::{ActivationCache, MAX_HELD, MIN_CACHED, MIN_LINE_ALIGNED};

#[global_allocator]
static CACHE: ActivationCache = ActivationCache::new();

fn main() {
    let size = 48 << 20;
    assert_eq!(CACHE.held_bytes(), 0);

    // A large buffer is kept when freed and served again, to any thread.
    let first = vec![1u8; size];
    let at = first.as_ptr() as usize;
    drop(first);
    assert_eq!(
        CACHE.held_bytes(),
        size,
        "a freed 48 MiB buffer was not kept"
    );
    let on_worker = std::thread::spawn(move || {
        let again = std::hint::black_box(vec![2u8; size]);
        again.as_ptr() as usize
    })
    .join();
    assert_eq!(
        on_worker.ok(),
        Some(at),
        "a worker did not get the kept buffer"
    );

    // A zeroed request served from a kept buffer is zeroed.
    let dirty = vec![7u8; size];
    let at = dirty.as_ptr() as usize;
    drop(dirty);
    let zeroed = vec![0u8; size];
    assert_eq!(zeroed.as_ptr() as usize, at);
    assert!(
        zeroed.iter().all(|&b| b == 0),
        "a reused zeroed buffer held old bytes"
    );
    drop(zeroed);

    // Sizes rounding up to one class (steps of 1/8 of the power of two: 4 MiB here) share
    // buffers; sizes beyond do not.
    let near = vec![0u8; size - 1000];
    assert_eq!(
        near.as_ptr() as usize,
        at,
        "a size in the same class was not served"
    );
    let other = vec![0u8; size + 1000];
    assert_ne!(other.as_ptr() as usize, at);
    drop((near, other));

    // Small buffers are the system allocator's.
    let held = CACHE.held_bytes();
    drop(std::hint::black_box(vec![0u8; MIN_CACHED - 1]));
    assert_eq!(
        CACHE.held_bytes(),
        held,
        "a buffer under MIN_CACHED was kept"
    );

    // Buffers from MIN_LINE_ALIGNED up start on a cache line, cached or not, fresh or reused.
    for size in [
        MIN_LINE_ALIGNED,
        100_000,
        MIN_CACHED - 4,
        MIN_CACHED,
        size,
        size + 12,
    ] {
        let buffers: Vec<Vec<f32>> = (0..3).map(|_| vec![0f32; size / 4]).collect();
        for b in &buffers {
            assert_eq!(
                b.as_ptr() as usize % 64,
                0,
                "a buffer of {size} bytes is not line-aligned"
            );
        }
    }

    // Growing from the system's small buffers through line-aligned ones to cached ones keeps
    // the contents.
    let mut grown: Vec<u32> = Vec::new();
    for i in 0..(2 * MIN_CACHED / 4) as u32 {
        grown.push(i);
    }
    assert!(grown.iter().enumerate().all(|(i, &v)| v == i as u32));
    for len in [MIN_LINE_ALIGNED, MIN_LINE_ALIGNED / 8] {
        grown.truncate(len);
        grown.shrink_to_fit();
        assert!(grown.iter().enumerate().all(|(i, &v)| v == i as u32));
    }
    drop(grown);

    // Growing across classes keeps the contents.
    let mut grown: Vec<u32> = (0..(MIN_CACHED / 4) as u32).collect();
    grown.extend(0..(MIN_CACHED / 4) as u32);
    let half = MIN_CACHED / 4;
    assert!((0..half).all(|i| grown[i] == i as u32 && grown[half + i] == i as u32));
    drop(grown);

    // A fresh zeroed buffer is not written (the KV cache of gigabytes on the CPU): its pages
    // are not resident until used.
    let before = resident_bytes();
    assert!(before > 0, "/proc/self/statm unreadable");
    let cache = vec![0f32; 256 << 20];
    let after = resident_bytes();
    assert!(
        after.saturating_sub(before) < 64 << 20,
        "a fresh zeroed GiB made {} MiB resident",
        after.saturating_sub(before) >> 20
    );
    drop(cache);

    // What is held stays under the cap, whatever the sizes asked for. Untouched buffers: no
    // memory is written, only address space taken.
    let many: Vec<Vec<u8>> = (0..40)
        .map(|i| Vec::with_capacity((64 << 20) + i * (16 << 20)))
        .collect();
    drop(many);
    assert!(
        CACHE.held_bytes() <= MAX_HELD,
        "{} bytes held",
        CACHE.held_bytes()
    );
    assert!(CACHE.held_bytes() > 0);
    println!("heap: large buffers are line-aligned, recycled, zeroed when asked, within the cap");
}

/// The process's resident memory (Linux's `/proc/self/statm`, in pages of 4 KiB).
fn resident_bytes() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: usize = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

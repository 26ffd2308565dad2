//! The AVX2/FMA kernel of `rows_by_weights` (CPUs without AVX-512), for f32 weights and for bf16
//! ones widened in registers (`--dtype bf16` there), and what the 512-bit kernels share with it:
//! the walk over output tiles with its L2 prefetch of the next weight block, and a sum of four
//! vectors.

use std::arch::x86_64::*;

use half::bf16;

/// A weight type the tile reads eight at a time as f32.
pub(super) trait Lanes: Copy {
    /// The 8 values at `p`, as f32.
    ///
    /// # Safety
    /// AVX2 must be available; `p` points at 8 values.
    unsafe fn load8(p: *const Self) -> __m256;

    fn to_f32(self) -> f32;
}

impl Lanes for f32 {
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn load8(p: *const f32) -> __m256 {
        // SAFETY: the caller's contract.
        unsafe { _mm256_loadu_ps(p) }
    }

    fn to_f32(self) -> f32 {
        self
    }
}

/// A bf16 is the top half of the f32 of the same value: each widened by a shift.
impl Lanes for bf16 {
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn load8(p: *const bf16) -> __m256 {
        // SAFETY: the caller's contract: 8 values, 16 bytes.
        unsafe {
            let v = _mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i));
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(v))
        }
    }

    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
}

/// # Safety
/// AVX2 and FMA must be available; `x` holds `m * k` values, `w` `n * k`, `out` `m * n`.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn rows_by_weights<W: Lanes>(
    m: usize,
    k: usize,
    n: usize,
    x: &[f32],
    w: &[W],
    out: &mut [f32],
) {
    // SAFETY: the caller's contract bounds every tile's accesses.
    unsafe {
        walk_tiles(
            (m, n, k),
            w,
            (X_ROWS, W_ROWS, W_ROWS),
            |mr, full, at, pf| match (mr, full) {
                (4, true) => tile::<W, 4, 3>(k, n, x, w, out, at, pf),
                (3, true) => tile::<W, 3, 3>(k, n, x, w, out, at, pf),
                (2, true) => tile::<W, 2, 3>(k, n, x, w, out, at, pf),
                (_, true) => tile::<W, 1, 3>(k, n, x, w, out, at, pf),
                (4, false) => tile::<W, 4, 1>(k, n, x, w, out, at, pf),
                (3, false) => tile::<W, 3, 1>(k, n, x, w, out, at, pf),
                (2, false) => tile::<W, 2, 1>(k, n, x, w, out, at, pf),
                (_, false) => tile::<W, 1, 1>(k, n, x, w, out, at, pf),
            },
        );
    }
}

/// The walk of the kernels over an `[m, n]` output: panels of `panel` weight rows (a multiple of
/// `w_rows`), each against every group of up to `x_rows` rows of `x`, each group against the
/// panel's blocks of `w_rows` weight rows in turn; the next panel is prefetched in shares over
/// the panel's tiles (see [`NextBlock`]). A last block short of `w_rows` goes one weight row at
/// a time, without prefetch. `tile(mr, full, (r, j), pf)` computes `mr` rows of `x` from `r`
/// against the `w_rows` weight rows (`full`) or the one weight row from `j`.
///
/// With `panel == w_rows` a block is read from memory by the first group and found in L1 by
/// the others; a larger panel, read from L2 by every group but the first, lets a group's rows
/// stay in L1 across its blocks where all the rows would not fit.
#[inline(always)]
pub(super) fn walk_tiles<T>(
    (m, n, k): (usize, usize, usize),
    w: &[T],
    (x_rows, w_rows, panel): (usize, usize, usize),
    mut tile: impl FnMut(usize, bool, (usize, usize), Prefetch),
) {
    debug_assert!(panel >= w_rows && panel.is_multiple_of(w_rows));
    let groups = m.div_ceil(x_rows);
    let mut start = 0;
    while start < n {
        let end = (start + panel).min(n);
        let next = NextBlock::after(w, k, n, end, panel);
        let shares = groups * (end - start).div_ceil(w_rows);
        let mut p = 0;
        let mut r = 0;
        while r < m {
            let mr = (m - r).min(x_rows);
            let mut j = start;
            while j < end {
                let nr = (end - j).min(w_rows);
                if nr == w_rows {
                    tile(mr, true, (r, j), next.share(p, shares));
                } else {
                    for c in 0..nr {
                        tile(mr, false, (r, j + c), Prefetch::NONE);
                    }
                }
                j += nr;
                p += 1;
            }
            r += mr;
        }
        start = end;
    }
}

/// The register tile: 4 rows of `x` against 3 weight rows, 12 accumulators plus 3 weight
/// vectors and one of `x` (all 16 AVX2 registers), 7 loads per 12 FMAs. Against 2 x 4 (6 per
/// 8): 8-row decode steps 10-16% faster, one row the same.
const X_ROWS: usize = 4;
const W_ROWS: usize = 3;

const LINE: usize = 64;

/// The weight block after the one in use, to be prefetched into L2 while it is used. Only the
/// first group of x rows reads a block from memory (the others find it in L1), so each group
/// prefetches a share of the next block: else memory idles while later groups compute, and one
/// row alone has too few loads in flight to stream at full speed. Measured on one core, 40
/// distinct 3072 x 576 f32 matrices: 1 row 29 -> 15 ms, 8 rows 43 -> 25. (Prefetching into L1
/// evicts the block in use when rows are long.)
#[derive(Clone, Copy)]
struct NextBlock {
    at: *const i8,
    lines: usize,
}

impl NextBlock {
    /// The block of up to `rows` weight rows from row `from` of `w` (`n` rows of `k` values);
    /// empty past the end.
    fn after<T>(w: &[T], k: usize, n: usize, from: usize, rows: usize) -> Self {
        let from = from.min(n);
        let count = (from + rows).min(n) - from;
        Self {
            // SAFETY: `from * k` is at most `w.len()` (n rows of k values).
            at: unsafe { w.as_ptr().add(from * k) } as *const i8,
            lines: (count * k * size_of::<T>()).div_ceil(LINE),
        }
    }

    /// The share of group `p` of `groups`.
    fn share(self, p: usize, groups: usize) -> Prefetch {
        let (lo, hi) = (self.lines * p / groups, self.lines * (p + 1) / groups);
        Prefetch {
            // SAFETY: within (or one past) the block.
            at: unsafe { self.at.add(lo * LINE) },
            lines: hi - lo,
            issued: 0,
            due: 0,
        }
    }
}

/// Cache lines a tile prefetches, spread over its loop of `iters` steps.
#[derive(Clone, Copy)]
pub(super) struct Prefetch {
    at: *const i8,
    lines: usize,
    issued: usize,
    due: usize,
}

impl Prefetch {
    const NONE: Self = Self {
        at: std::ptr::null(),
        lines: 0,
        issued: 0,
        due: 0,
    };

    /// One step of a loop of `iters`: issues the lines due by now.
    #[inline(always)]
    pub(super) fn step(&mut self, iters: usize) {
        self.due += self.lines;
        while self.due >= iters && self.issued < self.lines {
            // SAFETY: prefetches never fault.
            unsafe { _mm_prefetch::<_MM_HINT_T1>(self.at.add(self.issued * LINE)) };
            self.issued += 1;
            self.due -= iters;
        }
    }

    /// Issues what the loop left.
    #[inline(always)]
    pub(super) fn finish(&mut self) {
        for line in self.issued..self.lines {
            // SAFETY: prefetches never fault.
            unsafe { _mm_prefetch::<_MM_HINT_T1>(self.at.add(line * LINE)) };
        }
        self.issued = self.lines;
    }
}

/// `MR` rows of `x` (from `r`) against `NR` rows of `w` (from `j`): `MR x NR` dot products,
/// eight lanes at a time, in registers.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn tile<W: Lanes, const MR: usize, const NR: usize>(
    k: usize,
    n: usize,
    x: &[f32],
    w: &[W],
    out: &mut [f32],
    (r, j): (usize, usize),
    mut pf: Prefetch,
) {
    // SAFETY: rows r..r+MR of x and j..j+NR of w exist (caller), each k long.
    unsafe {
        let iters = k / 8;
        let xp = x.as_ptr().add(r * k);
        let wp = w.as_ptr().add(j * k);
        let mut acc = [[_mm256_setzero_ps(); NR]; MR];
        let mut kk = 0;
        while kk + 8 <= k {
            pf.step(iters);
            let mut wv = [_mm256_setzero_ps(); NR];
            for (c, v) in wv.iter_mut().enumerate() {
                *v = W::load8(wp.add(c * k + kk));
            }
            for (i, row) in acc.iter_mut().enumerate() {
                let xv = _mm256_loadu_ps(xp.add(i * k + kk));
                for (a, v) in row.iter_mut().zip(&wv) {
                    *a = _mm256_fmadd_ps(xv, *v, *a);
                }
            }
            kk += 8;
        }
        pf.finish();
        for (i, row) in acc.iter().enumerate() {
            for (c, a) in row.iter().enumerate() {
                let mut lanes = [0f32; 8];
                _mm256_storeu_ps(lanes.as_mut_ptr(), *a);
                let mut s: f32 = lanes.iter().sum();
                for t in kk..k {
                    s += *xp.add(i * k + t) * (*wp.add(c * k + t)).to_f32();
                }
                *out.get_unchecked_mut((r + i) * n + j + c) = s;
            }
        }
    }
}

/// The sums of four vectors' lanes, in order: halves added, then pairwise sums across
/// the four (`hadd`), about half the shuffles of four separate reductions.
#[target_feature(enable = "avx512f")]
#[inline]
pub(super) fn sum4(a: [__m512; 4]) -> __m128 {
    let half = |v: __m512| {
        let hi = _mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v));
        _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(hi))
    };
    let h01 = _mm256_hadd_ps(half(a[0]), half(a[1]));
    let h23 = _mm256_hadd_ps(half(a[2]), half(a[3]));
    let h = _mm256_hadd_ps(h01, h23);
    _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps::<1>(h))
}

//! The AVX-512 kernel of `rows_by_weights`: f32 rows against f32 or bf16 weights, 32 values of
//! each row per step, summed by f32 FMAs. bf16 weights are widened in registers: each 64-byte
//! load of 32 weights becomes two f32 vectors, the even-indexed values by a shift and the
//! odd-indexed by a mask (a bf16 is the top half of an f32), met by rows stored with each step
//! split the same way (`bf16::widen::split_row`). f32 weights are two plain loads, met by rows
//! as they are.

use std::arch::x86_64::*;
use std::mem::MaybeUninit;

use half::bf16;

use super::x86::{Prefetch, sum4, walk_tiles};

/// Values per step: one 64-byte load of bf16 weights, two of f32.
const STEP: usize = 32;

/// A weight type of the kernel: how a step of its weights is loaded, and how its rows meet it.
pub(super) trait Weight: Copy {
    /// A step of weights as loaded.
    type Raw: Copy;

    /// The step's 32 weights from `p`, those outside `mask` zero.
    ///
    /// # Safety
    /// AVX-512 F and BW must be available; the masked-in weights exist.
    unsafe fn load(p: *const Self, mask: u32) -> Self::Raw;

    /// Half `h` (0 or 1) of a loaded step, as 16 f32 lane-aligned with half `h` of the rows'
    /// step.
    ///
    /// # Safety
    /// AVX-512 F and BW must be available.
    unsafe fn half(raw: Self::Raw, h: usize) -> __m512;

    /// The mask of half `h` of a rows' step whose values under `mask` exist: rows split for
    /// bf16 are padded to whole steps and need none.
    fn row_mask(mask: u32, h: usize) -> u16;
}

impl Weight for bf16 {
    type Raw = __m512i;

    #[target_feature(enable = "avx512f,avx512bw")]
    #[inline]
    unsafe fn load(p: *const Self, mask: u32) -> __m512i {
        // SAFETY: the caller's contract.
        unsafe {
            if mask == u32::MAX {
                _mm512_loadu_epi16(p as *const i16)
            } else {
                _mm512_maskz_loadu_epi16(mask, p as *const i16)
            }
        }
    }

    #[target_feature(enable = "avx512f,avx512bw")]
    #[inline]
    unsafe fn half(raw: __m512i, h: usize) -> __m512 {
        _mm512_castsi512_ps(if h == 0 {
            _mm512_slli_epi32::<16>(raw)
        } else {
            _mm512_and_si512(raw, _mm512_set1_epi32(0xffff_0000_u32 as i32))
        })
    }

    fn row_mask(_: u32, _: usize) -> u16 {
        u16::MAX
    }
}

impl Weight for f32 {
    type Raw = [__m512; 2];

    #[target_feature(enable = "avx512f,avx512bw")]
    #[inline]
    unsafe fn load(p: *const Self, mask: u32) -> [__m512; 2] {
        // SAFETY: the caller's contract.
        unsafe {
            if mask == u32::MAX {
                [_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16))]
            } else {
                // The second half may start past the weights' end (`wrapping_add`: no
                // pointer arithmetic past an allocation), where its mask loads nothing.
                [
                    _mm512_maskz_loadu_ps(Self::row_mask(mask, 0), p),
                    _mm512_maskz_loadu_ps(Self::row_mask(mask, 1), p.wrapping_add(16)),
                ]
            }
        }
    }

    #[target_feature(enable = "avx512f,avx512bw")]
    #[inline]
    unsafe fn half(raw: [__m512; 2], h: usize) -> __m512 {
        raw[h]
    }

    fn row_mask(mask: u32, h: usize) -> u16 {
        (mask >> (16 * h)) as u16
    }
}

/// The register tile: 8 rows against 3 weight rows, 24 accumulators plus 3 weight vectors (bf16
/// ones widened) and one of `x` (28 of the 32 registers); per step 2 x 24 FMAs on 16 row loads
/// and 3 weight loads and 6 widening instructions (bf16) or 6 weight loads (f32). Loads bound it
/// on the Xeon we measured (about two cycles per 64-byte load); of the tiles that do not spill,
/// 8 x 3 has the fewest loads per FMA (bf16, one core: 121-128 GFLOP/s, 5 x 4 96-125, 4 x 4
/// 111-120; 6 x 4 spills, 59). Loads that straddle two cache lines cost more again: the
/// binary's allocator starts large buffers on a line (`heap`).
const X_ROWS: usize = 8;
const W_ROWS: usize = 3;

/// The bytes of one group of f32 rows of `k` values, which should stay in L1 through a panel.
pub(super) fn group_bytes(k: usize) -> usize {
    X_ROWS * k * size_of::<f32>()
}

/// Weight rows per panel of the walk: about 128 KiB of weights (in L2), so that a group of rows
/// stays in L1 while it goes through the panel.
fn panel<W>(k: usize) -> usize {
    (128 * 1024 / (k * size_of::<W>()) / W_ROWS).max(1) * W_ROWS
}

/// `out[r * n + j] = x[r] . w[j]` for f32 rows `x` (`m` rows, `stride` apart, in the form `W`
/// needs) and weights `w` (`n` rows of `k`).
///
/// # Safety
/// AVX-512 F and BW must be available; `x` holds `(m - 1) * stride` values and a last row (of
/// `stride` values for split rows, `k` otherwise), `w` `n * k`, `out` `m * n` (every one of
/// which is written, so it need not be initialised).
#[target_feature(enable = "avx512f,avx512bw")]
pub(super) unsafe fn rows_by_weights<W: Weight>(
    (m, n, k): (usize, usize, usize),
    (x, stride): (&[f32], usize),
    w: &[W],
    out: &mut [MaybeUninit<f32>],
) {
    let t = (k, stride, n);
    // SAFETY: the caller's contract bounds every tile's accesses.
    unsafe {
        walk_tiles(
            (m, n, k),
            w,
            (X_ROWS, W_ROWS, panel::<W>(k)),
            |mr, full, at, pf| {
                // `tile::<W, MR, NR>` for the group's `mr` rows: `NR` 3 (a full block) or 1.
                macro_rules! by_rows {
                    ($nr:literal) => {
                        match mr {
                            8 => tile::<W, 8, $nr>(t, x, w, out, at, pf),
                            7 => tile::<W, 7, $nr>(t, x, w, out, at, pf),
                            6 => tile::<W, 6, $nr>(t, x, w, out, at, pf),
                            5 => tile::<W, 5, $nr>(t, x, w, out, at, pf),
                            4 => tile::<W, 4, $nr>(t, x, w, out, at, pf),
                            3 => tile::<W, 3, $nr>(t, x, w, out, at, pf),
                            2 => tile::<W, 2, $nr>(t, x, w, out, at, pf),
                            _ => tile::<W, 1, $nr>(t, x, w, out, at, pf),
                        }
                    };
                }
                if full { by_rows!(3) } else { by_rows!(1) }
            },
        );
    }
}

/// `MR` rows of `x` (from `r`) against `NR` rows of `w` (from `j`), 32 values per step, half by
/// half; the last partial step loads its weights under a mask (and rows that are not padded
/// too).
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
unsafe fn tile<W: Weight, const MR: usize, const NR: usize>(
    (k, stride, n): (usize, usize, usize),
    x: &[f32],
    w: &[W],
    out: &mut [MaybeUninit<f32>],
    (r, j): (usize, usize),
    mut pf: Prefetch,
) {
    // SAFETY: rows r..r+MR of x and j..j+NR of w exist (caller); the masked loads touch only
    // the first `k % 32` values of the last step.
    unsafe {
        let iters = k.div_ceil(STEP);
        let xp = x.as_ptr().add(r * stride);
        let wp = w.as_ptr().add(j * k);
        let mut acc = [[_mm512_setzero_ps(); NR]; MR];
        let mut kk = 0;
        while kk < k {
            pf.step(iters);
            let mask = if kk + STEP <= k {
                u32::MAX
            } else {
                (1u32 << (k - kk)) - 1
            };
            let mut raw = [W::load(wp.add(kk), mask); NR];
            for (c, v) in raw.iter_mut().enumerate().skip(1) {
                *v = W::load(wp.add(c * k + kk), mask);
            }
            for half in 0..2 {
                let mut wv = [_mm512_setzero_ps(); NR];
                for (v, b) in wv.iter_mut().zip(&raw) {
                    *v = W::half(*b, half);
                }
                let row_mask = W::row_mask(mask, half);
                for (i, row) in acc.iter_mut().enumerate() {
                    // Past the end of the rows in a last partial step only, and then masked.
                    let at = xp.wrapping_add(i * stride + kk + half * 16);
                    let xv = if row_mask == u16::MAX {
                        _mm512_loadu_ps(at)
                    } else {
                        _mm512_maskz_loadu_ps(row_mask, at)
                    };
                    for (a, v) in row.iter_mut().zip(&wv) {
                        *a = _mm512_fmadd_ps(xv, *v, *a);
                    }
                }
            }
            kk += STEP;
        }
        pf.finish();
        for (i, row) in acc.iter().enumerate() {
            let dst = out.as_mut_ptr().add((r + i) * n + j).cast::<f32>();
            if NR == 3 {
                let mut sums = [0f32; 4];
                _mm_storeu_ps(sums.as_mut_ptr(), sum4([row[0], row[1], row[2], row[0]]));
                std::ptr::copy_nonoverlapping(sums.as_ptr(), dst, 3);
            } else {
                for (c, a) in row.iter().enumerate() {
                    *dst.add(c) = _mm512_reduce_add_ps(*a);
                }
            }
        }
    }
}

//! The f32-FMA kernel for bf16 weights: each 64-byte load of 32 weights is widened in registers
//! into two f32 vectors (the even-indexed values by a shift, the odd-indexed by a mask: a bf16 is
//! the top half of an f32), and the rows, kept in f32, are stored with each 32-value step split
//! the same way ([`split_row`]), so that both halves meet their own weights lane by lane. For
//! CPUs whose `vdpbf16ps` runs at half the f32 FMA rate: there this does the products at the
//! FMA rate and still reads half the weight bytes.

use std::arch::x86_64::*;

use half::bf16;

use super::super::x86::{Prefetch, sum4, walk_tiles};

/// Values per step: one 64-byte load of bf16 weights.
pub const STEP: usize = 32;

/// The length of a split row of `k` values: whole steps, the last padded with zeros.
pub fn split_len(k: usize) -> usize {
    k.div_ceil(STEP) * STEP
}

/// `dst` = `src` with each step of 32 values reordered as its 16 even-indexed values then its 16
/// odd-indexed ones, the last step padded with zeros.
///
/// # Safety
/// AVX-512 F must be available; `dst.len() == split_len(src.len())`.
#[target_feature(enable = "avx512f")]
pub unsafe fn split_row(src: &[f32], dst: &mut [f32]) {
    let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    let odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    for (d, s) in dst.chunks_exact_mut(STEP).zip(src.chunks(STEP)) {
        let mut step = [0f32; STEP];
        step[..s.len()].copy_from_slice(s);
        // SAFETY: `step` holds 32 values and `d` 32 (`chunks_exact_mut` of STEP).
        unsafe {
            let lo = _mm512_loadu_ps(step.as_ptr());
            let hi = _mm512_loadu_ps(step.as_ptr().add(16));
            _mm512_storeu_ps(d.as_mut_ptr(), _mm512_permutex2var_ps(lo, even, hi));
            _mm512_storeu_ps(d.as_mut_ptr().add(16), _mm512_permutex2var_ps(lo, odd, hi));
        }
    }
}

/// The register tile: 8 rows against 3 weight rows, 24 accumulators plus 3 widened weight
/// vectors and one of `x` (28 of the 32 registers); per step 3 weight loads, 6 widening
/// instructions and 2 x 24 FMAs on 16 row loads. Loads bound it on the Xeon we measured (about
/// two cycles per 64-byte load); of the tiles that do not spill, 8 x 3 has the fewest loads per
/// FMA (measured 121-128 GFLOP/s per core, 5 x 4 96-125, 4 x 4 111-120; 6 x 4 spills, 59).
const X_ROWS: usize = 8;
const W_ROWS: usize = 3;

/// Weight rows per panel of the walk: about 128 KiB of weights (in L2), so that a group of rows
/// stays in L1 while it goes through the panel.
fn panel(k: usize) -> usize {
    (128 * 1024 / (2 * k) / W_ROWS).max(1) * W_ROWS
}

/// `out[r * n + j] = x[r] . w[j]` for split f32 rows `x` (`m` rows of `split_len(k)`) and bf16
/// weights `w` (`n` rows of `k`).
///
/// # Safety
/// AVX-512 F and BW must be available; `x` holds `m * split_len(k)` values, `w` `n * k`, `out`
/// `m * n`.
#[target_feature(enable = "avx512f,avx512bw")]
pub unsafe fn rows_by_weights(
    (m, n, k): (usize, usize, usize),
    x: &[f32],
    w: &[bf16],
    out: &mut [f32],
) {
    let kp = split_len(k);
    let t = (k, kp, n);
    // SAFETY: the caller's contract bounds every tile's accesses.
    unsafe {
        walk_tiles(
            (m, n, k),
            w,
            (X_ROWS, W_ROWS, panel(k)),
            |mr, full, at, pf| {
                // `tile::<MR, NR>` for the group's `mr` rows: `NR` 3 (a full block) or 1.
                macro_rules! by_rows {
                    ($nr:literal) => {
                        match mr {
                            8 => tile::<8, $nr>(t, x, w, out, at, pf),
                            7 => tile::<7, $nr>(t, x, w, out, at, pf),
                            6 => tile::<6, $nr>(t, x, w, out, at, pf),
                            5 => tile::<5, $nr>(t, x, w, out, at, pf),
                            4 => tile::<4, $nr>(t, x, w, out, at, pf),
                            3 => tile::<3, $nr>(t, x, w, out, at, pf),
                            2 => tile::<2, $nr>(t, x, w, out, at, pf),
                            _ => tile::<1, $nr>(t, x, w, out, at, pf),
                        }
                    };
                }
                if full { by_rows!(3) } else { by_rows!(1) }
            },
        );
    }
}

/// `MR` rows of `x` (from `r`) against `NR` rows of `w` (from `j`), 32 values per step; the last
/// partial step loads its weights with a mask (the rows' padding is zero).
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
unsafe fn tile<const MR: usize, const NR: usize>(
    (k, kp, n): (usize, usize, usize),
    x: &[f32],
    w: &[bf16],
    out: &mut [f32],
    (r, j): (usize, usize),
    mut pf: Prefetch,
) {
    // SAFETY: rows r..r+MR of x (kp long) and j..j+NR of w (k long) exist (caller); the masked
    // loads touch only the first `k % 32` weights of the last step.
    unsafe {
        let iters = kp / STEP;
        let xp = x.as_ptr().add(r * kp);
        let wp = w.as_ptr().add(j * k) as *const i16;
        let mut acc = [[_mm512_setzero_ps(); NR]; MR];
        let mut kk = 0;
        while kk + STEP <= k {
            pf.step(iters);
            step::<MR, NR>(&mut acc, (xp.add(kk), kp), (wp.add(kk), k), u32::MAX);
            kk += STEP;
        }
        if kk < k {
            pf.step(iters);
            let mask = (1u32 << (k - kk)) - 1;
            step::<MR, NR>(&mut acc, (xp.add(kk), kp), (wp.add(kk), k), mask);
        }
        pf.finish();
        for (i, row) in acc.iter().enumerate() {
            let dst = out.as_mut_ptr().add((r + i) * n + j);
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

/// One step of [`tile`]: the 32 weights of each weight row at `wp` (rows `k` apart), loaded
/// under `mask` (plain loads for a full step), widened, against the split rows at `xp` (rows
/// `kp` apart).
///
/// # Safety
/// As for `tile`; the masked-in weights and 32 row values per row exist.
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
unsafe fn step<const MR: usize, const NR: usize>(
    acc: &mut [[__m512; NR]; MR],
    (xp, kp): (*const f32, usize),
    (wp, k): (*const i16, usize),
    mask: u32,
) {
    // SAFETY: the caller's contract.
    unsafe {
        let mut raw = [_mm512_setzero_si512(); NR];
        for (c, v) in raw.iter_mut().enumerate() {
            *v = if mask == u32::MAX {
                _mm512_loadu_epi16(wp.add(c * k))
            } else {
                _mm512_maskz_loadu_epi16(mask, wp.add(c * k))
            };
        }
        let top = _mm512_set1_epi32(0xffff_0000_u32 as i32);
        for half in 0..2 {
            let mut wv = [_mm512_setzero_ps(); NR];
            for (v, b) in wv.iter_mut().zip(&raw) {
                *v = _mm512_castsi512_ps(if half == 0 {
                    _mm512_slli_epi32::<16>(*b)
                } else {
                    _mm512_and_si512(*b, top)
                });
            }
            for (i, row) in acc.iter_mut().enumerate() {
                let xv = _mm512_loadu_ps(xp.add(i * kp + half * 16));
                for (a, v) in row.iter_mut().zip(&wv) {
                    *a = _mm512_fmadd_ps(xv, *v, *a);
                }
            }
        }
    }
}

//! The `vdpbf16ps` kernel: rows rounded to bf16, 32 products of bf16 pairs per instruction.

use std::arch::x86_64::*;
use std::mem::MaybeUninit;

use half::bf16;

use super::super::x86::{Prefetch, sum4, walk_tiles};

/// `dst[i] = bf16(src[i])`, rounded to nearest even; every element of `dst` is written.
///
/// # Safety
/// AVX-512 F, BW and BF16 must be available; `src` and `dst` have the same length.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub unsafe fn round(src: &[f32], dst: &mut [MaybeUninit<bf16>]) {
    // SAFETY: 32 values per step while 32 remain; the rest one by one.
    unsafe {
        let mut i = 0;
        while i + 32 <= src.len() {
            let lo = _mm512_loadu_ps(src.as_ptr().add(i));
            let hi = _mm512_loadu_ps(src.as_ptr().add(i + 16));
            let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
            _mm512_storeu_epi16(dst.as_mut_ptr().add(i) as *mut i16, v);
            i += 32;
        }
        for (d, s) in dst[i..].iter_mut().zip(&src[i..]) {
            d.write(bf16::from_f32(*s));
        }
    }
}

/// The register tile: 4 rows of `x` against 4 weight rows, 16 accumulators plus 4 weight
/// vectors and one of `x` (21 of the 32 registers), 8 loads per 16 `vdpbf16ps`.
const X_ROWS: usize = 4;
const W_ROWS: usize = 4;

/// # Safety
/// AVX-512 F, BW and BF16 must be available; `x` holds `m * k` values, `w` `n * k`, `out`
/// `m * n`.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub unsafe fn rows_by_weights(
    m: usize,
    k: usize,
    n: usize,
    x: &[bf16],
    w: &[bf16],
    out: &mut [f32],
) {
    // SAFETY: the caller's contract bounds every tile's accesses.
    unsafe {
        walk_tiles(
            (m, n, k),
            w,
            (X_ROWS, W_ROWS, W_ROWS),
            |mr, full, at, pf| match (mr, full) {
                (4, true) => tile::<4, 4>(k, n, x, w, out, at, pf),
                (3, true) => tile::<3, 4>(k, n, x, w, out, at, pf),
                (2, true) => tile::<2, 4>(k, n, x, w, out, at, pf),
                (_, true) => tile::<1, 4>(k, n, x, w, out, at, pf),
                (4, false) => tile::<4, 1>(k, n, x, w, out, at, pf),
                (3, false) => tile::<3, 1>(k, n, x, w, out, at, pf),
                (2, false) => tile::<2, 1>(k, n, x, w, out, at, pf),
                (_, false) => tile::<1, 1>(k, n, x, w, out, at, pf),
            },
        );
    }
}

/// `MR` rows of `x` (from `r`) against `NR` rows of `w` (from `j`), 32 pairs per step; the
/// last partial step loads with a mask (zeros add nothing).
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
#[inline]
unsafe fn tile<const MR: usize, const NR: usize>(
    k: usize,
    n: usize,
    x: &[bf16],
    w: &[bf16],
    out: &mut [f32],
    (r, j): (usize, usize),
    mut pf: Prefetch,
) {
    // SAFETY: rows r..r+MR of x and j..j+NR of w exist (caller), each k long; the masked
    // loads touch only the first `k % 32` values of the last step.
    unsafe {
        let iters = k.div_ceil(32);
        let xp = x.as_ptr().add(r * k) as *const i16;
        let wp = w.as_ptr().add(j * k) as *const i16;
        let mut acc = [[_mm512_setzero_ps(); NR]; MR];
        let mut kk = 0;
        while kk + 32 <= k {
            pf.step(iters);
            pairs::<MR, NR>(&mut acc, xp.add(kk), wp.add(kk), k, u32::MAX);
            kk += 32;
        }
        if kk < k {
            pf.step(iters);
            let mask = (1u32 << (k - kk)) - 1;
            pairs::<MR, NR>(&mut acc, xp.add(kk), wp.add(kk), k, mask);
        }
        pf.finish();
        for (i, row) in acc.iter().enumerate() {
            let dst = out.as_mut_ptr().add((r + i) * n + j);
            if NR == 4 {
                _mm_storeu_ps(dst, sum4([row[0], row[1], row[2], row[3]]));
            } else {
                for (c, a) in row.iter().enumerate() {
                    *dst.add(c) = _mm512_reduce_add_ps(*a);
                }
            }
        }
    }
}

/// One step of [`tile`]: the 32 pairs from `xp` and `wp` (rows `k` apart), loaded under
/// `mask` (plain loads for a full step), into the accumulators.
///
/// # Safety
/// As for `tile`; the masked-in values exist.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
#[inline]
unsafe fn pairs<const MR: usize, const NR: usize>(
    acc: &mut [[__m512; NR]; MR],
    xp: *const i16,
    wp: *const i16,
    k: usize,
    mask: u32,
) {
    // SAFETY: the caller's contract.
    unsafe {
        let load = |p: *const i16| {
            if mask == u32::MAX {
                _mm512_loadu_epi16(p)
            } else {
                _mm512_maskz_loadu_epi16(mask, p)
            }
        };
        let mut wv = [_mm512_setzero_si512(); NR];
        for (c, v) in wv.iter_mut().enumerate() {
            *v = load(wp.add(c * k));
        }
        for (i, row) in acc.iter_mut().enumerate() {
            let xv = as_bh(load(xp.add(i * k)));
            for (a, v) in row.iter_mut().zip(&wv) {
                *a = _mm512_dpbf16_ps(*a, xv, as_bh(*v));
            }
        }
    }
}

#[inline(always)]
fn as_bh(v: __m512i) -> __m512bh {
    // SAFETY: both are 64 plain bytes.
    unsafe { std::mem::transmute::<__m512i, __m512bh>(v) }
}

//! bf16 weights by f32 FMAs (`gemm::avx512`, which widens each 64-byte load of 32 weights in
//! registers into their even- and odd-indexed values): the rows, kept in f32, stored with each
//! 32-value step split the same way ([`split_row`]), so that both halves meet their own weights
//! lane by lane. For CPUs whose `vdpbf16ps` runs at half the f32 FMA rate: there this does the
//! products at the FMA rate and still reads half the weight bytes.

use std::arch::x86_64::*;

use half::bf16;

use super::super::{as_uninit, avx512};

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
    // SAFETY: the caller's contract, with rows `split_len(k)` apart.
    unsafe { avx512::rows_by_weights((m, n, k), (x, split_len(k)), w, as_uninit(out)) }
}

//! int8 panels as the AMX unit's B operand (`quant_amx`): a pair row's two values are two
//! consecutive 32-byte rows of the panel (`[k][32]` int8), so each is two 16-byte loads, a
//! widening and the block's scales.

use std::arch::x86_64::*;

use super::{BLOCK, Int8Weights};
use crate::gemm::PANEL;
use crate::gemm::quant_amx::pair_rows;

/// Features `f .. f + 16` of `w` as one B operand, `q * scale` rounded to bf16
/// (`QuantPanels::widen_for_amx`).
///
/// # Safety
/// As `QuantPanels::widen_for_amx`.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub(super) unsafe fn widen_features(w: &Int8Weights, f: usize, dst: &mut [u32]) {
    let k = w.k;
    let (panel, h) = (f / PANEL, f % PANEL);
    let q = &w.q[panel * k * PANEL..][..k * PANEL];
    let scales = &w.scales[panel * (k / BLOCK) * PANEL..][..(k / BLOCK) * PANEL];
    let values = |p: usize| {
        // SAFETY: rows 2p and 2p + 1 of the panel's `k` rows of 32 values, 16 of them
        // from `h` (0 or 16); the block's 32 scales (`k % 32 == 0`: both in one block).
        unsafe {
            let s = scales.as_ptr().add(2 * p / BLOCK * PANEL + h);
            let s = _mm512_cvtph_ps(_mm256_loadu_si256(s.cast()));
            let widen = |row: usize| {
                let v = _mm_loadu_si128(q.as_ptr().add(row * PANEL + h).cast());
                _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v)), s)
            };
            (widen(2 * p), widen(2 * p + 1))
        }
    };
    // SAFETY: the caller's contract (AVX-512, `dst`'s size).
    unsafe { pair_rows(k, dst, values) }
}

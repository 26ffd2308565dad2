//! 4-bit panels as the AMX unit's B operand (`quant_amx`): a pair row's two values are two
//! consecutive 16-byte steps of the panel, whose low four bits hold its first 16 features and
//! high four bits the other 16, so each is one load, a widening, a mask (low halves) or a
//! shift (high), and the block's scale and minimum.

use std::arch::x86_64::*;

use super::{BLOCK, Int4Weights, blocks};
use crate::gemm::PANEL;
use crate::gemm::quant_amx::pair_rows;

/// Features `f .. f + 16` of `w` as one B operand, `code * scale + min` (one rounding, as
/// `BlockValues::value`) rounded to bf16 (`QuantPanels::widen_for_amx`).
///
/// # Safety
/// As `QuantPanels::widen_for_amx`.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub(super) unsafe fn widen_features(w: &Int4Weights, f: usize, dst: &mut [u32]) {
    // SAFETY: the caller's contract. Features from 16 sit in the high halves of the bytes:
    // a shift alone takes them, a mask alone the low ones.
    unsafe {
        if f % PANEL < 16 {
            widen_half::<false>(w, f, dst)
        } else {
            widen_half::<true>(w, f, dst)
        }
    }
}

/// [`widen_features`] for features in the low (`HIGH` false) or high halves of the bytes.
///
/// # Safety
/// As `QuantPanels::widen_for_amx`.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
#[inline]
unsafe fn widen_half<const HIGH: bool>(w: &Int4Weights, f: usize, dst: &mut [u32]) {
    let (k, kb) = (w.k, blocks(w.k));
    let (panel, h) = (f / PANEL, f % PANEL);
    let q = &w.q[panel * k * PANEL / 2..][..k * PANEL / 2];
    let dm = &w.dm[panel * kb * 2 * PANEL..][..kb * 2 * PANEL];
    let nibble = _mm512_set1_epi32(0x0f);
    let values = |p: usize| {
        // SAFETY: steps 2p and 2p + 1 of the panel's `k` steps of 16 bytes; the block's 32
        // scales and 32 minimums, 16 of each from `h` (`k % 32 == 0`: both in one block).
        unsafe {
            let at = 2 * p / BLOCK * 2 * PANEL + h;
            let widen_f16 =
                |at: usize| _mm512_cvtph_ps(_mm256_loadu_si256(dm.as_ptr().add(at).cast()));
            let (scale, min) = (widen_f16(at), widen_f16(at + PANEL));
            let widen = |step: usize| {
                let v = _mm_loadu_si128(q.as_ptr().add(step * PANEL / 2).cast());
                let bytes = _mm512_cvtepu8_epi32(v);
                let codes = if HIGH {
                    _mm512_srli_epi32::<4>(bytes)
                } else {
                    _mm512_and_si512(bytes, nibble)
                };
                _mm512_fmadd_ps(_mm512_cvtepi32_ps(codes), scale, min)
            };
            (widen(2 * p), widen(2 * p + 1))
        }
    };
    // SAFETY: the caller's contract (AVX-512, `dst`'s size).
    unsafe { pair_rows(k, dst, values) }
}

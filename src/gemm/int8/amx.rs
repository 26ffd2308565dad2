//! int8 weights on the AMX unit (`--quantization int8 --dtype bf16` on CPUs with AMX): each
//! panel of 32 output features is widened once per product to bf16 (`q * scale`, rounded to
//! nearest even) straight into the layout of the unit's B operand, and the x rows, rounded to
//! bf16 once per product, are the A operand as they lie (16 rows read 64 bytes at a time). So a
//! result tile is `[16 x rows][16 features]`, the outputs' own layout: no transposes, unlike
//! the bf16 weights' kernel (`bf16::amx`), whose weights are the A operand.
//!
//! A B tile's row `p` holds, for 16 features, their values `2p` and `2p + 1` of `k` as a pair;
//! in the panel (`[k][32]` int8) those are two consecutive 32-byte rows, so each pair row is two
//! 16-byte loads, a widening, the scales (both values lie in one block of 32), a rounding and
//! one interleave.

use std::arch::asm;
use std::arch::x86_64::*;
use std::mem::MaybeUninit;
use std::ops::Range;

use half::bf16;

use super::{BLOCK, Int8Weights};
use crate::gemm::PANEL;
use crate::gemm::bf16::amx::{K_STEP, configured};

/// Rows of a tile (x rows or pair rows), and features per B tile.
const TILE: usize = 16;

/// The f32 rows `x` (`[m, k]`) rounded to bf16, in rows of `k`, and 16 zero rows after them
/// (so that a tile read from any row stays inside).
///
/// # Safety
/// AVX-512 F and BF16 must be available; `k % 32 == 0`; `x.len() >= m * k`.
#[target_feature(enable = "avx512f,avx512bf16")]
pub unsafe fn rows_to_bf16(x: &[f32], m: usize, k: usize) -> Vec<bf16> {
    let mut dst = vec![bf16::ZERO; (m + TILE) * k];
    for (src, row) in x[..m * k].chunks_exact(k).zip(dst.chunks_exact_mut(k)) {
        for (s, d) in src.chunks_exact(K_STEP).zip(row.chunks_exact_mut(K_STEP)) {
            // SAFETY: 32 values read from `s` and written to `d`, both that long.
            unsafe {
                let (lo, hi) = (
                    _mm512_loadu_ps(s.as_ptr()),
                    _mm512_loadu_ps(s.as_ptr().add(16)),
                );
                let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
                _mm512_storeu_si512(d.as_mut_ptr().cast(), v);
            }
        }
    }
    dst
}

/// Panel `panel` of `w` as two B operands (features 0-15, then 16-31), each `k / 2` pair rows of
/// 16 features: `dst[(h * k / 2 + p) * 16 + c]` holds feature `16h + c`'s values `2p` (low
/// half) and `2p + 1` (high half), `q * scale` rounded to bf16.
///
/// # Safety
/// AVX-512 F, BW and BF16 must be available; `w.k % 32 == 0`; `panel < w.n.div_ceil(32)`;
/// `dst.len() >= 32 * w.k / 2`.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn widen_panel(w: &Int8Weights, panel: usize, dst: &mut [u32]) {
    let k = w.k;
    let q = &w.q[panel * k * PANEL..][..k * PANEL];
    let scales = &w.scales[panel * (k / BLOCK) * PANEL..][..(k / BLOCK) * PANEL];
    // Word 2i of the result takes word i (value 2p of feature i), word 2i + 1 word 16 + i.
    let interleave = _mm512_set_epi16(
        31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4,
        19, 3, 18, 2, 17, 1, 16, 0,
    );
    for p in 0..k / 2 {
        let block = 2 * p / BLOCK;
        for h in 0..2 {
            // SAFETY: rows 2p and 2p + 1 of the panel's `k` rows of 32 values, 16 of them from
            // 16h; the block's 32 scales; one store of 16 pairs within `dst` (caller).
            unsafe {
                let even = _mm_loadu_si128(q.as_ptr().add(2 * p * PANEL + 16 * h).cast());
                let odd = _mm_loadu_si128(q.as_ptr().add((2 * p + 1) * PANEL + 16 * h).cast());
                let s = _mm512_loadu_ps(scales.as_ptr().add(block * PANEL + 16 * h));
                let widen = |v| _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v)), s);
                let both: __m512i =
                    std::mem::transmute(_mm512_cvtne2ps_pbh(widen(odd), widen(even)));
                let pairs = _mm512_permutexvar_epi16(interleave, both);
                let at = dst.as_mut_ptr().add((h * k / 2 + p) * TILE);
                _mm512_storeu_si512(at.cast(), pairs);
            }
        }
    }
}

/// `out[r * cols.len() + c] = x[r] . w[cols.start + c]` for the first `m` x rows of `xb`,
/// rounded to bf16 ([`rows_to_bf16`]), and the weights' features `cols` (whole panels, or up
/// to the last feature), into outputs not yet written (every one of the `m * cols.len()` is).
///
/// # Safety
/// AVX-512 F, BW and BF16 and `bf16::amx::usable` must hold; `w.k % 32 == 0`; `xb` holds
/// `m + 16` rows of `w.k` (tiles read up to 16 rows past `m`; their products are dropped);
/// `cols.start % 32 == 0`, `cols.end <= w.n`; `out.len() >= m * cols.len()`.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub unsafe fn rows_by_panels(
    w: &Int8Weights,
    (xb, m): (&[bf16], usize),
    cols: Range<usize>,
    out: &mut [MaybeUninit<f32>],
) {
    let (k, width) = (w.k, cols.len());
    let mut pairs = vec![0u32; PANEL * k / 2];
    // A result tile that does not fit whole in `out` (the last rows or features) lands here.
    let mut spill = [0f32; TILE * TILE];
    let (x_bytes, b_bytes, out_bytes) = (k * 2, TILE * 4, width * 4);
    // SAFETY: AMX is usable (caller). Tiles read `xb` rows below `m + 16` and pair rows within
    // `pairs`; stores go to whole tiles inside `out` or to `spill`.
    unsafe {
        configured(|| {
            for j0 in cols.clone().step_by(PANEL) {
                widen_panel(w, j0 / PANEL, &mut pairs);
                let halves = [0, 1].map(|h| pairs.as_ptr().add(h * k / 2 * TILE));
                for t in (0..m).step_by(2 * TILE) {
                    let two = m - t > TILE;
                    asm!(
                        "tilezero tmm0",
                        "tilezero tmm1",
                        "tilezero tmm2",
                        "tilezero tmm3",
                        options(nostack, nomem)
                    );
                    for step in 0..k / K_STEP {
                        let a0 = xb.as_ptr().add(t * k + step * K_STEP);
                        let (b0, b1) = (
                            halves[0].add(step * TILE * TILE),
                            halves[1].add(step * TILE * TILE),
                        );
                        if two {
                            asm!(
                                "tileloadd tmm4, [{a0} + {xs}*1]",
                                "tileloadd tmm6, [{b0} + {bs}*1]",
                                "tdpbf16ps tmm0, tmm4, tmm6",
                                "tileloadd tmm7, [{b1} + {bs}*1]",
                                "tdpbf16ps tmm1, tmm4, tmm7",
                                "tileloadd tmm5, [{a1} + {xs}*1]",
                                "tdpbf16ps tmm2, tmm5, tmm6",
                                "tdpbf16ps tmm3, tmm5, tmm7",
                                a0 = in(reg) a0,
                                a1 = in(reg) a0.add(TILE * k),
                                b0 = in(reg) b0,
                                b1 = in(reg) b1,
                                xs = in(reg) x_bytes,
                                bs = in(reg) b_bytes,
                                options(nostack, readonly)
                            );
                        } else {
                            asm!(
                                "tileloadd tmm4, [{a0} + {xs}*1]",
                                "tileloadd tmm6, [{b0} + {bs}*1]",
                                "tdpbf16ps tmm0, tmm4, tmm6",
                                "tileloadd tmm7, [{b1} + {bs}*1]",
                                "tdpbf16ps tmm1, tmm4, tmm7",
                                a0 = in(reg) a0,
                                b0 = in(reg) b0,
                                b1 = in(reg) b1,
                                xs = in(reg) x_bytes,
                                bs = in(reg) b_bytes,
                                options(nostack, readonly)
                            );
                        }
                    }
                    let c = j0 - cols.start;
                    for (tile, (dt, dc)) in [(0, 0), (0, TILE), (TILE, 0), (TILE, TILE)]
                        .into_iter()
                        .enumerate()
                    {
                        if t + dt >= m || c + dc >= width {
                            continue;
                        }
                        let rows = (m - t - dt).min(TILE);
                        let feats = (width - c - dc).min(TILE);
                        let whole = rows == TILE && feats == TILE;
                        let dst = if whole {
                            out.as_mut_ptr()
                                .add((t + dt) * width + c + dc)
                                .cast::<f32>()
                        } else {
                            spill.as_mut_ptr()
                        };
                        let stride = if whole { out_bytes } else { b_bytes };
                        store_tile(tile, dst, stride);
                        if !whole {
                            for r in 0..rows {
                                let at = (t + dt + r) * width + c + dc;
                                for (o, v) in out[at..at + feats].iter_mut().zip(&spill[r * TILE..])
                                {
                                    o.write(*v);
                                }
                            }
                        }
                    }
                }
            }
        })
    }
}

/// `tilestored` of result tile `tile` (0-3) to `dst`, rows `stride` bytes apart.
///
/// # Safety
/// The tiles configured; `dst` has room for 16 rows of 64 bytes, `stride` apart.
unsafe fn store_tile(tile: usize, dst: *mut f32, stride: usize) {
    macro_rules! store {
        ($tmm:literal) => {
            asm!(
                concat!("tilestored [{d} + {s}*1], ", $tmm),
                d = in(reg) dst,
                s = in(reg) stride,
                options(nostack)
            )
        };
    }
    // SAFETY: the caller's contract.
    unsafe {
        match tile {
            0 => store!("tmm0"),
            1 => store!("tmm1"),
            2 => store!("tmm2"),
            _ => store!("tmm3"),
        }
    }
}

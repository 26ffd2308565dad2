//! Quantized weights on the AMX unit (`--quantization int8|int4 --dtype bf16` on CPUs with
//! AMX): each panel of 32 output features is widened once per product to bf16 (the values
//! [`BlockValues::value`] computes, rounded to nearest even) straight into the layout of the
//! unit's B operand (`QuantPanels::widen_for_amx`, one per scheme), and the x rows, rounded to
//! bf16 once per product, are the A operand as they lie (16 rows read 64 bytes at a time). So a
//! result tile is `[16 x rows][16 features]`, the outputs' own layout: no transposes, unlike
//! the bf16 weights' kernel (`bf16::amx`), whose weights are the A operand.
//!
//! A B tile's row `p` holds, for 16 features, their values `2p` and `2p + 1` of `k` as a pair;
//! both lie in one block of 32, so each pair row takes one block's scales. Each pass takes two
//! groups of 16 features: the two halves of a panel, or, for a gate/up matrix, 16 gate features
//! and the same 16 up ones, whose tiles become `silu(gate) * up` as they leave the unit
//! ([`rows_by_gate_up_silu`]).

use std::arch::asm;
use std::arch::x86_64::*;
use std::mem::MaybeUninit;
use std::ops::Range;

use half::bf16;
use rayon::prelude::*;

use super::PANEL;
use super::quant::QuantPanels;
use crate::gemm::bf16::amx::{K_STEP, block_step, configured, zero_results};
use crate::gemm::bf16::round_for_amx;

/// Rows of a tile (x rows or pair rows), and features per B tile.
const TILE: usize = 16;

/// The f32 rows `x` (`[m, k]`) rounded to bf16 (`bf16::round_for_amx`), in rows of `k`, and 16
/// zero rows after them (so that a tile read from any row stays inside); rows in parallel,
/// written once (for a prefill of 8192 rows this is tens of MB, which one thread would take
/// milliseconds per product to convert).
pub fn rows_to_bf16(x: &[f32], m: usize, k: usize) -> Vec<bf16> {
    let len = (m + TILE) * k;
    let mut dst = Vec::with_capacity(len);
    dst.spare_capacity_mut()[..len]
        .par_chunks_mut(k)
        .enumerate()
        .with_min_len(8)
        .for_each(|(r, row)| match r < m {
            true => round_for_amx(&x[r * k..][..k], row),
            false => row.fill(MaybeUninit::new(bf16::ZERO)),
        });
    // SAFETY: the `m + 16` rows of `k` cover `len`, and each was written above.
    unsafe { dst.set_len(len) };
    dst
}

/// Writes a B operand of `k / 2` pair rows into `dst` from `values(p)`: the f32 values `2p` and
/// `2p + 1` of `k` of its 16 features, each rounded to bf16 (nearest even) and paired as
/// [`QuantPanels::widen_for_amx`] lays them out.
///
/// # Safety
/// AVX-512 F, BW and BF16 must be available; `dst.len() >= 8 * k`.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
#[inline]
pub(super) unsafe fn pair_rows(
    k: usize,
    dst: &mut [u32],
    mut values: impl FnMut(usize) -> (__m512, __m512),
) {
    assert!(
        dst.len() >= k / 2 * TILE,
        "pair_rows: {} values for k = {k}",
        dst.len()
    );
    // Word 2i of the result takes word i (value 2p of feature i), word 2i + 1 word 16 + i.
    let interleave = _mm512_set_epi16(
        31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4,
        19, 3, 18, 2, 17, 1, 16, 0,
    );
    for p in 0..k / 2 {
        let (even, odd) = values(p);
        // SAFETY: one store of 16 pairs, within `dst` (asserted).
        unsafe {
            let both: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(odd, even));
            let pairs = _mm512_permutexvar_epi16(interleave, both);
            _mm512_storeu_si512(dst.as_mut_ptr().add(p * TILE).cast(), pairs);
        }
    }
}

/// `out[r * cols.len() + c] = x[r] . w[cols.start + c]` for the first `m` x rows of `xb`,
/// rounded to bf16 ([`rows_to_bf16`]), and the weights' features `cols` (whole panels, or up
/// to the last feature), into outputs not yet written (every one of the `m * cols.len()` is).
///
/// # Safety
/// AVX-512 F, BW and BF16 and `bf16::amx::usable` must hold; `w`'s `k % 32 == 0`; `xb` holds
/// `m + 16` rows of `k` (tiles read up to 16 rows past `m`; their products are dropped);
/// `cols.start % 32 == 0`, `cols.end <= n`; `out.len() >= m * cols.len()`.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub unsafe fn rows_by_panels<W: QuantPanels + ?Sized>(
    w: &W,
    (xb, m): (&[bf16], usize),
    cols: Range<usize>,
    out: &mut [MaybeUninit<f32>],
) {
    let width = cols.len();
    // A result tile that does not fit whole in `out` (the last rows or features) lands here.
    let mut spill = [0f32; TILE * TILE];
    // SAFETY: the caller's contract; features `j0 .. j0 + 32` lie in one panel. The stores go
    // to whole tiles inside `out` (rows below `m`, features below `cols.end`) or to `spill`.
    unsafe {
        let features = cols.clone().step_by(PANEL).map(|j0| [j0, j0 + TILE]);
        tile_products(w, (xb, m), features, |[j0, _], t| {
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
                let at = (t + dt) * width + c + dc;
                if rows == TILE && feats == TILE {
                    store_tile(tile, out.as_mut_ptr().add(at).cast(), width * 4);
                    continue;
                }
                store_tile(tile, spill.as_mut_ptr(), TILE * 4);
                for r in 0..rows {
                    let src = &spill[r * TILE..][..feats];
                    for (o, v) in out[at + r * width..][..feats].iter_mut().zip(src) {
                        o.write(*v);
                    }
                }
            }
        })
    }
}

/// `out[r * cols.len() + c] = silu(x[r] . w[j]) * (x[r] . w[h + j])` for `j = cols.start + c`
/// and a gate/up matrix `w` (`[2h, k]`: the gate rows, then the up rows), as
/// [`rows_by_panels`] followed by SiLU x mul without writing the `[m, 2h]` products: each pass
/// widens 16 gate features and the same 16 up features.
///
/// # Safety
/// As [`rows_by_panels`], with `n == 2 * h`, `h % 16 == 0`, `cols.start % 16 == 0`,
/// `cols.end <= h`.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub unsafe fn rows_by_gate_up_silu<W: QuantPanels + ?Sized>(
    w: &W,
    h: usize,
    (xb, m): (&[bf16], usize),
    cols: Range<usize>,
    out: &mut [MaybeUninit<f32>],
) {
    let width = cols.len();
    let (mut gate, mut up) = ([0f32; TILE * TILE], [0f32; TILE * TILE]);
    // SAFETY: the caller's contract; gate features `j0 ..` and up features `h + j0 ..` are 16
    // within `w`'s `2h`. The writes go to rows below `m` and features below `cols.end`.
    unsafe {
        let features = cols.clone().step_by(TILE).map(|j0| [j0, h + j0]);
        tile_products(w, (xb, m), features, |[j0, _], t| {
            let c = j0 - cols.start;
            let feats = (width - c).min(TILE);
            // Tiles 0 and 1: the gate and up products of rows `t ..`; 2 and 3: of `t + 16 ..`.
            for (tiles, dt) in [((0, 1), 0), ((2, 3), TILE)] {
                if t + dt >= m {
                    continue;
                }
                store_tile(tiles.0, gate.as_mut_ptr(), TILE * 4);
                store_tile(tiles.1, up.as_mut_ptr(), TILE * 4);
                for r in 0..(m - t - dt).min(TILE) {
                    let at = (t + dt + r) * width + c;
                    let (g, u) = (&gate[r * TILE..][..feats], &up[r * TILE..][..feats]);
                    for ((o, &g), &u) in out[at..][..feats].iter_mut().zip(g).zip(u) {
                        o.write(crate::fastmath::silu(g) * u);
                    }
                }
            }
        })
    }
}

/// For each pair of feature groups `[f0, f1]` (16 features from each), widens them into B
/// operands and multiplies every 32 x rows by them: `place([f0, f1], t)` then finds, in tiles 0
/// and 1, rows `t .. t + 16` times the groups `f0` and `f1`, in tiles 2 and 3 rows `t + 16 ..
/// t + 32` (where `t + 16 < m`; stale otherwise), to store with [`store_tile`].
///
/// # Safety
/// AVX-512 F, BW and BF16 and `bf16::amx::usable` must hold; `w`'s `k % 32 == 0`; `xb` holds
/// `m + 16` rows of `k`; every group as [`QuantPanels::widen_for_amx`] requires.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn tile_products<W: QuantPanels + ?Sized>(
    w: &W,
    (xb, m): (&[bf16], usize),
    features: impl Iterator<Item = [usize; 2]>,
    mut place: impl FnMut([usize; 2], usize),
) {
    let k = w.dims().1;
    let mut pairs = vec![0u32; 2 * TILE * k / 2];
    let (x_bytes, b_bytes) = (k * 2, TILE * 4);
    // SAFETY: AMX is usable (caller). Tiles read `xb` rows below `m + 16` and pair rows within
    // `pairs`.
    unsafe {
        configured(|| {
            for groups in features {
                let (first, second) = pairs.split_at_mut(TILE * k / 2);
                w.widen_for_amx(groups[0], first);
                w.widen_for_amx(groups[1], second);
                let halves = [0, 1].map(|g| pairs.as_ptr().add(g * TILE * k / 2));
                for t in (0..m).step_by(2 * TILE) {
                    let two = m - t > TILE;
                    zero_results();
                    for step in 0..k / K_STEP {
                        let a0 = xb.as_ptr().add(t * k + step * K_STEP);
                        let a1 = two.then(|| a0.add(TILE * k).cast::<u8>());
                        let b = halves.map(|h| h.add(step * TILE * TILE).cast::<u8>());
                        block_step((a0.cast(), a1), (b[0], Some(b[1])), (x_bytes, b_bytes));
                    }
                    place(groups, t);
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

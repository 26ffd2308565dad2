//! f32 products against weights packed into panels of 32 output features (`[k][32]` each):
//! the outer-product form, each row value broadcast against the panel's two registers of a step,
//! 12 rows x 32 features of accumulators (24 of the 32 registers), no horizontal sums at the end,
//! and two 64-byte loads per 24 FMAs where the dot form (`avx512`) loads 22 per 48. The model
//! packs its f32 projections and LM head once at load (`Linear::into_panels`); `linear` packs
//! per product for many rows against weights kept as rows. The tiles of each panel
//! prefetch the next one, each its share: decode steps stream the weights from memory, and
//! without it they were 15-25% slower than the dot form (docs/cpu-performance.md).
//!
//! The same kernel reads int8 panels (`gemm::int8`, `[k][32]` values and `[k / 32][32]` scales
//! per panel) and int4 ones (`gemm::int4`): each step's 32 codes are widened to f32 and scaled
//! by their block's scales (held in registers through the block's 32 steps) before the FMAs,
//! so the product reads a quarter (an eighth) of the bytes at the same tile.

use std::arch::x86_64::*;
use std::mem::MaybeUninit;

use half::f16;
use rayon::prelude::*;

// Output features per panel: two 512-bit registers.
use super::PANEL;

/// Rows per register tile.
const ROWS: usize = 12;

/// `w` (`[n, k]`, row-major) as `n.div_ceil(32)` panels of `[k][32]`, zeros past the last
/// feature: what [`rows_by_packed`] reads. Panels are packed in parallel.
pub fn pack(w: &[f32], n: usize, k: usize) -> Vec<f32> {
    assert!(w.len() >= n * k, "pack: {} weights for {n} x {k}", w.len());
    let panels = n.div_ceil(PANEL);
    let mut out: Vec<f32> = Vec::with_capacity(panels * k * PANEL);
    out.spare_capacity_mut()[..panels * k * PANEL]
        .par_chunks_mut(k * PANEL)
        .enumerate()
        .for_each(|(p, dst)| {
            for (kk, step) in dst.chunks_exact_mut(PANEL).enumerate() {
                for (c, d) in step.iter_mut().enumerate() {
                    let j = p * PANEL + c;
                    d.write(if j < n { w[j * k + kk] } else { 0.0 });
                }
            }
        });
    // SAFETY: the chunks cover the `panels * k * 32` elements, each written above.
    unsafe { out.set_len(panels * k * PANEL) };
    out
}

/// A value type of the panels: how one step (32 features at one `k`) is read as two f32
/// vectors.
pub(super) trait PanelWeight: Copy {
    /// Elements of `Self` per step (32 features at one `k`).
    const STEP: usize = PANEL;

    /// 64-byte lines per step, for the prefetch of the next panel.
    const LINES: usize;

    /// Whether a step is widened and scaled (int8, int4), so that a panel several tiles read
    /// is better widened once.
    const SCALED: bool = false;

    /// The panels' scales (int8: `[k / 32][32]` f16; int4: `[k / 32][64]` f16, 32 scales then
    /// 32 minimums; none for f32).
    type Scale: Copy;

    /// A block's scales in registers, for its 32 steps.
    type Block: Copy;

    /// The scales of block `b` (steps `32 b ..`) of the panel whose scales are at `sp`.
    ///
    /// # Safety
    /// AVX-512 F must be available; the panel has block `b`'s scales (where `Self` has them).
    unsafe fn block(sp: *const Self::Scale, b: usize) -> Self::Block;

    /// Step `kk` of the panel at `wp`, scaled by its block's `scales`.
    ///
    /// # Safety
    /// AVX-512 F must be available; the panel holds step `kk`.
    unsafe fn step(wp: *const Self, scales: Self::Block, kk: usize) -> [__m512; 2];
}

impl PanelWeight for f32 {
    const LINES: usize = 2;
    type Scale = f32;
    type Block = ();

    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn block(_: *const f32, _: usize) {}

    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn step(wp: *const f32, _: (), kk: usize) -> [__m512; 2] {
        // SAFETY: the caller's contract.
        unsafe {
            [
                _mm512_loadu_ps(wp.add(kk * PANEL)),
                _mm512_loadu_ps(wp.add(kk * PANEL + 16)),
            ]
        }
    }
}

impl PanelWeight for i8 {
    const LINES: usize = 1;
    const SCALED: bool = true;
    type Scale = f16;
    /// The block's scales, features 0-15 then 16-31, widened to f32.
    type Block = [__m512; 2];

    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn block(sp: *const f16, b: usize) -> [__m512; 2] {
        // SAFETY: the caller's contract: the block's 32 scales.
        unsafe {
            let s = sp.add(b * PANEL);
            let widen = |i: usize| _mm512_cvtph_ps(_mm256_loadu_si256(s.add(16 * i).cast()));
            [widen(0), widen(1)]
        }
    }

    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn step(wp: *const i8, [s0, s1]: [__m512; 2], kk: usize) -> [__m512; 2] {
        // SAFETY: the caller's contract: 32 values at step `kk`.
        unsafe {
            let v = _mm256_loadu_si256(wp.add(kk * PANEL) as *const __m256i);
            let lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(v)));
            let hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256::<1>(v)));
            [_mm512_mul_ps(lo, s0), _mm512_mul_ps(hi, s1)]
        }
    }
}

/// Two 4-bit codes per byte (`gemm::int4`): a step is 16 bytes, byte `c` holding feature `c` in
/// its low half and feature `c + 16` in its high half; a weight is `code * scale + min`.
impl PanelWeight for u8 {
    const STEP: usize = PANEL / 2;
    const LINES: usize = 1;
    const SCALED: bool = true;
    type Scale = f16;
    /// The block's scales and minimums, features 0-15 then 16-31 of each, widened to f32.
    type Block = [__m512; 4];

    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn block(sp: *const f16, b: usize) -> [__m512; 4] {
        // SAFETY: the caller's contract: the block's 32 scales and 32 minimums.
        unsafe {
            let s = sp.add(b * 2 * PANEL);
            let widen = |i: usize| _mm512_cvtph_ps(_mm256_loadu_si256(s.add(16 * i).cast()));
            [widen(0), widen(1), widen(2), widen(3)]
        }
    }

    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn step(wp: *const u8, [s0, s1, m0, m1]: [__m512; 4], kk: usize) -> [__m512; 2] {
        // SAFETY: the caller's contract: 16 bytes at step `kk`.
        unsafe {
            // Each byte widened to a lane first: its low four bits are feature `c`, the bits
            // above them (no mask needed) feature `c + 16`. (Masking the bytes before widening
            // each half took 3 more instructions a step: 1.31-1.47 against 1.01-1.32 ns a step
            // on one core, in L2.)
            let v = _mm_loadu_si128(wp.add(kk * Self::STEP) as *const __m128i);
            let v = _mm512_cvtepu8_epi32(v);
            let lo = _mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(0x0f)));
            let hi = _mm512_cvtepi32_ps(_mm512_srli_epi32::<4>(v));
            [_mm512_fmadd_ps(lo, s0, m0), _mm512_fmadd_ps(hi, s1, m1)]
        }
    }
}

/// `out[r * n + j] = x[r] . w[j]` for the `m` rows of `x` (`[m, k]`) and the weights as
/// [`pack`] leaves them, panels `stride` apart (`k * 32` as packed; more where the panels are
/// longer and the product takes their first `k` steps); every output is written, so `out`
/// need not be initialised.
///
/// # Safety
/// AVX-512 F must be available; `x.len() >= m * k`; `stride >= k * 32` and `packed` holds
/// `n.div_ceil(32)` panels `stride` apart, the last `k * 32` long; `out.len() >= m * n`.
#[target_feature(enable = "avx512f")]
pub unsafe fn rows_by_packed(
    (m, n, k): (usize, usize, usize),
    x: &[f32],
    (packed, stride): (&[f32], usize),
    out: &mut [MaybeUninit<f32>],
) {
    // SAFETY: the caller's contract; f32 panels have no scales.
    unsafe { rows_by_panels_of::<f32>((m, n, k), x, (packed, stride), (&[], 0), out) }
}

/// [`rows_by_packed`] for int8 panels (`gemm::int8::Int8Weights`): `q` holds `n.div_ceil(32)`
/// panels of `[k][32]` values, `scales` as many of `[k.div_ceil(32)][32]`.
///
/// # Safety
/// AVX-512 F must be available; `x.len() >= m * k`; `q` and `scales` as above;
/// `out.len() >= m * n`.
#[target_feature(enable = "avx512f")]
pub unsafe fn rows_by_int8_panels(
    (m, n, k): (usize, usize, usize),
    x: &[f32],
    (q, scales): (&[i8], &[f16]),
    out: &mut [MaybeUninit<f32>],
) {
    let (weights, stats) = ((q, k * PANEL), (scales, k.div_ceil(PANEL) * PANEL));
    // SAFETY: the caller's contract.
    unsafe { rows_by_panels_of((m, n, k), x, weights, stats, out) }
}

/// [`rows_by_packed`] for 4-bit panels (`gemm::int4::Int4Weights`): `q` holds `n.div_ceil(32)`
/// panels of `[k][16]` bytes, `dm` as many of `[k.div_ceil(32)][64]` f16 scales and minimums.
///
/// # Safety
/// AVX-512 F must be available; `x.len() >= m * k`; `q` and `dm` as above;
/// `out.len() >= m * n`.
#[target_feature(enable = "avx512f")]
pub unsafe fn rows_by_int4_panels(
    (m, n, k): (usize, usize, usize),
    x: &[f32],
    (q, dm): (&[u8], &[f16]),
    out: &mut [MaybeUninit<f32>],
) {
    let (weights, stats) = ((q, k * PANEL / 2), (dm, k.div_ceil(PANEL) * 2 * PANEL));
    // SAFETY: the caller's contract.
    unsafe { rows_by_panels_of((m, n, k), x, weights, stats, out) }
}

/// The driver of all three: panels of `W` `stride` apart, each with scales `scale_stride` apart.
///
/// # Safety
/// As [`rows_by_packed`], with `scales` holding each panel's (where `W` reads them).
#[target_feature(enable = "avx512f")]
unsafe fn rows_by_panels_of<W: PanelWeight>(
    (m, n, k): (usize, usize, usize),
    x: &[f32],
    (packed, stride): (&[W], usize),
    (scales, scale_stride): (&[W::Scale], usize),
    out: &mut [MaybeUninit<f32>],
) {
    let panels = n.div_ceil(PANEL);
    // Each tile of a panel asks for its share of the next panel's steps, one step's two lines
    // every `tiles` steps of its own: the first tile asking for the whole panel, two lines per
    // step, kept more requests in flight than the core has line-fill buffers (that tile
    // stalled, the others left memory idle): gate/up at 32 and 64 rows 15-16% slower.
    let tiles = m.div_ceil(ROWS);
    let share = k.div_ceil(tiles.max(1));
    // Panels that must be widened (int8, int4) are widened once into this buffer where more than
    // one tile of rows reads them, each tile then running on f32.
    let mut widened: Vec<f32> = Vec::new();
    for p in 0..panels {
        let panel = &packed[p * stride..][..k * W::STEP];
        let sp = scales.as_ptr().wrapping_add(p * scale_stride);
        let cols = (n - p * PANEL).min(PANEL);
        if W::SCALED && tiles > 1 {
            let after = packed.as_ptr().wrapping_add((p + 1) * stride);
            // SAFETY: the panel holds `k` steps and their scales (caller); the prefetches of
            // the next panel form no reference and stop at the last panel.
            unsafe {
                widen(
                    panel,
                    sp,
                    k,
                    (p + 1 < panels).then_some(after),
                    &mut widened,
                );
                panel_tiles::<f32>(
                    m,
                    (n, k),
                    x,
                    (&widened, std::ptr::null()),
                    (p, cols),
                    |_| Next::NONE,
                    out,
                );
            }
            continue;
        }
        let next = |r: usize| {
            let first = r / ROWS * share;
            if p + 1 < panels && first < k {
                Next {
                    at: packed[(p + 1) * stride + first * W::STEP..].as_ptr(),
                    steps: share.min(k - first),
                    every: tiles,
                }
            } else {
                Next::NONE
            }
        };
        // SAFETY: the caller's contract, for this panel.
        unsafe { panel_tiles::<W>(m, (n, k), x, (panel, sp), (p, cols), next, out) };
    }
}

/// `panel`'s `k` steps widened to f32 into `dst` (resized to `k * 32`), prefetching the
/// panel after it (`after`) into L2 as it goes.
///
/// # Safety
/// AVX-512 F must be available; the panel holds `k` steps and `sp` their blocks' scales.
#[target_feature(enable = "avx512f")]
unsafe fn widen<W: PanelWeight>(
    panel: &[W],
    sp: *const W::Scale,
    k: usize,
    after: Option<*const W>,
    dst: &mut Vec<f32>,
) {
    dst.clear();
    dst.reserve(k * PANEL);
    // SAFETY: `dst` has room for `k` steps of 32; the caller's contract covers the panel.
    unsafe {
        let (wp, dp) = (panel.as_ptr(), dst.as_mut_ptr());
        for b in 0..k.div_ceil(PANEL) {
            let scales = W::block(sp, b);
            for kk in b * PANEL..(b * PANEL + PANEL).min(k) {
                if let Some(at) = after {
                    _mm_prefetch::<_MM_HINT_T1>(at.wrapping_add(kk * W::STEP).cast::<i8>());
                }
                let [u, v] = W::step(wp, scales, kk);
                _mm512_storeu_ps(dp.add(kk * PANEL), u);
                _mm512_storeu_ps(dp.add(kk * PANEL + 16), v);
            }
        }
        dst.set_len(k * PANEL);
    }
}

/// Every tile of rows against panel `p` (features `p * 32 ..`, `cols` of them), each
/// prefetching `next(first row)` of the panel after.
///
/// # Safety
/// As [`rows_by_packed`], for this panel.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn panel_tiles<W: PanelWeight>(
    m: usize,
    (n, k): (usize, usize),
    x: &[f32],
    w: (&[W], *const W::Scale),
    (p, cols): (usize, usize),
    next: impl Fn(usize) -> Next<W>,
    out: &mut [MaybeUninit<f32>],
) {
    let mut r = 0;
    while r < m {
        let rows = (m - r).min(ROWS);
        let at = (r, p * PANEL, cols, next(r));
        // SAFETY: rows `r .. r + rows` of `x` and of `out` exist (caller), the panel holds `k`
        // steps of 32 (and their scales, where `W` has them).
        unsafe {
            match rows {
                12 => tile::<W, 12>(at, (n, k), x, w, out),
                11 => tile::<W, 11>(at, (n, k), x, w, out),
                10 => tile::<W, 10>(at, (n, k), x, w, out),
                9 => tile::<W, 9>(at, (n, k), x, w, out),
                8 => tile::<W, 8>(at, (n, k), x, w, out),
                7 => tile::<W, 7>(at, (n, k), x, w, out),
                6 => tile::<W, 6>(at, (n, k), x, w, out),
                5 => tile::<W, 5>(at, (n, k), x, w, out),
                4 => tile::<W, 4>(at, (n, k), x, w, out),
                3 => tile::<W, 3>(at, (n, k), x, w, out),
                2 => tile::<W, 2>(at, (n, k), x, w, out),
                _ => tile::<W, 1>(at, (n, k), x, w, out),
            }
        }
        r += rows;
    }
}

/// The part of the next panel a tile prefetches: `steps` steps from `at`, one step's lines
/// every `every` steps of its own.
#[derive(Clone, Copy)]
struct Next<W> {
    at: *const W,
    steps: usize,
    every: usize,
}

impl<W> Next<W> {
    const NONE: Next<W> = Next {
        at: std::ptr::null(),
        steps: 0,
        every: 1,
    };
}

/// Rows `r .. r + R` against one panel (features `j .. j + cols`).
///
/// # Safety
/// As [`rows_by_packed`], for those rows and features.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn tile<W: PanelWeight, const R: usize>(
    (r, j, cols, next): (usize, usize, usize, Next<W>),
    (n, k): (usize, usize),
    x: &[f32],
    (panel, sp): (&[W], *const W::Scale),
    out: &mut [MaybeUninit<f32>],
) {
    // SAFETY: the caller's contract bounds the rows, the panel and the outputs; stores past
    // the last feature are masked off.
    unsafe {
        let (xp, wp) = (x.as_ptr().add(r * k), panel.as_ptr());
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        let (mut asked, mut wait) = (0, 0);
        for b in 0..k.div_ceil(PANEL) {
            let scales = W::block(sp, b);
            for kk in b * PANEL..(b * PANEL + PANEL).min(k) {
                if asked < next.steps {
                    if wait == 0 {
                        let at = next.at.add(asked * W::STEP).cast::<i8>();
                        _mm_prefetch::<_MM_HINT_T1>(at);
                        if W::LINES > 1 {
                            _mm_prefetch::<_MM_HINT_T1>(at.add(64));
                        }
                        asked += 1;
                        wait = next.every;
                    }
                    wait -= 1;
                }
                let [w0, w1] = W::step(wp, scales, kk);
                for (i, a) in acc.iter_mut().enumerate() {
                    let x = _mm512_set1_ps(*xp.add(i * k + kk));
                    a[0] = _mm512_fmadd_ps(x, w0, a[0]);
                    a[1] = _mm512_fmadd_ps(x, w1, a[1]);
                }
            }
        }
        let mask = |h: usize| -> __mmask16 {
            let c = cols.saturating_sub(16 * h).min(16);
            if c == 16 { !0 } else { (1u16 << c) - 1 }
        };
        for (i, a) in acc.iter().enumerate() {
            let dst = out.as_mut_ptr().add((r + i) * n + j).cast::<f32>();
            if cols == PANEL {
                _mm512_storeu_ps(dst, a[0]);
                _mm512_storeu_ps(dst.add(16), a[1]);
            } else {
                _mm512_mask_storeu_ps(dst, mask(0), a[0]);
                // Features past `cols` may lie past `out` here: the pointer is not formed then.
                if cols > 16 {
                    _mm512_mask_storeu_ps(dst.add(16), mask(1), a[1]);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gemm::tests::assert_products_match_dots;
    use crate::util::Rng64;

    /// The first `k` steps of panels packed longer (`stride` apart), the steps after them NaN:
    /// `gemm::rows_by_panels`, as prefill attention reads a sequence's values.
    #[test]
    fn first_steps_of_longer_panels() {
        if !crate::device::cpu_has_avx512_bw() {
            return;
        }
        let mut rng = Rng64::new(19);
        for (m, n, k, long) in [(12, 64, 40, 96), (7, 70, 32, 33), (25, 32, 1, 64)] {
            let x = rng.uniform_f32(m * k, 1.0);
            let mut w = rng.uniform_f32(n * long, 1.0);
            for row in w.chunks_exact_mut(long) {
                row[k..].fill(f32::NAN);
            }
            let packed = pack(&w, n, long);
            let mut out = vec![f32::NAN; m * n];
            crate::gemm::rows_by_panels((m, n, k), &x, (&packed, long * PANEL), &mut out);
            let out: Vec<_> = out.into_iter().map(MaybeUninit::new).collect();
            assert_products_match_dots((m, n, k), &x, (&w, long), &out);
        }
    }

    /// Every row count of a tile and a ragged last panel (n not a multiple of 32, fewer than
    /// 16 features in it too) against f64 dot products.
    #[test]
    fn products_match_plain_dots() {
        if !crate::device::cpu_has_avx512_bw() {
            return;
        }
        let mut rng = Rng64::new(17);
        for (m, n, k) in [
            (1, 32, 8),
            (13, 40, 17),
            (30, 70, 64),
            (64, 96, 576),
            (5, 7, 3),
        ] {
            let x = rng.uniform_f32(m * k, 1.0);
            let w = rng.uniform_f32(n * k, 1.0);
            let packed = pack(&w, n, k);
            let mut out = vec![MaybeUninit::new(f32::NAN); m * n];
            // SAFETY: AVX-512 F checked; the sizes are as the contract asks.
            unsafe { rows_by_packed((m, n, k), &x, (&packed, k * PANEL), &mut out) };
            assert_products_match_dots((m, n, k), &x, (&w, k), &out);
        }
    }
}

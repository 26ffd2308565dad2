//! The AVX2/FMA form of `packed` for CPUs without AVX-512 (AMD Zen 1-3, Intel client cores):
//! the same panels (32 output features a panel; f32, int8 or int4 steps, with the int8 and int4
//! blocks' scales), read one half of 16 features at a time, 6 rows x 16 features of
//! accumulators (12 of the 16 registers). It is what runs `--quantization int8` and `int4`
//! there: each step's codes are widened to f32 in registers for up to 24 rows (a tile of 6 at a
//! time), and a panel that more rows read is widened once into a buffer, as `packed` does.
//!
//! int4 products are summed per block of 32 steps over the codes themselves and scaled once a
//! block (`scale * sum(code * x) + min * sum(x)`, as llama.cpp's Q4_1 dot does), not per step:
//! that halves the FMAs of a decode row, whose step is otherwise bound by them (int8's steps
//! come scaled: see its `HalfStep`). One row runs against two panels at once, so that eight
//! independent sums hide the FMAs' latency. Every tile shape sums a (row, feature) in the same
//! order, so a row's outputs do not depend on its batch.

use std::arch::x86_64::*;
use std::marker::PhantomData;
use std::mem::MaybeUninit;

use half::f16;

use super::PANEL;
use super::int4::{BLOCK, blocks};

/// Rows per register tile.
const ROWS: usize = 6;

/// Quantized panels that more rows than this read are widened once into a buffer; fewer widen
/// each step in registers for each tile of rows (up to four tiles of 3-6). The buffer of a long
/// panel outgrows L1 (4096 steps: 512 KiB) and each tile rereads it: one core, int4, a 14336 x
/// 4096 matrix from memory, ns a step of 32 weights in registers against widened: 8 rows 8.0
/// against 11.0-11.7, 16 rows 14.9 against 17.9-18.8, 24 rows 22.1 against 25.1-26.1 (int8: 8
/// rows 10.8 against 11.7, 16 rows 17.2 against 18.2); in cache (3072 x 576) 16 and 24 rows ran
/// 1-9% faster widened, and from 32 rows widening is as fast or faster.
const WIDEN_ABOVE: usize = 4 * ROWS;

/// Features per half of a panel: two 256-bit registers.
const HALF: usize = PANEL / 2;

/// A value type of the panels, read 16 features (one half) of a step at a time.
pub(super) trait HalfStep: Copy {
    /// Elements of `Self` per step (32 features at one `k`).
    const STEP: usize;

    /// Whether steps are codes to widen (int8, int4), which a panel that many rows read has
    /// widened once into a buffer.
    const CODES: bool;

    /// Whether a tile sums each block's products over the codes and applies the block's 32
    /// scales and 32 minimums once a block (int4: `[k / 32][64]` at `sp`); steps of the others
    /// come scaled (f32, int8).
    const BLOCK_SUMS: bool;

    /// Whether each step is scaled by its block's scales (int8: `[k / 32][32]` at `sp`), which
    /// a tile widens to f32 once a block for [`HalfStep::half`] to read.
    const SCALED_STEPS: bool;

    /// The panels' scales (int8, int4: f16; none for f32).
    type Scale: Scale;

    /// Features `16 H .. 16 H + 16` of step `kk` of the panel at `wp` as f32: values (f32),
    /// codes times their scales (int8: `scales` holds the 16 of this half of the step's
    /// block, as f32), or codes (int4).
    ///
    /// # Safety
    /// AVX2, FMA and F16C must be available; the panel holds step `kk` (and `scales` 16 f32,
    /// where `Self` reads them).
    unsafe fn half<const H: usize>(wp: *const Self, scales: *const f32, kk: usize) -> [__m256; 2];
}

/// A type of the panels' scales, read 8 at a time as f32.
pub(super) trait Scale: Copy {
    /// 8 scales from `sp` as f32 (int4's, which a tile applies once a block; int8's, which it
    /// widens once a block).
    ///
    /// # Safety
    /// AVX2, FMA and F16C must be available; `sp` holds 8 scales.
    unsafe fn load8(sp: *const Self) -> __m256;
}

impl Scale for f32 {
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn load8(sp: *const f32) -> __m256 {
        // SAFETY: the caller's contract.
        unsafe { _mm256_loadu_ps(sp) }
    }
}

impl Scale for f16 {
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn load8(sp: *const f16) -> __m256 {
        // SAFETY: the caller's contract: 8 f16s.
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(sp.cast())) }
    }
}

impl HalfStep for f32 {
    const STEP: usize = PANEL;
    const CODES: bool = false;
    const BLOCK_SUMS: bool = false;
    const SCALED_STEPS: bool = false;
    type Scale = f32;

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn half<const H: usize>(wp: *const f32, _: *const f32, kk: usize) -> [__m256; 2] {
        // SAFETY: the caller's contract.
        unsafe {
            let at = wp.add(kk * PANEL + H * HALF);
            [_mm256_loadu_ps(at), _mm256_loadu_ps(at.add(8))]
        }
    }
}

/// int8 steps come scaled, by their block's f16 scales widened once a block (by the tile) into
/// f32 that each step reloads from L1. Summing a block's products before scaling them (as int4
/// does) cut a one-row step in cache from 2.2 to 1.7 ns, but a step from memory is bound by its
/// bytes (llama-3-8b decode at one sequence 352 against 333 ms), and the 24 more FMAs and
/// reloads of a tile's sums per block slowed prefill products by 13-19% (1024 x 4096 by 14336,
/// two threads).
impl HalfStep for i8 {
    const STEP: usize = PANEL;
    const CODES: bool = true;
    const BLOCK_SUMS: bool = false;
    const SCALED_STEPS: bool = true;
    type Scale = f16;

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn half<const H: usize>(wp: *const i8, scales: *const f32, kk: usize) -> [__m256; 2] {
        // SAFETY: the caller's contract: 32 values at step `kk`, 16 scales for this half.
        unsafe {
            let v = _mm_loadu_si128(wp.add(kk * PANEL + H * HALF) as *const __m128i);
            let lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
            let hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128::<8>(v)));
            [
                _mm256_mul_ps(lo, _mm256_loadu_ps(scales)),
                _mm256_mul_ps(hi, _mm256_loadu_ps(scales.add(8))),
            ]
        }
    }
}

/// 4-bit codes (`gemm::int4`): byte `c` of a 16-byte step holds feature `c` in its low half and
/// `c + 16` in its high half, so both halves of a panel read the same 16 bytes.
impl HalfStep for u8 {
    const STEP: usize = PANEL / 2;
    const CODES: bool = true;
    const BLOCK_SUMS: bool = true;
    const SCALED_STEPS: bool = false;
    type Scale = f16;

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn half<const H: usize>(wp: *const u8, _: *const f32, kk: usize) -> [__m256; 2] {
        // SAFETY: the caller's contract: 16 bytes at step `kk`.
        unsafe {
            // The 16 bytes in both lanes (shifted down a nibble for the high codes), from which
            // an in-lane shuffle puts 8 bytes in the low bytes of 8 lanes (lane `i` byte
            // `lo + i`). One core, two rows: 2.3 ns a step against 3.1 by widening each half
            // across lanes (`vpmovzxbd`, four a step as the compiler ordered them; one row 2.4
            // either way); int8's `vpmovsxbd` from memory beat such a shuffle (1.7 against 2.2).
            let v = _mm256_broadcastsi128_si256(_mm_loadu_si128(
                wp.add(kk * Self::STEP) as *const __m128i
            ));
            let v = match H {
                0 => v,
                _ => _mm256_srli_epi16::<4>(v),
            };
            let pick = |lo: i8| {
                let z = -128i8;
                #[rustfmt::skip]
                let m = _mm256_setr_epi8(
                    lo, z, z, z, lo + 1, z, z, z, lo + 2, z, z, z, lo + 3, z, z, z,
                    lo + 4, z, z, z, lo + 5, z, z, z, lo + 6, z, z, z, lo + 7, z, z, z,
                );
                let c = _mm256_and_si256(_mm256_shuffle_epi8(v, m), _mm256_set1_epi32(0x0f));
                _mm256_cvtepi32_ps(c)
            };
            [pick(0), pick(8)]
        }
    }
}

/// A panel of `W` codes widened once to f32 (for many rows), its blocks' sums still to scale
/// where `W`'s are.
#[derive(Clone, Copy)]
#[repr(transparent)]
struct Widened<W>(f32, PhantomData<W>);

impl<W: HalfStep> HalfStep for Widened<W> {
    const STEP: usize = PANEL;
    const CODES: bool = false;
    const BLOCK_SUMS: bool = W::BLOCK_SUMS;
    const SCALED_STEPS: bool = false;
    type Scale = W::Scale;

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn half<const H: usize>(wp: *const Self, _: *const f32, kk: usize) -> [__m256; 2] {
        // SAFETY: the caller's contract; `Widened` is an f32, already scaled where `W` steps are.
        unsafe { f32::half::<H>(wp.cast::<f32>(), std::ptr::null(), kk) }
    }
}

/// Where a tile reads its panels: the first, the next ones `stride` elements apart, and their
/// blocks' scales `scale_stride` apart (unused for f32).
struct Panels<W: HalfStep> {
    wp: *const W,
    stride: usize,
    sp: *const W::Scale,
    scale_stride: usize,
}

impl<W: HalfStep> Clone for Panels<W> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<W: HalfStep> Copy for Panels<W> {}

impl<W: HalfStep> Panels<W> {
    /// Panel `p` on.
    fn at(self, p: usize) -> Self {
        Self {
            wp: self.wp.wrapping_add(p * self.stride),
            sp: self.sp.wrapping_add(p * self.scale_stride),
            ..self
        }
    }
}

/// Each row's sum over each block of 32 of its `k` values (`[m][blocks(k)]`), in a fixed
/// order (eight lanes, then their pairs): what a block's minimums multiply.
fn block_sums(x: &[f32], m: usize, k: usize) -> Vec<f32> {
    if k == 0 {
        return Vec::new();
    }
    x[..m * k]
        .chunks_exact(k)
        .flat_map(|row| row.chunks(BLOCK))
        .map(|block| {
            let mut l = [0f32; 8];
            for c in block.chunks(8) {
                for (l, v) in l.iter_mut().zip(c) {
                    *l += v;
                }
            }
            ((l[0] + l[4]) + (l[1] + l[5])) + ((l[2] + l[6]) + (l[3] + l[7]))
        })
        .collect()
}

/// `out[r * n + j] = x[r] . w[j]` for the `m` rows of `x` (`[m, k]`) and `n.div_ceil(32)`
/// panels of `W` `stride` apart (`k` steps each), each with scales `scale_stride` apart; every
/// output is written, so `out` need not be initialised.
///
/// # Safety
/// AVX2, FMA and F16C must be available; `x.len() >= m * k`; the panels hold `k` steps (and their
/// blocks' scales, where `W` has them); `out.len() >= m * n`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn rows_by_panels<W: HalfStep>(
    (m, n, k): (usize, usize, usize),
    x: &[f32],
    (panels, stride): (&[W], usize),
    (scales, scale_stride): (&[W::Scale], usize),
    out: &mut [MaybeUninit<f32>],
) {
    let count = n.div_ceil(PANEL);
    debug_assert!(count == 0 || panels.len() >= (count - 1) * stride + k * W::STEP);
    let sums = match W::BLOCK_SUMS {
        true => block_sums(x, m, k),
        false => Vec::new(),
    };
    let all = Panels {
        wp: panels.as_ptr(),
        stride,
        sp: scales.as_ptr(),
        scale_stride,
    };
    let ops = Operands {
        n,
        k,
        x: x.as_ptr(),
        sums: sums.as_ptr(),
    };
    // Panel `q` to prefetch, if there is one.
    let prefetch = |q: usize| match q < count {
        true => all.at(q).wp,
        false => std::ptr::null(),
    };
    let mut widened: Vec<f32> = Vec::new();
    let mut p = 0;
    while p < count {
        let cols = n - p * PANEL;
        let here = all.at(p);
        // SAFETY: the caller's contract, for these panels; the prefetches form no reference.
        unsafe {
            if W::CODES && m > WIDEN_ABOVE {
                widen(
                    &panels[p * stride..][..k * W::STEP],
                    here.sp,
                    k,
                    &mut widened,
                );
                let w = Panels {
                    wp: widened.as_ptr().cast::<Widened<W>>(),
                    stride: 0,
                    sp: here.sp,
                    scale_stride: 0,
                };
                panel_tiles(m, ops, w, (p, cols.min(PANEL)), std::ptr::null(), out);
                p += 1;
            } else if m == 1 && p + 1 < count {
                // Two panels: eight independent sums.
                let next = prefetch(p + 2);
                tile::<W, 1, 0, 4>((0, p * PANEL, cols.min(2 * PANEL)), ops, here, next, out);
                p += 2;
            } else {
                panel_tiles(m, ops, here, (p, cols.min(PANEL)), prefetch(p + 1), out);
                p += 1;
            }
        }
    }
}

/// What every tile of a product shares: its sizes, its rows (`[m, k]`), and their block sums
/// (`[m][blocks(k)]`, int4 only).
#[derive(Clone, Copy)]
struct Operands {
    n: usize,
    k: usize,
    x: *const f32,
    sums: *const f32,
}

/// `panel`'s `k` steps as [`HalfStep::half`] reads them, into `dst` (resized to `k * 32`).
///
/// # Safety
/// AVX2, FMA and F16C must be available; the panel holds `k` steps and `sp` their blocks' scales.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn widen<W: HalfStep>(panel: &[W], sp: *const W::Scale, k: usize, dst: &mut Vec<f32>) {
    dst.clear();
    dst.reserve(k * PANEL);
    // SAFETY: `dst` has room for `k` steps of 32; the caller's contract covers the panel.
    unsafe {
        let (wp, dp) = (panel.as_ptr(), dst.as_mut_ptr());
        let mut scales = [[0f32; HALF]; 2];
        for b in 0..blocks(k) {
            if W::SCALED_STEPS {
                scales = [half_block_scales(sp, b, 0), half_block_scales(sp, b, 1)];
            }
            for kk in b * BLOCK..(b * BLOCK + BLOCK).min(k) {
                let d = dp.add(kk * PANEL);
                let [v0, v1] = W::half::<0>(wp, scales[0].as_ptr(), kk);
                let [v2, v3] = W::half::<1>(wp, scales[1].as_ptr(), kk);
                for (i, v) in [v0, v1, v2, v3].into_iter().enumerate() {
                    _mm256_storeu_ps(d.add(8 * i), v);
                }
            }
        }
        dst.set_len(k * PANEL);
    }
}

/// The 16 scales of half `h` of block `b` of the panel whose scales are at `sp`, as f32: what
/// the steps of a block that come scaled (int8) reload.
///
/// # Safety
/// AVX2, FMA and F16C must be available; the panel has block `b`'s scales.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn half_block_scales<S: Scale>(sp: *const S, b: usize, h: usize) -> [f32; HALF] {
    let mut out = [0f32; HALF];
    // SAFETY: the caller's contract: the block's 32 scales, 16 of them from `h * 16`.
    unsafe {
        let sp = sp.add(b * PANEL + h * HALF);
        _mm256_storeu_ps(out.as_mut_ptr(), S::load8(sp));
        _mm256_storeu_ps(out.as_mut_ptr().add(8), S::load8(sp.add(8)));
    }
    out
}

/// Every tile of rows against panel `p` (features `p * 32 ..`, `cols` of them); the first tile
/// prefetches the panel at `next` (null: none). One or two rows run against the whole panel
/// (8 accumulators of dependent FMAs), more in balanced tiles of up to 6 rows (3 rows at least)
/// against each half in turn: a tile of one or two rows against a half left the FMAs waiting on
/// each other (2-4 chains for a latency of 4 cycles at 2 a cycle).
///
/// # Safety
/// As [`rows_by_panels`], for this panel.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn panel_tiles<W: HalfStep>(
    m: usize,
    ops: Operands,
    w: Panels<W>,
    (p, cols): (usize, usize),
    next: *const W,
    out: &mut [MaybeUninit<f32>],
) {
    let j = p * PANEL;
    // SAFETY (every arm): rows `r .. r + rows` of `x` and of `out` exist (caller), the panel
    // holds `k` steps (and their scales, where `W` has them).
    match m {
        0 => {}
        1 => unsafe { tile::<W, 1, 0, 2>((0, j, cols), ops, w, next, out) },
        2 => unsafe { tile::<W, 2, 0, 2>((0, j, cols), ops, w, next, out) },
        _ => {
            // `tiles` tiles of `m / tiles` rows, the first `m % tiles` one more: 3 to 6 rows.
            let tiles = m.div_ceil(ROWS);
            for h in 0..cols.div_ceil(HALF) {
                let mut r = 0;
                for t in 0..tiles {
                    let rows = m / tiles + usize::from(t < m % tiles);
                    let pf = if r == 0 && h == 0 {
                        next
                    } else {
                        std::ptr::null()
                    };
                    let at = (r, j + h * HALF, cols - h * HALF);
                    unsafe {
                        match (h, rows) {
                            (0, 6) => tile::<W, 6, 0, 1>(at, ops, w, pf, out),
                            (0, 5) => tile::<W, 5, 0, 1>(at, ops, w, pf, out),
                            (0, 4) => tile::<W, 4, 0, 1>(at, ops, w, pf, out),
                            (0, 3) => tile::<W, 3, 0, 1>(at, ops, w, pf, out),
                            (_, 6) => tile::<W, 6, 1, 1>(at, ops, w, pf, out),
                            (_, 5) => tile::<W, 5, 1, 1>(at, ops, w, pf, out),
                            (_, 4) => tile::<W, 4, 1, 1>(at, ops, w, pf, out),
                            (_, 3) => tile::<W, 3, 1, 1>(at, ops, w, pf, out),
                            _ => unreachable!("packed_avx2: a tile of {rows} rows"),
                        }
                    }
                    r += rows;
                }
            }
        }
    }
}

/// Rows `r .. r + R` against `C` halves from half `H` of the panel at `w` (on into the next
/// panel for `C > 2 - H`; features `j ..`, of which `cols` are written), prefetching the panels
/// at `next` (null: none) into L2, a line at a time. Where `W` sums blocks (int4), steps are
/// summed per block of 32 and scaled once a block.
///
/// # Safety
/// As [`rows_by_panels`], for those rows, panels and features.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn tile<W: HalfStep, const R: usize, const H: usize, const C: usize>(
    (r, j, cols): (usize, usize, usize),
    Operands { n, k, x, sums }: Operands,
    w: Panels<W>,
    next: *const W,
    out: &mut [MaybeUninit<f32>],
) {
    let step_bytes = W::STEP * size_of::<W>();
    // Group `c` is half `(H + c) % 2` of panel `(H + c) / 2`.
    let panels = (H + C - 1) / 2 + 1;
    let (block, blocks) = match W::BLOCK_SUMS || W::SCALED_STEPS {
        true => (BLOCK, blocks(k)),
        false => (k.max(1), 1),
    };
    // SAFETY: the caller's contract bounds the rows, the panels and the outputs; only `cols`
    // outputs of each row are written.
    unsafe {
        let xp = x.add(r * k);
        let mut acc = [[[_mm256_setzero_ps(); 2]; C]; R];
        for b in 0..blocks {
            let (k0, k1) = (b * block, (b * block + block).min(k));
            // Each group's 16 scales of this block as f32 (int8).
            let mut scales = [[0f32; HALF]; C];
            if W::SCALED_STEPS {
                for (c, s) in scales.iter_mut().enumerate() {
                    let sp = w.sp.add((H + c) / 2 * w.scale_stride);
                    *s = half_block_scales(sp, b, (H + c) % 2);
                }
            }
            // Blocks' sums start from zero; steps that come scaled add on to the tile's sums.
            let mut sum = match W::BLOCK_SUMS {
                true => [[[_mm256_setzero_ps(); 2]; C]; R],
                false => acc,
            };
            for kk in k0..k1 {
                // The lines of the next panels' step `kk`, where one starts in it.
                if !next.is_null() && (kk * step_bytes) % 64 < step_bytes {
                    for pi in 0..panels {
                        let at = next.wrapping_add(pi * w.stride).cast::<i8>();
                        let at = at.wrapping_add(kk * step_bytes);
                        _mm_prefetch::<_MM_HINT_T1>(at);
                        if step_bytes > 64 {
                            _mm_prefetch::<_MM_HINT_T1>(at.wrapping_add(64));
                        }
                    }
                }
                let mut wv = [[_mm256_setzero_ps(); 2]; C];
                for (c, wv) in wv.iter_mut().enumerate() {
                    let wp = w.wp.add((H + c) / 2 * w.stride);
                    let sp = scales[c].as_ptr();
                    *wv = match (H + c) % 2 {
                        0 => W::half::<0>(wp, sp, kk),
                        _ => W::half::<1>(wp, sp, kk),
                    };
                }
                for (i, s) in sum.iter_mut().enumerate() {
                    let xb = _mm256_broadcast_ss(&*xp.add(i * k + kk));
                    for (s, wv) in s.iter_mut().zip(&wv) {
                        s[0] = _mm256_fmadd_ps(xb, wv[0], s[0]);
                        s[1] = _mm256_fmadd_ps(xb, wv[1], s[1]);
                    }
                }
            }
            if !W::BLOCK_SUMS {
                acc = sum;
                continue;
            }
            for c in 0..C {
                let sp = w.sp.add((H + c) / 2 * w.scale_stride);
                let s = sp.add(b * 2 * PANEL + (H + c) % 2 * HALF);
                let load = |at: usize| W::Scale::load8(s.add(at));
                let (scale, min) = ([load(0), load(8)], [load(PANEL), load(PANEL + 8)]);
                for (i, (a, s)) in acc.iter_mut().zip(&sum).enumerate() {
                    let xs = _mm256_broadcast_ss(&*sums.add((r + i) * blocks + b));
                    for h in 0..2 {
                        a[c][h] = _mm256_fmadd_ps(s[c][h], scale[h], a[c][h]);
                        a[c][h] = _mm256_fmadd_ps(xs, min[h], a[c][h]);
                    }
                }
            }
        }
        for (i, a) in acc.iter().enumerate() {
            let mut row = [0f32; 2 * PANEL];
            for (c, a) in a.iter().enumerate() {
                _mm256_storeu_ps(row.as_mut_ptr().add(c * HALF), a[0]);
                _mm256_storeu_ps(row.as_mut_ptr().add(c * HALF + 8), a[1]);
            }
            let dst = out.as_mut_ptr().add((r + i) * n + j).cast::<f32>();
            std::ptr::copy_nonoverlapping(row.as_ptr(), dst, cols.min(C * HALF));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gemm::tests::assert_products_match_dots;
    use crate::util::Rng64;

    /// Every way of tiling the rows (the whole panel for one or two, balanced tiles of 3 to 6
    /// against each half beyond), ragged last panels (fewer than 16 features, and 16 to 32),
    /// and panels read to their first `k` of longer steps, against f64 dot products.
    #[test]
    fn f32_panels_match_plain_dots() {
        if !crate::device::cpu_has_avx2_fma() {
            return;
        }
        let mut rng = Rng64::new(23);
        for (n, k, long) in [(32, 8, 8), (57, 33, 40), (70, 64, 64), (7, 1, 3)] {
            let w = rng.uniform_f32(n * long, 1.0);
            let packed = super::super::packed::pack(&w, n, long);
            for m in (1..=14).chain([19, 25, 31]) {
                let x = rng.uniform_f32(m * k, 1.0);
                let mut out = vec![MaybeUninit::new(f32::NAN); m * n];
                // SAFETY: AVX2 and FMA checked; the sizes are as the contract asks.
                unsafe {
                    rows_by_panels((m, n, k), &x, (&packed, long * PANEL), (&[], 0), &mut out)
                };
                assert_products_match_dots((m, n, k), &x, (&w, long), &out);
            }
        }
    }

    /// int8 and int4 panels through this kernel (which an AVX-512 host does not dispatch to)
    /// against f64 products of their values: row counts of every tiling, widened in registers
    /// and (past 24 rows) once into a buffer; a ragged last panel and a partial last block.
    #[test]
    fn quantized_panels_match_their_values() {
        use crate::gemm::BlockValues;
        use crate::gemm::tests::both_schemes;
        if !crate::device::cpu_has_avx2_fma() {
            return;
        }
        let mut rng = Rng64::new(29);
        for (n, k) in [(57, 100), (64, 64)] {
            let w = rng.uniform_f32(n * k, 0.5);
            let (q8, q4) = both_schemes(&w, n, k);
            for m in (1..=8).chain([13, 24, 25, 31]) {
                let x = rng.uniform_f32(m * k, 1.0);
                let mut out = vec![MaybeUninit::new(f32::NAN); m * n];
                let (q, scales) = q8.panels_from(0);
                // SAFETY: AVX2, FMA and F16C checked; the panels are as quantized.
                unsafe { rows_by_panels((m, n, k), &x, q, scales, &mut out) };
                assert_products_match_dots((m, n, k), &x, (&q8.values(), k), &out);
                let mut out = vec![MaybeUninit::new(f32::NAN); m * n];
                let (q, dm) = q4.panels_from(0);
                // SAFETY: as above.
                unsafe { rows_by_panels((m, n, k), &x, q, dm, &mut out) };
                assert_products_match_dots((m, n, k), &x, (&q4.values(), k), &out);
            }
        }
    }
}

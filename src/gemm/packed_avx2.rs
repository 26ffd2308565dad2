//! The AVX2/FMA form of `packed` for CPUs without AVX-512 (AMD Zen 1-3, Intel client cores):
//! the same panels (32 output features a panel; f32, int8 or int4 steps, with the int8 and int4
//! blocks' scales), read one half of 16 features at a time, 6 rows x 16 features of
//! accumulators (12 of the 16 registers). It is what runs `--quantization int8` and `int4`
//! there: each step's codes are widened to f32 in registers for up to 6 rows, and a panel that
//! more rows read is widened once into a buffer, as `packed` does.

use std::arch::x86_64::*;
use std::mem::MaybeUninit;

use super::PANEL;

/// Rows per register tile.
const ROWS: usize = 6;

/// Features per half of a panel: two 256-bit registers.
const HALF: usize = PANEL / 2;

/// A value type of the panels, read 16 features (one half) of a step at a time.
pub(super) trait HalfStep: Copy {
    /// Elements of `Self` per step (32 features at one `k`).
    const STEP: usize;

    /// Whether a step is widened and scaled (int8, int4).
    const SCALED: bool;

    /// Features `16 H .. 16 H + 16` of step `kk` of the panel at `wp`, with the panel's
    /// scales at `sp` (int8: `[k / 32][32]`; int4: `[k / 32][64]`, 32 scales then 32
    /// minimums; unused for f32).
    ///
    /// # Safety
    /// AVX2 and FMA must be available; the panel holds step `kk` and its block's scales.
    unsafe fn half<const H: usize>(wp: *const Self, sp: *const f32, kk: usize) -> [__m256; 2];
}

impl HalfStep for f32 {
    const STEP: usize = PANEL;
    const SCALED: bool = false;

    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn half<const H: usize>(wp: *const f32, _: *const f32, kk: usize) -> [__m256; 2] {
        // SAFETY: the caller's contract.
        unsafe {
            let at = wp.add(kk * PANEL + H * HALF);
            [_mm256_loadu_ps(at), _mm256_loadu_ps(at.add(8))]
        }
    }
}

impl HalfStep for i8 {
    const STEP: usize = PANEL;
    const SCALED: bool = true;

    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn half<const H: usize>(wp: *const i8, sp: *const f32, kk: usize) -> [__m256; 2] {
        // SAFETY: the caller's contract: 32 values at step `kk`, 32 scales for its block.
        unsafe {
            let v = _mm_loadu_si128(wp.add(kk * PANEL + H * HALF) as *const __m128i);
            let lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
            let hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128::<8>(v)));
            let s = sp.add(kk / PANEL * PANEL + H * HALF);
            [
                _mm256_mul_ps(lo, _mm256_loadu_ps(s)),
                _mm256_mul_ps(hi, _mm256_loadu_ps(s.add(8))),
            ]
        }
    }
}

/// 4-bit codes (`gemm::int4`): byte `c` of a 16-byte step holds feature `c` in its low half and
/// `c + 16` in its high half, so both halves of a panel read the same 16 bytes.
impl HalfStep for u8 {
    const STEP: usize = PANEL / 2;
    const SCALED: bool = true;

    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn half<const H: usize>(wp: *const u8, sp: *const f32, kk: usize) -> [__m256; 2] {
        // SAFETY: the caller's contract: 16 bytes at step `kk`, 32 scales and 32 minimums for
        // its block.
        unsafe {
            let v = _mm_loadu_si128(wp.add(kk * Self::STEP) as *const __m128i);
            let codes = |v: __m128i| {
                let v = _mm256_cvtepu8_epi32(v);
                let v = match H {
                    0 => _mm256_and_si256(v, _mm256_set1_epi32(0x0f)),
                    _ => _mm256_srli_epi32::<4>(v),
                };
                _mm256_cvtepi32_ps(v)
            };
            let (lo, hi) = (codes(v), codes(_mm_srli_si128::<8>(v)));
            let s = sp.add(kk / PANEL * 2 * PANEL + H * HALF);
            [
                _mm256_fmadd_ps(lo, _mm256_loadu_ps(s), _mm256_loadu_ps(s.add(PANEL))),
                _mm256_fmadd_ps(
                    hi,
                    _mm256_loadu_ps(s.add(8)),
                    _mm256_loadu_ps(s.add(PANEL + 8)),
                ),
            ]
        }
    }
}

/// `out[r * n + j] = x[r] . w[j]` for the `m` rows of `x` (`[m, k]`) and `n.div_ceil(32)`
/// panels of `W` `stride` apart (`k` steps each), each with scales `scale_stride` apart; every
/// output is written, so `out` need not be initialised.
///
/// # Safety
/// AVX2 and FMA must be available; `x.len() >= m * k`; the panels hold `k` steps (and their
/// blocks' scales, where `W` reads them); `out.len() >= m * n`.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn rows_by_panels<W: HalfStep>(
    (m, n, k): (usize, usize, usize),
    x: &[f32],
    (panels, stride): (&[W], usize),
    (scales, scale_stride): (&[f32], usize),
    out: &mut [MaybeUninit<f32>],
) {
    let count = n.div_ceil(PANEL);
    let mut widened: Vec<f32> = Vec::new();
    for p in 0..count {
        let panel = &panels[p * stride..][..k * W::STEP];
        let sp = scales.as_ptr().wrapping_add(p * scale_stride);
        let cols = (n - p * PANEL).min(PANEL);
        let next = match p + 1 < count {
            true => panels.as_ptr().wrapping_add((p + 1) * stride),
            false => std::ptr::null(),
        };
        // SAFETY: the caller's contract, for this panel; the prefetches form no reference.
        unsafe {
            if W::SCALED && m > ROWS {
                widen(panel, sp, k, &mut widened);
                let w = (widened.as_slice(), std::ptr::null());
                panel_tiles::<f32>(m, (n, k), x, w, (p, cols), std::ptr::null(), out);
            } else {
                panel_tiles::<W>(m, (n, k), x, (panel, sp), (p, cols), next, out);
            }
        }
    }
}

/// `panel`'s `k` steps widened to f32 into `dst` (resized to `k * 32`).
///
/// # Safety
/// AVX2 and FMA must be available; the panel holds `k` steps and `sp` their blocks' scales.
#[target_feature(enable = "avx2,fma")]
unsafe fn widen<W: HalfStep>(panel: &[W], sp: *const f32, k: usize, dst: &mut Vec<f32>) {
    dst.clear();
    dst.reserve(k * PANEL);
    // SAFETY: `dst` has room for `k` steps of 32; the caller's contract covers the panel.
    unsafe {
        let (wp, dp) = (panel.as_ptr(), dst.as_mut_ptr());
        for kk in 0..k {
            let d = dp.add(kk * PANEL);
            let [a, b] = W::half::<0>(wp, sp, kk);
            let [c, e] = W::half::<1>(wp, sp, kk);
            for (i, v) in [a, b, c, e].into_iter().enumerate() {
                _mm256_storeu_ps(d.add(8 * i), v);
            }
        }
        dst.set_len(k * PANEL);
    }
}

/// Every tile of rows against panel `p` (features `p * 32 ..`, `cols` of them); the first tile
/// prefetches the panel at `next` (null: none). One or two rows run against the whole panel
/// (8 accumulators of dependent FMAs), more in balanced tiles of up to 6 rows (3 rows at least)
/// against each half in turn: a tile of one or two rows against a half left the FMAs waiting on
/// each other (2-4 chains for a latency of 4 cycles at 2 a cycle).
///
/// # Safety
/// As [`rows_by_panels`], for this panel.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn panel_tiles<W: HalfStep>(
    m: usize,
    (n, k): (usize, usize),
    x: &[f32],
    w: (&[W], *const f32),
    (p, cols): (usize, usize),
    next: *const W,
    out: &mut [MaybeUninit<f32>],
) {
    let j = p * PANEL;
    // SAFETY (every arm): rows `r .. r + rows` of `x` and of `out` exist (caller), the panel
    // holds `k` steps (and their scales, where `W` has them).
    match m {
        0 => {}
        1 => unsafe { tile::<W, 1, 0, 2>((0, j, cols, next), (n, k), x, w, out) },
        2 => unsafe { tile::<W, 2, 0, 2>((0, j, cols, next), (n, k), x, w, out) },
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
                    let at = (r, j + h * HALF, cols - h * HALF, pf);
                    unsafe {
                        match (h, rows) {
                            (0, 6) => tile::<W, 6, 0, 1>(at, (n, k), x, w, out),
                            (0, 5) => tile::<W, 5, 0, 1>(at, (n, k), x, w, out),
                            (0, 4) => tile::<W, 4, 0, 1>(at, (n, k), x, w, out),
                            (0, 3) => tile::<W, 3, 0, 1>(at, (n, k), x, w, out),
                            (_, 6) => tile::<W, 6, 1, 1>(at, (n, k), x, w, out),
                            (_, 5) => tile::<W, 5, 1, 1>(at, (n, k), x, w, out),
                            (_, 4) => tile::<W, 4, 1, 1>(at, (n, k), x, w, out),
                            (_, 3) => tile::<W, 3, 1, 1>(at, (n, k), x, w, out),
                            _ => unreachable!("packed_avx2: a tile of {rows} rows"),
                        }
                    }
                    r += rows;
                }
            }
        }
    }
}

/// Rows `r .. r + R` against `HALVES` halves of one panel from half `H` (features `j ..`, of
/// which `cols` are written), prefetching the whole panel at `next` (null: none) into L2, a
/// line at a time.
///
/// # Safety
/// As [`rows_by_panels`], for those rows and features.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn tile<W: HalfStep, const R: usize, const H: usize, const HALVES: usize>(
    (r, j, cols, next): (usize, usize, usize, *const W),
    (n, k): (usize, usize),
    x: &[f32],
    (panel, sp): (&[W], *const f32),
    out: &mut [MaybeUninit<f32>],
) {
    let step_bytes = W::STEP * size_of::<W>();
    // SAFETY: the caller's contract bounds the rows, the panel and the outputs; only `cols`
    // outputs of each row are written.
    unsafe {
        let (xp, wp) = (x.as_ptr().add(r * k), panel.as_ptr());
        let mut acc = [[[_mm256_setzero_ps(); 2]; HALVES]; R];
        for kk in 0..k {
            // The lines of the next panel's step `kk`, where one starts in it.
            if !next.is_null() && (kk * step_bytes) % 64 < step_bytes {
                let at = next.cast::<i8>().wrapping_add(kk * step_bytes);
                _mm_prefetch::<_MM_HINT_T1>(at);
                if step_bytes > 64 {
                    _mm_prefetch::<_MM_HINT_T1>(at.wrapping_add(64));
                }
            }
            let mut w = [[_mm256_setzero_ps(); 2]; HALVES];
            w[0] = W::half::<H>(wp, sp, kk);
            if HALVES > 1 {
                w[1] = W::half::<1>(wp, sp, kk);
            }
            for (i, a) in acc.iter_mut().enumerate() {
                let b = _mm256_broadcast_ss(&*xp.add(i * k + kk));
                for (a, w) in a.iter_mut().zip(&w) {
                    a[0] = _mm256_fmadd_ps(b, w[0], a[0]);
                    a[1] = _mm256_fmadd_ps(b, w[1], a[1]);
                }
            }
        }
        for (i, a) in acc.iter().enumerate() {
            let mut row = [0f32; PANEL];
            for (h, a) in a.iter().enumerate() {
                _mm256_storeu_ps(row.as_mut_ptr().add(h * HALF), a[0]);
                _mm256_storeu_ps(row.as_mut_ptr().add(h * HALF + 8), a[1]);
            }
            let dst = out.as_mut_ptr().add((r + i) * n + j).cast::<f32>();
            std::ptr::copy_nonoverlapping(row.as_ptr(), dst, cols.min(HALVES * HALF));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
                for r in 0..m {
                    for j in 0..n {
                        let want: f64 = (0..k)
                            .map(|t| x[r * k + t] as f64 * w[j * long + t] as f64)
                            .sum();
                        // SAFETY: initialised above.
                        let got = unsafe { out[r * n + j].assume_init() } as f64;
                        assert!(
                            (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                            "{m} x {n} x {k} of {long} [{r}][{j}]: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }
}

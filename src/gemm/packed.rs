//! f32 products against weights packed into panels of 32 output features (`[k][32]` each):
//! the outer-product form, each row value broadcast against the panel's two registers of a step,
//! 12 rows x 32 features of accumulators (24 of the 32 registers), no horizontal sums at the end,
//! and two 64-byte loads per 24 FMAs where the dot form (`avx512`) loads 22 per 48. The model
//! packs its f32 projections once at load (`Linear::into_panels`); `linear` packs per product
//! for rows of many rows against weights kept as rows (the LM head). The tiles of each panel
//! prefetch the next one, each its share: decode steps stream the weights from memory, and
//! without it they were 15-25% slower than the dot form (docs/cpu-performance.md).

use std::arch::x86_64::*;
use std::mem::MaybeUninit;

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
    let panels = n.div_ceil(PANEL);
    // Each tile of a panel asks for its share of the next panel's steps, one step's two lines
    // every `tiles` steps of its own: the first tile asking for the whole panel, two lines per
    // step, kept more requests in flight than the core has line-fill buffers (that tile
    // stalled, the others left memory idle): gate/up at 32 and 64 rows 15-16% slower.
    let tiles = m.div_ceil(ROWS);
    let share = k.div_ceil(tiles.max(1));
    for p in 0..panels {
        let panel = &packed[p * stride..][..k * PANEL];
        let cols = (n - p * PANEL).min(PANEL);
        let mut r = 0;
        while r < m {
            let rows = (m - r).min(ROWS);
            let first = r / ROWS * share;
            let next = if p + 1 < panels && first < k {
                Next {
                    at: packed[(p + 1) * stride + first * PANEL..].as_ptr(),
                    steps: share.min(k - first),
                    every: tiles,
                }
            } else {
                Next::NONE
            };
            let at = (r, p * PANEL, cols, next);
            // SAFETY: rows `r .. r + rows` of `x` and of `out` exist (caller), the panel holds
            // `k` steps of 32.
            unsafe {
                match rows {
                    12 => tile::<12>(at, (n, k), x, panel, out),
                    11 => tile::<11>(at, (n, k), x, panel, out),
                    10 => tile::<10>(at, (n, k), x, panel, out),
                    9 => tile::<9>(at, (n, k), x, panel, out),
                    8 => tile::<8>(at, (n, k), x, panel, out),
                    7 => tile::<7>(at, (n, k), x, panel, out),
                    6 => tile::<6>(at, (n, k), x, panel, out),
                    5 => tile::<5>(at, (n, k), x, panel, out),
                    4 => tile::<4>(at, (n, k), x, panel, out),
                    3 => tile::<3>(at, (n, k), x, panel, out),
                    2 => tile::<2>(at, (n, k), x, panel, out),
                    _ => tile::<1>(at, (n, k), x, panel, out),
                }
            }
            r += rows;
        }
    }
}

/// The part of the next panel a tile prefetches: `steps` steps from `at`, one step's two lines
/// every `every` steps of its own.
#[derive(Clone, Copy)]
struct Next {
    at: *const f32,
    steps: usize,
    every: usize,
}

impl Next {
    const NONE: Next = Next {
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
unsafe fn tile<const R: usize>(
    (r, j, cols, next): (usize, usize, usize, Next),
    (n, k): (usize, usize),
    x: &[f32],
    panel: &[f32],
    out: &mut [MaybeUninit<f32>],
) {
    // SAFETY: the caller's contract bounds the rows, the panel and the outputs; stores past
    // the last feature are masked off.
    unsafe {
        let (xp, wp) = (x.as_ptr().add(r * k), panel.as_ptr());
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        let (mut asked, mut wait) = (0, 0);
        for kk in 0..k {
            if asked < next.steps {
                if wait == 0 {
                    let at = next.at.add(asked * PANEL).cast::<i8>();
                    _mm_prefetch::<_MM_HINT_T1>(at);
                    _mm_prefetch::<_MM_HINT_T1>(at.add(64));
                    asked += 1;
                    wait = next.every;
                }
                wait -= 1;
            }
            let w0 = _mm512_loadu_ps(wp.add(kk * PANEL));
            let w1 = _mm512_loadu_ps(wp.add(kk * PANEL + 16));
            for (i, a) in acc.iter_mut().enumerate() {
                let b = _mm512_set1_ps(*xp.add(i * k + kk));
                a[0] = _mm512_fmadd_ps(b, w0, a[0]);
                a[1] = _mm512_fmadd_ps(b, w1, a[1]);
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
            for r in 0..m {
                for j in 0..n {
                    let want: f64 = (0..k)
                        .map(|t| x[r * k + t] as f64 * w[j * long + t] as f64)
                        .sum();
                    let got = out[r * n + j] as f64;
                    assert!(
                        (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                        "{m} x {n} x {k} of {long} [{r}][{j}]: {got} vs {want}"
                    );
                }
            }
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
            for r in 0..m {
                for j in 0..n {
                    let want: f64 = (0..k)
                        .map(|t| x[r * k + t] as f64 * w[j * k + t] as f64)
                        .sum();
                    // SAFETY: initialised above.
                    let got = unsafe { out[r * n + j].assume_init() } as f64;
                    assert!(
                        (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                        "{m} x {n} x {k} [{r}][{j}]: {got} vs {want}"
                    );
                }
            }
        }
    }
}

//! Products of f32 rows with bf16 weights on the CPU (`--dtype bf16`): the rows are rounded to
//! bf16 once per call, products of bf16 pairs are exact in f32 and summed in f32. With AVX-512
//! BF16 one `vdpbf16ps` does 32 multiply-adds, twice an f32 FMA's 16, and the weights are half
//! the bytes: on the AMD EPYC (Zen 4) build machine one core runs 233 GFLOP/s of `vdpbf16ps`
//! against 117 of f32 FMAs. Not on every CPU: on an Intel Xeon with AVX-512 BF16 it ran at 107
//! against 214, so there only the halved bytes help (docs/cpu-performance.md). Elsewhere the
//! same products run as plain loops (correct, slow).

use half::bf16;

/// Whether the fast kernels can run here (AVX-512 F/BW and BF16): callers say so when not.
pub fn bf16_dot_supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// `dst[i] = bf16(src[i])`, rounded to nearest even (as `vcvtne2ps2bf16` does; subnormal inputs
/// there become zero, which no activation of a model at work is).
pub fn round_to_bf16(src: &[f32], dst: &mut [bf16]) {
    assert_eq!(src.len(), dst.len(), "round_to_bf16: lengths");
    #[cfg(target_arch = "x86_64")]
    if bf16_dot_supported() {
        // SAFETY: the features are present (checked) and the lengths are equal (asserted).
        unsafe { x86::round(src, dst) };
        return;
    }
    for (d, s) in dst.iter_mut().zip(src) {
        *d = bf16::from_f32(*s);
    }
}

/// `out[r * n + j] = x[r] . w[j]` for bf16 `x` `[m, k]` and `w` `[n, k]` (row-major), summed in
/// f32: `gemm::rows_by_weights` for bf16 weights, at any `m` (callers keep a call's rows few
/// enough for L2: they are read once per block of weight rows).
pub fn rows_by_weights_bf16(
    (m, n, k): (usize, usize, usize),
    x: &[bf16],
    w: &[bf16],
    out: &mut [f32],
) {
    assert!(
        x.len() >= m * k && w.len() >= n * k && out.len() >= m * n,
        "rows_by_weights_bf16: sizes"
    );
    #[cfg(target_arch = "x86_64")]
    if bf16_dot_supported() {
        // SAFETY: the features are present (checked); the assert above bounds every access.
        unsafe { x86::rows_by_weights(m, k, n, x, w, out) };
        return;
    }
    for r in 0..m {
        for j in 0..n {
            out[r * n + j] = x[r * k..][..k]
                .iter()
                .zip(&w[j * k..][..k])
                .map(|(a, b)| a.to_f32() * b.to_f32())
                .sum();
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use half::bf16;

    use super::super::x86::{Prefetch, walk_tiles};

    /// # Safety
    /// AVX-512 F, BW and BF16 must be available; `src` and `dst` have the same length.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub unsafe fn round(src: &[f32], dst: &mut [bf16]) {
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
                *d = bf16::from_f32(*s);
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
            walk_tiles((m, n, k), w, (X_ROWS, W_ROWS), |mr, full, at, pf| {
                match (mr, full) {
                    (4, true) => tile::<4, 4>(k, n, x, w, out, at, pf),
                    (3, true) => tile::<3, 4>(k, n, x, w, out, at, pf),
                    (2, true) => tile::<2, 4>(k, n, x, w, out, at, pf),
                    (_, true) => tile::<1, 4>(k, n, x, w, out, at, pf),
                    (4, false) => tile::<4, 1>(k, n, x, w, out, at, pf),
                    (3, false) => tile::<3, 1>(k, n, x, w, out, at, pf),
                    (2, false) => tile::<2, 1>(k, n, x, w, out, at, pf),
                    (_, false) => tile::<1, 1>(k, n, x, w, out, at, pf),
                }
            });
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

    /// The sums of four vectors' lanes, in order: halves added, then pairwise sums across
    /// the four (`hadd`), about half the shuffles of four separate reductions.
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn sum4(a: [__m512; 4]) -> __m128 {
        let half = |v: __m512| {
            let hi = _mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v));
            _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(hi))
        };
        let h01 = _mm256_hadd_ps(half(a[0]), half(a[1]));
        let h23 = _mm256_hadd_ps(half(a[2]), half(a[3]));
        let h = _mm256_hadd_ps(h01, h23);
        _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps::<1>(h))
    }

    #[inline(always)]
    fn as_bh(v: __m512i) -> __m512bh {
        // SAFETY: both are 64 plain bytes.
        unsafe { std::mem::transmute::<__m512i, __m512bh>(v) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::Rng64;

    fn to_bf16(v: &[f32]) -> Vec<bf16> {
        v.iter().map(|x| bf16::from_f32(*x)).collect()
    }

    #[test]
    fn rounding_matches_half() {
        let src = Rng64::new(5).uniform_f32(101, 3.0);
        let mut got = vec![bf16::NAN; src.len()];
        round_to_bf16(&src, &mut got);
        assert_eq!(got, to_bf16(&src));
    }

    #[test]
    fn products_match_plain_dots() {
        let mut rng = Rng64::new(9);
        for (m, k, n) in [
            (1, 64, 9),
            (2, 576, 4),
            (3, 13, 7),
            (4, 32, 8),
            (8, 576, 33),
            (5, 1, 2),
            (7, 40, 1),
            (6, 200, 8),
            (64, 1536, 23),
            (33, 95, 17),
        ] {
            let x = to_bf16(&rng.uniform_f32(m * k, 1.0));
            let w = to_bf16(&rng.uniform_f32(n * k, 1.0));
            let mut got = vec![f32::NAN; m * n];
            rows_by_weights_bf16((m, n, k), &x, &w, &mut got);
            for r in 0..m {
                for j in 0..n {
                    let want: f64 = (0..k)
                        .map(|t| x[r * k + t].to_f64() * w[j * k + t].to_f64())
                        .sum();
                    let g = got[r * n + j] as f64;
                    assert!(
                        (g - want).abs() <= 1e-5 * (1.0 + want.abs()) * (k as f64).sqrt(),
                        "{m}x{k}x{n} [{r},{j}]: {g} vs {want}"
                    );
                }
            }
        }
    }
}

//! AVX-512 versions of decode attention's two inner loops (`simd::group_scores`,
//! `simd::group_weighted_rows`): one register holds a whole block of 16 keys' scores, or 16
//! columns of a V row, so each element costs half the instructions of the AVX2 loops, and the
//! 32 registers keep up to 24 accumulators, a V row of 64 values for three heads in one pass.
//! Measured on the Xeon (2 cores, SmolLM2's shape, cache in L3): see docs/cpu-performance.md.

use std::arch::x86_64::*;

use super::simd::Lanes;

/// AVX-512 F with AVX2, FMA and F16C (checked once): what these kernels and `Lanes::load16`
/// need.
pub fn available() -> bool {
    crate::device::cpu_has_avx512_bw() && super::simd::simd_ok()
}

/// Whether [`scores`] serves blocks of `bs` keys with rows of `d`.
pub fn scores_fit(d: usize, bs: usize) -> bool {
    (bs == 16 || bs == 32) && d.is_multiple_of(8)
}

/// Whether [`weighted`] serves rows of `d`.
pub fn weighted_fits(d: usize) -> bool {
    d.is_multiple_of(16)
}

/// Scores of `g <= 8` heads against one block (see `simd::group_scores`): `U` rows of `kt` per
/// step make 8 to 16 independent accumulators, enough to hide the FMA latency on two ports.
///
/// # Safety
/// [`available`]; `scores_fit(d, bs)`; `q` holds `g * d` values, `kt` `d * bs`, `out`
/// `(g - 1) * stride + bs`.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
pub unsafe fn scores<T: Lanes>(
    q: &[f32],
    d: usize,
    kt: &[T],
    scale: f32,
    out: &mut [f32],
    stride: usize,
    bs: usize,
    g: usize,
) {
    // SAFETY: the caller's contract; d is a multiple of 8, so of every U below.
    unsafe {
        let a = (q, d, kt, scale, out, stride);
        match (bs / 16, g) {
            (1, 1) => scores_g::<T, 1, 1, 8>(a),
            (1, 2) => scores_g::<T, 2, 1, 4>(a),
            (1, 3) => scores_g::<T, 3, 1, 4>(a),
            (1, 4) => scores_g::<T, 4, 1, 2>(a),
            (1, 5) => scores_g::<T, 5, 1, 2>(a),
            (1, 6) => scores_g::<T, 6, 1, 2>(a),
            (1, 7) => scores_g::<T, 7, 1, 2>(a),
            (1, 8) => scores_g::<T, 8, 1, 2>(a),
            (2, 1) => scores_g::<T, 1, 2, 4>(a),
            (2, 2) => scores_g::<T, 2, 2, 2>(a),
            (2, 3) => scores_g::<T, 3, 2, 2>(a),
            (2, 4) => scores_g::<T, 4, 2, 2>(a),
            (2, 5) => scores_g::<T, 5, 2, 1>(a),
            (2, 6) => scores_g::<T, 6, 2, 1>(a),
            (2, 7) => scores_g::<T, 7, 2, 1>(a),
            (2, 8) => scores_g::<T, 8, 2, 1>(a),
            _ => unreachable!("avx512::scores: {g} heads of {bs} keys"),
        }
    }
}

/// Scores of `G` heads against a block of `16 * V` keys: each row of `kt` (`V` registers) is
/// loaded once and multiplied into all `G` heads' accumulators.
///
/// # Safety
/// As [`scores`], with `d` a multiple of `U`.
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn scores_g<T: Lanes, const G: usize, const V: usize, const U: usize>(
    (q, d, kt, scale, out, stride): (&[f32], usize, &[T], f32, &mut [f32], usize),
) {
    // SAFETY: the caller's contract bounds every pointer offset.
    unsafe {
        let (k, qp) = (kt.as_ptr(), q.as_ptr());
        let mut a = [[[_mm512_setzero_ps(); V]; G]; U];
        let mut i = 0;
        while i < d {
            for (u, au) in a.iter_mut().enumerate() {
                let row = k.add((i + u) * 16 * V);
                let mut kv = [_mm512_setzero_ps(); V];
                for (c, x) in kv.iter_mut().enumerate() {
                    *x = T::load16(row.add(16 * c));
                }
                for (h, ah) in au.iter_mut().enumerate() {
                    let qv = _mm512_set1_ps(*qp.add(h * d + i + u));
                    for (x, k) in ah.iter_mut().zip(&kv) {
                        *x = _mm512_fmadd_ps(qv, *k, *x);
                    }
                }
            }
            i += U;
        }
        let s = _mm512_set1_ps(scale);
        for h in 0..G {
            for c in 0..V {
                let mut sum = a[0][h][c];
                for au in &a[1..] {
                    sum = _mm512_add_ps(sum, au[h][c]);
                }
                let o = out.as_mut_ptr().add(h * stride + 16 * c);
                _mm512_storeu_ps(o, _mm512_mul_ps(sum, s));
            }
        }
    }
}

/// Weighted V rows for `g <= 8` heads (see `simd::group_weighted_rows`): `C` registers of
/// columns per pass, so that the `g * C` accumulators (at most 16), the heads' weights and a V
/// register fit in 32, with `C` dividing `d / 16`.
///
/// # Safety
/// [`available`]; `weighted_fits(d)`; `acc` holds `g * d` values, `v` `m * d`, `p`
/// `(g - 1) * stride + m`.
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
pub unsafe fn weighted<T: Lanes>(
    p: &[f32],
    stride: usize,
    m: usize,
    v: &[T],
    acc: &mut [f32],
    d: usize,
    g: usize,
) {
    let most = match g {
        1 => 8,
        2..=4 => 4,
        _ => 2,
    };
    let c = [8, 4, 2, 1]
        .into_iter()
        .find(|&x| x <= most && (d / 16).is_multiple_of(x))
        .unwrap_or(1);
    // SAFETY: the caller's contract; `c` divides d / 16.
    unsafe {
        let a = (p, stride, m, v, acc, d);
        match (g, c) {
            (1, 8) => weighted_g::<T, 1, 8>(a),
            (1, 4) => weighted_g::<T, 1, 4>(a),
            (1, 2) => weighted_g::<T, 1, 2>(a),
            (2, 4) => weighted_g::<T, 2, 4>(a),
            (2, 2) => weighted_g::<T, 2, 2>(a),
            (3, 4) => weighted_g::<T, 3, 4>(a),
            (3, 2) => weighted_g::<T, 3, 2>(a),
            (4, 4) => weighted_g::<T, 4, 4>(a),
            (4, 2) => weighted_g::<T, 4, 2>(a),
            (5, 2) => weighted_g::<T, 5, 2>(a),
            (6, 2) => weighted_g::<T, 6, 2>(a),
            (7, 2) => weighted_g::<T, 7, 2>(a),
            (8, 2) => weighted_g::<T, 8, 2>(a),
            (1, _) => weighted_g::<T, 1, 1>(a),
            (2, _) => weighted_g::<T, 2, 1>(a),
            (3, _) => weighted_g::<T, 3, 1>(a),
            (4, _) => weighted_g::<T, 4, 1>(a),
            (5, _) => weighted_g::<T, 5, 1>(a),
            (6, _) => weighted_g::<T, 6, 1>(a),
            (7, _) => weighted_g::<T, 7, 1>(a),
            (8, _) => weighted_g::<T, 8, 1>(a),
            _ => unreachable!("avx512::weighted: {g} heads"),
        }
    }
}

/// `G` heads' weighted sums over `m` V rows, `16 * C` columns at a time: each V register is
/// loaded once and multiplied into all `G` heads' accumulators.
///
/// # Safety
/// As [`weighted`], with `d` a multiple of `16 * C`.
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn weighted_g<T: Lanes, const G: usize, const C: usize>(
    (p, stride, m, v, acc, d): (&[f32], usize, usize, &[T], &mut [f32], usize),
) {
    // SAFETY: the caller's contract bounds every pointer offset.
    unsafe {
        let (vp, ap, pp) = (v.as_ptr(), acc.as_mut_ptr(), p.as_ptr());
        let mut col = 0;
        while col < d {
            let mut r = [[_mm512_setzero_ps(); C]; G];
            for (h, rh) in r.iter_mut().enumerate() {
                for (c, x) in rh.iter_mut().enumerate() {
                    *x = _mm512_loadu_ps(ap.add(h * d + col + 16 * c));
                }
            }
            for j in 0..m {
                let row = vp.add(j * d + col);
                let mut pv = [_mm512_setzero_ps(); G];
                for (h, x) in pv.iter_mut().enumerate() {
                    *x = _mm512_set1_ps(*pp.add(h * stride + j) * T::UNIT);
                }
                for c in 0..C {
                    let x = T::load16(row.add(16 * c));
                    for (rh, w) in r.iter_mut().zip(&pv) {
                        rh[c] = _mm512_fmadd_ps(*w, x, rh[c]);
                    }
                }
            }
            for (h, rh) in r.iter().enumerate() {
                for (c, x) in rh.iter().enumerate() {
                    _mm512_storeu_ps(ap.add(h * d + col + 16 * c), *x);
                }
            }
            col += 16 * C;
        }
    }
}

/// `super::exp_prefix` on 16 lanes: the maximum in one pass, then each exponential
/// (`fastmath::exp16`, the same values as the scalar `exp`) stored and added up in the same
/// pass, the last partial vector under a mask; the masked tail `row[n..]` zeroed.
///
/// # Safety
/// AVX-512 F and FMA must be available; `n <= row.len()`, `n >= 1`.
#[target_feature(enable = "avx512f,fma")]
pub unsafe fn exp_prefix(row: &mut [f32], n: usize) -> (f32, f32) {
    let p = row.as_mut_ptr();
    let whole = n / 16 * 16;
    let tail: __mmask16 = ((1u32 << (n - whole)) - 1) as u16;
    // SAFETY: whole vectors below `whole <= n`, and the masked one covers `whole .. n`.
    unsafe {
        let ninf = _mm512_set1_ps(f32::NEG_INFINITY);
        // Two accumulators: a max's latency is four cycles and two issue per cycle.
        let (mut m0, mut m1) = (ninf, ninf);
        let mut i = 0;
        while i + 32 <= whole {
            m0 = _mm512_max_ps(m0, _mm512_loadu_ps(p.add(i)));
            m1 = _mm512_max_ps(m1, _mm512_loadu_ps(p.add(i + 16)));
            i += 32;
        }
        if i < whole {
            m0 = _mm512_max_ps(m0, _mm512_loadu_ps(p.add(i)));
        }
        m0 = _mm512_max_ps(m0, _mm512_mask_loadu_ps(ninf, tail, p.add(whole)));
        let max = _mm512_reduce_max_ps(_mm512_max_ps(m0, m1));
        let mv = _mm512_set1_ps(max);
        let (mut s0, mut s1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        let mut i = 0;
        while i + 32 <= whole {
            let e0 = crate::fastmath::exp16(_mm512_sub_ps(_mm512_loadu_ps(p.add(i)), mv));
            let e1 = crate::fastmath::exp16(_mm512_sub_ps(_mm512_loadu_ps(p.add(i + 16)), mv));
            _mm512_storeu_ps(p.add(i), e0);
            _mm512_storeu_ps(p.add(i + 16), e1);
            s0 = _mm512_add_ps(s0, e0);
            s1 = _mm512_add_ps(s1, e1);
            i += 32;
        }
        if i < whole {
            let e = crate::fastmath::exp16(_mm512_sub_ps(_mm512_loadu_ps(p.add(i)), mv));
            _mm512_storeu_ps(p.add(i), e);
            s0 = _mm512_add_ps(s0, e);
        }
        if tail != 0 {
            let x = _mm512_maskz_loadu_ps(tail, p.add(whole));
            let e = _mm512_maskz_mov_ps(tail, crate::fastmath::exp16(_mm512_sub_ps(x, mv)));
            _mm512_mask_storeu_ps(p.add(whole), tail, e);
            s0 = _mm512_add_ps(s0, e);
        }
        row[n..].fill(0.0);
        (max, _mm512_reduce_add_ps(_mm512_add_ps(s0, s1)))
    }
}

//! The two inner loops of CPU decode attention, with x86-64 AVX2/FMA intrinsics where the CPU
//! has them (checked once at run time) and plain loops elsewhere. Written by hand because the
//! compiler keeps neither loop's accumulators in registers on its own (measured: 3-4x slower).

/// `out[l] = scale * sum_d q[d] * kt[d * bs + l]` for the `bs = out.len()` keys of one block,
/// `kt` being the block's keys transposed (`[d, bs]`).
pub fn block_scores(q: &[f32], kt: &[f32], scale: f32, out: &mut [f32]) {
    let (d, bs) = (q.len(), out.len());
    assert!(kt.len() >= d * bs);
    #[cfg(target_arch = "x86_64")]
    if d.is_multiple_of(8) && avx2_fma() {
        // SAFETY: the CPU has AVX2 and FMA (checked), the assert above bounds every access, and
        // d is a multiple of 8 (so of every unroll below).
        match bs {
            8 => return unsafe { x86::block_scores::<1, 8>(q, kt, scale, out) },
            16 => return unsafe { x86::block_scores::<2, 4>(q, kt, scale, out) },
            32 => return unsafe { x86::block_scores::<4, 2>(q, kt, scale, out) },
            _ => {}
        }
    }
    out.fill(0.0);
    for (dd, &qd) in q.iter().enumerate() {
        for (a, &k) in out.iter_mut().zip(&kt[dd * bs..][..bs]) {
            *a += qd * k;
        }
    }
    out.iter_mut().for_each(|a| *a *= scale);
}

/// `acc[..d] += sum_j p[j] * v[j * d ..][..d]`: the probability-weighted sum of V rows.
pub fn weighted_rows(p: &[f32], v: &[f32], acc: &mut [f32]) {
    let d = acc.len();
    assert!(v.len() >= p.len() * d);
    #[cfg(target_arch = "x86_64")]
    if avx2_fma() && d.is_multiple_of(32) {
        // SAFETY: the CPU has AVX2 and FMA (checked), and the assert above bounds every access.
        unsafe { x86::weighted_rows(p, v, acc) };
        return;
    }
    for (j, &pj) in p.iter().enumerate() {
        for (a, &x) in acc.iter_mut().zip(&v[j * d..][..d]) {
            *a += pj * x;
        }
    }
}

#[cfg(target_arch = "x86_64")]
use crate::device::cpu_has_avx2_fma as avx2_fma;

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// Scores of a block of `8 * V` keys: `V` vectors per row of `kt`, `U` rows per step, so
    /// that `V * U = 8` accumulators hide the FMA latency (16-key blocks: 2 x 4).
    ///
    /// # Safety
    /// AVX2 and FMA must be available; `kt` holds `8 * V * q.len()` values, `out` `8 * V`, and
    /// `q.len()` is a multiple of `U`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn block_scores<const V: usize, const U: usize>(
        q: &[f32],
        kt: &[f32],
        scale: f32,
        out: &mut [f32],
    ) {
        let bs = 8 * V;
        // SAFETY: the caller's contract (above) bounds every pointer offset.
        unsafe {
            let k = kt.as_ptr();
            let mut a = [_mm256_setzero_ps(); 8];
            let mut dd = 0;
            while dd < q.len() {
                for u in 0..U {
                    let qv = _mm256_set1_ps(*q.get_unchecked(dd + u));
                    let row = k.add((dd + u) * bs);
                    for v in 0..V {
                        let i = u * V + v;
                        a[i] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(row.add(8 * v)), a[i]);
                    }
                }
                dd += U;
            }
            let s = _mm256_set1_ps(scale);
            for v in 0..V {
                let mut sum = a[v];
                for u in 1..U {
                    sum = _mm256_add_ps(sum, a[u * V + v]);
                }
                _mm256_storeu_ps(out.as_mut_ptr().add(8 * v), _mm256_mul_ps(sum, s));
            }
        }
    }

    /// # Safety
    /// AVX2 and FMA must be available; `acc.len()` is a multiple of 32 and `v` holds
    /// `p.len() * acc.len()` values.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn weighted_rows(p: &[f32], v: &[f32], acc: &mut [f32]) {
        // SAFETY: the caller's contract (above) bounds every pointer offset.
        unsafe {
            let d = acc.len();
            let (vp, ap) = (v.as_ptr(), acc.as_mut_ptr());
            let mut c = 0;
            while c < d {
                let mut r = [
                    _mm256_loadu_ps(ap.add(c)),
                    _mm256_loadu_ps(ap.add(c + 8)),
                    _mm256_loadu_ps(ap.add(c + 16)),
                    _mm256_loadu_ps(ap.add(c + 24)),
                ];
                for (j, &pj) in p.iter().enumerate() {
                    let pv = _mm256_set1_ps(pj);
                    let row = vp.add(j * d + c);
                    for (u, acc) in r.iter_mut().enumerate() {
                        *acc = _mm256_fmadd_ps(pv, _mm256_loadu_ps(row.add(8 * u)), *acc);
                    }
                }
                for (u, acc) in r.iter().enumerate() {
                    _mm256_storeu_ps(ap.add(c + 8 * u), *acc);
                }
                c += 32;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::Rng64;

    fn rand(n: usize, rng: &mut Rng64) -> Vec<f32> {
        (0..n).map(|_| rng.next_f64() as f32 - 0.5).collect()
    }

    #[test]
    fn kernels_match_plain_loops() {
        let mut rng = Rng64::new(5);
        for d in [64usize, 128] {
            let q = rand(d, &mut rng);
            let kt = rand(d * 32, &mut rng);
            for bs in [8, 16, 32, 5] {
                let mut got = vec![0f32; bs];
                block_scores(&q, &kt, 0.5, &mut got);
                for l in 0..bs {
                    let want: f32 = (0..d).map(|i| q[i] * kt[i * bs + l]).sum::<f32>() * 0.5;
                    assert!(
                        (got[l] - want).abs() < 1e-4,
                        "{d} {bs} {l}: {} vs {want}",
                        got[l]
                    );
                }
            }
            let p = rand(11, &mut rng);
            let v = rand(11 * d, &mut rng);
            let mut acc = rand(d, &mut rng);
            let mut want = acc.clone();
            for j in 0..11 {
                for i in 0..d {
                    want[i] += p[j] * v[j * d + i];
                }
            }
            weighted_rows(&p, &v, &mut acc);
            for i in 0..d {
                assert!((acc[i] - want[i]).abs() < 1e-4);
            }
        }
    }
}

//! The two inner loops of CPU decode attention, with x86-64 AVX2/FMA intrinsics where the CPU
//! has them (checked once at run time), AVX-512 ones (`super::avx512`) where it has those, and
//! plain loops elsewhere. Written by hand because the compiler keeps neither loop's accumulators
//! in registers on its own (measured: 3-4x slower).
//! Both serve all the query heads that share a KV head at once (grouped-query attention) and read
//! the cache in its own element type, widened to f32 in registers (F16C for f16, a shift for
//! bf16, a shift into an f16 for fp8): each K/V element is loaded and converted once per step,
//! not once per query head, and a block goes from memory straight into the multiply-adds.
//! `widen` converts runs the same way (prefill's gather of an fp8 cache).

use half::{bf16, f16};

/// Element types of a KV cache the kernels read directly.
pub trait Lanes: Copy {
    /// What [`Lanes::load8`]'s lanes count in: an element's value is its lane times `UNIT`
    /// (1 but for fp8, whose widening saves a multiply per vector; the kernels apply it once
    /// per score and per probability instead).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    const UNIT: f32 = 1.0;
    fn to_f32(self) -> f32;
    /// Whether `s` holds a NaN that [`Lanes::load8`] would not keep (fp8's widening leaves NaN
    /// out for speed: a block holding one takes the plain loops).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    fn any_lost_nan(_s: &[Self]) -> bool {
        false
    }
    /// Eight elements from `p`, widened to f32, in units of [`Lanes::UNIT`].
    ///
    /// # Safety
    /// AVX2, FMA and F16C must be available; `p` points at eight readable elements.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
    /// Sixteen elements from `p`, as [`Lanes::load8`] for the AVX-512 loops.
    ///
    /// # Safety
    /// AVX-512 F, AVX2 and F16C must be available; `p` points at sixteen readable elements.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512;
}

impl Lanes for f32 {
    fn to_f32(self) -> f32 {
        self
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        // SAFETY: the caller's contract.
        unsafe { std::arch::x86_64::_mm256_loadu_ps(p) }
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    #[inline]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512 {
        // SAFETY: the caller's contract.
        unsafe { std::arch::x86_64::_mm512_loadu_ps(p) }
    }
}

impl Lanes for f16 {
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // SAFETY: the caller's contract.
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p.cast())) }
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    #[inline]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        // SAFETY: the caller's contract.
        unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p.cast())) }
    }
}

impl Lanes for bf16 {
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // SAFETY: the caller's contract. A bf16 is the top half of an f32.
        unsafe {
            let wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(p.cast()));
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(wide))
        }
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    #[inline]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        // SAFETY: the caller's contract, as `load8`.
        unsafe {
            let wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(p.cast()));
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(wide))
        }
    }
}

impl Lanes for super::fp8::F8E4M3 {
    const UNIT: f32 = 256.0;
    fn to_f32(self) -> f32 {
        super::fp8::decode(self.to_bits())
    }
    fn any_lost_nan(s: &[Self]) -> bool {
        // A fold rather than `any`, so that it vectorises (32 codes per step).
        s.iter().fold(0u8, |a, x| {
            a | u8::from(super::fp8::is_nan_bits(x.to_bits()))
        }) != 0
    }
    /// NaN codes (magnitude 0x7f) come out as 480 / `UNIT`: see [`Lanes::any_lost_nan`].
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // SAFETY: the caller's contract. Each code in the top byte of a 16-bit lane, shifted
        // right by one with its sign (which then also fills the f16 exponent's top bit,
        // cleared): the f16 of 2^-8 times the code's value, subnormals included.
        unsafe {
            let w = _mm_unpacklo_epi8(_mm_setzero_si128(), _mm_loadl_epi64(p.cast()));
            let h = _mm_and_si128(_mm_srai_epi16::<1>(w), _mm_set1_epi16(0xbfffu16 as i16));
            _mm256_cvtph_ps(h)
        }
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    #[inline]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        // SAFETY: the caller's contract, as `load8` sixteen codes at a time.
        unsafe {
            let w = _mm256_slli_epi16::<8>(_mm256_cvtepu8_epi16(_mm_loadu_si128(p.cast())));
            let h = _mm256_and_si256(
                _mm256_srai_epi16::<1>(w),
                _mm256_set1_epi16(0xbfffu16 as i16),
            );
            _mm512_cvtph_ps(h)
        }
    }
}

/// Scores of the query heads that share one KV head against one block of keys:
/// `out[h * stride + l] = scale * sum_i q[h * d + i] * kt[i * bs + l]` for the `q.len() / d`
/// heads of `q` and the `bs` keys of the block, `kt` being its keys transposed (`[d, bs]`).
/// Each key is read and widened once for all the heads.
pub fn group_scores<T: Lanes>(
    q: &[f32],
    d: usize,
    kt: &[T],
    scale: f32,
    out: (&mut [f32], usize, usize),
) {
    group_scores_on(Isa::best(), q, d, kt, scale, out);
}

/// [`group_scores`] with the loops of `isa` (or plain ones where its kernels do not fit).
fn group_scores_on<T: Lanes>(
    isa: Isa,
    q: &[f32],
    d: usize,
    kt: &[T],
    scale: f32,
    (out, stride, bs): (&mut [f32], usize, usize),
) {
    #[cfg(not(target_arch = "x86_64"))]
    let _ = isa;
    let g = q.len() / d;
    assert!(d > 0 && q.len() == g * d && kt.len() >= d * bs && bs <= stride);
    assert!(g == 0 || out.len() >= (g - 1) * stride + bs);
    #[cfg(target_arch = "x86_64")]
    if isa != Isa::Plain && d.is_multiple_of(8) && !T::any_lost_nan(&kt[..d * bs]) {
        if isa == Isa::Avx512 && super::avx512::scores_fit(d, bs) {
            for h0 in (0..g).step_by(8) {
                let n = 8.min(g - h0);
                let (q, out) = (&q[h0 * d..][..n * d], &mut out[h0 * stride..]);
                // SAFETY: `isa` is only Avx512 where the CPU has it; the asserts above bound
                // every access, and `scores_fit` the block's shape.
                unsafe { super::avx512::scores(q, d, kt, scale * T::UNIT, out, stride, bs, n) };
            }
            return;
        }
        if bs.is_multiple_of(8) && (8..=32).contains(&bs) {
            // At most 8 accumulators of 8 lanes per call (of 16 registers), so heads go in
            // runs.
            let most = 8 / (bs / 8);
            for h0 in (0..g).step_by(most) {
                let n = most.min(g - h0);
                let (q, out) = (&q[h0 * d..][..n * d], &mut out[h0 * stride..]);
                // SAFETY: the CPU has AVX2, FMA and F16C (`isa` is not Plain); the asserts
                // above bound every access; d is a multiple of 8, so of every unroll.
                unsafe { x86::scores_dispatch(q, d, kt, scale * T::UNIT, out, stride, bs, n) };
            }
            return;
        }
    }
    for h in 0..g {
        let o = &mut out[h * stride..][..bs];
        o.fill(0.0);
        for (i, &qi) in q[h * d..][..d].iter().enumerate() {
            for (a, &k) in o.iter_mut().zip(&kt[i * bs..][..bs]) {
                *a += qi * k.to_f32();
            }
        }
        o.iter_mut().for_each(|a| *a *= scale);
    }
}

/// The probability-weighted sum of V rows for the query heads sharing one KV head:
/// `acc[h * d + c] += sum_j p[h * stride + j] * v[j * d + c]` for `j < m`. Each V row is read
/// and widened once for all the heads.
pub fn group_weighted_rows<T: Lanes>(
    p: (&[f32], usize, usize),
    v: &[T],
    acc: &mut [f32],
    d: usize,
) {
    group_weighted_rows_on(Isa::best(), p, v, acc, d);
}

/// [`group_weighted_rows`] with the loops of `isa` (or plain ones where its kernels do not fit).
fn group_weighted_rows_on<T: Lanes>(
    isa: Isa,
    (p, stride, m): (&[f32], usize, usize),
    v: &[T],
    acc: &mut [f32],
    d: usize,
) {
    #[cfg(not(target_arch = "x86_64"))]
    let _ = isa;
    let g = acc.len() / d;
    assert!(d > 0 && acc.len() == g * d && v.len() >= m * d && m <= stride);
    assert!(g == 0 || p.len() >= (g - 1) * stride + m);
    #[cfg(target_arch = "x86_64")]
    if isa != Isa::Plain && d.is_multiple_of(8) && !T::any_lost_nan(&v[..m * d]) {
        let wide = isa == Isa::Avx512 && super::avx512::weighted_fits(d);
        for h0 in (0..g).step_by(8) {
            let n = 8.min(g - h0);
            let (p, acc) = (&p[h0 * stride..], &mut acc[h0 * d..][..n * d]);
            // SAFETY: `isa` is only Avx512 where the CPU has it (then `weighted_fits`), and
            // otherwise not Plain where it has AVX2, FMA and F16C; the asserts above bound
            // every access; d is a multiple of 8.
            unsafe {
                if wide {
                    super::avx512::weighted(p, stride, m, v, acc, d, n);
                } else {
                    x86::weighted_dispatch(p, stride, m, v, acc, d, n);
                }
            }
        }
        return;
    }
    for h in 0..g {
        let a = &mut acc[h * d..][..d];
        for (j, &pj) in p[h * stride..][..m].iter().enumerate() {
            for (a, &x) in a.iter_mut().zip(&v[j * d..][..d]) {
                *a += pj * x.to_f32();
            }
        }
    }
}

/// `src` widened to f32 into `dst` (which must be as long), eight at a time where the CPU
/// allows: how prefill gathers an fp8 cache.
pub fn widen<T: Lanes>(src: &[T], dst: &mut [f32]) {
    let dst = &mut dst[..src.len()];
    #[allow(unused_mut)]
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if simd_ok() && !T::any_lost_nan(src) {
        done = src.len() / 8 * 8;
        // SAFETY: AVX2, FMA and F16C checked; both slices hold `done` elements.
        unsafe { x86::widen(&src[..done], &mut dst[..done]) };
    }
    for (d, s) in dst[done..].iter_mut().zip(&src[done..]) {
        *d = s.to_f32();
    }
}

/// Which loops decode attention runs: the best this CPU has, or (in tests) each of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
enum Isa {
    Plain,
    /// AVX2, FMA and F16C.
    Avx2,
    /// AVX-512 F besides (`super::avx512`).
    Avx512,
}

impl Isa {
    /// The widest loops this CPU runs (its checks are cached).
    fn best() -> Isa {
        #[cfg(target_arch = "x86_64")]
        if super::avx512::available() {
            return Isa::Avx512;
        } else if simd_ok() {
            return Isa::Avx2;
        }
        Isa::Plain
    }

    /// Every one this CPU runs, for the tests to compare.
    #[cfg(test)]
    fn all_here() -> Vec<Isa> {
        [Isa::Plain, Isa::Avx2, Isa::Avx512]
            .into_iter()
            .filter(|&i| i <= Isa::best())
            .collect()
    }
}

/// AVX2, FMA and F16C (every x86-64 CPU with AVX2 in practice); both checks are cached.
#[cfg(target_arch = "x86_64")]
pub(super) fn simd_ok() -> bool {
    crate::device::cpu_has_avx2_fma() && is_x86_feature_detected!("f16c")
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::Lanes;

    /// `src` (a multiple of 8 long, no NaN that `load8` loses) widened into `dst`.
    ///
    /// # Safety
    /// AVX2, FMA and F16C must be available; `dst` is as long as `src`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn widen<T: Lanes>(src: &[T], dst: &mut [f32]) {
        let unit = _mm256_set1_ps(T::UNIT);
        for i in (0..src.len()).step_by(8) {
            // SAFETY: the caller's contract; `i + 8 <= src.len()`.
            unsafe {
                let x = _mm256_mul_ps(T::load8(src.as_ptr().add(i)), unit);
                _mm256_storeu_ps(dst.as_mut_ptr().add(i), x);
            }
        }
    }

    /// Picks the kernel for `g` heads and blocks of `bs` keys (`g * bs / 8 <= 8`). `U` rows of
    /// `kt` per step make up to 8 independent accumulators, enough to hide the FMA latency.
    ///
    /// # Safety
    /// As [`scores`], with `q.len() == g * d`.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn scores_dispatch<T: Lanes>(
        q: &[f32],
        d: usize,
        kt: &[T],
        scale: f32,
        out: &mut [f32],
        stride: usize,
        bs: usize,
        g: usize,
    ) {
        // SAFETY: the caller's contract.
        unsafe {
            let a = (q, d, kt, scale, out, stride);
            match (bs / 8, g) {
                (1, 1) => scores::<T, 1, 1, 8>(a),
                (1, 2) => scores::<T, 2, 1, 4>(a),
                (1, 3) => scores::<T, 3, 1, 2>(a),
                (1, 4) => scores::<T, 4, 1, 2>(a),
                (1, 5) => scores::<T, 5, 1, 1>(a),
                (1, 6) => scores::<T, 6, 1, 1>(a),
                (1, 7) => scores::<T, 7, 1, 1>(a),
                (1, 8) => scores::<T, 8, 1, 1>(a),
                (2, 1) => scores::<T, 1, 2, 4>(a),
                (2, 2) => scores::<T, 2, 2, 2>(a),
                (2, 3) => scores::<T, 3, 2, 1>(a),
                (2, 4) => scores::<T, 4, 2, 1>(a),
                (3, 1) => scores::<T, 1, 3, 2>(a),
                (3, 2) => scores::<T, 2, 3, 1>(a),
                (4, 1) => scores::<T, 1, 4, 2>(a),
                (4, 2) => scores::<T, 2, 4, 1>(a),
                _ => unreachable!("group_scores: {g} heads of {bs} keys"),
            }
        }
    }

    /// Scores of `G` heads against a block of `8 * V` keys: each row of `kt` (`V` vectors) is
    /// loaded once and multiplied into all `G` heads' accumulators.
    ///
    /// # Safety
    /// AVX2, FMA and F16C must be available; `q` holds `G * d` values, `kt` `8 * V * d`, `out`
    /// `(G - 1) * stride + 8 * V`; `d` is a multiple of `U`.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn scores<T: Lanes, const G: usize, const V: usize, const U: usize>(
        (q, d, kt, scale, out, stride): (&[f32], usize, &[T], f32, &mut [f32], usize),
    ) {
        // SAFETY: the caller's contract (above) bounds every pointer offset.
        unsafe {
            let (k, qp) = (kt.as_ptr(), q.as_ptr());
            let mut a = [[[_mm256_setzero_ps(); V]; G]; U];
            let mut i = 0;
            while i < d {
                for (u, au) in a.iter_mut().enumerate() {
                    let row = k.add((i + u) * 8 * V);
                    let mut kv = [_mm256_setzero_ps(); V];
                    for (c, x) in kv.iter_mut().enumerate() {
                        *x = T::load8(row.add(8 * c));
                    }
                    for (h, ah) in au.iter_mut().enumerate() {
                        let qv = _mm256_set1_ps(*qp.add(h * d + i + u));
                        for (x, k) in ah.iter_mut().zip(&kv) {
                            *x = _mm256_fmadd_ps(qv, *k, *x);
                        }
                    }
                }
                i += U;
            }
            let s = _mm256_set1_ps(scale);
            for h in 0..G {
                for c in 0..V {
                    let mut sum = a[0][h][c];
                    for au in &a[1..] {
                        sum = _mm256_add_ps(sum, au[h][c]);
                    }
                    let o = out.as_mut_ptr().add(h * stride + 8 * c);
                    _mm256_storeu_ps(o, _mm256_mul_ps(sum, s));
                }
            }
        }
    }

    /// Picks the kernel for `g <= 8` heads: `C` vectors of columns per pass, so that the
    /// `g * C` accumulators (at most 12) plus a V vector and the heads' weights fit in 16
    /// registers, with `C` dividing `d / 8`.
    ///
    /// # Safety
    /// As [`weighted`], with `acc.len() == g * d`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn weighted_dispatch<T: Lanes>(
        p: &[f32],
        stride: usize,
        m: usize,
        v: &[T],
        acc: &mut [f32],
        d: usize,
        g: usize,
    ) {
        let lanes = d / 8;
        let c = match g {
            1 => 8,
            2 | 3 => 4,
            4..=6 => 2,
            _ => 1,
        };
        let c = [8, 4, 2, 1]
            .into_iter()
            .find(|&x| x <= c && lanes.is_multiple_of(x))
            .unwrap_or(1);
        // SAFETY: the caller's contract.
        unsafe {
            let a = (p, stride, m, v, acc, d);
            match (g, c) {
                (1, 8) => weighted::<T, 1, 8>(a),
                (1, 4) => weighted::<T, 1, 4>(a),
                (1, 2) => weighted::<T, 1, 2>(a),
                (2, 4) => weighted::<T, 2, 4>(a),
                (2, 2) => weighted::<T, 2, 2>(a),
                (3, 4) => weighted::<T, 3, 4>(a),
                (3, 2) => weighted::<T, 3, 2>(a),
                (4, 2) => weighted::<T, 4, 2>(a),
                (5, 2) => weighted::<T, 5, 2>(a),
                (6, 2) => weighted::<T, 6, 2>(a),
                (1, _) => weighted::<T, 1, 1>(a),
                (2, _) => weighted::<T, 2, 1>(a),
                (3, _) => weighted::<T, 3, 1>(a),
                (4, _) => weighted::<T, 4, 1>(a),
                (5, _) => weighted::<T, 5, 1>(a),
                (6, _) => weighted::<T, 6, 1>(a),
                (7, _) => weighted::<T, 7, 1>(a),
                (8, _) => weighted::<T, 8, 1>(a),
                _ => unreachable!("group_weighted_rows: {g} heads"),
            }
        }
    }

    /// `G` heads' weighted sums over `m` V rows, `8 * C` columns at a time: each V vector is
    /// loaded once and multiplied into all `G` heads' accumulators.
    ///
    /// # Safety
    /// AVX2, FMA and F16C must be available; `acc` holds `G * d` values, `v` `m * d`, `p`
    /// `(G - 1) * stride + m`; `d` is a multiple of `8 * C`.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn weighted<T: Lanes, const G: usize, const C: usize>(
        (p, stride, m, v, acc, d): (&[f32], usize, usize, &[T], &mut [f32], usize),
    ) {
        // SAFETY: the caller's contract (above) bounds every pointer offset.
        unsafe {
            let (vp, ap, pp) = (v.as_ptr(), acc.as_mut_ptr(), p.as_ptr());
            let mut col = 0;
            while col < d {
                let mut r = [[_mm256_setzero_ps(); C]; G];
                for (h, rh) in r.iter_mut().enumerate() {
                    for (c, x) in rh.iter_mut().enumerate() {
                        *x = _mm256_loadu_ps(ap.add(h * d + col + 8 * c));
                    }
                }
                for j in 0..m {
                    let row = vp.add(j * d + col);
                    let mut pv = [_mm256_setzero_ps(); G];
                    for (h, x) in pv.iter_mut().enumerate() {
                        *x = _mm256_set1_ps(*pp.add(h * stride + j) * T::UNIT);
                    }
                    for c in 0..C {
                        let x = T::load8(row.add(8 * c));
                        for (rh, w) in r.iter_mut().zip(&pv) {
                            rh[c] = _mm256_fmadd_ps(*w, x, rh[c]);
                        }
                    }
                }
                for (h, rh) in r.iter().enumerate() {
                    for (c, x) in rh.iter().enumerate() {
                        _mm256_storeu_ps(ap.add(h * d + col + 8 * c), *x);
                    }
                }
                col += 8 * C;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::fp8::{self, F8E4M3};
    use super::*;
    use crate::util::Rng64;

    fn rand(n: usize, rng: &mut Rng64) -> Vec<f32> {
        (0..n).map(|_| rng.next_f64() as f32 - 0.5).collect()
    }

    /// Both kernels of every instruction set this CPU has against plain loops over the same
    /// (already rounded) cache values, for every group size up to 9 (more than one run of
    /// heads), blocks of 8 to 32 keys and odd ones, head sizes with and without each vector
    /// path (48 and 80: one 512-bit register of columns per pass); the outputs between the
    /// heads' rows must stay untouched.
    fn check<T: Lanes>(cast: fn(f32) -> T) {
        let mut rng = Rng64::new(5);
        for d in [64usize, 128, 80, 48, 40, 12] {
            for bs in [8usize, 16, 24, 32, 5] {
                for g in 1..=9 {
                    let q = rand(g * d, &mut rng);
                    let kt: Vec<T> = rand(d * bs, &mut rng).into_iter().map(cast).collect();
                    let stride = bs + 3;
                    let m = bs.min(11);
                    let p = rand(g * stride, &mut rng);
                    let v: Vec<T> = rand(m * d, &mut rng).into_iter().map(cast).collect();
                    let acc0 = rand(g * d, &mut rng);
                    let mut want = acc0.clone();
                    for h in 0..g {
                        for j in 0..m {
                            for i in 0..d {
                                want[h * d + i] += p[h * stride + j] * v[j * d + i].to_f32();
                            }
                        }
                    }
                    for isa in Isa::all_here() {
                        let mut got = vec![f32::NAN; g * stride];
                        group_scores_on(isa, &q, d, &kt, 0.5, (&mut got, stride, bs));
                        for h in 0..g {
                            for l in 0..bs {
                                let want: f32 = (0..d)
                                    .map(|i| q[h * d + i] * kt[i * bs + l].to_f32())
                                    .sum::<f32>()
                                    * 0.5;
                                let x = got[h * stride + l];
                                assert!(
                                    (x - want).abs() < 1e-4,
                                    "{isa:?} {d} {bs} {g} {h} {l}: {x} vs {want}"
                                );
                            }
                            assert!(got[h * stride + bs..][..3].iter().all(|x| x.is_nan()));
                        }
                        let mut acc = acc0.clone();
                        group_weighted_rows_on(isa, (&p, stride, m), &v, &mut acc, d);
                        for (i, (x, w)) in acc.iter().zip(&want).enumerate() {
                            assert!(
                                (x - w).abs() < 1e-4,
                                "{isa:?} {d} {bs} {g} [{i}]: {x} vs {w}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn kernels_match_plain_loops() {
        check::<f32>(|x| x);
        check::<f16>(f16::from_f32);
        check::<bf16>(bf16::from_f32);
        check::<F8E4M3>(|x| F8E4M3::from_bits(super::super::fp8::encode(x)));
    }

    /// Widening runs of every length (vector part, tail) as the scalar decoding, NaN too.
    #[test]
    fn widen_matches_scalar_decoding() {
        let codes: Vec<F8E4M3> = (0..=255u8).map(F8E4M3::from_bits).collect();
        let valid: Vec<F8E4M3> = codes
            .iter()
            .copied()
            .filter(|c| !fp8::is_nan_bits(c.to_bits()))
            .collect();
        for src in [&codes[..], &valid[..], &valid[..13], &valid[3..8]] {
            let mut dst = vec![0f32; src.len()];
            widen(src, &mut dst);
            for (x, c) in dst.iter().zip(src) {
                let want = c.to_f32();
                assert!(x.to_bits() == want.to_bits() || (x.is_nan() && want.is_nan()));
            }
        }
        let h: Vec<f16> = [1.5f32, -2.0, 3.25].map(f16::from_f32).to_vec();
        let mut dst = [0f32; 3];
        widen(&h, &mut dst);
        assert_eq!(dst, [1.5, -2.0, 3.25]);
    }

    /// A NaN in an fp8 block reaches the scores and the output of the heads that read it,
    /// through the plain loops.
    #[test]
    fn fp8_nan_propagates() {
        let (d, bs, g) = (64, 16, 3);
        let q = vec![0.1f32; g * d];
        let mut kt = vec![F8E4M3::from_bits(0x30); d * bs];
        kt[5 * bs + 7] = F8E4M3::from_bits(0xff);
        let mut out = vec![0f32; g * bs];
        group_scores(&q, d, &kt, 1.0, (&mut out, bs, bs));
        for (l, x) in out.iter().enumerate() {
            assert_eq!(x.is_nan(), l % bs == 7, "{l}: {x}");
        }
        let mut v = vec![F8E4M3::from_bits(0x30); bs * d];
        v[3 * d + 9] = F8E4M3::from_bits(0x7f);
        let p = vec![0.5f32; g * bs];
        let mut acc = vec![0f32; g * d];
        group_weighted_rows((&p, bs, bs), &v, &mut acc, d);
        for (i, x) in acc.iter().enumerate() {
            assert_eq!(x.is_nan(), i % d == 9, "{i}: {x}");
        }
    }

    /// The vector widening of every E4M3 code but NaN against the scalar decoding, eight and
    /// (where the CPU has AVX-512) sixteen at a time.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn fp8_lanes_widen_every_code() {
        if !simd_ok() {
            return;
        }
        let codes: Vec<F8E4M3> = (0..=255u8).map(F8E4M3::from_bits).collect();
        let wide = Isa::best() == Isa::Avx512;
        for chunk in codes.chunks(16) {
            let mut got = [0f32; 16];
            // SAFETY: AVX2, FMA and F16C checked (AVX-512 where `wide`); the chunk holds 16
            // codes, `got` room for 16 values.
            unsafe {
                use std::arch::x86_64::*;
                let p = chunk.as_ptr();
                _mm256_storeu_ps(got.as_mut_ptr(), F8E4M3::load8(p));
                _mm256_storeu_ps(got.as_mut_ptr().add(8), F8E4M3::load8(p.add(8)));
            }
            let mut got16 = got;
            if wide {
                // SAFETY: as above.
                unsafe {
                    std::arch::x86_64::_mm512_storeu_ps(
                        got16.as_mut_ptr(),
                        F8E4M3::load16(chunk.as_ptr()),
                    )
                };
            }
            for ((x, y), c) in got.iter().zip(&got16).zip(chunk) {
                if !fp8::is_nan_bits(c.to_bits()) {
                    let want = c.to_f32() / F8E4M3::UNIT;
                    assert_eq!(x.to_bits(), want.to_bits(), "{:#04x}", c.to_bits());
                    assert_eq!(y.to_bits(), want.to_bits(), "{:#04x} (16)", c.to_bits());
                }
            }
        }
    }
}

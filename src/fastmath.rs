//! Branch-free f32 math that the compiler vectorises, for the CPU kernels' hot loops
//! (softmax in attention, SiLU in the MLP), where libm's scalar `expf` dominates otherwise.

const LOG2E: f32 = std::f32::consts::LOG2_E;
// ln 2 split in two so that `x - n ln2` stays exact for the n that occur.
const LN2_HI: f32 = 0.693_145_75;
const LN2_LO: f32 = 1.428_606_8e-6;

/// 1.5 x 2^23: adding it to a float of magnitude under 2^22 rounds that float to an integer
/// (to nearest, even on ties) that the sum's low mantissa bits then hold, with plain float adds
/// that vectorise on any x86-64; `f32::round` needs SSE4.1 and `as i32` saturates, both of
/// which the compiler turns into scalar code on the baseline target (measured: softmax 15% of
/// CPU decode attention with them).
const ROUNDER: f32 = 12_582_912.0;

/// The coefficients of [`exp`]'s polynomial after the leading 1/7!, highest degree first.
const POLY: [f32; 7] = [
    1.0 / 720.0,
    1.0 / 120.0,
    1.0 / 24.0,
    1.0 / 6.0,
    0.5,
    1.0,
    1.0,
];

/// `e^x` within about 2 ulp for x in [-87, 88]; inputs beyond are clamped (e^-87 ~ 1.6e-38).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    let t = x * LOG2E + ROUNDER;
    let n = t - ROUNDER;
    let r = x - n * LN2_HI - n * LN2_LO;
    // Taylor series of e^r to degree 7 on |r| <= ln2 / 2 (truncation error < 1e-8), by
    // Horner's rule.
    let p = POLY.iter().fold(1.0 / 5040.0, |acc, &c| mul_add(acc, r, c));
    // t's bits are ROUNDER's plus n (|n| <= 127), so 2^n's exponent field is their difference
    // plus the bias.
    let two_n = (t
        .to_bits()
        .wrapping_sub(ROUNDER.to_bits())
        .wrapping_add(127))
        << 23;
    f32::from_bits(two_n) * p
}

/// `a * b + c`, fused where the target has FMA (one instruction, one rounding), as two
/// operations elsewhere (`f32::mul_add` would call the C library's `fmaf` there).
#[inline(always)]
fn mul_add(a: f32, b: f32, c: f32) -> f32 {
    if cfg!(target_feature = "fma") {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// [`exp`] of 16 lanes with AVX-512 F, operation for operation (so bit for bit the same
/// values): the compiler keeps the scalar form's loops to 256-bit vectors on the CPUs that have
/// 512-bit ones, which halves the rate of attention's softmax.
///
/// # Safety
/// AVX-512 F and FMA must be available.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
pub unsafe fn exp16(x: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let splat = _mm512_set1_ps;
    // NaN stays NaN, as with `f32::clamp` (max and min return their second operand then).
    let x = _mm512_min_ps(splat(88.0), _mm512_max_ps(splat(-87.0), x));
    let t = _mm512_add_ps(_mm512_mul_ps(x, splat(LOG2E)), splat(ROUNDER));
    let n = _mm512_sub_ps(t, splat(ROUNDER));
    let r = _mm512_sub_ps(
        _mm512_sub_ps(x, _mm512_mul_ps(n, splat(LN2_HI))),
        _mm512_mul_ps(n, splat(LN2_LO)),
    );
    let p = POLY.iter().fold(splat(1.0 / 5040.0), |acc, &c| {
        if cfg!(target_feature = "fma") {
            _mm512_fmadd_ps(acc, r, splat(c))
        } else {
            _mm512_add_ps(_mm512_mul_ps(acc, r), splat(c))
        }
    });
    let bits = _mm512_add_epi32(
        _mm512_sub_epi32(
            _mm512_castps_si512(t),
            _mm512_set1_epi32(ROUNDER.to_bits() as i32),
        ),
        _mm512_set1_epi32(127),
    );
    _mm512_mul_ps(_mm512_castsi512_ps(_mm512_slli_epi32::<23>(bits)), p)
}

/// SiLU, `x * sigmoid(x)`.
#[inline(always)]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + exp(-x))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_accurate() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let got = exp(x) as f64;
            worst = worst.max(((got - want) / want).abs());
            x += 0.001_37;
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(-1000.0) < 1e-37);
        assert!(exp(1000.0).is_finite());
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn exp16_matches_exp_bit_for_bit() {
        use std::arch::x86_64::*;
        if !(crate::device::cpu_has_avx512_bw() && crate::device::cpu_has_avx2_fma()) {
            return;
        }
        let mut xs: Vec<f32> = (0..4096).map(|i| -100.0 + i as f32 * 0.0493).collect();
        xs.extend([
            0.0,
            -0.0,
            1e-30,
            -1e-30,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            87.9,
        ]);
        xs.resize(xs.len().next_multiple_of(16), 0.5);
        for c in xs.chunks_exact(16) {
            let mut got = [0f32; 16];
            // SAFETY: AVX-512 F and FMA checked above; 16 values in and out.
            unsafe { _mm512_storeu_ps(got.as_mut_ptr(), exp16(_mm512_loadu_ps(c.as_ptr()))) };
            for (&x, g) in c.iter().zip(got) {
                let want = exp(x);
                assert!(
                    g.to_bits() == want.to_bits() || (g.is_nan() && want.is_nan()),
                    "exp16({x}) = {g}, exp = {want}"
                );
            }
        }
    }

    #[test]
    fn silu_matches_definition() {
        for x in [-30.0f32, -3.0, -0.5, 0.0, 0.7, 4.0, 30.0] {
            let want = x as f64 / (1.0 + (-x as f64).exp());
            assert!(
                (silu(x) as f64 - want).abs() <= 1e-6 * (1.0 + want.abs()),
                "{x}"
            );
        }
    }
}

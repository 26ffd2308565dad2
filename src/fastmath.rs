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

/// `e^x` within about 2 ulp for x in [-87, 88]; inputs beyond are clamped (e^-87 ~ 1.6e-38).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    let t = x * LOG2E + ROUNDER;
    let n = t - ROUNDER;
    let r = x - n * LN2_HI - n * LN2_LO;
    // Taylor series of e^r to degree 7 on |r| <= ln2 / 2 (truncation error < 1e-8), by
    // Horner's rule.
    let p = [
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ]
    .iter()
    .fold(1.0 / 5040.0, |acc, &c| mul_add(acc, r, c));
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

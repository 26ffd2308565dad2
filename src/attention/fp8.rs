//! FP8 E4M3 for the KV cache (`--kv-cache-dtype fp8`, as vLLM's): 1 sign bit, 4 exponent bits
//! (bias 7), 3 mantissa bits, finite up to ±448, no infinities (0x7f and 0xff are NaN). It holds
//! K and V in half of f16's bytes, which is what bounds decode attention.
//!
//! Values are rounded to nearest even and saturated to ±448, as CUDA's `__NV_SATFINITE`
//! conversion and the `float8` crate (candle's `F8E4M3`) do; the tests check every code and
//! rounding boundary against that crate. [`encode`] is branch-free so that runs of it vectorise;
//! `kernels/common.cuh` does the same arithmetic on the GPU, so both caches hold the same bits.

pub use float8::F8E4M3;

/// Smallest normal magnitude, 2^-6, as f32 bits.
const MIN_NORMAL: u32 = 0x3c80_0000;
/// Magnitudes above 464 (halfway from 448 to the next step, 480) saturate to 448.
const SATURATE_ABOVE: u32 = 0x43e8_0000;
const F32_INF: u32 = 0x7f80_0000;

/// `x` as E4M3 bits: nearest even, ±448 for larger magnitudes (infinities included), NaN as
/// NaN (0x7f with `x`'s sign).
#[inline]
pub fn encode(x: f32) -> u8 {
    let bits = x.to_bits();
    let sign = (bits >> 24) & 0x80;
    let abs = bits & 0x7fff_ffff;
    // Normal: rebias the exponent from 127 to 7 and drop 20 mantissa bits, rounding to nearest
    // even (a carry out of the mantissa steps the exponent, as it should).
    let normal = abs
        .wrapping_sub(120 << 23)
        .wrapping_add(0x7_ffff + ((abs >> 20) & 1))
        >> 20;
    // Subnormal: a multiple of 2^-9 below 8 of them, rounded to nearest even by adding 1.5 * 2^23
    // (8 itself is the smallest normal's code, 0x08).
    let sub = (f32::from_bits(abs) * 512.0 + 12_582_912.0)
        .to_bits()
        .wrapping_sub(0x4b40_0000);
    let r = if abs < MIN_NORMAL { sub } else { normal };
    let r = if abs > SATURATE_ABOVE { 0x7e } else { r };
    let r = if abs > F32_INF { 0x7f } else { r };
    (sign | r) as u8
}

/// Whether E4M3 bits `b` are NaN (0x7f and 0xff: E4M3 has no infinities).
#[inline]
pub const fn is_nan_bits(b: u8) -> bool {
    b & 0x7f == 0x7f
}

/// Every code's value (NaN for 0x7f and 0xff).
static VALUES: [f32; 256] = {
    let mut t = [0f32; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = decode_bits(i as u8);
        i += 1;
    }
    t
};

const fn decode_bits(b: u8) -> f32 {
    let (e, m) = ((b >> 3) & 0xf, (b & 7) as u32);
    let mag = if is_nan_bits(b) {
        f32::NAN
    } else if e == 0 {
        m as f32 / 512.0
    } else {
        f32::from_bits(((e as u32 + 120) << 23) | (m << 20))
    };
    if b & 0x80 != 0 { -mag } else { mag }
}

/// The value of E4M3 bits `b`.
#[inline]
pub fn decode(b: u8) -> f32 {
    VALUES[b as usize]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn same(a: f32, b: f32) -> bool {
        a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
    }

    #[test]
    fn every_code_decodes_as_the_float8_crate_does() {
        for b in 0..=255u8 {
            let want = F8E4M3::from_bits(b).to_f32();
            assert!(same(decode(b), want), "{b:#04x}: {} vs {want}", decode(b));
        }
        assert_eq!(decode(0x7e), 448.0);
        assert_eq!(decode(0x01), 2f32.powi(-9));
        assert!(decode(0x7f).is_nan() && decode(0xff).is_nan());
    }

    /// Every code, the points halfway between neighbours (ties go to even), one f32 step
    /// either side of them, the saturation threshold, and a sweep over many magnitudes.
    #[test]
    fn encoding_rounds_and_saturates_as_the_float8_crate_does() {
        let mut xs = vec![
            0.0,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            464.0,
            464.1,
            1e30,
            f32::MAX,
            f32::MIN_POSITIVE,
            1e-40,
            2f32.powi(-10),
        ];
        for b in 0..0x7eu8 {
            let (lo, hi) = (decode(b), decode(b + 1));
            let mid = (lo + hi) / 2.0;
            for x in [
                lo,
                mid,
                f32::from_bits(mid.to_bits() - 1),
                f32::from_bits(mid.to_bits() + 1),
            ] {
                xs.extend([x, -x]);
            }
        }
        let mut v = 1e-5f32;
        while v < 1e4 {
            xs.extend([v, -v]);
            v *= 1.0009;
        }
        for x in xs {
            let want = F8E4M3::from_f32(x).to_bits();
            assert_eq!(encode(x), want, "{x:e}: {:#04x} vs {want:#04x}", encode(x));
        }
    }
}

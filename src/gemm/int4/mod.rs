//! Weights as 4-bit codes in blocks of 32 values along each row, with an f16 scale and minimum
//! per block (llama.cpp's Q4_1 scheme): a weight is `code * scale + min`, codes 0 to 15, so a
//! block spans its own range. An eighth of f32's bytes plus an eighth for the scales and
//! minimums (0.625 bytes a weight against int8's 1.0625), for `--quantization int4` on the CPU,
//! where a decode step of few sequences is bound by reading the weights. A block is rounded to
//! the 16 levels between its smallest and largest value, so a value's error is at most half a
//! level (and the f16 rounding of the scale and minimum); the weights of a Q4_1 GGUF come back
//! as they were stored, its f16 scales and minimums included.
//!
//! Kept in the panels of the packed f32 kernel (`packed`: 32 output features per panel, a step
//! of 16 bytes per `k`, two codes a byte), which widens each step to f32 in registers.

use std::mem::MaybeUninit;

use half::f16;

use super::quant::QuantPanels;
use super::{BlockValues, PANEL};

#[cfg(target_arch = "x86_64")]
mod amx;

/// Values per block (one scale and one minimum each).
pub const BLOCK: usize = 32;

/// Bytes a weight: half a byte of code, and a block's f16 scale and minimum shared by its 32
/// values.
pub const BYTES_PER_WEIGHT: f64 = 0.5 + 4.0 / BLOCK as f64;

/// The largest magnitude an f16 scale or minimum holds: weights beyond it cannot be int4.
pub const MAX_WEIGHT: f32 = 65504.0;

/// Blocks per row of `k` values (the last may be partial).
pub fn blocks(k: usize) -> usize {
    k.div_ceil(BLOCK)
}

/// A weight matrix of `n` rows of `k` values in 4-bit blocks, in panels of 32 rows.
#[derive(Debug)]
pub struct Int4Weights {
    /// `n.div_ceil(32)` panels of `[k][16]` bytes: byte `c` of a step holds row `c` of the
    /// panel in its low four bits and row `c + 16` in its high four (zeros past row `n`).
    pub q: Vec<u8>,
    /// `n.div_ceil(32)` panels of `[blocks(k)][64]`: a block's 32 scales, then its 32 minimums.
    /// f16, as Q4_1 keeps them: f32 would make them a third of the bytes (0.75 a weight).
    pub dm: Vec<f16>,
    pub n: usize,
    pub k: usize,
}

impl Int4Weights {
    /// Quantizes `w` (`n` rows of `k`, row-major). A block of equal values gets scale 0.
    /// Values beyond [`MAX_WEIGHT`] overflow their block's f16 minimum or scale (callers
    /// refuse them first).
    pub fn quantize(w: &[f32], n: usize, k: usize) -> Self {
        assert_eq!(w.len(), n * k, "Int4Weights::quantize: sizes");
        let (panels, kb) = (n.div_ceil(PANEL), blocks(k));
        let mut q = vec![0u8; panels * k * PANEL / 2];
        let mut dm = vec![f16::ZERO; panels * kb * 2 * PANEL];
        for (j, row) in w.chunks_exact(k.max(1)).enumerate() {
            let (p, c) = (j / PANEL, j % PANEL);
            let (byte, shift) = (c % 16, 4 * (c / 16));
            for (b, block) in row.chunks(BLOCK).enumerate() {
                let min = block.iter().fold(f32::INFINITY, |a, &v| a.min(v));
                let max = block.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
                // The codes are rounded against the f16 scale and minimum the kernels read.
                let (scale, min) = (f16::from_f32((max - min) / 15.0), f16::from_f32(min));
                let at = (p * kb + b) * 2 * PANEL;
                (dm[at + c], dm[at + PANEL + c]) = (scale, min);
                let (scale, min) = (scale.to_f32(), min.to_f32());
                let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
                for (i, &v) in block.iter().enumerate() {
                    let code = ((v - min) * inv).round().clamp(0.0, 15.0) as u8;
                    q[(p * k + b * BLOCK + i) * PANEL / 2 + byte] |= code << shift;
                }
            }
        }
        Self { q, dm, n, k }
    }

    /// The f32 values, row-major `[n, k]`.
    pub fn dequantize(&self) -> Vec<f32> {
        self.values()
    }

    /// Bytes held: the codes, the scales and the minimums.
    pub fn bytes(&self) -> u64 {
        (self.q.len() + 2 * self.dm.len()) as u64
    }

    /// The codes and the scales and minimums from panel `p` on, each with the stride between
    /// panels: what the panel kernels read.
    #[cfg(target_arch = "x86_64")]
    pub(crate) fn panels_from(
        &self,
        p: usize,
    ) -> (super::Strided<'_, u8>, super::Strided<'_, f16>) {
        let (codes, dm) = (self.k * PANEL / 2, blocks(self.k) * 2 * PANEL);
        ((&self.q[p * codes..], codes), (&self.dm[p * dm..], dm))
    }
}

impl BlockValues for Int4Weights {
    fn dims(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    /// Weight `(j, kk)` as the AVX-512 kernel and the plain loops compute it: `code * scale +
    /// min`, one rounding (the AVX2 kernel scales a block's sum of products instead).
    fn value(&self, j: usize, kk: usize) -> f32 {
        let (p, c) = (j / PANEL, j % PANEL);
        let byte = self.q[(p * self.k + kk) * PANEL / 2 + c % 16];
        let code = (byte >> (4 * (c / 16))) & 0x0f;
        let at = (p * blocks(self.k) + kk / BLOCK) * 2 * PANEL;
        (code as f32).mul_add(self.dm[at + c].to_f32(), self.dm[at + PANEL + c].to_f32())
    }
}

impl QuantPanels for Int4Weights {
    const NAME: &'static str = "int4";

    fn rows_by_weights_uninit(
        &self,
        (m, x): (usize, &[f32]),
        cols: std::ops::Range<usize>,
        out: &mut [MaybeUninit<f32>],
    ) {
        self.check_product("Int4Weights::rows_by_weights_uninit", (m, x), &cols, out);
        #[cfg(target_arch = "x86_64")]
        if crate::device::cpu_has_avx512_bw() {
            let ((q, _), (dm, _)) = self.panels_from(cols.start / PANEL);
            let (n, k) = (cols.len(), self.k);
            // SAFETY: AVX-512 F is available (checked); `check_product` bounds the rows and
            // outputs, and the panels from `cols.start` hold the `n` features' codes, scales and
            // minimums.
            unsafe { super::packed::rows_by_int4_panels((m, n, k), x, (q, dm), out) };
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if crate::device::cpu_has_avx2_fma() {
            let (q, dm) = self.panels_from(cols.start / PANEL);
            let (n, k) = (cols.len(), self.k);
            // SAFETY: AVX2 and FMA are available (checked); as above.
            unsafe { super::packed_avx2::rows_by_panels((m, n, k), x, q, dm, out) };
            return;
        }
        self.rows_by_values((m, x), cols, out);
    }

    #[cfg(target_arch = "x86_64")]
    unsafe fn widen_for_amx(&self, f: usize, dst: &mut [u32]) {
        // SAFETY: the caller's contract is `amx::widen_features`'.
        unsafe { amx::widen_features(self, f, dst) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::Rng64;

    #[test]
    fn quantization_error_is_at_most_half_a_level() {
        let (n, k) = (40, 70);
        let mut rng = Rng64::new(1);
        let mut w = rng.uniform_f32(n * k, 3.0);
        w[7] = 40.0; // an outlier coarsens only its own block
        w[k..2 * k].fill(0.25); // a row of equal values
        let iw = Int4Weights::quantize(&w, n, k);
        // Two panels (rows padded to 64) of 70 steps of 16 bytes, 3 blocks of 64 f16.
        assert_eq!((iw.q.len(), iw.dm.len()), (2 * 70 * 16, 2 * 3 * 64));
        assert_eq!(iw.bytes(), (2 * 70 * 16 + 2 * 2 * 3 * 64) as u64);
        let back = iw.dequantize();
        assert_eq!(back.len(), n * k);
        for (i, (a, b)) in w.iter().zip(&back).enumerate() {
            let (j, kk) = (i / k, i % k);
            let at = ((j / PANEL) * 3 + kk / BLOCK) * 2 * PANEL + j % PANEL;
            let level = iw.dm[at].to_f32();
            // Half a level, and the f16 rounding (2^-11 relative) of the block's minimum and
            // of its scale, 15 times over at the top of its range.
            let rounding = (a.abs() + 15.0 * level) / 1024.0;
            assert!(
                (a - b).abs() <= level / 2.0 + rounding + 1e-5,
                "value {i}: {a} -> {b}"
            );
        }
        assert!(back[k..2 * k].iter().all(|&v| v == 0.25));
        assert!((back[7] - 40.0).abs() < 40.0 / 1024.0, "{}", back[7]);
    }

    #[test]
    fn a_q4_1_block_comes_back_as_stored() {
        // Values on 16 levels of a block, both ends used (as llama.cpp's quantizer leaves
        // them), with scales and minimums as Q4_1 stores them (f16): requantizing finds the
        // same levels, the same f16 bits and the same values.
        for (scale, min) in [(0.0625f32, -0.5f32), (0.01234, -0.0871), (3.1e-5, 2.2e-3)] {
            let (d, m) = (f16::from_f32(scale), f16::from_f32(min));
            let w: Vec<f32> = (0..64)
                .map(|i| ((i * 7 % 16) as f32).mul_add(d.to_f32(), m.to_f32()))
                .collect();
            let iw = Int4Weights::quantize(&w, 2, 32);
            assert_eq!((iw.dm[0], iw.dm[1], iw.dm[32]), (d, d, m), "{scale} {min}");
            assert_eq!(iw.dequantize(), w, "{scale} {min}");
        }
    }
}

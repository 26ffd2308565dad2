//! Weights as int8 in blocks of 32 values along each row, one f16 scale per block (llama.cpp's
//! Q8_0 scheme): a quarter of f32's bytes plus a sixteenth for the scales (1.0625 bytes a
//! weight), for `--quantization int8` on the CPU, where a decode step of few sequences is bound
//! by reading the weights. Each block is rounded symmetrically to its largest magnitude (`scale
//! = max|w| / 127` rounded to f16, `q = round(w / scale)`), so a value's error is at most half
//! its block's step (and the f16 rounding of the scale); the blocks of a Q8_0 GGUF come back as
//! they were stored.
//!
//! They are kept in the panels of the packed f32 kernel (`packed`: 32 output features per
//! panel, `[k][32]` values and `[k / 32][32]` scales each), which widens each step to f32 in
//! registers: one kernel for every row count, as the f32 panels are.

use std::mem::MaybeUninit;

use half::f16;

use super::quant::QuantPanels;
use super::{BlockValues, PANEL};

#[cfg(target_arch = "x86_64")]
mod amx;

/// Values per block (one scale each).
pub const BLOCK: usize = 32;

/// Bytes a weight: its value, and a block's f16 scale shared by its 32 values.
pub const BYTES_PER_WEIGHT: f64 = 1.0 + 2.0 / BLOCK as f64;

/// The largest magnitude whose block's scale (`max|w| / 127`) an f16 holds: weights beyond it
/// cannot be int8.
pub const MAX_WEIGHT: f32 = 65504.0 * 127.0;

/// Blocks per row of `k` values (the last may be partial).
pub fn blocks(k: usize) -> usize {
    k.div_ceil(BLOCK)
}

/// A weight matrix of `n` rows of `k` values in int8 blocks, in panels of 32 rows.
#[derive(Debug)]
pub struct Int8Weights {
    /// `n.div_ceil(32)` panels of `[k][32]` values (zeros past row `n`).
    pub q: Vec<i8>,
    /// `n.div_ceil(32)` panels of `[blocks(k)][32]` scales. f16, as Q8_0 keeps them: f32
    /// would make them a ninth of the bytes (1.125 a weight).
    pub scales: Vec<f16>,
    pub n: usize,
    pub k: usize,
}

impl Int8Weights {
    /// Quantizes `w` (`n` rows of `k`, row-major). A block of zeros gets scale 0. Values
    /// beyond [`MAX_WEIGHT`] overflow their block's f16 scale (callers refuse them first).
    pub fn quantize(w: &[f32], n: usize, k: usize) -> Self {
        assert_eq!(w.len(), n * k, "Int8Weights::quantize: sizes");
        let (panels, kb) = (n.div_ceil(PANEL), blocks(k));
        let mut q = vec![0i8; panels * k * PANEL];
        let mut scales = vec![f16::ZERO; panels * kb * PANEL];
        for (j, row) in w.chunks_exact(k.max(1)).enumerate() {
            let (p, c) = (j / PANEL, j % PANEL);
            for (b, block) in row.chunks(BLOCK).enumerate() {
                let max = block.iter().fold(0f32, |a, v| a.max(v.abs()));
                // The codes are rounded against the f16 scale the kernels read.
                let scale = f16::from_f32(max / 127.0);
                scales[(p * kb + b) * PANEL + c] = scale;
                let scale = scale.to_f32();
                let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
                for (i, v) in block.iter().enumerate() {
                    let kk = b * BLOCK + i;
                    q[(p * k + kk) * PANEL + c] = (v * inv).round().clamp(-127.0, 127.0) as i8;
                }
            }
        }
        Self { q, scales, n, k }
    }

    /// The f32 values, row-major `[n, k]`.
    pub fn dequantize(&self) -> Vec<f32> {
        self.values()
    }

    /// Bytes held: the values and the scales.
    pub fn bytes(&self) -> u64 {
        (self.q.len() + 2 * self.scales.len()) as u64
    }

    /// The values and the scales from panel `p` on, each with the stride between panels: what
    /// the panel kernels read.
    #[cfg(target_arch = "x86_64")]
    pub(crate) fn panels_from(
        &self,
        p: usize,
    ) -> (super::Strided<'_, i8>, super::Strided<'_, f16>) {
        let (values, scales) = (self.k * PANEL, blocks(self.k) * PANEL);
        (
            (&self.q[p * values..], values),
            (&self.scales[p * scales..], scales),
        )
    }
}

impl BlockValues for Int8Weights {
    fn dims(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    /// Weight `(j, kk)` as the kernel computes it: `q * scale`.
    fn value(&self, j: usize, kk: usize) -> f32 {
        let (p, c) = (j / PANEL, j % PANEL);
        let q = self.q[(p * self.k + kk) * PANEL + c];
        q as f32 * self.scales[(p * blocks(self.k) + kk / BLOCK) * PANEL + c].to_f32()
    }
}

impl QuantPanels for Int8Weights {
    const NAME: &'static str = "int8";

    fn rows_by_weights_uninit(
        &self,
        (m, x): (usize, &[f32]),
        cols: std::ops::Range<usize>,
        out: &mut [MaybeUninit<f32>],
    ) {
        self.check_product("Int8Weights::rows_by_weights_uninit", (m, x), &cols, out);
        #[cfg(target_arch = "x86_64")]
        if crate::device::cpu_has_avx512_bw() {
            let ((q, _), (scales, _)) = self.panels_from(cols.start / PANEL);
            let (n, k) = (cols.len(), self.k);
            // SAFETY: AVX-512 F is available (checked); `check_product` bounds the rows and
            // outputs, and the panels from `cols.start` hold the `n` features' values and scales.
            unsafe { super::packed::rows_by_int8_panels((m, n, k), x, (q, scales), out) };
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if crate::device::cpu_has_avx2_fma() {
            let (q, scales) = self.panels_from(cols.start / PANEL);
            let (n, k) = (cols.len(), self.k);
            // SAFETY: AVX2 and FMA are available (checked); as above.
            unsafe { super::packed_avx2::rows_by_panels((m, n, k), x, q, scales, out) };
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
    fn quantization_error_is_at_most_half_a_step() {
        let (n, k) = (5, 70);
        let mut rng = Rng64::new(1);
        let mut w = rng.uniform_f32(n * k, 3.0);
        w[7] = 40.0; // an outlier coarsens only its own block
        w[k..2 * k].fill(0.0); // a row of zeros
        let iw = Int8Weights::quantize(&w, n, k);
        // One panel (rows padded to 32) of 70 steps and 3 blocks.
        assert_eq!((iw.q.len(), iw.scales.len()), (70 * 32, 3 * 32));
        assert_eq!(iw.bytes(), (70 * 32 + 2 * 3 * 32) as u64);
        let back = iw.dequantize();
        assert_eq!(back.len(), n * k);
        for (i, (a, b)) in w.iter().zip(&back).enumerate() {
            let (j, kk) = (i / k, i % k);
            let step = iw.scales[(kk / BLOCK) * PANEL + j].to_f32();
            // Half a step, and the f16 rounding (2^-11 relative) of the scale, 127 times over
            // at the block's largest magnitude.
            let rounding = a.abs() / 1024.0;
            assert!(
                (a - b).abs() <= step / 2.0 + rounding + 1e-6,
                "value {i}: {a} -> {b}"
            );
        }
        assert!(back[k..2 * k].iter().all(|&v| v == 0.0));
        assert!((back[7] - 40.0).abs() < 40.0 / 1024.0, "{}", back[7]);
        assert!(iw.q.iter().all(|&v| v != i8::MIN));
    }

    #[test]
    fn a_q8_0_block_comes_back_as_stored() {
        // Codes of a block with its largest magnitude at 127 (as llama.cpp's quantizer leaves
        // them), under scales as Q8_0 stores them (f16), a subnormal one among them:
        // requantizing finds the same f16 bits and the same values.
        for scale in [0.0625f32, 0.001234, 3.1e-6] {
            let d = f16::from_f32(scale);
            let w: Vec<f32> = (0..64)
                .map(|i| match i % 32 {
                    5 => -127.0,
                    i => (i as f32 * 37.0) % 255.0 - 127.0,
                })
                .map(|q| q * d.to_f32())
                .collect();
            let iw = Int8Weights::quantize(&w, 2, 32);
            assert_eq!((iw.scales[0], iw.scales[1]), (d, d), "{scale}");
            assert_eq!(iw.dequantize(), w, "{scale}");
        }
    }
}

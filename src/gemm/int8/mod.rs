//! Weights as int8 in blocks of 32 values along each row, one f32 scale per block (llama.cpp's
//! Q8_0 scheme, with f32 scales): a quarter of f32's bytes plus an eighth for the scales, for
//! `--quantization int8` on the CPU, where a decode step of few sequences is bound by reading
//! the weights. Each block is rounded symmetrically to its largest magnitude (`scale = max|w| /
//! 127`, `q = round(w / scale)`), so a value's error is at most half its block's step.
//!
//! They are kept in the panels of the packed f32 kernel (`packed`: 32 output features per
//! panel, `[k][32]` values and `[k / 32][32]` scales each), which widens each step to f32 in
//! registers: one kernel for every row count, as the f32 panels are.

use std::mem::MaybeUninit;

use super::quant::QuantPanels;
use super::{BlockValues, PANEL};

#[cfg(target_arch = "x86_64")]
mod amx;

/// Values per block (one scale each).
pub const BLOCK: usize = 32;

/// Bytes a weight: its value, and a block's f32 scale shared by its 32 values.
pub const BYTES_PER_WEIGHT: f64 = 1.0 + 4.0 / BLOCK as f64;

/// Blocks per row of `k` values (the last may be partial).
pub fn blocks(k: usize) -> usize {
    k.div_ceil(BLOCK)
}

/// A weight matrix of `n` rows of `k` values in int8 blocks, in panels of 32 rows.
#[derive(Debug)]
pub struct Int8Weights {
    /// `n.div_ceil(32)` panels of `[k][32]` values (zeros past row `n`).
    pub q: Vec<i8>,
    /// `n.div_ceil(32)` panels of `[blocks(k)][32]` scales.
    pub scales: Vec<f32>,
    pub n: usize,
    pub k: usize,
}

impl Int8Weights {
    /// Quantizes `w` (`n` rows of `k`, row-major). A block of zeros gets scale 0.
    pub fn quantize(w: &[f32], n: usize, k: usize) -> Self {
        assert_eq!(w.len(), n * k, "Int8Weights::quantize: sizes");
        let (panels, kb) = (n.div_ceil(PANEL), blocks(k));
        let mut q = vec![0i8; panels * k * PANEL];
        let mut scales = vec![0f32; panels * kb * PANEL];
        for (j, row) in w.chunks_exact(k.max(1)).enumerate() {
            let (p, c) = (j / PANEL, j % PANEL);
            for (b, block) in row.chunks(BLOCK).enumerate() {
                let max = block.iter().fold(0f32, |a, v| a.max(v.abs()));
                let scale = max / 127.0;
                let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
                scales[(p * kb + b) * PANEL + c] = scale;
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
        (self.q.len() + 4 * self.scales.len()) as u64
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
        q as f32 * self.scales[(p * blocks(self.k) + kk / BLOCK) * PANEL + c]
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
            let (k, n, p) = (self.k, cols.len(), cols.start / PANEL);
            let (q, scales) = (
                &self.q[p * k * PANEL..],
                &self.scales[p * blocks(k) * PANEL..],
            );
            // SAFETY: AVX-512 F is available (checked); `check_product` bounds the rows and
            // outputs, and the panels from `p` hold the `n` features' values and scales.
            unsafe { super::packed::rows_by_int8_panels((m, n, k), x, (q, scales), out) };
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if crate::device::cpu_has_avx2_fma() {
            let (k, n, p, kb) = (self.k, cols.len(), cols.start / PANEL, blocks(self.k));
            let (q, scales) = (
                (&self.q[p * k * PANEL..], k * PANEL),
                &self.scales[p * kb * PANEL..],
            );
            // SAFETY: AVX2 and FMA are available (checked); as above.
            unsafe {
                super::packed_avx2::rows_by_panels((m, n, k), x, q, (scales, kb * PANEL), out)
            };
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
        assert_eq!(iw.bytes(), (70 * 32 + 4 * 3 * 32) as u64);
        let back = iw.dequantize();
        assert_eq!(back.len(), n * k);
        for (i, (a, b)) in w.iter().zip(&back).enumerate() {
            let (j, kk) = (i / k, i % k);
            let step = iw.scales[(kk / BLOCK) * PANEL + j];
            assert!((a - b).abs() <= step / 2.0 + 1e-6, "value {i}: {a} -> {b}");
        }
        assert!(back[k..2 * k].iter().all(|&v| v == 0.0));
        assert!((back[7] - 40.0).abs() < 1e-5);
        assert!(iw.q.iter().all(|&v| v != i8::MIN));
    }
}

//! Weights as int8 in blocks of 32 values along each row, one f32 scale per block (llama.cpp's
//! Q8_0 scheme, with f32 scales): a quarter of f32's bytes plus an eighth for the scales, for
//! `--quantization int8` on the CPU, where a decode step of few sequences is bound by reading
//! the weights. Each block is rounded symmetrically to its largest magnitude (`scale = max|w| /
//! 127`, `q = round(w / scale)`), so a value's error is at most half its block's step.
//!
//! Products of few rows widen the weights to f32 in registers (`avx512`, with the block's
//! scale); products of many rows (a prefill, bound by arithmetic) run the f32 kernels on the
//! weights dequantized once per product.

use std::mem::MaybeUninit;

/// Values per block (one scale each).
pub const BLOCK: usize = 32;

/// Blocks per row of `k` values (the last may be partial).
pub fn blocks(k: usize) -> usize {
    k.div_ceil(BLOCK)
}

/// A weight matrix of `n` rows of `k` values in int8 blocks.
#[derive(Debug)]
pub struct Int8Weights {
    /// The values, `n * k`, row-major.
    pub q: Vec<i8>,
    /// One per block, `n * blocks(k)`, row-major.
    pub scales: Vec<f32>,
    pub n: usize,
    pub k: usize,
}

impl Int8Weights {
    /// Quantizes `w` (`n` rows of `k`, row-major). A block of zeros gets scale 0.
    pub fn quantize(w: &[f32], n: usize, k: usize) -> Self {
        assert_eq!(w.len(), n * k, "Int8Weights::quantize: sizes");
        let mut q = Vec::with_capacity(n * k);
        let mut scales = Vec::with_capacity(n * blocks(k));
        for row in w.chunks_exact(k.max(1)) {
            for block in row.chunks(BLOCK) {
                let max = block.iter().fold(0f32, |a, v| a.max(v.abs()));
                let scale = max / 127.0;
                let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
                scales.push(scale);
                q.extend(
                    block
                        .iter()
                        .map(|v| (v * inv).round().clamp(-127.0, 127.0) as i8),
                );
            }
        }
        Self { q, scales, n, k }
    }

    /// The f32 values: `q * scale` per block, as the kernels compute them.
    pub fn dequantize(&self) -> Vec<f32> {
        let (k, kb) = (self.k, blocks(self.k));
        let mut out = Vec::with_capacity(self.n * k);
        for (j, row) in self.q.chunks_exact(k.max(1)).enumerate() {
            for (b, block) in row.chunks(BLOCK).enumerate() {
                let s = self.scales[j * kb + b];
                out.extend(block.iter().map(|&v| v as f32 * s));
            }
        }
        out
    }

    /// Bytes held: the values and the scales.
    pub fn bytes(&self) -> u64 {
        (self.q.len() + 4 * self.scales.len()) as u64
    }
}

/// `out[r * n + j] = x[r] . w[j]` for f32 rows `x` (`[m, k]`) and int8 weights `q` (`[n, k]`)
/// with their `scales`, into outputs not yet written (every one of the `m * n` is).
pub fn rows_by_int8_uninit(
    (m, n, k): (usize, usize, usize),
    x: &[f32],
    (q, scales): (&[i8], &[f32]),
    out: &mut [MaybeUninit<f32>],
) {
    assert!(
        x.len() >= m * k && q.len() >= n * k && scales.len() >= n * blocks(k) && out.len() >= m * n,
        "rows_by_int8_uninit: sizes"
    );
    #[cfg(target_arch = "x86_64")]
    if crate::device::cpu_has_avx512_bw() {
        // SAFETY: AVX-512 F and BW are available (checked); the assert above bounds every
        // access (rows `k` apart, scales `blocks(k)` per weight row); the kernel writes every
        // output.
        unsafe { super::avx512::rows_by_weights((m, n, k), (x, k), (q, scales), out) };
        return;
    }
    let kb = blocks(k);
    for r in 0..m {
        let row = &x[r * k..][..k];
        for j in 0..n {
            let mut sum = 0f32;
            for (b, (xs, qs)) in row
                .chunks(BLOCK)
                .zip(q[j * k..][..k].chunks(BLOCK))
                .enumerate()
            {
                let s = scales[j * kb + b];
                sum += xs
                    .iter()
                    .zip(qs)
                    .map(|(&a, &v)| a * (v as f32 * s))
                    .sum::<f32>();
            }
            out[r * n + j].write(sum);
        }
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
        let (q, scales) = (&iw.q, &iw.scales);
        assert_eq!((q.len(), scales.len()), (n * k, n * 3));
        assert_eq!(scales[3..6], [0.0; 3]);
        assert_eq!(iw.bytes(), (n * k + 4 * n * 3) as u64);
        let back = iw.dequantize();
        for (i, (a, b)) in w.iter().zip(&back).enumerate() {
            let step = scales[(i / k) * 3 + (i % k) / BLOCK];
            assert!((a - b).abs() <= step / 2.0 + 1e-6, "value {i}: {a} -> {b}");
        }
        assert!((back[7] - 40.0).abs() < 1e-5);
        assert!(q.iter().all(|&v| v != i8::MIN));
    }

    #[test]
    fn products_equal_the_dequantized_weights() {
        // Shapes around the kernel's tiles (8 x 3) and steps (32), rows not a multiple of 32.
        let mut rng = Rng64::new(2);
        for (m, n, k) in [(1, 1, 32), (3, 7, 70), (8, 3, 64), (9, 10, 576), (17, 4, 5)] {
            let x = rng.uniform_f32(m * k, 1.0);
            let w = rng.uniform_f32(n * k, 0.5);
            let iw = Int8Weights::quantize(&w, n, k);
            let deq = iw.dequantize();
            let mut out = vec![MaybeUninit::new(f32::NAN); m * n];
            rows_by_int8_uninit((m, n, k), &x, (&iw.q, &iw.scales), &mut out);
            for r in 0..m {
                for j in 0..n {
                    let want: f64 = (0..k)
                        .map(|i| x[r * k + i] as f64 * deq[j * k + i] as f64)
                        .sum();
                    // SAFETY: the kernel wrote every output (NaN would fail below).
                    let got = unsafe { out[r * n + j].assume_init() } as f64;
                    assert!(
                        (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                        "{m}x{n}x{k} [{r},{j}]: {got} vs {want}"
                    );
                }
            }
        }
    }
}

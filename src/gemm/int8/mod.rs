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

    /// `out[r * n + j] = x[r] . w[j]` for f32 rows `x` (`[m, k]`) and the weight rows `cols`
    /// (a range of whole panels, or the last), into outputs not yet written (every one of the
    /// `m * cols.len()` is, `[m, cols.len()]`).
    pub fn rows_by_weights_uninit(
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

    /// The rows `x` (`[m, k]`) rounded to bf16 for products on the AMX unit (`amx`), where this
    /// CPU has it and `k` is a multiple of 32; `None` elsewhere.
    pub fn amx_rows(&self, x: &[f32], m: usize) -> Option<AmxRows> {
        #[cfg(target_arch = "x86_64")]
        if self.k.is_multiple_of(BLOCK)
            && x.len() >= m * self.k
            && super::bf16::Bf16Kernel::Amx.runs_here()
        {
            let values = amx::rows_to_bf16(x, m, self.k);
            return Some(AmxRows { values, m });
        }
        let _ = (x, m);
        None
    }

    /// As [`Int8Weights::rows_by_weights_uninit`] for the rows `range` of `x` (from
    /// [`Int8Weights::amx_rows`]), on the AMX unit: each panel of `cols` widened to bf16 (`q *
    /// scale` rounded) once per call, so the products are those of bf16 weights, summed in f32.
    /// `out` is `[range.len(), cols.len()]`.
    pub fn rows_by_amx_rows_uninit(
        &self,
        (x, range): (&AmxRows, std::ops::Range<usize>),
        cols: std::ops::Range<usize>,
        out: &mut [MaybeUninit<f32>],
    ) {
        assert!(
            range.end <= x.m
                && out.len() >= range.len() * cols.len()
                && cols.start.is_multiple_of(PANEL)
                && cols.end <= self.n,
            "Int8Weights::rows_by_amx_rows_uninit: sizes"
        );
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `AmxRows` exists only where AMX, AVX-512 F, BW and BF16 run and `k % 32 ==
        // 0`, made from `m` rows of `k` and 16 zero rows, so a tile from any row of `range`
        // stays inside; the assert bounds the features and the outputs.
        unsafe {
            let rows = &x.values[range.start * self.k..];
            amx::rows_by_panels(self, (rows, range.len()), cols, out)
        };
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("AmxRows are made only on x86-64");
    }

    /// `silu(gate) * up` of these weights as a gate/up matrix (`[2h, k]`, the gate rows first)
    /// for the rows `range` of `x` and the output features `cols` (of `h`), as
    /// [`Int8Weights::rows_by_amx_rows_uninit`] then SiLU x mul, without the `[rows, 2h]`
    /// products in between. `h` must be a multiple of 16.
    pub fn rows_by_amx_rows_silu_uninit(
        &self,
        (x, range): (&AmxRows, std::ops::Range<usize>),
        cols: std::ops::Range<usize>,
        out: &mut [MaybeUninit<f32>],
    ) {
        let h = self.n / 2;
        assert!(
            range.end <= x.m
                && out.len() >= range.len() * cols.len()
                && self.n == 2 * h
                && h.is_multiple_of(16)
                && cols.start.is_multiple_of(16)
                && cols.end <= h,
            "Int8Weights::rows_by_amx_rows_silu_uninit: sizes"
        );
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as in `rows_by_amx_rows_uninit`; the assert gives the gate/up shape.
        unsafe {
            let rows = &x.values[range.start * self.k..];
            amx::rows_by_gate_up_silu(self, h, (rows, range.len()), cols, out)
        };
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("AmxRows are made only on x86-64");
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

/// One line for the user: how products with int8 weights and bf16's precision (`--dtype bf16`)
/// run on this CPU.
pub fn describe_bf16_products() -> String {
    let f32_kernel = "f32 FMAs on panels widened in registers";
    if cfg!(target_arch = "x86_64") && super::bf16::Bf16Kernel::Amx.runs_here() {
        let rows = crate::model::matmul::INT8_AMX_MIN_ROWS;
        let amx = "AMX tdpbf16ps on panels widened to bf16";
        format!("int8 products: {amx} from {rows} rows, {f32_kernel} below")
    } else {
        format!("int8 products: {f32_kernel} (no AMX here: f32's precision)")
    }
}

/// f32 rows rounded to bf16 for [`Int8Weights::rows_by_amx_rows_uninit`] (once per product);
/// made only by [`Int8Weights::amx_rows`], where those products run.
pub struct AmxRows {
    #[cfg(target_arch = "x86_64")]
    values: Vec<half::bf16>,
    m: usize,
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

    #[test]
    fn amx_products_equal_bf16_rounded_weights_and_rows() {
        // Row counts around the unit's tiles (16, two at a time), features around its halves
        // of a panel (16) and the panels (32), partial last panels, a range of whole panels.
        let mut rng = Rng64::new(3);
        for (m, n, k, cols) in [
            (1, 32, 32, 0..32),
            (17, 70, 64, 32..70),
            (40, 100, 576, 0..100),
            (33, 64, 96, 0..64),
            (16, 48, 32, 0..48),
        ] {
            let x = rng.uniform_f32(m * k, 1.0);
            let iw = Int8Weights::quantize(&rng.uniform_f32(n * k, 0.5), n, k);
            let Some(rows) = iw.amx_rows(&x, m) else {
                return; // no AMX here: nothing to check
            };
            let round = |v: f32| half::bf16::from_f32(v).to_f32() as f64;
            let deq = iw.dequantize();
            let width = cols.len();
            // All the rows, and the last rows from one that is not the first of a tile.
            for range in [0..m, m / 3..m] {
                let mut out = vec![MaybeUninit::new(f32::NAN); range.len() * width];
                iw.rows_by_amx_rows_uninit((&rows, range.clone()), cols.clone(), &mut out);
                for (i, r) in range.enumerate() {
                    for (c, j) in cols.clone().enumerate() {
                        let want: f64 = (0..k)
                            .map(|kk| round(x[r * k + kk]) * round(deq[j * k + kk]))
                            .sum();
                        // SAFETY: the kernel wrote every output (NaN would fail below).
                        let got = unsafe { out[i * width + c].assume_init() } as f64;
                        assert!(
                            (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                            "{m}x{n}x{k} [{r},{j}]: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn amx_gate_up_silu_equals_products_then_activation() {
        // h = 48: three groups of 16, the last not in a whole panel; rows around the tiles.
        let mut rng = Rng64::new(4);
        let (h, k) = (48, 64);
        let iw = Int8Weights::quantize(&rng.uniform_f32(2 * h * k, 0.5), 2 * h, k);
        for (m, cols) in [(1, 0..48), (20, 16..48), (37, 0..32)] {
            let x = rng.uniform_f32(m * k, 1.0);
            let Some(rows) = iw.amx_rows(&x, m) else {
                return; // no AMX here: nothing to check
            };
            let mut products = vec![MaybeUninit::new(f32::NAN); m * 2 * h];
            iw.rows_by_amx_rows_uninit((&rows, 0..m), 0..2 * h, &mut products);
            let width = cols.len();
            let mut out = vec![MaybeUninit::new(f32::NAN); m * width];
            iw.rows_by_amx_rows_silu_uninit((&rows, 0..m), cols.clone(), &mut out);
            for r in 0..m {
                for (c, j) in cols.clone().enumerate() {
                    // SAFETY: both kernels wrote every output (NaN would fail below).
                    let (g, u, got) = unsafe {
                        let p = &products[r * 2 * h..];
                        (
                            p[j].assume_init(),
                            p[h + j].assume_init(),
                            out[r * width + c].assume_init(),
                        )
                    };
                    let want = crate::fastmath::silu(g) * u;
                    assert_eq!(
                        got.to_bits(),
                        want.to_bits(),
                        "{m} rows [{r},{j}]: {got} vs {want}"
                    );
                }
            }
        }
    }
}

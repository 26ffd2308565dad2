//! What int8 and int4 weights share (`--quantization`): both keep their codes in the panels of
//! the packed f32 kernel, which widens them in registers, and with `--dtype bf16` on a CPU with
//! AMX their products of many rows run on the matrix unit instead, each panel widened once per
//! product to bf16 (`quant_amx`), as vLLM's W8A16 and W4A16 GPU kernels compute with 16-bit
//! activations.

use std::mem::MaybeUninit;
use std::ops::Range;

use super::BlockValues;

/// Fewer rows than this run by the f32 kernel even where products may be bf16's
/// ([`QuantPanels::amx_rows`]' callers): up to 12 rows (one tile of the AVX-512 kernel) the f32
/// kernel is faster than widening each panel to bf16 for the unit, from 13 slower (a second
/// tile of rows, a second pass over the panels). One core,
/// Intel Xeon (Sapphire Rapids class), 2026-12-07, int8 / int4 by f32 kernel against AMX:
/// SmolLM2's gate/up (3072 x 576) 12 rows 324 / 343 against 349 / 411 us, 13 rows 587 / 560
/// against 402 / 410; llama-3-8b's down (14336 x 4096) 12 rows 12.3 / 12.8 against 15.5 / 13.8
/// ms, 13 rows 23.3 / 22.4 against 15.3 / 14.3.
pub const AMX_MIN_ROWS: usize = 13;

/// Quantized weights in panels of 32 output features, products by either kernel: one trait so
/// that the model's product op and the AMX kernel serve int8 and int4 alike.
pub trait QuantPanels: BlockValues + Send + Sync {
    /// The scheme as `--quantization` names it, for messages.
    const NAME: &'static str;

    /// `out[r * n + j] = x[r] . w[j]` for f32 rows `x` (`[m, k]`) and the weight rows `cols`
    /// (a range of whole panels, or the last), into outputs not yet written (every one of the
    /// `m * cols.len()` is, `[m, cols.len()]`), by the f32 kernel.
    fn rows_by_weights_uninit(
        &self,
        x: (usize, &[f32]),
        cols: Range<usize>,
        out: &mut [MaybeUninit<f32>],
    );

    /// Features `f .. f + 16` as one B operand of the AMX unit: `k / 2` pair rows of 16
    /// features, `dst[p * 16 + c]` holding feature `f + c`'s values `2p` (low half) and `2p +
    /// 1` (high half) as [`BlockValues::value`] computes them, rounded to bf16 (nearest even).
    ///
    /// # Safety
    /// AVX-512 F, BW and BF16 must be available; `k % 32 == 0`; `f % 16 == 0`, `f <
    /// n.next_multiple_of(32)` (features past `n` are a panel's zeros); `dst.len() >= 8 * k`.
    #[cfg(target_arch = "x86_64")]
    unsafe fn widen_for_amx(&self, f: usize, dst: &mut [u32]);

    /// The rows `x` (`[m, k]`) rounded to bf16 for products on the AMX unit, where this CPU
    /// has it and `k` is a multiple of 32; `None` elsewhere.
    fn amx_rows(&self, x: &[f32], m: usize) -> Option<AmxRows> {
        let k = self.dims().1;
        #[cfg(target_arch = "x86_64")]
        if k.is_multiple_of(32) && x.len() >= m * k && super::bf16::Bf16Kernel::Amx.runs_here() {
            let values = super::quant_amx::rows_to_bf16(x, m, k);
            return Some(AmxRows { values, m });
        }
        let _ = (x, m, k);
        None
    }

    /// As [`QuantPanels::rows_by_weights_uninit`] for the rows `range` of `x` (from
    /// [`QuantPanels::amx_rows`]), on the AMX unit: each panel of `cols` widened to bf16 once
    /// per call, so the products are those of bf16 weights, summed in f32. `out` is
    /// `[range.len(), cols.len()]`.
    fn rows_by_amx_rows_uninit(
        &self,
        (x, range): (&AmxRows, Range<usize>),
        cols: Range<usize>,
        out: &mut [MaybeUninit<f32>],
    ) {
        let (n, k) = self.dims();
        assert!(
            range.end <= x.m
                && out.len() >= range.len() * cols.len()
                && cols.start.is_multiple_of(super::PANEL)
                && cols.end <= n,
            "{}: rows_by_amx_rows_uninit: sizes",
            Self::NAME
        );
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `AmxRows` exists only where AMX, AVX-512 F, BW and BF16 run and `k % 32 ==
        // 0`, made from `m` rows of `k` and 16 zero rows, so a tile from any row of `range`
        // stays inside; the assert bounds the features and the outputs.
        unsafe {
            let rows = &x.values[range.start * k..];
            super::quant_amx::rows_by_panels(self, (rows, range.len()), cols, out)
        };
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("AmxRows are made only on x86-64 ({k})");
    }

    /// `silu(gate) * up` of these weights as a gate/up matrix (`[2h, k]`, the gate rows first)
    /// for the rows `range` of `x` and the output features `cols` (of `h`), as
    /// [`QuantPanels::rows_by_amx_rows_uninit`] then SiLU x mul, without the `[rows, 2h]`
    /// products in between. `h` must be a multiple of 16.
    fn rows_by_amx_rows_silu_uninit(
        &self,
        (x, range): (&AmxRows, Range<usize>),
        cols: Range<usize>,
        out: &mut [MaybeUninit<f32>],
    ) {
        let (n, k) = self.dims();
        let h = n / 2;
        assert!(
            range.end <= x.m
                && out.len() >= range.len() * cols.len()
                && n == 2 * h
                && h.is_multiple_of(16)
                && cols.start.is_multiple_of(16)
                && cols.end <= h,
            "{}: rows_by_amx_rows_silu_uninit: sizes",
            Self::NAME
        );
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as in `rows_by_amx_rows_uninit`; the assert gives the gate/up shape.
        unsafe {
            let rows = &x.values[range.start * k..];
            super::quant_amx::rows_by_gate_up_silu(self, h, (rows, range.len()), cols, out)
        };
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("AmxRows are made only on x86-64 ({k})");
    }
}

/// f32 rows rounded to bf16 for [`QuantPanels::rows_by_amx_rows_uninit`] (once per product);
/// made only by [`QuantPanels::amx_rows`], where those products run.
pub struct AmxRows {
    #[cfg(target_arch = "x86_64")]
    values: Vec<half::bf16>,
    m: usize,
}

/// One line for the user: how products of weights `W` with bf16's precision (`--dtype bf16`)
/// run on this CPU.
pub fn describe_bf16_products<W: QuantPanels>() -> String {
    let (name, f32_kernel) = (W::NAME, "f32 FMAs on panels widened in registers");
    if cfg!(target_arch = "x86_64") && super::bf16::Bf16Kernel::Amx.runs_here() {
        let (rows, amx) = (AMX_MIN_ROWS, "AMX tdpbf16ps on panels widened to bf16");
        format!("{name} products: {amx} from {rows} rows, {f32_kernel} below")
    } else {
        format!("{name} products: {f32_kernel} (no AMX here: f32's precision)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gemm::tests::both_schemes;
    use crate::util::Rng64;

    /// `w`'s products on the unit equal those of bf16-rounded rows and weights (as
    /// [`BlockValues::value`] computes them), summed in f64, to f32 rounding; an unwritten
    /// output (NaN) fails.
    fn amx_products_match<W: QuantPanels>(w: &W, x: &[f32], m: usize, cols: Range<usize>) {
        let Some(rows) = w.amx_rows(x, m) else {
            return; // no AMX here: nothing to check
        };
        let k = w.dims().1;
        let round = |v: f32| half::bf16::from_f32(v).to_f32() as f64;
        let deq = w.values();
        let width = cols.len();
        // All the rows, and the last rows from one that is not the first of a tile.
        for range in [0..m, m / 3..m] {
            let mut out = vec![MaybeUninit::new(f32::NAN); range.len() * width];
            w.rows_by_amx_rows_uninit((&rows, range.clone()), cols.clone(), &mut out);
            for (i, r) in range.enumerate() {
                for (c, j) in cols.clone().enumerate() {
                    let want: f64 = (0..k)
                        .map(|kk| round(x[r * k + kk]) * round(deq[j * k + kk]))
                        .sum();
                    // SAFETY: the kernel wrote every output (NaN would fail below).
                    let got = unsafe { out[i * width + c].assume_init() } as f64;
                    assert!(
                        (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                        "{} {m}x{width}x{k} [{r},{j}]: {got} vs {want}",
                        W::NAME
                    );
                }
            }
        }
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
            let (q8, q4) = both_schemes(&rng.uniform_f32(n * k, 0.5), n, k);
            amx_products_match(&q8, &x, m, cols.clone());
            amx_products_match(&q4, &x, m, cols);
        }
    }

    /// The fused gate/up product of `w` equals its products then SiLU x mul, bit for bit.
    fn gate_up_silu_matches<W: QuantPanels>(w: &W, x: &[f32], m: usize, cols: Range<usize>) {
        let Some(rows) = w.amx_rows(x, m) else {
            return; // no AMX here: nothing to check
        };
        let h = w.dims().0 / 2;
        let mut products = vec![MaybeUninit::new(f32::NAN); m * 2 * h];
        w.rows_by_amx_rows_uninit((&rows, 0..m), 0..2 * h, &mut products);
        let width = cols.len();
        let mut out = vec![MaybeUninit::new(f32::NAN); m * width];
        w.rows_by_amx_rows_silu_uninit((&rows, 0..m), cols.clone(), &mut out);
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
                    "{} {m} rows [{r},{j}]: {got} vs {want}",
                    W::NAME
                );
            }
        }
    }

    #[test]
    fn amx_gate_up_silu_equals_products_then_activation() {
        // h = 48: three groups of 16, the last not in a whole panel; rows around the tiles.
        let mut rng = Rng64::new(4);
        let (h, k) = (48, 64);
        let (q8, q4) = both_schemes(&rng.uniform_f32(2 * h * k, 0.5), 2 * h, k);
        for (m, cols) in [(1, 0..48), (20, 16..48), (37, 0..32)] {
            let x = rng.uniform_f32(m * k, 1.0);
            gate_up_silu_matches(&q8, &x, m, cols.clone());
            gate_up_silu_matches(&q4, &x, m, cols);
        }
    }
}

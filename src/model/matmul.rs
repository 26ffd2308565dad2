//! `x W^T`, the projections of every layer: candle's matmul, except on the CPU, where products
//! of few f32 rows and every product with bf16 or int8 weights run our kernels (`gemm`).

use std::mem::MaybeUninit;
use std::ops::Range;
use std::sync::Arc;

use anyhow::Result;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::util::Disjoint;

use crate::gemm::bf16::{
    Bf16Kernel, Bf16Rows, rows_by_weights_bf16_silu_uninit, rows_by_weights_bf16_uninit, silu_fits,
};
use crate::gemm::quant::{AMX_MIN_ROWS, QuantPanels};
use crate::gemm::{PANEL, rows_by_packed_uninit, rows_by_weights_uninit};

/// Up to this many rows, [`linear`] splits the output features over the threads itself:
/// candle's matmul runs a one-row product on one thread, bound by one core's memory bandwidth
/// (measured on 2 cores: 1 x 576 x 3072 at 16 GFLOP/s, 31 when split; 1 x 1536 x 576 at 18,
/// 59 split; from 2 to 32 rows the split is as fast or up to 1.4x faster), which small decode
/// batches would pay on every projection. Each thread's share is dot products against the weight
/// rows (`gemm::rows_by_weights`), which, unlike a general GEMM, does not repack the weights on
/// every call: gate/up of SmolLM2 at 8 rows 462 -> 308 us, decode steps of 8 sequences 65 ->
/// 43 ms. Raised from 32 to 64 once the 4 x 3 register tile and the weight prefetch made it
/// faster there too (AMD EPYC, 2026-12-03): decode steps of 33 / 48 / 64 sequences 128-140 /
/// 138-176 / 194-205 -> 72-94 / 135-140 / 163-166 ms, the default run -2 to -5%; at 96 rows
/// candle's GEMM was faster (279-288 against 314-318 ms).
pub const SPLIT_MAX_ROWS: usize = 64;

/// Rows of one task when one of our products is split over rows (beyond this many rows; fewer
/// are split over the output features): a task's inputs (64 x 1536 x 2 bytes = 192 KiB of bf16
/// rows for SmolLM2's down projection, 64 x 576 x 4 = 144 KiB of f32 ones for gate/up) stay in
/// L2 while all the weight rows pass through L1.
const ROW_BLOCK: usize = 64;

/// `x W^T` for `x` `[rows, in]` and `W` `[out, in]`; on the CPU, `W` may be bf16 under an f32 `x`
/// (`--dtype bf16` there keeps activations in f32). On the CPU, f32 products of many rows run
/// candle's GEMM unless ours suits them (`gemm::packs_many_rows`), and all of
/// them do on CPUs where ours has no vector kernel (`gemm::rows_by_weights_is_vectorised`).
pub fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        match w.dtype() {
            DType::F32
                if crate::gemm::rows_by_weights_is_vectorised()
                    && (x.dim(0)? <= SPLIT_MAX_ROWS || crate::gemm::packs_many_rows(x.dim(1)?)) =>
            {
                return Ok(x.apply_op2_no_bwd(w, &SplitMatmul)?);
            }
            DType::BF16 => return Ok(x.apply_op2_no_bwd(w, &Bf16Matmul)?),
            _ => {}
        }
    }
    Ok(x.matmul(&w.t()?)?)
}

/// `x W^T` for f32 rows and quantized weights (`gemm::int8`, `gemm::int4`: `--quantization`),
/// by the packed kernel over their panels: over the panels for up to [`SPLIT_MAX_ROWS`] rows,
/// over blocks of rows beyond (as [`linear_panels`]). With `bf16_products` (`--dtype bf16`),
/// products of [`AMX_MIN_ROWS`] rows or more run on the AMX unit where the CPU has it, the
/// rows and the widened weights rounded to bf16 (`QuantPanels::rows_by_amx_rows_uninit`),
/// split over the panels so that each is widened once, or over large blocks of rows. On CPUs
/// without AVX2 (where `--quantization` is refused), by [`linear`] over the weights dequantized
/// for this product.
pub fn linear_quantized<W: QuantPanels + 'static>(
    x: &Tensor,
    w: &Arc<W>,
    bf16_products: bool,
) -> Result<Tensor> {
    if !crate::gemm::panels_run_here() {
        let (n, k) = w.dims();
        let rows = Tensor::from_vec(w.values(), (n, k), x.device())?;
        return linear(x, &rows);
    }
    Ok(x.apply_op1_no_bwd(&QuantMatmul {
        w: w.clone(),
        bf16_products,
        silu: false,
    })?)
}

/// Whether [`quantized_gate_up_silu`] runs for rows `x` and quantized gate/up weights `w`
/// (`[2h, k]`, the gate rows first): where [`linear_quantized`] would run them on the AMX unit
/// (bf16 products, [`AMX_MIN_ROWS`] rows or more, `k` a multiple of 32), and `h` a multiple
/// of 16.
pub fn quantized_gate_up_silu_fuses<W: QuantPanels>(
    x: &Tensor,
    w: &W,
    bf16_products: bool,
) -> Result<bool> {
    let (n, k) = w.dims();
    Ok(bf16_products
        && x.device().is_cpu()
        && x.dtype() == DType::F32
        && x.rank() == 2
        && x.dim(0)? >= AMX_MIN_ROWS
        && k.is_multiple_of(32)
        && n.is_multiple_of(32)
        && Bf16Kernel::Amx.runs_here())
}

/// `silu(x W_gate^T) * (x W_up^T)` for quantized gate/up weights in one op, where
/// [`quantized_gate_up_silu_fuses`]: as [`linear_quantized`] with bf16 products followed by
/// SiLU x mul (bit for bit), without writing the `[rows, 2h]` products.
pub fn quantized_gate_up_silu<W: QuantPanels + 'static>(x: &Tensor, w: &Arc<W>) -> Result<Tensor> {
    Ok(x.apply_op1_no_bwd(&QuantMatmul {
        w: w.clone(),
        bf16_products: true,
        silu: true,
    })?)
}

/// Rows per block of a quantized product on AMX: about 1 MiB of bf16 rows of `k` (256 to
/// 1024), which stay in L2 while the panels pass. Up to two such blocks, the product is split
/// over the panels, each widened once; beyond, over blocks of rows, each widening every panel
/// again (a prefill chunk of 8192 rows split over the panels read its rows from memory once per
/// panel: 5.6 s against 4.5 for SmolLM2's 32 x 512 prefill with int8 weights).
fn amx_row_block(k: usize) -> usize {
    ((1 << 20) / (2 * k.max(1))).clamp(256, 1024)
}

/// [`linear_quantized`]'s op, and [`quantized_gate_up_silu`]'s (`silu`).
struct QuantMatmul<W> {
    w: Arc<W>,
    bf16_products: bool,
    silu: bool,
}

impl<W: QuantPanels> CustomOp1 for QuantMatmul<W> {
    fn name(&self) -> &'static str {
        W::NAME
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let w = &*self.w;
        let (n, _) = w.dims();
        let (x, m, k) = quantized_operand(W::NAME, (xs, xl), w.dims())?;
        let amx = match self.bf16_products && m >= AMX_MIN_ROWS {
            true => w.amx_rows(x, m),
            false => None,
        };
        let block = amx_row_block(k);
        if self.silu {
            let Some(x) = amx else {
                candle_core::bail!(
                    "{} gate_up_silu: {m}x{k} by ({n}x{k})^T does not fuse here",
                    W::NAME
                );
            };
            let h = n / 2;
            // SAFETY: the kernel writes every output of its block.
            let out = unsafe {
                if m > 2 * block {
                    by_row_blocks((m, h), block, |rows, part| {
                        w.rows_by_amx_rows_silu_uninit((&x, rows), 0..h, part)
                    })
                } else {
                    by_output_features((m, h), 16, |a, len, part| {
                        w.rows_by_amx_rows_silu_uninit((&x, 0..m), a..a + len, part)
                    })
                }
            };
            return Ok((CpuStorage::F32(out), Shape::from((m, h))));
        }
        // SAFETY: both kernels write every output of their block.
        let out = unsafe {
            match &amx {
                Some(x) if m > 2 * block => by_row_blocks((m, n), block, |rows, part| {
                    w.rows_by_amx_rows_uninit((x, rows), 0..n, part)
                }),
                Some(x) => by_output_features((m, n), PANEL, |a, len, part| {
                    w.rows_by_amx_rows_uninit((x, 0..m), a..a + len, part)
                }),
                None => split_product((m, n), m <= SPLIT_MAX_ROWS, PANEL, |rows, cols, part| {
                    w.rows_by_weights_uninit((rows.len(), &x[rows.start * k..]), cols, part)
                }),
            }
        };
        Ok((CpuStorage::F32(out), Shape::from((m, n))))
    }
}

/// The contiguous f32 rows `[m, k]` of a product with quantized weights of `n` rows of `k`,
/// and `(m, k)`; `op` names the op in errors.
fn quantized_operand<'a>(
    op: &str,
    (xs, xl): (&'a CpuStorage, &Layout),
    (n, wk): (usize, usize),
) -> candle_core::Result<(&'a [f32], usize, usize)> {
    let CpuStorage::F32(x) = xs else {
        candle_core::bail!("{op}: f32 rows only");
    };
    let Some((a, b)) = xl.contiguous_offsets() else {
        candle_core::bail!("{op}: rows must be contiguous");
    };
    let (m, k) = xl.shape().dims2()?;
    if k != wk {
        candle_core::bail!("{op}: {m}x{k} by ({n}x{wk})^T");
    }
    Ok((&x[a..b], m, k))
}

/// Whether [`gate_up_silu`] runs for rows `x` and a gate/up matrix `w`: on the CPU, bf16
/// weights whose products run on AMX, more than [`ROW_BLOCK`] rows (a prefill), `in` and the
/// weight rows multiples of 32.
pub fn gate_up_silu_fuses(x: &Tensor, w: &Tensor) -> Result<bool> {
    Ok(x.device().is_cpu()
        && x.dtype() == DType::F32
        && w.dtype() == DType::BF16
        && Bf16Kernel::chosen() == Bf16Kernel::Amx
        && x.rank() == 2
        && x.dim(0)? > ROW_BLOCK
        && x.dim(1)? % 32 == 0
        && w.dim(0)? % 32 == 0)
}

/// `silu(x W_gate^T) * (x W_up^T)` for a gate/up matrix `W` (`[2h, in]`, the gate rows first)
/// in one op, where [`gate_up_silu_fuses`]: it never writes the `[rows, 2h]` products, which
/// SiLU x mul would read back (measured: docs/cpu-performance.md). Bit for bit the values of
/// `linear` then `ops::silu_mul` on the same kernel.
pub fn gate_up_silu(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    Ok(x.apply_op2_no_bwd(w, &Bf16SiluMatmul)?)
}

/// `x W^T` for f32 rows `x` and the weights of an `[n, k]` matrix packed into panels
/// (`gemm::pack_at_load`, which `Linear` does at load on AVX-512 CPUs): over the panels for up
/// to [`SPLIT_MAX_ROWS`] rows, over blocks of rows beyond.
pub fn linear_panels(x: &Tensor, panels: &Tensor, (n, k): (usize, usize)) -> Result<Tensor> {
    Ok(x.apply_op2_no_bwd(panels, &PanelMatmul { n, k })?)
}

/// [`linear_panels`]' op.
struct PanelMatmul {
    n: usize,
    k: usize,
}

impl CustomOp2 for PanelMatmul {
    fn name(&self) -> &'static str {
        "panel-matmul"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ps: &CpuStorage,
        pl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(x), CpuStorage::F32(p)) = (xs, ps) else {
            candle_core::bail!("panel_matmul: f32 rows and panels only");
        };
        let (Some((xa, xb)), Some((pa, pb))) = (xl.contiguous_offsets(), pl.contiguous_offsets())
        else {
            candle_core::bail!("panel_matmul: inputs must be contiguous");
        };
        let (x, p) = (&x[xa..xb], &p[pa..pb]);
        let (n, k) = (self.n, self.k);
        let (m, k2) = xl.shape().dims2()?;
        if k2 != k || p.len() < n.div_ceil(PANEL) * PANEL * k {
            candle_core::bail!(
                "panel_matmul: {m}x{k2} by {n}x{k} in {} panel values",
                p.len()
            );
        }
        // SAFETY: `rows_by_packed_uninit` writes every output of its block.
        let out = unsafe {
            split_product((m, n), m <= SPLIT_MAX_ROWS, PANEL, |rows, cols, part| {
                let (x, p) = (&x[rows.start * k..], &p[cols.start * k..]);
                rows_by_packed_uninit((rows.len(), cols.len(), k), x, p, part)
            })
        };
        Ok((CpuStorage::F32(out), Shape::from((m, n))))
    }
}

/// Rows `ids` (`[tokens]`, u32) of an `[n, k]` matrix packed into panels, as `[tokens, k]`:
/// the token embedding where the tied LM head keeps it only as panels (`gemm::unpack_rows`).
pub fn panel_rows(panels: &Tensor, ids: &Tensor, (n, k): (usize, usize)) -> Result<Tensor> {
    Ok(panels.apply_op2_no_bwd(ids, &PanelRows { n, k })?)
}

/// [`panel_rows`]' op.
struct PanelRows {
    n: usize,
    k: usize,
}

impl CustomOp2 for PanelRows {
    fn name(&self) -> &'static str {
        "panel-rows"
    }

    fn cpu_fwd(
        &self,
        ps: &CpuStorage,
        pl: &Layout,
        is: &CpuStorage,
        il: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(p), CpuStorage::U32(ids)) = (ps, is) else {
            candle_core::bail!("panel_rows: f32 panels and u32 ids only");
        };
        let (Some((pa, pb)), Some((ia, ib))) = (pl.contiguous_offsets(), il.contiguous_offsets())
        else {
            candle_core::bail!("panel_rows: inputs must be contiguous");
        };
        let (n, k, ids) = (self.n, self.k, &ids[ia..ib]);
        let Some(rows) = crate::gemm::unpack_rows(&p[pa..pb], (n, k), ids) else {
            let max = ids.iter().max().copied().unwrap_or(0);
            candle_core::bail!("panel_rows: id {max} is not below the matrix's {n} rows");
        };
        Ok((CpuStorage::F32(rows), Shape::from((ids.len(), k))))
    }
}

/// The contiguous operands of `x W^T` on the CPU, and its `(m, n, k)`.
struct Operands<'a, T> {
    x: &'a [f32],
    w: &'a [T],
    mnk: (usize, usize, usize),
}

fn operands<'a, T>(
    op: &str,
    (x, xl): (&'a [f32], &Layout),
    (w, wl): (&'a [T], &Layout),
) -> candle_core::Result<Operands<'a, T>> {
    let (Some((xa, xb)), Some((wa, wb))) = (xl.contiguous_offsets(), wl.contiguous_offsets())
    else {
        candle_core::bail!("{op}: inputs must be contiguous");
    };
    let (m, k) = xl.shape().dims2()?;
    let (n, k2) = wl.shape().dims2()?;
    if k != k2 || k == 0 {
        candle_core::bail!("{op}: {m}x{k} by ({n}x{k2})^T");
    }
    Ok(Operands {
        x: &x[xa..xb],
        w: &w[wa..wb],
        mnk: (m, n, k),
    })
}

/// f32 rows prepared for the chosen bf16 kernel, the bf16 weights, and `(m, n, k)`: what both
/// bf16 ops start from.
struct Bf16Operands<'a> {
    xb: Bf16Rows,
    w: &'a [half::bf16],
    mnk: (usize, usize, usize),
}

fn bf16_operands<'a>(
    op: &str,
    (xs, xl): (&'a CpuStorage, &Layout),
    (ws, wl): (&'a CpuStorage, &Layout),
) -> candle_core::Result<Bf16Operands<'a>> {
    let (CpuStorage::F32(x), CpuStorage::BF16(w)) = (xs, ws) else {
        candle_core::bail!("{op}: f32 rows and bf16 weights only");
    };
    let Operands { x, w, mnk } = operands(op, (x, xl), (w, wl))?;
    let xb = Bf16Rows::prepare(Bf16Kernel::chosen(), x, mnk.2);
    Ok(Bf16Operands { xb, w, mnk })
}

/// An `[m, n]` product split over its output features for `few` rows, over blocks of rows
/// otherwise: `block(rows, features, out)` computes the outputs of those rows and features into
/// `out` (`[rows, features]`), features in chunks that are multiples of `whole`.
///
/// # Safety
/// `block` must write every element of the block it is given.
unsafe fn split_product(
    (m, n): (usize, usize),
    few: bool,
    whole: usize,
    block: impl Fn(Range<usize>, Range<usize>, &mut [MaybeUninit<f32>]) + Sync,
) -> Vec<f32> {
    // SAFETY: the caller's contract, passed on.
    unsafe {
        if few {
            by_output_features((m, n), whole, |a, len, part| block(0..m, a..a + len, part))
        } else {
            by_row_blocks((m, n), ROW_BLOCK, |rows, part| block(rows, 0..n, part))
        }
    }
}

/// An `[m, n]` product split over its output features: chunks of contiguous weight rows (a
/// multiple of `whole`, the kernel's block of weight rows), enough for every thread, each
/// computed by `part(first, len, out)` into its own `[m, len]` buffer (not zeroed first), which
/// the same task then places into its columns of the output while it is still in cache. Before,
/// both buffers were zeroed and one thread placed every part after the others had finished.
///
/// # Safety
/// `part` must write every element of the `[m, len]` block it is given (as the `_uninit`
/// kernels do): the result is read as initialised.
unsafe fn by_output_features(
    (m, n): (usize, usize),
    whole: usize,
    part: impl Fn(usize, usize, &mut [MaybeUninit<f32>]) + Sync,
) -> Vec<f32> {
    let chunk = n
        .div_ceil(4 * rayon::current_num_threads())
        .max(16)
        .next_multiple_of(whole);
    let mut out = Vec::with_capacity(m * n);
    let dst = Disjoint::new(&mut out.spare_capacity_mut()[..m * n]);
    (0..n)
        .step_by(chunk)
        .collect::<Vec<_>>()
        .into_par_iter()
        .for_each(|a| {
            let len = chunk.min(n - a);
            let mut buf: Vec<f32> = Vec::with_capacity(m * len);
            let block = &mut buf.spare_capacity_mut()[..m * len];
            part(a, len, block);
            for (r, row) in block.chunks_exact(len).enumerate() {
                // SAFETY: columns `a .. a + len` of row `r` belong to this task alone.
                unsafe { dst.write(r * n + a, row) };
            }
        });
    // SAFETY: the chunks cover the `n` columns of every row, and `part` wrote every value
    // placed.
    unsafe { out.set_len(m * n) };
    out
}

/// An `[m, n]` product split over blocks of at most `most` rows (see [`row_block`]), each
/// computed by `part(rows, out)` straight into its rows of the output, which is not zeroed
/// first (for a prefill's activations that would be a `memset` of up to 100 MB per layer).
///
/// # Safety
/// `part` must write every element of the block it is given (as `rows_by_weights_uninit` and
/// `rows_by_weights_bf16_uninit` do): the result is read as initialised.
unsafe fn by_row_blocks(
    (m, n): (usize, usize),
    most: usize,
    part: impl Fn(Range<usize>, &mut [MaybeUninit<f32>]) + Sync,
) -> Vec<f32> {
    let block = row_block(m, rayon::current_num_threads(), most);
    let mut out = Vec::with_capacity(m * n);
    out.spare_capacity_mut()[..m * n]
        .par_chunks_mut(block * n)
        .enumerate()
        .for_each(|(b, o)| part(b * block..b * block + o.len() / n, o));
    // SAFETY: the blocks cover the `m * n` elements, and `part` wrote every one of them.
    unsafe { out.set_len(m * n) };
    out
}

/// f32 rows times f32 weights by `rows_by_weights`: over the output features for few rows, over
/// blocks of rows for many (a prefill, where `gemm::packs_many_rows`), then against weights
/// packed once per product (`gemm::packed`, or `gemm::packed_avx2` without AVX-512).
struct SplitMatmul;

impl CustomOp2 for SplitMatmul {
    fn name(&self) -> &'static str {
        "split-matmul"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(x), CpuStorage::F32(w)) = (xs, ws) else {
            candle_core::bail!("split_matmul: f32 only");
        };
        let Operands { x, w, mnk } = operands("split_matmul", (x, xl), (w, wl))?;
        let (m, n, k) = mnk;
        let few = m <= SPLIT_MAX_ROWS;
        let packed = if few {
            None
        } else {
            crate::gemm::pack_for_many_rows(w, n, k)
        };
        // SAFETY: `rows_by_packed_uninit` and `rows_by_weights_uninit` write every output of
        // their block.
        let out = unsafe {
            match &packed {
                Some(p) => split_product((m, n), few, PANEL, |rows, cols, part| {
                    let (x, p) = (&x[rows.start * k..], &p[cols.start * k..]);
                    rows_by_packed_uninit((rows.len(), cols.len(), k), x, p, part)
                }),
                None => split_product((m, n), few, 1, |rows, cols, part| {
                    let (x, w) = (&x[rows.start * k..], &w[cols.start * k..]);
                    rows_by_weights_uninit((rows.len(), cols.len(), k), x, w, part)
                }),
            }
        };
        Ok((CpuStorage::F32(out), Shape::from((m, n))))
    }
}

/// f32 rows times bf16 weights: the rows prepared once for the chosen kernel (`gemm::bf16`),
/// then `rows_by_weights_bf16` over the output features for few rows, over blocks of rows for
/// many (a prefill).
struct Bf16Matmul;

impl CustomOp2 for Bf16Matmul {
    fn name(&self) -> &'static str {
        "bf16-matmul"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let Bf16Operands { xb, w, mnk } = bf16_operands("bf16_matmul", (xs, xl), (ws, wl))?;
        let (m, n, k) = mnk;
        // SAFETY: `rows_by_weights_bf16_uninit` writes every output of its block.
        let out = unsafe {
            split_product(
                (m, n),
                m <= ROW_BLOCK,
                xb.weight_block(),
                |rows, cols, part| {
                    rows_by_weights_bf16_uninit(&xb, rows, (cols.len(), &w[cols.start * k..]), part)
                },
            )
        };
        Ok((CpuStorage::F32(out), Shape::from((m, n))))
    }
}

/// [`gate_up_silu`]'s op: f32 rows, bf16 gate/up weights, over blocks of rows on AMX.
struct Bf16SiluMatmul;

impl CustomOp2 for Bf16SiluMatmul {
    fn name(&self) -> &'static str {
        "bf16-gate-up-silu"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let Bf16Operands { xb, w, mnk } = bf16_operands("gate_up_silu", (xs, xl), (ws, wl))?;
        let (m, n, k) = mnk;
        if !n.is_multiple_of(2) || !silu_fits(&xb, n / 2) {
            candle_core::bail!("gate_up_silu: {m}x{k} by ({n}x{k})^T does not fuse here");
        }
        let h = n / 2;
        // SAFETY: `rows_by_weights_bf16_silu_uninit` writes every output of its rows.
        let out = unsafe {
            by_row_blocks((m, h), ROW_BLOCK, |rows, part| {
                rows_by_weights_bf16_silu_uninit(&xb, rows, (h, w), part)
            })
        };
        Ok((CpuStorage::F32(out), Shape::from((m, h))))
    }
}

/// Rows per task for `m` rows over `threads`: at most `most`, in a number of blocks that the
/// threads share evenly.
fn row_block(m: usize, threads: usize, most: usize) -> usize {
    let threads = threads.max(1);
    let blocks = m.div_ceil(most).div_ceil(threads) * threads;
    m.div_ceil(blocks).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gemm::int4::Int4Weights;
    use crate::gemm::int8::Int8Weights;
    use crate::util::Rng64;
    use candle_core::Device;

    /// Seeded inputs uniform in [-scale, scale), so a failure replays exactly.
    fn uniform(rng: &mut Rng64, shape: (usize, usize), scale: f32) -> Result<Tensor> {
        Ok(Tensor::from_vec(
            rng.uniform_f32(shape.0 * shape.1, scale),
            shape,
            &Device::Cpu,
        )?)
    }

    #[test]
    fn split_matmul_matches_candle() -> Result<()> {
        let mut rng = Rng64::new(11);
        for (m, k, n) in [(1, 64, 300), (5, 33, 17), (64, 128, 1000), (80, 8, 8)] {
            let x = uniform(&mut rng, (m, k), 1.7)?;
            let w = uniform(&mut rng, (n, k), 1.7)?;
            let want = x.matmul(&w.t()?)?;
            // The op on every CPU (its plain loops where it has no vector kernel), and
            // whichever path `linear` takes here.
            for got in [x.apply_op2_no_bwd(&w, &SplitMatmul)?, linear(&x, &w)?] {
                let err = (got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(err < 1e-3, "{m}x{k}x{n}: {err}");
            }
        }
        Ok(())
    }

    /// Against candle's f32 product of the operands as the chosen kernel reads them: weights
    /// in bf16, rows rounded to bf16 too unless the kernel keeps them in f32.
    #[test]
    fn bf16_weights_match_candle_on_rounded_operands() -> Result<()> {
        // Rows from 1 (decode) to past two row blocks (prefill), odd sizes included.
        let rows_in_f32 = matches!(Bf16Kernel::chosen(), Bf16Kernel::Widen | Bf16Kernel::Avx2);
        let mut rng = Rng64::new(12);
        for (m, k, n) in [
            (1, 64, 300),
            (5, 33, 17),
            (64, 576, 100),
            (65, 40, 9),
            (200, 96, 70),
        ] {
            let x = uniform(&mut rng, (m, k), 1.7)?;
            let w = uniform(&mut rng, (n, k), 1.7)?.to_dtype(DType::BF16)?;
            let xr = if rows_in_f32 {
                x.clone()
            } else {
                x.to_dtype(DType::BF16)?.to_dtype(DType::F32)?
            };
            let want = xr.matmul(&w.to_dtype(DType::F32)?.t()?)?;
            let got = linear(&x, &w)?;
            assert_eq!(got.dims(), &[m, n]);
            assert_eq!(got.dtype(), DType::F32);
            let err = (got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(err < 1e-3, "{m}x{k}x{n}: {err}");
        }
        Ok(())
    }

    /// The fused gate/up product and activation against `linear` then `silu_mul`, bit for bit,
    /// over rows in several blocks, where the CPU runs it (bf16 products on AMX).
    #[test]
    fn gate_up_silu_matches_product_then_activation() -> Result<()> {
        let mut rng = Rng64::new(4);
        let x = uniform(&mut rng, (130, 64), 1.0)?;
        let w = uniform(&mut rng, (96, 64), 0.5)?.to_dtype(DType::BF16)?;
        if !gate_up_silu_fuses(&x, &w)? {
            assert!(Bf16Kernel::chosen() != Bf16Kernel::Amx);
            return Ok(());
        }
        // Few rows, odd weight rows or f32 weights do not fuse.
        assert!(!gate_up_silu_fuses(&x.narrow(0, 0, 64)?, &w)?);
        assert!(!gate_up_silu_fuses(&x, &w.narrow(0, 0, 80)?)?);
        assert!(!gate_up_silu_fuses(&x, &w.to_dtype(DType::F32)?)?);
        let got = gate_up_silu(&x, &w)?;
        let want = crate::model::ops::silu_mul(&linear(&x, &w)?)?;
        assert_eq!(got.dims(), &[130, 48]);
        let (got, want) = (got.to_vec2::<f32>()?, want.to_vec2::<f32>()?);
        for (r, (g, w)) in got.iter().zip(&want).enumerate() {
            for (j, (a, b)) in g.iter().zip(w).enumerate() {
                assert_eq!(a.to_bits(), b.to_bits(), "[{r}][{j}]");
            }
        }
        Ok(())
    }

    /// int8 and int4 weights, quantized from the same values, for tests over both schemes.
    fn both_schemes(
        rng: &mut Rng64,
        (n, k): (usize, usize),
    ) -> (Arc<Int8Weights>, Arc<Int4Weights>) {
        let (q8, q4) = crate::gemm::tests::both_schemes(&rng.uniform_f32(n * k, 0.5), n, k);
        (Arc::new(q8), Arc::new(q4))
    }

    /// Quantized products with bf16's precision give those of f32 precision within bf16's
    /// rounding, whichever way they run: the f32 kernel (few rows), over the panels on AMX, over
    /// blocks of rows on AMX (beyond 2048 rows at this `k`); every output written.
    #[test]
    fn quantized_bf16_products_match_f32_ones() -> Result<()> {
        fn check<W: QuantPanels + 'static>(w: &Arc<W>, x: &Tensor) -> Result<()> {
            let want = linear_quantized(x, w, false)?.to_vec2::<f32>()?;
            let got = linear_quantized(x, w, true)?.to_vec2::<f32>()?;
            for (r, (g, e)) in got.iter().zip(&want).enumerate() {
                for (j, (a, b)) in g.iter().zip(e).enumerate() {
                    let m = x.dim(0)?;
                    assert!(
                        (a - b).abs() < 0.05,
                        "{} {m} rows [{r}][{j}]: {a} vs {b}",
                        W::NAME
                    );
                }
            }
            Ok(())
        }
        let mut rng = Rng64::new(9);
        let (q8, q4) = both_schemes(&mut rng, (70, 64));
        for m in [3, 100, 2100] {
            let x = uniform(&mut rng, (m, 64), 1.0)?;
            check(&q8, &x)?;
            check(&q4, &x)?;
        }
        Ok(())
    }

    /// The fused quantized gate/up with SiLU x mul equals the product then the activation, bit
    /// for bit, over the panels and over blocks of rows (beyond 2048 rows at this `k`); it runs
    /// only where it fuses.
    #[test]
    fn quantized_gate_up_silu_matches_product_then_activation() -> Result<()> {
        fn check<W: QuantPanels + 'static>(w: &Arc<W>, x: &Tensor) -> Result<()> {
            let m = x.dim(0)?;
            if !quantized_gate_up_silu_fuses(x, &**w, true)? {
                assert!(quantized_gate_up_silu(x, w).is_err());
                return Ok(()); // no AMX here
            }
            assert!(!quantized_gate_up_silu_fuses(x, &**w, false)?);
            let got = quantized_gate_up_silu(x, w)?.to_vec2::<f32>()?;
            let want = crate::model::ops::silu_mul(&linear_quantized(x, w, true)?)?;
            for (r, (g, e)) in got.iter().zip(&want.to_vec2::<f32>()?).enumerate() {
                for (j, (a, b)) in g.iter().zip(e).enumerate() {
                    let what = format!("{} {m} rows [{r}][{j}]: {a} vs {b}", W::NAME);
                    assert_eq!(a.to_bits(), b.to_bits(), "{what}");
                }
            }
            Ok(())
        }
        let mut rng = Rng64::new(10);
        let (q8, q4) = both_schemes(&mut rng, (2 * 48, 64));
        for m in [12, 100, 2100] {
            let x = uniform(&mut rng, (m, 64), 1.0)?;
            check(&q8, &x)?;
            check(&q4, &x)?;
        }
        Ok(())
    }

    /// Weights packed into panels give `linear`'s products, over the panels (few rows) and
    /// over blocks of rows (many), with a ragged last panel; a shape that does not match the
    /// panels is an error.
    #[test]
    fn panels_match_rows() -> Result<()> {
        let mut rng = Rng64::new(8);
        let (n, k) = (70, 48);
        let w = uniform(&mut rng, (n, k), 0.5)?;
        let rows = w.flatten_all()?.to_vec1::<f32>()?;
        let Some(packed) = crate::gemm::pack_for_many_rows(&rows, n, k) else {
            return Ok(());
        };
        let len = packed.len();
        let panels = Tensor::from_vec(packed, len, &Device::Cpu)?;
        for m in [1, 7, 64, 130] {
            let x = uniform(&mut rng, (m, k), 1.0)?;
            let got = linear_panels(&x, &panels, (n, k))?.to_vec2::<f32>()?;
            let want = linear(&x, &w)?.to_vec2::<f32>()?;
            for (r, (g, w)) in got.iter().zip(&want).enumerate() {
                for (j, (a, b)) in g.iter().zip(w).enumerate() {
                    assert!(
                        (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                        "{m} [{r}][{j}]: {a} vs {b}"
                    );
                }
            }
        }
        let x = uniform(&mut rng, (3, k + 1), 1.0)?;
        assert!(linear_panels(&x, &panels, (n, k)).is_err());
        assert!(linear_panels(&x.narrow(1, 0, k)?, &panels, (n + 40, k)).is_err());
        Ok(())
    }

    #[test]
    fn row_blocks_cover_the_rows_evenly() {
        for (m, threads, want) in [
            (65, 2, 33),
            (128, 2, 64),
            (129, 2, 33),
            (8192, 2, 64),
            (100, 1, 50),
            (7, 16, 1),
        ] {
            let got = row_block(m, threads, ROW_BLOCK);
            assert_eq!(got, want, "{m} rows, {threads} threads");
        }
    }
}

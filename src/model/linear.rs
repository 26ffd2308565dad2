//! `x W^T + b`, the projections of a layer and the LM head, in the weight layout the load chose:
//! rows as loaded, f32 panels for the packed CPU kernel, or int8 or int4 blocks.

use std::sync::Arc;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};

use super::Quantization;
use super::matmul;
use crate::gemm::int4::{self, Int4Weights};
use crate::gemm::int8::{self, Int8Weights};

/// The weights of a [`Linear`], in the one form its products run on.
#[derive(Clone, Debug)]
enum Weights {
    /// `[out, in]` in the load dtype: candle's matmul, or ours on the CPU (`matmul::linear`).
    Rows(Tensor),
    /// f32 packed into panels of 32 output features (`gemm::pack_at_load`, AVX-512 CPUs:
    /// [`Linear::into_panels`]), `n` (out) by `k` (in).
    Panels { panels: Tensor, n: usize, k: usize },
    /// int8 blocks (`--quantization int8`: [`Linear::into_int8`]); `bf16_products` where the
    /// run's dtype is bf16 (`--dtype bf16`), which then bounds the products' precision
    /// (`matmul::linear_quantized`).
    Int8 {
        q: Arc<Int8Weights>,
        bf16_products: bool,
    },
    /// 4-bit blocks (`--quantization int4`: [`Linear::into_int4`]), `bf16_products` as int8's.
    Int4 {
        q: Arc<Int4Weights>,
        bf16_products: bool,
    },
}

/// `x W^T + b`, with `W` as `[out, in]`.
#[derive(Clone, Debug)]
pub struct Linear {
    w: Weights,
    b: Option<Tensor>,
}

impl Linear {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match &self.w {
            Weights::Rows(w) => matmul::linear(x, w)?,
            Weights::Panels { panels, n, k } => matmul::linear_panels(x, panels, (*n, *k))?,
            Weights::Int8 { q, bf16_products } => matmul::linear_quantized(x, q, *bf16_products)?,
            Weights::Int4 { q, bf16_products } => matmul::linear_quantized(x, q, *bf16_products)?,
        };
        Ok(match &self.b {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }

    /// A bias-free projection `w` (`[out, in]`) laid out as the model lays out its layers'
    /// (packed into panels where [`Linear::into_panels`] packs them), so that a calibration
    /// times the kernels the model runs.
    pub fn projection(w: Tensor) -> Result<Self> {
        Self::rows(w, None).into_panels()
    }

    /// `w` (`[out, in]`) and bias `b` as they are.
    pub(super) fn rows(w: Tensor, b: Option<Tensor>) -> Self {
        Self {
            w: Weights::Rows(w),
            b,
        }
    }

    /// Bytes of the weights and the bias.
    pub(super) fn bytes(&self) -> u64 {
        let size = |t: &Tensor| (t.elem_count() * t.dtype().size_in_bytes()) as u64;
        let w = match &self.w {
            Weights::Rows(w) | Weights::Panels { panels: w, .. } => size(w),
            Weights::Int8 { q, .. } => q.bytes(),
            Weights::Int4 { q, .. } => q.bytes(),
        };
        w + self.b.as_ref().map_or(0, size)
    }

    /// Whether the weights are f32 panels.
    pub(super) fn is_panels(&self) -> bool {
        matches!(self.w, Weights::Panels { .. })
    }

    /// Bytes per weight as stored, where quantized: a code and its share of its block's scale
    /// (and minimum); `None` for weights in a dtype.
    pub(super) fn quantized_bytes_per_weight(&self) -> Option<f64> {
        match self.w {
            Weights::Int8 { .. } => Some(crate::gemm::int8::BYTES_PER_WEIGHT),
            Weights::Int4 { .. } => Some(crate::gemm::int4::BYTES_PER_WEIGHT),
            Weights::Rows(_) | Weights::Panels { .. } => None,
        }
    }

    /// The weight rows `ids` (`[tokens]`, u32) as `[tokens, in]`, in the weights' dtype: the
    /// token embedding, where a tied LM head holds it. Not for quantized blocks.
    pub(super) fn weight_rows(&self, ids: &Tensor) -> Result<Tensor> {
        match &self.w {
            Weights::Rows(w) => Ok(w.index_select(ids, 0)?),
            Weights::Panels { panels, n, k } => matmul::panel_rows(panels, ids, (*n, *k)),
            Weights::Int8 { .. } | Weights::Int4 { .. } => {
                anyhow::bail!("Linear::weight_rows: quantized blocks have no rows")
            }
        }
    }

    /// The layout `quant` asks for: int8 blocks, or (without quantization) panels where the CPU
    /// runs the packed kernel ([`Linear::into_panels`]). `dtype` is the run's (`--dtype`).
    pub(super) fn prepared(self, quant: Quantization, dtype: DType) -> Result<Self> {
        match quant {
            Quantization::None => self.into_panels(),
            Quantization::Int8 => self.into_int8(dtype),
            Quantization::Int4 => self.into_int4(dtype),
        }
    }

    /// The same projection with its weights quantized to 4-bit blocks (`gemm::int4`), their
    /// products computed with `dtype`'s precision where it is bf16 (as [`Linear::into_int8`]);
    /// the values it had are not kept.
    pub(super) fn into_int4(self, dtype: DType) -> Result<Self> {
        let (values, (n, k)) = self.row_values("into_int4")?;
        within_f16_scales(&values, (n, k), ("int4", int4::MAX_WEIGHT), "int8 or none")?;
        Ok(Self {
            w: Weights::Int4 {
                q: Arc::new(Int4Weights::quantize(&values, n, k)),
                bf16_products: dtype == DType::BF16,
            },
            b: self.b,
        })
    }

    /// The weights as f32 rows, for a quantization (`op` names it in the error where the
    /// weights are not rows).
    fn row_values(&self, op: &str) -> Result<(Vec<f32>, (usize, usize))> {
        let Weights::Rows(w) = &self.w else {
            anyhow::bail!("Linear::{op}: weights are quantized from rows");
        };
        let values = w.to_dtype(DType::F32)?.contiguous()?.flatten_all()?;
        Ok((values.to_vec1::<f32>()?, w.dims2()?))
    }

    /// The same projection with its weights quantized to int8 blocks (`gemm::int8`), their
    /// products computed with `dtype`'s precision where it is bf16 (`matmul::linear_quantized`); the
    /// values it had are not kept.
    pub(super) fn into_int8(self, dtype: DType) -> Result<Self> {
        if matches!(self.w, Weights::Int8 { .. }) {
            return Ok(self);
        }
        let (values, (n, k)) = self.row_values("into_int8")?;
        within_f16_scales(&values, (n, k), ("int8", int8::MAX_WEIGHT), "none")?;
        Ok(Self {
            w: Weights::Int8 {
                q: Arc::new(Int8Weights::quantize(&values, n, k)),
                bf16_products: dtype == DType::BF16,
            },
            b: self.b,
        })
    }

    /// Whether [`Linear::silu_mul`] runs for `x` (`matmul::gate_up_silu_fuses`, and no bias).
    pub fn fuses_silu_mul(&self, x: &Tensor) -> Result<bool> {
        Ok(self.b.is_none()
            && match &self.w {
                Weights::Rows(w) => matmul::gate_up_silu_fuses(x, w)?,
                Weights::Int8 { q, bf16_products } => {
                    matmul::quantized_gate_up_silu_fuses(x, &**q, *bf16_products)?
                }
                Weights::Int4 { q, bf16_products } => {
                    matmul::quantized_gate_up_silu_fuses(x, &**q, *bf16_products)?
                }
                Weights::Panels { .. } => false,
            })
    }

    /// `silu(gate) * up` of this gate/up projection (`[2h, in]`, gate rows first) in one op,
    /// where [`Linear::fuses_silu_mul`].
    pub fn silu_mul(&self, x: &Tensor) -> Result<Tensor> {
        match &self.w {
            Weights::Rows(w) => matmul::gate_up_silu(x, w),
            Weights::Int8 { q, .. } => matmul::quantized_gate_up_silu(x, q),
            Weights::Int4 { q, .. } => matmul::quantized_gate_up_silu(x, q),
            Weights::Panels { .. } => anyhow::bail!("Linear::silu_mul: f32 panels do not fuse"),
        }
    }

    /// Several projections of the same input, loaded as rows, fused into one (rows stacked):
    /// one GEMM instead of several smaller ones.
    pub(super) fn fused(parts: Vec<Linear>) -> Result<Self> {
        let mut ws = Vec::with_capacity(parts.len());
        for p in &parts {
            match &p.w {
                Weights::Rows(w) => ws.push(w),
                _ => anyhow::bail!("Linear::fused: projections are fused before they are laid out"),
            }
        }
        let w = Tensor::cat(&ws, 0)?;
        let b = if parts.iter().all(|p| p.b.is_some()) {
            let bs: Vec<&Tensor> = parts.iter().filter_map(|p| p.b.as_ref()).collect();
            Some(Tensor::cat(&bs, 0)?)
        } else {
            None
        };
        Ok(Self::rows(w, b))
    }

    /// The same projection with f32 weights on the CPU packed into panels where the CPU runs
    /// the packed kernel (`gemm::pack_at_load`: AVX-512), which then serves every row
    /// count; unchanged elsewhere. The rows are not kept: the panels hold the same values.
    pub(super) fn into_panels(self) -> Result<Self> {
        let w = match &self.w {
            Weights::Rows(w) if w.device().is_cpu() && w.dtype() == DType::F32 => w,
            _ => return Ok(self),
        };
        let (n, k) = w.dims2()?;
        let rows = w.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        Ok(match crate::gemm::pack_at_load(&rows, n, k) {
            Some(packed) => {
                let len = packed.len();
                Self {
                    w: Weights::Panels {
                        panels: Tensor::from_vec(packed, len, &Device::Cpu)?,
                        n,
                        k,
                    },
                    b: self.b,
                }
            }
            None => self,
        })
    }
}

/// Refuses a `n` x `k` projection for `scheme` where a weight lies beyond `max`, what its f16
/// scales hold, naming the `--quantization` values that would take it.
fn within_f16_scales(
    values: &[f32],
    (n, k): (usize, usize),
    (scheme, max): (&str, f32),
    instead: &str,
) -> Result<()> {
    match values.iter().find(|v| v.abs() > max) {
        Some(v) => anyhow::bail!(
            "--quantization {scheme}: a {n} x {k} projection holds the weight {v}, beyond the \
             range (±{max}) of {scheme}'s f16 scales; use --quantization {instead}"
        ),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        let d = (a - b).and_then(|d| d.abs()).and_then(|d| d.max_all());
        d.and_then(|d| d.to_scalar::<f32>()).unwrap()
    }

    fn weights(n: usize, k: usize) -> Tensor {
        Tensor::randn(0f32, 0.1, (n, k), &Device::Cpu).unwrap()
    }

    #[test]
    fn every_layout_computes_the_rows_product() {
        let (n, k) = (70, 96);
        let (w, b) = (weights(n, k), weights(1, n).flatten_all().unwrap());
        let rows = Linear::rows(w.clone(), Some(b.clone()));
        let laid_out = |quant, dtype| rows.clone().prepared(quant, dtype).unwrap();
        let int8 = laid_out(Quantization::Int8, DType::F32);
        // Products with bf16's precision (on AMX from `AMX_MIN_ROWS` rows, where it runs).
        let int8_bf16 = laid_out(Quantization::Int8, DType::BF16);
        let int4_bf16 = laid_out(Quantization::Int4, DType::BF16);
        let panels = laid_out(Quantization::None, DType::F32);
        let int4 = laid_out(Quantization::Int4, DType::F32);
        let (Weights::Int8 { q, .. }, Weights::Int4 { q: q4, .. }) = (&int8.w, &int4.w) else {
            panic!("not int8 and int4")
        };
        let dequantized = Tensor::from_vec(q.dequantize(), (n, k), &Device::Cpu).unwrap();
        let dequantized4 = Tensor::from_vec(q4.dequantize(), (n, k), &Device::Cpu).unwrap();
        let product = |x: &Tensor, w: &Tensor| {
            let y = x.matmul(&w.t().unwrap()).unwrap();
            y.broadcast_add(&b).unwrap()
        };
        for m in [1, 5, 12, 80] {
            let x = weights(m, k);
            let (want, want8) = (product(&x, &w), product(&x, &dequantized));
            let want4 = product(&x, &dequantized4);
            let diff = |l: &Linear, want: &Tensor| max_diff(&l.forward(&x).unwrap(), want);
            assert!(diff(&rows, &want) < 1e-4, "rows, {m} rows");
            assert!(diff(&panels, &want) < 1e-4, "panels, {m} rows");
            assert!(diff(&int8, &want8) < 1e-4, "int8, {m} rows");
            assert!(diff(&int4, &want4) < 1e-4, "int4, {m} rows");
            assert!(
                diff(&int8_bf16, &want8) < 5e-3,
                "int8, bf16 products, {m} rows"
            );
            assert!(
                diff(&int4_bf16, &want4) < 5e-3,
                "int4, bf16 products, {m} rows"
            );
            // Against the unquantized weights: about half a step (int8) or level (int4) per weight.
            assert!(diff(&int8, &want) < 0.05, "int8 error, {m} rows");
            assert!(diff(&int4, &want) < 0.1, "int4 error, {m} rows");
        }
        assert_eq!(int8.quantized_bytes_per_weight(), Some(1.0625));
        assert_eq!(int4.quantized_bytes_per_weight(), Some(0.625));
        assert_eq!(rows.quantized_bytes_per_weight(), None);
        assert_eq!(panels.quantized_bytes_per_weight(), None);
        assert_eq!(
            panels.is_panels(),
            crate::gemm::pack_at_load(&[0.0], 1, 1).is_some()
        );
        assert!(!rows.is_panels() && !int8.is_panels());
        // The rows the embedding looks up, from any layout but int8's; an id past the last
        // row is an error.
        let ids = Tensor::new(&[69u32, 0, 31, 32, 31], &Device::Cpu).unwrap();
        let want = w.index_select(&ids, 0).unwrap();
        for l in [&rows, &panels] {
            let got = l.weight_rows(&ids).unwrap();
            assert_eq!(
                got.to_vec2::<f32>().unwrap(),
                want.to_vec2::<f32>().unwrap()
            );
            assert!(
                l.weight_rows(&Tensor::new(&[70u32], &Device::Cpu).unwrap())
                    .is_err()
            );
        }
        assert!(int8.weight_rows(&ids).is_err() && int4.weight_rows(&ids).is_err());
        // 1 byte per value plus an f16 scale per 32, and the f32 bias, against 4 bytes per value.
        let int8_bytes = (n.div_ceil(32) * 32 * (k + 2 * k / 32) + 4 * n) as u64;
        assert_eq!(int8.bytes(), int8_bytes);
        assert_eq!(rows.bytes(), (4 * n * k + 4 * n) as u64);
    }

    #[test]
    fn quantizations_refuse_weights_beyond_their_f16_scales() {
        let with = |big: f32| {
            let mut values = vec![0.01f32; 32 * 64];
            values[100] = big;
            Tensor::from_vec(values, (32, 64), &Device::Cpu).unwrap()
        };
        let prepared = |w: Tensor, q| Linear::rows(w, None).prepared(q, DType::F32);
        let err = prepared(with(70000.0), Quantization::Int4)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("70000") && err.contains("int8 or none"),
            "{err}"
        );
        assert!(prepared(with(70000.0), Quantization::Int8).is_ok());
        // int8's scale is a block's largest magnitude over 127: 65504 x 127 is the last.
        assert!(prepared(with(-8319008.0), Quantization::Int8).is_ok());
        let err = prepared(with(-8.4e6), Quantization::Int8)
            .unwrap_err()
            .to_string();
        assert!(err.contains("-8400000") && err.contains("none"), "{err}");
    }

    #[test]
    fn fused_projections_stack_their_outputs() {
        let k = 64;
        let parts: Vec<Linear> = [32, 48]
            .iter()
            .map(|&n| Linear::rows(weights(n, k), Some(weights(1, n).flatten_all().unwrap())))
            .collect();
        let x = weights(3, k);
        let separate: Vec<Tensor> = parts.iter().map(|p| p.forward(&x).unwrap()).collect();
        let fused = Linear::fused(parts).unwrap();
        let want = Tensor::cat(&separate, 1).unwrap();
        assert!(max_diff(&fused.forward(&x).unwrap(), &want) < 1e-5);
        let int8 = fused.prepared(Quantization::Int8, DType::F32).unwrap();
        assert!(
            Linear::fused(vec![int8]).is_err(),
            "fusing after the layout is refused"
        );
    }
}

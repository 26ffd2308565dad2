//! The roofline of a shape: the device's own peaks, measured (a large GEMM through the kernels
//! of the model's projections, weights laid out as the model lays them out; a large copy), and the FLOPs and bytes each phase of a shape must at least
//! process, which together give the fastest time the device could possibly do it in.

use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;
use serde::Serialize;

use super::Shape;
use crate::model::linear::Linear;
use crate::model::llama::Dims;

/// The device's measured peaks (the best of several repetitions).
#[derive(Clone, Debug, Serialize)]
pub struct Peaks {
    /// FLOP/s of a square GEMM in the model's dtype.
    pub gemm_flops: f64,
    /// What was multiplied, e.g. `2048x2048x2048 f32`.
    pub gemm: String,
    /// The memory's bandwidth, bytes/s: of a large copy (bytes read plus bytes written), or on
    /// the CPU of a large read where that is faster. Named for the copy, as in earlier JSON.
    pub copy_bytes: f64,
    /// What measured it, e.g. `a copy of 1024 MiB`.
    pub copy: String,
}

fn best_of(reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let mut best = f64::INFINITY;
    for _ in 0..reps {
        let t = Instant::now();
        f()?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(best)
}

/// Measures the peaks of `device` for `dtype` (about a second on the CPU).
pub fn calibrate(device: &Device, dtype: DType) -> Result<Peaks> {
    let n = if device.is_cpu() { 2048 } else { 8192 };
    // The rows in the activations' dtype, as the model's projections get them.
    let act = crate::model::activation_dtype(dtype, device);
    let a = Tensor::randn(0f32, 1.0, (n, n), device)?.to_dtype(act)?;
    let b = Tensor::randn(0f32, 1.0, (n, n), device)?.to_dtype(dtype)?;
    let b = Linear::projection(b)?;
    let gemm_time = best_of(if device.is_cpu() { 3 } else { 10 }, || {
        b.forward(&a)?;
        device.synchronize()?;
        Ok(())
    })?;
    drop((a, b));
    let (copy_bytes, copy) = if device.is_cpu() {
        // rayon over chunks: one thread's memcpy does not reach the memory's bandwidth.
        let len = 64 << 20; // 256 MiB of f32
        let src = vec![1f32; len];
        let mut dst = vec![0f32; len];
        let chunk = len.div_ceil(4 * rayon::current_num_threads());
        let copy = best_of(5, || {
            dst.par_chunks_mut(chunk)
                .zip(src.par_chunks(chunk))
                .for_each(|(d, s)| d.copy_from_slice(s));
            Ok(())
        })?;
        // A read alone: what decode steps mostly do, and on CPUs faster than a copy's reads
        // and writes together, so the floors would not be floors without it. Both buffers,
        // one after the other: 512 MiB, more than the last-level caches hold.
        let read = best_of(5, || {
            let sum: u32 = src
                .par_chunks(chunk)
                .chain(dst.par_chunks(chunk))
                .map(|c| c.iter().fold(0u32, |a, x| a.wrapping_add(x.to_bits())))
                .reduce(|| 0, u32::wrapping_add);
            std::hint::black_box(sum);
            Ok(())
        })?;
        let (copy, read) = (2.0 * 4.0 * len as f64 / copy, 2.0 * 4.0 * len as f64 / read);
        if read > copy {
            let what = format!("a read of 512 MiB; a copy reached {:.1} GB/s", copy / 1e9);
            (read, what)
        } else {
            let what = format!("a copy of 256 MiB; a read reached {:.1} GB/s", read / 1e9);
            (copy, what)
        }
    } else {
        let len = 512 << 20; // 1 GiB of bf16
        let src = Tensor::zeros(len, DType::BF16, device)?;
        let t = best_of(10, || {
            src.copy()?;
            device.synchronize()?;
            Ok(())
        })?;
        (2.0 * 2.0 * len as f64 / t, "a copy of 1024 MiB".to_string())
    };
    Ok(Peaks {
        gemm_flops: 2.0 * (n as f64).powi(3) / gemm_time,
        gemm: format!("{n}x{n}x{n} {}", crate::commands::dtype_name(dtype)),
        copy_bytes,
        copy,
    })
}

/// The least work a phase must do.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Cost {
    pub flops: f64,
    pub bytes: f64,
}

impl Cost {
    /// The fastest the device could do it: compute- or bandwidth-bound, whichever is slower.
    pub fn floor(&self, peaks: &Peaks) -> f64 {
        (self.flops / peaks.gemm_flops).max(self.bytes / peaks.copy_bytes)
    }

    /// Which peak sets the floor: `memory` or `compute`.
    pub fn bound(&self, peaks: &Peaks) -> &'static str {
        if self.flops / peaks.gemm_flops >= self.bytes / peaks.copy_bytes {
            "compute"
        } else {
            "memory"
        }
    }
}

/// What a model must move per token and per step.
#[derive(Clone, Copy, Debug)]
pub struct ModelCosts {
    /// Parameters of the layers' projections.
    pub linear_params: f64,
    /// Parameters of the LM head.
    pub head_params: f64,
    /// Bytes per weight as stored: the projections', the LM head's (they differ where the
    /// head keeps int8 under int4 projections).
    pub weight_elem_bytes: (f64, f64),
    /// K and V bytes of one token, all layers.
    pub kv_token_bytes: f64,
    /// FLOPs of one (query, key) pair: q.k and p.v for every head of every layer.
    pub attn_pair_flops: f64,
}

impl ModelCosts {
    /// `weight_elem_bytes`: bytes per weight as stored, the projections' and the LM head's
    /// (`Llama::bytes_per_weight`).
    pub fn new(d: &Dims, weight_elem_bytes: (f64, f64), kv_token_bytes: u64) -> Self {
        let (h, q, kv) = (
            d.hidden as f64,
            (d.heads * d.head_dim) as f64,
            (d.kv_heads * d.head_dim) as f64,
        );
        let per_layer = h * (q + 2.0 * kv) + q * h + 3.0 * h * d.intermediate as f64;
        Self {
            linear_params: d.layers as f64 * per_layer,
            head_params: (d.vocab * d.hidden) as f64,
            weight_elem_bytes,
            kv_token_bytes: kv_token_bytes as f64,
            attn_pair_flops: 4.0 * (d.heads * d.head_dim * d.layers) as f64,
        }
    }

    fn weight_bytes(&self) -> f64 {
        let (projection, head) = self.weight_elem_bytes;
        self.linear_params * projection + self.head_params * head
    }

    /// The whole prefill of `s` in `steps` steps: every prompt token through the projections,
    /// the LM head for each sequence's last token, causal attention; the weights read once per
    /// step, each token's K/V written once and read at least once.
    pub fn prefill(&self, s: &Shape, steps: usize) -> Cost {
        let (b, i) = (s.batch as f64, s.input_len as f64);
        Cost {
            flops: 2.0 * self.linear_params * b * i
                + 2.0 * self.head_params * b
                + self.attn_pair_flops * b * i * (i + 1.0) / 2.0,
            bytes: steps as f64 * self.weight_bytes() + 2.0 * b * i * self.kv_token_bytes,
        }
    }

    /// One decode step of `s` on average (the context grows from `input_len + 1` to
    /// `input_len + output_len - 1`): every weight read, each sequence's whole K/V read and one
    /// token's written.
    pub fn decode_step(&self, s: &Shape) -> Cost {
        let b = s.batch as f64;
        let ctx = s.input_len as f64 + s.output_len as f64 / 2.0;
        Cost {
            flops: 2.0 * (self.linear_params + self.head_params) * b
                + self.attn_pair_flops * b * ctx,
            bytes: self.weight_bytes() + b * (ctx + 1.0) * self.kv_token_bytes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn smollm2() -> Dims {
        Dims {
            hidden: 576,
            heads: 9,
            kv_heads: 3,
            head_dim: 64,
            intermediate: 1536,
            vocab: 49152,
            layers: 30,
            eps: 1e-5,
        }
    }

    #[test]
    fn counts_match_the_parameter_count() {
        // SmolLM2-135M: 134.5M parameters, of which 28.3M embedding (tied LM head) and the norms.
        let c = ModelCosts::new(&smollm2(), (4.0, 4.0), 2 * 30 * 3 * 64 * 2);
        let norms = (30 * 2 + 1) * 576;
        let total = c.linear_params + c.head_params + norms as f64;
        assert!((total - 134_515_008.0).abs() < 1.0, "{total}");
        let s = Shape {
            batch: 1,
            input_len: 4,
            output_len: 3,
        };
        // Decode: 2 FLOPs per weight per token, plus attention over 4 + 1.5 keys on average.
        let d = c.decode_step(&s);
        let want = 2.0 * (c.linear_params + c.head_params) + c.attn_pair_flops * 5.5;
        assert!((d.flops - want).abs() < 1.0);
        assert_eq!(d.bytes, c.weight_bytes() + 6.5 * c.kv_token_bytes);
        // Prefill in two steps reads the weights twice; attention covers 1+2+3+4 pairs.
        let p = c.prefill(&s, 2);
        assert_eq!(p.bytes, 2.0 * c.weight_bytes() + 8.0 * c.kv_token_bytes);
        let want = 2.0 * c.linear_params * 4.0 + 2.0 * c.head_params + c.attn_pair_flops * 10.0;
        assert!((p.flops - want).abs() < 1.0);
    }

    #[test]
    fn floor_is_the_slower_bound() {
        let peaks = Peaks {
            gemm_flops: 100.0,
            gemm: String::new(),
            copy_bytes: 10.0,
            copy: String::new(),
        };
        let c = Cost {
            flops: 100.0,
            bytes: 50.0,
        };
        assert_eq!(c.floor(&peaks), 5.0);
        assert_eq!(c.bound(&peaks), "memory");
        let c = Cost {
            flops: 1000.0,
            bytes: 50.0,
        };
        assert_eq!(c.floor(&peaks), 10.0);
        assert_eq!(c.bound(&peaks), "compute");
    }

    #[test]
    fn calibration_measures_something() -> Result<()> {
        let p = calibrate(&Device::Cpu, DType::F32)?;
        assert!(p.gemm_flops.is_finite() && p.gemm_flops > 0.0);
        assert!(p.copy_bytes.is_finite() && p.copy_bytes > 0.0);
        Ok(())
    }
}

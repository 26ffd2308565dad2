//! The kernel checks: each kernel on a [`Target`] (the GPU, or the CPU emulator of the CUDA
//! kernels in tests) against the CPU's, on fresh random inputs, outputs poisoned so that an
//! element a kernel fails to write fails the check.

use std::sync::Arc;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};

use super::{Check, dtype_name, max_rel_error, tolerance};
use crate::attention::plan::DecodeKernel;
use crate::attention::{BatchLayout, KvCacheSpec, PagedAttention, PagedKvCache, SeqShape};
use crate::engine::sampler::{SampleRows, SamplingParams, Stream, rows::draw_error, uniform};
use crate::util::Rng64;

/// One attention check's inputs: a history written in one step, then a second step over it.
pub struct AttentionCase {
    /// The queries', outputs' and K/V inputs' type.
    pub dtype: DType,
    /// The cache's: `dtype`, or fp8.
    pub kv_dtype: DType,
    pub block_size: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub num_blocks: usize,
    pub decode_kernel: DecodeKernel,
    /// The first step (every token of every sequence) and the second (the last queries).
    pub steps: [Step; 2],
}

/// One step: its layout and its f32 inputs (`[tokens, heads or kv_heads, head_dim]`).
pub struct Step {
    pub layout: Arc<BatchLayout>,
    pub q: Vec<f32>,
    pub k: Vec<f32>,
    pub v: Vec<f32>,
}

/// What a target returns of an attention case: both steps' outputs and the caches after them
/// (f32, NaN where nothing was written), K and V.
pub struct AttentionOut {
    pub outputs: [Vec<f32>; 2],
    pub caches: (Vec<f32>, Vec<f32>),
}

/// Where the kernels under test run. Inputs and results are on the host.
pub trait Target {
    fn attention(&self, case: &AttentionCase) -> Result<AttentionOut>;
    fn silu_mul(&self, x: &Tensor) -> Result<Tensor>;
    fn add_rms_norm(
        &self,
        x: &Tensor,
        d: &Tensor,
        w: &Tensor,
        eps: f32,
    ) -> Result<(Tensor, Tensor)>;
    fn sample(&self, logits: &Tensor, uniforms: &Tensor, p: SamplingParams) -> Result<Vec<u32>>;
}

/// A candle device: the CPU (the reference) or a GPU, through the model's own ops.
impl Target for Device {
    fn attention(&self, c: &AttentionCase) -> Result<AttentionOut> {
        let spec = KvCacheSpec::one_layer(c.kv_heads, c.head_dim, c.block_size, c.kv_dtype);
        let cache = PagedKvCache::new(spec, c.num_blocks, self)?;
        cache.fill(f32::NAN)?;
        let mut outputs: [Vec<f32>; 2] = Default::default();
        for (step, out) in c.steps.iter().zip(&mut outputs) {
            let n = step.layout.num_tokens();
            let tensor = |v: &[f32], h: usize| -> Result<Tensor> {
                Ok(Tensor::from_slice(v, (n, h, c.head_dim), self)?.to_dtype(c.dtype)?)
            };
            let attn = PagedAttention::with_decode_kernel(
                &cache,
                step.layout.clone(),
                c.heads,
                c.decode_kernel,
            )?;
            let o = attn.forward(
                0,
                &tensor(&step.q, c.heads)?,
                &tensor(&step.k, c.kv_heads)?,
                &tensor(&step.v, c.kv_heads)?,
            )?;
            *out = host(&o)?;
        }
        Ok(AttentionOut {
            outputs,
            caches: cache.to_host(0)?,
        })
    }

    fn silu_mul(&self, x: &Tensor) -> Result<Tensor> {
        Ok(crate::model::ops::silu_mul(&x.to_device(self)?)?.to_device(&Device::Cpu)?)
    }

    fn add_rms_norm(
        &self,
        x: &Tensor,
        d: &Tensor,
        w: &Tensor,
        eps: f32,
    ) -> Result<(Tensor, Tensor)> {
        let on = |t: &Tensor| t.to_device(self);
        let (s, n) = crate::model::norm::add_rms_norm(&on(x)?, &on(d)?, &on(w)?, eps)?;
        Ok((s.to_device(&Device::Cpu)?, n.to_device(&Device::Cpu)?))
    }

    fn sample(&self, logits: &Tensor, uniforms: &Tensor, p: SamplingParams) -> Result<Vec<u32>> {
        Ok(logits
            .to_device(self)?
            .apply_op2_no_bwd(&uniforms.to_device(self)?, &SampleRows(p))?
            .to_vec1::<u32>()?)
    }
}

pub fn host(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

/// Attention geometry of a check: (heads, KV heads, head dim).
pub type Geometry = (usize, usize, usize);

/// The case for `seqs` (decode kernel chosen by shape): random K/V for every sequence's history
/// and queries for both steps.
pub fn attention_case(
    dtype: DType,
    block_size: usize,
    (heads, kv_heads, d): Geometry,
    seqs: &[SeqShape],
) -> AttentionCase {
    let num_blocks = SeqShape::blocks(seqs, block_size) + 3;
    let seed = (block_size * 1000 + heads * 10 + dtype.size_in_bytes()) as u64;
    let mut rng = Rng64::new(seed);
    let history: usize = seqs.iter().map(|s| s.ctx).sum();
    let k = rng.uniform_f32(history * kv_heads * d, 1.0);
    let v = rng.uniform_f32(history * kv_heads * d, 1.0);
    // The second step's K/V rows: each sequence's last `queries` rows of its history.
    let mut rows = Vec::new();
    let mut at = 0;
    for s in seqs {
        rows.extend((at + s.ctx - s.queries)..(at + s.ctx));
        at += s.ctx;
    }
    let pick = |src: &[f32]| -> Vec<f32> {
        rows.iter()
            .flat_map(|&r| src[r * kv_heads * d..][..kv_heads * d].iter().copied())
            .collect()
    };
    let (k_step, v_step) = (pick(&k), pick(&v));
    let q_full = rng.uniform_f32(history * heads * d, 1.0);
    let q_step = rng.uniform_f32(rows.len() * heads * d, 1.0);
    let layout = |only_queries| {
        Arc::new(BatchLayout::scattered(
            seqs,
            block_size,
            num_blocks,
            seed,
            only_queries,
        ))
    };
    AttentionCase {
        dtype,
        kv_dtype: dtype,
        block_size,
        heads,
        kv_heads,
        head_dim: d,
        num_blocks,
        decode_kernel: DecodeKernel::Auto,
        steps: [
            Step {
                layout: layout(false),
                q: q_full,
                k,
                v,
            },
            Step {
                layout: layout(true),
                q: q_step,
                k: k_step,
                v: v_step,
            },
        ],
    }
}

impl AttentionCase {
    /// The same case over a cache of `kv_dtype` (fp8).
    pub fn with_kv_dtype(self, kv_dtype: DType) -> Self {
        Self { kv_dtype, ..self }
    }

    /// The element types, as the result table shows them.
    fn dtypes(&self) -> String {
        if self.kv_dtype == self.dtype {
            dtype_name(self.dtype)
        } else {
            format!(
                "{} ({} cache)",
                dtype_name(self.dtype),
                dtype_name(self.kv_dtype)
            )
        }
    }
}

/// Both steps' outputs and the caches of `target` against the CPU's, once per decode kernel
/// (`(label, kernel)`): the CPU computes its reference once, since the inputs are the same.
pub fn check_attention_kernels(
    target: &dyn Target,
    mut case: AttentionCase,
    kernels: &[(&str, DecodeKernel)],
    out: &mut Vec<Check>,
) -> Result<()> {
    let want = Device::Cpu.attention(&case)?;
    for &(label, kernel) in kernels {
        case.decode_kernel = kernel;
        let got = target.attention(&case)?;
        let detail = format!(
            "{label}, {}, block {}, {}/{} heads x {}",
            case.dtypes(),
            case.block_size,
            case.heads,
            case.kv_heads,
            case.head_dim
        );
        let tol = tolerance(case.dtype);
        for (i, name) in ["attention (prefill)", "attention (step)"]
            .iter()
            .enumerate()
        {
            out.push(Check {
                name: (*name).into(),
                detail: detail.clone(),
                error: max_rel_error(&got.outputs[i], &want.outputs[i], false),
                tolerance: tol,
            });
        }
        let (k, v) = (&got.caches, &want.caches);
        out.push(Check {
            name: "write_kv".into(),
            detail,
            error: max_rel_error(&k.0, &v.0, true).max(max_rel_error(&k.1, &v.1, true)),
            tolerance: 0.0,
        });
    }
    Ok(())
}

pub fn check_silu_mul(
    target: &dyn Target,
    dtype: DType,
    (rows, n): (usize, usize),
    out: &mut Vec<Check>,
) -> Result<()> {
    let x = Tensor::from_vec(
        Rng64::new(3).uniform_f32(rows * 2 * n, 6.0),
        (rows, 2 * n),
        &Device::Cpu,
    )?
    .to_dtype(dtype)?;
    let cpu = host(&crate::model::ops::silu_mul(&x)?)?;
    let got = host(&target.silu_mul(&x)?)?;
    out.push(Check {
        name: "silu_mul".into(),
        detail: format!("{rows} x {}, {}", 2 * n, dtype_name(dtype)),
        error: max_rel_error(&got, &cpu, false),
        tolerance: tolerance(dtype),
    });
    Ok(())
}

pub fn check_add_rms_norm(
    target: &dyn Target,
    dtype: DType,
    (rows, n): (usize, usize),
    out: &mut Vec<Check>,
) -> Result<()> {
    let mut rng = Rng64::new(5);
    let mut input = |shape: &[usize], scale: f32, offset: f32| -> Result<Tensor> {
        let len = shape.iter().product();
        let v: Vec<f32> = rng
            .uniform_f32(len, scale)
            .iter()
            .map(|x| x + offset)
            .collect();
        Ok(Tensor::from_vec(v, shape, &Device::Cpu)?.to_dtype(dtype)?)
    };
    let (x, delta, w) = (
        input(&[rows, n], 4.0, 0.0)?,
        input(&[rows, n], 1.0, 0.0)?,
        input(&[n], 0.2, 1.0)?,
    );
    let (cpu_sum, cpu_norm) = crate::model::norm::add_rms_norm(&x, &delta, &w, 1e-5)?;
    let (sum, norm) = target.add_rms_norm(&x, &delta, &w, 1e-5)?;
    for (what, got, want) in [("sum", &sum, &cpu_sum), ("norm", &norm, &cpu_norm)] {
        out.push(Check {
            name: "add_rms_norm".into(),
            detail: format!("{rows} x {n}, {}, {what}", dtype_name(dtype)),
            error: max_rel_error(&host(got)?, &host(want)?, false),
            tolerance: tolerance(dtype),
        });
    }
    Ok(())
}

/// The sampling settings the checks draw with: none, top-p, top-k, both.
pub const SAMPLING: [(f32, f32, usize); 4] = [
    (1.0, 1.0, 0),
    (0.8, 0.9, 0),
    (1.0, 1.0, 40),
    (0.6, 0.95, 50),
];

/// The sampling kernel against the CPU's draw on the same logits (`rows` random ones and three
/// built ones) and uniforms: the error is how
/// far, as a share of the kept mass, the target's token lies from where the CPU's walk puts `u`
/// (0 when the two agree; infinite for a token that top-k or top-p should have dropped).
pub fn check_sampling(
    target: &dyn Target,
    (rows, vocab): (usize, usize),
    out: &mut Vec<Check>,
) -> Result<()> {
    let mut rng = Rng64::new(9);
    let mut values = rng.uniform_f32(rows * vocab, 12.0);
    // Rows that put the thresholds where a slip shows: ascending logits (what is kept is the
    // row's end), a few tied levels (top-k and top-p cut inside a tie), one logit far above
    // the rest.
    values.extend((0..vocab).map(|i| 12.0 * i as f32 / vocab as f32));
    values.extend(rng.uniform_f32(vocab, 2.0).iter().map(|x| x.round()));
    values.extend((0..vocab).map(|i| if i == vocab / 2 { 20.0 } else { 0.0 }));
    let rows = rows + 3;
    let logits = Tensor::from_vec(values, (rows, vocab), &Device::Cpu)?;
    let first = |request| Stream {
        request,
        sample: 0,
        position: 0,
    };
    let uniforms: Vec<f32> = (0..rows).map(|r| uniform(0, first(r))).collect();
    let u = Tensor::from_slice(&uniforms, rows, &Device::Cpu)?;
    let host_rows = logits.to_vec2::<f32>()?;
    for (temperature, top_p, top_k) in SAMPLING {
        let p = SamplingParams {
            temperature,
            top_p,
            top_k,
            seed: 0,
        };
        let ids = target.sample(&logits, &u, p)?;
        let error = if ids.len() == rows {
            host_rows
                .iter()
                .zip(&uniforms)
                .zip(&ids)
                .map(|((row, &u), &id)| draw_error(row, &p, u, id))
                .fold(0.0, f64::max)
        } else {
            f64::INFINITY
        };
        out.push(Check {
            name: "sample_rows".into(),
            detail: format!("{rows} x {vocab}, {}", p.describe()),
            error,
            tolerance: 1e-4,
        });
    }
    Ok(())
}

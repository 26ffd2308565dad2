//! Paged attention: the KV cache as fixed-size blocks, and attention over a flattened batch.
//!
//! The engine hands the model one flattened batch per step: every scheduled token of every
//! sequence, prefill chunks and decode tokens mixed, no padding. [`BatchLayout`] says where each
//! token belongs; [`PagedAttention::forward`] writes the step's K/V into their cache slots and
//! attends each query causally over its sequence's cached K/V, wherever its blocks are.
//! The same two operations run on the CPU (`cpu`) and, with the `cuda` feature, on the GPU.

#[cfg(target_arch = "x86_64")]
mod avx512;
mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
pub mod fp8;
pub mod launch;
mod ops;
pub mod plan;
mod simd;
mod split;

pub use ops::{CacheKind, StepMeta};

use std::sync::Arc;

use anyhow::{Result, bail};
use candle_core::{DType, Device, Tensor};

use crate::profile::{Kernel, timed};

/// Shapes of a paged KV cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvCacheSpec {
    pub num_layers: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// Tokens per block.
    pub block_size: usize,
    pub dtype: DType,
}

impl KvCacheSpec {
    /// Bytes of K and V, all layers, for one token.
    pub fn bytes_per_token(&self) -> u64 {
        2 * (self.num_layers * self.num_kv_heads * self.head_dim * self.dtype.size_in_bytes())
            as u64
    }

    pub fn bytes_per_block(&self) -> u64 {
        self.bytes_per_token() * self.block_size as u64
    }

    /// Blocks that fit in `budget` bytes.
    pub fn blocks_in(&self, budget: u64) -> usize {
        (budget / self.bytes_per_block()) as usize
    }

    /// A single layer's cache, as kernel checks and benchmarks use.
    pub fn one_layer(
        num_kv_heads: usize,
        head_dim: usize,
        block_size: usize,
        dtype: DType,
    ) -> Self {
        Self {
            num_layers: 1,
            num_kv_heads,
            head_dim,
            block_size,
            dtype,
        }
    }
}

/// The KV cache: per layer, a K and a V tensor of `num_blocks` blocks of `block_size` tokens,
/// laid out as the attention kernels of the device want them (see `cpu`).
pub struct PagedKvCache {
    pub spec: KvCacheSpec,
    pub num_blocks: usize,
    k: Vec<Tensor>,
    v: Vec<Tensor>,
}

impl PagedKvCache {
    /// Allocates the whole cache up front (zeroed: pages are touched only when written on CPU).
    pub fn new(spec: KvCacheSpec, num_blocks: usize, device: &Device) -> Result<Self> {
        if num_blocks == 0 {
            bail!("the KV cache has no blocks");
        }
        let shape = |kind| {
            ops::cache_shape(
                kind,
                num_blocks,
                spec.block_size,
                spec.num_kv_heads,
                spec.head_dim,
            )
        };
        let mut k = Vec::with_capacity(spec.num_layers);
        let mut v = Vec::with_capacity(spec.num_layers);
        for _ in 0..spec.num_layers {
            k.push(zeros(shape(CacheKind::Keys), spec.dtype, device)?);
            v.push(zeros(shape(CacheKind::Values), spec.dtype, device)?);
        }
        Ok(Self {
            spec,
            num_blocks,
            k,
            v,
        })
    }

    pub fn bytes(&self) -> u64 {
        self.spec.bytes_per_block() * self.num_blocks as u64
    }

    pub fn device(&self) -> &Device {
        self.k[0].device()
    }

    /// Fills every layer's K and V with `value` (the self-check poisons caches with NaN so that
    /// a read of a slot nobody wrote shows up).
    pub fn fill(&self, value: f32) -> Result<()> {
        for t in self.k.iter().chain(&self.v) {
            let full = Tensor::full(value, t.shape(), t.device())?.to_dtype(t.dtype())?;
            t.slice_set(&full, 0, 0)?;
        }
        Ok(())
    }

    /// Layer `layer`'s K and V, as f32 on the host (for comparisons).
    pub fn to_host(&self, layer: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        let host = |t: &Tensor| -> Result<Vec<f32>> {
            Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
        };
        Ok((host(&self.k[layer])?, host(&self.v[layer])?))
    }
}

/// A zeroed tensor. On the CPU the memory comes zeroed from the allocator (`calloc`), so the
/// pages of blocks that are never used are never touched: a 4 GiB budget costs nothing until
/// it fills (candle's `zeros` writes every f16 element, seconds of start-up for a large cache).
fn zeros(shape: (usize, usize, usize, usize), dtype: DType, device: &Device) -> Result<Tensor> {
    let n = shape.0 * shape.1 * shape.2 * shape.3;
    Ok(match (device, dtype) {
        (Device::Cpu, DType::F32) => Tensor::from_vec(vec![0f32; n], shape, device)?,
        (Device::Cpu, DType::F16) => {
            Tensor::from_vec(bytemuck::zeroed_vec::<half::f16>(n), shape, device)?
        }
        (Device::Cpu, DType::BF16) => {
            Tensor::from_vec(bytemuck::zeroed_vec::<half::bf16>(n), shape, device)?
        }
        (Device::Cpu, DType::F8E4M3) => {
            Tensor::from_vec(bytemuck::zeroed_vec::<fp8::F8E4M3>(n), shape, device)?
        }
        _ => Tensor::zeros(shape, dtype, device)?,
    })
}

/// Where each token of a flattened batch sits: its sequence, its cache slot, and the blocks
/// holding its sequence's earlier K/V.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BatchLayout {
    /// Start of each sequence's tokens in the batch, then the total (`num_seqs + 1` entries).
    pub query_start: Vec<u32>,
    /// K/V length of each sequence once this step's tokens are written.
    pub context_lens: Vec<u32>,
    /// Each sequence's block table, padded to `max_blocks` entries.
    pub block_tables: Vec<u32>,
    pub max_blocks: usize,
    /// Cache slot (`block * block_size + offset`) of each token.
    pub slot_mapping: Vec<u32>,
    /// Sequence index of each token.
    pub token_seq: Vec<u32>,
}

/// One sequence of a synthetic batch: `ctx` tokens of K/V once the step is written, the last
/// `queries` of them queried in the step.
#[derive(Clone, Copy, Debug)]
pub struct SeqShape {
    pub ctx: usize,
    pub queries: usize,
}

impl SeqShape {
    /// Blocks of `block_size` tokens that the contexts of `seqs` fill.
    pub fn blocks(seqs: &[SeqShape], block_size: usize) -> usize {
        seqs.iter().map(|s| s.ctx.div_ceil(block_size)).sum()
    }
}

impl BatchLayout {
    /// A layout over `num_blocks` blocks giving each sequence blocks drawn at random (seeded),
    /// for the step's queries (`only_queries`) or the whole history. The same seed gives the same
    /// blocks, so a history written with one layout is read by the other. For tests and the GPU
    /// self-check.
    pub fn scattered(
        seqs: &[SeqShape],
        block_size: usize,
        num_blocks: usize,
        seed: u64,
        only_queries: bool,
    ) -> Self {
        let mut rng = crate::util::Rng64::new(seed);
        let mut free: Vec<u32> = (0..num_blocks as u32).collect();
        for i in (1..free.len()).rev() {
            free.swap(i, rng.range_inclusive(0, i));
        }
        let max_blocks = seqs
            .iter()
            .map(|c| c.ctx.div_ceil(block_size))
            .max()
            .unwrap_or(0);
        let mut lay = BatchLayout {
            max_blocks,
            query_start: vec![0],
            ..Default::default()
        };
        for (s, c) in seqs.iter().enumerate() {
            let blocks: Vec<u32> = (0..c.ctx.div_ceil(block_size))
                .map(|_| free.pop().unwrap_or(0))
                .collect();
            let first = if only_queries { c.ctx - c.queries } else { 0 };
            for p in first..c.ctx {
                lay.slot_mapping
                    .push(blocks[p / block_size] * block_size as u32 + (p % block_size) as u32);
                lay.token_seq.push(s as u32);
            }
            lay.query_start.push(lay.slot_mapping.len() as u32);
            lay.context_lens.push(c.ctx as u32);
            let mut row = blocks;
            row.resize(max_blocks, 0);
            lay.block_tables.extend(row);
        }
        lay
    }

    pub fn num_tokens(&self) -> usize {
        self.slot_mapping.len()
    }

    pub fn num_seqs(&self) -> usize {
        self.context_lens.len()
    }

    /// Position of token `t` within its sequence.
    pub fn position(&self, t: usize) -> usize {
        let s = self.token_seq[t] as usize;
        let (start, end) = (self.query_start[s], self.query_start[s + 1]);
        (self.context_lens[s] - (end - start) + (t as u32 - start)) as usize
    }

    /// Checks the layout against a cache of `num_blocks` blocks of `block_size` tokens, so the
    /// kernels can index without bounds surprises.
    pub fn validate(&self, num_blocks: usize, block_size: usize) -> Result<()> {
        let n = self.num_seqs();
        if self.query_start.len() != n + 1 || self.query_start.first() != Some(&0) {
            bail!("batch layout: query_start must have num_seqs + 1 entries starting at 0");
        }
        if *self.query_start.last().unwrap_or(&0) as usize != self.num_tokens()
            || self.token_seq.len() != self.num_tokens()
            || self.block_tables.len() != n * self.max_blocks
        {
            bail!("batch layout: inconsistent token or block-table counts");
        }
        for s in 0..n {
            let qlen = self.query_start[s + 1].checked_sub(self.query_start[s]);
            let ctx = self.context_lens[s] as usize;
            match qlen {
                Some(q) if q as usize <= ctx => {}
                _ => bail!("batch layout: sequence {s} has more queries than context"),
            }
            if ctx.div_ceil(block_size) > self.max_blocks {
                bail!("batch layout: sequence {s} needs more blocks than its table holds");
            }
            let row = &self.block_tables[s * self.max_blocks..][..ctx.div_ceil(block_size)];
            if row.iter().any(|&b| b as usize >= num_blocks) {
                bail!("batch layout: sequence {s} refers to a block outside the cache");
            }
        }
        if self
            .slot_mapping
            .iter()
            .any(|&s| s as usize >= num_blocks * block_size)
        {
            bail!("batch layout: a slot lies outside the cache");
        }
        Ok(())
    }
}

/// Attention of one step: the cache, the batch layout (and on CUDA its uploaded plan) and the
/// scale, shared by all layers.
pub struct PagedAttention<'a> {
    cache: &'a PagedKvCache,
    layout: Arc<BatchLayout>,
    meta: StepMeta,
    num_heads: usize,
    scale: f32,
    bf16_prefill: bool,
}

impl<'a> PagedAttention<'a> {
    /// Prepares a step; on CUDA this plans the kernels and uploads the metadata once.
    pub fn new(
        cache: &'a PagedKvCache,
        layout: Arc<BatchLayout>,
        num_heads: usize,
    ) -> Result<Self> {
        Self::with_decode_kernel(cache, layout, num_heads, plan::DecodeKernel::Auto)
    }

    /// [`PagedAttention::new`] with the CUDA decode kernel forced (the CPU has one kernel and
    /// ignores it), so benchmarks and checks can compare the two.
    pub fn with_decode_kernel(
        cache: &'a PagedKvCache,
        layout: Arc<BatchLayout>,
        num_heads: usize,
        #[allow(unused_variables)] decode_kernel: plan::DecodeKernel,
    ) -> Result<Self> {
        let scale = 1.0 / (cache.spec.head_dim as f32).sqrt();
        #[allow(unused_mut)]
        let mut meta = StepMeta::default();
        #[cfg(feature = "cuda")]
        if cache.device().is_cuda() {
            meta.plan = Some(cuda::DevicePlan::upload(
                &layout,
                num_heads,
                cache.spec.num_kv_heads,
                cache.device(),
                decode_kernel,
            )?);
        }
        Ok(Self {
            cache,
            layout,
            meta,
            num_heads,
            scale,
            bf16_prefill: false,
        })
    }

    /// Lets the CPU's prefill attention run its two products (`Q K^T`, `P V`) in bf16 on the
    /// AMX unit, where the process's bf16 products run there: for models with bf16 weights
    /// (`--dtype bf16`), whose projections already round their rows to bf16. Decode attention
    /// and f32 models are unchanged.
    pub fn with_bf16_prefill(mut self, on: bool) -> Self {
        self.bf16_prefill = on;
        self
    }

    pub fn layout(&self) -> &BatchLayout {
        &self.layout
    }

    /// Writes `k`, `v` (`[tokens, kv_heads, head_dim]`) into layer `layer`'s cache slots
    /// (converted to the cache's dtype), then returns attention of `q` (`[tokens, heads,
    /// head_dim]`) over each sequence's cached K/V up to and including the token's own
    /// position, in `q`'s dtype.
    pub fn forward(&self, layer: usize, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let (kc, vc) = (&self.cache.k[layer], &self.cache.v[layer]);
        let kv_dtype = self.cache.spec.dtype;
        // The CPU kernels compute in f32; the CUDA kernels in the cache's type, or in the
        // queries' type over an fp8 cache (whose kernels decode it as they read).
        let compute = match (q.device().is_cpu(), kv_dtype) {
            (true, _) => DType::F32,
            (false, DType::F8E4M3) => q.dtype(),
            (false, other) => other,
        };
        timed(Kernel::ReshapeAndCache, || {
            // What write_kv takes: on the CPU the f32 views as they are (it converts as it
            // writes); on CUDA contiguous values of the cache's type, or of the compute type
            // when it encodes to fp8.
            let (k, v) = if q.device().is_cpu() {
                (k.to_dtype(compute)?, v.to_dtype(compute)?)
            } else {
                let written = if kv_dtype == DType::F8E4M3 {
                    compute
                } else {
                    kv_dtype
                };
                (
                    k.to_dtype(written)?.contiguous()?,
                    v.to_dtype(written)?.contiguous()?,
                )
            };
            ops::write_kv(kc, CacheKind::Keys, &k, &self.layout, &self.meta)?;
            ops::write_kv(vc, CacheKind::Values, &v, &self.layout, &self.meta)
        })?;
        let kernel = if self.layout.num_tokens() == self.layout.num_seqs() {
            Kernel::DecodeAttention
        } else {
            Kernel::PrefillAttention
        };
        timed(kernel, || {
            let qc = q.to_dtype(compute)?.contiguous()?;
            let out = ops::attend(
                &qc,
                kc,
                vc,
                &self.layout,
                &self.meta,
                self.num_heads,
                self.scale,
                self.bf16_prefill,
            )?;
            Ok(out.to_dtype(q.dtype())?)
        })
    }
}

#[cfg(test)]
mod tests;

//! The two attention operations as candle custom ops, on whichever device the cache lives:
//! `write_kv` (the step's K or V into their cache slots, in place) and `attend` (attention of
//! the step's queries over the cache). The CPU kernels are in `cpu`, the CUDA launches in `cuda`.

use std::sync::Arc;

use anyhow::Result;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, InplaceOp2, Layout, Shape, Storage, Tensor};
use half::{bf16, f16};

use super::BatchLayout;
use super::cpu;
#[cfg(feature = "cuda")]
use super::cuda::DevicePlan;
use super::fp8::F8E4M3;

/// Which of the two caches a tensor is; they are laid out differently.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheKind {
    Keys,
    Values,
}

/// The cache shape of `kind`, on every device:
/// - K: `[num_blocks, kv_heads, head_dim, block_size]`: a block's keys transposed, so the scores
///   of a query against a block are one vector multiply-add per dimension (CPU), and consecutive
///   threads read consecutive keys (CUDA);
/// - V: `[num_blocks, kv_heads, block_size, head_dim]`: value rows contiguous per block and head.
pub fn cache_shape(
    kind: CacheKind,
    num_blocks: usize,
    block_size: usize,
    kv_heads: usize,
    head_dim: usize,
) -> (usize, usize, usize, usize) {
    match kind {
        CacheKind::Keys => (num_blocks, kv_heads, head_dim, block_size),
        CacheKind::Values => (num_blocks, kv_heads, block_size, head_dim),
    }
}

/// The step's metadata for the device: nothing extra on the CPU, uploaded tensors on CUDA.
#[derive(Clone, Default)]
pub struct StepMeta {
    #[cfg(feature = "cuda")]
    pub plan: Option<Arc<DevicePlan>>,
}

/// Writes `src` (`[tokens, kv_heads, head_dim]`) into `cache` at the layout's slots, converting
/// as it writes: `src` is f32 on the CPU (each token's values contiguous, tokens any distance
/// apart), on CUDA contiguous and of the cache's dtype, or the queries' for an fp8 cache.
pub fn write_kv(
    cache: &Tensor,
    kind: CacheKind,
    src: &Tensor,
    layout: &Arc<BatchLayout>,
    meta: &StepMeta,
) -> Result<()> {
    cache.inplace_op2(
        src,
        &WriteKv {
            kind,
            layout: layout.clone(),
            meta: meta.clone(),
        },
    )?;
    Ok(())
}

struct WriteKv {
    kind: CacheKind,
    layout: Arc<BatchLayout>,
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    meta: StepMeta,
}

impl InplaceOp2 for WriteKv {
    fn name(&self) -> &'static str {
        "write-kv"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        let (kind, lay) = (self.kind, &*self.layout);
        match (s1, s2) {
            (CpuStorage::F32(c), CpuStorage::F32(s)) => {
                cpu::write_kv(kind, lay, c, l1, (s, l2), cpu::copy_f32)
            }
            (CpuStorage::F16(c), CpuStorage::F32(s)) => {
                cpu::write_kv(kind, lay, c, l1, (s, l2), cpu::to_f16)
            }
            (CpuStorage::BF16(c), CpuStorage::F32(s)) => {
                cpu::write_kv(kind, lay, c, l1, (s, l2), cpu::to_bf16)
            }
            (CpuStorage::F8E4M3(c), CpuStorage::F32(s)) => {
                cpu::write_kv(kind, lay, c, l1, (s, l2), cpu::to_fp8)
            }
            (c, s) => candle_core::bail!(
                "write_kv: unsupported dtypes cache {:?}, input {:?}",
                c.dtype(),
                s.dtype()
            ),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &mut candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        let plan = self.meta.plan.as_ref().ok_or_else(|| {
            candle_core::Error::Msg("write_kv on CUDA without a device plan".into())
        })?;
        super::cuda::write_kv(self.kind, plan, s1, l1, s2, l2)
    }
}

/// Attention of `q` (`[tokens, heads, head_dim]`) over the paged K/V caches. On the CPU `q`
/// must be f32 (the output is f32); on CUDA it has the cache's dtype (so has the output).
/// `bf16_prefill`: on the CPU, prefill tiles may run their two products in bf16 on AMX
/// (`cpu::attend`).
#[allow(clippy::too_many_arguments)]
pub fn attend(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    layout: &Arc<BatchLayout>,
    meta: &StepMeta,
    num_heads: usize,
    scale: f32,
    bf16_prefill: bool,
) -> Result<Tensor> {
    Ok(q.apply_op1_no_bwd(&Attend {
        k_cache: k_cache.clone(),
        v_cache: v_cache.clone(),
        layout: layout.clone(),
        meta: meta.clone(),
        num_heads,
        scale,
        bf16_prefill,
    })?)
}

struct Attend {
    k_cache: Tensor,
    v_cache: Tensor,
    layout: Arc<BatchLayout>,
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    meta: StepMeta,
    num_heads: usize,
    scale: f32,
    bf16_prefill: bool,
}

impl CustomOp1 for Attend {
    fn name(&self) -> &'static str {
        "paged-attention"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(q) = s else {
            candle_core::bail!("attend: queries must be f32, got {:?}", s.dtype());
        };
        let (kst, kl) = self.k_cache.storage_and_layout();
        let (vst, vl) = self.v_cache.storage_and_layout();
        let (Storage::Cpu(kst), Storage::Cpu(vst)) = (&*kst, &*vst) else {
            candle_core::bail!("attend: the KV cache is not on the CPU");
        };
        let (k, v, lay) = ((kst, kl), (vst, vl), &*self.layout);
        let how = (self.num_heads, self.scale, self.bf16_prefill);
        match self.k_cache.dtype() {
            DType::F32 => cpu::attend::<f32>(q, l, k, v, lay, how),
            DType::F16 => cpu::attend::<f16>(q, l, k, v, lay, how),
            DType::BF16 => cpu::attend::<bf16>(q, l, k, v, lay, how),
            DType::F8E4M3 => cpu::attend::<F8E4M3>(q, l, k, v, lay, how),
            other => candle_core::bail!("attend: unsupported KV cache dtype {other:?}"),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let plan = self.meta.plan.as_ref().ok_or_else(|| {
            candle_core::Error::Msg("attention on CUDA without a device plan".into())
        })?;
        super::cuda::attend(
            s,
            l,
            &self.k_cache,
            &self.v_cache,
            plan,
            self.num_heads,
            self.scale,
        )
    }
}

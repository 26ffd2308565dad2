//! CUDA launches of `kernels/attention.cu`: the step's metadata uploaded once per step
//! ([`DevicePlan`]), then per layer `write_kv` twice and the attention kernels of the plan.

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute_enum;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{CudaStorage, DType, Device, Layout, Shape, Storage, Tensor};
use half::{bf16, f16};

use super::BatchLayout;
use super::ops::CacheKind;
use super::plan::{self, LaunchPlan, SPLIT_PART};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/attention.ptx"));
const MODULE: &str = "offline_bench_attention";
const THREADS: u32 = 256;

/// Lets `func` use `smem` bytes of dynamic shared memory (more than the default 48 KiB needs
/// the attribute set).
fn allow_smem(
    func: &candle_core::cuda_backend::cudarc::driver::CudaFunction,
    smem: u32,
) -> candle_core::Result<()> {
    func.set_attribute(
        CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        smem as i32,
    )
    .w()
}

/// A step's metadata on the device, shared by every layer.
pub struct DevicePlan {
    pub plan: LaunchPlan,
    slots: Tensor,
    query_start: Tensor,
    context_lens: Tensor,
    block_tables: Tensor,
    token_seq: Tensor,
    tiles: Option<Tensor>,
    split_tokens: Option<Tensor>,
    max_blocks: usize,
}

impl DevicePlan {
    /// Plans the step and uploads its metadata to `device`.
    pub fn upload(
        layout: &BatchLayout,
        heads: usize,
        kv_heads: usize,
        device: &Device,
        decode_kernel: plan::DecodeKernel,
    ) -> anyhow::Result<Arc<Self>> {
        let Device::Cuda(dev) = device else {
            anyhow::bail!("a device plan needs a CUDA device");
        };
        let sm_count = crate::gpu::multiprocessors(dev)?;
        let plan = plan::plan_with(
            layout,
            heads / kv_heads.max(1),
            kv_heads,
            sm_count,
            decode_kernel,
        );
        let up = |v: &[u32]| Tensor::from_slice(v, v.len(), device);
        let flat_tiles: Vec<u32> = plan.tiles.iter().flatten().copied().collect();
        Ok(Arc::new(Self {
            slots: up(&layout.slot_mapping)?,
            query_start: up(&layout.query_start)?,
            context_lens: up(&layout.context_lens)?,
            block_tables: up(&layout.block_tables)?,
            token_seq: up(&layout.token_seq)?,
            tiles: (!flat_tiles.is_empty())
                .then(|| up(&flat_tiles))
                .transpose()?,
            split_tokens: (!plan.split_tokens.is_empty())
                .then(|| up(&plan.split_tokens))
                .transpose()?,
            max_blocks: layout.max_blocks.max(1),
            plan,
        }))
    }
}

/// A `u32` metadata tensor's device slice, with its storage guard alive.
macro_rules! u32_slice {
    ($guard:ident, $t:expr) => {
        let $guard = $t.storage_and_layout();
        let $guard = match &*$guard.0 {
            Storage::Cuda(s) => s.as_cuda_slice::<u32>()?.slice($guard.1.start_offset()..),
            _ => candle_core::bail!("attention metadata is not on the CUDA device"),
        };
    };
}

/// Writes `src` (`[tokens, kv_heads, d]`) into the cache at the plan's slots.
pub fn write_kv(
    kind: CacheKind,
    plan: &DevicePlan,
    cache: &mut CudaStorage,
    cl: &Layout,
    src: &CudaStorage,
    sl: &Layout,
) -> candle_core::Result<()> {
    match cache.dtype() {
        DType::F32 => write_kv_t::<f32>(kind, plan, cache, cl, src, sl),
        DType::F16 => write_kv_t::<f16>(kind, plan, cache, cl, src, sl),
        DType::BF16 => write_kv_t::<bf16>(kind, plan, cache, cl, src, sl),
        other => candle_core::bail!("write_kv: no CUDA kernel for {other:?}"),
    }
}

fn write_kv_t<T: CudaDType + DeviceRepr + candle_core::WithDType>(
    kind: CacheKind,
    plan: &DevicePlan,
    cache: &mut CudaStorage,
    cl: &Layout,
    src: &CudaStorage,
    sl: &Layout,
) -> candle_core::Result<()> {
    let &[_, kv_heads, a, b] = cl.dims() else {
        candle_core::bail!("write_kv: the cache must be 4-d, got {:?}", cl.dims());
    };
    let (d, bs, values) = match kind {
        CacheKind::Keys => (a, b, 0i32),
        CacheKind::Values => (b, a, 1i32),
    };
    if cl.start_offset() != 0 || !cl.is_contiguous() || !sl.is_contiguous() {
        candle_core::bail!("write_kv: the cache and the input must be contiguous");
    }
    let n = sl.shape().elem_count();
    let tokens = n / (kv_heads * d).max(1);
    if tokens * kv_heads * d != n || tokens != plan.slots.dim(0)? {
        candle_core::bail!("write_kv: {n} values do not match the step's slots");
    }
    if n == 0 {
        return Ok(());
    }
    let dev = cache.device().clone();
    let func = dev.get_or_load_custom_func(
        &format!("write_kv_{}", crate::gpu::suffix(T::DTYPE)?),
        MODULE,
        PTX,
    )?;
    u32_slice!(slots, plan.slots);
    let src = src.as_cuda_slice::<T>()?.slice(sl.start_offset()..);
    let cache = cache.as_cuda_slice_mut::<T>()?;
    let mut args = func.builder();
    args.arg(&src);
    args.arg(cache);
    args.arg(&slots);
    candle_core::builder_arg!(
        args,
        tokens as i32,
        kv_heads as i32,
        d as i32,
        bs as i32,
        values
    );
    // SAFETY: the kernel reads `tokens * kv_heads * d` inputs and slots, and writes cache slots
    // that the engine allocated within the cache (checked by BatchLayout::validate).
    unsafe { args.launch(LaunchConfig::for_num_elems(n as u32)) }.w()?;
    Ok(())
}

/// Attention of `q` (`[tokens, heads, d]`, the cache's dtype) over the caches, per the plan.
pub fn attend(
    q: &CudaStorage,
    ql: &Layout,
    k_cache: &Tensor,
    v_cache: &Tensor,
    plan: &DevicePlan,
    heads: usize,
    scale: f32,
) -> candle_core::Result<(CudaStorage, Shape)> {
    match q.dtype() {
        DType::F32 => attend_t::<f32>(q, ql, k_cache, v_cache, plan, heads, scale),
        DType::F16 => attend_t::<f16>(q, ql, k_cache, v_cache, plan, heads, scale),
        DType::BF16 => attend_t::<bf16>(q, ql, k_cache, v_cache, plan, heads, scale),
        other => candle_core::bail!("attend: no CUDA kernel for {other:?}"),
    }
}

fn attend_t<T: CudaDType + DeviceRepr + candle_core::WithDType>(
    q: &CudaStorage,
    ql: &Layout,
    k_cache: &Tensor,
    v_cache: &Tensor,
    plan: &DevicePlan,
    heads: usize,
    scale: f32,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let dev = q.device().clone();
    let (kst, kl) = k_cache.storage_and_layout();
    let (vst, vl) = v_cache.storage_and_layout();
    let (Storage::Cuda(kst), Storage::Cuda(vst)) = (&*kst, &*vst) else {
        candle_core::bail!("attend: the KV cache is not on the CUDA device");
    };
    let &[_, kv_heads, d, bs] = kl.dims() else {
        candle_core::bail!("attend: K cache must be 4-d, got {:?}", kl.dims());
    };
    if !d.is_multiple_of(32) || bs > 32 || !heads.is_multiple_of(kv_heads) || !ql.is_contiguous() {
        candle_core::bail!(
            "attend: the CUDA kernels need head_dim % 32 == 0 (got {d}), block_size <= 32 (got {bs}), heads a multiple of KV heads, contiguous queries"
        );
    }
    let tokens = ql.shape().elem_count() / (heads * d);
    let sfx = crate::gpu::suffix(T::DTYPE)?;
    let q = q.as_cuda_slice::<T>()?.slice(ql.start_offset()..);
    let kc = kst.as_cuda_slice::<T>()?.slice(kl.start_offset()..);
    let vc = vst.as_cuda_slice::<T>()?.slice(vl.start_offset()..);
    // Every output row is written by exactly one tile or split token (the plan covers each
    // token once).
    let mut out = crate::gpu::output_buffer::<T>(&dev, tokens * heads * d)?;
    u32_slice!(query_start, plan.query_start);
    u32_slice!(context_lens, plan.context_lens);
    u32_slice!(block_tables, plan.block_tables);
    let p = &plan.plan;
    let (max_blocks, kv, dd, bsz) = (plan.max_blocks as i32, kv_heads as i32, d as i32, bs as i32);
    if let Some(tiles) = &plan.tiles {
        u32_slice!(tiles, tiles);
        let smem = plan::shared_bytes(p.max_rows, d, bs) as u32;
        let func = dev.get_or_load_custom_func(&format!("attention_tiles_{sfx}"), MODULE, PTX)?;
        allow_smem(&func, smem)?;
        let mut args = func.builder();
        args.arg(&q);
        args.arg(&kc);
        args.arg(&vc);
        args.arg(&mut out);
        args.arg(&tiles);
        args.arg(&query_start);
        args.arg(&context_lens);
        args.arg(&block_tables);
        candle_core::builder_arg!(
            args,
            max_blocks,
            heads as i32,
            kv,
            dd,
            bsz,
            scale,
            p.max_rows as i32
        );
        let cfg = LaunchConfig {
            grid_dim: (p.tiles.len() as u32, kv_heads as u32, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: smem,
        };
        // SAFETY: tiles index tokens and sequences of this step; block tables hold valid blocks.
        unsafe { args.launch(cfg) }.w()?;
    }
    if let Some(split) = &plan.split_tokens {
        let n = p.split_tokens.len();
        let group = heads / kv_heads;
        let rows = n * heads * p.parts;
        let part_acc: CudaSlice<f32> = dev.alloc_zeros(rows * d)?;
        let part_m: CudaSlice<f32> = dev.alloc_zeros(rows)?;
        let part_l: CudaSlice<f32> = dev.alloc_zeros(rows)?;
        u32_slice!(split, split);
        u32_slice!(token_seq, plan.token_seq);
        let smem = plan::shared_bytes(group, d, bs) as u32;
        let func = dev.get_or_load_custom_func(&format!("attention_split_{sfx}"), MODULE, PTX)?;
        allow_smem(&func, smem)?;
        let mut args = func.builder();
        args.arg(&q);
        args.arg(&kc);
        args.arg(&vc);
        args.arg(&part_acc);
        args.arg(&part_m);
        args.arg(&part_l);
        args.arg(&split);
        args.arg(&token_seq);
        args.arg(&query_start);
        args.arg(&context_lens);
        args.arg(&block_tables);
        candle_core::builder_arg!(
            args,
            max_blocks,
            heads as i32,
            kv,
            dd,
            bsz,
            scale,
            SPLIT_PART as i32
        );
        let cfg = LaunchConfig {
            grid_dim: (n as u32, kv_heads as u32, p.parts as u32),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: smem,
        };
        // SAFETY: as above; partial buffers hold n x heads x parts rows.
        unsafe { args.launch(cfg) }.w()?;

        let func = dev.get_or_load_custom_func(&format!("attention_reduce_{sfx}"), MODULE, PTX)?;
        let mut args = func.builder();
        args.arg(&part_acc);
        args.arg(&part_m);
        args.arg(&part_l);
        args.arg(&mut out);
        args.arg(&split);
        candle_core::builder_arg!(args, heads as i32, dd, p.parts as i32);
        let cfg = LaunchConfig {
            grid_dim: (n as u32, heads as u32, 1),
            block_dim: (d as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: reads the partials written above, writes one output row per (token, head).
        unsafe { args.launch(cfg) }.w()?;
    }
    Ok((CudaStorage::wrap_cuda_slice(out, dev), ql.shape().clone()))
}

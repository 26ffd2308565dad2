//! CUDA launches of `kernels/attention.cu`: the step's metadata uploaded once per step
//! ([`DevicePlan`]), then per layer `write_kv` twice and the attention kernels of the plan.

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute_enum;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, DeviceRepr, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{CudaStorage, DType, Device, Layout, Shape, Storage, Tensor};
use half::{bf16, f16};

use super::BatchLayout;
use super::fp8::F8E4M3;
use super::launch::{self, Buf, Dtypes, Geometry};
use super::ops::CacheKind;
use super::plan::{self, LaunchPlan};
use crate::launch::Launch;
use crate::launch::cuda::{missing, push_args};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/attention.ptx"));
const MODULE: &str = "offline_bench_attention";

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
        let flat_tiles = plan.flat_tiles();
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

/// A `u32` metadata tensor's device slice, from its `storage_and_layout`.
fn u32_view<'a>(storage: &'a Storage, layout: &Layout) -> candle_core::Result<CudaView<'a, u32>> {
    match storage {
        Storage::Cuda(s) => Ok(s.as_cuda_slice::<u32>()?.slice(layout.start_offset()..)),
        _ => candle_core::bail!("attention metadata is not on the CUDA device"),
    }
}

/// Lets `func` use its launch's dynamic shared memory (more than the default 48 KiB needs the
/// attribute set).
fn allow_launch_smem(
    func: &candle_core::cuda_backend::cudarc::driver::CudaFunction,
    l: &Launch<Buf>,
) -> candle_core::Result<()> {
    if l.shared_bytes > 0 {
        func.set_attribute(
            CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            l.shared_bytes as i32,
        )
        .w()?;
    }
    Ok(())
}

fn geometry(plan: &DevicePlan, kv_heads: usize, d: usize, bs: usize, heads: usize) -> Geometry {
    Geometry {
        heads,
        kv_heads,
        head_dim: d,
        block_size: bs,
        max_blocks: plan.max_blocks,
    }
}

/// Writes `src` (`[tokens, kv_heads, d]`) into the cache at the plan's slots: `src` has the
/// cache's dtype, or any kernel dtype over an fp8 cache (encoded as it is written).
pub fn write_kv(
    kind: CacheKind,
    plan: &DevicePlan,
    cache: &mut CudaStorage,
    cl: &Layout,
    src: &CudaStorage,
    sl: &Layout,
) -> candle_core::Result<()> {
    let a = (kind, plan, cache, cl, src, sl);
    match (a.2.dtype(), a.4.dtype()) {
        (DType::F32, DType::F32) => write_kv_t::<f32, f32>(a),
        (DType::F16, DType::F16) => write_kv_t::<f16, f16>(a),
        (DType::BF16, DType::BF16) => write_kv_t::<bf16, bf16>(a),
        (DType::F8E4M3, DType::F32) => write_kv_t::<f32, F8E4M3>(a),
        (DType::F8E4M3, DType::F16) => write_kv_t::<f16, F8E4M3>(a),
        (DType::F8E4M3, DType::BF16) => write_kv_t::<bf16, F8E4M3>(a),
        (c, s) => candle_core::bail!("write_kv: no CUDA kernel for a {c:?} cache from {s:?}"),
    }
}

/// An element type the kernels take: on the device, and known to candle by its `DType`.
trait KernelDType: CudaDType + DeviceRepr + candle_core::WithDType {}
impl<T: CudaDType + DeviceRepr + candle_core::WithDType> KernelDType for T {}

/// The arguments of [`write_kv`].
type WriteArgs<'a> = (
    CacheKind,
    &'a DevicePlan,
    &'a mut CudaStorage,
    &'a Layout,
    &'a CudaStorage,
    &'a Layout,
);

/// [`write_kv`] from `T` inputs into a `C` cache.
fn write_kv_t<T: KernelDType, C: KernelDType>(
    (kind, plan, cache, cl, src, sl): WriteArgs,
) -> candle_core::Result<()> {
    let &[_, kv_heads, a, b] = cl.dims() else {
        candle_core::bail!("write_kv: the cache must be 4-d, got {:?}", cl.dims());
    };
    let (d, bs) = match kind {
        CacheKind::Keys => (a, b),
        CacheKind::Values => (b, a),
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
    let g = geometry(plan, kv_heads, d, bs, kv_heads);
    let dt = Dtypes {
        io: T::DTYPE,
        cache: C::DTYPE,
    };
    let l = launch::write_kv(kind, dt, tokens, &g)
        .map_err(|e| candle_core::Error::Msg(format!("write_kv: {e}")))?;
    let func = dev.get_or_load_custom_func(&l.kernel, MODULE, PTX)?;
    let slots_guard = plan.slots.storage_and_layout();
    let slots = u32_view(&slots_guard.0, slots_guard.1)?;
    let src = src.as_cuda_slice::<T>()?.slice(sl.start_offset()..);
    let mut cache = Some(cache.as_cuda_slice_mut::<C>()?);
    let mut args = func.builder();
    push_args(&mut args, &l, |args, b| {
        match b {
            Buf::Src => args.arg(&src),
            Buf::Slots => args.arg(&slots),
            Buf::Cache => args.arg(cache.take().ok_or_else(|| missing(&l, b))?),
            other => return Err(missing(&l, other)),
        };
        Ok(())
    })?;
    // SAFETY: the kernel reads `tokens * kv_heads * d` inputs and slots, and writes cache slots
    // that the engine allocated within the cache (checked by BatchLayout::validate).
    unsafe { args.launch(l.config()) }.w()?;
    Ok(())
}

/// Attention of `q` (`[tokens, heads, d]`, the cache's dtype, or any kernel dtype over an fp8
/// cache) over the caches, per the plan; the output has `q`'s dtype.
pub fn attend(
    q: &CudaStorage,
    ql: &Layout,
    k_cache: &Tensor,
    v_cache: &Tensor,
    plan: &DevicePlan,
    heads: usize,
    scale: f32,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let a = (q, ql, k_cache, v_cache, plan, heads, scale);
    match (q.dtype(), k_cache.dtype()) {
        (DType::F32, DType::F32) => attend_t::<f32, f32>(a),
        (DType::F16, DType::F16) => attend_t::<f16, f16>(a),
        (DType::BF16, DType::BF16) => attend_t::<bf16, bf16>(a),
        (DType::F32, DType::F8E4M3) => attend_t::<f32, F8E4M3>(a),
        (DType::F16, DType::F8E4M3) => attend_t::<f16, F8E4M3>(a),
        (DType::BF16, DType::F8E4M3) => attend_t::<bf16, F8E4M3>(a),
        (q, c) => candle_core::bail!("attend: no CUDA kernel for {q:?} queries over a {c:?} cache"),
    }
}

/// The arguments of [`attend`].
type AttendArgs<'a> = (
    &'a CudaStorage,
    &'a Layout,
    &'a Tensor,
    &'a Tensor,
    &'a DevicePlan,
    usize,
    f32,
);

/// [`attend`] of `T` queries over a `C` cache.
fn attend_t<T: KernelDType, C: KernelDType>(
    (q, ql, k_cache, v_cache, plan, heads, scale): AttendArgs,
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
    if !ql.is_contiguous() {
        candle_core::bail!("attend: the queries must be contiguous");
    }
    let g = geometry(plan, kv_heads, d, bs, heads);
    let dt = Dtypes {
        io: T::DTYPE,
        cache: C::DTYPE,
    };
    let launches = launch::attend(&plan.plan, dt, &g, scale)
        .map_err(|e| candle_core::Error::Msg(format!("attend: {e}")))?;
    let tokens = ql.shape().elem_count() / (heads * d);
    let q = q.as_cuda_slice::<T>()?.slice(ql.start_offset()..);
    let kc = kst.as_cuda_slice::<C>()?.slice(kl.start_offset()..);
    let vc = vst.as_cuda_slice::<C>()?.slice(vl.start_offset()..);
    let mut out = crate::gpu::output_buffer::<T>(&dev, tokens * heads * d)?;
    let guards = [
        plan.query_start.storage_and_layout(),
        plan.context_lens.storage_and_layout(),
        plan.block_tables.storage_and_layout(),
        plan.token_seq.storage_and_layout(),
    ];
    let [query_start, context_lens, block_tables, token_seq] = [
        u32_view(&guards[0].0, guards[0].1)?,
        u32_view(&guards[1].0, guards[1].1)?,
        u32_view(&guards[2].0, guards[2].1)?,
        u32_view(&guards[3].0, guards[3].1)?,
    ];
    let tiles_guard = plan.tiles.as_ref().map(|t| t.storage_and_layout());
    let tiles = tiles_guard
        .as_ref()
        .map(|g| u32_view(&g.0, g.1))
        .transpose()?;
    let split_guard = plan.split_tokens.as_ref().map(|t| t.storage_and_layout());
    let split = split_guard
        .as_ref()
        .map(|g| u32_view(&g.0, g.1))
        .transpose()?;
    let rows = launch::partial_rows(&plan.plan, heads);
    let partials: Option<[CudaSlice<f32>; 3]> = if rows > 0 {
        Some([
            dev.alloc_zeros(rows * d)?,
            dev.alloc_zeros(rows)?,
            dev.alloc_zeros(rows)?,
        ])
    } else {
        None
    };
    let part = |i: usize, b: Buf, l: &Launch<Buf>| {
        partials
            .as_ref()
            .map(|p| &p[i])
            .ok_or_else(|| missing(l, b))
    };
    for l in &launches {
        let func = dev.get_or_load_custom_func(&l.kernel, MODULE, PTX)?;
        allow_launch_smem(&func, l)?;
        let mut out_arg = Some(&mut out);
        let mut args = func.builder();
        push_args(&mut args, l, |args, b| {
            match b {
                Buf::Q => args.arg(&q),
                Buf::KCache => args.arg(&kc),
                Buf::VCache => args.arg(&vc),
                Buf::Out => args.arg(out_arg.take().ok_or_else(|| missing(l, b))?),
                Buf::QueryStart => args.arg(&query_start),
                Buf::ContextLens => args.arg(&context_lens),
                Buf::BlockTables => args.arg(&block_tables),
                Buf::TokenSeq => args.arg(&token_seq),
                Buf::Tiles => args.arg(tiles.as_ref().ok_or_else(|| missing(l, b))?),
                Buf::SplitTokens => args.arg(split.as_ref().ok_or_else(|| missing(l, b))?),
                Buf::PartAcc => args.arg(part(0, b, l)?),
                Buf::PartM => args.arg(part(1, b, l)?),
                Buf::PartL => args.arg(part(2, b, l)?),
                Buf::Src | Buf::Cache | Buf::Slots => return Err(missing(l, b)),
            };
            Ok(())
        })?;
        // SAFETY: the launch comes from `launch::attend` for this plan: tiles and split tokens
        // index tokens and sequences of this step, block tables hold valid blocks
        // (BatchLayout::validate), the partial buffers hold `partial_rows` rows, and every
        // output row is written by exactly one tile or split token.
        unsafe { args.launch(l.config()) }.w()?;
    }
    Ok((CudaStorage::wrap_cuda_slice(out, dev), ql.shape().clone()))
}

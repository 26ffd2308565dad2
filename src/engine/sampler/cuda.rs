//! The CUDA launch of `kernels/sampling.cu`: one block per row, ids left on the device.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::WrapErr;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::{CudaStorage, DType, Layout, Shape};

use super::SamplingParams;

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/sampling.ptx"));
/// Threads per row: `SAMPLE_THREADS` in the kernel.
const THREADS: u32 = 1024;

pub fn sample(
    p: &SamplingParams,
    (ls, ll): (&CudaStorage, &Layout),
    (us, ul): (&CudaStorage, &Layout),
    rows: usize,
    vocab: usize,
) -> candle_core::Result<(CudaStorage, Shape)> {
    if ls.dtype() != DType::F32 || us.dtype() != DType::F32 {
        candle_core::bail!("sample: logits and uniforms must be f32");
    }
    if !ll.is_contiguous() || !ul.is_contiguous() {
        candle_core::bail!("sample: logits and uniforms must be contiguous");
    }
    let dev = ls.device().clone();
    let func = dev.get_or_load_custom_func("sample_rows", "offline_bench_sampling", PTX)?;
    let logits = ls.as_cuda_slice::<f32>()?.slice(ll.start_offset()..);
    let uniforms = us.as_cuda_slice::<f32>()?.slice(ul.start_offset()..);
    let mut ids = crate::gpu::output_buffer::<u32>(&dev, rows)?;
    if rows > 0 {
        let mut args = func.builder();
        args.arg(&logits);
        args.arg(&uniforms);
        args.arg(&mut ids);
        candle_core::builder_arg!(
            args,
            vocab as i32,
            1.0f32 / p.temperature,
            p.top_k.min(i32::MAX as usize) as i32,
            p.top_p
        );
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: block r reads row r of the logits (vocab values) and uniform r, and writes
        // id r.
        unsafe { args.launch(cfg) }.w()?;
    }
    Ok((CudaStorage::wrap_cuda_slice(ids, dev), Shape::from(rows)))
}

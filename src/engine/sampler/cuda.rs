//! The CUDA launch of `kernels/sampling.cu`: one block per row, ids left on the device.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::WrapErr;
use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
use candle_core::{CudaStorage, DType, Layout, Shape};

use super::{SampleBuf, SamplingParams, sample_launch};
use crate::launch::cuda::{missing, push_args};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/sampling.ptx"));

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
    let l = sample_launch(p, rows, vocab);
    let func = dev.get_or_load_custom_func(&l.kernel, "offline_bench_sampling", PTX)?;
    let logits = ls.as_cuda_slice::<f32>()?.slice(ll.start_offset()..);
    let uniforms = us.as_cuda_slice::<f32>()?.slice(ul.start_offset()..);
    let mut ids = crate::gpu::output_buffer::<u32>(&dev, rows)?;
    if rows > 0 {
        let mut ids_arg = Some(&mut ids);
        let mut args = func.builder();
        push_args(&mut args, &l, |args, b| {
            match b {
                SampleBuf::Logits => args.arg(&logits),
                SampleBuf::Uniforms => args.arg(&uniforms),
                SampleBuf::Ids => args.arg(ids_arg.take().ok_or_else(|| missing(&l, b))?),
            };
            Ok(())
        })?;
        // SAFETY: block r reads row r of the logits (vocab values) and uniform r, and writes
        // id r.
        unsafe { args.launch(l.config()) }.w()?;
    }
    Ok((CudaStorage::wrap_cuda_slice(ids, dev), Shape::from(rows)))
}

//! Fused operations the forward pass needs and candle lacks.

use anyhow::Result;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor, WithDType};
use half::{bf16, f16};
use rayon::prelude::*;

use crate::fastmath;
use crate::launch::{Arg, Launch};
use crate::util::contiguous;

/// `silu(x[:, :n]) * x[:, n:]` for `x` of shape `[rows, 2n]`: the gated MLP activation over the
/// fused gate/up projection, in one pass (candle would make three: silu, narrow-copy, mul).
pub fn silu_mul(gate_up: &Tensor) -> Result<Tensor> {
    Ok(gate_up.apply_op1_no_bwd(&SiluMul)?)
}

struct SiluMul;

/// The buffers of the `silu_mul` kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SiluMulBuf {
    /// `[rows, 2n]`: gate, then up.
    X,
    /// `[rows, n]`.
    Out,
}

/// The CUDA launch of [`silu_mul`] (`dtype`: the kernel suffix) over `rows` rows of `n` outputs.
pub fn silu_mul_launch(dtype: &str, rows: usize, n: usize) -> Launch<SiluMulBuf> {
    Launch::elementwise(
        format!("silu_mul_{dtype}"),
        rows * n,
        vec![
            Arg::Buf(SiluMulBuf::X),
            Arg::Buf(SiluMulBuf::Out),
            Arg::int(rows),
            Arg::int(n),
        ],
    )
}

fn silu_mul_rows<T: WithDType>(
    x: &[T],
    cols: usize,
    to: impl Fn(T) -> f32 + Sync,
    from: impl Fn(f32) -> T + Sync,
) -> Vec<T> {
    let n = cols / 2;
    let rows = x.len() / cols;
    // Written once, never zeroed first: a prefill's output is up to 100 MB per layer, taken
    // from the activation cache, where zeroing is a `memset` (docs/cpu-performance.md).
    let mut out = Vec::with_capacity(rows * n);
    out.spare_capacity_mut()[..rows * n]
        .par_chunks_mut(n)
        .zip(x.par_chunks(cols))
        .for_each(|(o, row)| {
            let (gate, up) = row.split_at(n);
            for ((o, &g), &u) in o.iter_mut().zip(gate).zip(up) {
                o.write(from(fastmath::silu(to(g)) * to(u)));
            }
        });
    // SAFETY: the `rows` chunks of `n` cover the `rows * n` elements, and each chunk's loop
    // wrote all `n` of its own (`gate` and `up` are `n` long).
    unsafe { out.set_len(rows * n) };
    out
}

impl CustomOp1 for SiluMul {
    fn name(&self) -> &'static str {
        "silu-mul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, cols) = l.shape().dims2()?;
        if cols % 2 != 0 {
            candle_core::bail!("silu_mul: odd number of columns {cols}");
        }
        let input = "silu_mul: input";
        let storage = match s {
            CpuStorage::F32(x) => {
                CpuStorage::F32(silu_mul_rows(contiguous(x, l, input)?, cols, |v| v, |v| v))
            }
            CpuStorage::F16(x) => CpuStorage::F16(silu_mul_rows(
                contiguous(x, l, input)?,
                cols,
                f16::to_f32,
                f16::from_f32,
            )),
            CpuStorage::BF16(x) => CpuStorage::BF16(silu_mul_rows(
                contiguous(x, l, input)?,
                cols,
                bf16::to_f32,
                bf16::from_f32,
            )),
            other => candle_core::bail!("silu_mul: unsupported dtype {:?}", other.dtype()),
        };
        Ok((storage, Shape::from((rows, cols / 2))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        match s.dtype() {
            candle_core::DType::F32 => silu_mul_cuda::<f32>(s, l),
            candle_core::DType::F16 => silu_mul_cuda::<f16>(s, l),
            candle_core::DType::BF16 => silu_mul_cuda::<bf16>(s, l),
            other => candle_core::bail!("silu_mul: no CUDA kernel for {other:?}"),
        }
    }
}

#[cfg(feature = "cuda")]
fn silu_mul_cuda<T>(
    s: &candle_core::CudaStorage,
    l: &Layout,
) -> candle_core::Result<(candle_core::CudaStorage, Shape)>
where
    T: candle_core::cuda_backend::CudaDType
        + candle_core::cuda_backend::cudarc::driver::DeviceRepr
        + WithDType,
{
    use crate::launch::cuda::missing;
    use candle_core::cuda_backend::WrapErr;
    use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/activation.ptx"));
    let (rows, cols) = l.shape().dims2()?;
    if !cols.is_multiple_of(2) || !l.is_contiguous() {
        candle_core::bail!("silu_mul: needs a contiguous input with an even number of columns");
    }
    let n = cols / 2;
    let dev = s.device().clone();
    let launch = silu_mul_launch(crate::launch::suffix(T::DTYPE)?, rows, n);
    let func = dev.get_or_load_custom_func(&launch.kernel, "offline_bench_activation", PTX)?;
    let x = s.as_cuda_slice::<T>()?.slice(l.start_offset()..);
    let mut out = crate::gpu::output_buffer::<T>(&dev, rows * n)?;
    if rows * n > 0 {
        let mut out_arg = Some(&mut out);
        let mut args = func.builder();
        crate::launch::cuda::push_args(&mut args, &launch, |args, b| {
            match b {
                SiluMulBuf::X => args.arg(&x),
                SiluMulBuf::Out => args.arg(out_arg.take().ok_or_else(|| missing(&launch, b))?),
            };
            Ok(())
        })?;
        // SAFETY: the kernel reads rows x 2n inputs and writes rows x n outputs.
        unsafe { args.launch(launch.config()) }.w()?;
    }
    Ok((
        candle_core::CudaStorage::wrap_cuda_slice(out, dev),
        Shape::from((rows, n)),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn matches_candle_composition() -> Result<()> {
        let v = crate::util::Rng64::new(2).uniform_f32(70, 6.0);
        let x = Tensor::from_vec(v, (7, 10), &Device::Cpu)?;
        let want = (candle_nn::ops::silu(&x.narrow(1, 0, 5)?)? * x.narrow(1, 5, 5)?)?;
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let got = silu_mul(&x.to_dtype(dtype)?)?.to_dtype(DType::F32)?;
            // Relative error: three roundings (two inputs, the output) in the half types.
            let err = ((got - &want)?.abs()? / (want.abs()? + 1.0)?)?
                .max_all()?
                .to_scalar::<f32>()?;
            let tol = match dtype {
                DType::F32 => 1e-5,
                DType::F16 => 3e-3,
                _ => 3e-2,
            };
            assert!(err < tol, "{dtype:?}: {err}");
        }
        Ok(())
    }
}

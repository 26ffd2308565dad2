//! The residual add fused with the RMSNorm that follows it: `s = x + delta` (rounded to the
//! activations' dtype, as the unfused add would), then `rms_norm(s) * w`, in one pass over the
//! rows instead of two (candle's add, then its norm). Every layer has two of them, so on the GPU
//! this halves those launches and the reads of the residual stream.

use std::mem::MaybeUninit;

use anyhow::Result;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor, WithDType};
use half::{bf16, f16};
use rayon::prelude::*;

use crate::launch::{Arg, Launch};

/// `(x + delta, rms_norm(x + delta) * w)` for the forward pass: the fused kernel on both
/// devices. On the CPU it once lost to candle's add then norm (2026-12-04: 771-777 against
/// 720-744 ms over a 32 x 512 prefill's 122 calls) while it zero-filled its output first; written
/// into memory not zeroed first it halves them (2026-12-06, docs/cpu-performance.md).
pub fn residual_rms_norm(
    x: &Tensor,
    delta: &Tensor,
    w: &Tensor,
    eps: f32,
) -> Result<(Tensor, Tensor)> {
    add_rms_norm(x, delta, w, eps)
}

/// `(x + delta, rms_norm(x + delta) * w)` for `x`, `delta` `[rows, n]` and `w` `[n]`, in one
/// op on any device (on the CPU it is the self-check's reference for the CUDA kernel).
pub fn add_rms_norm(x: &Tensor, delta: &Tensor, w: &Tensor, eps: f32) -> Result<(Tensor, Tensor)> {
    // One buffer holds both results: [2, rows, n], the sum first.
    let both = x.apply_op3_no_bwd(delta, w, &AddRmsNorm { eps })?;
    Ok((both.get(0)?, both.get(1)?))
}

struct AddRmsNorm {
    eps: f32,
}

/// The buffers of the `add_rms_norm` kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AddRmsNormBuf {
    X,
    Delta,
    Weight,
    /// `[2, rows, n]`: the sum, then the norm.
    Out,
}

/// Threads per row of the `add_rms_norm` kernel (its block reduction holds up to 32 warps).
pub const ADD_RMS_NORM_THREADS: u32 = 256;

/// The CUDA launch of [`add_rms_norm`] (`dtype`: the kernel suffix): one block per row.
pub fn add_rms_norm_launch(dtype: &str, rows: usize, n: usize, eps: f32) -> Launch<AddRmsNormBuf> {
    Launch::new(
        format!("add_rms_norm_{dtype}"),
        [rows.max(1) as u32, 1, 1],
        ADD_RMS_NORM_THREADS,
        vec![
            Arg::Buf(AddRmsNormBuf::X),
            Arg::Buf(AddRmsNormBuf::Delta),
            Arg::Buf(AddRmsNormBuf::Weight),
            Arg::Buf(AddRmsNormBuf::Out),
            Arg::int(rows),
            Arg::int(n),
            Arg::F32(eps),
        ],
    )
}

/// Checks the shapes and returns `(rows, n)`.
fn dims(xl: &Layout, dl: &Layout, wl: &Layout) -> candle_core::Result<(usize, usize)> {
    let (rows, n) = xl.shape().dims2()?;
    if dl.shape().dims2()? != (rows, n) || wl.shape().dims1()? != n || n == 0 {
        candle_core::bail!(
            "add_rms_norm: x {:?}, delta {:?}, weight {:?}",
            xl.dims(),
            dl.dims(),
            wl.dims()
        );
    }
    Ok((rows, n))
}

/// Sum of squares in eight independent lanes, so that the compiler can vectorise it.
fn sum_squares<T: Copy>(v: &[T], to: impl Fn(T) -> f32) -> f32 {
    let mut lanes = [0f32; 8];
    let chunks = v.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().map(|&x| to(x) * to(x)).sum();
    for c in chunks {
        for (l, &x) in lanes.iter_mut().zip(c) {
            *l += to(x) * to(x);
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// The CPU kernel: both halves of the `[2, rows, n]` output written once, row by row over the
/// threads, into memory not zeroed first.
fn cpu_rows<T: WithDType>(
    (x, d, w): (&[T], &[T], &[T]),
    n: usize,
    eps: f32,
    to: impl Fn(T) -> f32 + Sync,
    from: impl Fn(f32) -> T + Sync,
) -> Vec<T> {
    let rows = x.len() / n;
    let mut out: Vec<T> = Vec::with_capacity(2 * rows * n);
    let (sums, norms) = out.spare_capacity_mut()[..2 * rows * n].split_at_mut(rows * n);
    sums.par_chunks_mut(n)
        .zip(norms.par_chunks_mut(n))
        .zip(x.par_chunks(n).zip(d.par_chunks(n)))
        .with_min_len(8)
        .for_each(|((s, o), (xr, dr))| {
            for ((s, &a), &b) in s.iter_mut().zip(xr).zip(dr) {
                s.write(from(to(a) + to(b)));
            }
            // SAFETY: every element of `s` was just written; `MaybeUninit<T>` has `T`'s layout.
            let s = unsafe { &*(s as *const [MaybeUninit<T>] as *const [T]) };
            let inv = 1.0 / (sum_squares(s, &to) / n as f32 + eps).sqrt();
            for ((o, &s), &g) in o.iter_mut().zip(s).zip(w) {
                o.write(from(to(s) * inv * to(g)));
            }
        });
    // SAFETY: the loop above wrote every element of both halves (`rows` chunks of `n` each).
    unsafe { out.set_len(2 * rows * n) };
    out
}

impl CustomOp3 for AddRmsNorm {
    fn name(&self) -> &'static str {
        "add-rms-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ds: &CpuStorage,
        dl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, n) = dims(xl, dl, wl)?;
        let (Some((xa, xb)), Some((da, db)), Some((wa, wb))) = (
            xl.contiguous_offsets(),
            dl.contiguous_offsets(),
            wl.contiguous_offsets(),
        ) else {
            candle_core::bail!("add_rms_norm: inputs must be contiguous");
        };
        let eps = self.eps;
        let storage = match (xs, ds, ws) {
            (CpuStorage::F32(x), CpuStorage::F32(d), CpuStorage::F32(w)) => CpuStorage::F32(
                cpu_rows((&x[xa..xb], &d[da..db], &w[wa..wb]), n, eps, |v| v, |v| v),
            ),
            (CpuStorage::F16(x), CpuStorage::F16(d), CpuStorage::F16(w)) => {
                CpuStorage::F16(cpu_rows(
                    (&x[xa..xb], &d[da..db], &w[wa..wb]),
                    n,
                    eps,
                    f16::to_f32,
                    f16::from_f32,
                ))
            }
            (CpuStorage::BF16(x), CpuStorage::BF16(d), CpuStorage::BF16(w)) => {
                CpuStorage::BF16(cpu_rows(
                    (&x[xa..xb], &d[da..db], &w[wa..wb]),
                    n,
                    eps,
                    bf16::to_f32,
                    bf16::from_f32,
                ))
            }
            _ => candle_core::bail!(
                "add_rms_norm: x, delta and weight must share one of f32/f16/bf16, got {:?}",
                (xs.dtype(), ds.dtype(), ws.dtype())
            ),
        };
        Ok((storage, Shape::from((2, rows, n))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        ds: &candle_core::CudaStorage,
        dl: &Layout,
        ws: &candle_core::CudaStorage,
        wl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        if xs.dtype() != ds.dtype() || xs.dtype() != ws.dtype() {
            candle_core::bail!("add_rms_norm: x, delta and weight must share a dtype");
        }
        let args = (xs, xl, ds, dl, ws, wl, self.eps);
        match xs.dtype() {
            candle_core::DType::F32 => cuda::launch::<f32>(args),
            candle_core::DType::F16 => cuda::launch::<f16>(args),
            candle_core::DType::BF16 => cuda::launch::<bf16>(args),
            other => candle_core::bail!("add_rms_norm: no CUDA kernel for {other:?}"),
        }
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, PushKernelArg};
    use candle_core::cuda_backend::{CudaDType, WrapErr};
    use candle_core::{CudaStorage, Layout, Shape, WithDType};

    use super::AddRmsNormBuf as B;
    use crate::launch::cuda::{missing, push_args};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/norm.ptx"));

    type Args<'a> = (
        &'a CudaStorage,
        &'a Layout,
        &'a CudaStorage,
        &'a Layout,
        &'a CudaStorage,
        &'a Layout,
        f32,
    );

    pub fn launch<T: CudaDType + DeviceRepr + WithDType>(
        (xs, xl, ds, dl, ws, wl, eps): Args,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (rows, n) = super::dims(xl, dl, wl)?;
        if !xl.is_contiguous() || !dl.is_contiguous() || !wl.is_contiguous() {
            candle_core::bail!("add_rms_norm: inputs must be contiguous");
        }
        let dev = xs.device().clone();
        let l = super::add_rms_norm_launch(crate::launch::suffix(T::DTYPE)?, rows, n, eps);
        let func = dev.get_or_load_custom_func(&l.kernel, "offline_bench_norm", PTX)?;
        let x = xs.as_cuda_slice::<T>()?.slice(xl.start_offset()..);
        let d = ds.as_cuda_slice::<T>()?.slice(dl.start_offset()..);
        let w = ws.as_cuda_slice::<T>()?.slice(wl.start_offset()..);
        let mut out = crate::gpu::output_buffer::<T>(&dev, 2 * rows * n)?;
        if rows > 0 {
            let mut out_arg = Some(&mut out);
            let mut args = func.builder();
            push_args(&mut args, &l, |args, b| {
                match b {
                    B::X => args.arg(&x),
                    B::Delta => args.arg(&d),
                    B::Weight => args.arg(&w),
                    B::Out => args.arg(out_arg.take().ok_or_else(|| missing(&l, b))?),
                };
                Ok(())
            })?;
            // SAFETY: one block per row reads that row of x and delta and all of w, and writes
            // that row of both halves of the 2 x rows x n output.
            unsafe { args.launch(l.config()) }.w()?;
        }
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev),
            Shape::from((2, rows, n)),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn matches_add_then_candle_rms_norm() -> Result<()> {
        let dev = Device::Cpu;
        // Seeded, so a failure replays exactly.
        let mut rng = crate::util::Rng64::new(5);
        let x = Tensor::from_vec(rng.uniform_f32(9 * 96, 3.5), (9, 96), &dev)?;
        let d = Tensor::from_vec(rng.uniform_f32(9 * 96, 1.7), (9, 96), &dev)?;
        let w = (Tensor::from_vec(rng.uniform_f32(96, 0.35), 96, &dev)? + 1.0)?;
        for (dtype, tol) in [(DType::F32, 1e-5), (DType::F16, 4e-3), (DType::BF16, 3e-2)] {
            let (x, d, w) = (x.to_dtype(dtype)?, d.to_dtype(dtype)?, w.to_dtype(dtype)?);
            // The sum in f32, rounded to nearest once, as candle's add rounds it on x86-64 and
            // CUDA (its NEON bf16 add truncates instead, so it is not the reference here).
            let sum = (x.to_dtype(DType::F32)? + d.to_dtype(DType::F32)?)?.to_dtype(dtype)?;
            let norm = candle_nn::ops::rms_norm(&sum, &w, 1e-5)?;
            let (got_sum, got_norm) = add_rms_norm(&x, &d, &w, 1e-5)?;
            assert_eq!(got_sum.dims(), &[9, 96]);
            assert_eq!(got_norm.dims(), &[9, 96]);
            // The sum is rounded exactly so.
            let diff = (got_sum.to_dtype(DType::F32)? - sum.to_dtype(DType::F32)?)?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?;
            assert_eq!(diff, 0.0, "{dtype:?}");
            let want = norm.to_dtype(DType::F32)?;
            let err = ((got_norm.to_dtype(DType::F32)? - &want)?.abs()? / (want.abs()? + 1.0)?)?
                .max_all()?
                .to_scalar::<f32>()?;
            assert!(err < tol, "{dtype:?}: {err}");
        }
        Ok(())
    }

    #[test]
    fn takes_views_and_rejects_mismatched_shapes() -> Result<()> {
        let dev = Device::Cpu;
        // A residual that is itself the first half of an earlier result (a view at offset 0)
        // and a delta that is the second half (offset rows x n).
        let both = Tensor::arange(0f32, 2.0 * 3.0 * 8.0, &dev)?.reshape((2, 3, 8))?;
        let (x, d) = (both.get(0)?, both.get(1)?);
        let w = Tensor::ones(8, DType::F32, &dev)?;
        let (sum, _) = add_rms_norm(&x, &d, &w, 1e-6)?;
        assert_eq!(sum.to_vec2::<f32>()?[2][7], 23.0 + 47.0);
        assert!(add_rms_norm(&x, &d, &Tensor::ones(7, DType::F32, &dev)?, 1e-6).is_err());
        assert!(add_rms_norm(&x, &d.narrow(0, 0, 2)?, &w, 1e-6).is_err());
        Ok(())
    }
}

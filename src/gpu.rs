//! Helpers shared by the CUDA launches (built with the `cuda` feature only).

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::CudaDevice;
use candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute;

/// When set, kernels' output buffers start as NaN (integers: their largest value) instead of
/// uninitialised memory, so that an element a kernel fails to write shows up in a comparison
/// (the self-check sets it).
static POISON: AtomicBool = AtomicBool::new(false);

pub fn set_poison(on: bool) {
    POISON.store(on, Ordering::Relaxed);
}

/// An output buffer of `n` elements: NaN-filled when poisoning, else uninitialised (every
/// element must then be written by the kernel that fills it).
pub fn output_buffer<T>(
    dev: &CudaDevice,
    n: usize,
) -> candle_core::Result<candle_core::cuda_backend::cudarc::driver::CudaSlice<T>>
where
    T: candle_core::cuda_backend::cudarc::driver::DeviceRepr + candle_core::WithDType,
{
    if POISON.load(Ordering::Relaxed) {
        // `as` saturates: f64::MAX becomes an integer type's largest value.
        let poison = if T::DTYPE.is_float() {
            f64::NAN
        } else {
            f64::MAX
        };
        return dev.clone_htod(&vec![T::from_f64(poison); n]);
    }
    // SAFETY: callers launch a kernel that writes all n elements before anything reads them.
    unsafe { dev.alloc::<T>(n) }
}

/// Streaming multiprocessors of the device (queried once per process).
pub fn multiprocessors(dev: &CudaDevice) -> candle_core::Result<usize> {
    static SMS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    if let Some(n) = SMS.get() {
        return Ok(*n);
    }
    let n = dev
        .cuda_stream()
        .context()
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .map_err(|e| {
            candle_core::Error::Msg(format!("cannot query the multiprocessor count: {e:?}"))
        })?;
    Ok(*SMS.get_or_init(|| n.max(1) as usize))
}

/// Free and total device memory in bytes, after the device finished its queued work.
pub fn memory(dev: &CudaDevice) -> candle_core::Result<(usize, usize)> {
    dev.cuda_stream()
        .synchronize()
        .map_err(|e| candle_core::Error::Msg(format!("cannot synchronise the device: {e:?}")))?;
    dev.cuda_stream()
        .context()
        .mem_get_info()
        .map_err(|e| candle_core::Error::Msg(format!("cannot query device memory: {e:?}")))
}

/// `NVIDIA H100 80GB HBM3, CUDA driver API 13.0, compute 9.0`.
pub fn describe(dev: &CudaDevice) -> String {
    let ctx = dev.cuda_stream().context().clone();
    let name = ctx.name().unwrap_or_else(|_| "CUDA device".into());
    let cc = ctx
        .compute_capability()
        .map(|(a, b)| format!(", compute {a}.{b}"))
        .unwrap_or_default();
    let mut version = 0i32;
    // SAFETY: cuDriverGetVersion only writes the integer it is given.
    let driver =
        unsafe { candle_core::cuda_backend::cudarc::driver::sys::cuDriverGetVersion(&mut version) };
    let driver = if driver == candle_core::cuda_backend::cudarc::driver::sys::CUresult::CUDA_SUCCESS
    {
        format!(
            ", CUDA driver API {}.{}",
            version / 1000,
            (version % 1000) / 10
        )
    } else {
        String::new()
    };
    format!("{name}{driver}{cc}")
}

/// Makes the device's default memory pool keep freed memory instead of returning it to the
/// driver at each synchronisation, so that after a profiling step the pool holds the step's
/// activation peak and free memory reflects it (and later steps reuse it instead of growing).
pub fn keep_pool_memory(dev: &CudaDevice) -> candle_core::Result<()> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let ctx = dev.cuda_stream().context().clone();
    ctx.bind_to_thread()
        .map_err(|e| candle_core::Error::Msg(format!("cannot bind the CUDA context: {e:?}")))?;
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    let mut threshold: u64 = u64::MAX;
    // SAFETY: plain driver calls on the context's own device; `threshold` outlives the call.
    let (r1, r2) = unsafe {
        let r1 = sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device());
        let r2 = if r1 == sys::CUresult::CUDA_SUCCESS {
            sys::cuMemPoolSetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                (&mut threshold as *mut u64).cast(),
            )
        } else {
            r1
        };
        (r1, r2)
    };
    if r1 != sys::CUresult::CUDA_SUCCESS || r2 != sys::CUresult::CUDA_SUCCESS {
        candle_core::bail!("cannot configure the CUDA memory pool ({r1:?}, {r2:?})");
    }
    Ok(())
}

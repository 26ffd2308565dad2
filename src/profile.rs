//! Per-kernel timing of forward passes, for the shapes mode's breakdown.
//!
//! The model, the attention and the runner wrap each of their operations in [`timed`]. Nothing
//! is recorded unless a [`record`] call is active on the thread (one thread-local check per op
//! otherwise). On the CPU, candle's ops finish before they return, so a scope is timed with the
//! host clock; on CUDA, a pair of events is recorded on the device's stream around it and the
//! elapsed times are read once the recorded work is done, so timing does not serialise the
//! launches.

use std::cell::RefCell;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::Result;
use candle_core::Device;

/// The operations a forward pass is broken into.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kernel {
    /// Token embedding lookup.
    Embedding,
    /// Every RMSNorm (two per layer, the final one before the LM head), with the residual add
    /// before it (fused into one kernel on CUDA, `model::norm::residual_rms_norm`).
    RmsNorm,
    /// Splitting the fused QKV output into heads and rotating q and k.
    Rotary,
    GemmQkv,
    GemmO,
    GemmGateUp,
    GemmDown,
    GemmLmHead,
    /// SiLU(gate) * up.
    Activation,
    /// The residual add that no norm follows: the last layer's second.
    Residual,
    /// Writing the step's K/V into their paged slots (with any dtype conversion).
    ReshapeAndCache,
    /// Attention of a step holding prefill chunks.
    PrefillAttention,
    /// Attention of a step of decode tokens only (one query per sequence).
    DecodeAttention,
    /// Choosing the next tokens from the logits, ids back on the host.
    Sampler,
}

impl Kernel {
    pub const ALL: [Kernel; 14] = [
        Kernel::Embedding,
        Kernel::RmsNorm,
        Kernel::Rotary,
        Kernel::GemmQkv,
        Kernel::GemmO,
        Kernel::GemmGateUp,
        Kernel::GemmDown,
        Kernel::GemmLmHead,
        Kernel::Activation,
        Kernel::Residual,
        Kernel::ReshapeAndCache,
        Kernel::PrefillAttention,
        Kernel::DecodeAttention,
        Kernel::Sampler,
    ];

    /// The name used in tables, CSV and JSON.
    pub fn name(self) -> &'static str {
        match self {
            Kernel::Embedding => "embedding",
            Kernel::RmsNorm => "rms_norm",
            Kernel::Rotary => "rotary",
            Kernel::GemmQkv => "gemm_qkv",
            Kernel::GemmO => "gemm_o",
            Kernel::GemmGateUp => "gemm_gate_up",
            Kernel::GemmDown => "gemm_down",
            Kernel::GemmLmHead => "gemm_lm_head",
            Kernel::Activation => "silu_mul",
            Kernel::Residual => "residual_add",
            Kernel::ReshapeAndCache => "reshape_and_cache",
            Kernel::PrefillAttention => "prefill_attention",
            Kernel::DecodeAttention => "decode_attention",
            Kernel::Sampler => "sampler",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Seconds spent in each kernel (indexed like [`Kernel::ALL`]) and how many times it ran.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct KernelTimes {
    pub seconds: [f64; Kernel::ALL.len()],
    pub calls: [u64; Kernel::ALL.len()],
}

impl KernelTimes {
    pub fn get(&self, k: Kernel) -> f64 {
        self.seconds[k.index()]
    }

    pub fn calls_of(&self, k: Kernel) -> u64 {
        self.calls[k.index()]
    }

    pub fn total(&self) -> f64 {
        self.seconds.iter().sum()
    }

    pub fn add(&mut self, other: &KernelTimes) {
        for i in 0..self.seconds.len() {
            self.seconds[i] += other.seconds[i];
            self.calls[i] += other.calls[i];
        }
    }

    /// Every figure divided by `n` (a per-step average; calls rounded to whole ones).
    pub fn scaled(&self, n: f64) -> KernelTimes {
        let mut out = self.clone();
        out.seconds.iter_mut().for_each(|s| *s /= n);
        out.calls
            .iter_mut()
            .for_each(|c| *c = (*c as f64 / n).round() as u64);
        out
    }
}

enum Mark {
    Host(Instant),
    #[cfg(feature = "cuda")]
    Event(candle_core::cuda_backend::cudarc::driver::CudaEvent),
}

struct Recorder {
    device: Device,
    spans: Vec<(Kernel, Mark, Mark)>,
}

/// The recording a thread is timing into, shared with the worker threads it hands the forward
/// pass to (candle runs CPU passes inside its own thread pool).
#[derive(Clone)]
pub struct Active(Arc<Mutex<Recorder>>);

thread_local! {
    static ACTIVE: RefCell<Option<Active>> = const { RefCell::new(None) };
}

/// The recording active on this thread, to carry into another thread with [`within`].
pub fn current() -> Option<Active> {
    ACTIVE.with(|a| a.borrow().clone())
}

/// Runs `f` on this thread with `active` as its recording (restoring the previous one after).
pub fn within<T>(active: Option<Active>, f: impl FnOnce() -> T) -> T {
    let previous = ACTIVE.with(|a| std::mem::replace(&mut *a.borrow_mut(), active));
    let out = f();
    ACTIVE.with(|a| *a.borrow_mut() = previous);
    out
}

fn mark(device: &Device) -> Result<Mark> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(dev) => {
            use candle_core::cuda_backend::cudarc::driver::sys::CUevent_flags;
            let ev = dev
                .cuda_stream()
                .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(|e| anyhow::anyhow!("cannot record a CUDA timing event: {e:?}"))?;
            Ok(Mark::Event(ev))
        }
        _ => Ok(Mark::Host(Instant::now())),
    }
}

fn elapsed(a: &Mark, b: &Mark) -> Result<f64> {
    match (a, b) {
        (Mark::Host(a), Mark::Host(b)) => Ok((*b - *a).as_secs_f64()),
        #[cfg(feature = "cuda")]
        (Mark::Event(a), Mark::Event(b)) => Ok(a
            .elapsed_ms(b)
            .map_err(|e| anyhow::anyhow!("cannot read a CUDA timing event: {e:?}"))?
            as f64
            / 1e3),
        #[cfg(feature = "cuda")]
        _ => anyhow::bail!("timing marks of different devices"),
    }
}

fn lock(active: &Active) -> Result<std::sync::MutexGuard<'_, Recorder>> {
    active
        .0
        .lock()
        .map_err(|_| anyhow::anyhow!("the kernel timer was poisoned by a panic"))
}

/// Runs `f`, attributing its time to `kernel` when a [`record`] is active on this thread.
/// Scopes do not nest: an inner scope's time also counts in the outer one.
pub fn timed<T>(kernel: Kernel, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let Some(active) = current() else {
        return f();
    };
    let device = lock(&active)?.device.clone();
    let start = mark(&device)?;
    let out = f()?;
    let end = mark(&device)?;
    lock(&active)?.spans.push((kernel, start, end));
    Ok(out)
}

/// Runs `f` with kernel timing on for `device`, and returns its result with the time each
/// kernel took inside it (the device's queued work is waited for first).
pub fn record<T>(device: &Device, f: impl FnOnce() -> Result<T>) -> Result<(T, KernelTimes)> {
    let active = Active(Arc::new(Mutex::new(Recorder {
        device: device.clone(),
        spans: Vec::new(),
    })));
    let out = within(Some(active.clone()), f)?;
    device.synchronize()?;
    let mut times = KernelTimes::default();
    for (k, a, b) in &lock(&active)?.spans {
        times.seconds[k.index()] += elapsed(a, b)?;
        times.calls[k.index()] += 1;
    }
    Ok((out, times))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_only_inside_record() -> Result<()> {
        // Outside a record, timed just runs the closure.
        assert_eq!(timed(Kernel::GemmO, || Ok(3))?, 3);
        let (v, times) = record(&Device::Cpu, || {
            timed(Kernel::GemmO, || {
                std::thread::sleep(std::time::Duration::from_millis(2));
                Ok(1)
            })?;
            timed(Kernel::GemmO, || Ok(()))?;
            timed(Kernel::Sampler, || Ok(()))?;
            // A scope on another thread counts when the recording is carried there.
            let active = current();
            std::thread::scope(|s| {
                s.spawn(|| within(active, || timed(Kernel::RmsNorm, || Ok(()))))
                    .join()
                    .map_err(|_| anyhow::anyhow!("thread panicked"))?
            })?;
            Ok(7)
        })?;
        assert_eq!(v, 7);
        assert_eq!(times.calls[Kernel::GemmO.index()], 2);
        assert_eq!(times.calls[Kernel::Sampler.index()], 1);
        assert_eq!(times.calls[Kernel::RmsNorm.index()], 1);
        assert_eq!(times.calls[Kernel::Rotary.index()], 0);
        assert!(times.get(Kernel::GemmO) >= 0.002);
        // The recorder is gone afterwards.
        let (_, again) = record(&Device::Cpu, || Ok(()))?;
        assert_eq!(again.total(), 0.0);
        Ok(())
    }

    #[test]
    fn names_are_unique_and_indices_match() {
        let mut names: Vec<_> = Kernel::ALL.iter().map(|k| k.name()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), Kernel::ALL.len());
        for (i, k) in Kernel::ALL.iter().enumerate() {
            assert_eq!(k.index(), i);
        }
    }

    #[test]
    fn an_error_inside_leaves_no_recorder_behind() {
        let r: Result<((), KernelTimes)> = record(&Device::Cpu, || anyhow::bail!("broken step"));
        assert!(r.is_err());
        ACTIVE.with(|a| assert!(a.borrow().is_none()));
    }
}

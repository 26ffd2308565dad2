//! The device a run uses (`--device cpu|cuda[:N]`), its description for reports, and the memory
//! it has, so a model or KV budget that cannot fit is refused before anything is allocated.

use anyhow::{Result, bail};
use candle_core::{DType, Device};

/// A parsed `--device` value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceSpec {
    Cpu,
    Cuda(usize),
}

impl std::str::FromStr for DeviceSpec {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| format!("unknown device '{s}' (expected cpu, cuda or cuda:N)")),
        }
    }
}

impl DeviceSpec {
    /// Opens the device; a CUDA device in a build without CUDA is a clear error.
    pub fn open(self) -> Result<Device> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Cuda(n) => {
                if !candle_core::utils::cuda_is_available() {
                    bail!(
                        "--device cuda:{n}: this binary was built without CUDA (rebuild with --features cuda)"
                    );
                }
                Device::new_cuda(n).map_err(|e| anyhow::anyhow!("cannot open CUDA device {n}: {e}"))
            }
        }
    }

    /// The dtype `--dtype auto` means here: f32 on the CPU (candle's CPU matmul has no bf16),
    /// bf16 on CUDA.
    pub fn default_dtype(self) -> DType {
        match self {
            Self::Cpu => DType::F32,
            Self::Cuda(_) => DType::BF16,
        }
    }
}

/// A one-line description of the machine a run used ("cpu: Intel Xeon ..., 2 threads").
pub fn describe(device: &Device) -> String {
    match device {
        Device::Cpu => {
            let model = std::fs::read_to_string("/proc/cpuinfo")
                .ok()
                .and_then(|s| {
                    s.lines()
                        .find(|l| l.starts_with("model name"))
                        .and_then(|l| l.split_once(':'))
                        .map(|(_, v)| v.trim().to_string())
                })
                .unwrap_or_else(|| std::env::consts::ARCH.to_string());
            // The pool the forward pass runs in, as built (not what the environment says now).
            let threads = Device::Cpu.with_context(rayon::current_num_threads);
            let s = if threads == 1 { "" } else { "s" };
            format!("cpu: {model}, {threads} thread{s}")
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(dev) => format!("cuda: {}", crate::gpu::describe(dev)),
        other => format!("{:?}", other.location()),
    }
}

/// Sizes every thread pool of the process (candle's, its elementwise workers', rayon's global
/// one) at `n` threads, through the variables they read when first used.
///
/// # Safety
/// No other thread may run yet (setting the environment races with reading it), and no pool
/// may have been used: a pool already built keeps its size.
pub unsafe fn set_cpu_threads(n: usize) {
    let n = n.to_string();
    // SAFETY: the caller's contract.
    unsafe {
        std::env::set_var("RAYON_NUM_THREADS", &n);
        std::env::set_var("CANDLE_NUM_THREADS", &n);
    }
}

/// Bytes of memory the OS says are available for new allocations (Linux `MemAvailable`).
pub fn available_host_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Parses `--dtype` (`auto`, `f32`/`float32`, `f16`/`float16`/`half`, `bf16`/`bfloat16`).
pub fn parse_dtype(text: &str, device: DeviceSpec) -> Result<DType> {
    let dtype = match text {
        "auto" => device.default_dtype(),
        "f32" | "float32" | "float" => DType::F32,
        "f16" | "float16" | "half" => DType::F16,
        "bf16" | "bfloat16" => DType::BF16,
        other => bail!("unknown --dtype '{other}' (expected auto, f32, f16 or bf16)"),
    };
    Ok(dtype)
}

/// Parses `--kv-cache-dtype`. `auto` is the model's dtype on CUDA and f16 on the CPU: decode
/// attention there is bound by memory bandwidth, so an f32 model's cache is worth halving
/// (llama.cpp's default cache is f16 too), and f16 keeps more of a bf16 model's K/V than bf16
/// at the same bytes and speed. `fp8` (`fp8_e4m3`, as in vLLM) halves the bytes again, with
/// 3 mantissa bits and no scaling: an explicit choice, never the default.
pub fn parse_kv_dtype(text: &str, model: DType, device: DeviceSpec) -> Result<DType> {
    match text {
        "auto" if device == DeviceSpec::Cpu => Ok(DType::F16),
        "auto" => Ok(model),
        "fp8" | "fp8_e4m3" => Ok(DType::F8E4M3),
        other => parse_dtype(other, device).map_err(|_| {
            anyhow::anyhow!(
                "unknown --kv-cache-dtype '{other}' (expected auto, f32, f16, bf16 or fp8)"
            )
        }),
    }
}

/// Whether this CPU has AVX2, FMA and F16C (checked once; every CPU with AVX2 has F16C): the
/// hand-written CPU kernels use them (F16C for int4's f16 scales), and fall back to plain loops
/// elsewhere (always, off x86-64).
pub fn cpu_has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| {
            is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Whether this CPU has AVX-512 F and BW (checked once), which the 512-bit product kernels need
/// (never, off x86-64).
pub fn cpu_has_avx512_bw() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| {
            is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Bytes of the first CPU's level-1 data cache (Linux's sysfs, read once), which bounds the rows
/// the product kernels keep in L1; 32 KiB, the smallest of current x86 server cores, where
/// sysfs does not say.
pub fn cpu_l1d_bytes() -> usize {
    use std::sync::OnceLock;
    static BYTES: OnceLock<usize> = OnceLock::new();
    *BYTES.get_or_init(|| {
        l1d_from_sysfs(std::path::Path::new("/sys/devices/system/cpu/cpu0/cache"))
            .unwrap_or(32 << 10)
    })
}

/// The level-1 data cache's size among a CPU's `cache/index*` entries.
fn l1d_from_sysfs(cache: &std::path::Path) -> Option<usize> {
    let read = |dir: &std::path::Path, file: &str| {
        std::fs::read_to_string(dir.join(file))
            .map(|s| s.trim().to_string())
            .ok()
    };
    std::fs::read_dir(cache).ok()?.flatten().find_map(|entry| {
        let dir = entry.path();
        if read(&dir, "level")? != "1" || read(&dir, "type")? != "Data" {
            return None;
        }
        let size = read(&dir, "size")?;
        let kib: usize = size.strip_suffix('K')?.parse().ok()?;
        Some(kib << 10)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_specs() {
        assert_eq!("cpu".parse::<DeviceSpec>(), Ok(DeviceSpec::Cpu));
        assert_eq!("cuda".parse::<DeviceSpec>(), Ok(DeviceSpec::Cuda(0)));
        assert_eq!("cuda:3".parse::<DeviceSpec>(), Ok(DeviceSpec::Cuda(3)));
        assert!("gpu".parse::<DeviceSpec>().is_err());
        assert!("cuda:x".parse::<DeviceSpec>().is_err());
    }

    #[test]
    fn dtypes() {
        assert_eq!(parse_dtype("auto", DeviceSpec::Cpu).unwrap(), DType::F32);
        assert_eq!(
            parse_dtype("auto", DeviceSpec::Cuda(0)).unwrap(),
            DType::BF16
        );
        assert_eq!(parse_dtype("half", DeviceSpec::Cpu).unwrap(), DType::F16);
        assert_eq!(parse_dtype("bf16", DeviceSpec::Cpu).unwrap(), DType::BF16);
        assert!(parse_dtype("int4", DeviceSpec::Cpu).is_err());
        let cpu = DeviceSpec::Cpu;
        assert_eq!(parse_kv_dtype("auto", DType::F32, cpu).unwrap(), DType::F16);
        assert_eq!(parse_kv_dtype("auto", DType::F16, cpu).unwrap(), DType::F16);
        assert_eq!(
            parse_kv_dtype("auto", DType::BF16, cpu).unwrap(),
            DType::F16
        );
        assert_eq!(parse_kv_dtype("f32", DType::F32, cpu).unwrap(), DType::F32);
        let gpu = DeviceSpec::Cuda(0);
        assert_eq!(
            parse_kv_dtype("auto", DType::BF16, gpu).unwrap(),
            DType::BF16
        );
        assert_eq!(
            parse_kv_dtype("fp8", DType::F32, cpu).unwrap(),
            DType::F8E4M3
        );
        assert_eq!(
            parse_kv_dtype("fp8_e4m3", DType::BF16, gpu).unwrap(),
            DType::F8E4M3
        );
        assert!(parse_kv_dtype("fp8_e5m2", DType::F32, cpu).is_err());
        assert!(parse_kv_dtype("int8", DType::F32, cpu).is_err());
    }

    #[test]
    fn l1d_size_is_read_from_the_data_cache_entry() {
        let root = std::env::temp_dir().join(format!("l1d-{}", std::process::id()));
        for (index, level, kind, size) in [
            ("index0", "1", "Instruction", "32K"),
            ("index1", "1", "Data", "48K"),
            ("index2", "2", "Unified", "2048K"),
        ] {
            let dir = root.join(index);
            std::fs::create_dir_all(&dir).unwrap();
            for (file, text) in [("level", level), ("type", kind), ("size", size)] {
                std::fs::write(dir.join(file), format!("{text}\n")).unwrap();
            }
        }
        assert_eq!(l1d_from_sysfs(&root), Some(48 << 10));
        assert_eq!(l1d_from_sysfs(&root.join("missing")), None);
        std::fs::remove_dir_all(&root).unwrap();
        assert!(cpu_l1d_bytes() >= 16 << 10);
    }
}

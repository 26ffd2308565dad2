//! The subcommands: `throughput`, `shapes`, `generate`, `self-check` and `compare`, and the
//! set-up they share (device, model, KV budget, engine).

pub mod compare;
pub mod generate;
pub mod selfcheck;
pub mod shapes;
pub mod throughput;

use anyhow::{Result, bail};
use candle_core::{DType, Device};
use serde_json::{Value, json};

use crate::cli::{EngineArgs, ModelArgs};
use crate::engine::sampler::SamplingParams;
use crate::engine::{Engine, EngineConfig};
use crate::model::{self, ModelInfo, ModelOptions, Quantization};
use crate::progress::Progress;
use crate::util::human_bytes;

/// The commit the binary was built from.
pub const COMMIT: &str = env!("OFFLINE_BENCH_COMMIT");

/// A device, a dtype and an inspected model (weights not loaded yet).
pub struct Setup {
    pub device_spec: crate::device::DeviceSpec,
    pub device: Device,
    pub dtype: DType,
    pub quantization: Quantization,
    pub info: ModelInfo,
    pub max_model_len: usize,
}

impl Setup {
    pub fn new(args: &ModelArgs, progress: &Progress) -> Result<Self> {
        let dtype = crate::device::parse_dtype(&args.dtype, args.device)?;
        check_quantization(args.quantization, args.device, dtype)?;
        let info = model::inspect(
            &ModelOptions {
                model: args.model.clone(),
                tokenizer: args.tokenizer.clone(),
                chat_template: args.chat_template.clone(),
                load_format: args.load_format,
                revision: args.revision.clone(),
            },
            progress,
        )?;
        let model_max = info.config.max_position_embeddings;
        let max_model_len = match args.max_model_len {
            Some(0) => bail!("--max-model-len must be at least 1"),
            Some(n) if n > model_max => bail!(
                "--max-model-len {n} exceeds the model's max_position_embeddings ({model_max})"
            ),
            Some(n) => n,
            None => model_max,
        };
        let device = args.device.open()?;
        Ok(Self {
            device_spec: args.device,
            device,
            dtype,
            quantization: args.quantization,
            info,
            max_model_len,
        })
    }

    /// Checks the engine flags that need neither weights nor a workload, so a bad one fails
    /// before either is read; returns the KV cache's dtype.
    pub fn check_engine_args(&self, eng: &EngineArgs) -> Result<DType> {
        if eng.block_size == 0 {
            bail!("--block-size must be at least 1");
        }
        if self.device.is_cuda() && eng.block_size > 32 {
            bail!(
                "--block-size {} is not supported on CUDA (at most 32)",
                eng.block_size
            );
        }
        if !(eng.gpu_memory_utilization > 0.0 && eng.gpu_memory_utilization <= 1.0) {
            bail!(
                "--gpu-memory-utilization must be in (0, 1], got {}",
                eng.gpu_memory_utilization
            );
        }
        crate::device::parse_kv_dtype(&eng.kv_cache_dtype, self.dtype, self.device_spec)
    }

    /// Loads the weights and builds an engine with a KV cache sized from the budget.
    pub fn engine(&self, eng: &EngineArgs, progress: &Progress) -> Result<Engine> {
        let kv_dtype = self.check_engine_args(eng)?;
        let model = model::load_weights(
            &self.info,
            self.max_model_len,
            (self.dtype, self.quantization),
            &self.device,
            progress,
        )?;
        let spec = Engine::cache_spec(&model, eng.block_size, kv_dtype);
        let num_blocks = match (eng.num_kv_blocks, &self.device) {
            (Some(n), _) => n,
            (None, Device::Cpu) => {
                if let Some(avail) = crate::device::available_host_memory()
                    && eng.kv_cache_memory > avail
                {
                    bail!(
                        "--kv-cache-memory {} exceeds the {} of memory available",
                        human_bytes(eng.kv_cache_memory),
                        human_bytes(avail)
                    );
                }
                spec.blocks_in(eng.kv_cache_memory)
            }
            #[cfg(feature = "cuda")]
            (None, Device::Cuda(dev)) => {
                let budget = gpu_kv_budget(dev, &model, spec, eng, progress)?;
                spec.blocks_in(budget)
            }
            (None, other) => bail!("no KV sizing for device {other:?}"),
        };
        if num_blocks == 0 {
            bail!(
                "the KV budget is too small for one block ({} for {} tokens); raise {}",
                human_bytes(spec.bytes_per_block()),
                spec.block_size,
                if self.device.is_cpu() {
                    "--kv-cache-memory"
                } else {
                    "--gpu-memory-utilization or lower --max-num-batched-tokens"
                }
            );
        }
        let tokens = num_blocks * spec.block_size;
        progress.info(format!("device: {}", crate::device::describe(&self.device)));
        progress.info(format!(
            "KV cache ({}): {} in {num_blocks} blocks of {} tokens ({tokens} tokens, {} per token); maximum concurrency at {} tokens per request: {:.2}x",
            dtype_name(kv_dtype),
            human_bytes(spec.bytes_per_block() * num_blocks as u64),
            spec.block_size,
            human_bytes(spec.bytes_per_token()),
            self.max_model_len,
            tokens as f64 / self.max_model_len as f64
        ));
        Engine::new(
            model,
            EngineConfig {
                block_size: eng.block_size,
                max_num_seqs: eng.max_num_seqs,
                max_num_batched_tokens: eng.max_num_batched_tokens,
                max_model_len: self.max_model_len,
                num_blocks,
                kv_cache_dtype: kv_dtype,
                enable_prefix_caching: eng.prefix_caching(),
            },
            sampling(eng),
        )
    }

    /// How the weights are held and their products computed, for a report's title: with
    /// `--quantization`, `--dtype` names only the products' precision.
    pub fn weights_name(&self) -> String {
        match self.quantization {
            Quantization::None => dtype_name(self.dtype),
            q => format!("{} weights, {} products", q.name(), dtype_name(self.dtype)),
        }
    }

    /// The report's description of the model, engine and machine.
    pub fn context(&self, engine: &Engine, args: &ModelArgs, eng: &EngineArgs) -> Value {
        let c = engine.config();
        let cache = engine.runner().cache();
        let model = engine.runner().model();
        json!({
            "model": {
                "name": args.model,
                "load_format": self.info.load_format.name(),
                "dtype": dtype_name(self.dtype),
                "quantization": self.quantization.name(),
                // Which kernel this CPU's bf16 products ran (it is chosen by measurement), or
                // its int8 ones with bf16's precision.
                "cpu_bf16_products": (self.device.is_cpu() && self.dtype == DType::BF16)
                    .then(|| self.quantization.describe_bf16_products()),
                "parameters": self.info.config.num_parameters(),
                "weight_bytes": model.weight_bytes(),
                "tokenizer": self.info.tokenizer.as_ref().map(|t| t.source.clone()),
            },
            "engine": {
                "block_size": c.block_size,
                "max_num_seqs": c.max_num_seqs,
                "max_num_batched_tokens": c.max_num_batched_tokens,
                "max_model_len": c.max_model_len,
                "enable_prefix_caching": c.enable_prefix_caching,
                "sampling": sampling(eng).describe(),
            },
            "kv_cache": {
                "dtype": dtype_name(cache.spec.dtype),
                "num_blocks": cache.num_blocks,
                "bytes": cache.bytes(),
                "tokens": cache.num_blocks * c.block_size,
                "max_concurrency": (cache.num_blocks * c.block_size) as f64 / c.max_model_len as f64,
            },
            "device": crate::device::describe(&self.device),
            "commit": COMMIT,
            "version": env!("CARGO_PKG_VERSION"),
            "date": crate::util::utc_date(),
            "command": std::env::args().collect::<Vec<_>>().join(" "),
        })
    }
}

/// The KV budget on a GPU, as vLLM computes it: `--gpu-memory-utilization` of the device's
/// memory, minus what is in use after the weights, minus the activation peak of the largest
/// step (measured by running one, with the memory pool keeping its peak).
#[cfg(feature = "cuda")]
fn gpu_kv_budget(
    dev: &candle_core::CudaDevice,
    model: &crate::model::llama::Llama,
    spec: crate::attention::KvCacheSpec,
    eng: &EngineArgs,
    progress: &Progress,
) -> Result<u64> {
    crate::gpu::keep_pool_memory(dev)?;
    let (free0, total) = crate::gpu::memory(dev)?;
    let used0 = (total - free0) as u64;
    let temp = crate::engine::runner::profile_step(
        model,
        spec,
        eng.max_num_batched_tokens,
        eng.max_num_seqs,
    )
    .map_err(|e| {
        anyhow::anyhow!(
            "profiling a step of {} tokens failed ({e:#}); lower --max-num-batched-tokens",
            eng.max_num_batched_tokens
        )
    })?;
    let (free1, _) = crate::gpu::memory(dev)?;
    let peak = ((total - free1) as u64).saturating_sub(used0 + temp);
    let allowed = (total as f64 * eng.gpu_memory_utilization) as u64;
    let budget = allowed.saturating_sub(used0 + peak);
    progress.info(format!(
        "GPU memory: {} total, {} in use after loading, activation peak {}, KV budget {} (--gpu-memory-utilization {})",
        human_bytes(total as u64),
        human_bytes(used0),
        human_bytes(peak),
        human_bytes(budget),
        eng.gpu_memory_utilization
    ));
    if budget == 0 {
        bail!(
            "no memory left for the KV cache: {} in use after loading plus a {} activation peak exceed --gpu-memory-utilization {} of {}; raise it or lower --max-num-batched-tokens",
            human_bytes(used0),
            human_bytes(peak),
            eng.gpu_memory_utilization,
            human_bytes(total as u64)
        );
    }
    Ok(budget)
}

/// Refuses `--quantization` where its kernel cannot run.
fn check_quantization(
    quant: Quantization,
    device: crate::device::DeviceSpec,
    dtype: DType,
) -> Result<()> {
    let name = quant.name();
    if quant == Quantization::None {
        return Ok(());
    }
    if device != crate::device::DeviceSpec::Cpu {
        bail!("--quantization {name} runs on the CPU only; on CUDA choose the weights' --dtype");
    }
    if dtype != DType::F32 && dtype != DType::BF16 {
        bail!(
            "--quantization {name} computes in f32 or bf16: use it with --dtype f32, bf16 or auto, not {}",
            dtype_name(dtype)
        );
    }
    if !crate::gemm::panels_run_here() {
        bail!(
            "--quantization {name} needs a CPU with AVX2 and FMA, or AVX-512 (its kernels); without them, keep the f32 weights"
        );
    }
    Ok(())
}

/// A dtype as the flags spell it (`fp8_e4m3` for the fp8 KV cache).
pub fn dtype_name(dtype: DType) -> String {
    match dtype {
        DType::F8E4M3 => "fp8_e4m3".into(),
        other => format!("{other:?}").to_lowercase(),
    }
}

pub fn sampling(eng: &EngineArgs) -> SamplingParams {
    SamplingParams {
        temperature: eng.temperature,
        top_p: eng.top_p,
        top_k: eng.top_k,
        seed: eng.seed,
    }
}

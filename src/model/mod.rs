//! Models: finding what `--model` names, reading its config and tokenizer, loading its weights.

pub mod config;
pub mod hub;
pub mod linear;
pub mod llama;
pub mod matmul;
pub mod norm;
pub mod ops;
pub mod rotary;
pub mod weights;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use candle_core::{DType, Device};

use self::config::ModelConfig;
use self::llama::Llama;
use self::weights::{DummyWeights, GgufWeights, SafetensorsWeights, WeightSource};
use crate::progress::Progress;
use crate::tokenizer::TextTokenizer;

/// `--load-format`, as vLLM names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LoadFormat {
    /// GGUF for a .gguf file, safetensors for a folder or hub id, dummy for a preset.
    Auto,
    Safetensors,
    Gguf,
    /// Random weights with the model's shapes: no download, same compute and memory.
    Dummy,
}

impl LoadFormat {
    pub fn name(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Safetensors => "safetensors",
            Self::Gguf => "gguf",
            Self::Dummy => "dummy",
        }
    }
}

/// How the projections and the LM head are stored beyond `--dtype` (`--quantization`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Quantization {
    /// As `--dtype` says.
    #[default]
    None,
    /// int8 in blocks of 32 values with an f16 scale each (llama.cpp's Q8_0 scheme; CPU with
    /// AVX2 or AVX-512, f32 activations): 1.0625 bytes a weight, a quarter of f32's and a
    /// sixteenth more.
    Int8,
    /// 4-bit codes in blocks of 32 values with an f16 scale and minimum each (llama.cpp's Q4_1
    /// scheme; CPU with AVX2 or AVX-512, f32 activations, products as int8's): 0.625 bytes a
    /// weight, the LM head int8.
    Int4,
}

impl Quantization {
    pub fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Int8 => "int8",
            Self::Int4 => "int4",
        }
    }

    /// One line for the user: how products with bf16's precision (`--dtype bf16` on the CPU)
    /// run with these weights on this CPU.
    pub fn describe_bf16_products(self) -> String {
        match self {
            Self::None => crate::gemm::bf16::Bf16Kernel::describe(),
            Self::Int8 => {
                crate::gemm::quant::describe_bf16_products::<crate::gemm::int8::Int8Weights>()
            }
            Self::Int4 => {
                crate::gemm::quant::describe_bf16_products::<crate::gemm::int4::Int4Weights>()
            }
        }
    }
}

/// What `--model` resolved to.
#[derive(Clone, Debug)]
pub enum ModelSource {
    Gguf(PathBuf),
    /// An HF folder (local, or a hub snapshot): `config.json` plus weights.
    Folder(PathBuf),
    /// A bare `config.json`-style file (dummy weights only).
    ConfigFile(PathBuf),
    Preset(String),
}

/// How to find and load a model.
#[derive(Clone, Debug)]
pub struct ModelOptions {
    pub model: String,
    pub tokenizer: Option<PathBuf>,
    pub chat_template: Option<PathBuf>,
    pub load_format: LoadFormat,
    pub revision: Option<String>,
}

/// A model's description without its weights: enough to sample a workload or size a cache.
pub struct ModelInfo {
    pub source: ModelSource,
    pub config: ModelConfig,
    pub tokenizer: Option<TextTokenizer>,
    /// The load format in effect (never `Auto`).
    pub load_format: LoadFormat,
}

/// Resolves `--model`: an existing path, a preset name, or a hub id.
pub fn resolve(model: &str, revision: Option<&str>, progress: &Progress) -> Result<ModelSource> {
    let path = Path::new(model);
    if path.is_file() {
        return match path.extension().and_then(|e| e.to_str()) {
            Some("gguf") => Ok(ModelSource::Gguf(path.to_path_buf())),
            Some("json") => Ok(ModelSource::ConfigFile(path.to_path_buf())),
            _ => bail!(
                "model file {model} is neither a .gguf file nor a config .json (for an HF model, give its folder)"
            ),
        };
    }
    if path.is_dir() {
        if !path.join("config.json").is_file() {
            bail!("model folder {model} has no config.json");
        }
        return Ok(ModelSource::Folder(path.to_path_buf()));
    }
    if ModelConfig::preset(model).is_some() {
        return Ok(ModelSource::Preset(model.to_string()));
    }
    let pathlike = model.starts_with('.')
        || model.starts_with('/')
        || model.starts_with('~')
        || model.ends_with(".gguf")
        || model.ends_with(".json");
    if !pathlike && hub::looks_like_repo_id(model) {
        progress.info(format!(
            "fetching {model} from the Hugging Face hub (or its cache)"
        ));
        return Ok(ModelSource::Folder(hub::fetch(
            model,
            revision,
            progress.shows_bars(),
        )?));
    }
    if pathlike {
        bail!("model path {model} does not exist");
    }
    bail!(
        "model '{model}' is not a file, a folder, a preset ({}) or a hub id (org/name)",
        config::preset_names().join(", ")
    )
}

/// Reads the config and tokenizer of `opts.model` (no weights).
pub fn inspect(opts: &ModelOptions, progress: &Progress) -> Result<ModelInfo> {
    let source = resolve(&opts.model, opts.revision.as_deref(), progress)?;
    let (config, mut tokenizer, default_format) = match &source {
        ModelSource::Gguf(p) => {
            let g = GgufWeights::open(p)?;
            let cfg = ModelConfig::from_gguf(g.content())
                .with_context(|| format!("model {}", p.display()))?;
            let tok = match &opts.tokenizer {
                Some(_) => None,
                None => Some(TextTokenizer::from_gguf(g.content(), p)?),
            };
            (cfg, tok, LoadFormat::Gguf)
        }
        ModelSource::Folder(dir) => {
            let cfg = ModelConfig::from_file(&dir.join("config.json"))?;
            let tok_file = dir.join("tokenizer.json");
            let tok = if opts.tokenizer.is_none() && tok_file.is_file() {
                Some(TextTokenizer::from_file(&tok_file)?)
            } else {
                None
            };
            (cfg, tok, LoadFormat::Safetensors)
        }
        ModelSource::ConfigFile(p) => (ModelConfig::from_file(p)?, None, LoadFormat::Dummy),
        ModelSource::Preset(name) => {
            let cfg =
                ModelConfig::preset(name).ok_or_else(|| anyhow!("unknown preset {name}"))??;
            (cfg, None, LoadFormat::Dummy)
        }
    };
    if let Some(t) = &opts.tokenizer {
        let file = if t.is_dir() {
            t.join("tokenizer.json")
        } else {
            t.clone()
        };
        tokenizer = Some(TextTokenizer::from_file(&file).context("--tokenizer")?);
    }
    if let Some(tok) = tokenizer.as_mut() {
        if tok.chat_template.is_none()
            && let Some(t) = config.preset_chat_template()
        {
            tok.chat_template = Some(t);
            let extras = config.offline_bench.clone().unwrap_or_default();
            tok.bos_token = tok.bos_token.take().or(extras.bos_token);
            tok.eos_token = tok.eos_token.take().or(extras.eos_token);
        }
        if let Some(path) = &opts.chat_template {
            tok.chat_template = Some(
                std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read --chat-template {}", path.display()))?,
            );
        }
    }
    let load_format = match (opts.load_format, &source) {
        (LoadFormat::Auto, _) => default_format,
        (LoadFormat::Dummy, _) => LoadFormat::Dummy,
        (f, _) if f == default_format => f,
        (f, s) => bail!(
            "--load-format {} does not fit model {} ({})",
            f.name(),
            opts.model,
            match s {
                ModelSource::Gguf(_) => "a GGUF file: use gguf or dummy",
                ModelSource::Folder(_) => "a safetensors folder: use safetensors or dummy",
                _ => "a config without weights: use dummy",
            }
        ),
    };
    Ok(ModelInfo {
        source,
        config,
        tokenizer,
        load_format,
    })
}

/// The dtype activations run in for weights in `weights` on `device`: the same, except for bf16
/// weights on the CPU, whose products take f32 rows (`matmul::linear`, with the rows rounded to
/// bf16 inside) and whose norms, rotary embeddings and attention run in f32, as candle's CPU
/// kernels do best.
pub fn activation_dtype(weights: DType, device: &Device) -> DType {
    if device.is_cpu() && weights == DType::BF16 {
        DType::F32
    } else {
        weights
    }
}

/// Loads the weights of an inspected model onto `device` in `dtype`.
pub fn load_weights(
    info: &ModelInfo,
    max_positions: usize,
    (dtype, quant): (DType, Quantization),
    device: &Device,
    progress: &Progress,
) -> Result<Llama> {
    let cfg = &info.config;
    let need = match quant {
        Quantization::None => cfg.num_parameters() * dtype.size_in_bytes() as u64,
        // A byte and an eighth (int8) or three quarters (int4, its LM head int8) per weight,
        // and the embedding kept in f32 as well.
        Quantization::Int8 => {
            cfg.num_parameters() * 9 / 8 + (cfg.vocab_size * cfg.hidden_size * 4) as u64
        }
        Quantization::Int4 => {
            let head = (cfg.vocab_size * cfg.hidden_size) as u64;
            cfg.num_parameters() * 3 / 4 + head * 3 / 8 + head * 4
        }
    };
    if device.is_cpu()
        && let Some(avail) = crate::device::available_host_memory()
        && need > avail
    {
        bail!(
            "the weights need {} in {} but only {} of memory is available ({})",
            crate::util::human_bytes(need),
            crate::commands::dtype_name(dtype),
            crate::util::human_bytes(avail),
            if dtype.size_in_bytes() > 2 {
                "try --dtype bf16, half the bytes, or a smaller model"
            } else {
                "try a smaller model"
            }
        );
    }
    #[cfg(feature = "cuda")]
    if let Device::Cuda(dev) = device {
        let (free, _) = crate::gpu::memory(dev)?;
        if need > free as u64 {
            bail!(
                "the weights need {} in {} but the GPU has {} free",
                crate::util::human_bytes(need),
                crate::commands::dtype_name(dtype),
                crate::util::human_bytes(free as u64)
            );
        }
    }
    if device.is_cpu() && dtype == DType::BF16 {
        progress.info(quant.describe_bf16_products());
    }
    // Quantized weights are made from the source's f32 values, whatever precision their
    // products then keep (`dtype`).
    let source_dtype = match quant {
        Quantization::None => dtype,
        Quantization::Int8 | Quantization::Int4 => DType::F32,
    };
    let bar = progress.bar(cfg.num_hidden_layers as u64, "loading");
    let on_layer = |_: usize| bar.inc(1);
    let model = match (info.load_format, &info.source) {
        (LoadFormat::Dummy, _) => {
            let mut w = DummyWeights::new(source_dtype, device);
            Llama::load(cfg, &mut w, max_positions, (dtype, quant), device, on_layer)
        }
        (LoadFormat::Gguf, ModelSource::Gguf(p)) => {
            let mut w = GgufWeights::open(p)?;
            let llama_cpp_permuted = w
                .content()
                .metadata
                .get("general.architecture")
                .and_then(|v| v.to_string().ok())
                .is_some_and(|a| a == "llama");
            let heads = llama_cpp_permuted.then(|| (cfg.num_attention_heads, cfg.num_kv_heads()));
            w.configure(source_dtype, device, heads);
            Llama::load(cfg, &mut w, max_positions, (dtype, quant), device, on_layer)
        }
        (LoadFormat::Safetensors, ModelSource::Folder(dir)) => {
            let mut w = SafetensorsWeights::open(dir, source_dtype, device)?;
            Llama::load(
                cfg,
                &mut w as &mut dyn WeightSource,
                max_positions,
                (dtype, quant),
                device,
                on_layer,
            )
        }
        (f, s) => bail!("cannot load {s:?} with --load-format {}", f.name()),
    };
    bar.finish_and_clear();
    model
}

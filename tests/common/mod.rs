//! Shared set-up for the end-to-end tests: the real SmolLM2 model from `assets/` (fetched by
//! `datasets/fetch.sh`), an engine over it, and an independent reference.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};

use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
use candle_core::{DType, Device, Tensor};
use candle_transformers::models::quantized_llama::ModelWeights;
use offline_bench::engine::sampler::SamplingParams;
use offline_bench::engine::{Engine, EngineConfig};
use offline_bench::model::llama::Llama;
use offline_bench::model::{self, LoadFormat, ModelInfo, ModelOptions, Quantization};
use offline_bench::progress::Progress;

/// The assets folder (`OFFLINE_BENCH_ASSETS`, else `./assets`).
pub fn assets() -> PathBuf {
    let dir = std::env::var_os("OFFLINE_BENCH_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets"));
    assert!(
        dir.join("SmolLM2-135M-Instruct.Q4_1.gguf").is_file(),
        "test assets missing in {}: run datasets/fetch.sh first",
        dir.display()
    );
    dir
}

pub fn smollm_gguf() -> PathBuf {
    assets().join("SmolLM2-135M-Instruct.Q4_1.gguf")
}

pub fn sharegpt() -> PathBuf {
    assets().join("ShareGPT_V3_unfiltered_cleaned_split.json")
}

pub fn llama3_tokenizer() -> PathBuf {
    assets().join("llama3-tokenizer/tokenizer.json")
}

/// The binary under test.
pub fn bin() -> std::process::Command {
    std::process::Command::new(env!("CARGO_BIN_EXE_offline-bench"))
}

/// Runs the binary with `args` and extra environment; returns (exit code, stdout, stderr).
pub fn run(args: &[&str], envs: &[(&str, &str)]) -> (i32, String, String) {
    let out = bin()
        .args(args)
        .envs(envs.iter().copied())
        .output()
        .expect("run offline-bench");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// SmolLM2 (config, tokenizer, f32 weights), loaded once per test binary.
pub fn smollm() -> &'static (ModelInfo, Llama) {
    static MODEL: OnceLock<(ModelInfo, Llama)> = OnceLock::new();
    MODEL.get_or_init(|| load_smollm(DType::F32, Quantization::None))
}

/// SmolLM2 with bf16 weights (`--dtype bf16` on the CPU), loaded once per test binary.
pub fn smollm_bf16() -> &'static Llama {
    static MODEL: OnceLock<Llama> = OnceLock::new();
    MODEL.get_or_init(|| load_smollm(DType::BF16, Quantization::None).1)
}

/// SmolLM2 with int8 weights (`--quantization int8`), loaded once per test binary.
pub fn smollm_int8() -> &'static Llama {
    static MODEL: OnceLock<Llama> = OnceLock::new();
    MODEL.get_or_init(|| load_smollm(DType::F32, Quantization::Int8).1)
}

/// SmolLM2 with int8 weights whose products keep bf16's precision (`--quantization int8
/// --dtype bf16`), loaded once per test binary.
pub fn smollm_int8_bf16() -> &'static Llama {
    static MODEL: OnceLock<Llama> = OnceLock::new();
    MODEL.get_or_init(|| load_smollm(DType::BF16, Quantization::Int8).1)
}

/// SmolLM2 with 4-bit weights (`--quantization int4`), loaded once per test binary.
pub fn smollm_int4() -> &'static Llama {
    static MODEL: OnceLock<Llama> = OnceLock::new();
    MODEL.get_or_init(|| load_smollm(DType::F32, Quantization::Int4).1)
}

/// SmolLM2 with 4-bit weights whose products keep bf16's precision (`--quantization int4
/// --dtype bf16`), loaded once per test binary.
pub fn smollm_int4_bf16() -> &'static Llama {
    static MODEL: OnceLock<Llama> = OnceLock::new();
    MODEL.get_or_init(|| load_smollm(DType::BF16, Quantization::Int4).1)
}

fn load_smollm(dtype: DType, quant: Quantization) -> (ModelInfo, Llama) {
    let info = model::inspect(
        &ModelOptions {
            model: smollm_gguf().display().to_string(),
            tokenizer: None,
            chat_template: None,
            load_format: LoadFormat::Auto,
            revision: None,
        },
        &Progress::silent(),
    )
    .expect("inspect SmolLM2");
    let llama = model::load_weights(
        &info,
        2048,
        (dtype, quant),
        &Device::Cpu,
        &Progress::silent(),
    )
    .expect("load SmolLM2");
    (info, llama)
}

/// An engine over SmolLM2 with the given limits, greedy.
pub fn engine(block_size: usize, num_blocks: usize, max_seqs: usize, max_tokens: usize) -> Engine {
    sampling_engine(
        (block_size, num_blocks, max_seqs, max_tokens),
        SamplingParams::greedy(),
    )
}

/// An engine over SmolLM2 with the given limits (as [`engine`]) and sampling, prefix caching on
/// (the CLI's default).
pub fn sampling_engine(limits: (usize, usize, usize, usize), sampling: SamplingParams) -> Engine {
    configured_engine(limits, sampling, true)
}

/// An engine over SmolLM2, greedy, with prefix caching off.
pub fn engine_without_prefix_caching(limits: (usize, usize, usize, usize)) -> Engine {
    configured_engine(limits, SamplingParams::greedy(), false)
}

fn configured_engine(
    limits: (usize, usize, usize, usize),
    sampling: SamplingParams,
    enable_prefix_caching: bool,
) -> Engine {
    let model = smollm().1.clone();
    engine_over(model, limits, DType::F32, sampling, enable_prefix_caching)
}

/// An engine over `model` with the given limits (as [`engine`]), cache type and `sampling`.
pub fn engine_over(
    model: Llama,
    (block_size, num_blocks, max_seqs, max_tokens): (usize, usize, usize, usize),
    kv_cache_dtype: DType,
    sampling: SamplingParams,
    enable_prefix_caching: bool,
) -> Engine {
    Engine::new(
        model,
        EngineConfig {
            block_size,
            max_num_seqs: max_seqs,
            max_num_batched_tokens: max_tokens,
            max_model_len: 2048,
            num_blocks,
            kv_cache_dtype,
            enable_prefix_caching,
        },
        sampling,
    )
    .expect("engine")
}

/// The eight fixture prompts, tokenized.
pub fn prompts() -> Vec<Vec<u32>> {
    let text = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("datasets/fixtures/prompts.json"),
    )
    .expect("fixture prompts");
    let list: Vec<String> = serde_json::from_str(&text).expect("fixture JSON");
    let tok = smollm().0.tokenizer.as_ref().expect("GGUF tokenizer");
    list.iter()
        .map(|p| tok.encode(p, true).expect("encode"))
        .collect()
}

/// candle-transformers' `quantized_llama` (its own attention, rotary and KV cache; one sequence
/// at a time) over the same weights dequantized to f32: an independent reference.
fn reference_model() -> &'static Mutex<ModelWeights> {
    static REF: OnceLock<Mutex<ModelWeights>> = OnceLock::new();
    REF.get_or_init(|| {
        let path = smollm_gguf();
        let mut file = std::fs::File::open(&path).expect("open GGUF");
        let content = gguf_file::Content::read(&mut file).expect("read GGUF");
        let mut names: Vec<&String> = content.tensor_infos.keys().collect();
        names.sort();
        let tensors: Vec<(String, QTensor)> = names
            .iter()
            .map(|n| {
                let t = content
                    .tensor(&mut file, n, &Device::Cpu)
                    .and_then(|q| q.dequantize(&Device::Cpu))
                    .and_then(|t| QTensor::quantize(&t, GgmlDType::F32))
                    .expect("dequantize");
                (n.to_string(), t)
            })
            .collect();
        let mut buf = std::io::Cursor::new(Vec::new());
        let meta: Vec<(&str, &gguf_file::Value)> = content
            .metadata
            .iter()
            .map(|(k, v)| (k.as_str(), v))
            .collect();
        let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        gguf_file::write(&mut buf, &meta, &refs).expect("write f32 GGUF");
        buf.set_position(0);
        let f32_content = gguf_file::Content::read(&mut buf).expect("reread");
        let model =
            ModelWeights::from_gguf(f32_content, &mut buf, &Device::Cpu).expect("reference");
        Mutex::new(model)
    })
}

/// Greedy tokens of the reference for `prompt`.
pub fn reference_greedy(prompt: &[u32], n: usize) -> Vec<u32> {
    let mut m = reference_model().lock().expect("reference lock");
    m.clear_kv_cache();
    let mut out = Vec::with_capacity(n);
    let mut input = Tensor::new(prompt, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let mut pos = 0;
    for _ in 0..n {
        let logits = m.forward(&input, pos).expect("reference forward");
        pos += input.dim(1).unwrap();
        let next = logits
            .squeeze(0)
            .unwrap()
            .argmax(0)
            .unwrap()
            .to_scalar::<u32>()
            .unwrap();
        out.push(next);
        input = Tensor::new(&[next], &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
    }
    out
}

/// Reference tokens for every fixture prompt (computed once).
pub fn reference_outputs(n: usize) -> &'static Vec<Vec<u32>> {
    static OUT: OnceLock<Vec<Vec<u32>>> = OnceLock::new();
    OUT.get_or_init(|| prompts().iter().map(|p| reference_greedy(p, n)).collect())
}

/// Writes SmolLM2 as an HF model folder (config.json, model.safetensors with HF names and row
/// order, tokenizer.json, tokenizer_config.json), from the GGUF's weights dequantized to f32.
pub fn write_hf_folder(dir: &std::path::Path) {
    use offline_bench::model::llama::weight_shapes;
    use offline_bench::model::weights::{GgufWeights, WeightSource};
    let (info, _) = smollm();
    let cfg = &info.config;
    let mut g = GgufWeights::open(&smollm_gguf()).expect("open GGUF");
    g.configure(
        DType::F32,
        &Device::Cpu,
        Some((cfg.num_attention_heads, cfg.num_kv_heads())),
    );
    let tensors: std::collections::HashMap<String, Tensor> = weight_shapes(cfg)
        .into_iter()
        .map(|(name, shape)| {
            let t = g.get(&name, &shape).expect("weight");
            (name, t)
        })
        .collect();
    std::fs::create_dir_all(dir).unwrap();
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).expect("save");
    std::fs::copy(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/smollm2-135m.json"),
        dir.join("config.json"),
    )
    .unwrap();
    let tok = info.tokenizer.as_ref().unwrap();
    tok.save(&dir.join("tokenizer.json")).unwrap();
    let tc = serde_json::json!({
        "chat_template": tok.chat_template,
        "bos_token": tok.bos_token,
        "eos_token": tok.eos_token,
    });
    std::fs::write(dir.join("tokenizer_config.json"), tc.to_string()).unwrap();
}

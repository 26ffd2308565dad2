//! Command-line flags, named as vLLM names them where the concept exists.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::device::DeviceSpec;
use crate::model::{LoadFormat, Quantization};

#[derive(Parser, Debug)]
#[command(
    name = "offline-bench",
    version = concat!(env!("CARGO_PKG_VERSION"), " (", env!("OFFLINE_BENCH_COMMIT"), ")"),
    about = "Offline LLM throughput benchmark: a paged-KV continuous-batching engine in one process"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run a workload through the engine and report generations/s and tokens/s.
    Throughput(ThroughputArgs),
    /// Greedy continuation of one prompt (check that weights and tokenizer are right).
    Generate(GenerateArgs),
    /// Time fixed batch x input x output shapes, their kernels and the device's roofline.
    Shapes(ShapesArgs),
    /// Compare every CUDA kernel, then the engine's tokens, with the CPU's (run before timing).
    SelfCheck(SelfCheckArgs),
    /// Throughput reports (--output-json) or shapes sweeps (shapes.json) side by side, with
    /// ratios against the first.
    Compare(CompareArgs),
}

impl Command {
    /// `--threads`, for the commands that run a model on the CPU.
    pub fn threads(&self) -> Option<usize> {
        match self {
            Command::Throughput(a) => a.model.threads,
            Command::Generate(a) => a.model.threads,
            Command::Shapes(a) => a.model.threads,
            Command::SelfCheck(_) | Command::Compare(_) => None,
        }
    }
}

#[derive(Args, Debug)]
pub struct CompareArgs {
    /// Report files (throughput --output-json, or shapes.json), one column each; several runs
    /// of one configuration as one column are joined by commas (`a1.json,a2.json`: medians).
    #[arg(required = true, num_args = 1..)]
    pub runs: Vec<String>,
}

#[derive(Args, Debug)]
pub struct SelfCheckArgs {
    /// The GPU to check (cuda or cuda:N).
    #[arg(long, default_value = "cuda")]
    pub device: DeviceSpec,
    /// Only the kernel checks, not the engine comparison.
    #[arg(long)]
    pub kernels_only: bool,
}

/// Which model, and how to load it.
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// A .gguf file, an HF model folder, a preset (smollm2-135m, llama-3-8b, llama-3.1-8b,
    /// mistral-7b, qwen2-7b) or a hub id (org/name).
    #[arg(long)]
    pub model: String,
    /// tokenizer.json (or a folder holding one); default: the model's own.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// A Jinja chat template file, overriding the tokenizer's.
    #[arg(long)]
    pub chat_template: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = LoadFormat::Auto)]
    pub load_format: LoadFormat,
    /// auto (f32 on the CPU, bf16 on CUDA), f32, f16 or bf16. On the CPU, bf16 keeps the
    /// projection weights in bf16 (AVX-512 BF16 dot products) and activations in f32.
    #[arg(long, default_value = "auto")]
    pub dtype: String,
    /// none, int8 or int4: the projections and the LM head as int8 in blocks of 32 with an f16
    /// scale each (llama.cpp's Q8_0 scheme), or the projections as 4-bit codes in blocks of 32
    /// with an f16 scale and minimum each (Q4_1's) and the LM head as int8; quantized at load;
    /// CPU with AVX2 and FMA or AVX-512, f32 activations; products in f32, or with `--dtype
    /// bf16` in bf16 (on AMX where the CPU has it).
    #[arg(long, value_enum, default_value_t = Quantization::None)]
    pub quantization: Quantization,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: DeviceSpec,
    /// CPU threads for the forward pass and everything else parallel (llama.cpp's `-t`);
    /// default: RAYON_NUM_THREADS, else the physical cores. A pass's waiting workers spin (and
    /// yield), so more threads than cores gains nothing.
    #[arg(long, value_parser = positive)]
    pub threads: Option<usize>,
    /// Hub revision (branch, tag or commit) for hub ids.
    #[arg(long)]
    pub revision: Option<String>,
    /// Longest sequence (prompt + output); default: the model's maximum.
    #[arg(long)]
    pub max_model_len: Option<usize>,
}

/// Engine limits and sampling.
#[derive(Args, Debug, Clone)]
pub struct EngineArgs {
    /// Tokens per KV block.
    #[arg(long, default_value_t = 16)]
    pub block_size: usize,
    /// Most sequences in one step.
    #[arg(long, default_value_t = 256)]
    pub max_num_seqs: usize,
    /// Most tokens in one step (prefill chunks are cut to fit).
    #[arg(long, default_value_t = 8192)]
    pub max_num_batched_tokens: usize,
    /// KV cache budget on the CPU, e.g. 4GiB or 512MiB (on CUDA the budget is what
    /// --gpu-memory-utilization leaves after the weights and the activation peak).
    #[arg(long, default_value = "4GiB", value_parser = crate::util::parse_bytes)]
    pub kv_cache_memory: u64,
    /// Fraction of the GPU's memory the run may use (weights, activations and the KV cache).
    #[arg(long, default_value_t = 0.9)]
    pub gpu_memory_utilization: f64,
    /// KV cache element type: auto (the model's dtype on CUDA, f16 on the CPU as in llama.cpp),
    /// f32, f16, bf16 or fp8 (E4M3, unscaled, as vLLM's fp8: half the bytes of f16, 3 mantissa
    /// bits).
    #[arg(long, default_value = "auto")]
    pub kv_cache_dtype: String,
    /// Use exactly this many KV blocks instead of sizing from the budget.
    #[arg(long)]
    pub num_kv_blocks: Option<usize>,
    /// Reuse the cached K/V of full blocks an earlier sequence computed for the same prefix
    /// (on by default, as in vLLM V1; the hit rate is printed after the run). The shapes mode
    /// never reuses K/V: it times every prefill in full, as vLLM's latency benchmark does.
    #[arg(long, overrides_with = "no_enable_prefix_caching")]
    pub enable_prefix_caching: bool,
    /// Compute every prompt in full, as vLLM's latency benchmark and V0 do.
    #[arg(long, overrides_with = "enable_prefix_caching")]
    pub no_enable_prefix_caching: bool,
    /// Seed for sampling the workload and for random sampling.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// 0 = off.
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// No progress bars or status lines.
    #[arg(long)]
    pub quiet: bool,
}

impl EngineArgs {
    /// Whether prefix caching is on: unless the last of the two flags turned it off.
    pub fn prefix_caching(&self) -> bool {
        !self.no_enable_prefix_caching
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DatasetName {
    /// vLLM's ShareGPT sampling: first turn as prompt, second turn's length as output.
    Sharegpt,
    /// First --prompt-turns turns through the chat template, --output-len (250) tokens.
    Chat,
    /// Synthetic prompts of --input-len tokens.
    Random,
    /// vLLM's: --prefix-repetition-num-prefixes random prefixes, each shared by an equal share
    /// of the prompts, which go on with random suffixes.
    #[value(name = "prefix_repetition", alias = "prefix-repetition")]
    PrefixRepetition,
}

#[derive(Args, Debug)]
pub struct ThroughputArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub engine: EngineArgs,
    #[arg(long, value_enum, default_value_t = DatasetName::Sharegpt)]
    pub dataset_name: DatasetName,
    /// The ShareGPT JSON file; default: the hub's copy (cached, or downloaded).
    #[arg(long)]
    pub dataset_path: Option<PathBuf>,
    /// Requests to run; default 1000 on CUDA (as vLLM), 64 on the CPU.
    #[arg(long, value_parser = positive)]
    pub num_prompts: Option<usize>,
    /// Outputs per request, as vLLM's `--n`: each prompt generates n sequences, each with its
    /// own random stream (identical under greedy sampling; pass --temperature 1 for vLLM's).
    #[arg(long, default_value_t = 1, value_parser = positive)]
    pub n: usize,
    /// Prompt length of the random dataset.
    #[arg(long)]
    pub input_len: Option<usize>,
    /// Fixed output length (default: the dataset's; 128 for random, 250 for chat).
    #[arg(long)]
    pub output_len: Option<usize>,
    #[arg(long, default_value_t = 0.0)]
    pub random_range_ratio: f64,
    #[arg(long, default_value_t = 0)]
    pub prefix_len: usize,
    /// Turns of each conversation in a chat prompt.
    #[arg(long, default_value_t = 3)]
    pub prompt_turns: usize,
    /// prefix_repetition: tokens of each shared prefix.
    #[arg(long, default_value_t = 256)]
    pub prefix_repetition_prefix_len: usize,
    /// prefix_repetition: tokens of each prompt's own suffix.
    #[arg(long, default_value_t = 256)]
    pub prefix_repetition_suffix_len: usize,
    /// prefix_repetition: distinct prefixes (--num-prompts is divided among them).
    #[arg(long, default_value_t = 10)]
    pub prefix_repetition_num_prefixes: usize,
    /// prefix_repetition: output tokens per request.
    #[arg(long, default_value_t = 128)]
    pub prefix_repetition_output_len: usize,
    /// Save the sampled, tokenized requests to FILE.
    #[arg(long)]
    pub save_workload: Option<PathBuf>,
    /// Run the requests saved in FILE (no dataset or tokenizer needed).
    #[arg(long, conflicts_with_all = ["dataset_path", "input_len"])]
    pub workload: Option<PathBuf>,
    /// Write the report, with per-request figures, to FILE.
    #[arg(long)]
    pub output_json: Option<PathBuf>,
    /// Sample the workload, print its statistics, and stop (no model weights are loaded).
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Args, Debug)]
pub struct ShapesArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Sequences per shape: a comma list, or ranges (1..128 doubles; 128..512:128 steps).
    #[arg(long, default_value = "1,8,32")]
    pub batch_sizes: String,
    /// Prompt tokens per sequence (list or ranges, as --batch-sizes).
    #[arg(long, default_value = "128,512")]
    pub input_lens: String,
    /// Tokens generated per sequence: the first by the prefill, the rest by decode steps.
    #[arg(long, default_value = "32")]
    pub output_lens: String,
    /// Unmeasured iterations of each shape first.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Measured iterations of each shape (medians are reported).
    #[arg(long, default_value_t = 3, value_parser = positive)]
    pub iters: usize,
    /// Skip the extra iteration that times each kernel.
    #[arg(long)]
    pub no_kernels: bool,
    /// Write shapes.json, shapes.csv, throughput.svg and kernels.svg into DIR.
    #[arg(long)]
    pub output_dir: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub engine: EngineArgs,
    /// The prompt text.
    #[arg(long)]
    pub prompt: String,
    #[arg(long, default_value_t = 32, value_parser = positive)]
    pub max_tokens: usize,
    /// Render the prompt as one user message through the chat template first.
    #[arg(long)]
    pub chat: bool,
}

/// A count that must be at least 1.
fn positive(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("'{text}' is not a whole number")),
    }
}

/// One line for a clap error: its message and any `[possible values: ...]` hint.
pub fn one_line(err: &clap::Error) -> String {
    let text = err.render().to_string();
    text.lines()
        .map(str::trim)
        .filter(|l| {
            !l.is_empty() && !l.starts_with("For more information") && !l.starts_with("Usage:")
        })
        .collect::<Vec<_>>()
        .join(" ")
}

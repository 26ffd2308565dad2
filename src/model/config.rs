//! Model hyper-parameters: read from an HF `config.json`, a GGUF file's metadata, or a preset in
//! `models/` (compiled into the binary, so `--model llama-3-8b --load-format dummy` needs no file).

use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use candle_core::quantized::gguf_file;
use serde::{Deserialize, Serialize};

/// `rope_scaling` of an HF config (only the kinds the Llama family uses).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RopeScaling {
    #[serde(default, alias = "type")]
    pub rope_type: Option<String>,
    #[serde(default)]
    pub factor: Option<f64>,
    #[serde(default)]
    pub low_freq_factor: Option<f64>,
    #[serde(default)]
    pub high_freq_factor: Option<f64>,
    #[serde(default)]
    pub original_max_position_embeddings: Option<usize>,
}

/// What a preset adds to an HF config: where its chat template is and its special tokens.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PresetExtras {
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub chat_template: Option<String>,
    #[serde(default)]
    pub bos_token: Option<String>,
    #[serde(default)]
    pub eos_token: Option<String>,
}

/// The hyper-parameters of a Llama-family decoder, in HF `config.json` terms.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ModelConfig {
    #[serde(default)]
    pub architectures: Vec<String>,
    #[serde(default)]
    pub model_type: String,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    pub vocab_size: usize,
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_rms_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    #[serde(default)]
    pub rope_scaling: Option<RopeScaling>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub sliding_window: Option<usize>,
    #[serde(default)]
    pub bos_token_id: Option<serde_json::Value>,
    #[serde(default)]
    pub eos_token_id: Option<serde_json::Value>,
    #[serde(default)]
    pub offline_bench: Option<PresetExtras>,
}

fn default_max_positions() -> usize {
    4096
}
fn default_rms_eps() -> f64 {
    1e-5
}
fn default_rope_theta() -> f64 {
    10_000.0
}

/// The presets in `models/`, by name.
const PRESETS: &[(&str, &str)] = &[
    (
        "smollm2-135m",
        include_str!("../../models/smollm2-135m.json"),
    ),
    ("llama-3-8b", include_str!("../../models/llama-3-8b.json")),
    (
        "llama-3.1-8b",
        include_str!("../../models/llama-3.1-8b.json"),
    ),
    ("mistral-7b", include_str!("../../models/mistral-7b.json")),
    ("qwen2-7b", include_str!("../../models/qwen2-7b.json")),
];

/// Chat templates the presets refer to, by file name.
const TEMPLATES: &[(&str, &str)] = &[
    (
        "llama-3.jinja",
        include_str!("../../models/templates/llama-3.jinja"),
    ),
    (
        "llama-3.1.jinja",
        include_str!("../../models/templates/llama-3.1.jinja"),
    ),
    (
        "mistral-instruct-v0.2.jinja",
        include_str!("../../models/templates/mistral-instruct-v0.2.jinja"),
    ),
    (
        "smollm2.jinja",
        include_str!("../../models/templates/smollm2.jinja"),
    ),
    (
        "chatml-qwen2.jinja",
        include_str!("../../models/templates/chatml-qwen2.jinja"),
    ),
];

pub fn preset_names() -> Vec<&'static str> {
    PRESETS.iter().map(|(n, _)| *n).collect()
}

impl ModelConfig {
    /// A preset by name, if there is one.
    pub fn preset(name: &str) -> Option<Result<Self>> {
        PRESETS.iter().find(|(n, _)| *n == name).map(|(n, text)| {
            let cfg: Self = serde_json::from_str(text)
                .with_context(|| format!("preset {n} is not a valid config"))?;
            cfg.validate().with_context(|| format!("preset {n}"))?;
            Ok(cfg)
        })
    }

    /// Reads an HF-style `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read model config {}", path.display()))?;
        let cfg: Self = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a valid model config.json", path.display()))?;
        cfg.validate().with_context(|| path.display().to_string())?;
        Ok(cfg)
    }

    /// Reads the hyper-parameters of a GGUF file (`{arch}.*` metadata keys).
    pub fn from_gguf(content: &gguf_file::Content) -> Result<Self> {
        let md = &content.metadata;
        let arch = md
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .ok_or_else(|| anyhow!("GGUF metadata has no general.architecture"))?
            .clone();
        let get = |key: &str| -> Result<&gguf_file::Value> {
            md.get(&format!("{arch}.{key}"))
                .ok_or_else(|| anyhow!("GGUF metadata has no {arch}.{key}"))
        };
        let get_usize = |key: &str| -> Result<usize> {
            let v = get(key)?;
            v.to_u32()
                .map(|x| x as usize)
                .or_else(|_| v.to_u64().map(|x| x as usize))
                .map_err(|e| anyhow!("GGUF {arch}.{key}: {e}"))
        };
        let get_f64 = |key: &str, default: f64| -> f64 {
            get(key)
                .ok()
                .and_then(|v| v.to_f32().ok())
                .map(f64::from)
                .unwrap_or(default)
        };
        let heads = get_usize("attention.head_count")?;
        let hidden = get_usize("embedding_length")?;
        let vocab = match get_usize("vocab_size") {
            Ok(v) => v,
            Err(_) => md
                .get("tokenizer.ggml.tokens")
                .and_then(|v| v.to_vec().ok())
                .map(Vec::len)
                .ok_or_else(|| anyhow!("GGUF metadata gives no vocabulary size"))?,
        };
        let cfg = Self {
            architectures: vec![],
            model_type: arch.clone(),
            hidden_size: hidden,
            intermediate_size: get_usize("feed_forward_length")?,
            num_hidden_layers: get_usize("block_count")?,
            num_attention_heads: heads,
            num_key_value_heads: Some(get_usize("attention.head_count_kv").unwrap_or(heads)),
            head_dim: get_usize("attention.key_length").ok(),
            vocab_size: vocab,
            max_position_embeddings: get_usize("context_length").unwrap_or(4096),
            rms_norm_eps: get_f64("attention.layer_norm_rms_epsilon", 1e-5),
            rope_theta: get_f64("rope.freq_base", 10_000.0),
            rope_scaling: None,
            tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
            attention_bias: content.tensor_infos.contains_key("blk.0.attn_q.bias"),
            sliding_window: None,
            bos_token_id: md
                .get("tokenizer.ggml.bos_token_id")
                .and_then(|v| v.to_u32().ok())
                .map(Into::into),
            eos_token_id: md
                .get("tokenizer.ggml.eos_token_id")
                .and_then(|v| v.to_u32().ok())
                .map(Into::into),
            offline_bench: None,
        };
        cfg.validate().context("GGUF metadata")?;
        Ok(cfg)
    }

    /// Rejects configs this engine cannot run, naming the offending value.
    pub fn validate(&self) -> Result<()> {
        let family = self.family()?;
        if self.hidden_size == 0 || self.num_hidden_layers == 0 || self.vocab_size == 0 {
            bail!("hidden_size, num_hidden_layers and vocab_size must be positive");
        }
        if self.num_attention_heads == 0
            || self.head_dim() == 0
            || !self.head_dim().is_multiple_of(2)
        {
            bail!(
                "num_attention_heads ({}) and an even head_dim ({}) are required",
                self.num_attention_heads,
                self.head_dim()
            );
        }
        let kv = self.num_kv_heads();
        if kv == 0 || !self.num_attention_heads.is_multiple_of(kv) {
            bail!(
                "num_attention_heads ({}) must be a multiple of num_key_value_heads ({kv})",
                self.num_attention_heads
            );
        }
        if let Some(w) = self.sliding_window
            && w < self.max_position_embeddings
            && family != Family::Qwen2
        {
            bail!(
                "sliding-window attention (window {w}) is not supported; this engine attends to the whole context"
            );
        }
        if let Some(s) = &self.rope_scaling {
            match s.rope_type.as_deref() {
                None | Some("default") | Some("llama3") | Some("linear") => {}
                Some(other) => bail!("rope_scaling type '{other}' is not supported"),
            }
        }
        Ok(())
    }

    /// The model family, from `model_type` or `architectures`.
    pub fn family(&self) -> Result<Family> {
        let arch = self.architectures.first().map(String::as_str).unwrap_or("");
        match (self.model_type.as_str(), arch) {
            ("llama", _) | (_, "LlamaForCausalLM") => Ok(Family::Llama),
            ("mistral", _) | (_, "MistralForCausalLM") => Ok(Family::Llama),
            ("qwen2", _) | (_, "Qwen2ForCausalLM") => Ok(Family::Qwen2),
            (t, a) => bail!(
                "unsupported model architecture '{}' (supported: llama, mistral, qwen2)",
                if a.is_empty() { t } else { a }
            ),
        }
    }

    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Qwen2 always has biases on q, k and v; others say so with `attention_bias`.
    pub fn qkv_bias(&self) -> bool {
        self.attention_bias || matches!(self.family(), Ok(Family::Qwen2))
    }

    /// Parameters of the weights, embedding and head included.
    pub fn num_parameters(&self) -> u64 {
        let h = self.hidden_size as u64;
        let q = (self.num_attention_heads * self.head_dim()) as u64;
        let kv = (self.num_kv_heads() * self.head_dim()) as u64;
        let i = self.intermediate_size as u64;
        let bias = if self.qkv_bias() { q + 2 * kv } else { 0 };
        let per_layer = h * (q + 2 * kv) + bias + q * h + 3 * h * i + 2 * h;
        let embed = self.vocab_size as u64 * h;
        let head = if self.tie_word_embeddings { 0 } else { embed };
        self.num_hidden_layers as u64 * per_layer + embed + head + h
    }

    /// The preset's chat template text and special tokens, if this config is a preset.
    pub fn preset_chat_template(&self) -> Option<String> {
        let file = self.offline_bench.as_ref()?.chat_template.as_deref()?;
        TEMPLATES
            .iter()
            .find(|(n, _)| *n == file)
            .map(|(_, t)| t.to_string())
    }
}

/// Model families with distinct weight layouts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// Llama 2/3/3.1, Mistral (no sliding window), SmolLM2.
    Llama,
    /// Llama with q/k/v biases.
    Qwen2,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_parse_and_have_templates() {
        for name in preset_names() {
            let cfg = ModelConfig::preset(name).unwrap().unwrap();
            assert!(cfg.preset_chat_template().is_some(), "{name}");
        }
        assert!(ModelConfig::preset("nope").is_none());
    }

    #[test]
    fn parameter_counts_match_the_real_models() {
        let l3 = ModelConfig::preset("llama-3-8b").unwrap().unwrap();
        assert_eq!(l3.num_parameters(), 8_030_261_248);
        let smol = ModelConfig::preset("smollm2-135m").unwrap().unwrap();
        assert_eq!(smol.num_parameters(), 134_515_008);
        // Qwen2-7B's 7.62B, q/k/v biases included.
        let qwen = ModelConfig::preset("qwen2-7b").unwrap().unwrap();
        assert_eq!(qwen.num_parameters(), 7_615_616_512);
    }

    #[test]
    fn bad_configs_are_named() {
        let mut cfg = ModelConfig::preset("llama-3-8b").unwrap().unwrap();
        cfg.num_key_value_heads = Some(5);
        assert!(cfg.validate().unwrap_err().to_string().contains("multiple"));
        cfg.num_key_value_heads = Some(8);
        cfg.model_type = "gpt2".into();
        cfg.architectures = vec!["GPT2LMHeadModel".into()];
        assert!(
            cfg.validate()
                .unwrap_err()
                .to_string()
                .contains("GPT2LMHeadModel")
        );
    }
}

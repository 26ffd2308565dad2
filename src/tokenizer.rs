//! The model's tokenizer and chat template, wherever they come from.
//!
//! A `tokenizer.json` (HF), a GGUF file's embedded vocabulary, or a hub repository all end up as
//! one [`TextTokenizer`]: token ids for the workload, text for `generate`, and the Jinja chat
//! template the `chat` workload renders prompts with.

use std::collections::HashSet;
use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use candle_core::quantized::gguf_file;
use candle_core::quantized::tokenizer::TokenizerFromGguf;
use tokenizers::Tokenizer;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;

/// A tokenizer plus what a chat template needs to render (template, BOS and EOS strings).
pub struct TextTokenizer {
    inner: Tokenizer,
    /// Where it was read from, for the report.
    pub source: String,
    pub chat_template: Option<String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
}

impl TextTokenizer {
    /// Reads a `tokenizer.json`; a `tokenizer_config.json` beside it supplies the chat template
    /// and the BOS/EOS strings, as in an HF model folder.
    pub fn from_file(path: &Path) -> Result<Self> {
        if !path.is_file() {
            bail!("tokenizer file {} does not exist", path.display());
        }
        let inner = Tokenizer::from_file(path)
            .map_err(|e| anyhow!("cannot read tokenizer {}: {e}", path.display()))?;
        let mut tok = Self {
            inner,
            source: path.display().to_string(),
            chat_template: None,
            bos_token: None,
            eos_token: None,
        };
        if let Some(config) = path.parent().map(|d| d.join("tokenizer_config.json"))
            && config.is_file()
        {
            tok.read_tokenizer_config(&config)?;
        }
        Ok(tok)
    }

    /// Rebuilds the tokenizer from a GGUF file's `tokenizer.ggml.*` metadata.
    pub fn from_gguf(content: &gguf_file::Content, path: &Path) -> Result<Self> {
        let mut inner = Tokenizer::from_gguf(content).map_err(|e| {
            anyhow!(
                "cannot rebuild a tokenizer from {} (pass --tokenizer): {e}",
                path.display()
            )
        })?;
        let meta = |k: &str| content.metadata.get(k);
        let pre = meta("tokenizer.ggml.pre").and_then(|v| v.to_string().ok().cloned());
        let add_space_prefix = meta("tokenizer.ggml.add_space_prefix")
            .and_then(|v| v.to_bool().ok())
            .unwrap_or(false);
        // candle's generic GPT-2 pipeline adds a prefix space; llama.cpp's "smollm" and plain
        // "gpt2" pre-tokenizers (and the HF tokenizers they mirror) do not.
        match pre.as_deref() {
            Some("smollm") => {
                inner.with_pre_tokenizer(Some(PreSequence::new(vec![
                    Digits::new(true).into(),
                    ByteLevel::new(false, true, true).into(),
                ])));
            }
            Some("gpt2") | None if !add_space_prefix => {
                inner.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
            }
            _ => {}
        }
        let token_str = |key: &str| -> Option<String> {
            let id = meta(key)?.to_u32().ok()?;
            inner.id_to_token(id)
        };
        Ok(Self {
            bos_token: token_str("tokenizer.ggml.bos_token_id"),
            eos_token: token_str("tokenizer.ggml.eos_token_id"),
            chat_template: meta("tokenizer.chat_template")
                .and_then(|v| v.to_string().ok().cloned()),
            inner,
            source: format!("{} (GGUF metadata)", path.display()),
        })
    }

    fn read_tokenizer_config(&mut self, path: &Path) -> Result<()> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let cfg: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", path.display()))?;
        self.chat_template = match cfg.get("chat_template") {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            // Newer configs list named templates; the "default" one is the chat template.
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .or_else(|| list.first())
                .and_then(|t| t.get("template"))
                .and_then(|t| t.as_str())
                .map(str::to_string),
            _ => None,
        };
        let token = |key: &str| match cfg.get(key) {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(obj) => obj
                .get("content")
                .and_then(|c| c.as_str())
                .map(str::to_string),
            None => None,
        };
        self.bos_token = token("bos_token");
        self.eos_token = token("eos_token");
        Ok(())
    }

    /// Token ids of `text`; `add_special` adds what the tokenizer's post-processor adds (BOS).
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special)
            .map_err(|e| anyhow!("tokenizing failed: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Encodes many texts in parallel (the tokenizers crate's own thread pool).
    pub fn encode_batch(&self, texts: &[&str], add_special: bool) -> Result<Vec<Vec<u32>>> {
        let encs = self
            .inner
            .encode_batch(texts.to_vec(), add_special)
            .map_err(|e| anyhow!("tokenizing failed: {e}"))?;
        Ok(encs.into_iter().map(|e| e.get_ids().to_vec()).collect())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| anyhow!("detokenizing failed: {e}"))
    }

    /// Ids of special (added, control) tokens: random prompts avoid them, as vLLM's do.
    pub fn special_ids(&self) -> HashSet<u32> {
        self.inner
            .get_added_tokens_decoder()
            .iter()
            .filter(|(_, t)| t.special)
            .map(|(id, _)| *id)
            .collect()
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Writes the tokenizer as a `tokenizer.json`.
    pub fn save(&self, path: &Path) -> Result<()> {
        self.inner
            .save(path, false)
            .map_err(|e| anyhow!("cannot write {}: {e}", path.display()))
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }
}

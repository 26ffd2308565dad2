//! Where weights come from: a GGUF file, safetensors files, or random values (`dummy`).
//!
//! The model asks for tensors by their Hugging Face names and shapes; each source maps the name
//! to its own layout and returns a dense tensor in the run's dtype on the run's device.

use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

/// A provider of named weights.
pub trait WeightSource {
    /// The tensor `name` (HF naming), checked against `shape`.
    fn get(&mut self, name: &str, shape: &[usize]) -> Result<Tensor>;
    /// Whether the source has `name` (e.g. a separate `lm_head.weight`).
    fn contains(&self, name: &str) -> bool;
}

/// HF tensor names to GGUF (llama.cpp) names.
fn gguf_name(hf: &str) -> Option<String> {
    let simple = match hf {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(s) = simple {
        return Some(s.to_string());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, field) = rest.split_once('.')?;
    let (module, kind) = field.rsplit_once('.')?;
    let g = match module {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{g}.{kind}"))
}

/// Weights of a GGUF file, dequantized to the run's dtype.
pub struct GgufWeights {
    path: PathBuf,
    file: File,
    content: gguf_file::Content,
    dtype: DType,
    device: Device,
    /// Number of attention heads and KV heads, to undo llama.cpp's q/k row permutation.
    unpermute_heads: Option<(usize, usize)>,
}

impl GgufWeights {
    /// Opens a GGUF file and reads its header and metadata (not the tensors).
    pub fn open(path: &Path) -> Result<Self> {
        let mut file =
            File::open(path).with_context(|| format!("cannot open model {}", path.display()))?;
        let content = gguf_file::Content::read(&mut file)
            .map_err(|e| anyhow!("{} is not a readable GGUF file: {e}", path.display()))?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
            content,
            dtype: DType::F32,
            device: Device::Cpu,
            unpermute_heads: None,
        })
    }

    pub fn content(&self) -> &gguf_file::Content {
        &self.content
    }

    /// Sets the output dtype and device, and (for llama.cpp's `llama` architecture, whose
    /// converter permutes q/k rows for interleaved rotary embeddings) the head counts used to
    /// restore the Hugging Face row order, so one rotary layout serves every source.
    pub fn configure(&mut self, dtype: DType, device: &Device, heads: Option<(usize, usize)>) {
        self.dtype = dtype;
        self.device = device.clone();
        self.unpermute_heads = heads;
    }
}

/// Inverts llama.cpp's `permute(w, n_head)`: rows `(head, d/2, 2)` back to `(head, 2, d/2)`.
pub fn unpermute_rows(w: &Tensor, n_head: usize) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    let half = rows / n_head / 2;
    Ok(w.reshape((n_head, half, 2, cols))?
        .transpose(1, 2)?
        .reshape((rows, cols))?)
}

impl WeightSource for GgufWeights {
    fn get(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let g = gguf_name(name).ok_or_else(|| anyhow!("no GGUF name for weight {name}"))?;
        let qt = self
            .content
            .tensor(&mut self.file, &g, &Device::Cpu)
            .map_err(|e| anyhow!("{}: tensor {g}: {e}", self.path.display()))?;
        if qt.shape().dims() != shape {
            bail!(
                "{}: tensor {g} has shape {:?}, the config implies {shape:?}",
                self.path.display(),
                qt.shape().dims()
            );
        }
        let mut t = qt
            .dequantize(&Device::Cpu)
            .map_err(|e| anyhow!("{}: dequantizing {g}: {e}", self.path.display()))?;
        if let Some((heads, kv_heads)) = self.unpermute_heads {
            if g.ends_with("attn_q.weight") {
                t = unpermute_rows(&t, heads)?;
            } else if g.ends_with("attn_k.weight") {
                t = unpermute_rows(&t, kv_heads)?;
            }
        }
        Ok(t.to_dtype(self.dtype)?.to_device(&self.device)?)
    }

    fn contains(&self, name: &str) -> bool {
        gguf_name(name).is_some_and(|g| self.content.tensor_infos.contains_key(&g))
    }
}

/// Weights of an HF folder's safetensors files (memory-mapped, converted per tensor).
pub struct SafetensorsWeights {
    vb: VarBuilder<'static>,
    dir: PathBuf,
}

impl SafetensorsWeights {
    /// The safetensors files of a model folder: from `model.safetensors.index.json` when there
    /// is one, else every `*.safetensors` file.
    pub fn files(dir: &Path) -> Result<Vec<PathBuf>> {
        let index = dir.join("model.safetensors.index.json");
        let mut files: Vec<PathBuf> = if index.is_file() {
            let text = std::fs::read_to_string(&index)
                .with_context(|| format!("cannot read {}", index.display()))?;
            let json: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("{} is not valid JSON", index.display()))?;
            let map = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| anyhow!("{} has no weight_map", index.display()))?;
            let mut names: Vec<&str> = map.values().filter_map(|v| v.as_str()).collect();
            names.sort_unstable();
            names.dedup();
            names.into_iter().map(|n| dir.join(n)).collect()
        } else {
            let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
                .with_context(|| format!("cannot list {}", dir.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
                .collect();
            v.sort();
            v
        };
        if files.is_empty() {
            bail!("{} has no .safetensors files", dir.display());
        }
        for f in &files {
            if !f.is_file() {
                bail!("weight file {} is missing", f.display());
            }
        }
        files.dedup();
        Ok(files)
    }

    pub fn open(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let files = Self::files(dir)?;
        // SAFETY: the files are memory-mapped read-only; as for any mmap, they must not be
        // modified while the model loads.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&files, dtype, device) }
            .map_err(|e| anyhow!("cannot read safetensors in {}: {e}", dir.display()))?;
        Ok(Self {
            vb,
            dir: dir.to_path_buf(),
        })
    }
}

impl WeightSource for SafetensorsWeights {
    fn get(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.vb
            .get(shape, name)
            .map_err(|e| anyhow!("{}: weight {name}: {e}", self.dir.display()))
    }

    fn contains(&self, name: &str) -> bool {
        self.vb.contains_tensor(name)
    }
}

/// Random weights with a real model's shapes (vLLM's `--load-format dummy`): the same compute
/// and memory traffic, no download. Values are uniform in [-1e-3, 1e-3] as vLLM's are; norm
/// weights are 1 so activations stay finite through every layer.
pub struct DummyWeights {
    dtype: DType,
    device: Device,
    seed: Option<u64>,
}

impl DummyWeights {
    pub fn new(dtype: DType, device: &Device) -> Self {
        Self {
            dtype,
            device: device.clone(),
            seed: None,
        }
    }

    /// Reproducible random weights, drawn on the host from `seed` (each tensor from its own
    /// stream, keyed by its name): the same values on every device and in every run, so a CPU
    /// and a GPU engine can be compared token for token. Uniform with a standard deviation of
    /// 0.02 (the usual initialisation), large enough for distinct logits; slow for big models.
    pub fn seeded(seed: u64, dtype: DType, device: &Device) -> Self {
        Self {
            seed: Some(seed),
            ..Self::new(dtype, device)
        }
    }
}

impl WeightSource for DummyWeights {
    fn get(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = if name.ends_with("norm.weight") {
            Tensor::ones(shape, DType::F32, &self.device)?
        } else if let Some(seed) = self.seed {
            let stream = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
            });
            let n = shape.iter().product();
            let values =
                crate::util::Rng64::for_stream(seed, stream).uniform_f32(n, 0.02 * 3f32.sqrt());
            Tensor::from_vec(values, shape, &Device::Cpu)?.to_device(&self.device)?
        } else {
            Tensor::rand(-1e-3f32, 1e-3f32, shape, &self.device)?
        };
        Ok(t.to_dtype(self.dtype)?)
    }

    fn contains(&self, _name: &str) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gguf_names() {
        assert_eq!(
            gguf_name("model.layers.12.self_attn.q_proj.weight").as_deref(),
            Some("blk.12.attn_q.weight")
        );
        assert_eq!(
            gguf_name("model.layers.0.self_attn.k_proj.bias").as_deref(),
            Some("blk.0.attn_k.bias")
        );
        assert_eq!(
            gguf_name("model.layers.3.post_attention_layernorm.weight").as_deref(),
            Some("blk.3.ffn_norm.weight")
        );
        assert_eq!(
            gguf_name("model.embed_tokens.weight").as_deref(),
            Some("token_embd.weight")
        );
        assert_eq!(gguf_name("model.layers.0.mystery.weight"), None);
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permute() -> Result<()> {
        // llama.cpp: w.reshape(n_head, 2, d/2, cols).swapaxes(1, 2).reshape(rows, cols)
        let (heads, d, cols) = (2usize, 4usize, 3usize);
        let hf = Tensor::arange(0f32, (heads * d * cols) as f32, &Device::Cpu)?
            .reshape((heads * d, cols))?;
        let permuted = hf
            .reshape((heads, 2, d / 2, cols))?
            .transpose(1, 2)?
            .reshape((heads * d, cols))?;
        let back = unpermute_rows(&permuted, heads)?;
        assert_eq!(back.to_vec2::<f32>()?, hf.to_vec2::<f32>()?);
        Ok(())
    }
}

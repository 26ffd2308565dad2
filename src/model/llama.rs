//! The Llama family (Llama 2/3/3.1, Mistral, SmolLM2; Qwen2 with its q/k/v biases) as a forward
//! pass over a flattened batch: no batch dimension, no padding, attention through the paged cache.

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::ops::rms_norm;

use super::Quantization;
use super::config::ModelConfig;
use super::linear::Linear;
use super::norm::residual_rms_norm;
use super::rotary::{Heads, split_rotate};
use super::weights::WeightSource;
use crate::attention::PagedAttention;
use crate::profile::{Kernel, timed};

/// Reads weights by name: projections in the load dtype, biases and norms in the activations'
/// dtype (`super::activation_dtype`).
struct Loader<'a> {
    weights: &'a mut dyn WeightSource,
    act: DType,
}

impl Loader<'_> {
    fn linear(&mut self, name: &str, out: usize, inp: usize, with_bias: bool) -> Result<Linear> {
        let w = self.weights.get(&format!("{name}.weight"), &[out, inp])?;
        let b = if with_bias {
            Some(self.vector(&format!("{name}.bias"), out)?)
        } else {
            None
        };
        Ok(Linear::rows(w, b))
    }

    /// A bias or a norm's weight.
    fn vector(&mut self, name: &str, len: usize) -> Result<Tensor> {
        Ok(self.weights.get(name, &[len])?.to_dtype(self.act)?)
    }
}

#[derive(Clone)]
struct Layer {
    attn_norm: Tensor,
    qkv: Linear,
    o: Linear,
    mlp_norm: Tensor,
    gate_up: Linear,
    down: Linear,
}

/// Sizes the forward pass needs, derived once from the config.
#[derive(Clone, Copy, Debug)]
pub struct Dims {
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub intermediate: usize,
    pub vocab: usize,
    pub layers: usize,
    pub eps: f32,
}

/// Every weight of a Llama-family model by its Hugging Face name, with its shape: what a
/// safetensors checkpoint of `cfg` holds (the LM head only when it is not tied).
pub fn weight_shapes(cfg: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let (h, hd, i) = (cfg.hidden_size, cfg.head_dim(), cfg.intermediate_size);
    let (q, kv) = (cfg.num_attention_heads * hd, cfg.num_kv_heads() * hd);
    let mut v = vec![
        (
            "model.embed_tokens.weight".to_string(),
            vec![cfg.vocab_size, h],
        ),
        ("model.norm.weight".to_string(), vec![h]),
    ];
    if !cfg.tie_word_embeddings {
        v.push(("lm_head.weight".to_string(), vec![cfg.vocab_size, h]));
    }
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}");
        let mut add = |name: &str, shape: Vec<usize>| v.push((format!("{p}.{name}"), shape));
        add("input_layernorm.weight", vec![h]);
        add("post_attention_layernorm.weight", vec![h]);
        add("self_attn.q_proj.weight", vec![q, h]);
        add("self_attn.k_proj.weight", vec![kv, h]);
        add("self_attn.v_proj.weight", vec![kv, h]);
        add("self_attn.o_proj.weight", vec![h, q]);
        add("mlp.gate_proj.weight", vec![i, h]);
        add("mlp.up_proj.weight", vec![i, h]);
        add("mlp.down_proj.weight", vec![h, i]);
        if cfg.qkv_bias() {
            add("self_attn.q_proj.bias", vec![q]);
            add("self_attn.k_proj.bias", vec![kv]);
            add("self_attn.v_proj.bias", vec![kv]);
        }
    }
    v
}

/// Where the token embedding is looked up.
#[derive(Clone)]
enum Embedding {
    /// Its own table `[vocab, hidden]`, which a tied LM head kept as rows shares (`shared`: its
    /// bytes not counted twice).
    Table { rows: Tensor, shared: bool },
    /// The tied LM head's weights, packed into panels (f32 on CPUs with AVX-512): the table is
    /// not kept twice.
    InHead,
}

/// A loaded Llama-family model. Cloning shares the weights.
#[derive(Clone)]
pub struct Llama {
    dims: Dims,
    embed: Embedding,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Linear,
    cos: Tensor,
    sin: Tensor,
    /// Of the activations (and norms, biases, rotary tables).
    dtype: DType,
    /// Of the projections, the embedding and the LM head.
    weight_dtype: DType,
    device: Device,
}

/// Rotary tables `[max_positions, head_dim / 2]` (HF "rotate half" layout), with Llama 3.1's
/// frequency scaling when the config asks for it.
fn rotary_tables(
    cfg: &ModelConfig,
    max_positions: usize,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let d = cfg.head_dim();
    let mut inv_freq: Vec<f64> = (0..d / 2)
        .map(|i| 1.0 / cfg.rope_theta.powf(2.0 * i as f64 / d as f64))
        .collect();
    let mut position_scale = 1.0;
    if let Some(s) = &cfg.rope_scaling {
        match s.rope_type.as_deref() {
            Some("llama3") => {
                let factor = s.factor.unwrap_or(8.0);
                let low = s.low_freq_factor.unwrap_or(1.0);
                let high = s.high_freq_factor.unwrap_or(4.0);
                let old_ctx = s.original_max_position_embeddings.unwrap_or(8192) as f64;
                let (low_wavelen, high_wavelen) = (old_ctx / low, old_ctx / high);
                for f in inv_freq.iter_mut() {
                    let wavelen = 2.0 * std::f64::consts::PI / *f;
                    if wavelen > low_wavelen {
                        *f /= factor;
                    } else if wavelen >= high_wavelen {
                        let smooth = (old_ctx / wavelen - low) / (high - low);
                        *f = (1.0 - smooth) * *f / factor + smooth * *f;
                    }
                }
            }
            Some("linear") => position_scale = 1.0 / s.factor.unwrap_or(1.0),
            _ => {}
        }
    }
    let mut cos = Vec::with_capacity(max_positions * d / 2);
    let mut sin = Vec::with_capacity(max_positions * d / 2);
    for p in 0..max_positions {
        for f in &inv_freq {
            let angle = p as f64 * position_scale * f;
            cos.push(angle.cos() as f32);
            sin.push(angle.sin() as f32);
        }
    }
    let cos = Tensor::from_vec(cos, (max_positions, d / 2), device)?;
    let sin = Tensor::from_vec(sin, (max_positions, d / 2), device)?;
    Ok((cos, sin))
}

impl Llama {
    /// Builds the model from `weights` (in `dtype`), fusing q/k/v and gate/up as it goes, and
    /// quantizing the projections and the LM head where `quant` asks. `max_positions` bounds
    /// the rotary tables (the run's maximum model length).
    pub fn load(
        cfg: &ModelConfig,
        weights: &mut dyn WeightSource,
        max_positions: usize,
        (dtype, quant): (DType, Quantization),
        device: &Device,
        mut on_layer: impl FnMut(usize),
    ) -> Result<Self> {
        let dims = Dims {
            hidden: cfg.hidden_size,
            heads: cfg.num_attention_heads,
            kv_heads: cfg.num_kv_heads(),
            head_dim: cfg.head_dim(),
            intermediate: cfg.intermediate_size,
            vocab: cfg.vocab_size,
            layers: cfg.num_hidden_layers,
            eps: cfg.rms_norm_eps as f32,
        };
        let (h, hd) = (dims.hidden, dims.head_dim);
        let q_size = dims.heads * hd;
        let kv_size = dims.kv_heads * hd;
        let bias = cfg.qkv_bias();
        let act = super::activation_dtype(dtype, device);
        let mut ld = Loader { weights, act };
        let mut layers = Vec::with_capacity(dims.layers);
        for i in 0..dims.layers {
            let p = format!("model.layers.{i}");
            let (attn, mlp) = (format!("{p}.self_attn"), format!("{p}.mlp"));
            let qkv = Linear::fused(vec![
                ld.linear(&format!("{attn}.q_proj"), q_size, h, bias)?,
                ld.linear(&format!("{attn}.k_proj"), kv_size, h, bias)?,
                ld.linear(&format!("{attn}.v_proj"), kv_size, h, bias)?,
            ])?;
            let inter = dims.intermediate;
            layers.push(Layer {
                attn_norm: ld.vector(&format!("{p}.input_layernorm.weight"), h)?,
                qkv: qkv.prepared(quant, dtype)?,
                o: ld
                    .linear(&format!("{attn}.o_proj"), h, q_size, false)?
                    .prepared(quant, dtype)?,
                mlp_norm: ld.vector(&format!("{p}.post_attention_layernorm.weight"), h)?,
                gate_up: Linear::fused(vec![
                    ld.linear(&format!("{mlp}.gate_proj"), inter, h, false)?,
                    ld.linear(&format!("{mlp}.up_proj"), inter, h, false)?,
                ])?
                .prepared(quant, dtype)?,
                down: ld
                    .linear(&format!("{mlp}.down_proj"), h, inter, false)?
                    .prepared(quant, dtype)?,
            });
            on_layer(i);
        }
        let norm = ld.vector("model.norm.weight", h)?;
        let embed = weights.get("model.embed_tokens.weight", &[dims.vocab, h])?;
        let tied = cfg.tie_word_embeddings && !weights.contains("lm_head.weight");
        let lm_head = Linear::rows(
            if tied {
                embed.clone()
            } else {
                weights.get("lm_head.weight", &[dims.vocab, h])?
            },
            None,
        );
        // Laid out as the projections: the LM head runs on the sampled rows, up to one per
        // sequence of a decode step, where the panels beat the dot form over rows (SmolLM2's
        // 49152 x 576 on the Intel Xeon: 15-20% less time at 64 rows, 30% at 128 and 256;
        // docs/cpu-performance.md). Tied and packed, it serves the embedding too.
        // Under int4 projections the head keeps int8, as llama.cpp's 4-bit files keep theirs
        // at 6 or 8 bits: 16 levels a block in the head moved SmolLM2's greedy tokens at once.
        let lm_head = match quant {
            Quantization::Int4 => lm_head.into_int8(dtype)?,
            quant => lm_head.prepared(quant, dtype)?,
        };
        let embed = if tied && lm_head.is_panels() {
            Embedding::InHead
        } else {
            Embedding::Table {
                rows: embed,
                shared: tied && quant == Quantization::None,
            }
        };
        let (cos, sin) = rotary_tables(cfg, max_positions, device)?;
        Ok(Self {
            dims,
            embed,
            layers,
            norm,
            lm_head,
            cos: cos.to_dtype(act)?,
            sin: sin.to_dtype(act)?,
            dtype: act,
            weight_dtype: dtype,
            device: device.clone(),
        })
    }

    pub fn dims(&self) -> Dims {
        self.dims
    }

    /// The activations' dtype: the weights' but on the CPU with bf16 weights (f32 there).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn weight_dtype(&self) -> DType {
        self.weight_dtype
    }

    /// Bytes per weight as stored, of the projections and of the LM head: the dtype's, or a
    /// quantized code and its share of its block's scale (and minimum).
    pub fn bytes_per_weight(&self) -> (f64, f64) {
        let of = |l: &Linear| {
            l.quantized_bytes_per_weight()
                .unwrap_or(self.weight_dtype.size_in_bytes() as f64)
        };
        let head = of(&self.lm_head);
        (self.layers.first().map_or(head, |l| of(&l.down)), head)
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Positions the rotary tables cover.
    pub fn max_positions(&self) -> usize {
        self.cos.dims()[0]
    }

    /// Hidden states `[tokens, hidden]` of a flattened batch: `input_ids` and `positions` are
    /// `[tokens]` (u32); attention goes through `attn`, which also writes the step's K/V.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        positions: &Tensor,
        attn: &PagedAttention,
    ) -> Result<Tensor> {
        let d = self.dims;
        let tokens = input_ids.dim(0)?;
        let q_size = d.heads * d.head_dim;
        let heads = Heads {
            heads: d.heads,
            kv_heads: d.kv_heads,
            head_dim: d.head_dim,
        };
        let (cos, sin) = timed(Kernel::Rotary, || {
            Ok((
                self.cos.index_select(positions, 0)?,
                self.sin.index_select(positions, 0)?,
            ))
        })?;
        let mut x = timed(Kernel::Embedding, || {
            let rows = match &self.embed {
                Embedding::Table { rows, .. } => rows.index_select(input_ids, 0)?,
                Embedding::InHead => self.lm_head.weight_rows(input_ids)?,
            };
            Ok(rows.to_dtype(self.dtype)?)
        })?;
        // Each residual add goes with the norm that follows it (`residual_rms_norm`, one kernel),
        // except after the last layer, whose norm runs only on the sampled rows (`logits`).
        let mut h = match self.layers.first() {
            Some(layer) => timed(Kernel::RmsNorm, || {
                Ok(rms_norm(&x, &layer.attn_norm, d.eps)?)
            })?,
            None => x.clone(),
        };
        for (i, layer) in self.layers.iter().enumerate() {
            let qkv = timed(Kernel::GemmQkv, || layer.qkv.forward(&h))?;
            let (q, k, v) = timed(Kernel::Rotary, || split_rotate(&qkv, &cos, &sin, heads))?;
            let a = attn
                .forward(i, &q, &k, &v)
                .with_context(|| format!("attention of layer {i}"))?;
            let a = timed(Kernel::GemmO, || {
                layer.o.forward(&a.reshape((tokens, q_size))?)
            })?;
            (x, h) = timed(Kernel::RmsNorm, || {
                residual_rms_norm(&x, &a, &layer.mlp_norm, d.eps)
            })?;
            let act = if layer.gate_up.fuses_silu_mul(&h)? {
                // The activation's time is then in gate/up's.
                timed(Kernel::GemmGateUp, || layer.gate_up.silu_mul(&h))?
            } else {
                let gu = timed(Kernel::GemmGateUp, || layer.gate_up.forward(&h))?;
                timed(Kernel::Activation, || super::ops::silu_mul(&gu))?
            };
            let down = timed(Kernel::GemmDown, || layer.down.forward(&act))?;
            match self.layers.get(i + 1) {
                Some(next) => {
                    (x, h) = timed(Kernel::RmsNorm, || {
                        residual_rms_norm(&x, &down, &next.attn_norm, d.eps)
                    })?;
                }
                None => x = timed(Kernel::Residual, || Ok((&x + down)?))?,
            }
        }
        Ok(x)
    }

    /// Logits `[rows, vocab]` (f32) of the hidden states at `rows` (indices into the batch):
    /// the final norm and the LM head run only where a token is sampled.
    pub fn logits(&self, hidden: &Tensor, rows: &Tensor) -> Result<Tensor> {
        let h = timed(Kernel::RmsNorm, || {
            let h = hidden.index_select(rows, 0)?;
            Ok(rms_norm(&h, &self.norm, self.dims.eps)?)
        })?;
        timed(Kernel::GemmLmHead, || {
            let logits = self.lm_head.forward(&h)?;
            Ok(logits.to_dtype(DType::F32)?.contiguous()?)
        })
    }

    /// Bytes of the weights as loaded.
    pub fn weight_bytes(&self) -> u64 {
        let size = |t: &Tensor| (t.elem_count() * t.dtype().size_in_bytes()) as u64;
        let layers: u64 = self
            .layers
            .iter()
            .map(|l| {
                size(&l.attn_norm)
                    + size(&l.mlp_norm)
                    + l.qkv.bytes()
                    + l.o.bytes()
                    + l.gate_up.bytes()
                    + l.down.bytes()
            })
            .sum();
        let (embed, head) = match &self.embed {
            Embedding::Table { rows, shared } => {
                (size(rows), if *shared { 0 } else { self.lm_head.bytes() })
            }
            Embedding::InHead => (0, self.lm_head.bytes()),
        };
        layers + embed + size(&self.norm) + head
    }
}

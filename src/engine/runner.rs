//! The model runner: turns a scheduled step into batch tensors (token ids, positions, slot
//! mapping, block tables, context lengths), runs the model once over the flattened batch, and
//! samples a token for each sequence whose pending tokens are now all computed.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};

use super::sampler::{SamplingParams, Stream, sample};
use super::scheduler::{Schedule, ScheduledSeq};
use super::sequence::Sequence;
use crate::attention::{BatchLayout, KvCacheSpec, PagedAttention, PagedKvCache};
use crate::model::llama::Llama;
use crate::profile::{Kernel, timed};

/// Host-side inputs of one step.
#[derive(Debug, Default)]
pub struct StepInputs {
    pub input_ids: Vec<u32>,
    pub positions: Vec<u32>,
    pub layout: BatchLayout,
    /// Batch rows whose logits are sampled, and the scheduled entry each belongs to.
    pub sample_rows: Vec<u32>,
    pub sample_entries: Vec<usize>,
}

/// Lays out the scheduled tokens of `sched` as one flattened batch.
pub fn build_inputs(sched: &Schedule, seqs: &[Sequence], block_size: usize) -> StepInputs {
    let mut inp = StepInputs::default();
    let max_blocks = sched
        .seqs
        .iter()
        .map(|s| seqs[s.seq].blocks.len())
        .max()
        .unwrap_or(0);
    let lay = &mut inp.layout;
    lay.max_blocks = max_blocks;
    lay.query_start.push(0);
    for (entry, item) in sched.seqs.iter().enumerate() {
        let seq = &seqs[item.seq];
        let (start, end) = (seq.num_computed, seq.num_computed + item.num_tokens);
        for p in start..end {
            inp.input_ids.push(seq.tokens[p]);
            inp.positions.push(p as u32);
            let block = seq.blocks[p / block_size];
            lay.slot_mapping
                .push(block * block_size as u32 + (p % block_size) as u32);
            lay.token_seq.push(entry as u32);
        }
        lay.query_start.push(inp.input_ids.len() as u32);
        lay.context_lens.push(end as u32);
        lay.block_tables.extend_from_slice(&seq.blocks);
        lay.block_tables
            .extend(std::iter::repeat_n(0, max_blocks - seq.blocks.len()));
        if end == seq.num_tokens() {
            inp.sample_rows.push(inp.input_ids.len() as u32 - 1);
            inp.sample_entries.push(entry);
        }
    }
    inp
}

/// Runs one synthetic step of `tokens` prompt tokens spread over up to `max_seqs` sequences,
/// through a temporary cache, so that the device's memory pool reaches the activation peak of
/// the largest step the scheduler can build. Returns the temporary cache's bytes.
/// A step's attention for `model`: its heads, and prefill products in bf16 where its weights
/// are bf16 (the CPU runs them on AMX where the projections run there).
fn attention_for<'a>(
    model: &Llama,
    cache: &'a PagedKvCache,
    layout: Arc<BatchLayout>,
) -> Result<PagedAttention<'a>> {
    Ok(PagedAttention::new(cache, layout, model.dims().heads)?
        .with_bf16_prefill(model.weight_dtype() == DType::BF16))
}

pub fn profile_step(
    model: &Llama,
    spec: KvCacheSpec,
    tokens: usize,
    max_seqs: usize,
) -> Result<u64> {
    let n = max_seqs.clamp(1, tokens.max(1));
    let per = tokens.max(1).div_ceil(n);
    let blocks_per_seq = per.div_ceil(spec.block_size);
    let cache = PagedKvCache::new(spec, n * blocks_per_seq, model.device())?;
    let mut seqs = Vec::with_capacity(n);
    let mut left = tokens.max(1);
    for i in 0..n {
        let len = per.min(left).max(1);
        left = left.saturating_sub(len);
        let mut seq = Sequence::new(i, &vec![0; len], 1);
        seq.blocks = (0..blocks_per_seq)
            .map(|b| (i * blocks_per_seq + b) as u32)
            .collect();
        seqs.push(seq);
    }
    let sched = Schedule {
        seqs: seqs
            .iter()
            .enumerate()
            .map(|(i, s)| ScheduledSeq {
                seq: i,
                num_tokens: s.num_tokens(),
            })
            .collect(),
        preempted: vec![],
    };
    let inputs = build_inputs(&sched, &seqs, spec.block_size);
    let dev = model.device().clone();
    let count = inputs.input_ids.len();
    let ids = Tensor::from_slice(&inputs.input_ids, count, &dev)?;
    let positions = Tensor::from_slice(&inputs.positions, count, &dev)?;
    let rows = Tensor::from_slice(&inputs.sample_rows, inputs.sample_rows.len(), &dev)?;
    let attn = attention_for(model, &cache, Arc::new(inputs.layout))?;
    let hidden = model.forward(&ids, &positions, &attn)?;
    model.logits(&hidden, &rows)?;
    dev.synchronize()?;
    Ok(cache.bytes())
}

/// Where a step's time went, in seconds.
#[derive(Clone, Copy, Debug, Default)]
pub struct StepTimes {
    /// Building host inputs and copying them to the device.
    pub prepare: f64,
    /// The forward pass and logits (device work, waited for).
    pub forward: f64,
    /// Sampling, including bringing the ids back.
    pub sample: f64,
}

/// Owns the model and the KV cache.
pub struct ModelRunner {
    model: Llama,
    cache: PagedKvCache,
    sampling: SamplingParams,
}

impl ModelRunner {
    pub fn new(model: Llama, cache: PagedKvCache, sampling: SamplingParams) -> Self {
        Self {
            model,
            cache,
            sampling,
        }
    }

    pub fn model(&self) -> &Llama {
        &self.model
    }

    pub fn cache(&self) -> &PagedKvCache {
        &self.cache
    }

    fn device(&self) -> &Device {
        self.model.device()
    }

    /// Runs one step. Returns, per scheduled entry, the sampled token (or `None` for a prefill
    /// chunk that does not reach the end of its sequence yet).
    pub fn execute(
        &self,
        sched: &Schedule,
        seqs: &[Sequence],
        times: &mut StepTimes,
    ) -> Result<Vec<Option<u32>>> {
        let t0 = Instant::now();
        let bs = self.cache.spec.block_size;
        let inputs = build_inputs(sched, seqs, bs);
        debug_assert!(inputs.layout.validate(self.cache.num_blocks, bs).is_ok());
        let dev = self.device().clone();
        let n = inputs.input_ids.len();
        let ids = Tensor::from_slice(&inputs.input_ids, n, &dev)?;
        let positions = Tensor::from_slice(&inputs.positions, n, &dev)?;
        let rows = Tensor::from_slice(&inputs.sample_rows, inputs.sample_rows.len(), &dev)?;
        let streams: Vec<Stream> = inputs
            .sample_entries
            .iter()
            .map(|&e| {
                let seq = &seqs[sched.seqs[e].seq];
                Stream {
                    request: seq.request,
                    sample: seq.sample,
                    position: seq.num_output(),
                }
            })
            .collect();
        let layout = Arc::new(inputs.layout);
        let t1 = Instant::now();
        // Kernel timing (shapes mode) follows the pass into candle's thread pool.
        let timing = crate::profile::current();
        let logits = dev
            .with_context(|| {
                crate::workers::awake_during(|| {
                    crate::profile::within(timing, || -> Result<Option<Tensor>> {
                        let attn = attention_for(&self.model, &self.cache, layout)?;
                        let hidden = self.model.forward(&ids, &positions, &attn)?;
                        if rows.dim(0)? == 0 {
                            return Ok(None);
                        }
                        Ok(Some(self.model.logits(&hidden, &rows)?))
                    })
                })
            })
            .context("forward pass")?;
        dev.synchronize()?;
        let t2 = Instant::now();
        let mut out = vec![None; sched.seqs.len()];
        if let Some(logits) = logits {
            let tokens = timed(Kernel::Sampler, || {
                dev.with_context(|| sample(&logits, &self.sampling, &streams))
            })?;
            for (&entry, tok) in inputs.sample_entries.iter().zip(tokens) {
                out[entry] = Some(tok);
            }
        }
        let t3 = Instant::now();
        times.prepare += (t1 - t0).as_secs_f64();
        times.forward += (t2 - t1).as_secs_f64();
        times.sample += (t3 - t2).as_secs_f64();
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Engine;
    use crate::model::Quantization;
    use crate::model::config::ModelConfig;
    use crate::model::weights::DummyWeights;
    use candle_core::DType;

    fn tiny_model() -> Llama {
        let cfg: ModelConfig = serde_json::from_str(
            r#"{"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
                "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                "vocab_size": 100, "max_position_embeddings": 256}"#,
        )
        .unwrap();
        let mut w = DummyWeights::new(DType::F32, &Device::Cpu);
        Llama::load(
            &cfg,
            &mut w,
            256,
            (DType::F32, Quantization::None),
            &Device::Cpu,
            |_| {},
        )
        .unwrap()
    }

    #[test]
    fn profile_step_runs_the_largest_step() {
        let model = tiny_model();
        let spec = Engine::cache_spec(&model, 16, DType::F32);
        // 100 tokens over 7 sequences: 15 per sequence, one block each.
        let bytes = profile_step(&model, spec, 100, 7).unwrap();
        assert_eq!(bytes, 7 * spec.bytes_per_block());
        // More sequences than tokens: one token each.
        let bytes = profile_step(&model, spec, 3, 256).unwrap();
        assert_eq!(bytes, 3 * spec.bytes_per_block());
    }

    #[test]
    fn flattened_batch_layout() {
        let mut a = Sequence::new(0, &[10, 11, 12, 13, 14], 3);
        a.blocks = vec![7, 2];
        let mut b = Sequence::new(1, &[20, 21, 22], 3);
        b.blocks = vec![5];
        b.num_computed = 3;
        b.tokens.push(23); // one generated token pending (decode)
        b.blocks.push(9);
        let sched = Schedule {
            seqs: vec![
                ScheduledSeq {
                    seq: 0,
                    num_tokens: 3,
                }, // a prefill chunk
                ScheduledSeq {
                    seq: 1,
                    num_tokens: 1,
                },
            ],
            preempted: vec![],
        };
        let inp = build_inputs(&sched, &[a, b], 3);
        assert_eq!(inp.input_ids, vec![10, 11, 12, 23]);
        assert_eq!(inp.positions, vec![0, 1, 2, 3]);
        // a: positions 0..3 in block 7; b: position 3 is slot 0 of its second block (9).
        assert_eq!(inp.layout.slot_mapping, vec![21, 22, 23, 27]);
        assert_eq!(inp.layout.query_start, vec![0, 3, 4]);
        assert_eq!(inp.layout.context_lens, vec![3, 4]);
        assert_eq!(inp.layout.block_tables, vec![7, 2, 5, 9]);
        assert_eq!(inp.layout.token_seq, vec![0, 0, 0, 1]);
        // Only b reaches its last token: one sampled row, the batch's last.
        assert_eq!(inp.sample_rows, vec![3]);
        assert_eq!(inp.sample_entries, vec![1]);
        inp.layout.validate(10, 3).unwrap();
    }
}

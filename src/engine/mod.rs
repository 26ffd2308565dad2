//! The paged-KV continuous-batching engine.
//!
//! All requests are submitted at t = 0. Each step, the [`scheduler`] picks tokens under the
//! token and sequence budgets (allocating blocks from the [`block`] pool, preempting when they
//! run out), the [`runner`] runs one forward pass over the flattened batch and samples, and the
//! engine appends the tokens, retiring requests that reached their `max_tokens` (EOS is ignored,
//! as in vLLM's benchmarks). Timing starts at the first step and ends at the last token.

pub mod block;
pub mod prefix;
pub mod runner;
pub mod sampler;
pub mod scheduler;
pub mod sequence;

use std::time::Instant;

use anyhow::{Result, bail};
use candle_core::DType;

use self::block::{BlockPool, blocks_for};
use self::prefix::PrefixCacheStats;
use self::runner::{ModelRunner, StepTimes};
use self::sampler::SamplingParams;
use self::scheduler::{Scheduler, SchedulerConfig};
use self::sequence::Sequence;
use crate::attention::{KvCacheSpec, PagedKvCache};
use crate::model::llama::Llama;
use crate::workload::Request;

/// Engine limits, named as vLLM names them.
#[derive(Clone, Copy, Debug)]
pub struct EngineConfig {
    pub block_size: usize,
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
    pub max_model_len: usize,
    pub num_blocks: usize,
    /// Element type of the KV cache.
    pub kv_cache_dtype: DType,
    /// Reuse the K/V of full blocks whose prefix an earlier sequence computed (vLLM V1's
    /// default); off, every sequence computes its whole prompt.
    pub enable_prefix_caching: bool,
}

impl EngineConfig {
    pub fn validate(&self) -> Result<()> {
        for (name, v) in [
            ("--block-size", self.block_size),
            ("--max-num-seqs", self.max_num_seqs),
            ("--max-num-batched-tokens", self.max_num_batched_tokens),
            ("--max-model-len", self.max_model_len),
        ] {
            if v == 0 {
                bail!("{name} must be at least 1");
            }
        }
        Ok(())
    }
}

/// What one generation got: one of a request's `n` outputs.
#[derive(Clone, Debug)]
pub struct RequestOutput {
    /// Index of the request in the submitted list.
    pub request: usize,
    /// Which of the request's outputs (0 with `n` = 1).
    pub sample: usize,
    pub prompt_len: usize,
    pub output_ids: Vec<u32>,
    /// Seconds from the start of the run to the first generated token.
    pub ttft: f64,
    /// Seconds from the start of the run to the last generated token.
    pub e2e: f64,
    pub preemptions: u32,
}

/// Totals of one run.
#[derive(Clone, Debug, Default)]
pub struct RunStats {
    /// Seconds from the first step to the last token.
    pub elapsed: f64,
    pub steps: usize,
    pub preemptions: usize,
    /// Tokens run through the model (prompts, recomputation after preemption, decodes).
    pub computed_tokens: usize,
    /// Largest number of sequences in one step.
    pub max_batch_seqs: usize,
    /// Seconds spent in the scheduler.
    pub schedule_time: f64,
    pub step_times: StepTimes,
    /// Blocks still allocated after the run (0 unless the engine leaks).
    pub blocks_in_use_after: usize,
    /// Prefix-cache lookups and hits, in tokens.
    pub prefix_cache: PrefixCacheStats,
}

/// Progress after a step, for progress bars.
#[derive(Clone, Copy, Debug)]
pub struct StepReport {
    pub finished: usize,
    pub generated: usize,
    pub elapsed: f64,
}

/// The outputs and totals of one run.
pub struct RunOutput {
    /// Every request's outputs, in request order, each request's in sample order.
    pub outputs: Vec<RequestOutput>,
    pub stats: RunStats,
}

/// A model, its KV cache and the scheduling limits.
pub struct Engine {
    runner: ModelRunner,
    config: EngineConfig,
}

impl Engine {
    /// Allocates a cache of `config.num_blocks` blocks for `model`.
    pub fn new(model: Llama, config: EngineConfig, sampling: SamplingParams) -> Result<Self> {
        config.validate()?;
        sampling.validate()?;
        if config.max_model_len > model.max_positions() {
            bail!(
                "--max-model-len {} exceeds the {} positions the model was loaded for",
                config.max_model_len,
                model.max_positions()
            );
        }
        let spec = Self::cache_spec(&model, config.block_size, config.kv_cache_dtype);
        let cache = PagedKvCache::new(spec, config.num_blocks, model.device())?;
        Ok(Self {
            runner: ModelRunner::new(model, cache, sampling),
            config,
        })
    }

    /// The cache layout `model` needs with blocks of `block_size` tokens of `dtype`.
    pub fn cache_spec(model: &Llama, block_size: usize, dtype: DType) -> KvCacheSpec {
        let d = model.dims();
        KvCacheSpec {
            num_layers: d.layers,
            num_kv_heads: d.kv_heads,
            head_dim: d.head_dim,
            block_size,
            dtype,
        }
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    pub fn runner(&self) -> &ModelRunner {
        &self.runner
    }

    /// Refuses requests that can never run: too long for the model, or too long for the cache.
    pub fn check(&self, requests: &[Request]) -> Result<()> {
        let c = &self.config;
        for (i, r) in requests.iter().enumerate() {
            let total = r.prompt_ids.len() + r.max_tokens;
            if r.prompt_ids.is_empty() || r.max_tokens == 0 {
                bail!("request {i} has an empty prompt or asks for no tokens");
            }
            if total > c.max_model_len {
                bail!(
                    "request {i}: prompt {} + output {} = {total} tokens exceeds --max-model-len {}",
                    r.prompt_ids.len(),
                    r.max_tokens,
                    c.max_model_len
                );
            }
            let need = blocks_for(total, c.block_size);
            if need > c.num_blocks {
                bail!(
                    "the KV cache is too small for one sequence: request {i} needs {need} blocks of {} tokens ({total} tokens), the budget holds {} (raise --kv-cache-memory)",
                    c.block_size,
                    c.num_blocks
                );
            }
        }
        Ok(())
    }

    /// Runs every request to exactly its `max_tokens`, all submitted at t = 0.
    pub fn run(
        &mut self,
        requests: &[Request],
        on_step: impl FnMut(StepReport),
    ) -> Result<RunOutput> {
        self.run_samples(requests, 1, on_step)
    }

    /// As [`Engine::run`], with `n` outputs per request (vLLM's `SamplingParams.n`): `n`
    /// sequences of the same prompt, each drawing from its own random stream. They are queued
    /// one after another, so with prefix caching the first computes the prompt's full blocks
    /// and the others find them (in the same step when the budgets admit them together), as
    /// vLLM V1 runs `n` > 1: each of the others computes only the tokens after the prompt's
    /// last whole block, or that block where the prompt fills its blocks exactly (the last
    /// token must be computed to sample from).
    pub fn run_samples(
        &mut self,
        requests: &[Request],
        n: usize,
        mut on_step: impl FnMut(StepReport),
    ) -> Result<RunOutput> {
        if n == 0 {
            bail!("--n must be at least 1");
        }
        self.check(requests)?;
        let c = self.config;
        let mut seqs: Vec<Sequence> = requests
            .iter()
            .enumerate()
            .flat_map(|(i, r)| (0..n).map(move |j| (i, j, r)))
            .enumerate()
            .map(|(id, (i, j, r))| Sequence::sample_of(id, i, j, &r.prompt_ids, r.max_tokens))
            .collect();
        let mut pool = if c.enable_prefix_caching {
            BlockPool::with_prefix_caching(c.num_blocks, c.block_size)
        } else {
            BlockPool::new(c.num_blocks)
        };
        let mut sched = Scheduler::new(SchedulerConfig {
            max_num_seqs: c.max_num_seqs,
            max_num_batched_tokens: c.max_num_batched_tokens,
            block_size: c.block_size,
        });
        (0..seqs.len()).for_each(|i| sched.add(i));
        let mut stats = RunStats::default();
        let (mut finished, mut generated) = (0usize, 0usize);
        let start = Instant::now();
        while sched.has_work() {
            let t = Instant::now();
            let step = sched.schedule(&mut seqs, &mut pool);
            stats.schedule_time += t.elapsed().as_secs_f64();
            if step.is_empty() {
                bail!(
                    "the scheduler made no progress ({} running, {} waiting, {} of {} blocks free)",
                    sched.num_running(),
                    sched.num_waiting(),
                    pool.num_free(),
                    pool.num_blocks()
                );
            }
            stats.preemptions += step.preempted.len();
            stats.computed_tokens += step.num_tokens();
            stats.max_batch_seqs = stats.max_batch_seqs.max(step.seqs.len());
            let sampled = self.runner.execute(&step, &seqs, &mut stats.step_times)?;
            let now = start.elapsed().as_secs_f64();
            for (item, tok) in step.seqs.iter().zip(sampled) {
                let seq = &mut seqs[item.seq];
                seq.num_computed += item.num_tokens;
                let Some(tok) = tok else { continue };
                seq.tokens.push(tok);
                generated += 1;
                seq.first_token_at.get_or_insert(now);
                if seq.num_output() == seq.max_tokens {
                    seq.finished_at = Some(now);
                    sched.finish(seq, &mut pool);
                    finished += 1;
                }
            }
            stats.steps += 1;
            on_step(StepReport {
                finished,
                generated,
                elapsed: now,
            });
        }
        stats.elapsed = start.elapsed().as_secs_f64();
        stats.blocks_in_use_after = pool.num_blocks() - pool.num_free();
        stats.prefix_cache = sched.prefix_stats();
        let outputs = seqs
            .into_iter()
            .map(|s| RequestOutput {
                request: s.request,
                sample: s.sample,
                prompt_len: s.prompt_len,
                ttft: s.first_token_at.unwrap_or(stats.elapsed),
                e2e: s.finished_at.unwrap_or(stats.elapsed),
                preemptions: s.preemptions,
                output_ids: s.tokens[s.prompt_len..].to_vec(),
            })
            .collect();
        Ok(RunOutput { outputs, stats })
    }
}

//! Runs one shape through the engine's runner: every sequence's blocks are allocated up front,
//! the whole batch is prefilled (in chunks of the token budget, as the scheduler would cut
//! it), then every sequence decodes together, one token per step, until each has its outputs.
//! Timed iterations come first; one more iteration, apart, records the kernels (so their
//! timing marks never touch the headline figures).

use std::time::Instant;

use anyhow::{Result, bail};

use super::Shape;
use crate::engine::block::{BlockPool, blocks_for};
use crate::engine::runner::{ModelRunner, StepTimes};
use crate::engine::scheduler::{Schedule, ScheduledSeq};
use crate::engine::sequence::Sequence;
use crate::profile::{self, KernelTimes};
use crate::util::Rng64;

/// How each shape is run.
#[derive(Clone, Copy, Debug)]
pub struct BenchOptions {
    /// Unmeasured iterations first (caches, allocator, lazily loaded kernels).
    pub warmup: usize,
    /// Measured iterations.
    pub iters: usize,
    /// Most tokens in one prefill step.
    pub max_step_tokens: usize,
    /// Whether to run the extra iteration that times each kernel.
    pub kernels: bool,
    /// Seed of the random prompts.
    pub seed: u64,
}

/// Kernel times of the profiled iteration: the whole prefill, and one decode step on average.
#[derive(Clone, Debug, Default)]
pub struct KernelBreakdown {
    pub prefill: KernelTimes,
    /// Wall time of the profiled prefill (the kernels' sum plus what lies between them).
    pub prefill_wall: f64,
    pub decode_step: KernelTimes,
    pub decode_step_wall: f64,
}

/// Everything measured for one shape, in seconds.
#[derive(Clone, Debug)]
pub struct ShapeRun {
    pub shape: Shape,
    /// Steps one prefill took (more than one when the batch exceeds the token budget).
    pub prefill_steps: usize,
    /// Each measured iteration's prefill (all steps, first tokens sampled).
    pub prefill: Vec<f64>,
    /// Each measured iteration's decode phase (all decode steps).
    pub decode: Vec<f64>,
    /// Every measured decode step.
    pub decode_step: Vec<f64>,
    /// Host and device shares of the measured decode steps.
    pub decode_split: StepTimes,
    pub kernels: Option<KernelBreakdown>,
}

/// A sequence's tokens per block and the pool the shape's blocks come from.
pub struct CacheRoom {
    pub block_size: usize,
    pub num_blocks: usize,
}

impl CacheRoom {
    /// Blocks `shape` holds at once.
    pub fn blocks_needed(&self, shape: &Shape) -> usize {
        shape.batch * blocks_for(shape.input_len + shape.output_len, self.block_size)
    }

    /// Fails, naming the shape, when the cache cannot hold the whole batch.
    pub fn check(&self, shape: &Shape, knob: &str) -> Result<()> {
        let need = self.blocks_needed(shape);
        if need > self.num_blocks {
            bail!(
                "shape {shape}: the batch needs {need} KV blocks of {} tokens, the cache holds {} (raise {knob} or lower the batch)",
                self.block_size,
                self.num_blocks
            );
        }
        Ok(())
    }
}

/// Times of one iteration.
#[derive(Default)]
struct Iteration {
    prefill: f64,
    prefill_steps: usize,
    decode_steps: Vec<f64>,
    split: StepTimes,
    kernels: KernelBreakdown,
}

/// The prefill of `seqs` cut into steps of at most `budget` tokens, in sequence order (a
/// sequence's prompt may span two steps, as chunked prefill does).
pub fn prefill_steps(seqs: &[Sequence], budget: usize) -> Vec<Schedule> {
    let mut steps = Vec::new();
    let mut cur = Schedule::default();
    let mut room = budget;
    for (i, s) in seqs.iter().enumerate() {
        let mut left = s.prompt_len;
        while left > 0 {
            let n = left.min(room);
            cur.seqs.push(ScheduledSeq {
                seq: i,
                num_tokens: n,
            });
            left -= n;
            room -= n;
            if room == 0 {
                steps.push(std::mem::take(&mut cur));
                room = budget;
            }
        }
    }
    if !cur.is_empty() {
        steps.push(cur);
    }
    steps
}

/// Runs one step through `runner`, advances the sequences, and returns its wall time.
fn step(
    runner: &ModelRunner,
    sched: &Schedule,
    seqs: &mut [Sequence],
    split: &mut StepTimes,
    kernels: Option<&mut KernelTimes>,
) -> Result<f64> {
    let t = Instant::now();
    let sampled = match kernels {
        Some(acc) => {
            let (out, k) = profile::record(runner.model().device(), || {
                runner.execute(sched, seqs, split)
            })?;
            acc.add(&k);
            out
        }
        None => runner.execute(sched, seqs, split)?,
    };
    let wall = t.elapsed().as_secs_f64();
    for (item, tok) in sched.seqs.iter().zip(sampled) {
        let seq = &mut seqs[item.seq];
        seq.num_computed += item.num_tokens;
        if let Some(tok) = tok {
            seq.tokens.push(tok);
        }
    }
    Ok(wall)
}

fn iteration(
    runner: &ModelRunner,
    room: &CacheRoom,
    shape: &Shape,
    opts: &BenchOptions,
    profiled: bool,
) -> Result<Iteration> {
    let vocab = runner.model().dims().vocab;
    let mut rng = Rng64::new(opts.seed);
    let mut pool = BlockPool::new(room.num_blocks);
    let mut seqs = Vec::with_capacity(shape.batch);
    for i in 0..shape.batch {
        let prompt: Vec<u32> = (0..shape.input_len)
            .map(|_| rng.range_inclusive(0, vocab - 1) as u32)
            .collect();
        let mut seq = Sequence::new(i, &prompt, shape.output_len);
        let need = blocks_for(shape.input_len + shape.output_len, room.block_size);
        if !pool.allocate_into(need, &mut seq.blocks) {
            bail!("shape {shape}: ran out of KV blocks at sequence {i}");
        }
        seqs.push(seq);
    }
    let mut it = Iteration::default();
    let mut k_prefill = KernelTimes::default();
    let schedules = prefill_steps(&seqs, opts.max_step_tokens);
    it.prefill_steps = schedules.len();
    let mut prefill_split = StepTimes::default();
    for sched in &schedules {
        let k = profiled.then_some(&mut k_prefill);
        it.prefill += step(runner, sched, &mut seqs, &mut prefill_split, k)?;
    }
    let decode = Schedule {
        seqs: (0..shape.batch)
            .map(|seq| ScheduledSeq { seq, num_tokens: 1 })
            .collect(),
        preempted: vec![],
    };
    let mut k_decode = KernelTimes::default();
    for _ in 0..shape.decode_steps() {
        let k = profiled.then_some(&mut k_decode);
        it.decode_steps
            .push(step(runner, &decode, &mut seqs, &mut it.split, k)?);
    }
    for s in &seqs {
        if s.num_output() != shape.output_len {
            bail!(
                "shape {shape}: sequence {} produced {} tokens, not {}",
                s.id,
                s.num_output(),
                shape.output_len
            );
        }
    }
    if profiled {
        let n = it.decode_steps.len().max(1) as f64;
        it.kernels = KernelBreakdown {
            prefill: k_prefill,
            prefill_wall: it.prefill,
            decode_step: k_decode.scaled(n),
            decode_step_wall: it.decode_steps.iter().sum::<f64>() / n,
        };
    }
    Ok(it)
}

/// Runs `shape`: warm-up, measured iterations, then (if asked) the profiled one.
pub fn run_shape(
    runner: &ModelRunner,
    room: &CacheRoom,
    shape: &Shape,
    opts: &BenchOptions,
) -> Result<ShapeRun> {
    if opts.iters == 0 {
        bail!("--iters must be at least 1");
    }
    for _ in 0..opts.warmup {
        iteration(runner, room, shape, opts, false)?;
    }
    let mut run = ShapeRun {
        shape: *shape,
        prefill_steps: 0,
        prefill: Vec::new(),
        decode: Vec::new(),
        decode_step: Vec::new(),
        decode_split: StepTimes::default(),
        kernels: None,
    };
    for _ in 0..opts.iters {
        let it = iteration(runner, room, shape, opts, false)?;
        run.prefill_steps = it.prefill_steps;
        run.prefill.push(it.prefill);
        run.decode.push(it.decode_steps.iter().sum());
        run.decode_step.extend(&it.decode_steps);
        run.decode_split.prepare += it.split.prepare;
        run.decode_split.forward += it.split.forward;
        run.decode_split.sample += it.split.sample;
    }
    if opts.kernels {
        run.kernels = Some(iteration(runner, room, shape, opts, true)?.kernels);
    }
    Ok(run)
}

/// Share of the measured decode steps' time spent building and uploading their inputs on the
/// host (the rest is the forward pass, waited for, and sampling).
pub fn host_share(split: &StepTimes) -> f64 {
    let total = split.prepare + split.forward + split.sample;
    if total == 0.0 {
        0.0
    } else {
        split.prepare / total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seqs(lens: &[usize]) -> Vec<Sequence> {
        lens.iter()
            .enumerate()
            .map(|(i, &n)| Sequence::new(i, &vec![1; n], 4))
            .collect()
    }

    #[test]
    fn prefill_is_cut_at_the_budget() {
        let s = seqs(&[5, 5, 5]);
        let steps = prefill_steps(&s, 8);
        let cut: Vec<Vec<(usize, usize)>> = steps
            .iter()
            .map(|st| st.seqs.iter().map(|x| (x.seq, x.num_tokens)).collect())
            .collect();
        assert_eq!(cut, vec![vec![(0, 5), (1, 3)], vec![(1, 2), (2, 5)]]);
        // One step when the budget holds everything.
        assert_eq!(prefill_steps(&s, 100).len(), 1);
        // Every prompt token exactly once.
        for budget in 1..20 {
            let total: usize = prefill_steps(&s, budget)
                .iter()
                .map(|x| x.num_tokens())
                .sum();
            assert_eq!(total, 15);
        }
    }

    #[test]
    fn cache_room_names_the_shape() {
        let room = CacheRoom {
            block_size: 16,
            num_blocks: 10,
        };
        let ok = Shape {
            batch: 2,
            input_len: 60,
            output_len: 20,
        };
        assert_eq!(room.blocks_needed(&ok), 10);
        assert!(room.check(&ok, "--kv-cache-memory").is_ok());
        let big = Shape { batch: 3, ..ok };
        let err = room
            .check(&big, "--kv-cache-memory")
            .unwrap_err()
            .to_string();
        assert!(err.contains("batch 3 x input 60 + output 20"), "{err}");
        assert!(err.contains("--kv-cache-memory"), "{err}");
    }
}

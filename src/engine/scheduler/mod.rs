//! Continuous batching: which sequences run in the next step, and with how many tokens.
//!
//! As in vLLM's V1 scheduler there are no separate prefill and decode phases: every step has a
//! token budget (`max_num_batched_tokens`) and a sequence cap (`max_num_seqs`). Running
//! sequences are served first, in admission order, each with all its pending tokens (one for a
//! decode, the rest of the prompt for a prefill) as far as the budget goes, so long prompts are
//! split across steps (chunked prefill). When a running sequence needs a block and none is free,
//! the most recently admitted running sequence is preempted: its blocks are freed and it goes back
//! to the front of the queue to be recomputed later, losing nothing. Waiting sequences are then
//! admitted in order while budget, sequence slots and free blocks last (none are admitted in a
//! step that had to preempt). With prefix caching, an admitted sequence first takes the cached
//! blocks that hold the start of its tokens and computes only the rest; blocks that fill up are
//! indexed as soon as they are scheduled.

use std::collections::VecDeque;

use super::block::{BlockPool, blocks_for};
use super::prefix::PrefixCacheStats;
use super::sequence::{SeqStatus, Sequence};

/// Limits of one step.
#[derive(Clone, Copy, Debug)]
pub struct SchedulerConfig {
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
    pub block_size: usize,
}

/// One sequence's share of a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScheduledSeq {
    pub seq: usize,
    pub num_tokens: usize,
}

/// What to run in one step.
#[derive(Clone, Debug, Default)]
pub struct Schedule {
    pub seqs: Vec<ScheduledSeq>,
    /// Sequences preempted while building this step.
    pub preempted: Vec<usize>,
}

impl Schedule {
    pub fn num_tokens(&self) -> usize {
        self.seqs.iter().map(|s| s.num_tokens).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.seqs.is_empty()
    }
}

/// The waiting queue and the running set.
#[derive(Debug)]
pub struct Scheduler {
    cfg: SchedulerConfig,
    waiting: VecDeque<usize>,
    running: Vec<usize>,
    prefix_stats: PrefixCacheStats,
}

impl Scheduler {
    pub fn new(cfg: SchedulerConfig) -> Self {
        Self {
            cfg,
            waiting: VecDeque::new(),
            running: Vec::new(),
            prefix_stats: PrefixCacheStats::default(),
        }
    }

    /// Queues a new sequence (by its index in the engine's sequence list).
    pub fn add(&mut self, seq: usize) {
        self.waiting.push_back(seq);
    }

    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn has_work(&self) -> bool {
        !self.running.is_empty() || !self.waiting.is_empty()
    }

    /// Prefix-cache lookups so far (all zero without prefix caching).
    pub fn prefix_stats(&self) -> PrefixCacheStats {
        self.prefix_stats
    }

    /// Builds the next step, allocating the blocks its tokens need.
    pub fn schedule(&mut self, seqs: &mut [Sequence], pool: &mut BlockPool) -> Schedule {
        let bs = self.cfg.block_size;
        let mut budget = self.cfg.max_num_batched_tokens;
        let mut out = Schedule::default();

        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let id = self.running[i];
            let n = seqs[id].num_pending().min(budget);
            let mut scheduled = false;
            loop {
                let seq = &mut seqs[id];
                let need = blocks_for(seq.num_computed + n, bs).saturating_sub(seq.blocks.len());
                if pool.allocate_into(need, &mut seq.blocks) {
                    scheduled = true;
                    break;
                }
                // Out of blocks: preempt the lowest-priority (most recently admitted) sequence.
                let Some(victim) = self.running.pop() else {
                    break;
                };
                Self::preempt(&mut seqs[victim], pool);
                self.waiting.push_front(victim);
                out.preempted.push(victim);
                if victim == id {
                    break;
                }
            }
            if !scheduled {
                break;
            }
            let seq = &mut seqs[id];
            pool.cache_full_blocks(seq, seq.num_computed + n);
            out.seqs.push(ScheduledSeq {
                seq: id,
                num_tokens: n,
            });
            budget -= n;
            i += 1;
        }

        if out.preempted.is_empty() {
            while budget > 0 && self.running.len() < self.cfg.max_num_seqs {
                let Some(&id) = self.waiting.front() else {
                    break;
                };
                let Some(n) = self.admit(&mut seqs[id], pool, budget) else {
                    break;
                };
                self.waiting.pop_front();
                self.running.push(id);
                out.seqs.push(ScheduledSeq {
                    seq: id,
                    num_tokens: n,
                });
                budget -= n;
            }
        }
        out
    }

    /// Gives a waiting sequence its cached prefix and the blocks for up to `budget` more tokens;
    /// returns how many tokens it computes this step, or None (and changes nothing) when the
    /// free blocks do not suffice.
    fn admit(&mut self, seq: &mut Sequence, pool: &mut BlockPool, budget: usize) -> Option<usize> {
        let bs = self.cfg.block_size;
        let hit = pool.longest_hit(&seq.tokens);
        let cached = hit.len() * bs;
        let n = (seq.num_tokens() - cached).min(budget);
        let fresh = blocks_for(cached + n, bs) - hit.len();
        // Cached blocks nobody holds are counted free: claiming them uses up free blocks too.
        let claimed = hit.iter().filter(|&&(b, _)| pool.ref_count(b) == 0).count();
        if fresh + claimed > pool.num_free() {
            return None;
        }
        for (block, key) in hit {
            pool.touch(block);
            seq.blocks.push(block);
            seq.block_keys.push(key);
        }
        if !pool.allocate_into(fresh, &mut seq.blocks) {
            Self::release(seq, pool);
            return None;
        }
        if pool.prefix_caching() {
            self.prefix_stats.queries += seq.num_tokens();
            self.prefix_stats.hits += cached;
        }
        seq.num_computed = cached;
        pool.cache_full_blocks(seq, cached + n);
        seq.status = SeqStatus::Running;
        Some(n)
    }

    /// Returns a sequence's blocks to the pool; nothing of it stays computed.
    fn release(seq: &mut Sequence, pool: &mut BlockPool) {
        pool.free(&seq.blocks);
        seq.blocks.clear();
        seq.block_keys.clear();
        seq.num_computed = 0;
    }

    fn preempt(seq: &mut Sequence, pool: &mut BlockPool) {
        Self::release(seq, pool);
        seq.status = SeqStatus::Waiting;
        seq.preemptions += 1;
    }

    /// Retires a finished sequence and returns its blocks to the pool.
    pub fn finish(&mut self, seq: &mut Sequence, pool: &mut BlockPool) {
        self.running.retain(|&r| r != seq.id);
        Self::release(seq, pool);
        seq.status = SeqStatus::Finished;
    }
}

#[cfg(test)]
mod tests;

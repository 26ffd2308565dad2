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
//! step that had to preempt).

use std::collections::VecDeque;

use super::block::{BlockPool, blocks_for};
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
}

impl Scheduler {
    pub fn new(cfg: SchedulerConfig) -> Self {
        Self {
            cfg,
            waiting: VecDeque::new(),
            running: Vec::new(),
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
                let seq = &mut seqs[id];
                let n = seq.num_pending().min(budget);
                if !pool.allocate_into(blocks_for(n, bs), &mut seq.blocks) {
                    break;
                }
                seq.status = SeqStatus::Running;
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

    fn preempt(seq: &mut Sequence, pool: &mut BlockPool) {
        pool.free(&seq.blocks);
        seq.blocks.clear();
        seq.num_computed = 0;
        seq.status = SeqStatus::Waiting;
        seq.preemptions += 1;
    }

    /// Retires a finished sequence and returns its blocks to the pool.
    pub fn finish(&mut self, seq: &mut Sequence, pool: &mut BlockPool) {
        self.running.retain(|&r| r != seq.id);
        pool.free(&seq.blocks);
        seq.blocks.clear();
        seq.status = SeqStatus::Finished;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cfg(seqs: usize, tokens: usize, bs: usize) -> SchedulerConfig {
        SchedulerConfig {
            max_num_seqs: seqs,
            max_num_batched_tokens: tokens,
            block_size: bs,
        }
    }

    /// Runs the scheduler against a fake model that "generates" token 7 whenever a sequence's
    /// pending tokens are all computed; returns the schedules.
    fn drive(
        cfg: SchedulerConfig,
        blocks: usize,
        reqs: &[(usize, usize)],
    ) -> (Vec<Sequence>, Vec<Schedule>, BlockPool) {
        let mut seqs: Vec<Sequence> = reqs
            .iter()
            .enumerate()
            .map(|(i, &(p, m))| Sequence::new(i, &vec![1; p], m))
            .collect();
        let mut pool = BlockPool::new(blocks);
        let mut s = Scheduler::new(cfg);
        (0..seqs.len()).for_each(|i| s.add(i));
        let mut steps = vec![];
        while s.has_work() {
            let sched = s.schedule(&mut seqs, &mut pool);
            assert!(!sched.is_empty(), "no progress");
            assert!(sched.num_tokens() <= cfg.max_num_batched_tokens);
            assert!(sched.seqs.len() <= cfg.max_num_seqs);
            for item in &sched.seqs {
                let seq = &mut seqs[item.seq];
                seq.num_computed += item.num_tokens;
                assert!(seq.blocks.len() * cfg.block_size >= seq.num_computed);
                if seq.num_computed == seq.num_tokens() {
                    seq.tokens.push(7);
                    if seq.num_output() == seq.max_tokens {
                        s.finish(seq, &mut pool);
                    }
                }
            }
            steps.push(sched);
            assert!(steps.len() < 10_000);
        }
        (seqs, steps, pool)
    }

    #[test]
    fn decodes_are_batched_after_prefill() {
        let (seqs, steps, pool) = drive(cfg(8, 100, 4), 100, &[(10, 3), (5, 3)]);
        assert_eq!(steps[0].seqs.len(), 2);
        assert_eq!(steps[0].num_tokens(), 15);
        assert_eq!(steps[1].num_tokens(), 2);
        assert_eq!(steps.len(), 3);
        assert!(seqs.iter().all(|s| s.num_output() == 3));
        assert_eq!(pool.num_free(), 100);
    }

    #[test]
    fn long_prompts_are_chunked() {
        let (_, steps, _) = drive(cfg(8, 16, 4), 100, &[(40, 2)]);
        let chunks: Vec<usize> = steps.iter().map(|s| s.num_tokens()).collect();
        assert_eq!(chunks, vec![16, 16, 8, 1]);
    }

    #[test]
    fn running_sequences_come_before_new_prompts() {
        let (_, steps, _) = drive(cfg(8, 10, 4), 100, &[(4, 5), (20, 1)]);
        // Step 0: 4 prompt tokens of A + 6 of B; step 1: A's decode first, then 9 of B.
        assert_eq!(
            steps[0].seqs[0],
            ScheduledSeq {
                seq: 0,
                num_tokens: 4
            }
        );
        assert_eq!(
            steps[0].seqs[1],
            ScheduledSeq {
                seq: 1,
                num_tokens: 6
            }
        );
        assert_eq!(
            steps[1].seqs[0],
            ScheduledSeq {
                seq: 0,
                num_tokens: 1
            }
        );
        assert_eq!(
            steps[1].seqs[1],
            ScheduledSeq {
                seq: 1,
                num_tokens: 9
            }
        );
    }

    #[test]
    fn sequence_cap_is_respected() {
        let (_, steps, _) = drive(cfg(2, 1000, 4), 100, &[(3, 2), (3, 2), (3, 2)]);
        assert_eq!(steps[0].seqs.len(), 2);
        assert!(steps.iter().any(|s| s.seqs.iter().any(|x| x.seq == 2)));
    }

    #[test]
    fn preemption_frees_the_newest_and_loses_nothing() {
        // Each sequence grows to 8 + 8 = 16 tokens = 4 blocks; 6 blocks hold both prompts but
        // not both sequences at full length.
        let (seqs, steps, pool) = drive(cfg(8, 100, 4), 6, &[(8, 8), (8, 8)]);
        let preempted: Vec<usize> = steps.iter().flat_map(|s| s.preempted.clone()).collect();
        assert!(!preempted.is_empty());
        assert_eq!(preempted[0], 1, "the most recently admitted goes first");
        assert!(seqs.iter().all(|s| s.num_output() == 8));
        assert_eq!(seqs[1].preemptions as usize, preempted.len());
        assert_eq!(pool.num_free(), 6);
    }

    proptest! {
        // Whatever the limits, every request finishes with exactly its max_tokens and every
        // block comes back.
        #[test]
        fn every_request_finishes(
            reqs in proptest::collection::vec((1usize..40, 1usize..12), 1..12),
            max_seqs in 1usize..6,
            budget in 1usize..64,
            bs in 1usize..9,
            spare in 0usize..20,
        ) {
            let biggest = reqs.iter().map(|&(p, m)| blocks_for(p + m, bs)).max().unwrap();
            let (seqs, _, pool) = drive(cfg(max_seqs, budget, bs), biggest + spare, &reqs);
            for (s, &(_, m)) in seqs.iter().zip(&reqs) {
                prop_assert_eq!(s.num_output(), m);
                prop_assert_eq!(s.status, SeqStatus::Finished);
            }
            prop_assert_eq!(pool.num_free(), biggest + spare);
        }
    }
}

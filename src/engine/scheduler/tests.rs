//! The scheduler against a fake model whose K/V cache is checked slot by slot.

use super::*;
use crate::engine::prefix::PrefixCacheStats;
use proptest::prelude::*;

fn cfg(seqs: usize, tokens: usize, bs: usize) -> SchedulerConfig {
    SchedulerConfig {
        max_num_seqs: seqs,
        max_num_batched_tokens: tokens,
        block_size: bs,
    }
}

/// What a fake model writes into a token's K/V slot: a fingerprint of the token and every
/// token before it, as real K/V depend on the whole prefix.
fn fingerprint(prefix: &[u32]) -> u64 {
    prefix.iter().fold(0xcbf2_9ce4_8422_2325, |h, &t| {
        (h ^ t as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// Runs the scheduler against a fake model: each step first writes every scheduled token's
/// fingerprint into its cache slot, then checks that every position each scheduled sequence
/// attends to holds its own prefix's fingerprint (so a wrong prefix hit, a shared block written
/// over, or a slot never written fails), and "generates" a token that depends on the prefix
/// when a sequence's pending tokens are all computed. Returns the schedules.
fn drive_pool(
    cfg: SchedulerConfig,
    mut pool: BlockPool,
    reqs: &[(Vec<u32>, usize)],
) -> (Vec<Sequence>, Vec<Schedule>, BlockPool, Scheduler) {
    let bs = cfg.block_size;
    let mut seqs: Vec<Sequence> = reqs
        .iter()
        .enumerate()
        .map(|(i, (p, m))| Sequence::new(i, p, *m))
        .collect();
    let mut kv: Vec<Option<u64>> = vec![None; pool.num_blocks() * bs];
    let slot = |seq: &Sequence, p: usize| seq.blocks[p / bs] as usize * bs + p % bs;
    let mut s = Scheduler::new(cfg);
    (0..seqs.len()).for_each(|i| s.add(i));
    let mut steps = vec![];
    while s.has_work() {
        let sched = s.schedule(&mut seqs, &mut pool);
        assert!(!sched.is_empty(), "no progress");
        assert!(sched.num_tokens() <= cfg.max_num_batched_tokens);
        assert!(sched.seqs.len() <= cfg.max_num_seqs);
        for item in &sched.seqs {
            let seq = &seqs[item.seq];
            assert!(seq.blocks.len() * bs >= seq.num_computed + item.num_tokens);
            for p in seq.num_computed..seq.num_computed + item.num_tokens {
                kv[slot(seq, p)] = Some(fingerprint(&seq.tokens[..=p]));
            }
        }
        for item in &sched.seqs {
            let seq = &seqs[item.seq];
            for p in 0..seq.num_computed + item.num_tokens {
                assert_eq!(
                    kv[slot(seq, p)],
                    Some(fingerprint(&seq.tokens[..=p])),
                    "sequence {} reads a wrong K/V at position {p}",
                    seq.id
                );
            }
        }
        for item in &sched.seqs {
            let seq = &mut seqs[item.seq];
            seq.num_computed += item.num_tokens;
            if seq.num_computed == seq.num_tokens() {
                seq.tokens.push(1 + (fingerprint(&seq.tokens) % 3) as u32);
                if seq.num_output() == seq.max_tokens {
                    s.finish(seq, &mut pool);
                }
            }
        }
        steps.push(sched);
        assert!(steps.len() < 10_000);
    }
    (seqs, steps, pool, s)
}

/// [`drive_pool`] without prefix caching, over prompts of `p` ones.
fn drive(
    cfg: SchedulerConfig,
    blocks: usize,
    reqs: &[(usize, usize)],
) -> (Vec<Sequence>, Vec<Schedule>, BlockPool) {
    let reqs: Vec<(Vec<u32>, usize)> = reqs.iter().map(|&(p, m)| (vec![1; p], m)).collect();
    let (seqs, steps, pool, _) = drive_pool(cfg, BlockPool::new(blocks), &reqs);
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
    let shares = |step: &Schedule| -> Vec<(usize, usize)> {
        step.seqs.iter().map(|s| (s.seq, s.num_tokens)).collect()
    };
    assert_eq!(shares(&steps[0]), [(0, 4), (1, 6)]);
    assert_eq!(shares(&steps[1]), [(0, 1), (1, 9)]);
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

#[test]
fn a_shared_prefix_is_computed_once_even_in_the_same_step() {
    let prompt: Vec<u32> = (1..=10).collect();
    let reqs = vec![(prompt.clone(), 2), (prompt, 2)];
    let pool = BlockPool::with_prefix_caching(100, 4);
    let (seqs, steps, pool, s) = drive_pool(cfg(8, 100, 4), pool, &reqs);
    // The second sequence finds the first's two full blocks, indexed when they were scheduled.
    assert_eq!(steps[0].num_tokens(), 10 + 2);
    assert_eq!(seqs[0].tokens, seqs[1].tokens);
    assert_eq!(
        s.prefix_stats(),
        PrefixCacheStats {
            queries: 20,
            hits: 8
        }
    );
    assert_eq!(pool.num_free(), 100);
}

#[test]
fn a_fully_cached_prompt_still_computes_its_last_token() {
    let prompt: Vec<u32> = (1..=8).collect();
    let pool = BlockPool::with_prefix_caching(100, 4);
    let (_, steps, _, s) = drive_pool(cfg(1, 100, 4), pool, &[(prompt.clone(), 1), (prompt, 1)]);
    // One sequence at a time: the second finds block 0 only (block 1 holds its last token).
    assert_eq!(steps[1].num_tokens(), 4);
    assert_eq!(s.prefix_stats().hits, 4);
}

#[test]
fn preempted_sequences_find_their_own_blocks() {
    let reqs = vec![((1..=8).collect(), 8), ((11..=18).collect(), 8)];
    let run = |pool| drive_pool(cfg(8, 100, 4), pool, &reqs);
    let (plain, plain_steps, _, _) = run(BlockPool::new(6));
    let (cached, steps, pool, s) = run(BlockPool::with_prefix_caching(6, 4));
    assert!(seqs_preempted(&steps) > 0);
    assert!(
        s.prefix_stats().hits > 0,
        "recomputation found nothing cached"
    );
    let computed = |steps: &[Schedule]| steps.iter().map(Schedule::num_tokens).sum::<usize>();
    assert!(computed(&steps) < computed(&plain_steps));
    let outputs = |seqs: &[Sequence]| seqs.iter().map(|s| s.tokens.clone()).collect::<Vec<_>>();
    assert_eq!(outputs(&cached), outputs(&plain));
    assert_eq!(pool.num_free(), 6);
}

fn seqs_preempted(steps: &[Schedule]) -> usize {
    steps.iter().map(|s| s.preempted.len()).sum()
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

    // Prompts that share prefixes of any length, under any limits and block size: every block
    // each sequence reads holds its own prefix's K/V (checked by the driver), the outputs are
    // those of a run without prefix caching, and every block comes back.
    #[test]
    fn prefix_caching_never_serves_a_wrong_block(
        base in proptest::collection::vec(1u32..3, 1..40),
        reqs in proptest::collection::vec((0usize..40, proptest::collection::vec(1u32..3, 0..8), 1usize..10), 1..10),
        max_seqs in 1usize..6,
        budget in 1usize..64,
        bs in 1usize..9,
        spare in 0usize..20,
    ) {
        let reqs: Vec<(Vec<u32>, usize)> = reqs
            .into_iter()
            .map(|(take, tail, m)| {
                let mut p = base[..take.min(base.len())].to_vec();
                p.extend(tail);
                if p.is_empty() {
                    p.push(1);
                }
                (p, m)
            })
            .collect();
        let biggest = reqs.iter().map(|(p, m)| blocks_for(p.len() + m, bs)).max().unwrap();
        let blocks = biggest + spare;
        let (plain, _, _, _) = drive_pool(cfg(max_seqs, budget, bs), BlockPool::new(blocks), &reqs);
        let pool = BlockPool::with_prefix_caching(blocks, bs);
        let (cached, _, pool, _) = drive_pool(cfg(max_seqs, budget, bs), pool, &reqs);
        for (a, b) in cached.iter().zip(&plain) {
            prop_assert_eq!(&a.tokens, &b.tokens);
            prop_assert_eq!(a.status, SeqStatus::Finished);
        }
        prop_assert_eq!(pool.num_free(), blocks);
    }
}

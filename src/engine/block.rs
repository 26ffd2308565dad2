//! The KV block pool: which cache blocks are free, how many sequences hold each one, and (with
//! prefix caching) which free blocks still hold K/V a later sequence can reuse.
//!
//! Free blocks wait in a queue, least recently freed first, and allocation takes from its front.
//! With prefix caching a freed block keeps its content, indexed by the [`PrefixIndex`], until
//! allocation reaches it and evicts it; until then a sequence whose prefix matches can claim it
//! back out of the middle of the queue ([`BlockPool::touch`]). Holders free their blocks last
//! first, so a prefix's tail is evicted before its head: least recently used, as vLLM's V1 pool.

use super::prefix::{ContentId, PrefixIndex, ROOT};
use super::sequence::Sequence;

const NIL: u32 = u32::MAX;

/// Free blocks in eviction order; any block can leave from the middle in O(1).
#[derive(Debug)]
struct FreeQueue {
    prev: Vec<u32>,
    next: Vec<u32>,
    head: u32,
    tail: u32,
    len: usize,
}

impl FreeQueue {
    /// Every block free, in index order.
    fn full(n: usize) -> Self {
        let n32 = n as u32;
        Self {
            prev: (0..n32).map(|b| if b == 0 { NIL } else { b - 1 }).collect(),
            next: (0..n32)
                .map(|b| if b + 1 == n32 { NIL } else { b + 1 })
                .collect(),
            head: if n == 0 { NIL } else { 0 },
            tail: if n == 0 { NIL } else { n32 - 1 },
            len: n,
        }
    }

    fn push_back(&mut self, b: u32) {
        self.prev[b as usize] = self.tail;
        self.next[b as usize] = NIL;
        match self.tail {
            NIL => self.head = b,
            t => self.next[t as usize] = b,
        }
        self.tail = b;
        self.len += 1;
    }

    fn remove(&mut self, b: u32) {
        let (p, n) = (self.prev[b as usize], self.next[b as usize]);
        match p {
            NIL => self.head = n,
            p => self.next[p as usize] = n,
        }
        match n {
            NIL => self.tail = p,
            n => self.prev[n as usize] = p,
        }
        self.len -= 1;
    }

    fn pop_front(&mut self) -> Option<u32> {
        let b = self.head;
        (b != NIL).then(|| {
            self.remove(b);
            b
        })
    }

    #[cfg(test)]
    fn order(&self) -> Vec<u32> {
        std::iter::successors((self.head != NIL).then_some(self.head), |&b| {
            let n = self.next[b as usize];
            (n != NIL).then_some(n)
        })
        .collect()
    }
}

/// A fixed pool of `num_blocks` KV blocks.
#[derive(Debug)]
pub struct BlockPool {
    free: FreeQueue,
    ref_counts: Vec<u32>,
    prefix: Option<PrefixIndex>,
}

impl BlockPool {
    /// A pool without prefix caching: a freed block's content is forgotten.
    pub fn new(num_blocks: usize) -> Self {
        Self {
            free: FreeQueue::full(num_blocks),
            ref_counts: vec![0; num_blocks],
            prefix: None,
        }
    }

    /// A pool that keeps full blocks of `block_size` tokens findable by their prefix.
    pub fn with_prefix_caching(num_blocks: usize, block_size: usize) -> Self {
        Self {
            prefix: Some(PrefixIndex::new(num_blocks, block_size)),
            ..Self::new(num_blocks)
        }
    }

    pub fn num_blocks(&self) -> usize {
        self.ref_counts.len()
    }

    /// Blocks no sequence holds (cached ones among them: they can be allocated).
    pub fn num_free(&self) -> usize {
        self.free.len
    }

    /// Fraction of blocks in use.
    pub fn usage(&self) -> f64 {
        1.0 - self.num_free() as f64 / self.num_blocks().max(1) as f64
    }

    pub fn prefix_caching(&self) -> bool {
        self.prefix.is_some()
    }

    /// Appends `n` fresh blocks to `dst` (evicting cached content they held), or takes none and
    /// returns false if fewer are free.
    pub fn allocate_into(&mut self, n: usize, dst: &mut Vec<u32>) -> bool {
        if n > self.free.len {
            return false;
        }
        for _ in 0..n {
            let Some(b) = self.free.pop_front() else {
                return false;
            };
            debug_assert_eq!(self.ref_counts[b as usize], 0);
            self.ref_counts[b as usize] = 1;
            if let Some(ix) = &mut self.prefix {
                ix.evict(b);
            }
            dst.push(b);
        }
        true
    }

    /// Adds a holder to an allocated block.
    pub fn share(&mut self, block: u32) {
        let rc = &mut self.ref_counts[block as usize];
        assert!(*rc > 0, "sharing free block {block}");
        *rc += 1;
    }

    /// Adds a holder to a block found in the prefix index, taking it off the free queue if no
    /// one held it.
    pub fn touch(&mut self, block: u32) {
        if self.ref_counts[block as usize] == 0 {
            self.free.remove(block);
        }
        self.ref_counts[block as usize] += 1;
    }

    /// Drops one holder of each block, last block first; blocks with no holder left join the
    /// back of the free queue (keeping any cached content until they are allocated again).
    pub fn free(&mut self, blocks: &[u32]) {
        for &b in blocks.iter().rev() {
            let rc = &mut self.ref_counts[b as usize];
            assert!(*rc > 0, "double free of block {b}");
            *rc -= 1;
            if *rc == 0 {
                self.free.push_back(b);
            }
        }
    }

    pub fn ref_count(&self, block: u32) -> u32 {
        self.ref_counts[block as usize]
    }

    /// The cached blocks that hold the start of `tokens`, with their identities: whole blocks
    /// only, and never all of `tokens` (the last token must be computed for its logits).
    pub fn longest_hit(&self, tokens: &[u32]) -> Vec<(u32, ContentId)> {
        let Some(ix) = &self.prefix else {
            return Vec::new();
        };
        let bs = ix.block_size();
        let mut hit = Vec::new();
        let mut parent = ROOT;
        for chunk in tokens[..tokens.len().saturating_sub(1)].chunks_exact(bs) {
            let Some((block, id)) = ix.lookup(parent, chunk) else {
                break;
            };
            hit.push((block, id));
            parent = id;
        }
        hit
    }

    /// Indexes `seq`'s blocks that are full once its first `computed` tokens are: from then on
    /// other sequences can find them (in the same step too, since each layer writes the step's
    /// K/V before any query of the step reads them).
    pub fn cache_full_blocks(&mut self, seq: &mut Sequence, computed: usize) {
        let Some(ix) = &mut self.prefix else {
            return;
        };
        let bs = ix.block_size();
        for i in seq.block_keys.len()..computed / bs {
            let parent = i.checked_sub(1).map_or(ROOT, |p| seq.block_keys[p]);
            let id = ix.insert(seq.blocks[i], parent, &seq.tokens[i * bs..][..bs]);
            seq.block_keys.push(id);
        }
    }
}

/// Blocks needed to hold `tokens` tokens.
pub fn blocks_for(tokens: usize, block_size: usize) -> usize {
    tokens.div_ceil(block_size)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn all_or_nothing_allocation() {
        let mut pool = BlockPool::new(4);
        let mut a = vec![];
        assert!(pool.allocate_into(3, &mut a));
        assert_eq!(a, vec![0, 1, 2]);
        let mut b = vec![];
        assert!(!pool.allocate_into(2, &mut b));
        assert!(b.is_empty());
        assert_eq!(pool.num_free(), 1);
        pool.free(&a);
        assert_eq!(pool.num_free(), 4);
        // The block never handed out comes first, then the freed ones, a holder's last first.
        assert_eq!(pool.free.order(), vec![3, 2, 1, 0]);
        assert!(pool.allocate_into(2, &mut b));
        assert_eq!(b, vec![3, 2]);
    }

    #[test]
    fn shared_blocks_free_on_last_holder() {
        let mut pool = BlockPool::new(2);
        let mut a = vec![];
        assert!(pool.allocate_into(1, &mut a));
        pool.share(a[0]);
        pool.free(&a);
        assert_eq!(pool.num_free(), 1);
        assert_eq!(pool.ref_count(a[0]), 1);
        pool.free(&a);
        assert_eq!(pool.num_free(), 2);
    }

    #[test]
    #[should_panic(expected = "double free")]
    fn double_free_is_caught() {
        let mut pool = BlockPool::new(2);
        let mut a = vec![];
        assert!(pool.allocate_into(1, &mut a));
        pool.free(&a);
        pool.free(&a);
    }

    /// A sequence holding `blocks` whose tokens are `tokens`.
    fn holder(tokens: &[u32], blocks: Vec<u32>) -> Sequence {
        let mut seq = Sequence::new(0, tokens, 1);
        seq.blocks = blocks;
        seq
    }

    #[test]
    fn freed_blocks_stay_findable_until_allocated() {
        let mut pool = BlockPool::with_prefix_caching(4, 2);
        let mut a = holder(&[1, 2, 3, 4, 5], vec![]);
        assert!(pool.allocate_into(3, &mut a.blocks));
        pool.cache_full_blocks(&mut a, 5);
        assert_eq!(a.block_keys.len(), 2, "the third block is not full");
        pool.free(&a.blocks);
        assert_eq!(pool.num_free(), 4);
        // Both full blocks are found; the last token is never a hit.
        let hit = pool.longest_hit(&[1, 2, 3, 4, 9]);
        assert_eq!(hit.iter().map(|h| h.0).collect::<Vec<_>>(), vec![0, 1]);
        assert_eq!(pool.longest_hit(&[1, 2, 3, 4]).len(), 1);
        assert_eq!(pool.longest_hit(&[1, 9, 3, 4, 5]).len(), 0);
        // Claiming the first block back takes it out of the middle of the free queue.
        pool.touch(0);
        assert_eq!(pool.ref_count(0), 1);
        assert_eq!(pool.free.order(), vec![3, 2, 1]);
        // Allocating three reaches block 1 (after 3 and the uncached 2) and evicts its content:
        // the prefix is found only up to block 0.
        let mut b = vec![];
        assert!(pool.allocate_into(3, &mut b));
        assert_eq!(b, vec![3, 2, 1]);
        assert_eq!(pool.longest_hit(&[1, 2, 3, 4, 9]).len(), 1);
    }

    #[test]
    fn only_computed_blocks_are_indexed() {
        // A prefill chunk that ends inside block 1: its tokens are known, its K/V are not all
        // written yet, so no one may find it.
        let mut pool = BlockPool::with_prefix_caching(4, 4);
        let mut a = holder(&[1, 2, 3, 4, 5, 6, 7, 8], vec![]);
        assert!(pool.allocate_into(2, &mut a.blocks));
        pool.cache_full_blocks(&mut a, 6);
        assert_eq!(a.block_keys.len(), 1);
        assert_eq!(pool.longest_hit(&[1, 2, 3, 4, 5, 6, 7, 8, 9]).len(), 1);
        pool.cache_full_blocks(&mut a, 8);
        assert_eq!(pool.longest_hit(&[1, 2, 3, 4, 5, 6, 7, 8, 9]).len(), 2);
    }

    #[test]
    fn a_pool_without_prefix_caching_finds_nothing() {
        let mut pool = BlockPool::new(4);
        let mut a = holder(&[1, 2, 3, 4, 5], vec![]);
        assert!(pool.allocate_into(3, &mut a.blocks));
        pool.cache_full_blocks(&mut a, 5);
        assert!(a.block_keys.is_empty());
        pool.free(&a.blocks);
        assert!(pool.longest_hit(&[1, 2, 3, 4, 5]).is_empty());
    }

    proptest! {
        // Any interleaving of allocations and frees keeps every block either free or held,
        // never both, never lost.
        #[test]
        fn blocks_are_conserved(ops in proptest::collection::vec((0usize..6, any::<bool>()), 1..200)) {
            let mut pool = BlockPool::with_prefix_caching(16, 1);
            let mut held: Vec<Vec<u32>> = vec![];
            for (n, alloc) in ops {
                if alloc || held.is_empty() {
                    let mut v = vec![];
                    let free_before = pool.num_free();
                    if pool.allocate_into(n, &mut v) {
                        prop_assert_eq!(pool.num_free(), free_before - n);
                        held.push(v);
                    } else {
                        prop_assert!(n > free_before);
                    }
                } else if n == 5 {
                    // Claim a free block back, as a prefix hit does.
                    if let Some(&b) = pool.free.order().get(n % pool.num_free().max(1)) {
                        pool.touch(b);
                        held.push(vec![b]);
                    }
                } else {
                    let v = held.swap_remove(n % held.len());
                    pool.free(&v);
                }
                let in_use: usize = held.iter().map(Vec::len).sum();
                prop_assert_eq!(in_use + pool.num_free(), 16);
                let mut all: Vec<u32> = held.iter().flatten().copied().collect();
                all.extend(pool.free.order());
                all.sort_unstable();
                all.dedup();
                prop_assert_eq!(all.len(), 16);
            }
        }
    }
}

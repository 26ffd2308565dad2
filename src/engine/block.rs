//! The KV block pool: which cache blocks are free, and how many sequences hold each one.
//!
//! Blocks are handed out from a FIFO free list (the least recently freed first, which is what a
//! prefix cache wants to evict last) with reference counts, so a later prefix cache can share a
//! block between sequences and free it only when its last holder lets go.

use std::collections::VecDeque;

/// A fixed pool of `num_blocks` KV blocks.
#[derive(Debug)]
pub struct BlockPool {
    free: VecDeque<u32>,
    ref_counts: Vec<u32>,
}

impl BlockPool {
    pub fn new(num_blocks: usize) -> Self {
        Self {
            free: (0..num_blocks as u32).collect(),
            ref_counts: vec![0; num_blocks],
        }
    }

    pub fn num_blocks(&self) -> usize {
        self.ref_counts.len()
    }

    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    /// Fraction of blocks in use.
    pub fn usage(&self) -> f64 {
        1.0 - self.num_free() as f64 / self.num_blocks().max(1) as f64
    }

    /// Appends `n` fresh blocks to `dst`, or takes none and returns false if fewer are free.
    pub fn allocate_into(&mut self, n: usize, dst: &mut Vec<u32>) -> bool {
        if n > self.free.len() {
            return false;
        }
        for _ in 0..n {
            let Some(b) = self.free.pop_front() else {
                return false;
            };
            debug_assert_eq!(self.ref_counts[b as usize], 0);
            self.ref_counts[b as usize] = 1;
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

    /// Drops one holder of each block; blocks with no holder left return to the free list.
    pub fn free(&mut self, blocks: &[u32]) {
        for &b in blocks {
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
        // FIFO: the block never handed out comes first, then the freed ones in order.
        assert!(pool.allocate_into(2, &mut b));
        assert_eq!(b, vec![3, 0]);
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

    proptest! {
        // Any interleaving of allocations and frees keeps every block either free or held,
        // never both, never lost.
        #[test]
        fn blocks_are_conserved(ops in proptest::collection::vec((0usize..6, any::<bool>()), 1..200)) {
            let mut pool = BlockPool::new(16);
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
                } else {
                    let v = held.swap_remove(n % held.len());
                    pool.free(&v);
                }
                let in_use: usize = held.iter().map(Vec::len).sum();
                prop_assert_eq!(in_use + pool.num_free(), 16);
                let mut all: Vec<u32> = held.iter().flatten().copied().collect();
                all.extend(pool.free.iter().copied());
                all.sort_unstable();
                all.dedup();
                prop_assert_eq!(all.len(), 16);
            }
        }
    }
}

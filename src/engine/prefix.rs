//! The prefix index: which cache blocks hold a full block of known tokens, found by the tokens
//! and everything before them, so a sequence that starts the same way reuses their K/V instead
//! of computing them again (vLLM V1's automatic prefix caching, on by default there too).
//!
//! A block's identity is a [`ContentId`] handed out once and never reused, and its key is its
//! parent's identity plus its own tokens. A key therefore names one exact prefix: when a block is
//! evicted its identity dies with it, so the keys of blocks that came after it can no longer be
//! reached from the start of any sequence. Lookups compare the stored tokens, not only a hash,
//! so a hash collision is a miss, never a wrong hit.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};

/// The identity of a cached block's content: its tokens and every token before them.
pub type ContentId = u64;

/// The parent of a sequence's first block.
pub const ROOT: ContentId = 0;

/// Cached content per block, and the index from (parent, tokens) to a block.
#[derive(Debug)]
pub struct PrefixIndex {
    block_size: usize,
    by_key: HashMap<(ContentId, u64), u32>,
    /// Per block: its content's identity (`ROOT` = holds nothing reusable), its key's parent and
    /// token hash (to drop the key on eviction) and its tokens (to verify a hit).
    content: Vec<ContentId>,
    parent: Vec<ContentId>,
    hash: Vec<u64>,
    tokens: Vec<u32>,
    next_id: ContentId,
}

/// Prefix-cache lookups of one run, in tokens (vLLM's hit rate is `hits / queries`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PrefixCacheStats {
    /// Tokens of the sequences looked up (each admission, re-admissions after preemption too).
    pub queries: usize,
    /// Of those, tokens whose K/V were found in the cache and not computed.
    pub hits: usize,
}

impl PrefixCacheStats {
    pub fn hit_rate(&self) -> f64 {
        self.hits as f64 / self.queries.max(1) as f64
    }
}

fn hash_tokens(tokens: &[u32]) -> u64 {
    let mut h = DefaultHasher::new();
    tokens.hash(&mut h);
    h.finish()
}

impl PrefixIndex {
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        Self {
            block_size,
            by_key: HashMap::new(),
            content: vec![ROOT; num_blocks],
            parent: vec![ROOT; num_blocks],
            hash: vec![0; num_blocks],
            tokens: vec![0; num_blocks * block_size],
            next_id: ROOT + 1,
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Number of blocks whose content can be found.
    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    fn block_tokens(&self, block: u32) -> &[u32] {
        &self.tokens[block as usize * self.block_size..][..self.block_size]
    }

    /// The block holding `tokens` right after the prefix `parent`, and its identity.
    pub fn lookup(&self, parent: ContentId, tokens: &[u32]) -> Option<(u32, ContentId)> {
        let &block = self.by_key.get(&(parent, hash_tokens(tokens)))?;
        (self.block_tokens(block) == tokens).then(|| (block, self.content[block as usize]))
    }

    /// Records that `block` holds `tokens` after the prefix `parent`, and returns the identity a
    /// sequence should chain its next block to: the block's own, or that of a block already
    /// holding the same content (this one then stays unindexed, an ordinary block).
    pub fn insert(&mut self, block: u32, parent: ContentId, tokens: &[u32]) -> ContentId {
        debug_assert_eq!(tokens.len(), self.block_size);
        let b = block as usize;
        if self.content[b] != ROOT {
            return self.content[b];
        }
        let hash = hash_tokens(tokens);
        if let Some(&other) = self.by_key.get(&(parent, hash)) {
            if self.block_tokens(other) == tokens {
                return self.content[other as usize];
            }
            // A hash collision with different tokens: this block gets an identity of its own
            // (its successors can chain to it) but cannot be found.
            return self.fresh_id();
        }
        let id = self.fresh_id();
        self.by_key.insert((parent, hash), block);
        self.content[b] = id;
        self.parent[b] = parent;
        self.hash[b] = hash;
        self.tokens[b * self.block_size..][..self.block_size].copy_from_slice(tokens);
        id
    }

    fn fresh_id(&mut self) -> ContentId {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// Forgets `block`'s content: it is about to be overwritten.
    pub fn evict(&mut self, block: u32) {
        let b = block as usize;
        if self.content[b] == ROOT {
            return;
        }
        let key = (self.parent[b], self.hash[b]);
        if self.by_key.get(&key) == Some(&block) {
            self.by_key.remove(&key);
        }
        self.content[b] = ROOT;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chains_find_exact_prefixes() {
        let mut ix = PrefixIndex::new(8, 2);
        let a = ix.insert(0, ROOT, &[1, 2]);
        let b = ix.insert(1, a, &[3, 4]);
        assert_eq!(ix.lookup(ROOT, &[1, 2]), Some((0, a)));
        assert_eq!(ix.lookup(a, &[3, 4]), Some((1, b)));
        // The same tokens after another prefix, or at the start, are not the same content.
        assert_eq!(ix.lookup(ROOT, &[3, 4]), None);
        assert_eq!(ix.lookup(b, &[3, 4]), None);
        assert_eq!(ix.len(), 2);
    }

    #[test]
    fn a_duplicate_block_chains_to_the_indexed_one() {
        let mut ix = PrefixIndex::new(8, 2);
        let a = ix.insert(0, ROOT, &[1, 2]);
        assert_eq!(ix.insert(5, ROOT, &[1, 2]), a);
        assert_eq!(ix.lookup(ROOT, &[1, 2]), Some((0, a)));
        // Evicting the unindexed duplicate leaves the indexed block alone.
        ix.evict(5);
        assert_eq!(ix.lookup(ROOT, &[1, 2]), Some((0, a)));
    }

    #[test]
    fn eviction_orphans_what_came_after() {
        let mut ix = PrefixIndex::new(8, 2);
        let a = ix.insert(0, ROOT, &[1, 2]);
        ix.insert(1, a, &[3, 4]);
        ix.evict(0);
        assert_eq!(ix.lookup(ROOT, &[1, 2]), None);
        // Re-caching the same tokens in another block gives a new identity, under which the old
        // successor cannot be found: it may hold K/V computed after a different first block.
        let a2 = ix.insert(2, ROOT, &[1, 2]);
        assert_ne!(a2, a);
        assert_eq!(ix.lookup(a2, &[3, 4]), None);
        ix.evict(1);
        assert_eq!(ix.len(), 1);
    }

    #[test]
    fn a_hash_match_with_other_tokens_is_a_miss() {
        let mut ix = PrefixIndex::new(8, 2);
        let a = ix.insert(0, ROOT, &[1, 2]);
        // Stand-in for a collision: the indexed block's tokens differ from the looked-up ones
        // although the key (parent, hash of [1, 2]) matches.
        ix.tokens[..2].copy_from_slice(&[9, 9]);
        assert_eq!(ix.lookup(ROOT, &[1, 2]), None);
        let other = ix.insert(3, ROOT, &[1, 2]);
        assert_ne!(other, a);
        assert_eq!(ix.lookup(other, &[5, 6]), None);
    }

    #[test]
    fn hit_rate_counts_tokens() {
        let s = PrefixCacheStats {
            queries: 200,
            hits: 50,
        };
        assert_eq!(s.hit_rate(), 0.25);
        assert_eq!(PrefixCacheStats::default().hit_rate(), 0.0);
    }
}

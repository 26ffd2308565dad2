//! Decode attention (few queries per sequence): the cache read in place, block by block, as
//! memory bandwidth is what bounds it; the blocks prefetched ahead of the loops.

use super::{Elem, Geometry, Scratch, exp_prefix, simd, sized};

/// How far ahead (in cache blocks) decode attention prefetches. Measured (2 cores, SmolLM2's
/// shape, 960 sequences x 512 tokens, 377 MB of f16 K/V): on the AMD EPYC none 54-62 ms, 1 to 8
/// blocks ahead alike at 44-51 ms (whole blocks); on the Xeon, one KV head's part of a block at
/// a time, 1 or 2 ahead 14-18 ms, 4 ahead 15-16, whole blocks 4 ahead 22-23, none 24-25.
const PREFETCH_BLOCKS: usize = 2;

/// A hint to load the cache lines of `s` into L2 (none off x86-64); L1 (`T0`) measured the
/// same.
#[inline]
fn prefetch<T>(s: &[T]) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_MM_HINT_T1, _mm_prefetch};
        let p = s.as_ptr().cast::<i8>();
        for off in (0..std::mem::size_of_val(s)).step_by(64) {
            // SAFETY: a prefetch never faults, and the address is inside `s`.
            unsafe { _mm_prefetch::<_MM_HINT_T1>(p.add(off)) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = s;
}

impl<T: Elem> Geometry<'_, T> {
    /// Asks for KV head `g`'s part of the block [`PREFETCH_BLOCKS`] ahead of position `at` in
    /// the order [`direct`] reads them (K of every block of `table`, then V of every block) to
    /// be loaded: the blocks of a paged cache are scattered, too short (a few KiB) for the
    /// hardware prefetcher to follow, and decode attention reads each of them once from memory.
    /// One KV head's part (2 KiB for SmolLM2) at a time, just before the kernel that reads
    /// the same part of the block in hand: a whole block's lines at once (6 KiB) stall on the
    /// core's few outstanding misses and leave it idle (measured on the Xeon: 22-23 against
    /// 14-18 ms, see [`PREFETCH_BLOCKS`]).
    ///
    /// [`direct`]: Self::direct
    #[inline]
    fn prefetch_ahead(&self, table: &[u32], at: usize, g: usize) {
        let (nb, at) = (table.len(), at + PREFETCH_BLOCKS);
        if at < nb {
            prefetch(self.block(table[at], g).0);
        } else if at < 2 * nb {
            prefetch(self.block(table[at - nb], g).1);
        }
    }

    /// Few queries (decode): per query, [`direct_part`] over its whole context, then each
    /// head's weighted sum divided by its sum of exponentials. `keys[i]` is the number of keys
    /// query `i` sees.
    ///
    /// [`direct_part`]: Self::direct_part
    pub(super) fn direct(
        &self,
        t0: usize,
        keys: &[usize],
        table: &[u32],
        out: &mut [f32],
        scr: &mut Scratch,
    ) {
        let (d, heads) = (self.d, self.heads);
        for (i, &n) in keys.iter().enumerate() {
            let acc = &mut out[i * heads * d..][..heads * d];
            let table = &table[..n.div_ceil(self.block_size)];
            let mut ml = std::mem::take(&mut scr.ml);
            ml.resize(heads, (0.0, 0.0));
            self.direct_part(t0 + i, n, table, acc, &mut ml, scr);
            for (a, &(_, sum)) in acc.chunks_exact_mut(d).zip(&ml) {
                let inv = 1.0 / sum;
                a.iter_mut().for_each(|x| *x *= inv);
            }
            scr.ml = ml;
        }
    }

    /// Query token `t`'s attention over the blocks of `table` (`n` keys of them, from the
    /// first): per head `h`, `ml[h]` = (its largest score, the sum of `exp(score - max)`) and
    /// `acc[h * d..]` = the V rows weighted by those exponentials, not yet divided by the sum
    /// (so that parts of one context merge: `split`). The scores of every head against each
    /// block's keys (the block's transposed K makes them vector multiply-adds along the block),
    /// then the weighted sum of V rows, all reading the cache in place, each block's K (then
    /// V) of one KV head at a time, a contiguous run.
    pub(super) fn direct_part(
        &self,
        t: usize,
        n: usize,
        table: &[u32],
        acc: &mut [f32],
        ml: &mut [(f32, f32)],
        scr: &mut Scratch,
    ) {
        let (d, heads, bs) = (self.d, self.heads, self.block_size);
        let group = heads / self.kv_heads;
        let q = &self.q[t * heads * d..][..heads * d];
        let padded = table.len() * bs;
        // Each block writes its scores, and `exp_prefix` zeroes the masked tail.
        let scores = sized(&mut scr.scores, heads * padded);
        for (b, &blk) in table.iter().enumerate() {
            for g in 0..self.kv_heads {
                self.prefetch_ahead(table, b, g);
                let (kt, _) = self.block(blk, g);
                let s = &mut scores[g * group * padded + b * bs..];
                let qg = &q[g * group * d..][..group * d];
                simd::group_scores(qg, d, kt, self.scale, (s, padded, bs));
            }
        }
        for (h, ml) in ml.iter_mut().enumerate() {
            *ml = exp_prefix(&mut scores[h * padded..][..padded], n);
        }
        acc.fill(0.0);
        for (b, &blk) in table.iter().enumerate() {
            let m = bs.min(n - b * bs);
            for g in 0..self.kv_heads {
                self.prefetch_ahead(table, table.len() + b, g);
                let v = &self.block(blk, g).1[..m * d];
                let p = &scores[g * group * padded + b * bs..];
                let a = &mut acc[g * group * d..][..group * d];
                simd::group_weighted_rows((p, padded, m), v, a, d);
            }
        }
    }
}

//! The work items of one `attend` call: tiles of each sequence's queries, each owning its rows
//! of the output, and, where a step has too few tiles for the threads, decode queries cut into
//! parts of their context (`split`), each owning its buffers, merged after.

use std::ops::Range;

use crate::attention::BatchLayout;
use crate::attention::split;

/// Queries per work item: a sequence's queries are cut into tiles so that one long prompt still
/// spreads over every core.
const TILE: usize = 64;

/// One work item of [`super::attend`]: a tile of one sequence's queries, or one part of a decode
/// query's context (`split`).
pub(super) enum Work<'a> {
    Tile {
        s: usize,
        t0: usize,
        len: usize,
        out: &'a mut [f32],
    },
    Part {
        s: usize,
        t: usize,
        blocks: Range<usize>,
        keys: usize,
        ml: &'a mut [(f32, f32)],
        acc: &'a mut [f32],
    },
}

/// The tiles of a step, in token order, and into how many parts each is cut (1: not cut).
pub(super) struct Plan<'l> {
    lay: &'l BatchLayout,
    /// `(sequence, first token, tokens)`.
    tiles: Vec<(usize, usize, usize)>,
    parts: Vec<usize>,
}

impl<'l> Plan<'l> {
    pub fn new(lay: &'l BatchLayout, block_size: usize) -> Self {
        let mut tiles = Vec::new();
        for s in 0..lay.num_seqs() {
            let (a, b) = (lay.query_start[s] as usize, lay.query_start[s + 1] as usize);
            let mut t = a;
            while t < b {
                let len = TILE.min(b - t);
                tiles.push((s, t, len));
                t += len;
            }
        }
        let threads = rayon::current_num_threads();
        let parts = tiles
            .iter()
            .map(|&(_, t, len)| {
                let n = lay.position(t) + 1;
                match len {
                    // No more parts than blocks (which may be longer than a part).
                    1 => split::parts(n, tiles.len(), threads).min(n.div_ceil(block_size)),
                    _ => 1,
                }
            })
            .collect();
        Self { lay, tiles, parts }
    }

    /// The buffers the parts write: per part and head its `(max, sum)` and weighted V row.
    pub fn part_buffers(&self, heads: usize, d: usize) -> (Vec<(f32, f32)>, Vec<f32>) {
        let parts: usize = self.parts.iter().filter(|&&p| p > 1).sum();
        (
            vec![(0.0, 0.0); parts * heads],
            vec![0.0; parts * heads * d],
        )
    }

    /// The work items over `out` (`[tokens, heads, d]`) and the part buffers, and the output
    /// rows of each cut tile with its number of parts, in the buffers' order (for the merge).
    #[allow(clippy::type_complexity)]
    pub fn items<'a, 'o: 'a, 'p: 'a>(
        &self,
        (heads, d, block_size): (usize, usize, usize),
        out: &'o mut [f32],
        ml: &'p mut [(f32, f32)],
        acc: &'p mut [f32],
    ) -> (Vec<Work<'a>>, Vec<(&'o mut [f32], usize)>) {
        let (mut rest, mut ml_rest, mut acc_rest) = (out, ml, acc);
        let (mut work, mut merges) = (Vec::new(), Vec::new());
        for (&(s, t0, len), &p) in self.tiles.iter().zip(&self.parts) {
            let (chunk, tail) = std::mem::take(&mut rest).split_at_mut(len * heads * d);
            rest = tail;
            if p == 1 {
                work.push(Work::Tile {
                    s,
                    t0,
                    len,
                    out: chunk,
                });
                continue;
            }
            let (m, tail) = std::mem::take(&mut ml_rest).split_at_mut(p * heads);
            ml_rest = tail;
            let (a, tail) = std::mem::take(&mut acc_rest).split_at_mut(p * heads * d);
            acc_rest = tail;
            merges.push((chunk, p));
            let n = self.lay.position(t0) + 1;
            let ranges = split::ranges(n.div_ceil(block_size), p);
            for ((blocks, ml), acc) in ranges.zip(m.chunks_mut(heads)).zip(a.chunks_mut(heads * d))
            {
                let keys = n.min(blocks.end * block_size) - blocks.start * block_size;
                work.push(Work::Part {
                    s,
                    t: t0,
                    blocks,
                    keys,
                    ml,
                    acc,
                });
            }
        }
        (work, merges)
    }
}

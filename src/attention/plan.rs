//! How one step's attention is cut into CUDA work items (see `kernels/attention.cu`). Plain host
//! code, so the choices are tested on any machine.
//!
//! - Prefill chunks are cut into tiles of consecutive query tokens of one sequence; each tile runs
//!   once per KV head with all the query heads that share it (`rows` = heads per KV head x tokens,
//!   at most [`TILE_ROWS`]).
//! - Decode tokens (sequences with one query this step) are tiles of one token, unless there are
//!   too few of them to fill the GPU while their contexts are long: then they go to the split-K
//!   kernel, each context cut into partitions of [`SPLIT_PART`] keys run in parallel and merged.

use super::BatchLayout;

/// Most rows (query heads x tokens) of one tile; bounds the kernel's shared memory.
pub const TILE_ROWS: usize = 64;

/// Keys per partition of the split-K decode kernel.
pub const SPLIT_PART: usize = 512;

/// The work of one attention launch set.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LaunchPlan {
    /// `[sequence, first token, tokens]` per tile.
    pub tiles: Vec<[u32; 3]>,
    /// Decode tokens (batch indices) for the split-K kernel.
    pub split_tokens: Vec<u32>,
    /// Partitions per split token (0 when there are none).
    pub parts: usize,
    /// Most rows of any tile.
    pub max_rows: usize,
}

impl LaunchPlan {
    /// The tiles as the kernel reads them: `[sequence, first token, tokens]` after each other.
    pub fn flat_tiles(&self) -> Vec<u32> {
        self.tiles.iter().flatten().copied().collect()
    }
}

/// Which kernel runs the decode tokens of a step.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DecodeKernel {
    /// Chosen by shape (see the module comment).
    #[default]
    Auto,
    /// One tile per token ("v1").
    Tiles,
    /// Split-K over partitions of the context, then a merge ("v2").
    Split,
}

/// Plans a step: `group` query heads per KV head, `kv_heads` KV heads, on a GPU with
/// `sm_count` multiprocessors.
pub fn plan(layout: &BatchLayout, group: usize, kv_heads: usize, sm_count: usize) -> LaunchPlan {
    plan_with(layout, group, kv_heads, sm_count, DecodeKernel::Auto)
}

/// [`plan`], with the decode kernel forced (benchmarks and checks compare the two).
pub fn plan_with(
    layout: &BatchLayout,
    group: usize,
    kv_heads: usize,
    sm_count: usize,
    decode_kernel: DecodeKernel,
) -> LaunchPlan {
    let group = group.max(1);
    let tile_q = (TILE_ROWS / group).max(1);
    let mut tiles = Vec::new();
    let mut decode: Vec<(u32, u32, usize)> = Vec::new();
    for s in 0..layout.num_seqs() {
        let (a, b) = (layout.query_start[s], layout.query_start[s + 1]);
        if b - a == 1 {
            decode.push((s as u32, a, layout.context_lens[s] as usize));
            continue;
        }
        let mut t = a;
        while t < b {
            let len = (tile_q as u32).min(b - t);
            tiles.push([s as u32, t, len]);
            t += len;
        }
    }
    let longest = decode.iter().map(|d| d.2).max().unwrap_or(0);
    let too_few = decode.len() * kv_heads < 2 * sm_count;
    let mut plan = LaunchPlan::default();
    let split = match decode_kernel {
        DecodeKernel::Auto => too_few && longest > 2 * SPLIT_PART,
        DecodeKernel::Tiles => false,
        DecodeKernel::Split => true,
    };
    if !decode.is_empty() && split {
        plan.split_tokens = decode.iter().map(|d| d.1).collect();
        plan.parts = longest.div_ceil(SPLIT_PART);
    } else {
        tiles.extend(decode.iter().map(|&(s, t, _)| [s, t, 1]));
    }
    plan.max_rows = tiles
        .iter()
        .map(|t| t[2] as usize * group)
        .max()
        .unwrap_or(0);
    plan.tiles = tiles;
    plan
}

/// Shared memory of the tile and split kernels, in bytes, for `rows` rows (see the layout
/// comment in `kernels/attention.cu`).
pub fn shared_bytes(rows: usize, head_dim: usize, block_size: usize) -> usize {
    4 * (2 * rows * head_dim + 2 * head_dim * block_size + 2 * rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A layout with the given (queries, context) per sequence.
    fn layout(seqs: &[(u32, u32)]) -> BatchLayout {
        let mut lay = BatchLayout {
            query_start: vec![0],
            max_blocks: 1,
            ..Default::default()
        };
        for (s, &(q, ctx)) in seqs.iter().enumerate() {
            let start = *lay.query_start.last().unwrap();
            lay.query_start.push(start + q);
            lay.context_lens.push(ctx);
            lay.token_seq
                .extend(std::iter::repeat_n(s as u32, q as usize));
            lay.slot_mapping.extend(std::iter::repeat_n(0, q as usize));
            lay.block_tables.push(0);
        }
        lay
    }

    #[test]
    fn prefill_is_tiled_and_every_token_covered_once() {
        // Four query heads per KV head: tiles of 16 tokens (64 rows).
        let lay = layout(&[(40, 40), (1, 300), (17, 50), (1, 7)]);
        let p = plan(&lay, 4, 8, 132);
        assert_eq!(p.parts, 0);
        let mut covered = vec![0; lay.num_tokens()];
        for &[s, t0, len] in &p.tiles {
            assert!(len as usize <= TILE_ROWS / 4);
            for t in t0..t0 + len {
                assert_eq!(lay.token_seq[t as usize], s, "a tile stays in one sequence");
                covered[t as usize] += 1;
            }
        }
        assert!(covered.iter().all(|&c| c == 1), "{covered:?}");
        assert_eq!(p.max_rows, 64);
        assert_eq!(p.tiles[0], [0, 0, 16]);
        assert_eq!(p.tiles[2], [0, 32, 8]);
    }

    #[test]
    fn few_long_decodes_are_split() {
        // One sequence decoding at 5000 tokens of context: 8 KV heads cannot fill 132 SMs.
        let lay = layout(&[(1, 5000)]);
        let p = plan(&lay, 4, 8, 132);
        assert_eq!(p.split_tokens, vec![0]);
        assert_eq!(p.parts, 10);
        assert!(p.tiles.is_empty());
        assert_eq!(p.max_rows, 0);
    }

    #[test]
    fn many_or_short_decodes_use_tiles() {
        let many: Vec<(u32, u32)> = (0..64).map(|_| (1, 5000)).collect();
        let p = plan(&layout(&many), 4, 8, 132);
        assert!(p.split_tokens.is_empty() && p.tiles.len() == 64);
        assert_eq!(p.max_rows, 4);
        let forced = plan_with(&layout(&many), 4, 8, 132, DecodeKernel::Split);
        assert_eq!(forced.split_tokens.len(), many.len());
        assert_eq!(forced.parts, 10);
        let tiles = plan_with(&layout(&[(1, 5000)]), 4, 8, 132, DecodeKernel::Tiles);
        assert!(tiles.split_tokens.is_empty() && tiles.tiles == vec![[0, 0, 1]]);
        let short = plan(&layout(&[(1, 900)]), 4, 8, 132);
        assert!(short.split_tokens.is_empty() && short.tiles == vec![[0, 0, 1]]);
    }

    #[test]
    fn shared_memory_fits_hopper() {
        // Llama-3-8B (head_dim 128), 64 rows, blocks of 16 and 32 tokens: under 227 KiB.
        assert_eq!(shared_bytes(64, 128, 16), 4 * (16384 + 4096 + 128));
        assert!(shared_bytes(64, 128, 32) <= 227 * 1024);
        assert!(shared_bytes(64, 256, 32) <= 227 * 1024);
    }
}

//! The launches of `kernels/attention.cu` for one step, as plain descriptions ([`Launch`]):
//! the CUDA backend (`cuda`) runs them on the GPU, the kernel emulator (`simt`) in tests.

use anyhow::{Result, bail};
use candle_core::DType;

use super::ops::CacheKind;
use super::plan::{self, LaunchPlan, SPLIT_PART};
use crate::launch::{Arg, Launch};

/// Threads per block of the tile and split-K kernels.
pub const THREADS: u32 = 256;

/// The buffers the attention kernels take.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Buf {
    /// `write_kv`'s input, `[tokens, kv_heads, head_dim]`.
    Src,
    /// The cache `write_kv` writes (K or V).
    Cache,
    /// Slot of each token.
    Slots,
    /// Queries, `[tokens, heads, head_dim]`.
    Q,
    KCache,
    VCache,
    /// Output, like the queries.
    Out,
    /// `[sequence, first token, tokens]` per tile.
    Tiles,
    QueryStart,
    ContextLens,
    BlockTables,
    /// The split-K kernel's tokens, and every token's sequence.
    SplitTokens,
    TokenSeq,
    /// Split-K partial results (f32): `[rows, head_dim]`, and max and sum per row.
    PartAcc,
    PartM,
    PartL,
}

/// What the kernels need to know of the cache and the heads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub block_size: usize,
    /// Entries of each block-table row.
    pub max_blocks: usize,
}

impl Geometry {
    /// Checks what the kernels assume (see `kernels/attention.cu`).
    pub fn check(&self) -> Result<()> {
        let (d, bs) = (self.head_dim, self.block_size);
        if d == 0 || !d.is_multiple_of(32) || bs == 0 || bs > 32 || self.kv_heads == 0 {
            bail!(
                "the CUDA attention kernels need head_dim a multiple of 32 (got {d}) and a block size of 1 to 32 (got {bs})"
            );
        }
        if !self.heads.is_multiple_of(self.kv_heads) {
            bail!(
                "{} query heads are not a multiple of {} KV heads",
                self.heads,
                self.kv_heads
            );
        }
        if d > 1024 {
            bail!("head_dim {d}: the split-K merge takes one thread per dimension (at most 1024)");
        }
        Ok(())
    }

    fn group(&self) -> usize {
        self.heads / self.kv_heads
    }
}

/// The element types of a step's launches: the queries' (also the outputs' and `write_kv`'s
/// input's) and the cache's, which is the same or fp8.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dtypes {
    pub io: DType,
    pub cache: DType,
}

impl Dtypes {
    /// Suffix of the kernels that read or write the cache: `bf16`, or `bf16_fp8` for bf16
    /// queries over an fp8 cache.
    pub fn cache_suffix(&self) -> Result<String> {
        let io = crate::launch::suffix(self.io)?;
        match self.cache {
            c if c == self.io => Ok(io.to_string()),
            DType::F8E4M3 => Ok(format!("{io}_fp8")),
            c => bail!(
                "no CUDA kernel for {:?} queries over a {c:?} cache",
                self.io
            ),
        }
    }
}

/// Writes `tokens` rows of K or V into the cache at their slots.
pub fn write_kv(kind: CacheKind, dt: Dtypes, tokens: usize, g: &Geometry) -> Result<Launch<Buf>> {
    let (d, bs) = (g.head_dim, g.block_size);
    let values = i32::from(kind == CacheKind::Values);
    Ok(Launch::elementwise(
        format!("write_kv_{}", dt.cache_suffix()?),
        tokens * g.kv_heads * d,
        vec![
            Arg::Buf(Buf::Src),
            Arg::Buf(Buf::Cache),
            Arg::Buf(Buf::Slots),
            Arg::int(tokens),
            Arg::int(g.kv_heads),
            Arg::int(d),
            Arg::int(bs),
            Arg::I32(values),
        ],
    ))
}

/// Rows of the split-K partial buffers: one per split token, head and partition
/// (`PartAcc` holds `head_dim` floats per row).
pub fn partial_rows(p: &LaunchPlan, heads: usize) -> usize {
    p.split_tokens.len() * heads * p.parts
}

/// The attention launches of a step planned as `p`, in order: the tiles, then split-K and its
/// merge. Every output row is written by exactly one of them (the plan covers each token once).
pub fn attend(p: &LaunchPlan, dt: Dtypes, g: &Geometry, scale: f32) -> Result<Vec<Launch<Buf>>> {
    g.check()?;
    let (dtype, io) = (dt.cache_suffix()?, crate::launch::suffix(dt.io)?);
    let (d, bs) = (g.head_dim, g.block_size);
    let common = |last: usize| {
        vec![
            Arg::int(g.max_blocks.max(1)),
            Arg::int(g.heads),
            Arg::int(g.kv_heads),
            Arg::int(d),
            Arg::int(bs),
            Arg::F32(scale),
            Arg::int(last),
        ]
    };
    let mut out = Vec::new();
    if !p.tiles.is_empty() {
        let mut args = vec![
            Arg::Buf(Buf::Q),
            Arg::Buf(Buf::KCache),
            Arg::Buf(Buf::VCache),
            Arg::Buf(Buf::Out),
            Arg::Buf(Buf::Tiles),
            Arg::Buf(Buf::QueryStart),
            Arg::Buf(Buf::ContextLens),
            Arg::Buf(Buf::BlockTables),
        ];
        args.extend(common(p.max_rows));
        out.push(
            Launch::new(
                format!("attention_tiles_{dtype}"),
                [p.tiles.len() as u32, g.kv_heads as u32, 1],
                THREADS,
                args,
            )
            .with_shared_bytes(plan::shared_bytes(p.max_rows, d, bs)),
        );
    }
    if !p.split_tokens.is_empty() {
        let n = p.split_tokens.len() as u32;
        let mut args = vec![
            Arg::Buf(Buf::Q),
            Arg::Buf(Buf::KCache),
            Arg::Buf(Buf::VCache),
            Arg::Buf(Buf::PartAcc),
            Arg::Buf(Buf::PartM),
            Arg::Buf(Buf::PartL),
            Arg::Buf(Buf::SplitTokens),
            Arg::Buf(Buf::TokenSeq),
            Arg::Buf(Buf::QueryStart),
            Arg::Buf(Buf::ContextLens),
            Arg::Buf(Buf::BlockTables),
        ];
        args.extend(common(SPLIT_PART));
        out.push(
            Launch::new(
                format!("attention_split_{dtype}"),
                [n, g.kv_heads as u32, p.parts as u32],
                THREADS,
                args,
            )
            .with_shared_bytes(plan::shared_bytes(g.group(), d, bs)),
        );
        out.push(Launch::new(
            format!("attention_reduce_{io}"),
            [n, g.heads as u32, 1],
            d as u32,
            vec![
                Arg::Buf(Buf::PartAcc),
                Arg::Buf(Buf::PartM),
                Arg::Buf(Buf::PartL),
                Arg::Buf(Buf::Out),
                Arg::Buf(Buf::SplitTokens),
                Arg::int(g.heads),
                Arg::int(d),
                Arg::int(p.parts),
            ],
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geometry() -> Geometry {
        Geometry {
            heads: 32,
            kv_heads: 8,
            head_dim: 128,
            block_size: 16,
            max_blocks: 200,
        }
    }

    #[test]
    fn a_mixed_step_launches_tiles_then_split_k_and_its_merge() {
        let p = LaunchPlan {
            tiles: vec![[0, 0, 16], [0, 16, 4]],
            split_tokens: vec![20, 21],
            parts: 3,
            max_rows: 64,
        };
        let bf16 = Dtypes {
            io: DType::BF16,
            cache: DType::BF16,
        };
        let l = attend(&p, bf16, &geometry(), 0.1).unwrap();
        let names: Vec<&str> = l.iter().map(|l| l.kernel.as_str()).collect();
        assert_eq!(
            names,
            [
                "attention_tiles_bf16",
                "attention_split_bf16",
                "attention_reduce_bf16"
            ]
        );
        assert_eq!(l[0].grid, [2, 8, 1]);
        assert_eq!(l[0].shared_bytes as usize, plan::shared_bytes(64, 128, 16));
        assert_eq!(l[1].grid, [2, 8, 3]);
        assert_eq!(l[1].shared_bytes as usize, plan::shared_bytes(4, 128, 16));
        assert_eq!((l[2].grid, l[2].block), ([2, 32, 1], [128, 1, 1]));
        assert_eq!(partial_rows(&p, 32), 2 * 32 * 3);
        // Over an fp8 cache: the cache's kernels change, the merge (which reads none) does not.
        let fp8 = Dtypes {
            cache: DType::F8E4M3,
            ..bf16
        };
        let l = attend(&p, fp8, &geometry(), 0.1).unwrap();
        let names: Vec<&str> = l.iter().map(|l| l.kernel.as_str()).collect();
        assert_eq!(
            names,
            [
                "attention_tiles_bf16_fp8",
                "attention_split_bf16_fp8",
                "attention_reduce_bf16"
            ]
        );
        let w = write_kv(CacheKind::Keys, fp8, 3, &geometry()).unwrap();
        assert_eq!(w.kernel, "write_kv_bf16_fp8");
        let mixed = Dtypes {
            io: DType::BF16,
            cache: DType::F16,
        };
        assert!(attend(&p, mixed, &geometry(), 0.1).is_err());
    }

    #[test]
    fn unsupported_geometries_are_refused_before_any_launch() {
        let p = LaunchPlan {
            tiles: vec![[0, 0, 1]],
            ..Default::default()
        };
        for g in [
            Geometry {
                head_dim: 80,
                ..geometry()
            },
            Geometry {
                block_size: 64,
                ..geometry()
            },
            Geometry {
                heads: 30,
                ..geometry()
            },
        ] {
            let f32s = Dtypes {
                io: DType::F32,
                cache: DType::F32,
            };
            assert!(attend(&p, f32s, &g, 1.0).is_err(), "{g:?}");
        }
    }
}

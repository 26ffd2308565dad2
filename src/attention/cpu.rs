//! CPU paged attention kernels, parallel over query tiles (rayon), and over parts of long
//! decode contexts where a step has few of them (`split`; the decode path is in `decode`).
//!
//! `write_kv` (in `write`) scatters each token's K and V into its slot. `attend` computes, for
//! every query token and head, softmax(q·K^T * scale) V over the token's sequence up to its own
//! position.
//! Queries and outputs are f32; the cache may hold f32, f16 or bf16 (converted as it is read).
//! Prefill tiles run as two products (`prefill`: in bf16 on the AMX unit with bf16 weights, in
//! f32 on the AVX-512 packed kernel or the `gemm` crate otherwise) over operands gathered once
//! per sequence (`gather`); the softmax and the sums stay f32.
//! The cache layout (see `ops::cache_shape`) keeps each block's keys transposed, so the scores
//! of a query against a block are vector multiply-adds along the block.

use candle_core::{CpuStorage, Layout, Shape};
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use rayon::prelude::*;

use super::BatchLayout;
use super::fp8::F8E4M3;
use super::{simd, split};
use crate::util::contiguous;

mod decode;
mod gather;
mod prefill;
mod work;
mod write;

use prefill::Gathered;
use work::{Plan, Work};

pub use write::{copy_f32, to_bf16, to_f16, to_fp8, write_kv};

/// Element types a KV cache can hold; the math is always f32.
pub trait Elem: candle_core::WithDType + simd::Lanes + Copy + Send + Sync {
    /// Converts a run of elements into `dst` (vectorised for f16/bf16).
    fn to_f32_run(src: &[Self], dst: &mut [f32]);
}

impl Elem for f32 {
    fn to_f32_run(src: &[Self], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
}

impl Elem for f16 {
    fn to_f32_run(src: &[Self], dst: &mut [f32]) {
        src.convert_to_f32_slice(dst);
    }
}

impl Elem for bf16 {
    fn to_f32_run(src: &[Self], dst: &mut [f32]) {
        src.convert_to_f32_slice(dst);
    }
}

impl Elem for F8E4M3 {
    fn to_f32_run(src: &[Self], dst: &mut [f32]) {
        simd::widen(src, dst);
    }
}

/// From this many queries on, a tile runs as GEMMs over its sequence's K/V gathered into
/// contiguous rows (compute-bound: prefill); fewer queries (decode) read K/V in place, block by
/// block, as memory bandwidth is what bounds them.
const GEMM_MIN_QUERIES: usize = 8;

/// `row[..n]` replaced by `exp(x - max)` and the entries from `n` on by 0 (causally masked);
/// returns `(max, sum of the exponentials)`. On 16 lanes where the CPU has AVX-512
/// (`avx512::exp_prefix`), elsewhere as separate lane-parallel passes (max, exp, sum) so each one
/// vectorises; the exponentials are the same values either way.
fn exp_prefix(row: &mut [f32], n: usize) -> (f32, f32) {
    assert!(n <= row.len(), "exp_prefix: {n} of {} entries", row.len());
    #[cfg(target_arch = "x86_64")]
    if n > 0 && super::avx512::available() {
        // SAFETY: AVX-512 F and FMA are available (checked), and `0 < n <= row.len()`.
        return unsafe { super::avx512::exp_prefix(row, n) };
    }
    exp_prefix_lanes(row, n)
}

/// [`exp_prefix`] in portable code, eight lanes at a time.
fn exp_prefix_lanes(row: &mut [f32], n: usize) -> (f32, f32) {
    let (head, tail) = row.split_at_mut(n);
    let mut lanes = [f32::NEG_INFINITY; 8];
    let chunks = head.chunks_exact(8);
    let mut max = chunks
        .remainder()
        .iter()
        .copied()
        .fold(f32::NEG_INFINITY, f32::max);
    for c in chunks {
        for l in 0..8 {
            // A compare and select (NaN never wins, as with `f32::max`): `f32::max` also
            // orders a NaN lane, an extra compare and blend per vector.
            if c[l] > lanes[l] {
                lanes[l] = c[l];
            }
        }
    }
    max = lanes.iter().copied().fold(max, f32::max);
    for x in head.iter_mut() {
        *x = crate::fastmath::exp(*x - max);
    }
    let mut sums = [0f32; 8];
    let chunks = head.chunks_exact(8);
    let mut sum: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for l in 0..8 {
            sums[l] += c[l];
        }
    }
    sum += sums.iter().sum::<f32>();
    tail.fill(0.0);
    (max, sum)
}

/// Reusable per-thread buffers.
#[derive(Default)]
struct Scratch {
    scores: Vec<f32>,
    q: Vec<f32>,
    acc: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    /// The rows of a prefill tile's AMX products in the unit's form.
    pairs: Vec<u32>,
    /// Each score row's sum of exponentials (`exp_rows`).
    sums: Vec<f32>,
    /// `direct`'s per-head (max score, sum of exponentials).
    ml: Vec<(f32, f32)>,
}

/// `v` as `n` zeros.
fn resized(v: &mut Vec<f32>, n: usize) -> &mut [f32] {
    v.clear();
    v.resize(n, 0.0);
    v
}

/// `v` with `n` elements of whatever it held: for buffers every element of which is written
/// before it is read.
fn sized(v: &mut Vec<f32>, n: usize) -> &mut [f32] {
    v.resize(n, 0.0);
    &mut v[..n]
}

/// The geometry shared by every tile of one call.
struct Geometry<'a, T> {
    q: &'a [f32],
    kc: &'a [T],
    vc: &'a [T],
    block_size: usize,
    kv_heads: usize,
    heads: usize,
    d: usize,
    scale: f32,
    /// Prefill tiles run on AMX (asked for, and AMX is what this process's bf16 products
    /// run on).
    amx: bool,
}

impl<T: Elem> Geometry<'_, T> {
    /// K (`[kv_heads, d, block_size]`) and V (`[kv_heads, block_size, d]`) of block `blk` for
    /// every KV head: one contiguous run each.
    fn whole_block(&self, blk: u32) -> (&[T], &[T]) {
        let len = self.kv_heads * self.d * self.block_size;
        let base = blk as usize * len;
        (&self.kc[base..base + len], &self.vc[base..base + len])
    }

    /// The K (`[d, block_size]`) and V (`[block_size, d]`) of block `blk` for KV head `g`.
    fn block(&self, blk: u32, g: usize) -> (&[T], &[T]) {
        let len = self.d * self.block_size;
        let (k, v) = self.whole_block(blk);
        (&k[g * len..][..len], &v[g * len..][..len])
    }
}

/// Attention of `q` (`[tokens, heads, head_dim]`, f32) over caches of element type `T`;
/// `bf16_prefill` lets prefill tiles run on AMX where the bf16 products do.
pub fn attend<T: Elem>(
    q: &[f32],
    ql: &Layout,
    (kst, kl): (&CpuStorage, &Layout),
    (vst, vl): (&CpuStorage, &Layout),
    lay: &BatchLayout,
    (heads, scale, bf16_prefill): (usize, f32, bool),
) -> candle_core::Result<(CpuStorage, Shape)> {
    let q = contiguous(q, ql, "queries")?;
    let kc = contiguous(kst.as_slice::<T>()?, kl, "K cache")?;
    let vc = contiguous(vst.as_slice::<T>()?, vl, "V cache")?;
    let &[_, kv_heads, d, block_size] = kl.dims() else {
        candle_core::bail!("attend: K cache must be 4-d, got {:?}", kl.dims());
    };
    if vl.dims() != [kl.dims()[0], kv_heads, block_size, d] {
        candle_core::bail!(
            "attend: V cache {:?} does not match K cache {:?}",
            vl.dims(),
            kl.dims()
        );
    }
    let tokens = lay.num_tokens();
    if q.len() != tokens * heads * d || !heads.is_multiple_of(kv_heads) {
        candle_core::bail!(
            "attend: queries {:?} do not match {tokens} tokens x {heads} heads x {d}",
            ql.dims()
        );
    }
    let geo = Geometry {
        q,
        kc,
        vc,
        block_size,
        kv_heads,
        heads,
        d,
        scale,
        amx: bf16_prefill
            && d.is_multiple_of(32)
            && crate::gemm::bf16::Bf16Kernel::chosen() == crate::gemm::bf16::Bf16Kernel::Amx,
    };
    let plan = Plan::new(lay, block_size);
    let (mut ml, mut acc) = plan.part_buffers(heads, d);
    let mut out = vec![0f32; tokens * heads * d];
    let (work, merges) = plan.items((heads, d, block_size), &mut out, &mut ml, &mut acc);
    // The sequences with prefill tiles: their operands, gathered once where the tiles' kernels
    // read them so.
    let operands = Gathered::for_tiles(&geo, lay, &work);
    work.into_par_iter()
        .for_each_init(Scratch::default, |scr, w| match w {
            Work::Tile { s, t0, len, out } => {
                let keys: Vec<usize> = (t0..t0 + len).map(|t| lay.position(t) + 1).collect();
                let n = keys[len - 1];
                let table = &lay.block_tables[s * lay.max_blocks..][..n.div_ceil(block_size)];
                if len >= GEMM_MIN_QUERIES {
                    geo.prefill_tile((s, t0, &keys), table, operands.as_ref(), out, scr);
                } else {
                    geo.direct(t0, &keys, table, out, scr);
                }
            }
            Work::Part {
                s,
                t,
                blocks,
                keys,
                ml,
                acc,
            } => {
                let table = &lay.block_tables[s * lay.max_blocks..][blocks];
                geo.direct_part(t, keys, table, acc, ml, scr);
            }
        });
    let (mut ml, mut acc) = (ml.as_slice(), acc.as_slice());
    for (out, p) in merges {
        let (m, a) = (ml.split_at(p * heads), acc.split_at(p * heads * d));
        split::merge(m.0, a.0, (heads, d), out);
        (ml, acc) = (m.1, a.1);
    }
    Ok((CpuStorage::F32(out), ql.shape().clone()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::Rng64;

    /// Whichever `exp_prefix` this CPU runs gives the portable loop's exponentials bit for bit,
    /// its maximum, its sum up to the order of the additions, and zeros past `n`, for every
    /// length of whole and partial vectors.
    #[test]
    fn exp_prefix_matches_the_portable_loop() {
        let mut rng = Rng64::new(3);
        for n in 1..=80 {
            for extra in [0, 1, 17] {
                let row = rng.uniform_f32(n + extra, 20.0);
                let (mut got, mut want) = (row.clone(), row);
                let (gm, gs) = exp_prefix(&mut got, n);
                let (wm, ws) = exp_prefix_lanes(&mut want, n);
                assert_eq!(gm, wm, "max, n = {n}");
                assert!((gs - ws).abs() <= 1e-6 * ws, "sum, n = {n}: {gs} vs {ws}");
                assert_eq!(
                    got.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                    want.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                    "n = {n}, {extra} masked"
                );
            }
        }
    }
}

//! CPU paged attention kernels, parallel over query tiles (rayon), and over parts of long
//! decode contexts where a step has few of them (`split`; the decode path is in `decode`).
//!
//! `write_kv` (in `write`) scatters each token's K and V into its slot. `attend` computes, for
//! every query token and head, softmax(q·K^T * scale) V over the token's sequence up to its own
//! position.
//! Queries and outputs are f32; the cache may hold f32, f16 or bf16 (converted as it is read).
//! With bf16 weights on an AMX CPU, prefill tiles run their two products in bf16 on the matrix
//! unit (`Geometry::tiled_amx`); the softmax and the sums stay f32.
//! The cache layout (see `ops::cache_shape`) keeps each block's keys transposed, so the scores
//! of a query against a block are vector multiply-adds along the block.

use candle_core::{CpuStorage, Layout, Shape};
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use rayon::prelude::*;

use super::BatchLayout;
use super::fp8::F8E4M3;
use super::{simd, split};
use crate::gemm::bf16::amx_rows_by_weights;
use crate::util::contiguous;

mod decode;
mod gather;
mod work;
mod write;

use gather::{Operands, SeqOperands};
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
/// returns `(max, sum of the exponentials)`. Written as separate lane-parallel passes (max,
/// exp, sum) so each one vectorises.
fn exp_prefix(row: &mut [f32], n: usize) -> (f32, f32) {
    assert!(n <= row.len(), "exp_prefix: {n} of {} entries", row.len());
    #[cfg(target_arch = "x86_64")]
    if n > 0 && crate::device::cpu_has_avx512_bw() {
        // SAFETY: AVX-512 F is available (checked), and `0 < n <= row.len()`.
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
    /// `tiled_amx`'s rows in the AMX unit's form.
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
    /// Prefill tiles run `tiled_amx` (asked for, and AMX is what this process's bf16 products
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

    /// Many queries (prefill): per KV head, gather the sequence's K (as `K^T`, `[d, n]`) and V
    /// (`[n, d]`) contiguously, then per query head two GEMMs, `S = Q K^T` and
    /// `O = softmax(S) V`, with the causal mask applied to each row of `S`.
    fn tiled(&self, t0: usize, keys: &[usize], table: &[u32], out: &mut [f32], scr: &mut Scratch) {
        let (d, heads, bs) = (self.d, self.heads, self.block_size);
        let group = heads / self.kv_heads;
        let m = keys.len();
        let n = keys[m - 1];
        for g in 0..self.kv_heads {
            let kt = resized(&mut scr.k, d * n);
            let vbuf = resized(&mut scr.v, n * d);
            for (b, &blk) in table.iter().enumerate() {
                let (kb, vb) = self.block(blk, g);
                let cnt = bs.min(n - b * bs);
                for dd in 0..d {
                    T::to_f32_run(&kb[dd * bs..][..cnt], &mut kt[dd * n + b * bs..][..cnt]);
                }
                T::to_f32_run(&vb[..cnt * d], &mut vbuf[b * bs * d..][..cnt * d]);
            }
            for h in 0..group {
                let head = g * group + h;
                let qf = sized(&mut scr.q, m * d);
                self.scaled_queries(t0, head, qf);
                let s = resized(&mut scr.scores, m * n);
                crate::gemm::gemm_f32((m, n, d), s, n, (qf, d, 1), (kt, n, 1));
                let sums = exp_rows(s, n, keys, &mut scr.sums);
                let o = resized(&mut scr.acc, m * d);
                crate::gemm::gemm_f32((m, d, n), o, d, (s, n, 1), (vbuf, d, 1));
                place_rows(o, sums, (head, heads, d), out);
            }
        }
    }

    /// The queries of head `head` from token `t0` on, times the score scale, as rows of `d`
    /// filling `dst`.
    fn scaled_queries(&self, t0: usize, head: usize, dst: &mut [f32]) {
        let (d, heads) = (self.d, self.heads);
        for (i, row) in dst.chunks_exact_mut(d).enumerate() {
            let src = &self.q[((t0 + i) * heads + head) * d..][..d];
            for (x, q) in row.iter_mut().zip(src) {
                *x = q * self.scale;
            }
        }
    }

    /// [`Self::tiled`] with both products in bf16 on the AMX unit, over the sequence's
    /// operands gathered once for all its tiles (`gather`): per KV head, `S = Q K^T` and
    /// `O = P V` are both rows times weight rows (`gemm::bf16::amx_rows_by_weights`) over the
    /// tile's first keys, in whole steps of 32; `Q` (scaled) and `P` are rounded to bf16 as the
    /// unit reads them.
    fn tiled_amx(
        &self,
        t0: usize,
        keys: &[usize],
        ops: SeqOperands<bf16>,
        out: &mut [f32],
        scr: &mut Scratch,
    ) {
        let (d, heads) = (self.d, self.heads);
        let group = heads / self.kv_heads;
        let m = keys.len();
        let np = keys[m - 1].next_multiple_of(32);
        for g in 0..self.kv_heads {
            for h in 0..group {
                let head = g * group + h;
                let qf = sized(&mut scr.q, m * d);
                self.scaled_queries(t0, head, qf);
                let s = sized(&mut scr.scores, m * np);
                amx_rows_by_weights((m, np, d), qf, (ops.keys(g), d), &mut scr.pairs, s);
                let sums = exp_rows(s, np, keys, &mut scr.sums);
                let o = sized(&mut scr.acc, m * d);
                amx_rows_by_weights((m, d, np), s, (ops.values(g), ops.np), &mut scr.pairs, o);
                place_rows(o, sums, (head, heads, d), out);
            }
        }
    }
}

impl<T: Elem> Geometry<'_, T> {
    /// [`Self::tiled`] on this crate's AVX-512 f32 kernel (`gemm::rows_by_panels`, the packed
    /// kernel of the f32 projections) over the sequence's operands gathered once for all its
    /// tiles as panels (`gather`), where `tiled` repacks every operand for the `gemm` crate's
    /// 256-bit kernel; the tile's first keys, in whole panels of 32.
    fn tiled_panels(
        &self,
        t0: usize,
        keys: &[usize],
        ops: SeqOperands<f32>,
        out: &mut [f32],
        scr: &mut Scratch,
    ) {
        let (d, heads) = (self.d, self.heads);
        let group = heads / self.kv_heads;
        let m = keys.len();
        let np = keys[m - 1].next_multiple_of(crate::gemm::PANEL);
        for g in 0..self.kv_heads {
            for h in 0..group {
                let head = g * group + h;
                let qf = sized(&mut scr.q, m * d);
                self.scaled_queries(t0, head, qf);
                let s = sized(&mut scr.scores, m * np);
                let panels = (ops.keys(g), d * crate::gemm::PANEL);
                crate::gemm::rows_by_panels((m, np, d), qf, panels, s);
                let sums = exp_rows(s, np, keys, &mut scr.sums);
                let o = sized(&mut scr.acc, m * d);
                let panels = (ops.values(g), ops.np * crate::gemm::PANEL);
                crate::gemm::rows_by_panels((m, d, np), s, panels, o);
                place_rows(o, sums, (head, heads, d), out);
            }
        }
    }
}

/// The operands a call's prefill tiles read, gathered once per sequence (`gather`).
enum Gathered {
    Amx(Operands<bf16>),
    Panels(Operands<f32>),
}

/// Each row `i` of `s` (`[keys.len(), n]`) replaced by its exponentials up to `keys[i]` (zeros
/// after); returns each row's sum, by which the products of the rows are divided after
/// (`place_rows`: `d` divisions a row instead of `keys[i]`).
fn exp_rows<'a>(s: &mut [f32], n: usize, keys: &[usize], sums: &'a mut Vec<f32>) -> &'a [f32] {
    sums.clear();
    sums.extend(
        keys.iter()
            .enumerate()
            .map(|(i, &ni)| exp_prefix(&mut s[i * n..][..n], ni).1),
    );
    sums
}

/// Row `i` of `o` (`[rows, d]`) divided by `sums[i]` into `out`'s row `i`, head `head` (of
/// `heads`).
fn place_rows(o: &[f32], sums: &[f32], (head, heads, d): (usize, usize, usize), out: &mut [f32]) {
    for (i, (row, &sum)) in o.chunks_exact(d).zip(sums).enumerate() {
        let inv = 1.0 / sum;
        for (x, v) in out[(i * heads + head) * d..][..d].iter_mut().zip(row) {
            *x = v * inv;
        }
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
    // The sequences with prefill tiles: their operands, gathered once, for AMX or, in f32,
    // for the AVX-512 panel kernel (d in whole panels).
    let mut wanted = vec![false; lay.num_seqs()];
    for w in &work {
        if let Work::Tile { s, len, .. } = *w
            && len >= GEMM_MIN_QUERIES
        {
            wanted[s] = true;
        }
    }
    let operands = if !wanted.contains(&true) {
        None
    } else if geo.amx {
        let how = (bf16::ZERO, gather::amx_head::<T> as _);
        Some(Gathered::Amx(Operands::gather(&geo, lay, &wanted, how)))
    } else if crate::device::cpu_has_avx512_bw() && d.is_multiple_of(crate::gemm::PANEL) {
        let how = (0f32, gather::panel_head::<T> as _);
        Some(Gathered::Panels(Operands::gather(&geo, lay, &wanted, how)))
    } else {
        None
    };
    work.into_par_iter()
        .for_each_init(Scratch::default, |scr, w| match w {
            Work::Tile { s, t0, len, out } => {
                let keys: Vec<usize> = (t0..t0 + len).map(|t| lay.position(t) + 1).collect();
                let n = keys[len - 1];
                let table = &lay.block_tables[s * lay.max_blocks..][..n.div_ceil(block_size)];
                let gathered = operands.as_ref().filter(|_| len >= GEMM_MIN_QUERIES);
                if let Some(Gathered::Amx(ops)) = gathered
                    && let Some(ops) = ops.of(s)
                {
                    geo.tiled_amx(t0, &keys, ops, out, scr);
                } else if let Some(Gathered::Panels(ops)) = gathered
                    && let Some(ops) = ops.of(s)
                {
                    geo.tiled_panels(t0, &keys, ops, out, scr);
                } else if len >= GEMM_MIN_QUERIES {
                    geo.tiled(t0, &keys, table, out, scr);
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

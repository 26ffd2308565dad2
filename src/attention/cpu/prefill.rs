//! Prefill tiles (at least `GEMM_MIN_QUERIES` queries of one sequence): per KV head and query
//! head, `S = Q K^T`, the causal softmax of each row, `O = P V`, as two products. On AMX CPUs
//! with bf16 weights in bf16 on the matrix unit, on other AVX-512 CPUs in f32 on this crate's
//! packed kernel, both over the sequence's K and V gathered once per call (`tiled_gathered`,
//! `gather`); elsewhere through the `gemm` crate, each tile gathering its own (`tiled`).

use half::bf16;

use super::gather::{self, Operands, SeqOperands};
use super::work::Work;
use super::{Elem, GEMM_MIN_QUERIES, Geometry, Scratch, exp_prefix, resized, sized};
use crate::attention::BatchLayout;
use crate::gemm::bf16::amx_rows_by_weights;

/// The operands a call's prefill tiles read, gathered once per sequence (`gather`).
pub(super) enum Gathered {
    Amx(Operands<bf16>),
    Panels(Operands<f32>),
}

impl Gathered {
    /// The operands of the sequences with prefill tiles among `work`: for AMX, or in f32 for
    /// the AVX-512 panel kernel (heads in whole panels); `None` where the tiles take the
    /// `gemm` crate's path, or there are none.
    pub(super) fn for_tiles<T: Elem>(
        geo: &Geometry<T>,
        lay: &BatchLayout,
        work: &[Work],
    ) -> Option<Self> {
        let mut wanted = vec![false; lay.num_seqs()];
        for w in work {
            if let Work::Tile { s, len, .. } = *w
                && len >= GEMM_MIN_QUERIES
            {
                wanted[s] = true;
            }
        }
        if !wanted.contains(&true) {
            None
        } else if geo.amx {
            let how = (bf16::ZERO, gather::amx_head::<T> as _);
            Some(Self::Amx(Operands::gather(geo, lay, &wanted, how)))
        } else if crate::device::cpu_has_avx512_bw() && geo.d.is_multiple_of(crate::gemm::PANEL) {
            let how = (0f32, gather::panel_head::<T> as _);
            Some(Self::Panels(Operands::gather(geo, lay, &wanted, how)))
        } else {
            None
        }
    }
}

impl<T: Elem> Geometry<'_, T> {
    /// The prefill tile of sequence `s` from token `t0`, whose queries see `keys` keys each,
    /// on whichever path `gathered` prepared for (`table`: the sequence's blocks, for `tiled`).
    pub(super) fn prefill_tile(
        &self,
        (s, t0, keys): (usize, usize, &[usize]),
        table: &[u32],
        gathered: Option<&Gathered>,
        out: &mut [f32],
        scr: &mut Scratch,
    ) {
        let (d, panel) = (self.d, crate::gemm::PANEL);
        if let Some(Gathered::Amx(ops)) = gathered
            && let Some(ops) = ops.of(s)
        {
            // Key rows `d` apart, value columns `np` apart.
            let product =
                |dims, x: &[f32], w: (&[bf16], usize), pairs: &mut Vec<u32>, out: &mut [f32]| {
                    amx_rows_by_weights(dims, x, w, pairs, out)
                };
            self.tiled_gathered((t0, keys), (ops, d, ops.np), product, out, scr);
        } else if let Some(Gathered::Panels(ops)) = gathered
            && let Some(ops) = ops.of(s)
        {
            // Key panels `d` steps long, value panels `np`.
            let product =
                |dims, x: &[f32], w: (&[f32], usize), _: &mut Vec<u32>, out: &mut [f32]| {
                    crate::gemm::rows_by_panels(dims, x, w, out)
                };
            let ld = (d * panel, ops.np * panel);
            self.tiled_gathered((t0, keys), (ops, ld.0, ld.1), product, out, scr);
        } else {
            self.tiled(t0, keys, table, out, scr);
        }
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

    /// [`Self::tiled`] over the sequence's operands gathered once for all its tiles (`gather`),
    /// the tile's first keys in whole steps of 32, by `product((m, n, k), x, (w, ld), pairs,
    /// out)`, `out = x w^T` with `w`'s rows (AMX) or panels (f32) `ld` apart: `ld` is `lk` for
    /// the keys and `lv` for the values. On AMX both products run in bf16 on the unit
    /// (`gemm::bf16::amx_rows_by_weights`: `Q` (scaled) and `P` rounded to bf16 as it reads
    /// them, `pairs` its buffer); in f32 on the packed kernel of the projections
    /// (`gemm::rows_by_panels`), where `tiled` repacks every operand for the `gemm` crate's
    /// 256-bit kernel.
    fn tiled_gathered<E>(
        &self,
        (t0, keys): (usize, &[usize]),
        (ops, lk, lv): (SeqOperands<E>, usize, usize),
        product: impl Fn((usize, usize, usize), &[f32], (&[E], usize), &mut Vec<u32>, &mut [f32]),
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
                product((m, np, d), qf, (ops.keys(g), lk), &mut scr.pairs, s);
                let sums = exp_rows(s, np, keys, &mut scr.sums);
                let o = sized(&mut scr.acc, m * d);
                product((m, d, np), s, (ops.values(g), lv), &mut scr.pairs, o);
                place_rows(o, sums, (head, heads, d), out);
            }
        }
    }
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

//! The operands of prefill tiles that run their products on this crate's own kernels, per
//! sequence and KV head, gathered from the paged cache once per call for all the tiles of the
//! sequence, which read their prefix of each. (When each tile gathered its own prefix, a
//! 512-token prompt in tiles of 64 gathered its keys 4.5 times over.) `np` is the context
//! rounded up to 32; zeros past the context.
//! - On AMX (`Geometry::tiled_gathered`, [`amx_head`]): keys as bf16 rows (`[np, d]`), values as
//!   bf16 columns (`[d, np]`).
//! - In f32 with AVX-512 (`Geometry::tiled_gathered`, [`panel_head`]): both as panels of 32
//!   output features for `gemm::rows_by_panels`: keys `[np / 32][d][32]`, values
//!   `[d / 32][np][32]`.

use half::bf16;
use rayon::prelude::*;

use super::{Elem, Geometry};
use crate::attention::BatchLayout;
use crate::gemm::bf16::transpose16_to_bf16;

/// Keys per AMX step and per panel: the operands are padded to a multiple.
const STEP: usize = 32;

/// Gathers one KV head's first `n` keys and values, in blocks `table`, into its two operands
/// (zeros when called), with two scratch buffers.
type HeadGather<T, E> = fn(&Geometry<T>, (&[u32], usize, usize), (&mut [E], &mut [E]), Scratch);

/// A block's K and V in f32.
type Scratch<'a> = (&'a mut Vec<f32>, &'a mut Vec<f32>);

/// The gathered operands of one call, for the sequences that asked for them.
pub(in crate::attention) struct Operands<E> {
    data: Vec<E>,
    /// Per sequence, where its operands start in `data` and its padded context `np`.
    seqs: Vec<Option<(usize, usize)>>,
    kv_heads: usize,
    d: usize,
}

/// One sequence's operands (see the module doc).
#[derive(Clone, Copy)]
pub(in crate::attention) struct SeqOperands<'a, E> {
    data: &'a [E],
    /// The padded context: the keys of a V column, or of a V panel's steps.
    pub np: usize,
    d: usize,
}

impl<'a, E> SeqOperands<'a, E> {
    /// K of KV head `g` (`np * d` values).
    pub fn keys(&self, g: usize) -> &'a [E] {
        &self.data[2 * g * self.np * self.d..][..self.np * self.d]
    }

    /// V of KV head `g` (`d * np` values).
    pub fn values(&self, g: usize) -> &'a [E] {
        &self.data[(2 * g + 1) * self.np * self.d..][..self.np * self.d]
    }
}

impl<E: Copy + Send + Sync> Operands<E> {
    /// The operands of every sequence `s` with `wanted[s]`, each KV head's by `head` (starting
    /// from `zero`s), in parallel over sequences and KV heads.
    pub fn gather<T: Elem>(
        geo: &Geometry<T>,
        lay: &BatchLayout,
        wanted: &[bool],
        (zero, head): (E, HeadGather<T, E>),
    ) -> Self {
        let (d, kv_heads) = (geo.d, geo.kv_heads);
        let mut seqs = Vec::with_capacity(wanted.len());
        let mut total = 0;
        for (s, &w) in wanted.iter().enumerate() {
            seqs.push(w.then(|| {
                let np = (lay.context_lens[s] as usize).next_multiple_of(STEP);
                let at = total;
                total += 2 * kv_heads * np * d;
                (at, np)
            }));
        }
        let mut data = vec![zero; total];
        let mut jobs = Vec::new();
        let mut rest = data.as_mut_slice();
        for (s, seq) in seqs.iter().enumerate() {
            let Some((_, np)) = *seq else { continue };
            for g in 0..kv_heads {
                let (both, tail) = std::mem::take(&mut rest).split_at_mut(2 * np * d);
                rest = tail;
                jobs.push((s, g, both));
            }
        }
        jobs.into_par_iter().for_each_init(
            || (Vec::new(), Vec::new()),
            |(kf, vf), (s, g, both)| {
                let n = lay.context_lens[s] as usize;
                let table = &lay.block_tables[s * lay.max_blocks..][..n.div_ceil(geo.block_size)];
                kf.resize(geo.d * geo.block_size, 0.0);
                vf.resize(geo.d * geo.block_size, 0.0);
                let (k, v) = both.split_at_mut(both.len() / 2);
                head(geo, (table, n, g), (k, v), (kf, vf));
            },
        );
        Self {
            data,
            seqs,
            kv_heads,
            d,
        }
    }

    /// Sequence `s`'s operands, if it asked for them.
    pub fn of(&self, s: usize) -> Option<SeqOperands<'_, E>> {
        let (at, np) = self.seqs.get(s).copied().flatten()?;
        Some(SeqOperands {
            data: &self.data[at..][..2 * self.kv_heads * np * self.d],
            np,
            d: self.d,
        })
    }
}

/// Each of KV head `g`'s blocks in `table` converted to f32 (K `[d, block_size]` into `kf`, V
/// `[block_size, d]` into `vf`: both are wanted transposed), passed to `place(first, count, kf,
/// vf)` with its first key and how many of its keys are among the first `n`: where both
/// gatherings start.
fn each_block<T: Elem>(
    geo: &Geometry<T>,
    (table, n, g): (&[u32], usize, usize),
    (kf, vf): Scratch,
    mut place: impl FnMut(usize, usize, &[f32], &[f32]),
) {
    let bs = geo.block_size;
    for (b, &blk) in table.iter().enumerate() {
        let (kb, vb) = geo.block(blk, g);
        T::to_f32_run(kb, kf);
        T::to_f32_run(vb, vf);
        place(b * bs, bs.min(n - b * bs), kf, vf);
    }
}

/// The AMX operands ([`HeadGather`]): keys into `k16` (`[np, d]`), values into `v16`
/// (`[d, np]`). With blocks of a multiple of 16 keys, 16 x 16 pieces are transposed in
/// registers (`transpose16_to_bf16`) and the keys from `n` to the next 16 zeroed again after;
/// otherwise key by key.
pub(in crate::attention) fn amx_head<T: Elem>(
    geo: &Geometry<T>,
    (table, n, g): (&[u32], usize, usize),
    (k16, v16): (&mut [bf16], &mut [bf16]),
    scratch: Scratch,
) {
    let (d, bs) = (geo.d, geo.block_size);
    let np = k16.len() / d;
    let pieces = bs.is_multiple_of(16) && d.is_multiple_of(16);
    each_block(geo, (table, n, g), scratch, |first, cnt, kf, vf| {
        if pieces {
            for c in (0..cnt).step_by(16) {
                for e in (0..d).step_by(16) {
                    transpose16_to_bf16(&kf[e * bs + c..], bs, &mut k16[(first + c) * d + e..], d);
                    transpose16_to_bf16(&vf[c * d + e..], d, &mut v16[e * np + first + c..], np);
                }
            }
        } else {
            for j in 0..cnt {
                for e in 0..d {
                    k16[(first + j) * d + e] = bf16::from_f32(kf[e * bs + j]);
                    v16[e * np + first + j] = bf16::from_f32(vf[j * d + e]);
                }
            }
        }
    });
    // The last piece of 16 may have brought keys past `n` (whatever the block's free slots
    // hold): zeros again.
    let end = n.next_multiple_of(16).min(np);
    k16[n * d..end * d].fill(bf16::ZERO);
    for col in v16.chunks_exact_mut(np) {
        col[n..end].fill(bf16::ZERO);
    }
}

/// The f32 panels ([`HeadGather`]): keys into `kp` (`[np / 32][d][32]`: a block's keys are
/// already stored by dimension, so each dimension's run of keys moves as it is), values into
/// `vp` (`[d / 32][np][32]`: each key's values in runs of 32 dimensions). `d` is a multiple of
/// 32. Only the `n` keys are written: the rest stay zeros.
pub(in crate::attention) fn panel_head<T: Elem>(
    geo: &Geometry<T>,
    (table, n, g): (&[u32], usize, usize),
    (kp, vp): (&mut [f32], &mut [f32]),
    scratch: Scratch,
) {
    let (d, bs) = (geo.d, geo.block_size);
    let np = kp.len() / d;
    each_block(geo, (table, n, g), scratch, |first, cnt, kf, vf| {
        // Runs of keys within one panel.
        let mut j = 0;
        while j < cnt {
            let (p, c) = ((first + j) / STEP, (first + j) % STEP);
            let run = (cnt - j).min(STEP - c);
            for e in 0..d {
                kp[(p * d + e) * STEP + c..][..run].copy_from_slice(&kf[e * bs + j..][..run]);
            }
            j += run;
        }
        for j in 0..cnt {
            for q in 0..d / STEP {
                vp[(q * np + first + j) * STEP..][..STEP]
                    .copy_from_slice(&vf[j * d + q * STEP..][..STEP]);
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gemm::bf16::Bf16Kernel;

    /// Distinct small integers (exact in bf16), negated for V.
    fn val(g: usize, j: usize, e: usize) -> f32 {
        ((g * 1000 + j * 37 + e) % 251) as f32
    }

    /// For blocks of 16, 32 and 8 keys and contexts of 1 to 70 keys: a cache holding `val` in
    /// the slots of a block table out of order and NaN everywhere else, and each KV head's
    /// operands as `head` gathers them, against `at(np, key, dim)` giving where K's and V's
    /// value of that key and dimension belong: every key and value there bit for bit, zeros
    /// past the context.
    fn check<E: Copy + Into<f32>>(
        zero: E,
        head: HeadGather<f32, E>,
        at: impl Fn(usize, usize, usize) -> (usize, usize),
    ) {
        let (kv_heads, d) = (2, 64);
        for bs in [16, 32, 8] {
            for n in [1usize, 15, 16, 17, 40, 64, 70] {
                let used = n.div_ceil(bs);
                let blocks = used + 1;
                let table: Vec<u32> = (0..used).map(|b| (blocks - 1 - b) as u32).collect();
                let (mut kc, mut vc) = (vec![f32::NAN; blocks * kv_heads * d * bs], Vec::new());
                vc.resize(kc.len(), f32::NAN);
                for j in 0..n {
                    let (blk, off) = (table[j / bs] as usize, j % bs);
                    for g in 0..kv_heads {
                        for e in 0..d {
                            kc[((blk * kv_heads + g) * d + e) * bs + off] = val(g, j, e);
                            vc[((blk * kv_heads + g) * bs + off) * d + e] = -val(g, j, e);
                        }
                    }
                }
                let geo = Geometry {
                    q: &[],
                    kc: &kc,
                    vc: &vc,
                    block_size: bs,
                    kv_heads,
                    heads: kv_heads,
                    d,
                    scale: 1.0,
                    amx: false,
                };
                let np = n.next_multiple_of(STEP);
                for g in 0..kv_heads {
                    let (mut k, mut v) = (vec![zero; np * d], vec![zero; d * np]);
                    let (mut kf, mut vf) = (vec![0.0; d * bs], vec![0.0; d * bs]);
                    head(&geo, (&table, n, g), (&mut k, &mut v), (&mut kf, &mut vf));
                    for j in 0..np {
                        for e in 0..d {
                            let want = if j < n { val(g, j, e) } else { 0.0 };
                            let (ka, va) = at(np, j, e);
                            let at =
                                format!("block size {bs}, {n} keys, head {g}, key {j}, dim {e}");
                            assert_eq!(k[ka].into(), want, "K {at}");
                            assert_eq!(v[va].into(), -want, "V {at}");
                        }
                    }
                }
            }
        }
    }

    /// Both ways of gathering for AMX (16 x 16 pieces for blocks of 16 and 32, key by key for
    /// 8): keys as rows, values as columns.
    #[test]
    fn amx_keys_become_rows_and_values_columns() {
        if !Bf16Kernel::Amx.runs_here() {
            return;
        }
        check(bf16::ZERO, amx_head::<f32>, |np, j, e| {
            (j * 64 + e, e * np + j)
        });
    }

    /// Keys and values as panels of 32 output features.
    #[test]
    fn panels_hold_keys_by_dimension_and_values_by_key() {
        check(0f32, panel_head::<f32>, |np, j, e| {
            (
                ((j / STEP) * 64 + e) * STEP + j % STEP,
                ((e / STEP) * np + j) * STEP + e % STEP,
            )
        });
    }
}

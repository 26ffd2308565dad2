//! The operands of prefill tiles on AMX (`Geometry::tiled_amx`): per sequence and KV head, its
//! keys as bf16 rows (`[np, d]`) and its values as bf16 columns (`[d, np]`, `np` its context
//! rounded up to 32, zeros past the context), gathered from the paged cache once per call for
//! all the tiles of the sequence, which read their prefix of each. (When each tile gathered its
//! own prefix, a 512-token prompt in tiles of 64 gathered its keys 4.5 times over.)

use half::bf16;
use rayon::prelude::*;

use super::{Elem, Geometry};
use crate::attention::BatchLayout;
use crate::gemm::bf16::transpose16_to_bf16;

/// Keys per AMX step: the operands are padded to a multiple.
const STEP: usize = 32;

/// The gathered operands of one call, for the sequences that asked for them.
pub(in crate::attention) struct AmxOperands {
    data: Vec<bf16>,
    /// Per sequence, where its operands start in `data` and its padded context `np`.
    seqs: Vec<Option<(usize, usize)>>,
    kv_heads: usize,
    d: usize,
}

/// One sequence's operands (see the module doc).
#[derive(Clone, Copy)]
pub(in crate::attention) struct SeqOperands<'a> {
    data: &'a [bf16],
    /// Keys per V column (the row stride of `values`).
    pub np: usize,
    d: usize,
}

impl<'a> SeqOperands<'a> {
    /// K of KV head `g` as `np` rows of `d`.
    pub fn keys(&self, g: usize) -> &'a [bf16] {
        &self.data[2 * g * self.np * self.d..][..self.np * self.d]
    }

    /// V of KV head `g` as `d` columns of `np` keys.
    pub fn values(&self, g: usize) -> &'a [bf16] {
        &self.data[(2 * g + 1) * self.np * self.d..][..self.np * self.d]
    }
}

impl AmxOperands {
    /// The operands of every sequence `s` with `wanted[s]`, gathered in parallel over
    /// sequences and KV heads.
    pub fn gather<T: Elem>(geo: &Geometry<T>, lay: &BatchLayout, wanted: &[bool]) -> Self {
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
        // Zeros: the keys past each context stay so (the products read whole steps).
        let mut data = vec![bf16::ZERO; total];
        let mut jobs = Vec::new();
        let mut rest = data.as_mut_slice();
        for (s, seq) in seqs.iter().enumerate() {
            let Some((_, np)) = *seq else { continue };
            for g in 0..kv_heads {
                let (head, tail) = std::mem::take(&mut rest).split_at_mut(2 * np * d);
                rest = tail;
                jobs.push((s, g, head));
            }
        }
        jobs.into_par_iter().for_each_init(
            || (Vec::new(), Vec::new()),
            |(kf, vf), (s, g, head)| {
                let n = lay.context_lens[s] as usize;
                let table = &lay.block_tables[s * lay.max_blocks..][..n.div_ceil(geo.block_size)];
                let (k16, v16) = head.split_at_mut(head.len() / 2);
                gather_head(geo, (table, n, g), (k16, v16), (kf, vf));
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
    pub fn of(&self, s: usize) -> Option<SeqOperands<'_>> {
        let (at, np) = self.seqs.get(s).copied().flatten()?;
        Some(SeqOperands {
            data: &self.data[at..][..2 * self.kv_heads * np * self.d],
            np,
            d: self.d,
        })
    }
}

/// KV head `g`'s first `n` keys and values, in blocks `table`, into `k16` (`[np, d]`) and
/// `v16` (`[d, np]`), which hold zeros. With blocks of a multiple of 16 keys, 16 x 16 pieces
/// are transposed in registers (`transpose16_to_bf16`) and the keys from `n` to the next 16
/// zeroed again after; otherwise key by key.
fn gather_head<T: Elem>(
    geo: &Geometry<T>,
    (table, n, g): (&[u32], usize, usize),
    (k16, v16): (&mut [bf16], &mut [bf16]),
    (kf, vf): (&mut Vec<f32>, &mut Vec<f32>),
) {
    let (d, bs) = (geo.d, geo.block_size);
    let np = k16.len() / d;
    kf.resize(d * bs, 0.0);
    vf.resize(bs * d, 0.0);
    for (b, &blk) in table.iter().enumerate() {
        let (kb, vb) = geo.block(blk, g);
        // K is stored `[d, block_size]` and V `[block_size, d]`: both are wanted transposed.
        T::to_f32_run(kb, kf);
        T::to_f32_run(vb, vf);
        let first = b * bs;
        if bs.is_multiple_of(16) && d.is_multiple_of(16) {
            for c in (0..bs).step_by(16).take_while(|c| first + c < n) {
                for e in (0..d).step_by(16) {
                    transpose16_to_bf16(&kf[e * bs + c..], bs, &mut k16[(first + c) * d + e..], d);
                    transpose16_to_bf16(&vf[c * d + e..], d, &mut v16[e * np + first + c..], np);
                }
            }
        } else {
            for j in 0..bs.min(n - first) {
                for e in 0..d {
                    k16[(first + j) * d + e] = bf16::from_f32(kf[e * bs + j]);
                    v16[e * np + first + j] = bf16::from_f32(vf[j * d + e]);
                }
            }
        }
    }
    // The last piece of 16 may have brought keys past `n` (whatever the block's free slots
    // hold): zeros again.
    let end = n.next_multiple_of(16).min(np);
    k16[n * d..end * d].fill(bf16::ZERO);
    for col in v16.chunks_exact_mut(np) {
        col[n..end].fill(bf16::ZERO);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gemm::bf16::Bf16Kernel;

    /// Both ways of gathering (16 x 16 pieces, key by key) put every key and value where the
    /// products read them, bit for bit, through a block table out of order, and zeros past the
    /// context whatever the blocks' free slots hold (NaN here).
    #[test]
    fn keys_become_rows_and_values_columns() {
        if !Bf16Kernel::Amx.runs_here() {
            return;
        }
        let (kv_heads, d) = (2, 32);
        // Distinct small integers (exact in bf16), negative for V.
        let val = |g: usize, j: usize, e: usize| ((g * 1000 + j * 37 + e) % 251) as f32;
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
                    amx: true,
                };
                let np = n.next_multiple_of(STEP);
                for g in 0..kv_heads {
                    let (mut k16, mut v16) = (vec![bf16::ZERO; np * d], vec![bf16::ZERO; d * np]);
                    let scratch = (&mut Vec::new(), &mut Vec::new());
                    gather_head(&geo, (&table, n, g), (&mut k16, &mut v16), scratch);
                    for j in 0..np {
                        for e in 0..d {
                            let want = if j < n { val(g, j, e) } else { 0.0 };
                            let at =
                                format!("block size {bs}, {n} keys, head {g}, key {j}, dim {e}");
                            assert_eq!(k16[j * d + e].to_f32(), want, "K {at}");
                            assert_eq!(v16[e * np + j].to_f32(), -want, "V {at}");
                        }
                    }
                }
            }
        }
    }
}

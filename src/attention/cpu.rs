//! CPU paged attention: candle custom ops over the paged cache, parallel over tokens (rayon).
//!
//! `write_kv` copies each token's K (or V) rows into its slot. `attend` computes, for every
//! query token and head, softmax(q·K^T * scale) V over the token's sequence up to its own
//! position, reading K/V block by block through the block table. Math is in f32 whatever the
//! storage dtype (f32, f16, bf16).

use std::sync::Arc;

use anyhow::Result;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, InplaceOp2, Layout, Shape, Storage, Tensor};
use half::{bf16, f16};
use rayon::prelude::*;

use super::BatchLayout;

/// Element types the CPU kernels read and write.
trait Elem: candle_core::WithDType + Copy + Send + Sync {
    fn f32(self) -> f32;
    fn of(x: f32) -> Self;
    /// The slice itself when the storage is already f32 (no conversion needed).
    fn as_f32(s: &[Self]) -> Option<&[f32]>;
}

impl Elem for f32 {
    fn f32(self) -> f32 {
        self
    }
    fn of(x: f32) -> Self {
        x
    }
    fn as_f32(s: &[Self]) -> Option<&[f32]> {
        Some(s)
    }
}

impl Elem for f16 {
    fn f32(self) -> f32 {
        self.to_f32()
    }
    fn of(x: f32) -> Self {
        f16::from_f32(x)
    }
    fn as_f32(_: &[Self]) -> Option<&[f32]> {
        None
    }
}

impl Elem for bf16 {
    fn f32(self) -> f32 {
        self.to_f32()
    }
    fn of(x: f32) -> Self {
        bf16::from_f32(x)
    }
    fn as_f32(_: &[Self]) -> Option<&[f32]> {
        None
    }
}

fn contiguous<'a, T>(s: &'a [T], l: &Layout, what: &str) -> candle_core::Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s[a..b]),
        None => candle_core::bail!("{what} must be contiguous"),
    }
}

/// Writes `src` (`[tokens, kv_heads, head_dim]`) into `cache` at the layout's slots.
pub fn write_kv(cache: &Tensor, src: &Tensor, layout: &Arc<BatchLayout>) -> Result<()> {
    cache.inplace_op2(
        src,
        &WriteKv {
            layout: layout.clone(),
        },
    )?;
    Ok(())
}

struct WriteKv {
    layout: Arc<BatchLayout>,
}

impl WriteKv {
    fn run<T: Copy + Send + Sync>(
        &self,
        cache: &mut [T],
        cl: &Layout,
        src: &[T],
        sl: &Layout,
    ) -> candle_core::Result<()> {
        let src = contiguous(src, sl, "K/V input")?;
        let (start, end) = match cl.contiguous_offsets() {
            Some(x) => x,
            None => candle_core::bail!("the KV cache must be contiguous"),
        };
        let cache = &mut cache[start..end];
        let tokens = self.layout.num_tokens();
        if tokens == 0 {
            return Ok(());
        }
        let row = src.len() / tokens;
        let dims = cl.dims();
        if dims.len() != 4 || dims[2] * dims[3] != row || src.len() != row * tokens {
            candle_core::bail!("write_kv: cache {dims:?} does not match rows of {row}");
        }
        for (t, &slot) in self.layout.slot_mapping.iter().enumerate() {
            let dst = &mut cache[slot as usize * row..][..row];
            dst.copy_from_slice(&src[t * row..][..row]);
        }
        Ok(())
    }
}

impl InplaceOp2 for WriteKv {
    fn name(&self) -> &'static str {
        "write-kv"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        match (s1, s2) {
            (CpuStorage::F32(c), CpuStorage::F32(s)) => self.run(c, l1, s, l2),
            (CpuStorage::F16(c), CpuStorage::F16(s)) => self.run(c, l1, s, l2),
            (CpuStorage::BF16(c), CpuStorage::BF16(s)) => self.run(c, l1, s, l2),
            (c, s) => candle_core::bail!(
                "write_kv: unsupported dtypes cache {:?}, input {:?}",
                c.dtype(),
                s.dtype()
            ),
        }
    }
}

/// Attention of `q` (`[tokens, heads, head_dim]`) over the paged K/V caches.
pub fn attend(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    layout: &Arc<BatchLayout>,
    num_heads: usize,
    scale: f32,
) -> Result<Tensor> {
    Ok(q.apply_op1_no_bwd(&Attend {
        k_cache: k_cache.clone(),
        v_cache: v_cache.clone(),
        layout: layout.clone(),
        num_heads,
        scale,
    })?)
}

struct Attend {
    k_cache: Tensor,
    v_cache: Tensor,
    layout: Arc<BatchLayout>,
    num_heads: usize,
    scale: f32,
}

/// `sum(a[i] * b[i])` in eight independent lanes, so the compiler vectorises it.
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ac.zip(bc) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `out += p * v`.
#[inline]
fn axpy(out: &mut [f32], p: f32, v: &[f32]) {
    for (o, x) in out.iter_mut().zip(v) {
        *o += p * x;
    }
}

impl Attend {
    fn run<T: Elem>(&self, q: &[T], ql: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let q = contiguous(q, ql, "queries")?;
        let (kst, kl) = self.k_cache.storage_and_layout();
        let (vst, vl) = self.v_cache.storage_and_layout();
        let (Storage::Cpu(kst), Storage::Cpu(vst)) = (&*kst, &*vst) else {
            candle_core::bail!("attend: the KV cache is not on the CPU");
        };
        let kc = contiguous(kst.as_slice::<T>()?, kl, "K cache")?;
        let vc = contiguous(vst.as_slice::<T>()?, vl, "V cache")?;
        let &[_, block_size, kv_heads, d] = kl.dims() else {
            candle_core::bail!("attend: K cache must be 4-d, got {:?}", kl.dims());
        };
        let heads = self.num_heads;
        let lay = &*self.layout;
        let tokens = lay.num_tokens();
        if q.len() != tokens * heads * d || !heads.is_multiple_of(kv_heads) {
            candle_core::bail!(
                "attend: queries {:?} do not match {tokens} tokens x {heads} heads x {d}",
                ql.dims()
            );
        }
        let group = heads / kv_heads;
        let mut out = vec![T::of(0.0); tokens * heads * d];
        out.par_chunks_mut(heads * d).enumerate().for_each_init(
            Vec::<f32>::new,
            |scratch, (t, out_t)| {
                let s = lay.token_seq[t] as usize;
                let n = lay.position(t) + 1;
                let table = &lay.block_tables[s * lay.max_blocks..][..n.div_ceil(block_size)];
                // scratch: [group * n] scores, [group * d] queries, [group * d] accumulators,
                // [2 * d] converted K/V rows.
                scratch.clear();
                scratch.resize(group * n + 2 * group * d + 2 * d, 0.0);
                let (scores, rest) = scratch.split_at_mut(group * n);
                let (qf, rest) = rest.split_at_mut(group * d);
                let (acc, row) = rest.split_at_mut(group * d);
                let row_at = |j: usize, g: usize| -> usize {
                    let slot = table[j / block_size] as usize * block_size + j % block_size;
                    (slot * kv_heads + g) * d
                };
                for g in 0..kv_heads {
                    let q_t = &q[(t * heads + g * group) * d..][..group * d];
                    for (dst, &x) in qf.iter_mut().zip(q_t) {
                        *dst = x.f32() * self.scale;
                    }
                    for j in 0..n {
                        let off = row_at(j, g);
                        let k_row: &[f32] = match T::as_f32(&kc[off..off + d]) {
                            Some(r) => r,
                            None => {
                                for (dst, x) in row[..d].iter_mut().zip(&kc[off..off + d]) {
                                    *dst = x.f32();
                                }
                                &row[..d]
                            }
                        };
                        for h in 0..group {
                            scores[h * n + j] = dot(&qf[h * d..][..d], k_row);
                        }
                    }
                    for h in 0..group {
                        let sc = &mut scores[h * n..][..n];
                        let max = sc.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                        let mut sum = 0.0;
                        for x in sc.iter_mut() {
                            *x = (*x - max).exp();
                            sum += *x;
                        }
                        let inv = 1.0 / sum;
                        sc.iter_mut().for_each(|x| *x *= inv);
                    }
                    acc.fill(0.0);
                    for j in 0..n {
                        let off = row_at(j, g);
                        let v_row: &[f32] = match T::as_f32(&vc[off..off + d]) {
                            Some(r) => r,
                            None => {
                                for (dst, x) in row[d..].iter_mut().zip(&vc[off..off + d]) {
                                    *dst = x.f32();
                                }
                                &row[d..]
                            }
                        };
                        for h in 0..group {
                            axpy(&mut acc[h * d..][..d], scores[h * n + j], v_row);
                        }
                    }
                    for (dst, &x) in out_t[g * group * d..][..group * d].iter_mut().zip(&*acc) {
                        *dst = T::of(x);
                    }
                }
            },
        );
        Ok((T::to_cpu_storage_owned(out), ql.shape().clone()))
    }
}

impl CustomOp1 for Attend {
    fn name(&self) -> &'static str {
        "paged-attention"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        match s {
            CpuStorage::F32(q) => self.run(q, l),
            CpuStorage::F16(q) => self.run(q, l),
            CpuStorage::BF16(q) => self.run(q, l),
            other => candle_core::bail!("attend: unsupported dtype {:?}", other.dtype()),
        }
    }
}

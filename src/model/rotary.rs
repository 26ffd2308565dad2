//! A step's queries, keys and values out of the fused QKV projection, queries and keys rotated
//! (rotary position embeddings, the halves-paired layout of Llama). On the CPU in one pass,
//! parallel over tokens: candle's way copies q, k and v out of each `[q | k | v]` row (three
//! single-threaded copies) and `rope_thd` then rotates a one-sequence batch on one thread, which
//! measured 4-5% of a prefill on the 2-core machine. On CUDA, candle's split and rope kernel.

use anyhow::Result;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor, WithDType};
use half::{bf16, f16};
use rayon::prelude::*;

use crate::util::contiguous;

/// Head counts and size of a step's attention.
#[derive(Clone, Copy, Debug)]
pub struct Heads {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// `(q [tokens, heads, d], k [tokens, kv_heads, d], v [tokens, kv_heads, d])` of `qkv`
/// (`[tokens, (heads + 2 kv_heads) d]`), q and k rotated by `cos` and `sin` (`[tokens, d / 2]`,
/// each token's position's): element `i < d / 2` of a head pairs with `i + d / 2`.
pub fn split_rotate(
    qkv: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    h: Heads,
) -> Result<(Tensor, Tensor, Tensor)> {
    let tokens = qkv.dim(0)?;
    let (q_size, kv_size) = (h.heads * h.head_dim, h.kv_heads * h.head_dim);
    if !qkv.device().is_cpu() {
        let q = qkv
            .narrow(1, 0, q_size)?
            .reshape((1, tokens, h.heads, h.head_dim))?;
        let k = qkv
            .narrow(1, q_size, kv_size)?
            .reshape((1, tokens, h.kv_heads, h.head_dim))?;
        let v = qkv
            .narrow(1, q_size + kv_size, kv_size)?
            .reshape((tokens, h.kv_heads, h.head_dim))?;
        let rope = candle_nn::rotary_emb::rope_thd;
        return Ok((
            rope(&q, cos, sin)?.squeeze(0)?,
            rope(&k, cos, sin)?.squeeze(0)?,
            v,
        ));
    }
    // One flat output: every token's rotated q, then every token's rotated k, then v; each
    // part is a contiguous view of it.
    let all = qkv.apply_op3_no_bwd(cos, sin, &SplitRotate(h))?;
    let q = all
        .narrow(0, 0, tokens * q_size)?
        .reshape((tokens, h.heads, h.head_dim))?;
    let k = all
        .narrow(0, tokens * q_size, tokens * kv_size)?
        .reshape((tokens, h.kv_heads, h.head_dim))?;
    let v = all
        .narrow(0, tokens * (q_size + kv_size), tokens * kv_size)?
        .reshape((tokens, h.kv_heads, h.head_dim))?;
    Ok((q, k, v))
}

struct SplitRotate(Heads);

/// Tokens per parallel work item.
const TOKENS_PER_ITEM: usize = 16;

/// Rotates each head of `src` (`[n, d]` heads in a row) into `dst`, with this token's `cos`
/// and `sin` (`d / 2` each).
fn rotate_heads(src: &[f32], dst: &mut [f32], cos: &[f32], sin: &[f32], d: usize) {
    let half = d / 2;
    for (s, o) in src.chunks_exact(d).zip(dst.chunks_exact_mut(d)) {
        let (s1, s2) = s.split_at(half);
        let (o1, o2) = o.split_at_mut(half);
        for i in 0..half {
            let (x1, x2, c, n) = (s1[i], s2[i], cos[i], sin[i]);
            o1[i] = x1 * c - x2 * n;
            o2[i] = x1 * n + x2 * c;
        }
    }
}

impl SplitRotate {
    /// The op over `f32` values (`to_f32`/`from_f32` convert other element types per token).
    fn run<T: WithDType>(
        &self,
        (qkv, cos, sin): (&[T], &[T], &[T]),
        tokens: usize,
        to_f32: impl Fn(T) -> f32 + Sync,
        from_f32: impl Fn(f32) -> T + Sync,
    ) -> Vec<T> {
        let Heads {
            heads,
            kv_heads,
            head_dim: d,
        } = self.0;
        let (qs, ks) = (heads * d, kv_heads * d);
        let row = qs + 2 * ks;
        assert_eq!(qkv.len(), tokens * row, "split_rotate: qkv rows");
        // Written once, not zeroed first (a prefill's q, k and v are up to 63 MB per layer).
        let len = tokens * (qs + 2 * ks);
        let mut out: Vec<T> = Vec::with_capacity(len);
        let (q_out, rest) = out.spare_capacity_mut()[..len].split_at_mut(tokens * qs);
        let (k_out, v_out) = rest.split_at_mut(tokens * ks);
        let n = TOKENS_PER_ITEM;
        q_out
            .par_chunks_mut(n * qs)
            .zip(k_out.par_chunks_mut(n * ks))
            .zip(v_out.par_chunks_mut(n * ks))
            .zip(qkv.par_chunks(n * row))
            .zip(cos.par_chunks(n * d / 2).zip(sin.par_chunks(n * d / 2)))
            .for_each(|((((q_out, k_out), v_out), qkv), (cos, sin))| {
                // q and k in f32 (v is copied as it is).
                let (mut src, mut dst) = (vec![0f32; qs + ks], vec![0f32; qs + ks]);
                let (mut c, mut s) = (vec![0f32; d / 2], vec![0f32; d / 2]);
                for t in 0..qkv.len() / row {
                    for (x, &y) in src.iter_mut().zip(&qkv[t * row..][..qs + ks]) {
                        *x = to_f32(y);
                    }
                    for (x, &y) in c.iter_mut().zip(&cos[t * d / 2..][..d / 2]) {
                        *x = to_f32(y);
                    }
                    for (x, &y) in s.iter_mut().zip(&sin[t * d / 2..][..d / 2]) {
                        *x = to_f32(y);
                    }
                    rotate_heads(&src, &mut dst, &c, &s, d);
                    for (o, &x) in q_out[t * qs..][..qs].iter_mut().zip(&dst[..qs]) {
                        o.write(from_f32(x));
                    }
                    for (o, &x) in k_out[t * ks..][..ks].iter_mut().zip(&dst[qs..]) {
                        o.write(from_f32(x));
                    }
                    let v = &qkv[t * row + qs + ks..][..ks];
                    for (o, &x) in v_out[t * ks..][..ks].iter_mut().zip(v) {
                        o.write(x);
                    }
                }
            });
        // SAFETY: the chunks of q, k and v cover their `tokens` rows, and each item wrote every
        // row of its chunks (`qkv` holds `tokens` rows of `row`).
        unsafe { out.set_len(len) };
        out
    }
}

/// The op's three operands as contiguous slices.
fn inputs<'a, T>(
    (x, c, s): (&'a [T], &'a [T], &'a [T]),
    (l1, l2, l3): (&Layout, &Layout, &Layout),
) -> candle_core::Result<(&'a [T], &'a [T], &'a [T])> {
    Ok((
        contiguous(x, l1, "split_rotate: qkv")?,
        contiguous(c, l2, "split_rotate: cos")?,
        contiguous(s, l3, "split_rotate: sin")?,
    ))
}

impl CustomOp3 for SplitRotate {
    fn name(&self) -> &'static str {
        "split-rotate"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let Heads {
            heads,
            kv_heads,
            head_dim: d,
        } = self.0;
        let (tokens, cols) = l1.shape().dims2()?;
        if cols != (heads + 2 * kv_heads) * d
            || !d.is_multiple_of(2)
            || l2.shape().dims2()? != (tokens, d / 2)
            || l3.shape().dims2()? != (tokens, d / 2)
        {
            candle_core::bail!(
                "split_rotate: qkv {:?}, cos {:?}, sin {:?} do not fit {heads} + 2 x {kv_heads} heads of {d}",
                l1.dims(),
                l2.dims(),
                l3.dims()
            );
        }
        let ls = (l1, l2, l3);
        let storage = match (s1, s2, s3) {
            (CpuStorage::F32(x), CpuStorage::F32(c), CpuStorage::F32(s)) => {
                CpuStorage::F32(self.run(inputs((x, c, s), ls)?, tokens, |v| v, |v| v))
            }
            (CpuStorage::F16(x), CpuStorage::F16(c), CpuStorage::F16(s)) => {
                let args = inputs((x, c, s), ls)?;
                CpuStorage::F16(self.run(args, tokens, f16::to_f32, f16::from_f32))
            }
            (CpuStorage::BF16(x), CpuStorage::BF16(c), CpuStorage::BF16(s)) => {
                let args = inputs((x, c, s), ls)?;
                CpuStorage::BF16(self.run(args, tokens, bf16::to_f32, bf16::from_f32))
            }
            (x, c, s) => candle_core::bail!(
                "split_rotate: dtypes {:?}, {:?}, {:?}",
                x.dtype(),
                c.dtype(),
                s.dtype()
            ),
        };
        Ok((storage, Shape::from(tokens * (heads + 2 * kv_heads) * d)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// The CPU op against candle's split and `rope_thd` (the CUDA path), bit for bit: in f32,
    /// and in bf16 against candle's f32 result on the same (bf16) inputs rounded once (candle's
    /// own bf16 rope rounds after every operation). Token counts over and under a work item,
    /// grouped heads.
    #[test]
    fn matches_candles_split_and_rope() -> Result<()> {
        let dev = Device::Cpu;
        let mut rng = crate::util::Rng64::new(3);
        for (tokens, heads, kv_heads, d) in [(37, 9, 3, 64), (5, 4, 4, 8), (1, 2, 1, 128)] {
            let h = Heads {
                heads,
                kv_heads,
                head_dim: d,
            };
            let width = (heads + 2 * kv_heads) * d;
            let mut input = |shape: (usize, usize), scale: f32| {
                let v = rng.uniform_f32(shape.0 * shape.1, scale);
                Tensor::from_vec(v, shape, &dev)
            };
            let qkv = input((tokens, width), 4.0)?;
            let cos = input((tokens, d / 2), 2.0)?;
            let sin = input((tokens, d / 2), 2.0)?;
            for dtype in [DType::F32, DType::BF16] {
                let (x, c, s) = (
                    qkv.to_dtype(dtype)?,
                    cos.to_dtype(dtype)?,
                    sin.to_dtype(dtype)?,
                );
                let got = split_rotate(&x, &c, &s, h)?;
                // candle's path in f32 on the same values.
                let f = |t: &Tensor| t.to_dtype(DType::F32);
                let (x, c, s) = (f(&x)?, f(&c)?, f(&s)?);
                let (qs, ks) = (heads * d, kv_heads * d);
                let rope = candle_nn::rotary_emb::rope_thd;
                let part = |at, n, hh| -> Result<Tensor> {
                    Ok(x.narrow(1, at, n)?.reshape((1, tokens, hh, d))?)
                };
                let want = [
                    rope(&part(0, qs, heads)?, &c, &s)?.squeeze(0)?,
                    rope(&part(qs, ks, kv_heads)?, &c, &s)?.squeeze(0)?,
                    part(qs + ks, ks, kv_heads)?.squeeze(0)?,
                ];
                for (g, w) in [&got.0, &got.1, &got.2].into_iter().zip(&want) {
                    assert_eq!(g.dims(), w.dims());
                    let w = w.to_dtype(dtype)?.to_dtype(DType::F32)?;
                    let g = g.to_dtype(DType::F32)?;
                    let diff = (g - w)?.abs()?.max_all()?.to_scalar::<f32>()?;
                    assert_eq!(diff, 0.0, "{tokens} x {heads}/{kv_heads} x {d}, {dtype:?}");
                }
            }
        }
        Ok(())
    }
}

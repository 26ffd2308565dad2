//! `write_kv`: the step's K or V into their cache slots, converted to the cache's type as they
//! are written.

use candle_core::Layout;
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use rayon::prelude::*;

use crate::attention::BatchLayout;
use crate::attention::fp8::{self, F8E4M3};
use crate::attention::ops::CacheKind;

/// From this many values on, [`write_kv`] spreads over the threads (a prefill's tokens; a
/// decode step's few are not worth the fork).
const WRITE_PARALLEL: usize = 1 << 15;

/// Writes `src` (f32 `[tokens, kv_heads, head_dim]`, each token's K or V contiguous, tokens any
/// distance apart: a view of the fused QKV output) into the cache at the layout's slots, each
/// token's values converted by `conv` to the cache's type (vectorised for f16 and bf16, the
/// E4M3 encoding for fp8). Each task owns whole blocks (every `tasks`-th), so their writes
/// never meet, whatever the slots, and each reads its tokens' values in order.
pub fn write_kv<C: Copy + Default + Send>(
    kind: CacheKind,
    layout: &BatchLayout,
    cache: &mut [C],
    cl: &Layout,
    (src, sl): (&[f32], &Layout),
    conv: impl Fn(&[f32], &mut [C]) + Sync,
) -> candle_core::Result<()> {
    let Some((start, end)) = cl.contiguous_offsets() else {
        candle_core::bail!("the KV cache must be contiguous");
    };
    let cache = &mut cache[start..end];
    let &[blocks, kv_heads, a, b] = cl.dims() else {
        candle_core::bail!("write_kv: the cache must be 4-d, got {:?}", cl.dims());
    };
    let (d, bs) = match kind {
        CacheKind::Keys => (a, b),
        CacheKind::Values => (b, a),
    };
    let tokens = layout.num_tokens();
    let (src, row) = token_rows(src, sl, (tokens, kv_heads, d))?;
    if let Some(&slot) = layout.slot_mapping.iter().max()
        && slot as usize >= blocks * bs
    {
        candle_core::bail!(
            "write_kv: slot {slot} past the cache's {} slots",
            blocks * bs
        );
    }
    let tasks = if tokens * kv_heads * d >= WRITE_PARALLEL {
        4 * rayon::current_num_threads()
    } else {
        1
    };
    let out = crate::util::Disjoint::new(cache);
    let write = |task: usize| {
        let mut buf = vec![C::default(); d];
        for (t, &slot) in layout.slot_mapping.iter().enumerate() {
            let (blk, off) = (slot as usize / bs, slot as usize % bs);
            if blk % tasks != task {
                continue;
            }
            for g in 0..kv_heads {
                conv(&src[t * row + g * d..][..d], &mut buf);
                let base = (blk * kv_heads + g) * d * bs;
                // SAFETY: this task alone writes block `blk`, and the slots lie inside the
                // cache (checked above).
                unsafe {
                    match kind {
                        CacheKind::Keys => {
                            for (i, &x) in buf.iter().enumerate() {
                                out.set(base + i * bs + off, x);
                            }
                        }
                        CacheKind::Values => out.write(base + off * d, &buf),
                    }
                }
            }
        }
    };
    if tasks > 1 {
        (0..tasks).into_par_iter().for_each(write);
    } else {
        write(0);
    }
    Ok(())
}

/// `src` laid out as `l`, `[tokens, kv_heads, d]` with each token's `kv_heads * d` values
/// contiguous, and the distance between tokens' first values.
fn token_rows<'a>(
    src: &'a [f32],
    l: &Layout,
    (tokens, kv_heads, d): (usize, usize, usize),
) -> candle_core::Result<(&'a [f32], usize)> {
    if l.dims() != [tokens, kv_heads, d] {
        candle_core::bail!(
            "write_kv: K/V input of shape {:?} for {tokens} tokens of {kv_heads} x {d}",
            l.dims()
        );
    }
    let row = match l.stride() {
        &[row, h, 1] if h == d && (tokens <= 1 || row >= kv_heads * d) => row,
        _ if l.is_contiguous() => kv_heads * d,
        s => candle_core::bail!("write_kv: K/V input with strides {s:?}, rows not contiguous"),
    };
    let len = if tokens == 0 {
        0
    } else {
        (tokens - 1) * row + kv_heads * d
    };
    match src.get(l.start_offset()..l.start_offset() + len) {
        Some(s) => Ok((s, row)),
        None => candle_core::bail!("write_kv: K/V input shorter than its layout"),
    }
}

/// Rows of f32 into an f32 cache.
pub fn copy_f32(src: &[f32], dst: &mut [f32]) {
    dst.copy_from_slice(src);
}

/// Rows of f32 into an f16 cache (F16C where the CPU has it; rounded to nearest even).
pub fn to_f16(src: &[f32], dst: &mut [f16]) {
    dst.convert_from_f32_slice(src);
}

/// Rows of f32 into a bf16 cache (rounded to nearest even).
pub fn to_bf16(src: &[f32], dst: &mut [bf16]) {
    dst.convert_from_f32_slice(src);
}

/// Rows of f32 into an fp8 cache (E4M3).
pub fn to_fp8(src: &[f32], dst: &mut [F8E4M3]) {
    for (d, &x) in dst.iter_mut().zip(src) {
        *d = F8E4M3::from_bits(fp8::encode(x));
    }
}

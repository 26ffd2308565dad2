//! CPU paged attention against dense references, on SmolLM2's attention shape (9 query heads,
//! 3 KV heads, head_dim 64, f16 cache as the CPU engine keeps it):
//! - `paged/bs{8,16,32}`: our kernel over blocks scattered through the cache;
//! - `contiguous`: the same kernel with one block per sequence (no paging indirection);
//! - `paged/bs16/fp8`: blocks of 16 over an fp8 (E4M3) cache, half the bytes;
//! - `paged/bs16/bf16_amx` (prefill, CPUs whose bf16 products run on AMX): the products of
//!   attention in bf16 on the matrix unit, as `--dtype bf16` runs them;
//! - `dense_candle`: candle's matmul, softmax, matmul over contiguous f32 K/V (queries grouped
//!   per KV head, no repetition), the naive unpaged path.
//!
//! Decode: 32 sequences of 512 tokens of context, one query each. Prefill: one sequence of 512
//! prompt tokens, causal. `cargo bench --bench attention`; with `--features cuda`, the GPU
//! kernels too (see the `gpu` module).

use std::hint::black_box;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion, criterion_group, criterion_main};
use offline_bench::attention::{BatchLayout, KvCacheSpec, PagedAttention, PagedKvCache, SeqShape};
use offline_bench::gemm::bf16::Bf16Kernel;

/// The binary's allocator, so that buffers are aligned as in a run (`heap`).
#[global_allocator]
static ALLOCATOR: offline_bench::heap::ActivationCache =
    offline_bench::heap::ActivationCache::new();

const HEADS: usize = 9;
const KV_HEADS: usize = 3;
const HEAD_DIM: usize = 64;
const CTX: usize = 512;

/// A one-layer cache with room for `seqs`, and the step's layout over it (blocks scattered).
fn paged_on(
    spec: KvCacheSpec,
    seqs: &[SeqShape],
    device: &Device,
) -> (PagedKvCache, Arc<BatchLayout>) {
    let block_size = spec.block_size;
    let blocks = SeqShape::blocks(seqs, block_size);
    let num_blocks = blocks + blocks / 4 + 1;
    let cache = PagedKvCache::new(spec, num_blocks, device).expect("cache");
    cache.fill(0.01).expect("fill");
    let layout = BatchLayout::scattered(seqs, block_size, num_blocks, 7, true);
    (cache, Arc::new(layout))
}

/// [`paged_on`] for SmolLM2's geometry on the CPU with a `dtype` cache.
fn paged(seqs: &[SeqShape], block_size: usize, dtype: DType) -> (PagedKvCache, Arc<BatchLayout>) {
    let spec = KvCacheSpec::one_layer(KV_HEADS, HEAD_DIM, block_size, dtype);
    paged_on(spec, seqs, &Device::Cpu)
}

fn randn(shape: &[usize]) -> Tensor {
    Tensor::randn(0f32, 1.0, shape, &Device::Cpu).expect("randn")
}

/// A causal mask `[t, t]`: 0 on and below the diagonal, -inf above.
fn causal_mask(t: usize, device: &Device) -> Tensor {
    let mask: Vec<f32> = (0..t * t)
        .map(|i| {
            if i % t > i / t {
                f32::NEG_INFINITY
            } else {
                0.0
            }
        })
        .collect();
    Tensor::from_vec(mask, (t, t), device).expect("mask")
}

/// softmax(q K^T * scale [+ causal mask]) V, the query heads grouped per KV head.
fn dense(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> Tensor {
    let scale = 1.0 / (HEAD_DIM as f64).sqrt();
    let mut s = (q.broadcast_matmul(&k.t().expect("t")).expect("qk") * scale).expect("scale");
    if let Some(m) = mask {
        s = s.broadcast_add(m).expect("mask");
    }
    let p = candle_nn::ops::softmax_last_dim(&s).expect("softmax");
    p.broadcast_matmul(v).expect("pv")
}

/// Our kernel over `seqs` (`tokens` queries in all) with blocks of 8, 16 and 32 tokens, with
/// one block per sequence, and over an fp8 cache.
fn bench_block_sizes(g: &mut BenchmarkGroup<'_, WallTime>, seqs: &[SeqShape], tokens: usize) {
    let (q, k, v) = (
        randn(&[tokens, HEADS, HEAD_DIM]),
        randn(&[tokens, KV_HEADS, HEAD_DIM]),
        randn(&[tokens, KV_HEADS, HEAD_DIM]),
    );
    for (name, bs, dtype) in [
        ("paged/bs8", 8, DType::F16),
        ("paged/bs16", 16, DType::F16),
        ("paged/bs32", 32, DType::F16),
        ("contiguous", CTX, DType::F16),
        ("paged/bs16/fp8", 16, DType::F8E4M3),
    ] {
        let (cache, layout) = paged(seqs, bs, dtype);
        let attn = PagedAttention::new(&cache, layout, HEADS).expect("attention");
        g.bench_function(name, |b| {
            b.iter(|| black_box(attn.forward(0, &q, &k, &v).expect("forward")))
        });
    }
}

fn decode(c: &mut Criterion) {
    let batch = 32;
    let seqs = vec![
        SeqShape {
            ctx: CTX,
            queries: 1
        };
        batch
    ];
    let mut g = c.benchmark_group(format!("decode_attention_b{batch}_ctx{CTX}"));
    bench_block_sizes(&mut g, &seqs, batch);
    // Dense: per sequence and KV head, the group's 3 queries against 512 keys.
    let dq = randn(&[batch, KV_HEADS, HEADS / KV_HEADS, HEAD_DIM]);
    let (dk, dv) = (
        randn(&[batch, KV_HEADS, CTX, HEAD_DIM]),
        randn(&[batch, KV_HEADS, CTX, HEAD_DIM]),
    );
    g.bench_function("dense_candle", |b| {
        b.iter(|| black_box(dense(&dq, &dk, &dv, None)))
    });
    g.finish();
}

fn prefill(c: &mut Criterion) {
    let t = CTX;
    let seqs = [SeqShape { ctx: t, queries: t }];
    let mut g = c.benchmark_group(format!("prefill_attention_{t}"));
    g.sample_size(20);
    bench_block_sizes(&mut g, &seqs, t);
    if Bf16Kernel::chosen() == Bf16Kernel::Amx {
        let (q, k, v) = (
            randn(&[t, HEADS, HEAD_DIM]),
            randn(&[t, KV_HEADS, HEAD_DIM]),
            randn(&[t, KV_HEADS, HEAD_DIM]),
        );
        let (cache, layout) = paged(&seqs, 16, DType::F16);
        let attn = PagedAttention::new(&cache, layout, HEADS)
            .expect("attention")
            .with_bf16_prefill(true);
        g.bench_function("paged/bs16/bf16_amx", |b| {
            b.iter(|| black_box(attn.forward(0, &q, &k, &v).expect("forward")))
        });
    }
    let group = HEADS / KV_HEADS;
    let dq = randn(&[KV_HEADS, group, t, HEAD_DIM]);
    let (dk, dv) = (
        randn(&[KV_HEADS, 1, t, HEAD_DIM]),
        randn(&[KV_HEADS, 1, t, HEAD_DIM]),
    );
    let mask = causal_mask(t, &Device::Cpu);
    g.bench_function("dense_candle", |b| {
        b.iter(|| black_box(dense(&dq, &dk, &dv, Some(&mask))))
    });
    g.finish();
}

/// With `--features cuda` (and a GPU), on llama-3-8b's attention shape in bf16: the decode
/// kernels v1 (a tile per token) against v2 (split-K), and our prefill against candle's
/// matmul-softmax-matmul. Without a GPU they are skipped with a note.
#[cfg(feature = "cuda")]
mod gpu {
    use super::*;
    use offline_bench::attention::plan::DecodeKernel;

    const HEADS: usize = 32;
    const KV_HEADS: usize = 8;
    const HEAD_DIM: usize = 128;

    fn device() -> Option<Device> {
        match Device::new_cuda(0) {
            Ok(d) => Some(d),
            Err(e) => {
                eprintln!("no CUDA device, GPU benchmarks skipped: {e}");
                None
            }
        }
    }

    fn spec() -> KvCacheSpec {
        KvCacheSpec::one_layer(KV_HEADS, HEAD_DIM, 16, DType::BF16)
    }

    fn rand_on(shape: &[usize], dev: &Device) -> Tensor {
        Tensor::randn(0f32, 1.0, shape, dev)
            .and_then(|t| t.to_dtype(DType::BF16))
            .expect("randn")
    }

    pub fn decode(c: &mut Criterion) {
        let Some(dev) = device() else { return };
        let mut g = c.benchmark_group("cuda_decode_attention");
        for (batch, ctx) in [(1, 4096), (8, 4096), (64, 1024), (256, 512)] {
            let seqs = vec![SeqShape { ctx, queries: 1 }; batch];
            let (cache, layout) = paged_on(spec(), &seqs, &dev);
            cache.fill(0.01).expect("fill");
            let q = rand_on(&[batch, HEADS, HEAD_DIM], &dev);
            let (k, v) = (
                rand_on(&[batch, KV_HEADS, HEAD_DIM], &dev),
                rand_on(&[batch, KV_HEADS, HEAD_DIM], &dev),
            );
            for (name, kernel) in [
                ("v1_tiles", DecodeKernel::Tiles),
                ("v2_split", DecodeKernel::Split),
            ] {
                let attn =
                    PagedAttention::with_decode_kernel(&cache, layout.clone(), HEADS, kernel)
                        .expect("attention");
                g.bench_function(format!("{name}/b{batch}_ctx{ctx}"), |b| {
                    b.iter(|| {
                        black_box(attn.forward(0, &q, &k, &v).expect("forward"));
                        dev.synchronize().expect("sync")
                    })
                });
            }
        }
        g.finish();
    }

    pub fn prefill(c: &mut Criterion) {
        let Some(dev) = device() else { return };
        let t = 2048;
        let seqs = [SeqShape { ctx: t, queries: t }];
        let (cache, layout) = paged_on(spec(), &seqs, &dev);
        let attn = PagedAttention::new(&cache, layout, HEADS).expect("attention");
        let q = rand_on(&[t, HEADS, HEAD_DIM], &dev);
        let (k, v) = (
            rand_on(&[t, KV_HEADS, HEAD_DIM], &dev),
            rand_on(&[t, KV_HEADS, HEAD_DIM], &dev),
        );
        let mut g = c.benchmark_group(format!("cuda_prefill_attention_{t}"));
        g.bench_function("paged_tiles", |b| {
            b.iter(|| {
                black_box(attn.forward(0, &q, &k, &v).expect("forward"));
                dev.synchronize().expect("sync")
            })
        });
        let group = HEADS / KV_HEADS;
        let dq = rand_on(&[KV_HEADS, group, t, HEAD_DIM], &dev);
        let (dk, dv) = (
            rand_on(&[KV_HEADS, 1, t, HEAD_DIM], &dev),
            rand_on(&[KV_HEADS, 1, t, HEAD_DIM], &dev),
        );
        let mask = causal_mask(t, &dev).to_dtype(DType::BF16).expect("mask");
        g.bench_function("matmul_softmax_matmul", |b| {
            b.iter(|| {
                black_box(super::dense(&dq, &dk, &dv, Some(&mask)));
                dev.synchronize().expect("sync")
            })
        });
        g.finish();
    }
}

#[cfg(feature = "cuda")]
criterion_group!(benches, decode, prefill, gpu::decode, gpu::prefill);
#[cfg(not(feature = "cuda"))]
criterion_group!(benches, decode, prefill);
criterion_main!(benches);

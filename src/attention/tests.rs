//! Paged attention against a naive dense reference (f64 loops over contiguous K/V).

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use super::*;
use crate::util::Rng64;

fn random(rng: &mut Rng64, n: usize) -> Vec<f32> {
    rng.uniform_f32(n, 1.0)
}

/// softmax(q K^T / sqrt(d)) V for one query row against `n` keys, in f64.
fn reference_row(q: &[f32], ks: &[&[f32]], vs: &[&[f32]]) -> Vec<f64> {
    let d = q.len();
    let scale = 1.0 / (d as f64).sqrt();
    let scores: Vec<f64> = ks
        .iter()
        .map(|k| {
            q.iter()
                .zip(*k)
                .map(|(a, b)| *a as f64 * *b as f64)
                .sum::<f64>()
                * scale
        })
        .collect();
    let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
    let z: f64 = e.iter().sum();
    (0..d)
        .map(|i| e.iter().zip(vs).map(|(p, v)| p * v[i] as f64).sum::<f64>() / z)
        .collect()
}

fn check(
    cases: &[SeqShape],
    block_size: usize,
    heads: usize,
    kv_heads: usize,
    dtypes: (DType, DType),
) {
    check_with(cases, (block_size, heads, kv_heads), dtypes, (16, false));
}

/// [`check`] with the head dimension `d`, and prefill on AMX allowed or not.
fn check_with(
    cases: &[SeqShape],
    (block_size, heads, kv_heads): (usize, usize, usize),
    (dtype, kv_dtype): (DType, DType),
    (d, bf16_prefill): (usize, bool),
) {
    let dev = Device::Cpu;
    let mut rng = Rng64::new(block_size as u64 * 31 + heads as u64);
    let total_blocks = SeqShape::blocks(cases, block_size) + 3;
    let spec = KvCacheSpec::one_layer(kv_heads, d, block_size, kv_dtype);
    let cache = PagedKvCache::new(spec, total_blocks, &dev).unwrap();
    // Poison the cache so that a read of an unwritten slot shows up in the result.
    cache.fill(1e4).unwrap();

    // Full histories, then a prefill-style write of all but the queries, then the step itself.
    let hist: Vec<(Vec<f32>, Vec<f32>)> = cases
        .iter()
        .map(|c| {
            (
                random(&mut rng, c.ctx * kv_heads * d),
                random(&mut rng, c.ctx * kv_heads * d),
            )
        })
        .collect();
    let full = BatchLayout::scattered(cases, block_size, total_blocks, 99, false);
    let step = BatchLayout::scattered(cases, block_size, total_blocks, 99, true);
    let rows = |only_queries: bool, which: usize| -> Tensor {
        let mut v = Vec::new();
        for (c, h) in cases.iter().zip(&hist) {
            let first = if only_queries { c.ctx - c.queries } else { 0 };
            let src = if which == 0 { &h.0 } else { &h.1 };
            v.extend_from_slice(&src[first * kv_heads * d..]);
        }
        let n = v.len() / (kv_heads * d);
        Tensor::from_vec(v, (n, kv_heads, d), &dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    };
    let full = Arc::new(full);
    // The CPU's write_kv takes f32 and converts to the cache's type as it writes.
    let as_kv = |t: Tensor| t.to_dtype(DType::F32).unwrap();
    ops::write_kv(
        &cache.k[0],
        CacheKind::Keys,
        &as_kv(rows(false, 0)),
        &full,
        &StepMeta::default(),
    )
    .unwrap();
    ops::write_kv(
        &cache.v[0],
        CacheKind::Values,
        &as_kv(rows(false, 1)),
        &full,
        &StepMeta::default(),
    )
    .unwrap();

    let nq: usize = cases.iter().map(|c| c.queries).sum();
    let q = random(&mut rng, nq * heads * d);
    let qt = Tensor::from_vec(q.clone(), (nq, heads, d), &dev)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    step.validate(total_blocks, block_size).unwrap();
    let attn = PagedAttention::new(&cache, Arc::new(step), heads)
        .unwrap()
        .with_bf16_prefill(bf16_prefill);
    let out = attn
        .forward(0, &qt, &rows(true, 0), &rows(true, 1))
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();

    // The reference sees the dtype-rounded inputs, as the kernel does.
    let round = |x: &[f32], dt: DType| -> Vec<f32> {
        Tensor::from_slice(x, x.len(), &dev)
            .unwrap()
            .to_dtype(dt)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let q = round(&q, dtype);
    let tol = if bf16_prefill {
        1e-2
    } else if dtype == DType::F32 && kv_dtype == DType::F32 {
        1e-5
    } else {
        2e-2
    };
    let mut t = 0;
    for (c, (hk, hv)) in cases.iter().zip(&hist) {
        // K/V pass through the input dtype, then the cache's.
        let (hk, hv) = (
            round(&round(hk, dtype), kv_dtype),
            round(&round(hv, dtype), kv_dtype),
        );
        for i in 0..c.queries {
            let pos = c.ctx - c.queries + i;
            for h in 0..heads {
                let g = h / (heads / kv_heads);
                let ks: Vec<&[f32]> = (0..=pos)
                    .map(|j| &hk[(j * kv_heads + g) * d..][..d])
                    .collect();
                let vs: Vec<&[f32]> = (0..=pos)
                    .map(|j| &hv[(j * kv_heads + g) * d..][..d])
                    .collect();
                let want = reference_row(&q[(t * heads + h) * d..][..d], &ks, &vs);
                let got = &out[(t * heads + h) * d..][..d];
                for (w, g) in want.iter().zip(got) {
                    assert!(
                        (w - *g as f64).abs() <= tol * (1.0 + w.abs()),
                        "token {t} head {h}: want {w}, got {g} (block size {block_size}, {dtype:?})"
                    );
                }
            }
            t += 1;
        }
    }
}

fn mixed_batch() -> Vec<SeqShape> {
    vec![
        SeqShape { ctx: 1, queries: 1 }, // a one-token prompt
        SeqShape {
            ctx: 37,
            queries: 37,
        }, // a whole prompt
        SeqShape {
            ctx: 50,
            queries: 1,
        }, // decode
        SeqShape {
            ctx: 33,
            queries: 9,
        }, // a later prefill chunk
        SeqShape {
            ctx: 16,
            queries: 1,
        }, // decode at a block boundary
    ]
}

#[test]
fn matches_dense_reference_across_block_sizes() {
    for bs in [1, 3, 16, 32] {
        check(&mixed_batch(), bs, 6, 2, (DType::F32, DType::F32));
    }
}

#[test]
fn grouped_and_plain_heads() {
    check(&mixed_batch(), 16, 4, 4, (DType::F32, DType::F32));
    check(&mixed_batch(), 16, 8, 1, (DType::F32, DType::F32));
}

#[test]
fn half_precision_caches() {
    check(&mixed_batch(), 16, 6, 2, (DType::F16, DType::F16));
    check(&mixed_batch(), 8, 6, 3, (DType::BF16, DType::BF16));
    check(&mixed_batch(), 16, 6, 2, (DType::F32, DType::F16));
    check(&mixed_batch(), 32, 6, 2, (DType::F32, DType::BF16));
}

#[test]
fn long_prefill_spans_many_tiles() {
    // 150 queries: three tiles of one sequence (gemm path), and a 5-query tail chunk (direct).
    let cases = vec![
        SeqShape {
            ctx: 150,
            queries: 150,
        },
        SeqShape {
            ctx: 200,
            queries: 5,
        },
    ];
    check(&cases, 16, 6, 2, (DType::F32, DType::F32));
}

/// Decode queries over long contexts in a step of few of them: their contexts are cut into
/// parts over the threads and merged (`split`), with ragged blocks at both ends of a part,
/// beside a short decode query and a prefill chunk that are not.
#[test]
fn long_decode_contexts_split_over_the_threads() {
    let one = vec![SeqShape {
        ctx: 1500,
        queries: 1,
    }];
    check(&one, 16, 6, 2, (DType::F32, DType::F32));
    check(&one, 3, 4, 4, (DType::F32, DType::F16));
    // Blocks longer than a part: never more parts than blocks.
    check(&one, 512, 6, 2, (DType::F32, DType::F32));
    let few = vec![
        SeqShape {
            ctx: 700,
            queries: 1,
        },
        SeqShape { ctx: 9, queries: 1 },
        SeqShape {
            ctx: 530,
            queries: 10,
        },
    ];
    check(&few, 16, 6, 2, (DType::F32, DType::F32));
}

/// Prefill tiles with both products in bf16 on AMX (where this CPU runs its bf16 products
/// there): Q, K, the probabilities and V rounded to bf16 move each output by well under the
/// half-precision tolerance; unwritten (poisoned) slots would not.
#[test]
fn bf16_prefill_on_amx() {
    use crate::gemm::bf16::Bf16Kernel;
    if Bf16Kernel::chosen() != Bf16Kernel::Amx {
        return;
    }
    let mut cases = mixed_batch();
    cases.push(SeqShape {
        ctx: 150,
        queries: 150,
    });
    // Blocks of 16 and 32 keys are gathered 16 x 16 at a time (transposed in registers),
    // others key by key.
    for (bs, dtypes) in [
        (16, (DType::F32, DType::F16)),
        (32, (DType::F32, DType::BF16)),
        (3, (DType::F32, DType::F32)),
    ] {
        check_with(&cases, (bs, 6, 2), dtypes, (64, true));
    }
}

/// Prefill tiles in f32 over heads of 64 (whole panels): on AVX-512 CPUs the panel kernel
/// over operands gathered once per sequence, elsewhere the `gemm` crate's path; every block
/// size, a long prompt cut into several tiles, f32 and half caches.
#[test]
fn f32_prefill_with_whole_panels() {
    let mut cases = mixed_batch();
    cases.push(SeqShape {
        ctx: 150,
        queries: 150,
    });
    for (bs, dtypes) in [
        (16, (DType::F32, DType::F32)),
        (32, (DType::F32, DType::F16)),
        (3, (DType::F32, DType::BF16)),
    ] {
        check_with(&cases, (bs, 6, 2), dtypes, (64, false));
    }
    // Llama-3-8B's head size: four value panels.
    check_with(&cases, (16, 8, 2), (DType::F32, DType::F16), (128, false));
}

#[test]
fn layout_positions_and_validation() {
    let lay = BatchLayout::scattered(&mixed_batch(), 16, 20, 1, true);
    assert_eq!(lay.num_seqs(), 5);
    assert_eq!(lay.position(0), 0);
    assert_eq!(lay.position(1), 0); // first token of the 37-token prompt
    assert_eq!(lay.position(38), 49); // the decode token of the 50-token sequence
    lay.validate(20, 16).unwrap();
    assert!(lay.validate(3, 16).is_err());
    let mut bad = lay.clone();
    bad.context_lens[2] = 0;
    assert!(bad.validate(20, 16).is_err());
}

/// `write_kv` on the CPU: f32 views with tokens further apart than their values (the K and V
/// parts of a fused QKV output), into every cache type, few tokens (one task) and many (tasks
/// over the threads, each owning whole blocks): each slot's values are the inputs converted as
/// candle converts them, every other slot untouched.
#[test]
fn write_kv_converts_strided_rows_into_their_slots() {
    let (kv_heads, d, bs) = (3, 40, 16);
    let f8 = |x: f32| super::fp8::F8E4M3::from_bits(super::fp8::encode(x)).to_f32();
    let rounds: [(DType, &dyn Fn(f32) -> f32); 4] = [
        (DType::F32, &|x| x),
        (DType::F16, &|x| half::f16::from_f32(x).to_f32()),
        (DType::BF16, &|x| half::bf16::from_f32(x).to_f32()),
        (DType::F8E4M3, &f8),
    ];
    for (kv_dtype, round) in rounds {
        for seqs in [
            vec![
                SeqShape {
                    ctx: 300,
                    queries: 1,
                },
                SeqShape {
                    ctx: 37,
                    queries: 1,
                },
            ],
            vec![
                SeqShape { ctx: 5, queries: 1 },
                SeqShape {
                    ctx: 20,
                    queries: 1,
                },
            ],
        ] {
            let blocks = SeqShape::blocks(&seqs, bs) + 2;
            let spec = KvCacheSpec::one_layer(kv_heads, d, bs, kv_dtype);
            let cache = PagedKvCache::new(spec, blocks, &Device::Cpu).unwrap();
            cache.fill(100.0).unwrap();
            let lay = Arc::new(BatchLayout::scattered(&seqs, bs, blocks, 5, false));
            let tokens = lay.num_tokens();
            let mut rng = Rng64::new(tokens as u64);
            // Two query heads, then K, then V, per token.
            let fused = Tensor::from_vec(
                random(&mut rng, tokens * 8 * d),
                (tokens, 8, d),
                &Device::Cpu,
            )
            .unwrap();
            for (kind, c, first) in [
                (CacheKind::Keys, &cache.k[0], 2),
                (CacheKind::Values, &cache.v[0], 5),
            ] {
                let src = fused.narrow(1, first, kv_heads).unwrap();
                assert!(!src.is_contiguous());
                ops::write_kv(c, kind, &src, &lay, &StepMeta::default()).unwrap();
                let got: Vec<f32> = c
                    .to_dtype(DType::F32)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let values: Vec<f32> = src.flatten_all().unwrap().to_vec1().unwrap();
                let mut want = vec![round(100.0); got.len()];
                for (t, &slot) in lay.slot_mapping.iter().enumerate() {
                    let (blk, off) = (slot as usize / bs, slot as usize % bs);
                    for g in 0..kv_heads {
                        for i in 0..d {
                            let base = (blk * kv_heads + g) * d * bs;
                            let at = match kind {
                                CacheKind::Keys => base + i * bs + off,
                                CacheKind::Values => base + off * d + i,
                            };
                            want[at] = round(values[(t * kv_heads + g) * d + i]);
                        }
                    }
                }
                assert_eq!(got, want, "{kv_dtype:?} {kind:?}, {tokens} tokens");
            }
        }
    }
    // A slot past the cache is an error, not a write out of bounds.
    let spec = KvCacheSpec::one_layer(1, 16, 4, DType::F32);
    let cache = PagedKvCache::new(spec, 2, &Device::Cpu).unwrap();
    let lay = Arc::new(BatchLayout {
        slot_mapping: vec![8],
        ..Default::default()
    });
    let src = Tensor::zeros((1, 1, 16), DType::F32, &Device::Cpu).unwrap();
    let err = ops::write_kv(
        &cache.k[0],
        CacheKind::Keys,
        &src,
        &lay,
        &StepMeta::default(),
    );
    assert!(err.is_err());
}

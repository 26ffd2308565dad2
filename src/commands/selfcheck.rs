//! `offline-bench self-check`: before any timing on a GPU, every CUDA kernel against its CPU
//! counterpart on fresh random inputs (outputs poisoned with NaN, so an element a kernel fails
//! to write fails the check), then the engine's greedy tokens on the GPU against the CPU
//! engine's, with the same (seeded) weights. Ends with a table; fails if any check fails.

use std::sync::Arc;

use anyhow::{Result, bail};
use candle_core::{DType, Device, Tensor};

use super::dtype_name;
use crate::attention::plan::DecodeKernel;
use crate::attention::{BatchLayout, KvCacheSpec, PagedAttention, PagedKvCache, SeqShape};
use crate::cli::SelfCheckArgs;
use crate::engine::sampler::SamplingParams;
use crate::engine::{Engine, EngineConfig};
use crate::model::config::ModelConfig;
use crate::model::llama::Llama;
use crate::model::weights::DummyWeights;
use crate::util::Rng64;
use crate::workload::Request;

/// One line of the result table.
struct Check {
    name: String,
    detail: String,
    error: f64,
    tolerance: f64,
}

impl Check {
    fn passed(&self) -> bool {
        self.error <= self.tolerance
    }
}

/// Largest `|a - b| / (1 + |b|)`; NaN on either side (an unwritten or poisoned element) is
/// infinitely wrong, unless both sides are NaN at the same place (`nan_matches`).
fn max_rel_error(a: &[f32], b: &[f32], nan_matches: bool) -> f64 {
    if a.len() != b.len() {
        return f64::INFINITY;
    }
    a.iter()
        .zip(b)
        .map(|(&x, &y)| match (x.is_nan(), y.is_nan()) {
            (true, true) if nan_matches => 0.0,
            (false, false) => ((x - y).abs() / (1.0 + y.abs())) as f64,
            _ => f64::INFINITY,
        })
        .fold(0.0, f64::max)
}

/// Differences of one ulp or two of the element type are expected (the CPU rounds its f32
/// result once, the GPU too, from sums taken in different orders).
fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 1e-4,
        DType::F16 => 3e-3,
        _ => 2e-2,
    }
}

fn host(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

/// Attention geometry of a check: (heads, KV heads, head dim).
const GEOMETRIES: [(usize, usize, usize); 2] = [(32, 8, 128), (9, 3, 64)];

/// Writes a history with one step, then runs a second step, on the CPU and on `gpu`; compares
/// both steps' outputs and the caches.
fn check_attention(
    gpu: &Device,
    dtype: DType,
    block_size: usize,
    (heads, kv_heads, d): (usize, usize, usize),
    (label, seqs, decode_kernel): (&str, &[SeqShape], DecodeKernel),
    out: &mut Vec<Check>,
) -> Result<()> {
    let num_blocks = SeqShape::blocks(seqs, block_size) + 3;
    let spec = KvCacheSpec::one_layer(kv_heads, d, block_size, dtype);
    let caches = [
        PagedKvCache::new(spec, num_blocks, &Device::Cpu)?,
        PagedKvCache::new(spec, num_blocks, gpu)?,
    ];
    for c in &caches {
        c.fill(f32::NAN)?;
    }
    let seed = (block_size * 1000 + heads * 10 + dtype.size_in_bytes()) as u64;
    let mut rng = Rng64::new(seed);
    let history: usize = seqs.iter().map(|s| s.ctx).sum();
    let k = rng.uniform_f32(history * kv_heads * d, 1.0);
    let v = rng.uniform_f32(history * kv_heads * d, 1.0);
    let full = Arc::new(BatchLayout::scattered(
        seqs, block_size, num_blocks, seed, false,
    ));
    let step = Arc::new(BatchLayout::scattered(
        seqs, block_size, num_blocks, seed, true,
    ));
    // The step's K/V rows: each sequence's last `queries` rows of its history.
    let mut rows = Vec::new();
    let mut at = 0;
    for s in seqs {
        rows.extend((at + s.ctx - s.queries)..(at + s.ctx));
        at += s.ctx;
    }
    let pick = |src: &[f32]| -> Vec<f32> {
        rows.iter()
            .flat_map(|&r| src[r * kv_heads * d..][..kv_heads * d].iter().copied())
            .collect()
    };
    let (k_step, v_step) = (pick(&k), pick(&v));
    let q_full = rng.uniform_f32(history * heads * d, 1.0);
    let q_step = rng.uniform_f32(rows.len() * heads * d, 1.0);
    let mut results: Vec<[Vec<f32>; 2]> = Vec::new();
    for (cache, dev) in caches.iter().zip([&Device::Cpu, gpu]) {
        let tensor = |v: &[f32], n: usize, h: usize| -> Result<Tensor> {
            Ok(Tensor::from_slice(v, (n, h, d), dev)?.to_dtype(dtype)?)
        };
        let attn = PagedAttention::with_decode_kernel(cache, full.clone(), heads, decode_kernel)?;
        let o1 = attn.forward(
            0,
            &tensor(&q_full, history, heads)?,
            &tensor(&k, history, kv_heads)?,
            &tensor(&v, history, kv_heads)?,
        )?;
        let n = rows.len();
        let attn = PagedAttention::with_decode_kernel(cache, step.clone(), heads, decode_kernel)?;
        let o2 = attn.forward(
            0,
            &tensor(&q_step, n, heads)?,
            &tensor(&k_step, n, kv_heads)?,
            &tensor(&v_step, n, kv_heads)?,
        )?;
        results.push([host(&o1)?, host(&o2)?]);
    }
    let detail = format!(
        "{label}, {}, block {block_size}, {heads}/{kv_heads} heads x {d}",
        dtype_name(dtype)
    );
    let tol = tolerance(dtype);
    out.push(Check {
        name: "attention (prefill)".into(),
        detail: detail.clone(),
        error: max_rel_error(&results[1][0], &results[0][0], false),
        tolerance: tol,
    });
    out.push(Check {
        name: "attention (step)".into(),
        detail: detail.clone(),
        error: max_rel_error(&results[1][1], &results[0][1], false),
        tolerance: tol,
    });
    let (kc, vc) = caches[0].to_host(0)?;
    let (kg, vg) = caches[1].to_host(0)?;
    out.push(Check {
        name: "write_kv".into(),
        detail,
        error: max_rel_error(&kg, &kc, true).max(max_rel_error(&vg, &vc, true)),
        tolerance: 0.0,
    });
    Ok(())
}

fn check_silu_mul(gpu: &Device, dtype: DType, out: &mut Vec<Check>) -> Result<()> {
    let x = Tensor::from_vec(
        Rng64::new(3).uniform_f32(37 * 3072, 6.0),
        (37, 3072),
        &Device::Cpu,
    )?
    .to_dtype(dtype)?;
    let cpu = host(&crate::model::ops::silu_mul(&x)?)?;
    let gpu_out = host(&crate::model::ops::silu_mul(&x.to_device(gpu)?)?)?;
    out.push(Check {
        name: "silu_mul".into(),
        detail: format!("37 x 3072, {}", dtype_name(dtype)),
        error: max_rel_error(&gpu_out, &cpu, false),
        tolerance: tolerance(dtype),
    });
    Ok(())
}

fn check_add_rms_norm(gpu: &Device, dtype: DType, out: &mut Vec<Check>) -> Result<()> {
    let (rows, n) = (37, 4096);
    let mut rng = Rng64::new(5);
    let mut input = |shape: &[usize], scale: f32, offset: f32| -> Result<Tensor> {
        let len = shape.iter().product();
        let v: Vec<f32> = rng
            .uniform_f32(len, scale)
            .iter()
            .map(|x| x + offset)
            .collect();
        Ok(Tensor::from_vec(v, shape, &Device::Cpu)?.to_dtype(dtype)?)
    };
    let (x, delta, w) = (
        input(&[rows, n], 4.0, 0.0)?,
        input(&[rows, n], 1.0, 0.0)?,
        input(&[n], 0.2, 1.0)?,
    );
    let (cpu_sum, cpu_norm) = crate::model::norm::add_rms_norm(&x, &delta, &w, 1e-5)?;
    let on_gpu = |t: &Tensor| t.to_device(gpu);
    let (gpu_sum, gpu_norm) =
        crate::model::norm::add_rms_norm(&on_gpu(&x)?, &on_gpu(&delta)?, &on_gpu(&w)?, 1e-5)?;
    for (what, got, want) in [("sum", &gpu_sum, &cpu_sum), ("norm", &gpu_norm, &cpu_norm)] {
        out.push(Check {
            name: "add_rms_norm".into(),
            detail: format!("{rows} x {n}, {}, {what}", dtype_name(dtype)),
            error: max_rel_error(&host(got)?, &host(want)?, false),
            tolerance: tolerance(dtype),
        });
    }
    Ok(())
}

/// The sampling kernel against the CPU's draw on the same logits and uniforms: the error is how
/// far, as a share of the kept mass, the GPU's token lies from where the CPU's walk puts `u`
/// (0 when the two agree; infinite for a token that top-k or top-p should have dropped).
fn check_sampling(gpu: &Device, out: &mut Vec<Check>) -> Result<()> {
    use crate::engine::sampler::{SampleRows, rows::draw_error, uniform};
    let (rows, vocab) = (48, 128_256);
    let mut rng = Rng64::new(9);
    let logits = Tensor::from_vec(
        rng.uniform_f32(rows * vocab, 12.0),
        (rows, vocab),
        &Device::Cpu,
    )?;
    let uniforms: Vec<f32> = (0..rows).map(|r| uniform(0, r, 0)).collect();
    let u = Tensor::from_slice(&uniforms, rows, &Device::Cpu)?;
    let host_rows = logits.to_vec2::<f32>()?;
    for (temperature, top_p, top_k) in [
        (1.0, 1.0, 0),
        (0.8, 0.9, 0),
        (1.0, 1.0, 40),
        (0.6, 0.95, 50),
    ] {
        let p = SamplingParams {
            temperature,
            top_p,
            top_k,
            seed: 0,
        };
        let ids = logits
            .to_device(gpu)?
            .apply_op2_no_bwd(&u.to_device(gpu)?, &SampleRows(p))?
            .to_vec1::<u32>()?;
        let error = host_rows
            .iter()
            .zip(&uniforms)
            .zip(&ids)
            .map(|((row, &u), &id)| draw_error(row, &p, u, id))
            .fold(0.0, f64::max);
        out.push(Check {
            name: "sample_rows".into(),
            detail: format!("{rows} x {vocab}, {}", p.describe()),
            error,
            tolerance: 1e-4,
        });
    }
    Ok(())
}

/// SmolLM2's shapes with seeded random weights, on `device` in `dtype`.
fn seeded_model(device: &Device, dtype: DType) -> Result<Llama> {
    let cfg = ModelConfig::preset("smollm2-135m")
        .ok_or_else(|| anyhow::anyhow!("the smollm2-135m preset is missing"))??;
    let mut w = DummyWeights::seeded(7, dtype, device);
    Llama::load(&cfg, &mut w, 1024, dtype, device, |_| {})
}

/// Greedy tokens of eight prompts of mixed lengths, 32 tokens each.
fn engine_tokens(
    model: Llama,
    kv_dtype: DType,
    (num_blocks, batched): (usize, usize),
) -> Result<(Vec<Vec<u32>>, usize)> {
    let mut rng = Rng64::new(11);
    let requests: Vec<Request> = [3usize, 17, 40, 100, 150, 260, 7, 64]
        .iter()
        .map(|&len| Request {
            prompt_ids: (0..len)
                .map(|_| rng.range_inclusive(0, 49_000) as u32)
                .collect(),
            max_tokens: 32,
        })
        .collect();
    let mut engine = Engine::new(
        model,
        EngineConfig {
            block_size: 16,
            max_num_seqs: 256,
            max_num_batched_tokens: batched,
            max_model_len: 1024,
            num_blocks,
            kv_cache_dtype: kv_dtype,
        },
        SamplingParams::greedy(),
    )?;
    let out = engine.run(&requests, |_| {})?;
    Ok((
        out.outputs.into_iter().map(|o| o.output_ids).collect(),
        out.stats.preemptions,
    ))
}

fn mismatches(a: &[Vec<u32>], b: &[Vec<u32>]) -> usize {
    a.iter()
        .zip(b)
        .map(|(x, y)| x.iter().zip(y).filter(|(p, q)| p != q).count())
        .sum()
}

fn check_engine(gpu: &Device, out: &mut Vec<Check>) -> Result<()> {
    let cpu_model = seeded_model(&Device::Cpu, DType::F32)?;
    let (want, _) = engine_tokens(cpu_model, DType::F32, (512, 8192))?;
    let gpu_model = seeded_model(gpu, DType::F32)?;
    for (label, blocks, batched) in [
        ("one batch", 512, 8192),
        ("chunked prefill (24 tokens/step)", 512, 24),
        ("preemption (40 blocks)", 40, 8192),
    ] {
        let (got, preempted) = engine_tokens(gpu_model.clone(), DType::F32, (blocks, batched))?;
        out.push(Check {
            name: "engine greedy tokens".into(),
            detail: format!("f32, {label}, {preempted} preemptions, vs CPU engine"),
            error: mismatches(&got, &want) as f64,
            tolerance: 0.0,
        });
    }
    // bf16 rounds differently from the f32 CPU engine: reported, not required to match.
    let (got, _) = engine_tokens(seeded_model(gpu, DType::BF16)?, DType::BF16, (512, 8192))?;
    let total: usize = want.iter().map(Vec::len).sum();
    println!(
        "bf16 engine: {} of {total} greedy tokens equal the f32 CPU engine's (informational)",
        total - mismatches(&got, &want)
    );
    Ok(())
}

pub fn run(args: &SelfCheckArgs) -> Result<()> {
    let gpu = args.device.open()?;
    if gpu.is_cpu() {
        bail!("self-check compares the CUDA kernels with the CPU ones: pass --device cuda[:N]");
    }
    #[cfg(feature = "cuda")]
    {
        crate::gpu::set_poison(true);
        if let Device::Cuda(dev) = &gpu {
            println!("device: {}", crate::gpu::describe(dev));
        }
    }
    let mixed = [
        SeqShape { ctx: 1, queries: 1 },
        SeqShape {
            ctx: 37,
            queries: 37,
        },
        SeqShape {
            ctx: 530,
            queries: 1,
        },
        SeqShape {
            ctx: 75,
            queries: 9,
        },
        SeqShape {
            ctx: 16,
            queries: 1,
        },
        SeqShape {
            ctx: 300,
            queries: 40,
        },
    ];
    let long_decodes = [
        SeqShape {
            ctx: 3000,
            queries: 1,
        },
        SeqShape {
            ctx: 1500,
            queries: 1,
        },
    ];
    let mut checks = Vec::new();
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        for block_size in [16, 32] {
            for geometry in GEOMETRIES {
                // Both decode kernels on both kinds of batch: split-K also on short contexts
                // (one partition), tiles also on long ones.
                for case in [
                    ("mixed batch", &mixed[..], DecodeKernel::Auto),
                    ("mixed, split-K forced", &mixed[..], DecodeKernel::Split),
                    (
                        "long decodes (split-K)",
                        &long_decodes[..],
                        DecodeKernel::Split,
                    ),
                    (
                        "long decodes, tiles forced",
                        &long_decodes[..],
                        DecodeKernel::Tiles,
                    ),
                ] {
                    check_attention(&gpu, dtype, block_size, geometry, case, &mut checks)?;
                }
            }
        }
        check_silu_mul(&gpu, dtype, &mut checks)?;
        check_add_rms_norm(&gpu, dtype, &mut checks)?;
    }
    check_sampling(&gpu, &mut checks)?;
    if !args.kernels_only {
        check_engine(&gpu, &mut checks)?;
    }
    #[cfg(feature = "cuda")]
    crate::gpu::set_poison(false);

    println!(
        "{:<22} {:<58} {:>10} {:>9}  result",
        "check", "case", "error", "tolerance"
    );
    for c in &checks {
        println!(
            "{:<22} {:<58} {:>10.2e} {:>9.0e}  {}",
            c.name,
            c.detail,
            c.error,
            c.tolerance,
            if c.passed() { "ok" } else { "FAILED" }
        );
    }
    let failed = checks.iter().filter(|c| !c.passed()).count();
    if failed > 0 {
        bail!("{failed} of {} self-checks failed", checks.len());
    }
    println!("all {} self-checks passed", checks.len());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_count_nan_as_failure_unless_both_sides_agree() {
        assert_eq!(max_rel_error(&[1.0, 2.0], &[1.0, 2.0], false), 0.0);
        assert!(max_rel_error(&[f32::NAN], &[1.0], true).is_infinite());
        assert!(max_rel_error(&[f32::NAN], &[f32::NAN], false).is_infinite());
        assert_eq!(max_rel_error(&[f32::NAN], &[f32::NAN], true), 0.0);
        assert!(max_rel_error(&[1.0], &[1.0, 2.0], false).is_infinite());
        assert!((max_rel_error(&[1.5], &[1.0], false) - 0.25).abs() < 1e-12);
    }

    // The harness itself, with the CPU standing in for the GPU: every comparison must pass
    // (a failure here is a bug in the check, not in a kernel).
    #[test]
    fn attention_check_passes_cpu_against_cpu() {
        let mut checks = Vec::new();
        let seqs = [
            SeqShape {
                ctx: 20,
                queries: 20,
            },
            SeqShape {
                ctx: 40,
                queries: 1,
            },
        ];
        check_attention(
            &Device::Cpu,
            DType::F32,
            16,
            (4, 2, 32),
            ("small", &seqs, DecodeKernel::Auto),
            &mut checks,
        )
        .unwrap();
        check_silu_mul(&Device::Cpu, DType::BF16, &mut checks).unwrap();
        check_add_rms_norm(&Device::Cpu, DType::F16, &mut checks).unwrap();
        check_sampling(&Device::Cpu, &mut checks).unwrap();
        assert_eq!(checks.len(), 10);
        assert!(checks.iter().all(Check::passed));
    }
}

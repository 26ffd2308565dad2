//! `offline-bench self-check`: before any timing on a GPU, every CUDA kernel against its CPU
//! counterpart on fresh random inputs (outputs poisoned with NaN, so an element a kernel fails
//! to write fails the check), then the engine's greedy tokens on the GPU against the CPU
//! engine's, with the same (seeded) weights. Ends with a table; fails if any check fails.
//! The kernel checks (`kernels`) take any `kernels::Target`; the tests run them on the CPU
//! emulator of the CUDA kernels too (`simt`, feature `simt`).

mod kernels;
#[cfg(all(test, feature = "simt"))]
mod simt;

use anyhow::{Result, bail};
use candle_core::{DType, Device};

use super::dtype_name;
use crate::attention::SeqShape;
use crate::attention::plan::DecodeKernel;
use crate::cli::SelfCheckArgs;
use crate::engine::sampler::SamplingParams;
use crate::engine::{Engine, EngineConfig};
use crate::model::Quantization;
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

/// The attention checks' batches, `(context, queries)` per sequence: a mixed batch (a first
/// decode, a whole prompt, a decode over a partition boundary, chunks over earlier context, a
/// decode of a full block, a long chunk), and long decodes for split-K.
const MIXED: [(usize, usize); 6] = [(1, 1), (37, 37), (530, 1), (75, 9), (16, 1), (300, 40)];
const LONG_DECODES: [(usize, usize); 2] = [(3000, 1), (1500, 1)];

fn seqs(v: &[(usize, usize)]) -> Vec<SeqShape> {
    v.iter()
        .map(|&(ctx, queries)| SeqShape { ctx, queries })
        .collect()
}

/// Attention geometries of the GPU checks: Llama-3-8B's and SmolLM2's.
const GEOMETRIES: [kernels::Geometry; 2] = [(32, 8, 128), (9, 3, 64)];

/// SmolLM2's shapes with seeded random weights, on `device` in `dtype`.
fn seeded_model(device: &Device, dtype: DType) -> Result<Llama> {
    let cfg = ModelConfig::preset("smollm2-135m")
        .ok_or_else(|| anyhow::anyhow!("the smollm2-135m preset is missing"))??;
    let mut w = DummyWeights::seeded(7, dtype, device);
    Llama::load(
        &cfg,
        &mut w,
        1024,
        (dtype, Quantization::None),
        device,
        |_| {},
    )
}

/// Ten prompts of mixed lengths: eight random, then two that share a prefix with earlier ones
/// (one diverges after 100 tokens, one is an exact copy), so prefix caching has blocks to find.
fn engine_requests() -> Vec<Request> {
    let mut rng = Rng64::new(11);
    let mut prompts: Vec<Vec<u32>> = [3usize, 17, 40, 100, 150, 260, 7, 64]
        .iter()
        .map(|&len| {
            (0..len)
                .map(|_| rng.range_inclusive(0, 49_000) as u32)
                .collect()
        })
        .collect();
    let mut diverging = prompts[4][..100].to_vec();
    diverging.extend((0..30).map(|_| rng.range_inclusive(0, 49_000) as u32));
    prompts.push(diverging);
    prompts.push(prompts[7].clone());
    prompts
        .into_iter()
        .map(|prompt_ids| Request {
            prompt_ids,
            max_tokens: 32,
        })
        .collect()
}

/// What one engine run of the check gave.
struct EngineRun {
    tokens: Vec<Vec<u32>>,
    preemptions: usize,
    prefix_hits: usize,
}

/// Greedy tokens of [`engine_requests`], 32 each.
fn engine_tokens(
    model: Llama,
    kv_dtype: DType,
    (num_blocks, batched): (usize, usize),
    enable_prefix_caching: bool,
) -> Result<EngineRun> {
    let mut engine = Engine::new(
        model,
        EngineConfig {
            block_size: 16,
            max_num_seqs: 256,
            max_num_batched_tokens: batched,
            max_model_len: 1024,
            num_blocks,
            kv_cache_dtype: kv_dtype,
            enable_prefix_caching,
        },
        SamplingParams::greedy(),
    )?;
    let out = engine.run(&engine_requests(), |_| {})?;
    Ok(EngineRun {
        tokens: out.outputs.into_iter().map(|o| o.output_ids).collect(),
        preemptions: out.stats.preemptions,
        prefix_hits: out.stats.prefix_cache.hits,
    })
}

fn mismatches(a: &[Vec<u32>], b: &[Vec<u32>]) -> usize {
    a.iter()
        .zip(b)
        .map(|(x, y)| x.iter().zip(y).filter(|(p, q)| p != q).count())
        .sum()
}

/// The engine's configurations in the check: (label, blocks, token budget, prefix caching).
const ENGINE_CASES: [(&str, usize, usize, bool); 4] = [
    ("one batch", 512, 8192, false),
    ("one batch, prefix cache", 512, 8192, true),
    ("chunked prefill (24 tok/step)", 512, 24, true),
    ("preemption (40 blocks)", 40, 8192, true),
];

/// The f32 engine on `device` against the CPU engine, in every [`ENGINE_CASES`] configuration;
/// returns the runs (in that order) and the CPU's tokens.
fn check_engine_f32(
    device: &Device,
    out: &mut Vec<Check>,
) -> Result<(Vec<EngineRun>, Vec<Vec<u32>>)> {
    let cpu_model = seeded_model(&Device::Cpu, DType::F32)?;
    let want = engine_tokens(cpu_model, DType::F32, (512, 8192), false)?.tokens;
    let model = seeded_model(device, DType::F32)?;
    let mut runs = Vec::new();
    for (label, blocks, batched, prefix_caching) in ENGINE_CASES {
        let run = engine_tokens(model.clone(), DType::F32, (blocks, batched), prefix_caching)?;
        out.push(Check {
            name: "engine greedy tokens".into(),
            detail: format!(
                "f32, {label}: {} preempted, {} hits",
                run.preemptions, run.prefix_hits
            ),
            error: mismatches(&run.tokens, &want) as f64,
            tolerance: 0.0,
        });
        runs.push(run);
    }
    Ok((runs, want))
}

fn check_engine(gpu: &Device, out: &mut Vec<Check>) -> Result<()> {
    let (_, want) = check_engine_f32(gpu, out)?;
    // bf16 (and an fp8 cache) round differently from the f32 CPU engine: reported, not
    // required to match.
    let total: usize = want.iter().map(Vec::len).sum();
    for kv_dtype in [DType::BF16, DType::F8E4M3] {
        let model = seeded_model(gpu, DType::BF16)?;
        let got = engine_tokens(model, kv_dtype, (512, 8192), true)?;
        println!(
            "bf16 engine, {} cache: {} of {total} greedy tokens equal the f32 CPU engine's (informational)",
            dtype_name(kv_dtype),
            total - mismatches(&got.tokens, &want)
        );
    }
    Ok(())
}

/// The attention checks of `dtype` queries over a `kv_dtype` cache, on both block sizes and
/// both geometries.
fn check_attention(
    gpu: &Device,
    (dtype, kv_dtype): (DType, DType),
    out: &mut Vec<Check>,
) -> Result<()> {
    let (mixed, long_decodes) = (seqs(&MIXED), seqs(&LONG_DECODES));
    for block_size in [16, 32] {
        for geometry in GEOMETRIES {
            // Both decode kernels on both kinds of batch: split-K also on short contexts (one
            // partition), tiles also on long ones; one CPU reference for both.
            for (seqs, kernels) in [
                (
                    &mixed[..],
                    [
                        ("mixed batch", DecodeKernel::Auto),
                        ("mixed, split-K forced", DecodeKernel::Split),
                    ],
                ),
                (
                    &long_decodes[..],
                    [
                        ("long decodes (split-K)", DecodeKernel::Split),
                        ("long decodes, tiles forced", DecodeKernel::Tiles),
                    ],
                ),
            ] {
                let case = kernels::attention_case(dtype, block_size, geometry, seqs)
                    .with_kv_dtype(kv_dtype);
                kernels::check_attention_kernels(gpu, case, &kernels, out)?;
            }
        }
    }
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
    let mut checks = Vec::new();
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        check_attention(&gpu, (dtype, dtype), &mut checks)?;
        kernels::check_silu_mul(&gpu, dtype, (37, 1536), &mut checks)?;
        kernels::check_add_rms_norm(&gpu, dtype, (37, 4096), &mut checks)?;
    }
    // The fp8 cache under f32 queries (tight tolerance) and bf16 ones (CUDA's default).
    for dtype in [DType::F32, DType::BF16] {
        check_attention(&gpu, (dtype, DType::F8E4M3), &mut checks)?;
    }
    kernels::check_sampling(&gpu, (48, 128_256), &mut checks)?;
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
        let case = kernels::attention_case(DType::F32, 16, (4, 2, 32), &seqs);
        let small = [("small", DecodeKernel::Auto)];
        kernels::check_attention_kernels(&Device::Cpu, case, &small, &mut checks).unwrap();
        kernels::check_silu_mul(&Device::Cpu, DType::BF16, (37, 1536), &mut checks).unwrap();
        kernels::check_add_rms_norm(&Device::Cpu, DType::F16, (37, 4096), &mut checks).unwrap();
        kernels::check_sampling(&Device::Cpu, (48, 128_256), &mut checks).unwrap();
        assert_eq!(checks.len(), 10);
        assert!(checks.iter().all(Check::passed));
    }

    // The engine comparison with the CPU standing in for the GPU: every case must match, and
    // the cases must do what their labels say.
    #[test]
    fn engine_check_passes_cpu_against_cpu() {
        let mut checks = Vec::new();
        let (runs, _) = check_engine_f32(&Device::Cpu, &mut checks).unwrap();
        assert!(checks.iter().all(Check::passed));
        assert_eq!(runs[0].prefix_hits, 0);
        assert!(
            runs[1].prefix_hits >= 100,
            "the shared prompts were not found"
        );
        assert!(runs[3].preemptions > 0, "the small cache did not preempt");
    }
}

//! The self-check's kernel checks with the CUDA kernels on the CPU emulator (`simt` feature):
//! the exact launches the GPU would run (`attention::launch` and the model's and sampler's
//! launch descriptions), against the CPU kernels, in both emulator schedules. Smaller cases
//! than on the GPU (every GPU thread is a fiber here), the same shapes of work: prefill tiles,
//! mixed batches, split-K with several partitions, grouped heads, every dtype, fp8 caches.

use anyhow::Result;
use candle_core::{DType, Device, Tensor};

use super::kernels::{self, AttentionCase, AttentionOut, Target};
use super::{Check, GEOMETRIES, MIXED, seqs};
use crate::attention::launch::{self as attn, Buf};
use crate::attention::plan::{self, DecodeKernel};
use crate::attention::{CacheKind, fp8};
use crate::engine::sampler::{SampleBuf, SamplingParams, sample_launch};
use crate::launch::suffix;
use crate::model::norm::{AddRmsNormBuf, add_rms_norm_launch};
use crate::model::ops::{SiluMulBuf, silu_mul_launch};
use crate::simt::{Memory, Schedule};

/// Multiprocessors of the GPU the plans are made for (an H100 SXM's), which the split-K
/// choice depends on.
const SM_COUNT: usize = 132;

/// The emulator, in one schedule.
struct Simt(Schedule);

/// `v` as the bytes of `dtype` elements (rounded to nearest even, as candle converts; fp8
/// saturated as the engine's cache encodes).
fn encode(dtype: DType, v: &[f32]) -> Vec<u8> {
    match dtype {
        DType::F16 => {
            let h: Vec<half::f16> = v.iter().map(|&x| half::f16::from_f32(x)).collect();
            bytemuck::cast_slice(&h).to_vec()
        }
        DType::BF16 => {
            let h: Vec<half::bf16> = v.iter().map(|&x| half::bf16::from_f32(x)).collect();
            bytemuck::cast_slice(&h).to_vec()
        }
        DType::F8E4M3 => v.iter().map(|&x| fp8::encode(x)).collect(),
        _ => bytemuck::cast_slice(v).to_vec(),
    }
}

fn decode(dtype: DType, b: &[u8]) -> Vec<f32> {
    match dtype {
        DType::F16 => bytemuck::pod_collect_to_vec::<u8, half::f16>(b)
            .iter()
            .map(|x| x.to_f32())
            .collect(),
        DType::BF16 => bytemuck::pod_collect_to_vec::<u8, half::bf16>(b)
            .iter()
            .map(|x| x.to_f32())
            .collect(),
        DType::F8E4M3 => b.iter().map(|&x| fp8::decode(x)).collect(),
        _ => bytemuck::pod_collect_to_vec(b),
    }
}

impl Target for Simt {
    fn attention(&self, c: &AttentionCase) -> Result<AttentionOut> {
        let dt = c.dtype;
        let dts = attn::Dtypes {
            io: dt,
            cache: c.kv_dtype,
        };
        let cache_len = c.num_blocks * c.kv_heads * c.head_dim * c.block_size;
        let mut kc = encode(c.kv_dtype, &vec![f32::NAN; cache_len]);
        let mut vc = kc.clone();
        let mut outputs: [Vec<f32>; 2] = Default::default();
        for (step, out) in c.steps.iter().zip(&mut outputs) {
            let lay = &*step.layout;
            let g = attn::Geometry {
                heads: c.heads,
                kv_heads: c.kv_heads,
                head_dim: c.head_dim,
                block_size: c.block_size,
                max_blocks: lay.max_blocks.max(1),
            };
            let tokens = lay.num_tokens();
            for (kind, src, cache) in [
                (CacheKind::Keys, &step.k, &mut kc),
                (CacheKind::Values, &step.v, &mut vc),
            ] {
                let mut m = Memory::default();
                m.input(Buf::Src, &encode(dt, src));
                m.input(Buf::Slots, &lay.slot_mapping);
                m.output(Buf::Cache, cache);
                m.run(&attn::write_kv(kind, dts, tokens, &g)?, self.0)?;
                *cache = m.read(Buf::Cache)?;
            }
            let p = plan::plan_with(
                lay,
                c.heads / c.kv_heads,
                c.kv_heads,
                SM_COUNT,
                c.decode_kernel,
            );
            let scale = 1.0 / (c.head_dim as f32).sqrt();
            let rows = attn::partial_rows(&p, c.heads);
            let mut m = Memory::default();
            m.input(Buf::Q, &encode(dt, &step.q));
            m.input(Buf::KCache, &kc);
            m.input(Buf::VCache, &vc);
            m.output(
                Buf::Out,
                &encode(dt, &vec![f32::NAN; tokens * c.heads * c.head_dim]),
            );
            m.input(Buf::Tiles, &p.flat_tiles());
            m.input(Buf::SplitTokens, &p.split_tokens);
            m.input(Buf::QueryStart, &lay.query_start);
            m.input(Buf::ContextLens, &lay.context_lens);
            m.input(Buf::BlockTables, &lay.block_tables);
            m.input(Buf::TokenSeq, &lay.token_seq);
            m.output(Buf::PartAcc, &vec![0f32; rows * c.head_dim]);
            m.output(Buf::PartM, &vec![0f32; rows]);
            m.output(Buf::PartL, &vec![0f32; rows]);
            for l in attn::attend(&p, dts, &g, scale)? {
                m.run(&l, self.0)?;
            }
            *out = decode(dt, &m.read::<u8>(Buf::Out)?);
        }
        Ok(AttentionOut {
            outputs,
            caches: (decode(c.kv_dtype, &kc), decode(c.kv_dtype, &vc)),
        })
    }

    fn silu_mul(&self, x: &Tensor) -> Result<Tensor> {
        let (rows, cols) = x.dims2()?;
        let n = cols / 2;
        let dt = x.dtype();
        let mut m = Memory::default();
        m.input(SiluMulBuf::X, &encode(dt, &kernels::host(x)?));
        m.output(SiluMulBuf::Out, &encode(dt, &vec![f32::NAN; rows * n]));
        m.run(&silu_mul_launch(suffix(dt)?, rows, n), self.0)?;
        let out = decode(dt, &m.read::<u8>(SiluMulBuf::Out)?);
        Ok(Tensor::from_vec(out, (rows, n), &Device::Cpu)?.to_dtype(dt)?)
    }

    fn add_rms_norm(
        &self,
        x: &Tensor,
        d: &Tensor,
        w: &Tensor,
        eps: f32,
    ) -> Result<(Tensor, Tensor)> {
        let (rows, n) = x.dims2()?;
        let dt = x.dtype();
        let mut m = Memory::default();
        m.input(AddRmsNormBuf::X, &encode(dt, &kernels::host(x)?));
        m.input(AddRmsNormBuf::Delta, &encode(dt, &kernels::host(d)?));
        m.input(AddRmsNormBuf::Weight, &encode(dt, &kernels::host(w)?));
        m.output(
            AddRmsNormBuf::Out,
            &encode(dt, &vec![f32::NAN; 2 * rows * n]),
        );
        m.run(&add_rms_norm_launch(suffix(dt)?, rows, n, eps), self.0)?;
        let out = decode(dt, &m.read::<u8>(AddRmsNormBuf::Out)?);
        let both = Tensor::from_vec(out, (2, rows, n), &Device::Cpu)?.to_dtype(dt)?;
        Ok((both.get(0)?, both.get(1)?))
    }

    fn sample(&self, logits: &Tensor, uniforms: &Tensor, p: SamplingParams) -> Result<Vec<u32>> {
        let (rows, vocab) = logits.dims2()?;
        let mut m = Memory::default();
        m.input(SampleBuf::Logits, &kernels::host(logits)?);
        m.input(SampleBuf::Uniforms, &kernels::host(uniforms)?);
        m.output(SampleBuf::Ids, &vec![u32::MAX; rows]);
        m.run(&sample_launch(&p, rows, vocab), self.0)?;
        m.read(SampleBuf::Ids)
    }
}

/// The attention checks of `case` on the emulator in `schedule`, once per decode kernel.
fn check_attention(
    schedule: Schedule,
    case: AttentionCase,
    variants: &[(&str, DecodeKernel)],
    checks: &mut Vec<Check>,
) {
    let labels: Vec<String> = variants
        .iter()
        .map(|(label, kernel)| format!("{label}, {kernel:?}, {schedule:?}"))
        .collect();
    let variants: Vec<(&str, DecodeKernel)> = labels
        .iter()
        .zip(variants)
        .map(|(label, v)| (label.as_str(), v.1))
        .collect();
    kernels::check_attention_kernels(&Simt(schedule), case, &variants, checks).unwrap();
}

/// Fails with the table of every check that failed.
fn assert_passed(checks: &[Check]) {
    let failed: Vec<String> = checks
        .iter()
        .filter(|c| !c.passed())
        .map(|c| {
            format!(
                "{} [{}]: error {:.3e} > {:.0e}",
                c.name, c.detail, c.error, c.tolerance
            )
        })
        .collect();
    assert!(
        failed.is_empty(),
        "{} failed:\n{}",
        failed.len(),
        failed.join("\n")
    );
    assert!(!checks.is_empty());
}

#[test]
fn attention_kernels_match_the_cpu_on_mixed_batches() {
    // A decode of one token, a whole prefill over several tiles, a decode over several blocks,
    // prefill chunks over earlier context, a full block. (Several split-K partitions: the long
    // decodes below; the emulator's time grows with the square of the contexts.)
    let mixed = seqs(&[(1, 1), (37, 37), (130, 1), (75, 9), (16, 1), (70, 40)]);
    let mut checks = Vec::new();
    for schedule in Schedule::BOTH {
        for (dtype, kv_dtype, block_size, geometry) in [
            (DType::F32, DType::F32, 16, (8, 2, 64)),
            (DType::F16, DType::F16, 32, (9, 3, 32)),
            (DType::BF16, DType::BF16, 16, (4, 4, 32)),
            (DType::F32, DType::F8E4M3, 32, (8, 2, 64)),
            (DType::BF16, DType::F8E4M3, 16, (9, 3, 32)),
        ] {
            let case = kernels::attention_case(dtype, block_size, geometry, &mixed)
                .with_kv_dtype(kv_dtype);
            let variants = [
                ("mixed", DecodeKernel::Auto),
                ("split-K", DecodeKernel::Split),
            ];
            check_attention(schedule, case, &variants, &mut checks);
        }
    }
    assert_passed(&checks);
}

#[test]
fn attention_kernels_match_the_cpu_with_llama_3_8b_heads() {
    // 32 query heads over 8 KV heads of 128 dimensions: tiles of 16 tokens x 4 heads, 80 KiB of
    // shared memory per block (over the default 48 KiB).
    let batch = seqs(&[(40, 40), (200, 1), (17, 3)]);
    let mut checks = Vec::new();
    for (schedule, kernel) in [
        (Schedule::Forward, DecodeKernel::Auto),
        (Schedule::Reverse, DecodeKernel::Split),
    ] {
        let case = kernels::attention_case(DType::BF16, 16, (32, 8, 128), &batch);
        check_attention(schedule, case, &[("llama-3-8b heads", kernel)], &mut checks);
    }
    assert_passed(&checks);
}

#[test]
fn split_k_and_tiles_match_the_cpu_on_long_decodes() {
    // Three partitions of 512 keys, and a context one key into its second partition.
    let long = seqs(&[(1100, 1), (513, 1)]);
    let mut checks = Vec::new();
    for (schedule, dtype, kv_dtype, kernel) in [
        (
            Schedule::Forward,
            DType::BF16,
            DType::BF16,
            DecodeKernel::Auto,
        ),
        (
            Schedule::Reverse,
            DType::F32,
            DType::F32,
            DecodeKernel::Split,
        ),
        (
            Schedule::Forward,
            DType::F16,
            DType::F16,
            DecodeKernel::Tiles,
        ),
        (
            Schedule::Reverse,
            DType::F16,
            DType::F8E4M3,
            DecodeKernel::Split,
        ),
    ] {
        let case = kernels::attention_case(dtype, 16, (4, 1, 32), &long).with_kv_dtype(kv_dtype);
        check_attention(schedule, case, &[("long decodes", kernel)], &mut checks);
    }
    assert_passed(&checks);
}

/// `write_kv` into an fp8 cache encodes as the CPU does, bit for bit, at the values the random
/// cases rarely reach: every code's value and the points halfway between neighbours (ties go
/// to even), subnormals, magnitudes that saturate to 448, infinities and NaN.
#[test]
fn fp8_write_kv_rounds_saturates_and_keeps_nan_as_the_cpu() {
    let mut xs = vec![
        0.0,
        -0.0,
        464.0,
        464.5,
        1e30,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
    ];
    for b in 0..0x7eu8 {
        let (lo, hi) = (fp8::decode(b), fp8::decode(b + 1));
        xs.extend([lo, -lo, (lo + hi) / 2.0, -(lo + hi) / 2.0]);
    }
    let d = 32;
    xs.resize(xs.len().next_multiple_of(d), 1.0);
    let tokens = xs.len() / d;
    // One KV head, slots in order: the V cache then holds the values in input order.
    let g = attn::Geometry {
        heads: 1,
        kv_heads: 1,
        head_dim: d,
        block_size: 16,
        max_blocks: 1,
    };
    let dts = attn::Dtypes {
        io: DType::F32,
        cache: DType::F8E4M3,
    };
    let launch = attn::write_kv(CacheKind::Values, dts, tokens, &g).unwrap();
    let slots: Vec<u32> = (0..tokens as u32).collect();
    let want: Vec<u8> = xs.iter().map(|&x| fp8::encode(x)).collect();
    for schedule in Schedule::BOTH {
        let mut m = Memory::default();
        m.input(Buf::Src, &xs);
        m.input(Buf::Slots, &slots);
        m.output(Buf::Cache, &vec![0xaau8; tokens.next_multiple_of(16) * d]);
        m.run(&launch, schedule).unwrap();
        let got: Vec<u8> = m.read(Buf::Cache).unwrap();
        for (i, (x, w)) in xs.iter().zip(&want).enumerate() {
            assert_eq!(got[i], *w, "{x:e}: {:#04x} vs {w:#04x}", got[i]);
        }
    }
}

#[test]
fn elementwise_and_norm_kernels_match_the_cpu() {
    let mut checks = Vec::new();
    for schedule in Schedule::BOTH {
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            // Llama-3-8B's MLP and hidden widths; a row length that leaves threads idle.
            for (rows, n) in [(2, 14336), (5, 1000)] {
                kernels::check_silu_mul(&Simt(schedule), dtype, (rows, n), &mut checks).unwrap();
            }
            for (rows, n) in [(2, 4096), (3, 1000)] {
                let target = Simt(schedule);
                kernels::check_add_rms_norm(&target, dtype, (rows, n), &mut checks).unwrap();
            }
        }
    }
    assert_passed(&checks);
}

#[test]
fn sampling_kernel_draws_where_the_cpu_walk_does() {
    let mut checks = Vec::new();
    for schedule in Schedule::BOTH {
        // Llama-3's vocabulary, and one smaller than the block's 1024 threads x 8.
        for shape in [(2, 128_256), (3, 5000)] {
            kernels::check_sampling(&Simt(schedule), shape, &mut checks).unwrap();
        }
    }
    assert_passed(&checks);
}

/// The GPU self-check's mixed-batch cases at their own sizes, on the emulator (minutes: run with
/// `cargo test --release --features simt -- --ignored`). Its long decodes (3000 and 1500 keys
/// with 32 heads) would take hours here; the tests above run smaller ones.
#[test]
#[ignore]
fn the_gpu_self_checks_mixed_batches_pass_on_the_emulator() {
    let mixed = seqs(&MIXED);
    let mut checks = Vec::new();
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        for block_size in [16, 32] {
            for geometry in GEOMETRIES {
                let case = kernels::attention_case(dtype, block_size, geometry, &mixed);
                let variants = [
                    ("mixed", DecodeKernel::Auto),
                    ("split-K", DecodeKernel::Split),
                ];
                check_attention(Schedule::Forward, case, &variants, &mut checks);
            }
        }
    }
    assert_passed(&checks);
}

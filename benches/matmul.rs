//! The quantized CPU matmuls against the dequantized f32 one the engine runs, on SmolLM2's fused
//! gate/up projection (3072 x 576) for decode steps (1 to 64 rows) and a prefill chunk (512
//! rows): candle's Q4_1 kernels (what the GGUF holds), our int8 blocks (`--quantization int8`,
//! AVX2 or AVX-512 CPUs; `int8_bf16` as with `--dtype bf16`: on AMX from 13 rows) and 4-bit blocks
//! (`--quantization int4`, Q4_1's scheme; `int4_bf16` as int8's), f32 as rows
//! (`model::matmul::linear`) and, where the CPU has AVX-512, packed into panels at load as the
//! model keeps them (`f32_panels`), and bf16 weights (`--dtype bf16`).
//! `cargo bench --bench matmul`.

use std::hint::black_box;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use half::bf16;
use offline_bench::gemm::bf16::{Bf16Kernel, Bf16Rows, rows_by_weights_bf16};
use offline_bench::gemm::int4::Int4Weights;
use offline_bench::gemm::int8::Int8Weights;
use offline_bench::model::linear::Linear;
use offline_bench::model::matmul::{linear, linear_quantized};

/// The binary's allocator, so that buffers are aligned as in a run (`heap`).
#[global_allocator]
static ALLOCATOR: offline_bench::heap::ActivationCache =
    offline_bench::heap::ActivationCache::new();

fn matmul(c: &mut Criterion) {
    let (n, k) = (3072, 576);
    let w = Tensor::randn(0f32, 0.05, (n, k), &Device::Cpu).expect("weights");
    let q = QTensor::quantize(&w, GgmlDType::Q4_1).expect("quantize");
    let qm = QMatMul::from_qtensor(q).expect("qmatmul");
    let wb = w.to_dtype(DType::BF16).expect("bf16 weights");
    let values = w.flatten_all().and_then(|v| v.to_vec1::<f32>());
    let values = values.expect("values");
    let int8 = std::sync::Arc::new(Int8Weights::quantize(&values, n, k));
    let int4 = std::sync::Arc::new(Int4Weights::quantize(&values, n, k));
    let has_int8 = offline_bench::gemm::panels_run_here();
    let has_panels = offline_bench::gemm::pack_at_load(&[0.0], 1, 1).is_some();
    let panels = Linear::projection(w.clone()).expect("panels");
    let mut g = c.benchmark_group("gate_up_3072x576");
    for rows in [1usize, 8, 16, 32, 64, 512] {
        let x = Tensor::randn(0f32, 1.0, (rows, k), &Device::Cpu).expect("input");
        g.throughput(Throughput::Elements((2 * rows * n * k) as u64));
        g.bench_with_input(BenchmarkId::new("q4_1", rows), &x, |b, x| {
            b.iter(|| black_box(qm.forward(x).expect("q4_1 matmul")))
        });
        if has_int8 {
            g.bench_with_input(BenchmarkId::new("int8", rows), &x, |b, x| {
                b.iter(|| black_box(linear_quantized(x, &int8, false).expect("int8 matmul")))
            });
            g.bench_with_input(BenchmarkId::new("int8_bf16", rows), &x, |b, x| {
                b.iter(|| black_box(linear_quantized(x, &int8, true).expect("int8 matmul, bf16")))
            });
            g.bench_with_input(BenchmarkId::new("int4", rows), &x, |b, x| {
                b.iter(|| black_box(linear_quantized(x, &int4, false).expect("int4 matmul")))
            });
            g.bench_with_input(BenchmarkId::new("int4_bf16", rows), &x, |b, x| {
                b.iter(|| black_box(linear_quantized(x, &int4, true).expect("int4 matmul, bf16")))
            });
        }
        g.bench_with_input(BenchmarkId::new("f32", rows), &x, |b, x| {
            b.iter(|| black_box(linear(x, &w).expect("f32 matmul")))
        });
        if has_panels {
            g.bench_with_input(BenchmarkId::new("f32_panels", rows), &x, |b, x| {
                b.iter(|| black_box(panels.forward(x).expect("f32 panel matmul")))
            });
        }
        g.bench_with_input(BenchmarkId::new("bf16", rows), &x, |b, x| {
            b.iter(|| black_box(linear(x, &wb).expect("bf16 matmul")))
        });
    }
    g.finish();
}

/// The two AVX-512 bf16 kernels this CPU has, one core each (`model::matmul` splits a product
/// over the threads), rows prepared outside the timing: which is faster depends on the CPU, and
/// the process picks one at start-up (`Bf16Kernel::chosen`).
fn bf16_kernels(c: &mut Criterion) {
    let (n, k) = (3072, 576);
    let w: Vec<bf16> = (0..n * k)
        .map(|i| bf16::from_f32(((i * 7919 % 1000) as f32 - 500.0) / 5000.0))
        .collect();
    let mut g = c.benchmark_group("bf16_kernels_3072x576_one_core");
    for rows in [1usize, 8, 32, 64] {
        let x: Vec<f32> = (0..rows * k)
            .map(|i| (i % 97) as f32 / 97.0 - 0.5)
            .collect();
        g.throughput(Throughput::Elements((2 * rows * n * k) as u64));
        for kernel in Bf16Kernel::available() {
            let prepared = Bf16Rows::prepare(kernel, &x, k);
            let mut out = vec![0f32; rows * n];
            g.bench_function(BenchmarkId::new(format!("{kernel:?}"), rows), |b| {
                b.iter(|| {
                    rows_by_weights_bf16(&prepared, 0..rows, (n, &w), &mut out);
                    black_box(&mut out);
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, matmul, bf16_kernels);
criterion_main!(benches);

//! The quantized CPU matmul (candle's Q4_1 kernels, what the GGUF holds) against the
//! dequantized f32 one the engine runs (`model::matmul::linear`) and its bf16 weights
//! (`--dtype bf16`), on SmolLM2's fused gate/up projection (3072 x 576) for decode steps (1 to
//! 64 rows) and a prefill chunk (512 rows).
//! `cargo bench --bench matmul`.

use std::hint::black_box;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

fn matmul(c: &mut Criterion) {
    let (n, k) = (3072, 576);
    let w = Tensor::randn(0f32, 0.05, (n, k), &Device::Cpu).expect("weights");
    let q = QTensor::quantize(&w, GgmlDType::Q4_1).expect("quantize");
    let qm = QMatMul::from_qtensor(q).expect("qmatmul");
    let wb = w.to_dtype(DType::BF16).expect("bf16 weights");
    let mut g = c.benchmark_group("gate_up_3072x576");
    for rows in [1usize, 8, 16, 32, 64, 512] {
        let x = Tensor::randn(0f32, 1.0, (rows, k), &Device::Cpu).expect("input");
        g.throughput(Throughput::Elements((2 * rows * n * k) as u64));
        g.bench_with_input(BenchmarkId::new("q4_1", rows), &x, |b, x| {
            b.iter(|| black_box(qm.forward(x).expect("q4_1 matmul")))
        });
        g.bench_with_input(BenchmarkId::new("f32", rows), &x, |b, x| {
            b.iter(|| black_box(offline_bench::model::matmul::linear(x, &w).expect("f32 matmul")))
        });
        g.bench_with_input(BenchmarkId::new("bf16", rows), &x, |b, x| {
            b.iter(|| black_box(offline_bench::model::matmul::linear(x, &wb).expect("bf16 matmul")))
        });
    }
    g.finish();
}

criterion_group!(benches, matmul);
criterion_main!(benches);

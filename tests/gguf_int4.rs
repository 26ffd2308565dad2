//! `--quantization int4` on the default model keeps the weights its Q4_1 GGUF stores: every
//! block's f16 scale and minimum come back bit for bit from the dequantized values, and so do
//! the values themselves (the README's "int4 weights" says so).

mod common;

use candle_core::Device;
use candle_core::quantized::{GgmlDType, gguf_file};
use offline_bench::gemm::PANEL;
use offline_bench::gemm::int4::{Int4Weights, blocks};

/// Bytes of a Q4_1 block: f16 scale, f16 minimum, 16 bytes of codes.
const Q4_1_BLOCK_BYTES: usize = 20;

#[test]
fn q4_1_blocks_requantize_to_the_stored_scales_minimums_and_values() {
    let path = common::smollm_gguf();
    let mut file = std::fs::File::open(&path).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    let mut names: Vec<String> = content.tensor_infos.keys().cloned().collect();
    names.sort();
    let mut checked = 0;
    for name in names {
        let qt = content.tensor(&mut file, &name, &Device::Cpu).unwrap();
        if qt.dtype() != GgmlDType::Q4_1 {
            continue;
        }
        let raw = qt.data().unwrap();
        let (n, k) = qt.shape().dims2().unwrap();
        let values: Vec<f32> = qt
            .dequantize(&Device::Cpu)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1())
            .unwrap();
        let iw = Int4Weights::quantize(&values, n, k);
        let kb = blocks(k);
        for j in 0..n {
            for b in 0..kb {
                let at = (j * kb + b) * Q4_1_BLOCK_BYTES;
                let f16_at = |i: usize| u16::from_le_bytes([raw[i], raw[i + 1]]);
                let x = ((j / PANEL) * kb + b) * 2 * PANEL + j % PANEL;
                assert_eq!(
                    (iw.dm[x].to_bits(), iw.dm[x + PANEL].to_bits()),
                    (f16_at(at), f16_at(at + 2)),
                    "{name}: row {j} block {b}: scale and minimum"
                );
            }
        }
        let back = iw.dequantize();
        let first = back.iter().zip(&values).position(|(a, b)| a != b);
        assert_eq!(first, None, "{name}: the first value that differs");
        checked += 1;
    }
    // SmolLM2's 30 layers of 7 projections.
    assert_eq!(checked, 210);
}

//! `--quantization int4` and `int8` on the default model keep the weights its GGUF stores: every
//! Q4_1 block's f16 scale and minimum, and every Q8_0 block's f16 scale and codes, come back bit
//! for bit from the dequantized values, and so do the values themselves (the README's "int4
//! weights" and "int8 weights" say so).

mod common;

use candle_core::Device;
use candle_core::quantized::{GgmlDType, gguf_file};
use offline_bench::gemm::PANEL;
use offline_bench::gemm::int4::{Int4Weights, blocks};
use offline_bench::gemm::int8::Int8Weights;

/// Bytes of a Q4_1 block: f16 scale, f16 minimum, 16 bytes of codes.
const Q4_1_BLOCK_BYTES: usize = 20;

/// Bytes of a Q8_0 block: f16 scale, 32 one-byte codes.
const Q8_0_BLOCK_BYTES: usize = 34;

/// A tensor of the file: its name, raw blocks, shape and dequantized values.
struct Stored {
    name: String,
    raw: Vec<u8>,
    dims: (usize, usize),
    values: Vec<f32>,
}

/// The file's tensors of `dtype`, by name.
fn tensors_of(dtype: GgmlDType) -> Vec<Stored> {
    let path = common::smollm_gguf();
    let mut file = std::fs::File::open(&path).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    let mut names: Vec<String> = content.tensor_infos.keys().cloned().collect();
    names.sort();
    let mut out = Vec::new();
    for name in names {
        let qt = content.tensor(&mut file, &name, &Device::Cpu).unwrap();
        if qt.dtype() != dtype {
            continue;
        }
        let raw = qt.data().unwrap().to_vec();
        let dims = qt.shape().dims2().unwrap();
        let values: Vec<f32> = qt
            .dequantize(&Device::Cpu)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1())
            .unwrap();
        out.push(Stored {
            name,
            raw,
            dims,
            values,
        });
    }
    out
}

/// An f16's bits, little-endian at `at`.
fn f16_at(raw: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([raw[at], raw[at + 1]])
}

#[test]
fn q4_1_blocks_requantize_to_the_stored_scales_minimums_and_values() {
    let tensors = tensors_of(GgmlDType::Q4_1);
    // SmolLM2's 30 layers of 7 projections.
    assert_eq!(tensors.len(), 210);
    for Stored {
        name,
        raw,
        dims: (n, k),
        values,
    } in tensors
    {
        let iw = Int4Weights::quantize(&values, n, k);
        let kb = blocks(k);
        for j in 0..n {
            for b in 0..kb {
                let at = (j * kb + b) * Q4_1_BLOCK_BYTES;
                let x = ((j / PANEL) * kb + b) * 2 * PANEL + j % PANEL;
                assert_eq!(
                    (iw.dm[x].to_bits(), iw.dm[x + PANEL].to_bits()),
                    (f16_at(&raw, at), f16_at(&raw, at + 2)),
                    "{name}: row {j} block {b}: scale and minimum"
                );
            }
        }
        let back = iw.dequantize();
        let first = back.iter().zip(&values).position(|(a, b)| a != b);
        assert_eq!(first, None, "{name}: the first value that differs");
    }
}

/// The LM head of `--quantization int4` (and every int8 projection) requantizes a Q8_0 tensor
/// as stored: SmolLM2's token embedding, which is its tied LM head.
#[test]
fn q8_0_blocks_requantize_to_the_stored_scales_codes_and_values() {
    let tensors = tensors_of(GgmlDType::Q8_0);
    assert_eq!(tensors.len(), 1, "the token embedding");
    for Stored {
        name,
        raw,
        dims: (n, k),
        values,
    } in tensors
    {
        let iw = Int8Weights::quantize(&values, n, k);
        let kb = k.div_ceil(32);
        for j in 0..n {
            for b in 0..kb {
                let at = (j * kb + b) * Q8_0_BLOCK_BYTES;
                let x = ((j / PANEL) * kb + b) * PANEL + j % PANEL;
                assert_eq!(
                    iw.scales[x].to_bits(),
                    f16_at(&raw, at),
                    "{name}: row {j} block {b}: scale"
                );
                for i in 0..32 {
                    let code = iw.q[((j / PANEL) * k + b * 32 + i) * PANEL + j % PANEL];
                    assert_eq!(
                        code,
                        raw[at + 2 + i] as i8,
                        "{name}: row {j} block {b}: code {i}"
                    );
                }
            }
        }
        let back = iw.dequantize();
        let first = back.iter().zip(&values).position(|(a, b)| a != b);
        assert_eq!(first, None, "{name}: the first value that differs");
    }
}

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

/// Runs `check` on each of the file's tensors of `dtype`, in name order, one at a time (the Q4_1
/// ones hold 0.4 GB of values); returns how many there were.
fn each_tensor_of(dtype: GgmlDType, check: impl Fn(Stored)) -> usize {
    let path = common::smollm_gguf();
    let mut file = std::fs::File::open(&path).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    let mut names: Vec<String> = content.tensor_infos.keys().cloned().collect();
    names.sort();
    let mut count = 0;
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
        check(Stored {
            name,
            raw,
            dims,
            values,
        });
        count += 1;
    }
    count
}

impl Stored {
    /// Every block of 32 values: its row, its place along the row, and where its bytes start
    /// in `raw` (blocks of `block_bytes`).
    fn blocks(&self, block_bytes: usize) -> impl Iterator<Item = (usize, usize, usize)> {
        let (n, kb) = (self.dims.0, blocks(self.dims.1));
        (0..n).flat_map(move |j| (0..kb).map(move |b| (j, b, (j * kb + b) * block_bytes)))
    }

    /// The f16 in `raw` at byte `at`, as bits.
    fn f16_at(&self, at: usize) -> u16 {
        u16::from_le_bytes([self.raw[at], self.raw[at + 1]])
    }

    /// Asserts that `back` (a requantization's values) equals the dequantized values.
    fn assert_values_come_back(&self, back: &[f32]) {
        let first = back.iter().zip(&self.values).position(|(a, b)| a != b);
        assert_eq!(first, None, "{}: the first value that differs", self.name);
    }
}

#[test]
fn q4_1_blocks_requantize_to_the_stored_scales_minimums_and_values() {
    let count = each_tensor_of(GgmlDType::Q4_1, |t| {
        let (n, k) = t.dims;
        let iw = Int4Weights::quantize(&t.values, n, k);
        for (j, b, at) in t.blocks(Q4_1_BLOCK_BYTES) {
            let x = ((j / PANEL) * blocks(k) + b) * 2 * PANEL + j % PANEL;
            assert_eq!(
                (iw.dm[x].to_bits(), iw.dm[x + PANEL].to_bits()),
                (t.f16_at(at), t.f16_at(at + 2)),
                "{}: row {j} block {b}: scale and minimum",
                t.name
            );
        }
        t.assert_values_come_back(&iw.dequantize());
    });
    // SmolLM2's 30 layers of 7 projections.
    assert_eq!(count, 210);
}

/// The LM head of `--quantization int4` (and every int8 projection) requantizes a Q8_0 tensor
/// as stored: SmolLM2's token embedding, which is its tied LM head.
#[test]
fn q8_0_blocks_requantize_to_the_stored_scales_codes_and_values() {
    let count = each_tensor_of(GgmlDType::Q8_0, |t| {
        let (n, k) = t.dims;
        let iw = Int8Weights::quantize(&t.values, n, k);
        for (j, b, at) in t.blocks(Q8_0_BLOCK_BYTES) {
            let x = ((j / PANEL) * blocks(k) + b) * PANEL + j % PANEL;
            let what = format!("{}: row {j} block {b}", t.name);
            assert_eq!(iw.scales[x].to_bits(), t.f16_at(at), "{what}: scale");
            for i in 0..32 {
                let code = iw.q[((j / PANEL) * k + b * 32 + i) * PANEL + j % PANEL];
                assert_eq!(code, t.raw[at + 2 + i] as i8, "{what}: code {i}");
            }
        }
        t.assert_values_come_back(&iw.dequantize());
    });
    assert_eq!(count, 1, "the token embedding");
}

//! The specific-shapes mode: fixed batch x prompt x output shapes run through the engine's
//! runner, each timed as a prefill of the whole batch followed by its decode steps, with the
//! kernels inside them and the floors the device's measured peaks allow.
//!
//! - [`bench`] runs one shape (warm-up, measured iterations, one profiled iteration);
//! - [`roofline`] measures the device's peaks and counts the FLOPs and bytes a shape must move;
//! - [`output`] prints the tables and writes CSV and JSON; [`plot`] draws the SVG charts.

pub mod bench;
pub mod output;
pub mod plot;
pub mod roofline;

use anyhow::{Context, Result, bail};
use serde::Serialize;

/// One point of a sweep: `batch` sequences of `input_len` prompt tokens, each generating
/// `output_len` tokens (the first by the prefill, the rest by decode steps).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Shape {
    pub batch: usize,
    pub input_len: usize,
    pub output_len: usize,
}

impl std::fmt::Display for Shape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "batch {} x input {} + output {}",
            self.batch, self.input_len, self.output_len
        )
    }
}

impl Shape {
    /// Decode steps after the prefill (the prefill samples the first token).
    pub fn decode_steps(&self) -> usize {
        self.output_len - 1
    }
}

/// Parses a list of sizes for `flag`: comma-separated values or ranges. `A..B` doubles from A
/// up to B (`1..128` = 1,2,4,...,128); `A..B:S` steps by S (`128..512:128` = 128,256,384,512).
pub fn parse_sizes(flag: &str, text: &str) -> Result<Vec<usize>> {
    let num = |s: &str| -> Result<usize> {
        s.trim()
            .parse::<usize>()
            .with_context(|| format!("{flag}: '{}' is not a whole number", s.trim()))
    };
    let mut out = Vec::new();
    for item in text.split(',') {
        let item = item.trim();
        if item.is_empty() {
            bail!("{flag}: empty entry in '{text}'");
        }
        if let Some((a, rest)) = item.split_once("..") {
            let (b, step) = match rest.split_once(':') {
                Some((b, s)) => (num(b)?, Some(num(s)?)),
                None => (num(rest)?, None),
            };
            let a = num(a)?;
            if a == 0 || b < a || step == Some(0) {
                bail!("{flag}: '{item}' is not a range from at least 1 up to a larger end");
            }
            let mut v = a;
            while v <= b {
                out.push(v);
                v = match step {
                    Some(s) => v + s,
                    None => v * 2,
                };
            }
        } else {
            out.push(num(item)?);
        }
    }
    if let Some(i) = out.iter().position(|&v| v == 0) {
        bail!(
            "{flag}: entry {} is 0; every size must be at least 1",
            i + 1
        );
    }
    out.dedup();
    Ok(out)
}

/// Every combination, batch-major then input then output (the order the table prints).
pub fn grid(batches: &[usize], inputs: &[usize], outputs: &[usize]) -> Vec<Shape> {
    let mut v = Vec::new();
    for &input_len in inputs {
        for &batch in batches {
            for &output_len in outputs {
                v.push(Shape {
                    batch,
                    input_len,
                    output_len,
                });
            }
        }
    }
    v
}

/// The shapes the model cannot run: a sequence over `max_model_len`, or a decode step wider
/// than the token budget.
pub fn check_limits(shapes: &[Shape], max_model_len: usize, max_step_tokens: usize) -> Result<()> {
    for s in shapes {
        let len = s.input_len + s.output_len;
        if len > max_model_len {
            bail!(
                "shape {s}: {len} tokens per sequence exceed the model's maximum length {max_model_len} (--max-model-len)"
            );
        }
        if s.batch > max_step_tokens {
            bail!(
                "shape {s}: a decode step of {} sequences exceeds --max-num-batched-tokens {max_step_tokens}",
                s.batch
            );
        }
    }
    Ok(())
}

/// The median and the 90th percentile of `v` (interpolated), 0 when empty.
pub fn median_p90(v: &[f64]) -> (f64, f64) {
    let d = crate::report::Distribution::of(v);
    (d.p50, d.p90)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_and_ranges() -> Result<()> {
        assert_eq!(parse_sizes("--b", "1,8,32")?, vec![1, 8, 32]);
        assert_eq!(parse_sizes("--b", "1..16")?, vec![1, 2, 4, 8, 16]);
        assert_eq!(parse_sizes("--b", "1..20")?, vec![1, 2, 4, 8, 16]);
        assert_eq!(
            parse_sizes("--b", "128..512:128")?,
            vec![128, 256, 384, 512]
        );
        assert_eq!(parse_sizes("--b", " 3 , 1..2 ")?, vec![3, 1, 2]);
        Ok(())
    }

    #[test]
    fn bad_lists_name_the_flag() {
        for bad in [
            "", "0", "1,0", "a", "1,,2", "0..8", "8..4", "1..8:0", "1..x",
        ] {
            let err = parse_sizes("--batch-sizes", bad).unwrap_err().to_string();
            assert!(err.starts_with("--batch-sizes"), "{bad}: {err}");
        }
    }

    #[test]
    fn grid_and_limits() {
        let g = grid(&[1, 4], &[16, 32], &[8]);
        assert_eq!(g.len(), 4);
        assert_eq!(
            g[1],
            Shape {
                batch: 4,
                input_len: 16,
                output_len: 8
            }
        );
        assert!(check_limits(&g, 40, 8192).is_ok());
        let err = check_limits(&g, 39, 8192).unwrap_err().to_string();
        assert!(err.contains("batch 1 x input 32 + output 8"), "{err}");
        let err = check_limits(&g, 40, 2).unwrap_err().to_string();
        assert!(err.contains("batch 4 x input 16"), "{err}");
    }
}

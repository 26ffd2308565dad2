//! Turning logits into tokens: greedy (argmax on the device, only the ids come back) or seeded
//! temperature / top-k / top-p sampling. Each request draws from its own random stream, keyed by
//! the seed, the request and the output position, so its tokens do not depend on which other
//! requests share its steps.

use anyhow::{Result, bail};
use candle_core::{D, Tensor};
use rayon::prelude::*;
use serde::Serialize;

use crate::util::Rng64;

/// How tokens are chosen.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// Nucleus sampling mass (1 = off).
    pub top_p: f32,
    /// Keep only the k most likely tokens (0 = off).
    pub top_k: usize,
    pub seed: u64,
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: 0,
        }
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0 || self.top_k == 1
    }

    pub fn validate(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            bail!("--temperature must be >= 0, got {}", self.temperature);
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            bail!("--top-p must be in (0, 1], got {}", self.top_p);
        }
        Ok(())
    }

    /// `greedy`, or `temperature=0.8 top_p=0.95 top_k=40 seed=0`.
    pub fn describe(&self) -> String {
        if self.is_greedy() {
            "greedy".into()
        } else {
            format!(
                "temperature={} top_p={} top_k={} seed={}",
                self.temperature, self.top_p, self.top_k, self.seed
            )
        }
    }
}

/// One token per row of `logits` (`[rows, vocab]`, f32). `streams[i]` is `(request, position)`
/// of row `i`, keying its random stream.
pub fn sample(
    logits: &Tensor,
    params: &SamplingParams,
    streams: &[(usize, usize)],
) -> Result<Vec<u32>> {
    if params.is_greedy() {
        return Ok(logits.argmax(D::Minus1)?.to_vec1::<u32>()?);
    }
    let rows = logits.to_vec2::<f32>()?;
    Ok(rows
        .into_par_iter()
        .zip(streams.par_iter())
        .map(|(row, &(req, pos))| {
            let mut rng = Rng64::for_stream(params.seed, ((req as u64) << 32) | pos as u64);
            sample_row(row, params, &mut rng)
        })
        .collect())
}

/// Samples one row: temperature, then top-k, then top-p, then a draw from what is left.
fn sample_row(mut logits: Vec<f32>, p: &SamplingParams, rng: &mut Rng64) -> u32 {
    let inv_t = 1.0 / p.temperature;
    let mut cand: Vec<(u32, f32)> = logits
        .drain(..)
        .enumerate()
        .map(|(i, l)| (i as u32, l * inv_t))
        .collect();
    let by_logit_desc = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1);
    if p.top_k > 0 && p.top_k < cand.len() {
        cand.select_nth_unstable_by(p.top_k - 1, by_logit_desc);
        cand.truncate(p.top_k);
    }
    let max = cand.iter().map(|c| c.1).fold(f32::NEG_INFINITY, f32::max);
    let mut probs: Vec<(u32, f64)> = cand
        .iter()
        .map(|&(i, l)| (i, ((l - max) as f64).exp()))
        .collect();
    if p.top_p < 1.0 {
        probs.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
        let total: f64 = probs.iter().map(|x| x.1).sum();
        let mut acc = 0.0;
        let mut keep = probs.len();
        for (k, x) in probs.iter().enumerate() {
            acc += x.1;
            if acc >= p.top_p as f64 * total {
                keep = k + 1;
                break;
            }
        }
        probs.truncate(keep);
    }
    let total: f64 = probs.iter().map(|x| x.1).sum();
    let mut target = rng.next_f64() * total;
    for &(id, w) in &probs {
        if target < w {
            return id;
        }
        target -= w;
    }
    probs.last().map_or(0, |x| x.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn params(t: f32, top_p: f32, top_k: usize) -> SamplingParams {
        SamplingParams {
            temperature: t,
            top_p,
            top_k,
            seed: 3,
        }
    }

    #[test]
    fn greedy_is_argmax() {
        let l = Tensor::new(&[[0.1f32, 2.0, -1.0], [5.0, 0.0, 4.9]], &Device::Cpu).unwrap();
        let ids = sample(&l, &SamplingParams::greedy(), &[(0, 0), (1, 0)]).unwrap();
        assert_eq!(ids, vec![1, 0]);
    }

    #[test]
    fn top_k_one_and_tiny_top_p_are_argmax() {
        let row = vec![0.1f32, 2.0, -1.0, 1.9];
        for p in [params(1.0, 1.0, 1), params(1.0, 1e-6, 0)] {
            for s in 0..20 {
                let mut rng = Rng64::new(s);
                assert_eq!(sample_row(row.clone(), &p, &mut rng), 1);
            }
        }
    }

    #[test]
    fn top_k_limits_the_choice() {
        let row = vec![3.0f32, 2.9, -10.0, 2.8, -10.0];
        let p = params(5.0, 1.0, 2);
        for s in 0..200 {
            let mut rng = Rng64::new(s);
            assert!(matches!(sample_row(row.clone(), &p, &mut rng), 0 | 1));
        }
    }

    #[test]
    fn frequencies_follow_the_softmax() {
        // logits ln(1), ln(3): probabilities 1/4 and 3/4.
        let row = vec![0.0f32, 3f32.ln()];
        let p = params(1.0, 1.0, 0);
        let mut rng = Rng64::new(11);
        let ones = (0..4000)
            .filter(|_| sample_row(row.clone(), &p, &mut rng) == 1)
            .count();
        assert!((2800..3200).contains(&ones), "{ones}");
    }

    #[test]
    fn streams_do_not_depend_on_batch_order() {
        let l = Tensor::new(
            &[[0.0f32, 0.1, 0.2, 0.3], [0.3, 0.2, 0.1, 0.0]],
            &Device::Cpu,
        )
        .unwrap();
        let p = params(1.0, 1.0, 0);
        let a = sample(&l, &p, &[(4, 9), (5, 9)]).unwrap();
        let swapped = Tensor::new(
            &[[0.3f32, 0.2, 0.1, 0.0], [0.0, 0.1, 0.2, 0.3]],
            &Device::Cpu,
        )
        .unwrap();
        let b = sample(&swapped, &p, &[(5, 9), (4, 9)]).unwrap();
        assert_eq!(a, vec![b[1], b[0]]);
    }

    #[test]
    fn bad_params() {
        assert!(params(-1.0, 1.0, 0).validate().is_err());
        assert!(params(1.0, 0.0, 0).validate().is_err());
        assert!(params(1.0, 1.5, 0).validate().is_err());
        assert!(params(0.7, 0.9, 40).validate().is_ok());
    }
}

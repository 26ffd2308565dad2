//! Drawing one token from one row of logits, given the row's uniform number `u`. The CUDA kernel
//! (`kernels/sampling.cu`) follows the same steps, so that both devices draw the same token from
//! the same logits (up to rounding at the edges between tokens):
//!
//! 1. weights `exp((logit - max) / temperature)`;
//! 2. top-k keeps the logits at or above the k-th largest (ties with it included);
//! 3. top-p then keeps, among those, the logits at or above the value where the mass taken in
//!    descending order first reaches `top_p` of the total;
//! 4. the token is where `u` times the kept mass falls, walking the kept tokens in index order.

use super::SamplingParams;

/// The token drawn from `logits` with uniform `u` in `[0, 1)`.
pub fn sample_row(logits: &[f32], p: &SamplingParams, u: f32) -> u32 {
    let kept = Kept::new(logits, p);
    let target = u as f64 * kept.total;
    let mut before = 0.0;
    for (b, &sum) in kept.sums.iter().enumerate() {
        if target < before + sum {
            // In this block, one kept token after another; its last kept token where rounding
            // leaves `target` past their running sum.
            let mut last = None;
            for (i, w) in kept.block(b) {
                before += w as f64;
                last = Some(i);
                if target < before {
                    return i as u32;
                }
            }
            if let Some(i) = last {
                return i as u32;
            }
        }
        before += sum;
    }
    // `u * total` rounded up to the total: the last kept token.
    kept.last().unwrap_or(0) as u32
}

/// The index of the first largest logit, as candle's `argmax` (what greedy runs on CUDA)
/// chooses it: a NaN is never larger, and a NaN first logit wins. The maximum is found 16
/// lanes at a time (vectorised; candle's loop is one comparison after another), then its first
/// position.
pub fn argmax(row: &[f32]) -> u32 {
    let Some(first) = row.first() else {
        return 0;
    };
    if first.is_nan() {
        return 0;
    }
    let max = largest(row, *first);
    row.iter().position(|&x| x == max).unwrap_or(0) as u32
}

/// The largest of `from` and the numbers of `row` (NaN never is), 16 lanes at a time.
fn largest(row: &[f32], from: f32) -> f32 {
    let larger = |m: f32, x: f32| if x > m { x } else { m };
    let chunks = row.chunks_exact(16);
    let tail = chunks.remainder().iter().copied().fold(from, larger);
    let mut lanes = [from; 16];
    for c in chunks {
        for (m, &x) in lanes.iter_mut().zip(c) {
            *m = larger(*m, x);
        }
    }
    lanes.into_iter().fold(tail, larger)
}

/// The sum of `w`, 16 lanes at a time.
fn lane_sum(w: &[f32]) -> f32 {
    let chunks = w.chunks_exact(16);
    let tail: f32 = chunks.remainder().iter().sum();
    let mut lanes = [0f32; 16];
    for c in chunks {
        for (s, &x) in lanes.iter_mut().zip(c) {
            *s += x;
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// How far `u` lies from the share of the kept mass that `id` covers, as a fraction of the
/// kept mass: 0 when `sample_row` could have drawn `id` (another device's draw from the same
/// logits, summed in another order), infinite when `id` is not kept at all.
pub fn draw_error(logits: &[f32], p: &SamplingParams, u: f32, id: u32) -> f64 {
    let kept = Kept::new(logits, p);
    let b = id as usize / BLOCK;
    if b >= kept.sums.len() {
        return f64::INFINITY;
    }
    // The mass before `id` summed as `sample_row` sums it: whole blocks, then one by one.
    let mut before: f64 = kept.sums[..b].iter().sum();
    for (i, w) in kept.block(b) {
        if i == id as usize {
            let target = u as f64 * kept.total;
            let after = before + w as f64;
            let off = if target < before {
                before - target
            } else {
                (target - after).max(0.0)
            };
            return off / kept.total;
        }
        before += w as f64;
    }
    f64::INFINITY
}

/// Tokens per block of [`Kept`]'s sums: the draw finds its block from the sums, then walks
/// at most this many tokens one by one.
const BLOCK: usize = 256;

/// The tokens top-k and top-p leave, with their weights.
struct Kept<'a> {
    logits: &'a [f32],
    /// `exp((logit - max) / temperature)` of kept tokens, 0 for the others.
    weights: Vec<f32>,
    threshold: f32,
    /// The kept weights of each [`BLOCK`] of tokens, summed 16 lanes at a time.
    sums: Vec<f64>,
    total: f64,
}

impl<'a> Kept<'a> {
    /// Every pass over the row vectorises (a vocabulary of 49152 took 0.17 ms with the
    /// standard library's `exp` and a running f64 sum, one token after another).
    fn new(logits: &'a [f32], p: &SamplingParams) -> Self {
        let inv_t = 1.0 / p.temperature;
        let max = largest(logits, f32::NEG_INFINITY);
        let mut weights: Vec<f32> = logits
            .iter()
            .map(|&l| crate::fastmath::exp((l - max) * inv_t))
            .collect();
        let threshold = keep_threshold(logits, &weights, p);
        for (w, &l) in weights.iter_mut().zip(logits) {
            // Written so that a NaN logit is dropped too.
            *w = if l >= threshold { *w } else { 0.0 };
        }
        let sums: Vec<f64> = weights.chunks(BLOCK).map(|c| lane_sum(c) as f64).collect();
        let total = sums.iter().sum();
        Self {
            logits,
            weights,
            threshold,
            sums,
            total,
        }
    }

    /// `(index, weight)` of the kept tokens of block `b`, in index order.
    fn block(&self, b: usize) -> impl Iterator<Item = (usize, f32)> + '_ {
        let start = b * BLOCK;
        let end = (start + BLOCK).min(self.logits.len());
        (start..end)
            .filter(|&i| self.logits[i] >= self.threshold)
            .map(|i| (i, self.weights[i]))
    }

    /// The last kept token.
    fn last(&self) -> Option<usize> {
        self.logits.iter().rposition(|&l| l >= self.threshold)
    }
}

/// The smallest logit still kept after top-k and top-p (`-inf` when both are off).
fn keep_threshold(logits: &[f32], weights: &[f32], p: &SamplingParams) -> f32 {
    let mut threshold = f32::NEG_INFINITY;
    if p.top_k > 0 && p.top_k < logits.len() {
        let mut v = logits.to_vec();
        let (_, kth, _) = v.select_nth_unstable_by(p.top_k - 1, |a, b| b.total_cmp(a));
        threshold = *kth;
    }
    if p.top_p < 1.0 {
        let mut kept: Vec<(f32, f32)> = logits
            .iter()
            .zip(weights)
            .filter(|(l, _)| **l >= threshold)
            .map(|(&l, &w)| (l, w))
            .collect();
        kept.sort_unstable_by(|a, b| b.0.total_cmp(&a.0));
        let total: f64 = kept.iter().map(|k| k.1 as f64).sum();
        let target = p.top_p as f64 * total;
        let mut acc = 0.0;
        for &(l, w) in &kept {
            acc += w as f64;
            if acc >= target {
                threshold = l;
                break;
            }
        }
    }
    threshold
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::Rng64;

    fn params(t: f32, top_p: f32, top_k: usize) -> SamplingParams {
        SamplingParams {
            temperature: t,
            top_p,
            top_k,
            seed: 3,
        }
    }

    fn uniforms(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = Rng64::new(seed);
        (0..n).map(|_| rng.next_f64() as f32).collect()
    }

    /// candle's argmax over the same row, which the CUDA path keeps.
    fn candle_argmax(row: &[f32]) -> u32 {
        let t = candle_core::Tensor::new(row, &candle_core::Device::Cpu).unwrap();
        t.argmax(0).unwrap().to_scalar::<u32>().unwrap()
    }

    #[test]
    fn argmax_is_candles() {
        let mut rng = Rng64::new(8);
        for len in [1usize, 5, 16, 17, 49_152, 50_001] {
            let mut row: Vec<f32> = rng.uniform_f32(len, 4.0);
            assert_eq!(argmax(&row), candle_argmax(&row), "{len}");
            // Ties: the first of them, in the vector part and in the tail.
            let top = row.len() - 1;
            row[top] = 9.0;
            row[len / 3] = 9.0;
            assert_eq!(argmax(&row), candle_argmax(&row), "{len} tied");
            // NaN never wins but first; infinities compare as numbers.
            row[len / 2] = f32::NAN;
            row[len / 4] = f32::NEG_INFINITY;
            assert_eq!(argmax(&row), candle_argmax(&row), "{len} NaN");
            row[0] = f32::NAN;
            assert_eq!(argmax(&row), 0, "{len} NaN first");
            row[len - 1] = f32::INFINITY;
            assert_eq!(argmax(&row), candle_argmax(&row), "{len} inf");
        }
        assert_eq!(argmax(&[f32::NEG_INFINITY; 40]), 0);
        assert_eq!(argmax(&[]), 0);
    }

    #[test]
    fn walks_the_kept_mass_in_index_order() {
        // Weights 1, 3 (temperature 1): [0, 1/4) draws 0, [1/4, 1) draws 1.
        let row = [0.0f32, 3f32.ln()];
        let p = params(1.0, 1.0, 0);
        assert_eq!(sample_row(&row, &p, 0.0), 0);
        assert_eq!(sample_row(&row, &p, 0.2499), 0);
        assert_eq!(sample_row(&row, &p, 0.2501), 1);
        assert_eq!(sample_row(&row, &p, 0.9999999), 1);
    }

    #[test]
    fn top_k_one_and_tiny_top_p_keep_only_the_argmax() {
        let row = [0.1f32, 2.0, -1.0, 1.9];
        for p in [params(1.0, 1.0, 1), params(1.0, 1e-6, 0)] {
            for u in uniforms(50, 1) {
                assert_eq!(sample_row(&row, &p, u), 1);
            }
        }
    }

    #[test]
    fn top_k_limits_the_choice_and_keeps_ties() {
        let row = [3.0f32, 2.9, -10.0, 2.8, -10.0];
        for u in uniforms(200, 2) {
            assert!(matches!(sample_row(&row, &params(5.0, 1.0, 2), u), 0 | 1));
        }
        // Two logits tie for second place: top-2 keeps both.
        let tied = [1.0f32, 0.5, 0.5, -3.0];
        let drawn: Vec<u32> = uniforms(400, 3)
            .into_iter()
            .map(|u| sample_row(&tied, &params(1.0, 1.0, 2), u))
            .collect();
        assert!(drawn.contains(&2) && !drawn.contains(&3));
    }

    #[test]
    fn top_p_keeps_the_smallest_head_reaching_the_mass() {
        // Probabilities 0.3, 0.2, 0.5: top_p 0.7 keeps 0.5 and 0.3; 0.81 needs 0.2 too.
        let row = [0.3f32.ln(), 0.2f32.ln(), 0.5f32.ln()];
        let drawn = |top_p: f32| -> Vec<u32> {
            uniforms(500, 4)
                .into_iter()
                .map(|u| sample_row(&row, &params(1.0, top_p, 0), u))
                .collect()
        };
        assert!(!drawn(0.7).contains(&1) && drawn(0.7).contains(&0));
        assert!(drawn(0.81).contains(&1));
    }

    #[test]
    fn draw_error_is_zero_for_the_drawn_token_only() {
        let mut rng = Rng64::new(6);
        let row: Vec<f32> = rng.uniform_f32(1000, 4.0);
        for p in [params(1.0, 1.0, 0), params(0.7, 0.9, 50)] {
            for u in uniforms(20, 7) {
                let id = sample_row(&row, &p, u);
                assert_eq!(draw_error(&row, &p, u, id), 0.0);
                let other = (id + 1) % 1000;
                assert!(draw_error(&row, &p, u, other) > 0.0);
            }
        }
        // A token top-k drops is never a draw.
        let low = (0..1000)
            .min_by(|&a, &b| row[a].total_cmp(&row[b]))
            .unwrap() as u32;
        assert!(draw_error(&row, &params(1.0, 1.0, 5), 0.5, low).is_infinite());
    }

    #[test]
    fn frequencies_follow_the_softmax_at_the_temperature() {
        // Logits 0 and ln 3 at temperature 0.5: weights 1 and 9, probability 0.9.
        let row = [0.0f32, 3f32.ln()];
        let ones = uniforms(4000, 5)
            .into_iter()
            .filter(|&u| sample_row(&row, &params(0.5, 1.0, 0), u) == 1)
            .count();
        assert!((3500..3700).contains(&ones), "{ones}");
    }
}

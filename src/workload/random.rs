//! The `random` workload: synthetic prompts of chosen lengths, built as vLLM's random dataset
//! builds them (a shared random prefix, then runs of consecutive vocabulary ids from a random
//! offset per request), without special tokens, so no two prompts share a prefix by accident.

use anyhow::{Result, bail};

use super::{Request, Workload, WorkloadInfo};
use crate::util::Rng64;

#[derive(Clone, Debug)]
pub struct RandomOptions {
    pub num_prompts: usize,
    pub input_len: usize,
    pub output_len: usize,
    /// Lengths are drawn uniformly from `[len * (1 - r), len * (1 + r)]`.
    pub range_ratio: f64,
    /// Tokens of one random prefix shared by every prompt (on top of `input_len`).
    pub prefix_len: usize,
    pub seed: u64,
}

/// Builds the requests from `allowed` token ids (the vocabulary minus special tokens).
pub fn sample(opts: &RandomOptions, allowed: &[u32], tokenizer: Option<&str>) -> Result<Workload> {
    if !(0.0..1.0).contains(&opts.range_ratio) {
        bail!(
            "--random-range-ratio must be in [0, 1), got {}",
            opts.range_ratio
        );
    }
    if opts.input_len == 0 && opts.prefix_len == 0 {
        bail!("--input-len must be at least 1 for the random dataset");
    }
    if opts.output_len == 0 {
        bail!("--output-len must be at least 1");
    }
    if allowed.is_empty() {
        bail!("the vocabulary has no ordinary (non-special) tokens to build prompts from");
    }
    let mut rng = Rng64::new(opts.seed);
    let span = |len: usize| -> (usize, usize) {
        let lo = (len as f64 * (1.0 - opts.range_ratio)).floor() as usize;
        let hi = (len as f64 * (1.0 + opts.range_ratio)).ceil() as usize;
        (lo, hi.max(lo))
    };
    let pick = |rng: &mut Rng64| allowed[rng.range_inclusive(0, allowed.len() - 1)];
    let prefix: Vec<u32> = (0..opts.prefix_len).map(|_| pick(&mut rng)).collect();
    let (in_lo, in_hi) = span(opts.input_len);
    let (out_lo, out_hi) = span(opts.output_len);
    let mut requests = Vec::with_capacity(opts.num_prompts);
    for _ in 0..opts.num_prompts {
        let input_len = rng.range_inclusive(in_lo, in_hi);
        let output_len = rng.range_inclusive(out_lo, out_hi).max(1);
        let offset = rng.range_inclusive(0, allowed.len() - 1);
        let mut ids = prefix.clone();
        ids.extend((0..input_len).map(|j| allowed[(offset + j) % allowed.len()]));
        if ids.is_empty() {
            ids.push(pick(&mut rng));
        }
        requests.push(Request {
            prompt_ids: ids,
            max_tokens: output_len,
        });
    }
    let notes = vec![format!(
        "random: input {} (ratio {}), output {}, prefix {}",
        opts.input_len, opts.range_ratio, opts.output_len, opts.prefix_len
    )];
    Ok(synthetic("random", requests, (opts.seed, tokenizer), notes))
}

/// A workload of synthetic prompts (`dataset`), drawn with `seed` from the vocabulary of
/// `tokenizer` (all ids where there is none, which a note says).
pub(super) fn synthetic(
    dataset: &str,
    requests: Vec<Request>,
    (seed, tokenizer): (u64, Option<&str>),
    mut notes: Vec<String>,
) -> Workload {
    if tokenizer.is_none() {
        notes.push("no tokenizer: ids drawn from the model's whole vocabulary".into());
    }
    Workload {
        info: WorkloadInfo {
            dataset: dataset.into(),
            tokenizer: tokenizer.map(str::to_string),
            seed,
            notes,
            ..Default::default()
        },
        requests,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> RandomOptions {
        RandomOptions {
            num_prompts: 50,
            input_len: 100,
            output_len: 20,
            range_ratio: 0.0,
            prefix_len: 0,
            seed: 0,
        }
    }

    #[test]
    fn fixed_lengths_and_allowed_ids_only() {
        let allowed: Vec<u32> = (10..1000).collect();
        let w = sample(&opts(), &allowed, None).unwrap();
        assert_eq!(w.requests.len(), 50);
        for r in &w.requests {
            assert_eq!(r.prompt_ids.len(), 100);
            assert_eq!(r.max_tokens, 20);
            assert!(r.prompt_ids.iter().all(|&t| (10..1000).contains(&t)));
        }
        let again = sample(&opts(), &allowed, None).unwrap();
        assert_eq!(w.fingerprint(), again.fingerprint());
    }

    #[test]
    fn ranges_and_prefix() {
        let allowed: Vec<u32> = (0..500).collect();
        let o = RandomOptions {
            range_ratio: 0.5,
            prefix_len: 7,
            ..opts()
        };
        let w = sample(&o, &allowed, None).unwrap();
        let first = &w.requests[0].prompt_ids[..7];
        for r in &w.requests {
            assert!((7 + 50..=7 + 150).contains(&r.prompt_ids.len()));
            assert!((10..=30).contains(&r.max_tokens));
            assert_eq!(&r.prompt_ids[..7], first);
        }
        let lens: std::collections::HashSet<_> =
            w.requests.iter().map(|r| r.prompt_ids.len()).collect();
        assert!(lens.len() > 5, "lengths should vary");
    }

    #[test]
    fn bad_options() {
        let allowed: Vec<u32> = (0..5).collect();
        let bad_ratio = RandomOptions {
            range_ratio: 1.0,
            ..opts()
        };
        assert!(sample(&bad_ratio, &allowed, None).is_err());
        let zero = RandomOptions {
            input_len: 0,
            ..opts()
        };
        assert!(sample(&zero, &allowed, None).is_err());
        assert!(sample(&opts(), &[], None).is_err());
    }
}

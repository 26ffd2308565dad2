//! The `prefix_repetition` workload, as vLLM's dataset of that name builds it: a few random
//! prefixes, each shared by an equal number of prompts that go on with their own random
//! suffixes, in shuffled order. It is the shape of many requests behind a handful of system
//! prompts, and measures prefix caching under several live prefixes at once (the `random`
//! workload's `--prefix-len` shares one).

use anyhow::{Result, bail};

use super::{Request, Workload};
use crate::util::Rng64;

#[derive(Clone, Debug)]
pub struct PrefixRepetitionOptions {
    pub num_prompts: usize,
    pub prefix_len: usize,
    pub suffix_len: usize,
    pub num_prefixes: usize,
    pub output_len: usize,
    pub seed: u64,
}

/// Builds the requests from `allowed` token ids (the vocabulary minus special tokens): each
/// prefix serves `num_prompts / num_prefixes` prompts, so, as in vLLM, the remainder of the
/// division is not run (the workload line says how many requests there are).
pub fn sample(
    opts: &PrefixRepetitionOptions,
    allowed: &[u32],
    tokenizer: Option<&str>,
) -> Result<Workload> {
    if opts.num_prefixes == 0 {
        bail!("--prefix-repetition-num-prefixes must be at least 1");
    }
    let per_prefix = opts.num_prompts / opts.num_prefixes;
    if per_prefix == 0 {
        bail!(
            "--num-prompts {} is fewer than --prefix-repetition-num-prefixes {}: every prefix needs a prompt",
            opts.num_prompts,
            opts.num_prefixes
        );
    }
    if opts.prefix_len + opts.suffix_len == 0 {
        bail!("--prefix-repetition-prefix-len and --prefix-repetition-suffix-len are both 0");
    }
    if opts.output_len == 0 {
        bail!("--prefix-repetition-output-len must be at least 1");
    }
    if allowed.is_empty() {
        bail!("the vocabulary has no ordinary (non-special) tokens to build prompts from");
    }
    let mut rng = Rng64::new(opts.seed);
    let mut draw = |len: usize| -> Vec<u32> {
        (0..len)
            .map(|_| allowed[rng.range_inclusive(0, allowed.len() - 1)])
            .collect()
    };
    let mut requests = Vec::with_capacity(per_prefix * opts.num_prefixes);
    for _ in 0..opts.num_prefixes {
        let prefix = draw(opts.prefix_len);
        for _ in 0..per_prefix {
            let mut ids = prefix.clone();
            ids.extend(draw(opts.suffix_len));
            requests.push(Request {
                prompt_ids: ids,
                max_tokens: opts.output_len,
            });
        }
    }
    // Fisher-Yates, so that a prefix's prompts arrive spread over the run.
    for i in (1..requests.len()).rev() {
        requests.swap(i, rng.range_inclusive(0, i));
    }
    let mut notes = vec![format!(
        "prefix_repetition: {} prefixes of {} tokens, {per_prefix} prompts each with a suffix of {}, output {}",
        opts.num_prefixes, opts.prefix_len, opts.suffix_len, opts.output_len
    )];
    if per_prefix * opts.num_prefixes < opts.num_prompts {
        notes.push(format!(
            "{} of --num-prompts {} run: a whole number of prompts per prefix, as vLLM does",
            per_prefix * opts.num_prefixes,
            opts.num_prompts
        ));
    }
    let source = (opts.seed, tokenizer);
    Ok(super::random::synthetic(
        "prefix_repetition",
        requests,
        source,
        notes,
    ))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn opts() -> PrefixRepetitionOptions {
        PrefixRepetitionOptions {
            num_prompts: 23,
            prefix_len: 40,
            suffix_len: 9,
            num_prefixes: 4,
            output_len: 7,
            seed: 0,
        }
    }

    #[test]
    fn prefixes_are_shared_evenly_and_shuffled() {
        let allowed: Vec<u32> = (10..5000).collect();
        let w = sample(&opts(), &allowed, None).unwrap();
        // 23 / 4 = 5 per prefix: 20 requests.
        assert_eq!(w.requests.len(), 20);
        let mut by_prefix: HashMap<&[u32], Vec<usize>> = HashMap::new();
        for (i, r) in w.requests.iter().enumerate() {
            assert_eq!((r.prompt_ids.len(), r.max_tokens), (49, 7));
            assert!(r.prompt_ids.iter().all(|&t| (10..5000).contains(&t)));
            by_prefix.entry(&r.prompt_ids[..40]).or_default().push(i);
        }
        assert_eq!(by_prefix.len(), 4);
        assert!(by_prefix.values().all(|v| v.len() == 5));
        // Shuffled: the first five requests do not all share one prefix.
        assert!(by_prefix.values().all(|v| v != &[0, 1, 2, 3, 4]));
        let suffixes: std::collections::HashSet<&[u32]> =
            w.requests.iter().map(|r| &r.prompt_ids[40..]).collect();
        assert_eq!(suffixes.len(), 20);
        assert!(
            w.info
                .notes
                .iter()
                .any(|n| n.contains("20 of --num-prompts 23"))
        );
        let again = sample(&opts(), &allowed, None).unwrap();
        assert_eq!(w.fingerprint(), again.fingerprint());
    }

    #[test]
    fn bad_options_name_their_flag() {
        let allowed: Vec<u32> = (0..50).collect();
        let err = |o: PrefixRepetitionOptions| sample(&o, &allowed, None).unwrap_err().to_string();
        assert!(
            err(PrefixRepetitionOptions {
                num_prompts: 3,
                ..opts()
            })
            .contains("--num-prompts 3")
        );
        assert!(
            err(PrefixRepetitionOptions {
                num_prefixes: 0,
                ..opts()
            })
            .contains("num-prefixes")
        );
        assert!(
            err(PrefixRepetitionOptions {
                output_len: 0,
                ..opts()
            })
            .contains("output-len")
        );
        assert!(sample(&opts(), &[], None).is_err());
    }
}

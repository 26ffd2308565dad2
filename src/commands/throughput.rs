//! `offline-bench throughput`: sample a workload, run it through the engine, report.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, anyhow};
use serde_json::json;

use super::Setup;
use crate::cli::{DatasetName, ThroughputArgs};
use crate::model::hub;
use crate::progress::Progress;
use crate::report::Metrics;
use crate::tokenizer::TextTokenizer;
use crate::workload::chat::{self, ChatOptions, ChatTemplate};
use crate::workload::prefix_repetition::{self, PrefixRepetitionOptions};
use crate::workload::random::{self, RandomOptions};
use crate::workload::sharegpt::{self, SampleOptions, ShareGpt};
use crate::workload::{LengthRules, Workload};

/// Requests per run when `--num-prompts` is not given: vLLM's 1000 on a GPU; on the CPU, a
/// number SmolLM2 finishes in under two minutes on two cores (ShareGPT's longest outputs set
/// the tail: 64 requests took 93 s and 100 took 165 s at commit f8a940d; 64 take 77 s now).
pub const CPU_DEFAULT_PROMPTS: usize = 64;

fn default_num_prompts(args: &ThroughputArgs) -> usize {
    match args.model.device {
        crate::device::DeviceSpec::Cpu => CPU_DEFAULT_PROMPTS,
        crate::device::DeviceSpec::Cuda(_) => 1000,
    }
}

pub fn run(args: &ThroughputArgs) -> Result<()> {
    let progress = Progress::new(args.engine.quiet);
    let setup = Setup::new(&args.model, &progress)?;
    setup.check_engine_args(&args.engine)?;
    let num_prompts = args
        .num_prompts
        .unwrap_or_else(|| default_num_prompts(args));

    let t = Instant::now();
    let workload = match &args.workload {
        Some(path) => {
            let w = Workload::load(path)?;
            if args.num_prompts.is_some() && num_prompts < w.requests.len() {
                w.take(num_prompts)
            } else {
                w
            }
        }
        None => sample_workload(args, &setup, num_prompts, &progress)?,
    };
    workload.validate()?;
    progress.info(format!(
        "sampled the workload in {:.1}s",
        t.elapsed().as_secs_f64()
    ));
    if let Some(path) = &args.save_workload {
        workload.save(path)?;
        progress.info(format!("saved the workload to {}", path.display()));
    }
    println!("{}", workload.summary());
    if args.dry_run {
        return Ok(());
    }

    let mut engine = setup.engine(&args.engine, &progress)?;
    if args.n > 1 && crate::commands::sampling(&args.engine).is_greedy() {
        progress.info(format!(
            "--n {} with greedy sampling: each prompt's outputs are identical (the work is not); --temperature 1 samples as vLLM's benchmark does",
            args.n
        ));
    }
    let total = (workload.requests.len() * args.n) as u64;
    let bar = progress.bar(
        total,
        if args.n > 1 {
            "generations"
        } else {
            "requests"
        },
    );
    let output = engine.run_samples(&workload.requests, args.n, |s| {
        bar.set_position(s.finished as u64);
        if s.elapsed > 0.0 {
            bar.set_message(format!(
                "{:.1} generated tok/s",
                s.generated as f64 / s.elapsed
            ));
        }
    })?;
    bar.finish_and_clear();
    if output.stats.blocks_in_use_after != 0 {
        progress.warn(format!(
            "{} KV blocks were still allocated after the run",
            output.stats.blocks_in_use_after
        ));
    }
    if engine.config().enable_prefix_caching {
        let p = output.stats.prefix_cache;
        progress.info(format!(
            "prefix cache: {} of {} tokens looked up were cached ({:.1}% hit rate); {} tokens computed",
            p.hits,
            p.queries,
            100.0 * p.hit_rate(),
            output.stats.computed_tokens
        ));
    }
    let metrics = Metrics::of(&output);
    print!("{}", metrics.block());
    print!("{}", metrics.vllm_lines());
    if let Some(path) = &args.output_json {
        let mut ctx = setup.context(&engine, &args.model, &args.engine);
        ctx["engine"]["n"] = json!(args.n);
        if let serde_json::Value::Object(m) = &mut ctx {
            m.insert(
                "workload".into(),
                json!({
                    "info": workload.info,
                    "num_requests": workload.requests.len(),
                    "fingerprint": workload.fingerprint(),
                }),
            );
        }
        let report = metrics.json(&output, ctx);
        let bytes = serde_json::to_vec_pretty(&report).context("cannot serialise the report")?;
        crate::util::write_atomic(path, &bytes)?;
        progress.info(format!("wrote {}", path.display()));
    }
    Ok(())
}

/// The dataset file: `--dataset-path`, or the hub's ShareGPT copy.
fn dataset_path(args: &ThroughputArgs, progress: &Progress) -> Result<PathBuf> {
    match &args.dataset_path {
        Some(p) => Ok(p.clone()),
        None => hub::fetch_dataset_file(
            hub::SHAREGPT_REPO,
            hub::SHAREGPT_FILE,
            progress.shows_bars(),
        ),
    }
}

fn tokenizer<'a>(setup: &'a Setup, what: &str) -> Result<&'a TextTokenizer> {
    setup.info.tokenizer.as_ref().ok_or_else(|| {
        anyhow!(
            "the {what} dataset needs a tokenizer: pass --tokenizer (tokenizer.json or its folder)"
        )
    })
}

fn sample_workload(
    args: &ThroughputArgs,
    setup: &Setup,
    num_prompts: usize,
    progress: &Progress,
) -> Result<Workload> {
    let bar = progress.bar(num_prompts as u64, "tokenizing");
    let workload = sample_dataset(args, setup, num_prompts, progress, &bar);
    bar.finish_and_clear();
    workload
}

fn sample_dataset(
    args: &ThroughputArgs,
    setup: &Setup,
    num_prompts: usize,
    progress: &Progress,
    bar: &indicatif::ProgressBar,
) -> Result<Workload> {
    match args.dataset_name {
        DatasetName::Sharegpt => {
            let tok = tokenizer(setup, "sharegpt")?;
            let path = dataset_path(args, progress)?;
            let data = ShareGpt::read(&path)?;
            sharegpt::sample(
                &data,
                tok,
                &SampleOptions {
                    num_prompts,
                    seed: args.engine.seed,
                    output_len: args.output_len,
                    rules: LengthRules::default(),
                },
                &path.display().to_string(),
                &|n| bar.set_position(n as u64),
            )
        }
        DatasetName::Chat => {
            let tok = tokenizer(setup, "chat")?;
            let template = ChatTemplate::of(tok)?;
            let path = dataset_path(args, progress)?;
            let data = ShareGpt::read(&path)?;
            chat::sample(
                &data,
                tok,
                &template,
                &ChatOptions {
                    num_prompts,
                    seed: args.engine.seed,
                    turns: args.prompt_turns,
                    output_len: args.output_len.unwrap_or(250),
                    // The reference run's prompts had no 1024-token cap; only the total is
                    // bounded, as vLLM's sampler bounds it.
                    rules: LengthRules {
                        max_prompt_len: usize::MAX,
                        ..LengthRules::default()
                    },
                },
                &path.display().to_string(),
                &|n| bar.set_position(n as u64),
            )
        }
        DatasetName::Random => {
            let input_len = args
                .input_len
                .ok_or_else(|| anyhow!("the random dataset needs --input-len"))?;
            let opts = RandomOptions {
                num_prompts,
                input_len,
                output_len: args.output_len.unwrap_or(128),
                range_ratio: args.random_range_ratio,
                prefix_len: args.prefix_len,
                seed: args.engine.seed,
            };
            let longest = |len: usize| (len as f64 * (1.0 + opts.range_ratio)).ceil() as usize;
            let (prompt, output) = (
                longest(input_len) + args.prefix_len,
                longest(opts.output_len),
            );
            if prompt + output > setup.max_model_len {
                anyhow::bail!(
                    "random prompts of up to {prompt} tokens plus {output} output tokens exceed --max-model-len {}",
                    setup.max_model_len
                );
            }
            let (allowed, tokenizer) = prompt_ids(setup);
            random::sample(&opts, &allowed, tokenizer)
        }
        DatasetName::PrefixRepetition => {
            let opts = PrefixRepetitionOptions {
                num_prompts,
                prefix_len: args.prefix_repetition_prefix_len,
                suffix_len: args.prefix_repetition_suffix_len,
                num_prefixes: args.prefix_repetition_num_prefixes,
                output_len: args.prefix_repetition_output_len,
                seed: args.engine.seed,
            };
            let total = opts.prefix_len + opts.suffix_len + opts.output_len;
            if total > setup.max_model_len {
                anyhow::bail!(
                    "prefix_repetition prompts of {} + {} tokens plus {} output tokens exceed --max-model-len {}",
                    opts.prefix_len,
                    opts.suffix_len,
                    opts.output_len,
                    setup.max_model_len
                );
            }
            let (allowed, tokenizer) = prompt_ids(setup);
            prefix_repetition::sample(&opts, &allowed, tokenizer)
        }
    }
}

/// The ids synthetic prompts are drawn from: the vocabulary without the tokenizer's special
/// tokens (all of it without a tokenizer), and the tokenizer's name.
fn prompt_ids(setup: &Setup) -> (Vec<u32>, Option<&str>) {
    let vocab = setup.info.config.vocab_size as u32;
    match setup.info.tokenizer.as_ref() {
        Some(tok) => {
            let special = tok.special_ids();
            let allowed = (0..vocab).filter(|i| !special.contains(i)).collect();
            (allowed, Some(tok.source.as_str()))
        }
        None => ((0..vocab).collect(), None),
    }
}

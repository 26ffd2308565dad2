//! The report: the reference block, vLLM's `Throughput:` line, and the JSON file.
//!
//! Token counts come from what the engine actually produced, not from the workload's promises,
//! and rates are totals over the wall-clock time from the first step to the last token. With
//! `n` outputs per request (`--n`), as vLLM counts them: a request's prompt once, every output's
//! tokens; requests/s counts prompts, generations/s outputs.

use serde::Serialize;
use serde_json::{Value, json};

use crate::engine::RunOutput;

/// Mean and percentiles of one per-request quantity, in seconds.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct Distribution {
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl Distribution {
    /// Percentiles with linear interpolation between order statistics (numpy's default).
    pub fn of(values: &[f64]) -> Self {
        if values.is_empty() {
            return Self::default();
        }
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        let pct = |p: f64| {
            let rank = p / 100.0 * (v.len() - 1) as f64;
            let (lo, hi) = (rank.floor() as usize, rank.ceil() as usize);
            v[lo] + (v[hi] - v[lo]) * (rank - lo as f64)
        };
        Self {
            mean: v.iter().sum::<f64>() / v.len() as f64,
            p50: pct(50.0),
            p90: pct(90.0),
            p99: pct(99.0),
            max: v[v.len() - 1],
        }
    }
}

/// The headline figures of a throughput run.
#[derive(Clone, Debug, Serialize)]
pub struct Metrics {
    pub elapsed_time: f64,
    pub num_requests: usize,
    /// Outputs: `num_requests` x `n`.
    pub num_generations: usize,
    pub total_prompt_tokens: usize,
    pub total_output_tokens: usize,
    pub requests_per_second: f64,
    pub generations_per_second: f64,
    pub output_tokens_per_second: f64,
    pub prompt_tokens_per_second: f64,
    pub tokens_per_second: f64,
    /// Per request.
    pub avg_prompt_tokens: f64,
    /// Per generation.
    pub avg_output_tokens: f64,
    /// Time to first token, per generation.
    pub ttft: Distribution,
    /// Time per output token after the first.
    pub tpot: Distribution,
    /// Time to the last token.
    pub e2e: Distribution,
}

impl Metrics {
    pub fn of(run: &RunOutput) -> Self {
        let generations = run.outputs.len();
        let firsts = || run.outputs.iter().filter(|o| o.sample == 0);
        let n = firsts().count();
        let t = run.stats.elapsed.max(f64::MIN_POSITIVE);
        let prompt: usize = firsts().map(|o| o.prompt_len).sum();
        let output: usize = run.outputs.iter().map(|o| o.output_ids.len()).sum();
        let ttft: Vec<f64> = run.outputs.iter().map(|o| o.ttft).collect();
        let e2e: Vec<f64> = run.outputs.iter().map(|o| o.e2e).collect();
        let tpot: Vec<f64> = run
            .outputs
            .iter()
            .filter(|o| o.output_ids.len() > 1)
            .map(|o| (o.e2e - o.ttft) / (o.output_ids.len() - 1) as f64)
            .collect();
        Self {
            elapsed_time: run.stats.elapsed,
            num_requests: n,
            num_generations: generations,
            total_prompt_tokens: prompt,
            total_output_tokens: output,
            requests_per_second: n as f64 / t,
            generations_per_second: generations as f64 / t,
            output_tokens_per_second: output as f64 / t,
            prompt_tokens_per_second: prompt as f64 / t,
            tokens_per_second: (prompt + output) as f64 / t,
            avg_prompt_tokens: prompt as f64 / n.max(1) as f64,
            avg_output_tokens: output as f64 / generations.max(1) as f64,
            ttft: Distribution::of(&ttft),
            tpot: Distribution::of(&tpot),
            e2e: Distribution::of(&e2e),
        }
    }

    /// The block of the reference report: same labels, same order.
    pub fn block(&self) -> String {
        let rule = "* ==========================================================";
        let line = |label: &str, value: String| format!("{:<32}{value}\n", format!("* {label}:"));
        let mut s = format!("{rule}\n");
        s += &line("Total Time", format!("{:.2}", self.elapsed_time));
        s += &line("Total Generations", self.num_generations.to_string());
        s += &line(
            "Generations / Sec",
            format!("{:.2}", self.generations_per_second),
        );
        s += &line(
            "Generation Tok / Sec",
            format!("{:.2}", self.output_tokens_per_second),
        );
        s += &line(
            "Prompt Tok / Sec",
            format!("{:.2}", self.prompt_tokens_per_second),
        );
        s += &line(
            "Avg Generation Tokens",
            format!("{:.2}", self.avg_output_tokens),
        );
        s += &line(
            "Avg Prompt Tokens",
            format!("{:.2}", self.avg_prompt_tokens),
        );
        s += rule;
        s += "\n";
        s
    }

    /// vLLM's summary lines.
    pub fn vllm_lines(&self) -> String {
        format!(
            "Throughput: {:.2} requests/s, {:.2} total tokens/s, {:.2} output tokens/s\n\
             Total num prompt tokens:  {}\nTotal num output tokens:  {}\n",
            self.requests_per_second,
            self.tokens_per_second,
            self.output_tokens_per_second,
            self.total_prompt_tokens,
            self.total_output_tokens
        )
    }

    /// The JSON report: vLLM's five keys first, then our figures, then `context` (engine,
    /// model, workload, machine, commit) and one record per generation (its request and
    /// sample index, lengths, times).
    pub fn json(&self, run: &RunOutput, context: Value) -> Value {
        let requests: Vec<Value> = run
            .outputs
            .iter()
            .map(|o| {
                json!({
                    "request": o.request,
                    "sample": o.sample,
                    "prompt_len": o.prompt_len,
                    "output_len": o.output_ids.len(),
                    "ttft_s": o.ttft,
                    "e2e_s": o.e2e,
                    "preemptions": o.preemptions,
                })
            })
            .collect();
        let s = &run.stats;
        let mut v = json!({
            "elapsed_time": self.elapsed_time,
            "num_requests": self.num_requests,
            "total_num_tokens": self.total_prompt_tokens + self.total_output_tokens,
            "requests_per_second": self.requests_per_second,
            "tokens_per_second": self.tokens_per_second,
            "num_generations": self.num_generations,
            "generations_per_second": self.generations_per_second,
            "output_tokens_per_second": self.output_tokens_per_second,
            "prompt_tokens_per_second": self.prompt_tokens_per_second,
            "total_prompt_tokens": self.total_prompt_tokens,
            "total_output_tokens": self.total_output_tokens,
            "avg_prompt_tokens": self.avg_prompt_tokens,
            "avg_output_tokens": self.avg_output_tokens,
            "ttft_s": self.ttft,
            "tpot_s": self.tpot,
            "e2e_s": self.e2e,
            "num_preemptions": s.preemptions,
            "engine_stats": {
                "steps": s.steps,
                "computed_tokens": s.computed_tokens,
                "max_batch_seqs": s.max_batch_seqs,
                "schedule_s": s.schedule_time,
                "prepare_s": s.step_times.prepare,
                "forward_s": s.step_times.forward,
                "sample_s": s.step_times.sample,
                "prefix_cache_queries": s.prefix_cache.queries,
                "prefix_cache_hits": s.prefix_cache.hits,
                "prefix_cache_hit_rate": s.prefix_cache.hit_rate(),
            },
        });
        if let (Value::Object(out), Value::Object(ctx)) = (&mut v, context) {
            out.extend(ctx);
            out.insert("requests".into(), Value::Array(requests));
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{RequestOutput, RunStats};

    #[test]
    fn percentiles_interpolate_like_numpy() {
        let d = Distribution::of(&[1.0, 2.0, 3.0, 4.0]);
        assert_eq!(d.mean, 2.5);
        assert!((d.p50 - 2.5).abs() < 1e-12);
        assert!((d.p90 - 3.7).abs() < 1e-12);
        assert_eq!(d.max, 4.0);
        assert_eq!(Distribution::of(&[]), Distribution::default());
    }

    fn out(
        request: usize,
        sample: usize,
        p: usize,
        o: usize,
        ttft: f64,
        e2e: f64,
    ) -> RequestOutput {
        RequestOutput {
            request,
            sample,
            prompt_len: p,
            output_ids: vec![0; o],
            ttft,
            e2e,
            preemptions: 0,
        }
    }

    fn run() -> RunOutput {
        RunOutput {
            outputs: vec![out(0, 0, 100, 10, 1.0, 2.0), out(1, 0, 300, 30, 1.0, 4.0)],
            stats: RunStats {
                elapsed: 4.0,
                ..Default::default()
            },
        }
    }

    #[test]
    fn reference_block_layout() {
        let m = Metrics::of(&run());
        let expected = "\
* ==========================================================
* Total Time:                   4.00
* Total Generations:            2
* Generations / Sec:            0.50
* Generation Tok / Sec:         10.00
* Prompt Tok / Sec:             100.00
* Avg Generation Tokens:        20.00
* Avg Prompt Tokens:            200.00
* ==========================================================
";
        assert_eq!(m.block(), expected);
        assert!(m.vllm_lines().starts_with(
            "Throughput: 0.50 requests/s, 110.00 total tokens/s, 10.00 output tokens/s\n"
        ));
        // TPOT: (2-1)/9 and (4-1)/29.
        assert!((m.tpot.max - 1.0 / 9.0).abs() < 1e-12);
    }

    #[test]
    fn n_outputs_count_the_prompt_once() {
        // Two requests with two outputs each, as vLLM counts them: prompts once, all outputs.
        let r = RunOutput {
            outputs: vec![
                out(0, 0, 100, 10, 1.0, 2.0),
                out(0, 1, 100, 10, 1.0, 2.0),
                out(1, 0, 300, 30, 1.0, 4.0),
                out(1, 1, 300, 30, 2.0, 4.0),
            ],
            stats: RunStats {
                elapsed: 4.0,
                ..Default::default()
            },
        };
        let m = Metrics::of(&r);
        assert_eq!((m.num_requests, m.num_generations), (2, 4));
        assert_eq!((m.total_prompt_tokens, m.total_output_tokens), (400, 80));
        assert!(m.block().contains("* Total Generations:            4\n"));
        assert!(m.block().contains("* Generations / Sec:            1.00\n"));
        assert!(
            m.block()
                .contains("* Avg Generation Tokens:        20.00\n")
        );
        assert!(
            m.block()
                .contains("* Avg Prompt Tokens:            200.00\n")
        );
        assert!(m.vllm_lines().starts_with(
            "Throughput: 0.50 requests/s, 120.00 total tokens/s, 20.00 output tokens/s\n"
        ));
        let v = m.json(&r, json!({}));
        assert_eq!(v["total_num_tokens"], 480);
        assert_eq!(v["requests"][3]["request"], 1);
        assert_eq!(v["requests"][3]["sample"], 1);
        assert_eq!(m.ttft.max, 2.0);
    }

    #[test]
    fn json_has_vllm_keys_and_requests() {
        let r = run();
        let m = Metrics::of(&r);
        let v = m.json(&r, json!({"commit": "abc"}));
        for k in [
            "elapsed_time",
            "num_requests",
            "total_num_tokens",
            "requests_per_second",
            "tokens_per_second",
        ] {
            assert!(v.get(k).is_some(), "{k}");
        }
        assert_eq!(v["total_num_tokens"], 440);
        assert_eq!(v["commit"], "abc");
        assert_eq!(v["requests"].as_array().unwrap().len(), 2);
        assert_eq!(v["requests"][1]["output_len"], 30);
    }
}

//! The binary end to end on the real assets: sampling as vLLM samples, the report and its JSON,
//! saved workloads, generate, and the other ways to name a model (HF folder, hub cache, preset).

mod common;

use std::path::Path;

use common::run;

fn ok(args: &[&str]) -> String {
    ok_with_stderr(args).0
}

/// A successful run's stdout and stderr (the status lines).
fn ok_with_stderr(args: &[&str]) -> (String, String) {
    let (code, out, err) = run(args, &[]);
    assert_eq!(code, 0, "{args:?} failed: {err}");
    (out, err)
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

#[test]
fn sharegpt_sample_matches_vllm_with_the_llama3_tokenizer() {
    // vLLM's ShareGPT sampling (random.seed(0); random.shuffle; first two turns tokenized with
    // special tokens; 4 <= prompt <= 1024, output >= 4, total <= 2048), replayed in Python with
    // the same file and tokenizer, gives 17400 eligible conversations, 1121 examined, and
    // averages of 231.238 prompt and 188.619 output tokens.
    let out = ok(&[
        "throughput",
        "--quiet",
        "--model",
        "llama-3-8b",
        "--tokenizer",
        &s(&common::llama3_tokenizer()),
        "--dataset-name",
        "sharegpt",
        "--dataset-path",
        &s(&common::sharegpt()),
        "--num-prompts",
        "1000",
        "--seed",
        "0",
        "--dry-run",
    ]);
    assert!(
        out.contains("1000 requests, avg prompt 231.24 tokens, avg output 188.62 tokens"),
        "{out}"
    );
    assert!(
        out.contains("eligible conversations: 17400, examined 1121"),
        "{out}"
    );
    assert!(out.contains("17671 complete records"), "{out}");
}

#[test]
fn chat_workload_renders_the_template() {
    // The same Python replay with Llama-3's template: 7529 conversations whose first three
    // turns alternate user/assistant; the first 1000 accepted average 468.016 prompt tokens.
    let out = ok(&[
        "throughput",
        "--quiet",
        "--model",
        "llama-3-8b",
        "--tokenizer",
        &s(&common::llama3_tokenizer()),
        "--dataset-name",
        "chat",
        "--dataset-path",
        &s(&common::sharegpt()),
        "--num-prompts",
        "1000",
        "--dry-run",
    ]);
    assert!(
        out.contains("1000 requests, avg prompt 468.02 tokens, avg output 250.00 tokens"),
        "{out}"
    );
    assert!(out.contains("eligible conversations: 7529"), "{out}");
}

#[test]
fn throughput_prints_the_report_and_writes_json() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("report.json");
    let out = ok(&[
        "throughput",
        "--quiet",
        "--model",
        &s(&common::smollm_gguf()),
        "--dataset-path",
        &s(&common::sharegpt()),
        "--num-prompts",
        "4",
        "--output-len",
        "3",
        "--output-json",
        &s(&json),
    ]);
    let labels = [
        "* Total Time:",
        "* Total Generations:            4",
        "* Generations / Sec:",
        "* Generation Tok / Sec:",
        "* Prompt Tok / Sec:",
        "* Avg Generation Tokens:        3.00",
        "* Avg Prompt Tokens:",
    ];
    let mut at = 0;
    for l in labels {
        let i = out[at..]
            .find(l)
            .unwrap_or_else(|| panic!("{l:?} missing or out of order:\n{out}"));
        at += i;
    }
    assert!(out.contains("Throughput: "), "{out}");
    assert!(out.contains("Total num output tokens:  12"), "{out}");

    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    for k in [
        "elapsed_time",
        "num_requests",
        "total_num_tokens",
        "requests_per_second",
        "tokens_per_second",
    ] {
        assert!(v.get(k).is_some(), "vLLM key {k} missing");
    }
    assert_eq!(v["num_requests"], 4);
    assert_eq!(v["total_output_tokens"], 12);
    assert!(v["output_tokens_per_second"].as_f64().unwrap() > 0.0);
    assert!(v["prompt_tokens_per_second"].as_f64().unwrap() > 0.0);
    for d in ["ttft_s", "tpot_s", "e2e_s"] {
        for p in ["mean", "p50", "p90", "p99"] {
            assert!(v[d][p].is_number(), "{d}.{p}");
        }
    }
    let reqs = v["requests"].as_array().unwrap();
    assert_eq!(reqs.len(), 4);
    for r in reqs {
        assert_eq!(r["output_len"], 3);
        assert!(r["prompt_len"].as_u64().unwrap() >= 4);
        assert!(r["ttft_s"].as_f64().unwrap() <= r["e2e_s"].as_f64().unwrap());
    }
    assert_eq!(v["engine"]["block_size"], 16);
    assert!(v["kv_cache"]["num_blocks"].as_u64().unwrap() > 0);
    assert!(v["num_preemptions"].is_number());
    assert_eq!(v["workload"]["fingerprint"].as_str().unwrap().len(), 16);
    assert!(v["commit"].is_string() && v["device"].as_str().unwrap().starts_with("cpu"));
}

/// `--kv-cache-dtype fp8`: the same budget holds twice the blocks of the f16 default, and the
/// report says which cache the run used.
#[test]
fn fp8_kv_cache_doubles_the_blocks_and_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let mut blocks = Vec::new();
    for kv in ["auto", "fp8"] {
        let json = dir.path().join(format!("{kv}.json"));
        ok(&[
            "throughput",
            "--quiet",
            "--model",
            &s(&common::smollm_gguf()),
            "--dataset-name",
            "random",
            "--input-len",
            "20",
            "--output-len",
            "2",
            "--num-prompts",
            "2",
            "--kv-cache-memory",
            "64MiB",
            "--kv-cache-dtype",
            kv,
            "--output-json",
            &s(&json),
        ]);
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
        let want = if kv == "fp8" { "fp8_e4m3" } else { "f16" };
        assert_eq!(v["kv_cache"]["dtype"], want);
        assert_eq!(v["total_output_tokens"], 4);
        blocks.push(v["kv_cache"]["num_blocks"].as_u64().unwrap());
    }
    // SmolLM2: 30 layers x 3 KV heads x 64 x 2 (K and V) values per token, 16 tokens per
    // block: 368640 bytes in f16, 184320 in fp8; 64 MiB holds 182 and 364 of them.
    assert_eq!(blocks, [182, 364]);
}

#[test]
fn prefix_caching_is_on_by_default_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    // Four random prompts behind one 64-token prefix: the last three find its four blocks.
    let run_with = |flags: &[&str]| {
        let json = dir.path().join("r.json");
        let mut args = vec![
            "throughput",
            "--model",
            "smollm2-135m",
            "--load-format",
            "dummy",
            "--dataset-name",
            "random",
            "--input-len",
            "8",
            "--prefix-len",
            "64",
            "--output-len",
            "2",
            "--num-prompts",
            "4",
            "--kv-cache-memory",
            "64MiB",
        ];
        let json_arg = s(&json);
        args.extend_from_slice(flags);
        args.extend_from_slice(&["--output-json", &json_arg]);
        let (code, _, err) = run(&args, &[]);
        assert_eq!(code, 0, "{args:?} failed: {err}");
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
        (err, v)
    };
    let (err, v) = run_with(&[]);
    assert!(
        err.contains("prefix cache: 192 of 288 tokens looked up were cached"),
        "{err}"
    );
    assert_eq!(v["engine"]["enable_prefix_caching"], true);
    assert_eq!(v["engine_stats"]["prefix_cache_hits"], 192);
    assert_eq!(v["engine_stats"]["computed_tokens"], 288 - 192 + 4);
    let (err, v) = run_with(&["--no-enable-prefix-caching"]);
    assert!(!err.contains("prefix cache:"), "{err}");
    assert_eq!(v["engine"]["enable_prefix_caching"], false);
    assert_eq!(v["engine_stats"]["prefix_cache_hits"], 0);
    assert_eq!(v["engine_stats"]["computed_tokens"], 288 + 4);
    // The last of the two flags wins, as with vLLM's.
    let (_, v) = run_with(&["--no-enable-prefix-caching", "--enable-prefix-caching"]);
    assert_eq!(v["engine"]["enable_prefix_caching"], true);
}

/// `throughput` over SmolLM2's shapes with dummy weights and a 64 MiB cache, plus `args`,
/// writing its report to `json`: its stdout, its stderr (the status lines) and the report.
fn dummy_throughput(json: &Path, args: &[&str]) -> (String, String, serde_json::Value) {
    let json_arg = s(json);
    let mut all = vec![
        "throughput",
        "--model",
        "smollm2-135m",
        "--load-format",
        "dummy",
        "--kv-cache-memory",
        "64MiB",
        "--output-json",
        &json_arg,
    ];
    all.extend_from_slice(args);
    let (out, err) = ok_with_stderr(&all);
    let v = serde_json::from_slice(&std::fs::read(json).unwrap()).unwrap();
    (out, err, v)
}

/// int8 weights with bf16 products, and int4 weights (f32 products, the LM head int8): both
/// run and say so in the report, whose weight bytes are the quantized ones.
#[test]
fn quantized_weights_run_and_are_reported() {
    if !offline_bench::gemm::panels_run_here() {
        return; // refused without AVX2 (its one-line error: `check_quantization`)
    }
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = Vec::new();
    for (quant, dtype) in [("int8", "bf16"), ("int4", "f32")] {
        let args = [
            "--dataset-name",
            "random",
            "--input-len",
            "40",
            "--output-len",
            "4",
            "--num-prompts",
            "4",
            "--quantization",
            quant,
            "--dtype",
            dtype,
        ];
        let (_, _, v) = dummy_throughput(&dir.path().join(format!("{quant}.json")), &args);
        assert_eq!(v["model"]["quantization"], quant);
        assert_eq!(v["model"]["dtype"], dtype);
        assert_eq!(v["num_generations"], 4);
        assert_eq!(v["total_output_tokens"], 16);
        bytes.push(v["model"]["weight_bytes"].as_u64().unwrap());
    }
    // SmolLM2's projections (106M weights) at 0.625 bytes instead of 1.0625: 46 MB fewer.
    let saved = bytes[0] - bytes[1];
    assert!((44_000_000..49_000_000).contains(&saved), "{bytes:?}");
}

/// `--threads` sizes the pool the forward pass runs in; the report names the size it ran with.
#[test]
fn threads_flag_sizes_the_pool() {
    let dir = tempfile::tempdir().unwrap();
    for (threads, ends) in [("1", ", 1 thread"), ("3", ", 3 threads")] {
        let args = [
            "--dataset-name",
            "random",
            "--input-len",
            "24",
            "--output-len",
            "3",
            "--num-prompts",
            "2",
            "--threads",
            threads,
        ];
        let (_, err, v) = dummy_throughput(&dir.path().join(format!("t{threads}.json")), &args);
        let device = v["device"].as_str().unwrap();
        assert!(device.ends_with(ends), "{device}");
        assert_eq!(v["total_output_tokens"], 6);
        // The status lines name it too (stderr, off with --quiet).
        let status = format!("device: {device}");
        assert!(err.lines().any(|l| l == status), "{err}");
    }
}

#[test]
fn n_outputs_per_prompt_are_counted_as_vllm_counts_them() {
    // Two 40-token prompts, three outputs each: the later two of each find the prompt's two
    // full blocks and compute only its last 8 tokens.
    let dir = tempfile::tempdir().unwrap();
    let (out, _, v) = dummy_throughput(
        &dir.path().join("n.json"),
        &[
            "--dataset-name",
            "random",
            "--input-len",
            "40",
            "--output-len",
            "3",
            "--num-prompts",
            "2",
            "--n",
            "3",
            "--temperature",
            "1",
        ],
    );
    assert!(out.contains("* Total Generations:            6\n"), "{out}");
    assert!(
        out.contains("* Avg Prompt Tokens:            40.00\n"),
        "{out}"
    );
    assert!(out.contains("Total num prompt tokens:  80\n"), "{out}");
    assert!(out.contains("Total num output tokens:  18\n"), "{out}");
    assert_eq!(v["num_requests"], 2);
    assert_eq!(v["num_generations"], 6);
    assert_eq!(v["total_num_tokens"], 98);
    assert_eq!(v["engine"]["n"], 3);
    assert_eq!(v["engine_stats"]["prefix_cache_hits"], 4 * 32);
    assert_eq!(v["engine_stats"]["computed_tokens"], 80 + 4 * 8 + 6 * 2);
    let samples: Vec<(u64, u64)> = v["requests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["request"].as_u64().unwrap(),
                r["sample"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(samples, [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]);
}

#[test]
fn compare_puts_reports_side_by_side() {
    // Two runs of one configuration as column A, one with fewer sequences at a time as B.
    let dir = tempfile::tempdir().unwrap();
    let report = |name: &str, max_seqs: &str| {
        let json = dir.path().join(name);
        let shape = ["--dataset-name", "random", "--input-len", "16"];
        let more = ["--output-len", "4", "--num-prompts", "4", "--max-num-seqs"];
        dummy_throughput(&json, &[&shape[..], &more, &[max_seqs]].concat());
        s(&json)
    };
    let a = format!("{},{}", report("a1.json", "4"), report("a2.json", "4"));
    let b = report("b.json", "1");
    let out = ok(&["compare", &a, &b]);
    assert!(out.contains("(2 runs: medians, ± half the range)"), "{out}");
    assert!(
        out.contains("  max num seqs") && out.contains("A: 4  B: 1"),
        "{out}"
    );
    assert!(out.contains("  model: smollm2-135m"), "{out}");
    assert!(!out.contains("warning"), "{out}");
    let steps = out.lines().find(|l| l.starts_with("Engine steps")).unwrap();
    // All four prefill in one step and decode together, or one sequence at a time.
    let cells: Vec<&str> = steps.split_whitespace().collect();
    assert_eq!(cells[2..], ["4", "16", "4.00x"], "{steps}");
    let (code, _, err) = run(&["compare", &a, &s(&dir.path().join("none.json"))], &[]);
    assert_ne!(code, 0);
    assert!(
        err.contains("none.json") && err.lines().count() == 1,
        "{err}"
    );
}

#[test]
fn prefix_repetition_prompts_share_their_prefixes() {
    // Seven prompts over two 32-token prefixes: three per prefix (the seventh is not run, as in
    // vLLM); the second and third of each find the prefix's two blocks.
    let dir = tempfile::tempdir().unwrap();
    let (out, _, v) = dummy_throughput(
        &dir.path().join("p.json"),
        &[
            "--dataset-name",
            "prefix_repetition",
            "--num-prompts",
            "7",
            "--prefix-repetition-prefix-len",
            "32",
            "--prefix-repetition-suffix-len",
            "8",
            "--prefix-repetition-num-prefixes",
            "2",
            "--prefix-repetition-output-len",
            "2",
        ],
    );
    assert!(
        out.contains("workload prefix_repetition: 6 requests, avg prompt 40.00 tokens"),
        "{out}"
    );
    assert!(out.contains("6 of --num-prompts 7 run"), "{out}");
    assert_eq!(v["engine_stats"]["prefix_cache_hits"], 4 * 32);
    assert_eq!(v["engine_stats"]["computed_tokens"], 6 * 40 - 4 * 32 + 6);
}

#[test]
fn saved_workload_runs_without_dataset_or_tokenizer() {
    let dir = tempfile::tempdir().unwrap();
    let saved = dir.path().join("workload.json");
    let sampled = ok(&[
        "throughput",
        "--quiet",
        "--model",
        &s(&common::smollm_gguf()),
        "--dataset-path",
        &s(&common::sharegpt()),
        "--num-prompts",
        "3",
        "--output-len",
        "2",
        "--save-workload",
        &s(&saved),
        "--dry-run",
    ]);
    let fp = sampled
        .split("fingerprint ")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap();
    // A preset with dummy weights: no model file, no dataset, no tokenizer.
    let json = dir.path().join("r.json");
    let out = ok(&[
        "throughput",
        "--quiet",
        "--model",
        "smollm2-135m",
        "--load-format",
        "dummy",
        "--workload",
        &s(&saved),
        "--output-json",
        &s(&json),
    ]);
    assert!(out.contains(&format!("fingerprint {fp}")), "{out}");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(v["workload"]["fingerprint"], fp);
    assert_eq!(v["num_requests"], 3);
    assert_eq!(v["model"]["load_format"], "dummy");
}

/// `generate`'s output ids line.
fn generated_ids(model: &str, envs: &[(&str, &str)]) -> String {
    let args = [
        "generate",
        "--quiet",
        "--model",
        model,
        "--prompt",
        "The capital of France is",
        "--max-tokens",
        "8",
    ];
    let (code, out, err) = run(&args, envs);
    assert_eq!(code, 0, "{model}: {err}");
    out.lines()
        .find(|l| l.starts_with("output ids:"))
        .unwrap_or_default()
        .to_string()
}

#[test]
fn generate_continues_the_prompt() {
    let (code, out, err) = run(
        &[
            "generate",
            "--quiet",
            "--model",
            &s(&common::smollm_gguf()),
            "--prompt",
            "The capital of France is",
            "--max-tokens",
            "4",
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("The capital of France is Paris"), "{out}");
    assert!(out.contains("output ids: [7042, 30,"), "{out}");
}

#[test]
fn hf_folder_and_hub_cache_give_the_gguf_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("smollm2");
    common::write_hf_folder(&folder);
    let want = generated_ids(&s(&common::smollm_gguf()), &[]);
    assert!(want.starts_with("output ids: [7042"), "{want}");
    assert_eq!(generated_ids(&s(&folder), &[]), want, "safetensors folder");

    // The same folder as a snapshot in a Hugging Face cache, read with HF_HUB_OFFLINE=1.
    let home = dir.path().join("hf");
    let repo = home.join("hub/models--offline-bench--smollm2");
    let snap = repo.join("snapshots/0123456789abcdef");
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123456789abcdef").unwrap();
    for f in std::fs::read_dir(&folder).unwrap() {
        let f = f.unwrap().path();
        std::fs::rename(&f, snap.join(f.file_name().unwrap())).unwrap();
    }
    let envs = [("HF_HOME", home.to_str().unwrap()), ("HF_HUB_OFFLINE", "1")];
    assert_eq!(
        generated_ids("offline-bench/smollm2", &envs),
        want,
        "hub cache"
    );

    let (code, _, err) = run(
        &[
            "generate",
            "--quiet",
            "--model",
            "offline-bench/absent",
            "--prompt",
            "x",
        ],
        &envs,
    );
    assert_ne!(code, 0);
    assert!(
        err.contains("not in the Hugging Face cache") && err.contains("HF_HUB_OFFLINE"),
        "{err}"
    );
}

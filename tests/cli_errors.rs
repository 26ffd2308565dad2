//! Bad input ends with one line on stderr that names the cause, and a non-zero exit; never a
//! panic, never a partial output file.

mod common;

use std::path::Path;

fn run(args: &[&str]) -> (i32, String, String) {
    common::run(args, &[])
}

/// Asserts a failed run with a single stderr line containing every one of `words`.
fn assert_one_line_error(args: &[&str], words: &[&str]) {
    let (code, _, err) = run(args);
    assert_ne!(code, 0, "{args:?} should fail");
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{args:?}: expected one line, got {err:?}");
    for w in words {
        assert!(lines[0].contains(w), "{args:?}: {:?} lacks {w:?}", lines[0]);
    }
}

fn path_str(p: &Path) -> String {
    p.display().to_string()
}

/// `base` then `extra`, as owned arguments.
fn argv(base: &[&str], extra: &[&str]) -> Vec<String> {
    base.iter().chain(extra).map(|s| s.to_string()).collect()
}

/// A throughput invocation on the real model with the given dataset path.
fn with_dataset(dataset: &str, extra: &[&str]) -> Vec<String> {
    let model = path_str(&common::smollm_gguf());
    let base = [
        "throughput",
        "--quiet",
        "--model",
        &model,
        "--dataset-path",
        dataset,
        "--num-prompts",
        "2",
        "--output-len",
        "2",
    ];
    argv(&base, extra)
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[test]
fn missing_model_path() {
    assert_one_line_error(
        &[
            "generate",
            "--model",
            "/nonexistent/model.gguf",
            "--prompt",
            "hi",
        ],
        &["/nonexistent/model.gguf", "does not exist"],
    );
    assert_one_line_error(
        &["generate", "--model", "no-such-preset", "--prompt", "hi"],
        &["no-such-preset", "preset"],
    );
}

#[test]
fn garbled_config_gguf_and_tokenizer() {
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("model");
    std::fs::create_dir(&folder).unwrap();
    std::fs::write(folder.join("config.json"), "{\"hidden_size\": 12, oops").unwrap();
    assert_one_line_error(
        &["generate", "--model", &path_str(&folder), "--prompt", "hi"],
        &["config.json", "not a valid model config"],
    );

    let gguf = dir.path().join("broken.gguf");
    std::fs::write(&gguf, b"GGUF\x03\x00\x00\x00 this is not really a model").unwrap();
    assert_one_line_error(
        &["generate", "--model", &path_str(&gguf), "--prompt", "hi"],
        &["broken.gguf", "not a readable GGUF file"],
    );

    // A real GGUF cut short: the header reads, the tensors do not.
    let short = dir.path().join("short.gguf");
    let bytes = std::fs::read(common::smollm_gguf()).unwrap();
    std::fs::write(&short, &bytes[..bytes.len() / 2]).unwrap();
    assert_one_line_error(
        &["generate", "--model", &path_str(&short), "--prompt", "hi"],
        &["short.gguf"],
    );

    let tok = dir.path().join("tokenizer.json");
    std::fs::write(&tok, "{\"model\": 42}").unwrap();
    assert_one_line_error(
        &[
            "generate",
            "--model",
            &path_str(&common::smollm_gguf()),
            "--tokenizer",
            &path_str(&tok),
            "--prompt",
            "hi",
        ],
        &["tokenizer", "tokenizer.json"],
    );
}

#[test]
fn missing_garbage_and_broken_datasets() {
    let dir = tempfile::tempdir().unwrap();
    let args = with_dataset("/nonexistent/sharegpt.json", &[]);
    assert_one_line_error(
        &strs(&args),
        &["/nonexistent/sharegpt.json", "cannot read dataset"],
    );

    let garbage = dir.path().join("garbage.json");
    std::fs::write(&garbage, "hello, world").unwrap();
    let args = with_dataset(&path_str(&garbage), &[]);
    assert_one_line_error(&strs(&args), &["garbage.json", "not a ShareGPT JSON file"]);

    // Complete records, then damage in the middle, then more records.
    let broken = dir.path().join("broken.json");
    let good = r#"{"id":"a","conversations":[{"from":"human","value":"What is two plus two?"},{"from":"gpt","value":"Two plus two is four."}]}"#;
    let text = format!(
        "[{good},\n{good},\n{{\"id\": \"b\", \"conversations\": [{{\"from\" \"human\"}}]}},\n{good}]"
    );
    std::fs::write(&broken, &text).unwrap();
    let offset = text.find("\"from\" \"human\"").unwrap() + "\"from\" ".len();
    let args = with_dataset(&path_str(&broken), &[]);
    assert_one_line_error(
        &strs(&args),
        &["broken.json", "record 2", &format!("byte {offset}")],
    );
}

#[test]
fn zero_prompts_and_unknown_load_format() {
    assert_one_line_error(
        &[
            "throughput",
            "--model",
            "smollm2-135m",
            "--num-prompts",
            "0",
        ],
        &["--num-prompts", "0"],
    );
    assert_one_line_error(
        &["throughput", "--model", "smollm2-135m", "--n", "0"],
        &["--n", "0"],
    );
    assert_one_line_error(
        &["throughput", "--model", "smollm2-135m", "--threads", "0"],
        &["--threads", "0"],
    );
    assert_one_line_error(
        &[
            "generate",
            "--model",
            "smollm2-135m",
            "--prompt",
            "x",
            "--load-format",
            "pickle",
        ],
        &["--load-format", "pickle"],
    );
}

#[test]
fn random_prompt_longer_than_max_model_len() {
    assert_one_line_error(
        &[
            "throughput",
            "--quiet",
            "--model",
            &path_str(&common::smollm_gguf()),
            "--dataset-name",
            "random",
            "--input-len",
            "3000",
            "--max-model-len",
            "2048",
            "--dry-run",
        ],
        &["3000", "--max-model-len 2048"],
    );
}

#[test]
fn kv_budget_too_small_for_one_sequence() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("report.json");
    assert_one_line_error(
        &[
            "throughput",
            "--quiet",
            "--model",
            &path_str(&common::smollm_gguf()),
            "--dataset-name",
            "random",
            "--input-len",
            "200",
            "--output-len",
            "8",
            "--num-prompts",
            "2",
            "--kv-cache-memory",
            "1MiB",
            "--output-json",
            &path_str(&json),
        ],
        &[
            "KV cache is too small for one sequence",
            "--kv-cache-memory",
        ],
    );
    assert!(!json.exists(), "no partial report");
    let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert!(leftovers.is_empty(), "no temporary files left behind");
}

#[test]
fn bad_flag_values() {
    assert_one_line_error(
        &[
            "generate",
            "--model",
            "smollm2-135m",
            "--prompt",
            "x",
            "--device",
            "tpu",
        ],
        &["--device", "tpu"],
    );
    assert_one_line_error(
        &[
            "generate",
            "--model",
            "smollm2-135m",
            "--prompt",
            "x",
            "--dtype",
            "int3",
        ],
        &["--dtype", "int3"],
    );
    assert_one_line_error(
        &[
            "generate",
            "--model",
            "smollm2-135m",
            "--prompt",
            "x",
            "--device",
            "cuda",
        ],
        &["without CUDA"],
    );
    assert_one_line_error(
        &[
            "generate",
            "--model",
            "smollm2-135m",
            "--prompt",
            "x",
            "--kv-cache-memory",
            "lots",
        ],
        &["--kv-cache-memory", "lots"],
    );
    // int8 weights compute in f32 or bf16, not f16 (whatever the CPU).
    assert_one_line_error(
        &[
            "generate",
            "--model",
            "smollm2-135m",
            "--load-format",
            "dummy",
            "--prompt",
            "x",
            "--quantization",
            "int8",
            "--dtype",
            "f16",
        ],
        &["--quantization int8", "--dtype", "f16"],
    );
    // int4 weights compute in f32 or bf16, as int8's.
    assert_one_line_error(
        &[
            "generate",
            "--model",
            "smollm2-135m",
            "--load-format",
            "dummy",
            "--prompt",
            "x",
            "--quantization",
            "int4",
            "--dtype",
            "f16",
        ],
        &["--quantization int4", "--dtype", "f16"],
    );
    // An engine flag is checked before the workload is sampled.
    let gguf = path_str(&common::smollm_gguf());
    let args = [
        "throughput",
        "--quiet",
        "--model",
        &gguf,
        "--dataset-name",
        "random",
        "--input-len",
        "8",
        "--num-prompts",
        "1",
        "--kv-cache-dtype",
        "fp4",
    ];
    assert_one_line_error(&args, &["--kv-cache-dtype", "fp4"]);
    let (_, out, _) = run(&args);
    assert!(!out.contains("workload"), "sampled before failing: {out}");
}

#[test]
fn bad_shapes_name_the_shape() {
    let gguf = path_str(&common::smollm_gguf());
    let shapes = |extra: &[&str]| {
        argv(
            &["shapes", "--quiet", "--model", &gguf, "--iters", "1"],
            extra,
        )
    };
    assert_one_line_error(
        &strs(&shapes(&["--batch-sizes", "1,0"])),
        &["--batch-sizes", "0"],
    );
    assert_one_line_error(
        &strs(&shapes(&["--input-lens", "8..4"])),
        &["--input-lens", "8..4"],
    );
    assert_one_line_error(&strs(&shapes(&["--output-lens", "0"])), &["--output-lens"]);
    // Over the model's maximum length (8192 for SmolLM2).
    assert_one_line_error(
        &strs(&shapes(&[
            "--batch-sizes",
            "2",
            "--input-lens",
            "8190",
            "--output-lens",
            "4",
        ])),
        &["batch 2 x input 8190 + output 4", "maximum length 8192"],
    );
    // A batch the KV cache cannot hold: 3 x 2 blocks of 16 in a 4-block cache.
    assert_one_line_error(
        &strs(&shapes(&[
            "--batch-sizes",
            "1,3",
            "--input-lens",
            "20",
            "--output-lens",
            "4",
            "--num-kv-blocks",
            "4",
        ])),
        &["batch 3 x input 20 + output 4", "6 KV blocks", "holds 4"],
    );
}

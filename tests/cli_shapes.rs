//! The shapes mode end to end on the real SmolLM2: the table, the per-kernel breakdown, and the
//! CSV, JSON and SVG files, on tiny shapes so the test stays quick.

mod common;

use serde_json::Value;

#[test]
fn shapes_sweep_writes_table_kernels_and_files() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out_dir = dir.path().join("sweep");
    let gguf = common::smollm_gguf().display().to_string();
    let out_str = out_dir.display().to_string();
    let args = [
        "shapes",
        "--quiet",
        "--model",
        &gguf,
        "--batch-sizes",
        "1..2",
        "--input-lens",
        "12",
        "--output-lens",
        "3",
        "--warmup",
        "0",
        "--iters",
        "1",
        // Two prefill steps for batch 2 (24 prompt tokens).
        "--max-num-batched-tokens",
        "16",
        "--output-dir",
        &out_str,
    ];
    let (code, stdout, stderr) = common::run(&args, &[]);
    assert_eq!(code, 0, "shapes failed: {stderr}");
    assert!(stdout.contains("Device peaks (measured"), "{stdout}");
    assert!(stdout.contains("Kernels of batch 2 x input 12 + output 3"));
    let rows: Vec<&str> = stdout
        .lines()
        .filter(|l| l.trim_start().starts_with(['1', '2']) && l.contains('|'))
        .collect();
    assert_eq!(rows.len(), 2, "{stdout}");

    let json: Value = serde_json::from_slice(
        &std::fs::read(out_dir.join("shapes.json")).expect("shapes.json written"),
    )
    .expect("valid JSON");
    assert!(json["peaks"]["gemm_flops"].as_f64().unwrap_or(0.0) > 0.0);
    assert!(json["commit"].is_string());
    let shapes = json["shapes"].as_array().expect("shapes array");
    assert_eq!(shapes.len(), 2);
    let steps: Vec<u64> = shapes
        .iter()
        .map(|s| s["prefill_steps"].as_u64().unwrap_or(0))
        .collect();
    assert_eq!(steps, vec![1, 2]);
    for s in shapes {
        for key in [
            "prompt_tokens_per_s",
            "decode_tokens_per_s",
            "decode_step_p50_ms",
            "prefill_floor_s",
            "decode_step_floor_ms",
        ] {
            let v = s[key].as_f64().unwrap_or(-1.0);
            assert!(v > 0.0 && v.is_finite(), "{key} = {v}");
        }
        // Every projection ran in both phases; each attention only in its own phase.
        let pk = &s["prefill_kernels"]["kernels_ms"];
        let dk = &s["decode_step_kernels"]["kernels_ms"];
        for k in [
            "gemm_qkv",
            "gemm_o",
            "gemm_gate_up",
            "gemm_down",
            "gemm_lm_head",
        ] {
            assert!(pk[k].as_f64().unwrap_or(0.0) > 0.0, "prefill {k}");
            assert!(dk[k].as_f64().unwrap_or(0.0) > 0.0, "decode {k}");
        }
        assert!(pk["prefill_attention"].as_f64().unwrap_or(0.0) > 0.0);
        assert_eq!(pk["decode_attention"].as_f64(), Some(0.0));
        assert!(dk["decode_attention"].as_f64().unwrap_or(0.0) > 0.0);
        assert_eq!(dk["prefill_attention"].as_f64(), Some(0.0));
        // Calls per decode step: one per layer (SmolLM2-135M has 30), one LM head.
        let dc = &s["decode_step_kernels"]["calls"];
        assert_eq!(dc["gemm_qkv"].as_u64(), Some(30));
        assert_eq!(dc["decode_attention"].as_u64(), Some(30));
        assert_eq!(dc["gemm_lm_head"].as_u64(), Some(1));
        assert!(matches!(
            s["prefill_bound"].as_str(),
            Some("compute" | "memory")
        ));
    }

    let csv = std::fs::read_to_string(out_dir.join("shapes.csv")).expect("shapes.csv");
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 3, "{csv}");
    assert!(lines[1].starts_with("1,12,3,1,") && lines[2].starts_with("2,12,3,2,"));
    for svg in ["throughput.svg", "kernels.svg"] {
        let text = std::fs::read_to_string(out_dir.join(svg)).expect("plot written");
        assert!(text.starts_with("<svg") && text.trim_end().ends_with("</svg>"));
    }
}

/// One quick shape on the real SmolLM2 (`batch` sequences of 8 prompt + 2 output tokens, one
/// iteration, no kernel breakdown) with `extra` flags; it must succeed. Its stdout and stderr.
fn one_shape(batch: &str, extra: &[&str]) -> (String, String) {
    let gguf = common::smollm_gguf().display().to_string();
    let mut args = vec![
        "shapes",
        "--model",
        &gguf,
        "--batch-sizes",
        batch,
        "--input-lens",
        "8",
        "--output-lens",
        "2",
        "--warmup",
        "0",
        "--iters",
        "1",
        "--no-kernels",
    ];
    args.extend_from_slice(extra);
    let (code, stdout, stderr) = common::run(&args, &[]);
    assert_eq!(code, 0, "shapes failed: {stderr}");
    (stdout, stderr)
}

/// `--dtype bf16` on the CPU: bf16 weights under f32 activations, said in the title and the peaks
/// line, and the roofline counts the weights at two bytes (SmolLM2: 134.5M parameters in the
/// projections and the LM head, 269 MB per decode step against 538 MB in f32).
#[test]
fn shapes_with_bf16_weights_on_the_cpu() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out_dir = dir.path().join("bf16");
    let out_str = out_dir.display().to_string();
    // Not quiet: each shape's line goes to stderr as it finishes.
    let (stdout, stderr) = one_shape("2", &["--dtype", "bf16", "--output-dir", &out_str]);
    assert!(
        stderr.contains("batch 2 x input 8 + output 2: PP "),
        "{stderr}"
    );
    assert!(
        stdout.contains("(gguf, bf16, KV cache f16) on cpu"),
        "{stdout}"
    );
    assert!(stdout.contains("GEMM 2048x2048x2048 bf16"), "{stdout}");
    let json: Value = serde_json::from_slice(
        &std::fs::read(out_dir.join("shapes.json")).expect("shapes.json written"),
    )
    .expect("valid JSON");
    let bytes = json["shapes"][0]["decode_step_cost"]["bytes"]
        .as_f64()
        .unwrap_or(0.0);
    assert!((2.6e8..2.8e8).contains(&bytes), "decode step bytes {bytes}");
    assert!(
        json["shapes"][0]["decode_tokens_per_s"]
            .as_f64()
            .unwrap_or(0.0)
            > 0.0
    );
}

/// With `--quantization`, the title names the weights' scheme and the products' precision, not
/// the dtype alone (which would read as bf16 weights).
#[test]
fn shapes_title_names_quantized_weights() {
    if !offline_bench::gemm::panels_run_here() {
        return; // refused without AVX2 (its one-line error: `check_quantization`)
    }
    let args = ["--quiet", "--quantization", "int4", "--dtype", "bf16"];
    let (stdout, _) = one_shape("1", &args);
    assert!(
        stdout.contains("(gguf, int4 weights, bf16 products, KV cache f16) on cpu"),
        "{stdout}"
    );
}

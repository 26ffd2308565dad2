//! `offline-bench compare`: throughput reports (`--output-json`, ours or vLLM's `bench
//! throughput` one, whose five figures it reads), or shapes sweeps (`shapes.json`), side by
//! side, with ratios against the first, the settings that differ between them, and a warning
//! where they ran different workloads. A column may be several runs
//! of one configuration (comma-separated files): it then shows each figure's median and half
//! its range, because one run on a noisy machine says little.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::cli::CompareArgs;
use crate::report::Distribution;

/// The figures compared: label, where each sits in the report (`metric` scales some to the
/// label's unit), and whether it is a count (printed without decimals).
const METRICS: &[(&str, &str, bool)] = &[
    ("Total Time (s)", "/elapsed_time", false),
    ("Requests / s", "/requests_per_second", false),
    ("Generations / s", "/generations_per_second", false),
    ("Output tok/s", "/output_tokens_per_second", false),
    ("Prompt tok/s", "/prompt_tokens_per_second", false),
    ("Total tok/s", "/tokens_per_second", false),
    ("TTFT p50 (s)", "/ttft_s/p50", false),
    ("TTFT p90 (s)", "/ttft_s/p90", false),
    ("TPOT p50 (ms)", "/tpot_s/p50", false),
    ("TPOT p90 (ms)", "/tpot_s/p90", false),
    ("E2E p90 (s)", "/e2e_s/p90", false),
    ("Preemptions", "/num_preemptions", true),
    ("Tokens computed", "/engine_stats/computed_tokens", true),
    ("Engine steps", "/engine_stats/steps", true),
    (
        "Prefix-cache hits (%)",
        "/engine_stats/prefix_cache_hit_rate",
        false,
    ),
];

/// What a run was: the settings a group's runs must share, and that the table lists where
/// columns differ.
const SETTINGS: &[(&str, &str)] = &[
    ("model", "/model/name"),
    ("load format", "/model/load_format"),
    ("dtype", "/model/dtype"),
    ("quantization", "/model/quantization"),
    ("CPU bf16 products", "/model/cpu_bf16_products"),
    ("device", "/device"),
    ("commit", "/commit"),
    ("KV cache dtype", "/kv_cache/dtype"),
    ("KV blocks", "/kv_cache/num_blocks"),
    ("block size", "/engine/block_size"),
    ("max num seqs", "/engine/max_num_seqs"),
    ("max batched tokens", "/engine/max_num_batched_tokens"),
    ("max model len", "/engine/max_model_len"),
    ("prefix caching", "/engine/enable_prefix_caching"),
    ("sampling", "/engine/sampling"),
    ("n", "/engine/n"),
    ("warm-up iterations", "/options/warmup"),
    ("measured iterations", "/options/iters"),
    ("dataset", "/workload/info/dataset"),
    ("requests", "/num_requests"),
    ("workload fingerprint", "/workload/fingerprint"),
];

/// One column: the reports of one configuration.
struct Group {
    files: Vec<String>,
    reports: Vec<Value>,
}

impl Group {
    /// `spec`: a report file, or several separated by commas (runs of one configuration).
    fn read(spec: &str) -> Result<Self> {
        let files: Vec<String> = spec
            .split(',')
            .filter(|f| !f.is_empty())
            .map(str::to_string)
            .collect();
        if files.is_empty() {
            bail!("compare: '{spec}' names no report file");
        }
        let reports = files
            .iter()
            .map(|f| read_report(Path::new(f)))
            .collect::<Result<Vec<_>>>()?;
        for (file, r) in files.iter().zip(&reports).skip(1) {
            for &(name, ptr) in SETTINGS {
                let (first, this) = (setting(&reports[0], ptr), setting(r, ptr));
                if first != this {
                    bail!(
                        "compare: {file} ran {name} {this}, {} ran {first}: the files of one column (comma-separated) must be runs of one configuration",
                        files[0]
                    );
                }
            }
        }
        Ok(Self { files, reports })
    }

    /// Median of one figure over the group's runs, and half its range relative to the median.
    fn figure(&self, get: &Getter) -> Option<(f64, f64)> {
        let v: Vec<f64> = self.reports.iter().map(get).collect::<Option<_>>()?;
        let d = Distribution::of(&v);
        let min = v.iter().copied().fold(f64::INFINITY, f64::min);
        let spread = if d.p50 != 0.0 {
            (d.max - min) / 2.0 / d.p50.abs()
        } else {
            0.0
        };
        Some((d.p50, spread))
    }
}

/// Which command wrote a report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Throughput,
    Shapes,
}

impl Kind {
    fn of(r: &Value) -> Option<Self> {
        if r.get("elapsed_time").and_then(Value::as_f64).is_some() {
            Some(Self::Throughput)
        } else if r.get("shapes").and_then(Value::as_array).is_some() {
            Some(Self::Shapes)
        } else {
            None
        }
    }
}

fn read_report(path: &Path) -> Result<Value> {
    let bytes =
        std::fs::read(path).with_context(|| format!("cannot read report {}", path.display()))?;
    let v: Value = serde_json::from_slice(&bytes)
        .with_context(|| format!("{} is not JSON", path.display()))?;
    if Kind::of(&v).is_none() {
        bail!(
            "{} is neither a throughput report (`throughput --output-json`) nor a shapes sweep (`shapes.json`)",
            path.display()
        );
    }
    Ok(v)
}

/// One figure of a report, in its row's unit.
type Getter = Box<dyn Fn(&Value) -> Option<f64>>;

/// A row of the table: its label, how to read it, whether it is a count (printed without
/// decimals), and whether a blank line sets it apart (a shape's first row).
struct Row {
    label: String,
    get: Getter,
    count: bool,
    gap: bool,
}

/// The figures of a shapes sweep, per shape: label and field.
const SHAPE_FIGURES: &[(&str, &str)] = &[
    ("PP tok/s", "prompt_tokens_per_s"),
    ("TG p50 ms", "decode_step_p50_ms"),
    ("TG tok/s", "decode_tokens_per_s"),
    ("total tok/s", "total_tokens_per_s"),
];

/// A shape's batch, input and output lengths.
fn shape_key(s: &Value) -> Option<(u64, u64, u64)> {
    let f = |k: &str| s.get(k).and_then(Value::as_u64);
    Some((f("batch")?, f("input_len")?, f("output_len")?))
}

/// The rows to compare: vLLM-style figures of throughput reports; for shapes sweeps, each
/// shape of the first column's first sweep (in its order), matched by batch x input x output.
fn rows(kind: Kind, first: &Value) -> Vec<Row> {
    match kind {
        Kind::Throughput => METRICS
            .iter()
            .map(|&(label, ptr, count)| Row {
                label: label.to_string(),
                get: Box::new(move |r: &Value| metric(r, ptr)),
                count,
                gap: false,
            })
            .collect(),
        Kind::Shapes => {
            let shapes = first.get("shapes").and_then(Value::as_array);
            let keys: Vec<(u64, u64, u64)> =
                shapes.into_iter().flatten().filter_map(shape_key).collect();
            keys.into_iter()
                .flat_map(|key| {
                    SHAPE_FIGURES
                        .iter()
                        .enumerate()
                        .map(move |(i, &(name, field))| Row {
                            label: format!("{} x {} x {} {name}", key.0, key.1, key.2),
                            get: Box::new(move |r: &Value| {
                                r.get("shapes")?
                                    .as_array()?
                                    .iter()
                                    .find(|s| shape_key(s) == Some(key))?
                                    .get(field)?
                                    .as_f64()
                            }),
                            count: false,
                            gap: i == 0,
                        })
                })
                .collect()
        }
    }
}

/// A figure of one report, in the unit its label names. Reports from before `--n` have no
/// generations/s: there it equals requests/s.
fn metric(r: &Value, ptr: &str) -> Option<f64> {
    let raw = r.pointer(ptr).and_then(Value::as_f64).or_else(|| {
        (ptr == "/generations_per_second")
            .then(|| r.pointer("/requests_per_second").and_then(Value::as_f64))
            .flatten()
    })?;
    Some(match ptr {
        "/tpot_s/p50" | "/tpot_s/p90" => raw * 1e3,
        "/engine_stats/prefix_cache_hit_rate" => raw * 1e2,
        _ => raw,
    })
}

/// A setting as text (`-` where the report lacks it). The CPU's bf16 kernel is named without
/// the start-up rates that chose it, which vary from run to run.
fn setting(r: &Value, ptr: &str) -> String {
    match r.pointer(ptr) {
        None | Some(Value::Null) => "-".into(),
        Some(Value::String(s)) if ptr == "/model/cpu_bf16_products" => {
            s.split(" (").next().unwrap_or(s).to_string()
        }
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    }
}

/// Enough digits to compare, few enough to read.
fn number(x: f64) -> String {
    match x.abs() {
        a if a >= 100.0 => format!("{x:.1}"),
        a if a >= 1.0 || a == 0.0 => format!("{x:.2}"),
        _ => format!("{x:.4}"),
    }
}

fn label(i: usize) -> String {
    let letter = (b'A' + (i % 26) as u8) as char;
    if i < 26 {
        letter.to_string()
    } else {
        format!("{letter}{}", i / 26)
    }
}

pub fn run(args: &CompareArgs) -> Result<()> {
    let groups = args
        .runs
        .iter()
        .map(|spec| Group::read(spec))
        .collect::<Result<Vec<_>>>()?;
    print!("{}", render(&groups)?);
    Ok(())
}

/// The whole comparison as text.
fn render(groups: &[Group]) -> Result<String> {
    let kinds: Vec<(Option<Kind>, &String)> = groups
        .iter()
        .flat_map(|g| g.reports.iter().map(Kind::of).zip(&g.files))
        .collect();
    let kind = kinds[0].0;
    if let Some((_, file)) = kinds.iter().find(|(k, _)| *k != kind) {
        bail!(
            "compare: {file} is not the same kind of report as {} (throughput reports and shapes sweeps do not compare)",
            kinds[0].1
        );
    }
    let rows = rows(kind.unwrap_or(Kind::Throughput), &groups[0].reports[0]);
    let mut s = String::new();
    for (i, g) in groups.iter().enumerate() {
        let runs = match g.reports.len() {
            1 => String::new(),
            n => format!(" ({n} runs: medians, ± half the range)"),
        };
        let first = &g.reports[0];
        // vLLM's `bench throughput --output-json` holds five figures and nothing else.
        let what = match first.get("commit") {
            Some(_) => setting(first, "/date"),
            None if first.get("tokens_per_second").is_some() => {
                "vLLM's --output-json (its five figures only)".into()
            }
            None => "-".into(),
        };
        let _ = writeln!(s, "{}  {}{runs}, {what}", label(i), g.files.join(", "));
    }
    // Settings no column has (a shapes sweep has no workload) are left out.
    let (same, differ): (Vec<_>, Vec<_>) = SETTINGS
        .iter()
        .filter(|(_, ptr)| groups.iter().any(|g| setting(&g.reports[0], ptr) != "-"))
        .partition(|(_, ptr)| {
            let first = setting(&groups[0].reports[0], ptr);
            groups.iter().all(|g| setting(&g.reports[0], ptr) == first)
        });
    let _ = writeln!(s, "\nthe same in all:");
    for (name, ptr) in same {
        let _ = writeln!(s, "  {name}: {}", setting(&groups[0].reports[0], ptr));
    }
    let width = rows
        .iter()
        .map(|r| r.label.len())
        .max()
        .unwrap_or(0)
        .max(20)
        + 2;
    let col = 18;
    if !differ.is_empty() {
        let _ = writeln!(s, "\nwhat differs:");
        for (name, ptr) in &differ {
            let values: Vec<String> = groups
                .iter()
                .enumerate()
                .map(|(i, g)| format!("{}: {}", label(i), setting(&g.reports[0], ptr)))
                .collect();
            // On one line where it fits, else a line per column.
            let one_line = values.join("  ");
            if width + one_line.len() <= 100 {
                let _ = writeln!(s, "  {name:<width$}{one_line}");
            } else {
                let _ = writeln!(s, "  {name}");
                for v in values {
                    let _ = writeln!(s, "    {v}");
                }
            }
        }
    }
    let _ = write!(s, "\n{:<width$}", "");
    for i in 0..groups.len() {
        let _ = write!(s, "{:>col$}", label(i));
    }
    for i in 1..groups.len() {
        let _ = write!(s, "{:>9}", format!("{}/A", label(i)));
    }
    s.push('\n');
    let mut printed = false;
    for row in &rows {
        let figures: Vec<Option<(f64, f64)>> = groups.iter().map(|g| g.figure(&row.get)).collect();
        if figures.iter().all(Option::is_none) {
            continue;
        }
        if row.gap && printed {
            s.push('\n');
        }
        printed = true;
        let _ = write!(s, "{:<width$}", row.label);
        for f in &figures {
            let cell = match f {
                None => "-".into(),
                Some((m, _)) if row.count && m.fract() == 0.0 => format!("{m:.0}"),
                Some((m, spread)) if *spread > 0.0 => {
                    format!("{} ±{:.1}%", number(*m), 100.0 * spread)
                }
                Some((m, _)) => number(*m),
            };
            let _ = write!(s, "{cell:>col$}");
        }
        for f in &figures[1..] {
            let cell = match (figures[0], f) {
                (Some((a, _)), Some((b, _))) if a != 0.0 => format!("{:.2}x", b / a),
                _ => "-".into(),
            };
            let _ = write!(s, "{cell:>9}");
        }
        s.push('\n');
    }
    // Throughput reports name their workload by its fingerprint; vLLM's have none.
    if kind == Some(Kind::Throughput) {
        let prints: Vec<String> = groups
            .iter()
            .map(|g| setting(&g.reports[0], "/workload/fingerprint"))
            .collect();
        let known: Vec<&String> = prints.iter().filter(|p| *p != "-").collect();
        if known.iter().any(|p| *p != known[0]) {
            let _ = writeln!(
                s,
                "\nwarning: the columns ran different workloads (fingerprints differ): their ratios compare different work"
            );
        } else if known.len() < prints.len() {
            let blind: Vec<String> = (0..groups.len())
                .filter(|&i| prints[i] == "-")
                .map(label)
                .collect();
            let _ = writeln!(
                s,
                "\nnote: {} names no workload fingerprint: whether the columns ran the same work is not known",
                blind.join(", ")
            );
        }
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn report(elapsed: f64, dtype: &str, fingerprint: &str) -> Value {
        json!({
            "elapsed_time": elapsed,
            "requests_per_second": 64.0 / elapsed,
            "output_tokens_per_second": 12800.0 / elapsed,
            "tpot_s": {"p50": 0.02, "p90": 0.03},
            "model": {"name": "m.gguf", "dtype": dtype},
            "engine": {"n": 1},
            "workload": {"fingerprint": fingerprint},
            "date": "2026-12-06",
        })
    }

    fn group(reports: Vec<Value>) -> Group {
        Group {
            files: (0..reports.len()).map(|i| format!("r{i}.json")).collect(),
            reports,
        }
    }

    #[test]
    fn medians_spreads_and_ratios() {
        let a = group(vec![report(10.0, "f32", "x")]);
        let b = group(vec![
            report(4.0, "bf16", "x"),
            report(6.0, "bf16", "x"),
            report(5.0, "bf16", "x"),
        ]);
        let by = |ptr: &'static str| -> Getter { Box::new(move |r: &Value| metric(r, ptr)) };
        assert_eq!(b.figure(&by("/elapsed_time")), Some((5.0, 0.2)));
        // Reports from before --n: generations/s is requests/s.
        assert_eq!(
            b.figure(&by("/generations_per_second")).map(|f| f.0),
            Some(64.0 / 5.0)
        );
        assert_eq!(a.figure(&by("/tpot_s/p50")), Some((20.0, 0.0)));
        assert_eq!(a.figure(&by("/num_preemptions")), None);
        let text = render(&[a, b]).unwrap();
        let time = text.lines().find(|l| l.starts_with("Total Time")).unwrap();
        assert!(
            time.contains("10.00") && time.contains("5.00 ±20.0%"),
            "{time}"
        );
        assert!(time.ends_with("0.50x"), "{time}");
        assert!(
            text.contains("  dtype") && text.contains("A: f32  B: bf16"),
            "{text}"
        );
        assert!(text.contains("  model: m.gguf"), "{text}");
        assert!(!text.contains("Preemptions"), "{text}");
        assert!(!text.contains("warning"), "{text}");
    }

    #[test]
    fn different_workloads_are_flagged() {
        let text = render(&[
            group(vec![report(10.0, "f32", "x")]),
            group(vec![report(9.0, "f32", "y")]),
        ])
        .unwrap();
        assert!(
            text.contains("warning: the columns ran different workloads"),
            "{text}"
        );
    }

    #[test]
    fn a_vllm_report_gives_its_five_figures() {
        let vllm = json!({
            "elapsed_time": 20.0,
            "num_requests": 64,
            "total_num_tokens": 25000,
            "requests_per_second": 3.2,
            "tokens_per_second": 1250.0,
        });
        let ours = report(10.0, "f32", "x");
        let text = render(&[group(vec![vllm]), group(vec![ours])]).unwrap();
        assert!(
            text.contains("vLLM's --output-json (its five figures only)"),
            "{text}"
        );
        let line = |start: &str| text.lines().find(|l| l.starts_with(start)).unwrap();
        assert!(line("Total Time").ends_with("0.50x"), "{text}");
        assert!(line("Requests / s").ends_with("2.00x"), "{text}");
        // Ours has no total tokens/s in this fixture, vLLM's no output tokens/s.
        assert!(line("Total tok/s").ends_with("-"), "{text}");
        assert!(line("Output tok/s").ends_with("-"), "{text}");
        assert!(!text.contains("warning"), "{text}");
        assert!(
            text.contains("note: A names no workload fingerprint"),
            "{text}"
        );
    }

    fn sweep(dtype: &str, shapes: &[(u64, u64, f64)]) -> Value {
        let shapes: Vec<Value> = shapes
            .iter()
            .map(|&(batch, input_len, pp)| {
                json!({"batch": batch, "input_len": input_len, "output_len": 32,
                       "prompt_tokens_per_s": pp, "decode_step_p50_ms": 10.0})
            })
            .collect();
        json!({"shapes": shapes, "model": {"name": "m.gguf", "dtype": dtype}})
    }

    #[test]
    fn shapes_sweeps_compare_shape_by_shape() {
        // The second sweep lists its shapes in another order and lacks one.
        let a = group(vec![sweep("f32", &[(1, 128, 1000.0), (8, 128, 2000.0)])]);
        let b = group(vec![sweep("bf16", &[(8, 128, 5000.0)])]);
        let text = render(&[a, b]).unwrap();
        let line = |start: &str| text.lines().find(|l| l.starts_with(start)).unwrap();
        assert!(line("8 x 128 x 32 PP tok/s").ends_with("2.50x"), "{text}");
        assert!(line("1 x 128 x 32 PP tok/s").ends_with("-"), "{text}");
        assert!(line("8 x 128 x 32 TG p50 ms").ends_with("1.00x"), "{text}");
        assert!(
            !text.contains("TG tok/s") && !text.contains("fingerprint"),
            "{text}"
        );
        // Not with a throughput report.
        let mixed = render(&[
            group(vec![sweep("f32", &[(1, 128, 1000.0)])]),
            group(vec![report(9.0, "f32", "y")]),
        ]);
        assert!(
            mixed
                .err()
                .unwrap()
                .to_string()
                .contains("not the same kind")
        );
    }

    #[test]
    fn a_column_must_be_one_configuration() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, v: Value| {
            let p = dir.path().join(name);
            std::fs::write(&p, v.to_string()).unwrap();
            p.display().to_string()
        };
        let a = write("a.json", report(10.0, "f32", "x"));
        let b = write("b.json", report(5.0, "bf16", "x"));
        let err = Group::read(&format!("{a},{b}")).err().unwrap().to_string();
        assert!(
            err.contains("b.json ran dtype bf16") && err.contains("a.json ran f32"),
            "{err}"
        );
        let not = write("not.json", json!({"requests": []}));
        let err = Group::read(&not).err().unwrap().to_string();
        assert!(err.contains("neither a throughput report"), "{err}");
        let err = Group::read(&format!("{a},missing.json"))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("missing.json"), "{err}");
    }
}

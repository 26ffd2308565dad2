//! The shapes mode's results: one [`ShapeReport`] per shape (timings, rates, roofline), printed
//! as tables and written as CSV and JSON.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use super::bench::{KernelBreakdown, ShapeRun, host_share};
use super::roofline::{Cost, ModelCosts, Peaks};
use super::{Shape, median_p90};
use crate::profile::{Kernel, KernelTimes};

/// Milliseconds per kernel of one phase, with what lay between them.
#[derive(Clone, Debug, Serialize)]
pub struct PhaseKernels {
    pub kernels_ms: BTreeMap<&'static str, f64>,
    /// Times each kernel's scope ran (a scope may launch several device kernels).
    pub calls: BTreeMap<&'static str, u64>,
    /// Wall time of the phase minus the kernels' sum: host work, launches, views.
    pub other_ms: f64,
    pub wall_ms: f64,
}

impl PhaseKernels {
    fn new(k: &KernelTimes, wall: f64) -> Self {
        Self {
            kernels_ms: Kernel::ALL
                .iter()
                .map(|&kernel| (kernel.name(), k.get(kernel) * 1e3))
                .collect(),
            calls: Kernel::ALL
                .iter()
                .map(|&kernel| (kernel.name(), k.calls_of(kernel)))
                .collect(),
            other_ms: (wall - k.total()).max(0.0) * 1e3,
            wall_ms: wall * 1e3,
        }
    }
}

/// One shape's figures.
#[derive(Clone, Debug, Serialize)]
pub struct ShapeReport {
    #[serde(flatten)]
    pub shape: Shape,
    pub prefill_steps: usize,
    /// Median over the measured iterations.
    pub prefill_s: f64,
    pub prompt_tokens_per_s: f64,
    pub prefill_cost: Cost,
    pub prefill_floor_s: f64,
    /// Whether the prefill floor comes from the GEMM peak (`compute`) or the bandwidth.
    pub prefill_bound: &'static str,
    /// Achieved FLOP/s of the prefill as a share of the measured GEMM peak.
    pub prefill_compute_util: f64,
    pub decode_step_p50_ms: f64,
    pub decode_step_p90_ms: f64,
    /// Generated tokens per second over the decode phase (median iteration).
    pub decode_tokens_per_s: f64,
    pub decode_step_cost: Cost,
    pub decode_step_floor_ms: f64,
    /// Whether the decode floor comes from the bandwidth (`memory`) or the GEMM peak
    /// (`compute`); `none` without decode steps.
    pub decode_step_bound: &'static str,
    /// Achieved bytes/s of a median decode step as a share of the measured memory bandwidth.
    pub decode_bandwidth_util: f64,
    /// All tokens (prompt and generated) over prefill plus decode.
    pub total_tokens_per_s: f64,
    /// Share of decode step time spent building and uploading inputs on the host.
    pub decode_host_share: f64,
    pub iterations: usize,
    pub prefill_kernels: Option<PhaseKernels>,
    pub decode_step_kernels: Option<PhaseKernels>,
}

fn median(v: &[f64]) -> f64 {
    median_p90(v).0
}

impl ShapeReport {
    pub fn new(run: &ShapeRun, costs: &ModelCosts, peaks: &Peaks) -> Self {
        let s = run.shape;
        let prefill = median(&run.prefill);
        let decode = median(&run.decode);
        let (p50, p90) = median_p90(&run.decode_step);
        let prefill_cost = costs.prefill(&s, run.prefill_steps);
        // With one output token there is no decode step to cost.
        let step_cost = if s.decode_steps() > 0 {
            costs.decode_step(&s)
        } else {
            Cost::default()
        };
        let generated = (s.batch * s.decode_steps()) as f64;
        let rate = |n: f64, t: f64| if t > 0.0 { n / t } else { 0.0 };
        let (pk, dk) = match &run.kernels {
            Some(KernelBreakdown {
                prefill,
                prefill_wall,
                decode_step,
                decode_step_wall,
            }) => (
                Some(PhaseKernels::new(prefill, *prefill_wall)),
                (s.decode_steps() > 0).then(|| PhaseKernels::new(decode_step, *decode_step_wall)),
            ),
            None => (None, None),
        };
        Self {
            shape: s,
            prefill_steps: run.prefill_steps,
            prefill_s: prefill,
            prompt_tokens_per_s: rate((s.batch * s.input_len) as f64, prefill),
            prefill_cost,
            prefill_floor_s: prefill_cost.floor(peaks),
            prefill_bound: prefill_cost.bound(peaks),
            prefill_compute_util: rate(prefill_cost.flops, prefill) / peaks.gemm_flops,
            decode_step_p50_ms: p50 * 1e3,
            decode_step_p90_ms: p90 * 1e3,
            decode_tokens_per_s: rate(generated, decode),
            decode_step_cost: step_cost,
            decode_step_floor_ms: step_cost.floor(peaks) * 1e3,
            decode_step_bound: if s.decode_steps() > 0 {
                step_cost.bound(peaks)
            } else {
                "none"
            },
            decode_bandwidth_util: rate(step_cost.bytes, p50) / peaks.copy_bytes,
            total_tokens_per_s: rate(
                (s.batch * (s.input_len + s.output_len)) as f64,
                prefill + decode,
            ),
            decode_host_share: host_share(&run.decode_split),
            iterations: run.prefill.len(),
            prefill_kernels: pk,
            decode_step_kernels: dk,
        }
    }
}

/// FLOP/s in the unit that suits the device's peak.
fn flops_unit(peaks: &Peaks) -> (f64, &'static str) {
    if peaks.gemm_flops >= 1e12 {
        (1e12, "TFLOP/s")
    } else {
        (1e9, "GFLOP/s")
    }
}

/// The peaks line printed above the tables.
pub fn peaks_line(peaks: &Peaks) -> String {
    let (scale, unit) = flops_unit(peaks);
    format!(
        "Device peaks (measured, best of several): GEMM {} {:.1} {unit}; memory {:.1} GB/s ({})",
        peaks.gemm,
        peaks.gemm_flops / scale,
        peaks.copy_bytes / 1e9,
        peaks.copy
    )
}

/// The main table: one row per shape, like llama-batched-bench's PP/TG/B table with the
/// roofline beside each phase.
pub fn table(reports: &[ShapeReport], peaks: &Peaks) -> String {
    let (scale, unit) = flops_unit(peaks);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:>5} {:>6} {:>6} | {:>9} {:>13} {:>10} {:>9} {:>6} | {:>8} {:>8} {:>9} {:>13} {:>7} {:>5} | {:>9}",
        "B",
        "input",
        "output",
        "PP s",
        "floor s",
        "PP tok/s",
        unit,
        "%peak",
        "TG p50ms",
        "TG p90ms",
        "TG tok/s",
        "floor ms",
        "GB/s",
        "%bw",
        "tok/s",
    );
    for r in reports {
        let _ = writeln!(
            out,
            "{:>5} {:>6} {:>6} | {:>9.3} {:>9.3} {:<3} {:>10.1} {:>9.2} {:>5.1}% | {:>8.2} {:>8.2} {:>9.1} {:>9.2} {:<3} {:>7.1} {:>4.0}% | {:>9.1}",
            r.shape.batch,
            r.shape.input_len,
            r.shape.output_len,
            r.prefill_s,
            r.prefill_floor_s,
            &r.prefill_bound[..3],
            r.prompt_tokens_per_s,
            r.prefill_compute_util * peaks.gemm_flops / scale,
            100.0 * r.prefill_compute_util,
            r.decode_step_p50_ms,
            r.decode_step_p90_ms,
            r.decode_tokens_per_s,
            r.decode_step_floor_ms,
            &r.decode_step_bound[..3],
            r.decode_bandwidth_util * peaks.copy_bytes / 1e9,
            100.0 * r.decode_bandwidth_util,
            r.total_tokens_per_s,
        );
    }
    if reports.iter().any(|r| r.decode_bandwidth_util > 1.0) {
        out.push_str(
            "%bw above 100: the floor counts every byte from memory, and the caches served some \
             (weights or K/V that fit in the last-level cache)\n",
        );
    }
    if reports.iter().any(|r| r.prefill_compute_util > 1.0) {
        out.push_str(
            "%peak above 100: the prefill ran faster than the calibration's GEMM measured (that \
             GEMM met a slower moment of a shared host, or the prefill's kernels beat it)\n",
        );
    }
    out
}

/// One shape's headline figures as a status line, printed as each shape finishes: a sweep cut
/// short (a time limit on a lent GPU, an interrupt) still leaves the shapes it measured.
pub fn shape_line(r: &ShapeReport) -> String {
    format!(
        "{}: PP {:.3} s ({:.1} tok/s, {:.1}% of the GEMM peak), TG p50 {:.2} ms p90 {:.2} ms ({:.1} tok/s, {:.0}% of the memory peak)",
        r.shape,
        r.prefill_s,
        r.prompt_tokens_per_s,
        100.0 * r.prefill_compute_util,
        r.decode_step_p50_ms,
        r.decode_step_p90_ms,
        r.decode_tokens_per_s,
        100.0 * r.decode_bandwidth_util,
    )
}

/// The per-kernel table of one shape: milliseconds and share of each phase's wall time.
pub fn kernel_table(r: &ShapeReport) -> Option<String> {
    let p = r.prefill_kernels.as_ref()?;
    let d = r.decode_step_kernels.as_ref();
    let mut out = format!("Kernels of {} (one profiled iteration)\n", r.shape);
    let _ = writeln!(
        out,
        "  {:<20} {:>11} {:>6} {:>6}   {:>14} {:>6} {:>6}",
        "kernel", "prefill ms", "%", "calls", "decode ms/step", "%", "calls"
    );
    let pct = |v: f64, of: f64| if of > 0.0 { 100.0 * v / of } else { 0.0 };
    let calls = |c: Option<u64>| c.map_or(String::new(), |c| c.to_string());
    let mut row = |name: &str, (pv, pc): (f64, Option<u64>), dv: Option<(f64, Option<u64>)>| {
        let dcol = match (dv, d) {
            (Some((v, c)), Some(d)) => {
                format!("{v:>14.3} {:>5.1}% {:>6}", pct(v, d.wall_ms), calls(c))
            }
            _ => format!("{:>14} {:>6} {:>6}", "-", "-", ""),
        };
        let _ = writeln!(
            out,
            "  {name:<20} {pv:>11.3} {:>5.1}% {:>6}   {dcol}",
            pct(pv, p.wall_ms),
            calls(pc)
        );
    };
    for k in Kernel::ALL {
        let name = k.name();
        let pv = p.kernels_ms[name];
        let dv = d.map(|d| (d.kernels_ms[name], Some(d.calls[name])));
        if pv == 0.0 && dv.map_or(0.0, |v| v.0) == 0.0 {
            continue;
        }
        row(name, (pv, Some(p.calls[name])), dv);
    }
    row("other", (p.other_ms, None), d.map(|d| (d.other_ms, None)));
    row("wall", (p.wall_ms, None), d.map(|d| (d.wall_ms, None)));
    Some(out)
}

/// One CSV row per shape; kernel columns are milliseconds (prefill total, decode per step).
pub fn csv(reports: &[ShapeReport]) -> String {
    let mut head = vec![
        "batch",
        "input_len",
        "output_len",
        "prefill_steps",
        "prefill_s",
        "prompt_tokens_per_s",
        "prefill_flops",
        "prefill_floor_s",
        "prefill_bound",
        "prefill_compute_util",
        "decode_step_p50_ms",
        "decode_step_p90_ms",
        "decode_tokens_per_s",
        "decode_step_bytes",
        "decode_step_floor_ms",
        "decode_step_bound",
        "decode_bandwidth_util",
        "total_tokens_per_s",
        "decode_host_share",
    ]
    .into_iter()
    .map(String::from)
    .collect::<Vec<_>>();
    for phase in ["prefill", "decode"] {
        for k in Kernel::ALL {
            head.push(format!("{phase}_ms_{}", k.name()));
        }
        head.push(format!("{phase}_ms_other"));
    }
    let mut out = head.join(",") + "\n";
    for r in reports {
        let mut cells: Vec<String> = vec![
            r.shape.batch.to_string(),
            r.shape.input_len.to_string(),
            r.shape.output_len.to_string(),
            r.prefill_steps.to_string(),
            format!("{:.6}", r.prefill_s),
            format!("{:.2}", r.prompt_tokens_per_s),
            format!("{:.4e}", r.prefill_cost.flops),
            format!("{:.6}", r.prefill_floor_s),
            r.prefill_bound.to_string(),
            format!("{:.4}", r.prefill_compute_util),
            format!("{:.4}", r.decode_step_p50_ms),
            format!("{:.4}", r.decode_step_p90_ms),
            format!("{:.2}", r.decode_tokens_per_s),
            format!("{:.4e}", r.decode_step_cost.bytes),
            format!("{:.4}", r.decode_step_floor_ms),
            r.decode_step_bound.to_string(),
            format!("{:.4}", r.decode_bandwidth_util),
            format!("{:.2}", r.total_tokens_per_s),
            format!("{:.4}", r.decode_host_share),
        ];
        for phase in [&r.prefill_kernels, &r.decode_step_kernels] {
            for k in Kernel::ALL {
                cells.push(
                    phase
                        .as_ref()
                        .map(|p| format!("{:.4}", p.kernels_ms[k.name()]))
                        .unwrap_or_default(),
                );
            }
            cells.push(
                phase
                    .as_ref()
                    .map(|p| format!("{:.4}", p.other_ms))
                    .unwrap_or_default(),
            );
        }
        out += &(cells.join(",") + "\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::runner::StepTimes;

    fn run() -> ShapeRun {
        let mut k = KernelTimes::default();
        k.seconds[0] = 0.001;
        ShapeRun {
            shape: Shape {
                batch: 2,
                input_len: 10,
                output_len: 3,
            },
            prefill_steps: 1,
            prefill: vec![0.2, 0.1, 0.3],
            decode: vec![0.02, 0.04, 0.03],
            decode_step: vec![0.01, 0.02, 0.015, 0.01, 0.02, 0.015],
            decode_split: StepTimes {
                prepare: 1.0,
                forward: 2.0,
                sample: 1.0,
            },
            kernels: Some(KernelBreakdown {
                prefill: k.clone(),
                prefill_wall: 0.004,
                decode_step: k,
                decode_step_wall: 0.002,
            }),
        }
    }

    fn peaks() -> Peaks {
        Peaks {
            gemm_flops: 1e11,
            gemm: "test".into(),
            copy_bytes: 1e10,
            copy: "test".into(),
        }
    }

    #[test]
    fn rates_from_medians() {
        let costs = ModelCosts {
            linear_params: 1e6,
            head_params: 1e5,
            weight_elem_bytes: (4.0, 4.0),
            kv_token_bytes: 100.0,
            attn_pair_flops: 10.0,
        };
        let r = ShapeReport::new(&run(), &costs, &peaks());
        assert_eq!(r.prefill_s, 0.2);
        assert_eq!(r.prompt_tokens_per_s, 100.0);
        // Two sequences, two decode steps each, over the median 0.03 s.
        assert!((r.decode_tokens_per_s - 4.0 / 0.03).abs() < 1e-9);
        assert!((r.decode_step_p50_ms - 15.0).abs() < 1e-9);
        assert!((r.total_tokens_per_s - 26.0 / 0.23).abs() < 1e-9);
        assert_eq!(r.decode_host_share, 0.25);
        let pk = r.prefill_kernels.as_ref().unwrap();
        assert!((pk.other_ms - 3.0).abs() < 1e-9);
        assert_eq!(pk.kernels_ms["embedding"], 1.0);
        // The table, the kernel table and the CSV carry the shape.
        assert!(table(std::slice::from_ref(&r), &peaks()).contains("100.0"));
        // Above the bandwidth floor, the table says why that can be.
        let mut fast = r.clone();
        for (util, note) in [(1.2, true), (0.5, false)] {
            fast.decode_bandwidth_util = util;
            let t = table(std::slice::from_ref(&fast), &peaks());
            assert_eq!(t.contains("%bw above 100"), note);
        }
        // Above the compute peak too.
        for (util, note) in [(1.2, true), (0.5, false)] {
            fast.prefill_compute_util = util;
            let t = table(std::slice::from_ref(&fast), &peaks());
            assert_eq!(t.contains("%peak above 100"), note);
        }
        assert!(kernel_table(&r).unwrap().contains("embedding"));
        let line = shape_line(&r);
        for part in [
            "batch 2 x input 10 + output 3: ",
            "PP 0.200 s (100.0 tok/s",
            "TG p50 15.00 ms",
        ] {
            assert!(line.contains(part), "{line}");
        }
        let csv = csv(&[r]);
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(
            lines[0].split(',').count(),
            lines[1].split(',').count(),
            "{csv}"
        );
        assert!(lines[1].starts_with("2,10,3,1,"));
    }
}

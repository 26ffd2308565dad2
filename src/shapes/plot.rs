//! SVG charts of a sweep, written by hand (no font or image libraries needed): tokens/s against
//! batch size per sequence length, and each shape's kernel breakdown.

use std::fmt::Write as _;

use super::output::{PhaseKernels, ShapeReport};
use crate::profile::Kernel;

const COLORS: [&str; 16] = [
    "#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7",
    "#9c755f", "#bab0ac", "#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#cccccc", "#555555",
];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn text(out: &mut String, x: f64, y: f64, anchor: &str, size: u32, s: &str) {
    let _ = writeln!(
        out,
        r#"<text x="{x:.1}" y="{y:.1}" text-anchor="{anchor}" font-size="{size}">{}</text>"#,
        esc(s)
    );
}

/// A round number at or above `v`'s scale, for axis ticks.
fn nice_max(v: f64) -> f64 {
    if v <= 0.0 {
        return 1.0;
    }
    let p = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * p)
        .find(|&m| m >= v)
        .unwrap_or(10.0 * p)
}

/// One panel: a line per series of (batch, value) points, batch on a log2 axis.
fn panel(
    out: &mut String,
    x0: f64,
    title: &str,
    series: &[(String, Vec<(usize, f64)>)],
    batches: &[usize],
) {
    let (w, h, top, left) = (420.0, 260.0, 64.0, x0 + 70.0);
    let ymax = nice_max(
        series
            .iter()
            .flat_map(|s| s.1.iter().map(|p| p.1))
            .fold(0.0, f64::max),
    );
    let lo = (*batches.first().unwrap_or(&1) as f64).log2();
    let hi = (*batches.last().unwrap_or(&1) as f64).log2();
    let xs = |b: usize| {
        if hi > lo {
            left + ((b as f64).log2() - lo) / (hi - lo) * w
        } else {
            left + w / 2.0
        }
    };
    let ys = |v: f64| top + h - v / ymax * h;
    text(out, left + w / 2.0, top - 10.0, "middle", 14, title);
    let _ = writeln!(
        out,
        r##"<rect x="{left}" y="{top}" width="{w}" height="{h}" fill="none" stroke="#999"/>"##
    );
    for i in 0..=4 {
        let v = ymax * i as f64 / 4.0;
        let y = ys(v);
        let _ = writeln!(
            out,
            r##"<line x1="{left}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#eee"/>"##,
            left + w
        );
        let label = if ymax < 100.0 {
            format!("{v:.1}")
        } else {
            format!("{v:.0}")
        };
        text(out, left - 6.0, y + 4.0, "end", 11, &label);
    }
    for &b in batches {
        text(out, xs(b), top + h + 16.0, "middle", 11, &b.to_string());
    }
    text(
        out,
        left + w / 2.0,
        top + h + 36.0,
        "middle",
        12,
        "batch size",
    );
    for (i, (name, pts)) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let path: Vec<String> = pts
            .iter()
            .map(|&(b, v)| format!("{:.1},{:.1}", xs(b), ys(v)))
            .collect();
        let _ = writeln!(
            out,
            r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"/>"#,
            path.join(" ")
        );
        for &(b, v) in pts {
            let _ = writeln!(
                out,
                r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{color}"/>"#,
                xs(b),
                ys(v)
            );
        }
        let ly = top + 14.0 + 16.0 * i as f64;
        let _ = writeln!(
            out,
            r#"<rect x="{:.1}" y="{:.1}" width="10" height="10" fill="{color}"/>"#,
            left + 8.0,
            ly - 9.0
        );
        text(out, left + 22.0, ly, "start", 11, name);
    }
}

/// Prompt tokens/s (prefill) and generated tokens/s (decode) against batch size, a line per
/// input and output length.
pub fn throughput_svg(reports: &[ShapeReport], title: &str) -> String {
    let mut batches: Vec<usize> = reports.iter().map(|r| r.shape.batch).collect();
    batches.sort_unstable();
    batches.dedup();
    let mut keys: Vec<(usize, usize)> = reports
        .iter()
        .map(|r| (r.shape.input_len, r.shape.output_len))
        .collect();
    keys.sort_unstable();
    keys.dedup();
    let series = |f: &dyn Fn(&ShapeReport) -> f64| -> Vec<(String, Vec<(usize, f64)>)> {
        keys.iter()
            .map(|&(i, o)| {
                let mut pts: Vec<(usize, f64)> = reports
                    .iter()
                    .filter(|r| r.shape.input_len == i && r.shape.output_len == o)
                    .map(|r| (r.shape.batch, f(r)))
                    .collect();
                pts.sort_by_key(|p| p.0);
                (format!("input {i}, output {o}"), pts)
            })
            .collect()
    };
    let mut out = String::from(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="1040" height="394" font-family="sans-serif">"#,
    );
    out.push('\n');
    out += "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n";
    text(&mut out, 520.0, 18.0, "middle", 13, title);
    panel(
        &mut out,
        0.0,
        "prefill: prompt tokens/s",
        &series(&|r| r.prompt_tokens_per_s),
        &batches,
    );
    panel(
        &mut out,
        520.0,
        "decode: generated tokens/s",
        &series(&|r| r.decode_tokens_per_s),
        &batches,
    );
    out += "</svg>\n";
    out
}

/// Stacked bars: for each shape, the share of each kernel in a prefill and in a decode step.
/// `None` when no kernels were profiled.
pub fn kernels_svg(reports: &[ShapeReport], title: &str) -> Option<String> {
    let mut bars: Vec<(String, &PhaseKernels)> = Vec::new();
    for r in reports {
        let s = &r.shape;
        let label = format!("B{} in{} out{}", s.batch, s.input_len, s.output_len);
        if let Some(p) = &r.prefill_kernels {
            bars.push((format!("{label} prefill"), p));
        }
        if let Some(d) = &r.decode_step_kernels {
            bars.push((format!("{label} decode"), d));
        }
    }
    if bars.is_empty() {
        return None;
    }
    let (left, w, bar_h, top) = (200.0, 640.0, 18.0, 40.0);
    let height = top + bars.len() as f64 * (bar_h + 6.0) + 120.0;
    let mut out = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{}" height="{height:.0}" font-family="sans-serif">"#,
        left + w + 20.0
    );
    out.push('\n');
    out += "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n";
    text(&mut out, 10.0, 20.0, "start", 13, title);
    let mut names: Vec<&str> = Kernel::ALL.iter().map(|k| k.name()).collect();
    names.push("other");
    for (i, (label, p)) in bars.iter().enumerate() {
        let y = top + i as f64 * (bar_h + 6.0);
        text(&mut out, left - 8.0, y + 13.0, "end", 11, label);
        let mut x = left;
        for (j, name) in names.iter().enumerate() {
            let ms = match *name {
                "other" => p.other_ms,
                n => p.kernels_ms.get(n).copied().unwrap_or(0.0),
            };
            if p.wall_ms <= 0.0 || ms <= 0.0 {
                continue;
            }
            let seg = ms / p.wall_ms * w;
            let _ = writeln!(
                out,
                r#"<rect x="{x:.1}" y="{y:.1}" width="{seg:.1}" height="{bar_h}" fill="{}"><title>{name}: {ms:.3} ms</title></rect>"#,
                COLORS[j % COLORS.len()]
            );
            x += seg;
        }
    }
    let legend_top = top + bars.len() as f64 * (bar_h + 6.0) + 20.0;
    for (j, name) in names.iter().enumerate() {
        let (col, row) = (j % 4, j / 4);
        let (x, y) = (left + col as f64 * 160.0, legend_top + row as f64 * 18.0);
        let _ = writeln!(
            out,
            r#"<rect x="{x:.1}" y="{:.1}" width="10" height="10" fill="{}"/>"#,
            y - 9.0,
            COLORS[j % COLORS.len()]
        );
        text(&mut out, x + 14.0, y, "start", 11, name);
    }
    text(
        &mut out,
        left + w / 2.0,
        legend_top + 90.0,
        "middle",
        11,
        "share of the phase's wall time (prefill: whole batch; decode: one step)",
    );
    out += "</svg>\n";
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nice_axis_ends() {
        assert_eq!(nice_max(0.0), 1.0);
        assert_eq!(nice_max(7.0), 10.0);
        assert_eq!(nice_max(180.0), 200.0);
        assert_eq!(nice_max(2400.0), 2500.0);
    }

    #[test]
    fn escapes_text() {
        assert_eq!(esc("a<b & c>"), "a&lt;b &amp; c&gt;");
    }
}

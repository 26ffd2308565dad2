//! `offline-bench shapes`: a sweep of fixed batch x input x output shapes, each timed as a
//! prefill and its decode steps, with the kernels inside and the device's roofline.

use std::path::Path;

use anyhow::{Context, Result};
use serde_json::json;

use super::Setup;
use crate::cli::ShapesArgs;
use crate::progress::Progress;
use crate::shapes::bench::{BenchOptions, CacheRoom, run_shape};
use crate::shapes::output::{ShapeReport, csv, kernel_table, peaks_line, shape_line, table};
use crate::shapes::roofline::{ModelCosts, calibrate};
use crate::shapes::{check_limits, grid, parse_sizes, plot};
use crate::util::write_atomic;

pub fn run(args: &ShapesArgs) -> Result<()> {
    let progress = Progress::new(args.engine.quiet);
    let shapes = grid(
        &parse_sizes("--batch-sizes", &args.batch_sizes)?,
        &parse_sizes("--input-lens", &args.input_lens)?,
        &parse_sizes("--output-lens", &args.output_lens)?,
    );
    let setup = Setup::new(&args.model, &progress)?;
    check_limits(
        &shapes,
        setup.max_model_len,
        args.engine.max_num_batched_tokens,
    )?;
    // Peaks first, on an empty device: the KV cache takes most of a GPU's memory afterwards.
    progress.info("measuring the device's peaks");
    let peaks = calibrate(&setup.device, setup.dtype).context("calibrating the device")?;
    let engine = setup.engine(&args.engine, &progress)?;
    let runner = engine.runner();
    let room = CacheRoom {
        block_size: engine.config().block_size,
        num_blocks: engine.config().num_blocks,
    };
    let knob = if setup.device.is_cpu() {
        "--kv-cache-memory"
    } else {
        "--gpu-memory-utilization"
    };
    for s in &shapes {
        room.check(s, knob)?;
    }

    let model = runner.model();
    let costs = ModelCosts::new(
        &model.dims(),
        model.bytes_per_weight(),
        runner.cache().spec.bytes_per_token(),
    );
    let opts = BenchOptions {
        warmup: args.warmup,
        iters: args.iters,
        max_step_tokens: args.engine.max_num_batched_tokens,
        kernels: !args.no_kernels,
        seed: args.engine.seed,
    };
    let bar = progress.bar(shapes.len() as u64, "shapes");
    let mut reports = Vec::with_capacity(shapes.len());
    for s in &shapes {
        bar.set_message(s.to_string());
        let run = run_shape(runner, &room, s, &opts)?;
        let report = ShapeReport::new(&run, &costs, &peaks);
        bar.suspend(|| progress.info(shape_line(&report)));
        reports.push(report);
        bar.inc(1);
    }
    bar.finish_and_clear();

    let title = format!(
        "{} ({}, {}, KV cache {}) on {}, commit {}",
        args.model.model,
        setup.info.load_format.name(),
        setup.weights_name(),
        super::dtype_name(runner.cache().spec.dtype),
        crate::device::describe(&setup.device),
        super::COMMIT
    );
    println!("{title}");
    println!("{}", peaks_line(&peaks));
    println!(
        "PP: prefill of the whole batch ({} warm-up, median of {} iterations); TG: one decode step of the batch; floor: its least bytes at the memory peak (mem) or FLOPs at the GEMM peak (com), whichever is slower",
        args.warmup, args.iters
    );
    print!("{}", table(&reports, &peaks));
    for r in &reports {
        if let Some(t) = kernel_table(r) {
            println!();
            print!("{t}");
        }
    }
    if let Some(dir) = &args.output_dir {
        let mut ctx = setup.context(&engine, &args.model, &args.engine);
        if let serde_json::Value::Object(m) = &mut ctx {
            m.insert("peaks".into(), json!(peaks));
            m.insert(
                "options".into(),
                json!({"warmup": args.warmup, "iters": args.iters, "kernels": !args.no_kernels}),
            );
            m.insert("shapes".into(), json!(reports));
        }
        write_outputs(dir, &ctx, &reports, &title)?;
        progress.info(format!(
            "wrote shapes.json, shapes.csv and the plots to {}",
            dir.display()
        ));
    }
    Ok(())
}

fn write_outputs(
    dir: &Path,
    ctx: &serde_json::Value,
    reports: &[ShapeReport],
    title: &str,
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let bytes = serde_json::to_vec_pretty(ctx).context("cannot serialise the report")?;
    write_atomic(&dir.join("shapes.json"), &bytes)?;
    write_atomic(&dir.join("shapes.csv"), csv(reports).as_bytes())?;
    write_atomic(
        &dir.join("throughput.svg"),
        plot::throughput_svg(reports, title).as_bytes(),
    )?;
    if let Some(svg) = plot::kernels_svg(reports, title) {
        write_atomic(&dir.join("kernels.svg"), svg.as_bytes())?;
    }
    Ok(())
}

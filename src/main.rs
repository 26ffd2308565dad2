use std::process::ExitCode;

use clap::Parser;
use offline_bench::cli::{Cli, Command, one_line};
use offline_bench::commands;

/// Recycles the forward pass's large activation buffers instead of mapping and page-faulting
/// them afresh in every op (`heap`).
#[global_allocator]
static ALLOCATOR: offline_bench::heap::ActivationCache =
    offline_bench::heap::ActivationCache::new();

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("{}", one_line(&e));
            return ExitCode::from(2);
        }
    };
    if let Some(n) = cli.command.threads() {
        // SAFETY: no other thread exists yet to read the environment concurrently.
        unsafe { offline_bench::device::set_cpu_threads(n) };
    }
    let result = match &cli.command {
        Command::Throughput(args) => commands::throughput::run(args),
        Command::Generate(args) => commands::generate::run(args),
        Command::Shapes(args) => commands::shapes::run(args),
        Command::SelfCheck(args) => commands::selfcheck::run(args),
        Command::Compare(args) => commands::compare::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the context chain. candle appends a backtrace on later lines when
            // RUST_BACKTRACE is set; the cause is all on the first.
            let text = format!("{e:#}");
            eprintln!("error: {}", text.lines().next().unwrap_or("").trim_end());
            ExitCode::FAILURE
        }
    }
}

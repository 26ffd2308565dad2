//! Progress bars and status lines on stderr: shown on a terminal, silent when stderr is not one
//! (CI logs, pipes) or with `--quiet`, so the report on stdout stays clean.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

/// Where a run's progress and status lines go.
#[derive(Clone, Copy, Debug)]
pub struct Progress {
    bars: bool,
    quiet: bool,
}

impl Progress {
    pub fn new(quiet: bool) -> Self {
        Self {
            bars: !quiet && std::io::stderr().is_terminal(),
            quiet,
        }
    }

    /// No bars and no status lines (tests, library use).
    pub fn silent() -> Self {
        Self {
            bars: false,
            quiet: true,
        }
    }

    /// Whether bars are drawn (a terminal, not `--quiet`).
    pub fn shows_bars(&self) -> bool {
        self.bars
    }

    /// A bar of `len` steps, hidden when bars are off.
    pub fn bar(&self, len: u64, what: &str) -> ProgressBar {
        if !self.bars {
            return ProgressBar::hidden();
        }
        let pb = ProgressBar::new(len);
        if let Ok(style) =
            ProgressStyle::with_template("{prefix:>12} [{bar:30}] {pos}/{len} {msg} ({elapsed})")
        {
            pb.set_style(style.progress_chars("=> "));
        }
        pb.set_prefix(what.to_string());
        pb.enable_steady_tick(Duration::from_millis(200));
        pb
    }

    /// A status line (stderr), unless `--quiet`.
    pub fn info(&self, line: impl AsRef<str>) {
        if !self.quiet {
            eprintln!("{}", line.as_ref());
        }
    }

    /// A warning (stderr), printed even with `--quiet`.
    pub fn warn(&self, line: impl AsRef<str>) {
        eprintln!("warning: {}", line.as_ref());
    }
}

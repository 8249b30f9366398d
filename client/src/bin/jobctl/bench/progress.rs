//! The live line `bench` shows on stderr while a phase runs: how many
//! requests are done and at what rate, on a terminal only, so that piped or
//! logged output holds the report and nothing else.

use std::{io::IsTerminal as _, time::Duration};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A phase's progress line; a no-op when stderr is not a terminal. Clones
/// update the same line, one per task.
#[derive(Debug, Clone)]
pub(crate) struct Progress(Option<Line>);

#[derive(Debug, Clone)]
struct Line {
    bar: ProgressBar,
    /// What is counted, shown once the warmup is over.
    unit: &'static str,
}

impl Progress {
    /// Starts the line for the phase `label`, counting `unit`; it says
    /// "warming up" until [`Self::measuring`].
    pub(crate) fn start(label: &'static str, unit: &'static str, warmup: bool) -> Self {
        if !std::io::stderr().is_terminal() {
            return Self(None);
        }
        // `per_sec:0`: whole requests per second, not four decimals.
        let style = ProgressStyle::with_template(
            "{spinner} {prefix}: {human_pos} {msg} in {elapsed} ({per_sec:0})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_spinner());
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr())
            .with_style(style)
            .with_prefix(label)
            .with_message(if warmup { "(warming up)" } else { unit });
        bar.enable_steady_tick(Duration::from_millis(200));
        Self(Some(Line { bar, unit }))
    }

    /// The warmup is over: the count, time and rate start from here.
    pub(crate) fn measuring(&self) {
        if let Some(line) = &self.0 {
            line.bar.set_message(line.unit);
            line.bar.reset_elapsed();
            line.bar.reset_eta();
        }
    }

    /// Counts `n` more done.
    pub(crate) fn inc(&self, n: u64) {
        if let Some(line) = &self.0 {
            line.bar.inc(n);
        }
    }

    /// Erases the line, so the report starts on a clean one.
    pub(crate) fn finish(&self) {
        if let Some(line) = &self.0 {
            line.bar.finish_and_clear();
        }
    }
}

//! What the user sees while jobctl blocks on a job: a spinner with the
//! elapsed time when stderr is a terminal, which becomes a progress bar once
//! the job reports progress (followed with a `Watch` of the job; nothing is
//! shown and nothing is watched otherwise, so logs and pipes stay clean),
//! and a Ctrl-C that stops waiting but says the job keeps running, since
//! killing jobctl does not cancel anything on the server.

use std::{future::Future, io::IsTerminal as _, time::Duration};

use futures::StreamExt as _;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use jobd_client::{JobClient, JobId, Progress, Watch};

use crate::failure::Failure;

/// Runs `wait` (a wait for job `id`) under a spinner or progress bar,
/// giving up with [`Failure::Interrupted`] on Ctrl-C.
pub(crate) async fn wait_for<T>(
    client: &JobClient,
    id: JobId,
    wait: impl Future<Output = Result<T, Failure>>,
) -> Result<T, Failure> {
    let spinner = Spinner::start(id);
    let follow_progress = async {
        if let Some(bar) = &spinner.0
            && let Ok(mut events) = client.watch(Watch::ids([id])).await
        {
            // A broken watch leaves the spinner as it is; the wait decides.
            while let Some(Ok(event)) = events.next().await {
                if let Some(progress) = &event.progress {
                    show_progress(bar, progress);
                }
            }
        }
        std::future::pending::<()>().await;
    };
    tokio::select! {
        result = wait => result,
        () = follow_progress => unreachable!("pending forever"),
        // If the handler cannot be installed this branch is disabled, and
        // Ctrl-C simply kills the process as usual.
        Ok(()) = tokio::signal::ctrl_c() => Err(Failure::Interrupted { id }),
    }
}

/// The spinner, erased when dropped so that the answer (or the error line)
/// starts on a clean line whichever way the wait ends.
struct Spinner(Option<ProgressBar>);

impl Spinner {
    fn start(id: JobId) -> Self {
        if !std::io::stderr().is_terminal() {
            return Self(None);
        }
        let style = ProgressStyle::with_template("{spinner} waiting for job {msg} ({elapsed})")
            .unwrap_or_else(|_| ProgressStyle::default_spinner());
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr())
            .with_style(style)
            .with_prefix(id.to_string())
            .with_message(id.to_string());
        bar.enable_steady_tick(Duration::from_millis(100));
        Self(Some(bar))
    }
}

/// Turns the spinner into a bar (thousandths of the job) with the job's note.
fn show_progress(bar: &ProgressBar, progress: &Progress) {
    if bar.length().is_none() {
        let style = ProgressStyle::with_template(
            "{spinner} job {prefix} [{bar:30}] {percent:>3}% {msg} ({elapsed})",
        )
        .map(|style| style.progress_chars("=> "))
        .unwrap_or_else(|_| ProgressStyle::default_bar());
        bar.set_length(1000);
        bar.set_style(style);
    }
    // In 0..=1, so the product is in 0..=1000.
    bar.set_position((progress.fraction.clamp(0.0, 1.0) * 1000.0).round() as u64);
    bar.set_message(progress.message.clone());
}

impl Drop for Spinner {
    fn drop(&mut self) {
        if let Some(bar) = &self.0 {
            bar.finish_and_clear();
        }
    }
}

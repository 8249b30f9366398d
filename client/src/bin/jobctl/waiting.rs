//! What the user sees while jobctl blocks on a job: a spinner with the
//! elapsed time when stderr is a terminal (and nothing otherwise, so logs and
//! pipes stay clean), and a Ctrl-C that stops waiting but says the job keeps
//! running, since killing jobctl does not cancel anything on the server.

use std::{future::Future, io::IsTerminal as _, time::Duration};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use jobd_client::JobId;

use crate::failure::Failure;

/// Runs `wait` (a wait for job `id`) under a spinner, giving up with
/// [`Failure::Interrupted`] on Ctrl-C.
pub(crate) async fn wait_for<T>(
    id: JobId,
    wait: impl Future<Output = Result<T, Failure>>,
) -> Result<T, Failure> {
    let _spinner = Spinner::start(id);
    tokio::select! {
        result = wait => result,
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
            .with_message(id.to_string());
        bar.enable_steady_tick(Duration::from_millis(100));
        Self(Some(bar))
    }
}

impl Drop for Spinner {
    fn drop(&mut self) {
        if let Some(bar) = &self.0 {
            bar.finish_and_clear();
        }
    }
}

//! The context a running job receives: who it is, whether someone asked it
//! to stop, and where to report its progress.
//!
//! It holds a cancel signal and a progress sink, not the store: the same
//! `Ctx` works for a job run by a thread of this process, and for one run
//! elsewhere, whose reports travel another way to the store.

use std::{fmt, sync::Arc, time::Duration};

use jobd_proto::JobId;
use tokio_util::sync::CancellationToken;

use crate::job::{JobError, LogStream};

/// Where a running job's reports go (for a job run here: the store, under
/// the attempt's lease).
pub(crate) trait Reports: Send + Sync + 'static {
    /// Reports `fraction` done, with a short `message`.
    fn progress(&self, fraction: f64, message: &str);

    /// Adds `data` (a line, or lines) from `stream` to the job's log.
    fn log(&self, stream: LogStream, data: &[u8]);
}

/// Passed to every job function.
///
/// Async jobs are aborted outright on cancel, so they rarely need to look at
/// it, and process-pool jobs are killed with their child process (their
/// `Ctx` never reports a cancel). Blocking jobs cannot be interrupted: they
/// should check [`Ctx::is_cancelled`] between steps, or sleep with
/// [`Ctx::sleep_blocking`], and return [`JobError::Cancelled`] to honour a
/// cancel request.
///
/// ```
/// use jobd::{Ctx, JobError};
/// fn count_slowly(ctx: Ctx, args: serde_json::Value) -> Result<serde_json::Value, JobError> {
///     let n = args.as_u64().unwrap_or(3);
///     for _ in 0..n {
///         ctx.sleep_blocking(std::time::Duration::from_millis(10))?;
///     }
///     Ok(n.into())
/// }
/// ```
#[derive(Clone)]
pub struct Ctx {
    job_id: JobId,
    attempt: u32,
    cancel: CancellationToken,
    /// Lets blocking jobs wait on the async cancel signal and timers.
    runtime: tokio::runtime::Handle,
    /// Where progress reports go.
    reports: Arc<dyn Reports>,
}

impl fmt::Debug for Ctx {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ctx")
            .field("job_id", &self.job_id)
            .field("attempt", &self.attempt)
            .field("cancelled", &self.cancel.is_cancelled())
            .finish_non_exhaustive()
    }
}

impl Ctx {
    pub(crate) fn new(
        job_id: JobId,
        attempt: u32,
        cancel: CancellationToken,
        runtime: tokio::runtime::Handle,
        reports: Arc<dyn Reports>,
    ) -> Self {
        Self {
            job_id,
            attempt,
            cancel,
            runtime,
            reports,
        }
    }

    /// Reports how far the job is: `fraction` done (clamped into 0..=1; NaN
    /// counts as 0) and a short `message` (cut to 256 bytes). Cheap enough
    /// to call in a loop, from async and blocking jobs alike: `GetJob` shows
    /// the latest report at once, and watchers get at most one progress
    /// event per job every 100 ms (the latest report always reaches them).
    /// Progress is kept in memory only; it is not durable.
    ///
    /// ```
    /// use jobd::{Ctx, JobError};
    /// fn resize_all(ctx: Ctx, args: serde_json::Value) -> Result<serde_json::Value, JobError> {
    ///     let files = args.as_array().cloned().unwrap_or_default();
    ///     for (done, _file) in files.iter().enumerate() {
    ///         // ... resize one file ...
    ///         ctx.set_progress((done + 1) as f64 / files.len() as f64, &format!("{} of {}", done + 1, files.len()));
    ///     }
    ///     Ok(files.len().into())
    /// }
    /// ```
    pub fn set_progress(&self, fraction: f64, message: &str) {
        self.reports.progress(fraction, message);
    }

    /// Adds a line to the job's log, which `jobctl logs` and the `Logs`
    /// call show, live and after the job ended (a newline is added unless
    /// the line ends with one). Cheap enough for a loop: lines are stored
    /// in batches, and a job that logs faster than they can be stored loses
    /// lines (the log says how many) rather than slowing down. The log
    /// keeps the newest lines up to the server's cap (`--max-log-bytes`).
    ///
    /// ```
    /// use jobd::{Ctx, JobError};
    /// async fn fetch(ctx: Ctx, args: serde_json::Value) -> Result<serde_json::Value, JobError> {
    ///     ctx.log(format!("fetching {args}"));
    ///     Ok(serde_json::json!("fetched"))
    /// }
    /// ```
    pub fn log(&self, line: impl AsRef<str>) {
        let line = line.as_ref();
        if line.ends_with('\n') {
            self.reports.log(LogStream::Log, line.as_bytes());
        } else {
            let mut data = Vec::with_capacity(line.len() + 1);
            data.extend_from_slice(line.as_bytes());
            data.push(b'\n');
            self.reports.log(LogStream::Log, &data);
        }
    }

    /// Adds what a program the job runs wrote on `stream` to the job's log,
    /// as bytes (output that is not UTF-8 is kept as it is). For functions
    /// that run programs; see [`Ctx::log`] for the rest.
    pub fn log_output(&self, stream: LogStream, data: &[u8]) {
        self.reports.log(stream, data);
    }

    /// The running job's id.
    #[must_use]
    pub fn job_id(&self) -> JobId {
        self.job_id
    }

    /// Which attempt this is, starting at 1.
    #[must_use]
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// True once a cancel was requested (or the server is stopping).
    #[must_use]
    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// Resolves when a cancel is requested.
    pub async fn cancelled(&self) {
        self.cancel.cancelled().await;
    }

    /// Blocks the calling thread for `duration`, or until a cancel is
    /// requested, whichever comes first. Returns `Err(JobError::Cancelled)` in
    /// the second case so a blocking function can simply use `?`.
    ///
    /// # Panics
    ///
    /// When called from async code (inside the runtime): it is for
    /// blocking-pool functions only. Async jobs use `tokio::time::sleep` and
    /// are aborted on cancel anyway.
    pub fn sleep_blocking(&self, duration: Duration) -> Result<(), JobError> {
        self.sleep_blocking_until(duration, true)
    }

    /// Blocks the calling thread for `duration` on the server's clock,
    /// deaf to cancel requests (as Python's `time.sleep` is): for functions
    /// that model work which cannot be interrupted. A test running on a
    /// paused clock does not wait for it in real time.
    ///
    /// # Panics
    ///
    /// When called from async code, as [`Ctx::sleep_blocking`].
    pub fn sleep_blocking_uninterruptible(&self, duration: Duration) {
        let _ = self.sleep_blocking_until(duration, false);
    }

    /// The job's cancel signal, for code in this crate that runs the job's
    /// work itself (command functions).
    pub(crate) fn cancel_token(&self) -> CancellationToken {
        self.cancel.clone()
    }

    /// Drives `future` to its end on the calling blocking-pool thread.
    pub(crate) fn block_on<F: std::future::Future>(&self, future: F) -> F::Output {
        self.runtime.block_on(future)
    }

    fn sleep_blocking_until(&self, duration: Duration, cancellable: bool) -> Result<(), JobError> {
        let cancel = &self.cancel;
        // Blocking-pool threads are plain OS threads outside the runtime, so
        // they may drive this small future to completion themselves.
        self.runtime.block_on(async {
            tokio::select! {
                () = cancel.cancelled(), if cancellable => Err(JobError::Cancelled),
                () = tokio::time::sleep(duration) => Ok(()),
            }
        })
    }
}

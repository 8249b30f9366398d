//! The context a running job receives: who it is, and whether someone asked it
//! to stop.

use std::time::Duration;

use jobd_proto::JobId;
use tokio_util::sync::CancellationToken;

use crate::job::JobError;

/// Passed to every job function.
///
/// Async jobs are aborted outright on cancel, so they rarely need to look at
/// it. Blocking jobs cannot be interrupted: they should check
/// [`Ctx::is_cancelled`] between steps, or sleep with
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
#[derive(Debug, Clone)]
pub struct Ctx {
    job_id: JobId,
    attempt: u32,
    cancel: CancellationToken,
    /// Lets blocking jobs wait on the async cancel signal and timers.
    runtime: tokio::runtime::Handle,
}

impl Ctx {
    pub(crate) fn new(
        job_id: JobId,
        attempt: u32,
        cancel: CancellationToken,
        runtime: tokio::runtime::Handle,
    ) -> Self {
        Self {
            job_id,
            attempt,
            cancel,
            runtime,
        }
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
        let cancel = &self.cancel;
        // Blocking-pool threads are plain OS threads outside the runtime, so
        // they may drive this small future to completion themselves.
        self.runtime.block_on(async {
            tokio::select! {
                () = cancel.cancelled() => Err(JobError::Cancelled),
                () = tokio::time::sleep(duration) => Ok(()),
            }
        })
    }
}

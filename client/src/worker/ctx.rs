//! What a worker's job function sees: its [`Ctx`] (which job it runs,
//! whether jobd asked it to stop, where its progress goes) and the
//! [`JobFailure`] it returns when it has no value.
//!
//! Both have the shape of jobd's own `Ctx` and `JobError`, so that a
//! function moves between jobd's registry and a worker by changing its
//! imports. The context holds a cancel signal and a progress board, not the
//! session: a job keeps running while the worker reconnects, and its
//! progress waits on the board for the next session.

use std::{
    collections::HashMap,
    fmt,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, SystemTime},
};

use jobd_proto::JobId;
use tokio::sync::Notify;

use crate::answer::LogStream;
use tokio_util::sync::CancellationToken;

/// Why a job function has no value: what it returns instead, as jobd's own
/// functions return `JobError`.
///
/// A failure is data: jobd stores it with the job and clients see the job
/// FAILED (or CANCELLED), never a transport error.
///
/// ```
/// use jobd_client::JobFailure;
///
/// let err = JobFailure::failed("disk on fire");
/// assert_eq!(err.to_string(), "disk on fire");
/// // Arguments that do not parse fail the job, with `?`:
/// let parsed: Result<(f64, f64), JobFailure> =
///     serde_json::from_value(serde_json::json!("not a pair")).map_err(Into::into);
/// assert!(parsed.unwrap_err().to_string().starts_with("invalid arguments: "));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JobFailure {
    /// The function failed; the job ends FAILED with this message.
    #[error("{0}")]
    Failed(String),
    /// A failure worth another attempt (a flaky network, a busy peer): jobd
    /// runs the job again after a backoff while it has attempts left (its
    /// `max_attempts`), and otherwise fails it with this message.
    #[error("{0}")]
    Retryable(String),
    /// The function honoured a cancel request (see [`Ctx::is_cancelled`]);
    /// the job ends CANCELLED.
    #[error("job was cancelled")]
    Cancelled,
    /// The function ran past a time limit of its own (for instance the
    /// job's [`Ctx::deadline`], enforced here); the job fails as timed out.
    #[error("job timed out: {0}")]
    TimedOut(String),
}

impl JobFailure {
    /// A plain failure with a message.
    pub fn failed(message: impl fmt::Display) -> Self {
        Self::Failed(message.to_string())
    }

    /// A failure worth another attempt.
    pub fn retryable(message: impl fmt::Display) -> Self {
        Self::Retryable(message.to_string())
    }

    /// A failure for arguments the function cannot use.
    pub fn bad_args(message: impl fmt::Display) -> Self {
        Self::Failed(format!("invalid arguments: {message}"))
    }
}

impl From<serde_json::Error> for JobFailure {
    fn from(err: serde_json::Error) -> Self {
        Self::bad_args(err)
    }
}

/// One lease on one job: the job and the fencing token of the attempt this
/// worker was given. Every report, progress note, cancel and give-back
/// names the job by it, so a report about an older attempt can never pass
/// for the current one.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct Lease {
    /// The job id as jobd sent it.
    pub(crate) job_id: String,
    pub(crate) fencing_token: u64,
}

/// The longest progress note jobd keeps; a longer one is cut here already,
/// so a function that writes a novel does not make the worker hold it.
const MAX_PROGRESS_MESSAGE: usize = 256;

/// The latest progress of each running job, waiting to be sent. One entry
/// per lease at most (a newer report replaces an older one), so a function
/// that reports in a tight loop costs a map entry, not a queue, and a job
/// that reports while the worker reconnects loses nothing but the reports
/// in between.
#[derive(Debug, Default)]
pub(crate) struct ProgressBoard {
    latest: Mutex<HashMap<Lease, (f64, String)>>,
    /// Log lines of each running job, waiting to be sent, in order.
    logs: Mutex<HashMap<Lease, PendingLog>>,
    /// Woken on every report and line; the session then takes the board.
    changed: Notify,
}

/// Bytes of log lines one job may have waiting to be sent (while the worker
/// reconnects, say); past it lines are dropped, and counted.
const MAX_PENDING_LOG: usize = 256 * 1024;

/// One job's log lines waiting to be sent.
#[derive(Debug, Default)]
pub(crate) struct PendingLog {
    pub(crate) lines: Vec<(LogStream, Vec<u8>)>,
    bytes: usize,
    dropped: u64,
}

impl ProgressBoard {
    fn post(&self, lease: &Lease, fraction: f64, message: &str) {
        let message = cut(message, MAX_PROGRESS_MESSAGE).to_owned();
        self.latest
            .lock()
            // Only inserts and takes happen under the lock: a panic there
            // leaves the map whole.
            .unwrap_or_else(PoisonError::into_inner)
            .insert(lease.clone(), (fraction, message));
        self.changed.notify_one();
    }

    fn log(&self, lease: &Lease, stream: LogStream, data: Vec<u8>) {
        {
            let mut logs = self.logs.lock().unwrap_or_else(PoisonError::into_inner);
            let pending = logs.entry(lease.clone()).or_default();
            if pending.bytes + data.len() > MAX_PENDING_LOG {
                pending.dropped += 1;
                return;
            }
            pending.bytes += data.len();
            pending.lines.push((stream, data));
        }
        self.changed.notify_one();
    }

    /// Every job's waiting log lines, with a note of any dropped.
    pub(crate) fn take_logs(&self) -> HashMap<Lease, Vec<(LogStream, Vec<u8>)>> {
        let logs = std::mem::take(&mut *self.logs.lock().unwrap_or_else(PoisonError::into_inner));
        logs.into_iter()
            .map(|(lease, mut pending)| {
                if pending.dropped > 0 {
                    let note = format!(
                        "[worker: {} log lines dropped: the job wrote faster than they could be sent]\n",
                        pending.dropped
                    );
                    pending.lines.push((LogStream::Log, note.into_bytes()));
                }
                (lease, pending.lines)
            })
            .collect()
    }

    /// Every report posted since the last take, latest per lease.
    pub(crate) fn take(&self) -> HashMap<Lease, (f64, String)> {
        std::mem::take(&mut *self.latest.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Resolves once a report was posted since the last time it resolved.
    pub(crate) async fn changed(&self) {
        self.changed.notified().await;
    }
}

/// `text` cut to at most `max` bytes, on a character boundary.
fn cut(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Passed to every job function a [`Worker`](crate::Worker) runs: jobd's
/// `Ctx`, across the network.
///
/// An async function is stopped at once on cancel (its future is dropped),
/// so it rarely needs to look at it. A blocking function cannot be
/// interrupted: it should check [`Ctx::is_cancelled`] between steps, or
/// sleep with [`Ctx::sleep_blocking`], and return [`JobFailure::Cancelled`]
/// to honour a cancel.
///
/// ```
/// use jobd_client::{Ctx, JobFailure};
///
/// fn count_slowly(ctx: Ctx, args: serde_json::Value) -> Result<serde_json::Value, JobFailure> {
///     let n = args.as_u64().unwrap_or(3);
///     for done in 0..n {
///         ctx.set_progress(done as f64 / n as f64, &format!("{done} of {n}"));
///         ctx.sleep_blocking(std::time::Duration::from_millis(10))?;
///     }
///     Ok(n.into())
/// }
/// ```
#[derive(Clone)]
pub struct Ctx {
    job_id: JobId,
    attempt: u32,
    max_attempts: u32,
    deadline: Option<SystemTime>,
    cancel: CancellationToken,
    /// Lets blocking functions wait on the async cancel signal and timers.
    runtime: tokio::runtime::Handle,
    /// The job's lease, which its progress reports carry.
    lease: Lease,
    progress: Arc<ProgressBoard>,
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

/// What jobd said about a job when it assigned it, for its [`Ctx`].
#[derive(Debug, Clone)]
pub(crate) struct JobTerms {
    pub(crate) job_id: JobId,
    pub(crate) attempt: u32,
    pub(crate) max_attempts: u32,
    pub(crate) deadline: Option<SystemTime>,
}

impl Ctx {
    pub(crate) fn new(
        terms: JobTerms,
        lease: Lease,
        cancel: CancellationToken,
        progress: Arc<ProgressBoard>,
    ) -> Self {
        Self {
            job_id: terms.job_id,
            attempt: terms.attempt,
            max_attempts: terms.max_attempts,
            deadline: terms.deadline,
            cancel,
            runtime: tokio::runtime::Handle::current(),
            lease,
            progress,
        }
    }

    /// Reports how far the job is: `fraction` done (jobd clamps it into
    /// 0..=1; NaN counts as 0) and a short `message` (cut to 256 bytes).
    /// Cheap enough to call in a loop, from async and blocking functions
    /// alike: only the latest report waits to be sent, and jobd passes it
    /// on to `GetJob` and watchers. Progress is not durable and not
    /// acknowledged.
    ///
    /// ```
    /// use jobd_client::{Ctx, JobFailure};
    ///
    /// async fn download(ctx: Ctx, args: serde_json::Value) -> Result<serde_json::Value, JobFailure> {
    ///     let urls: Vec<String> = serde_json::from_value(args)?;
    ///     for (done, _url) in urls.iter().enumerate() {
    ///         // ... fetch one ...
    ///         ctx.set_progress((done + 1) as f64 / urls.len() as f64, &format!("{} of {}", done + 1, urls.len()));
    ///     }
    ///     Ok(urls.len().into())
    /// }
    /// ```
    pub fn set_progress(&self, fraction: f64, message: &str) {
        self.progress.post(&self.lease, fraction, message);
    }

    /// Adds a line to the job's log, which `jobctl logs` and
    /// [`JobClient::logs`](crate::JobClient::logs) show (a newline is added
    /// unless the line ends with one). Lines are sent to jobd in order, and
    /// all before the job's report; a job that logs faster than they can be
    /// sent loses lines (the log says how many) rather than slowing down.
    ///
    /// ```
    /// use jobd_client::{Ctx, JobFailure};
    ///
    /// async fn fetch(ctx: Ctx, args: serde_json::Value) -> Result<serde_json::Value, JobFailure> {
    ///     ctx.log(format!("fetching {args}"));
    ///     Ok(serde_json::json!("fetched"))
    /// }
    /// ```
    pub fn log(&self, line: impl AsRef<str>) {
        let mut data = line.as_ref().as_bytes().to_vec();
        if data.last() != Some(&b'\n') {
            data.push(b'\n');
        }
        self.progress.log(&self.lease, LogStream::Log, data);
    }

    /// Adds what a program the job runs wrote on `stream` to the job's log,
    /// as bytes (output that is not UTF-8 is kept as it is).
    pub fn log_output(&self, stream: LogStream, data: &[u8]) {
        if !data.is_empty() {
            self.progress.log(&self.lease, stream, data.to_vec());
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

    /// How many attempts the job may make in all, so that a function can
    /// tell whether a [`JobFailure::Retryable`] will be retried
    /// (`attempt() < max_attempts()`).
    #[must_use]
    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    /// When jobd fails the job as timed out (and cancels it here), if it
    /// was submitted with a timeout. By jobd's clock, which may differ a
    /// little from this machine's.
    #[must_use]
    pub fn deadline(&self) -> Option<SystemTime> {
        self.deadline
    }

    /// True once jobd asked the job to stop (a cancel, its lease was lost,
    /// or the worker gave it back while shutting down).
    #[must_use]
    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// Resolves when the job is asked to stop.
    pub async fn cancelled(&self) {
        self.cancel.cancelled().await;
    }

    /// Blocks the calling thread for `duration`, or until the job is asked
    /// to stop, whichever comes first. Returns `Err(JobFailure::Cancelled)`
    /// in the second case so that a blocking function can simply use `?`.
    ///
    /// # Panics
    ///
    /// When called from async code (inside the runtime): it is for blocking
    /// functions only. Async functions use `tokio::time::sleep` and are
    /// dropped on cancel anyway.
    pub fn sleep_blocking(&self, duration: Duration) -> Result<(), JobFailure> {
        self.sleep_blocking_until(duration, true)
    }

    /// Blocks the calling thread for `duration`, deaf to cancel requests
    /// (as Python's `time.sleep` is): for functions that model work which
    /// cannot be interrupted.
    ///
    /// # Panics
    ///
    /// When called from async code, as [`Ctx::sleep_blocking`].
    pub fn sleep_blocking_uninterruptible(&self, duration: Duration) {
        let _ = self.sleep_blocking_until(duration, false);
    }

    fn sleep_blocking_until(
        &self,
        duration: Duration,
        cancellable: bool,
    ) -> Result<(), JobFailure> {
        let cancel = &self.cancel;
        // Blocking functions run on the runtime's blocking threads, outside
        // any async context, so they may drive this small future themselves.
        self.runtime.block_on(async {
            tokio::select! {
                () = cancel.cancelled(), if cancellable => Err(JobFailure::Cancelled),
                () = tokio::time::sleep(duration) => Ok(()),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_notes_are_cut_on_a_character_boundary() {
        assert_eq!(cut("short", 256), "short");
        let long = "é".repeat(200);
        let kept = cut(&long, 256);
        assert_eq!(kept.len(), 256);
        assert!(long.starts_with(kept));
        assert_eq!(cut("aé", 2), "a");
    }

    #[test]
    fn the_board_keeps_the_latest_report_per_lease() {
        let board = ProgressBoard::default();
        let lease = |token| Lease {
            job_id: "j".to_owned(),
            fencing_token: token,
        };
        board.post(&lease(1), 0.1, "one");
        board.post(&lease(1), 0.2, "two");
        board.post(&lease(2), 0.5, "other attempt");
        let taken = board.take();
        assert_eq!(taken.len(), 2);
        assert_eq!(taken[&lease(1)], (0.2, "two".to_owned()));
        assert!(board.take().is_empty());
    }
}

//! What a job is in the server's domain: its record, its outcome, and the
//! error type job functions return.

use std::{
    collections::BTreeMap,
    fmt,
    sync::Arc,
    time::{Duration, SystemTime},
};

use jobd_proto::{JobId, JobState};

use crate::function::PoolKind;

/// The name of a pool, as a Submit asks for it (a string on the wire):
/// "async", "blocking", "worker" and "process" today. Kept apart from the [`PoolKind`] that runs
/// it, so that a pool is found by name and new kinds of executor do not
/// change what clients send.
///
/// ```
/// use jobd::{PoolKind, PoolName};
/// assert_eq!(PoolName::of(PoolKind::Blocking).as_str(), "blocking");
/// assert_eq!(PoolName::from("async"), PoolName::of(PoolKind::Async));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PoolName(Arc<str>);

impl PoolName {
    /// The default pool of executors of `kind`.
    #[must_use]
    pub fn of(kind: PoolKind) -> Self {
        Self::from(kind.as_str())
    }

    /// The name as clients send it.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<&str> for PoolName {
    fn from(name: &str) -> Self {
        Self(Arc::from(name))
    }
}

impl fmt::Display for PoolName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why a job function did not produce a value.
///
/// Job functions return `Result<serde_json::Value, JobError>`. A failure is
/// data: it is stored with the job and reported to clients as state `FAILED`
/// (or `CANCELLED`), never as a transport error.
///
/// ```
/// use jobd::JobError;
/// let err = JobError::failed("disk on fire");
/// assert_eq!(err.to_string(), "disk on fire");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JobError {
    /// The function reported an error.
    #[error("{0}")]
    Failed(String),
    /// The function panicked. The pool worker survived.
    #[error("job panicked: {0}")]
    Panicked(String),
    /// The job was cancelled: before it started, by aborting it, or because
    /// the function honoured a cooperative cancel request.
    #[error("job was cancelled")]
    Cancelled,
    /// The job was stopped because the server shut down while it ran.
    #[error("job interrupted: {0}")]
    Interrupted(String),
    /// The job ran past the running-time limit it was submitted with.
    #[error("job timed out: {0}")]
    TimedOut(String),
    /// A failure worth another attempt (a flaky network, a busy peer): the
    /// job runs again after a backoff while it has attempts left (its
    /// `max_attempts`), and otherwise fails with this message.
    #[error("{0}")]
    Retryable(String),
    /// The function's value was larger than the server's result cap
    /// (`--max-result-bytes`); the value was dropped, the job failed.
    #[error("result too large: {0}")]
    ResultTooLarge(String),
    /// The remote worker running the job was lost and the job may not run
    /// again (not safe to retry, or a poison pill); or the process-pool
    /// child running it died (a crash, an abort, a signal, its memory
    /// limit) and the job has no attempt left or is not safe to retry.
    #[error("worker lost: {0}")]
    WorkerLost(String),
}

impl JobError {
    /// A plain failure with a message.
    pub fn failed(message: impl std::fmt::Display) -> Self {
        Self::Failed(message.to_string())
    }

    /// A failure for arguments the function cannot use.
    pub fn bad_args(message: impl std::fmt::Display) -> Self {
        Self::Failed(format!("invalid arguments: {message}"))
    }

    /// The terminal state a job ends in when its function returns this error.
    #[must_use]
    pub fn terminal_state(&self) -> JobState {
        match self {
            Self::Cancelled => JobState::Cancelled,
            Self::Failed(_)
            | Self::Panicked(_)
            | Self::Interrupted(_)
            | Self::TimedOut(_)
            | Self::Retryable(_)
            | Self::ResultTooLarge(_)
            | Self::WorkerLost(_) => JobState::Failed,
        }
    }
}

impl From<serde_json::Error> for JobError {
    fn from(err: serde_json::Error) -> Self {
        Self::bad_args(err)
    }
}

/// How a finished job ended.
pub type Outcome = Result<serde_json::Value, JobError>;

/// Everything the server stores about one job.
#[derive(Debug, Clone)]
pub struct JobRecord {
    /// The job's id.
    pub id: JobId,
    /// The registered function it runs.
    pub function: Arc<str>,
    /// The pool it runs on.
    pub pool: PoolName,
    /// Where it is in its life.
    pub state: JobState,
    /// The argument it was submitted with.
    pub args: serde_json::Value,
    /// Labels given at submit.
    pub labels: BTreeMap<String, String>,
    /// Labels a remote worker must carry to run the job (for functions
    /// served by workers).
    pub worker_labels: BTreeMap<String, String>,
    /// The client's request id, if one was given.
    pub request_id: Option<String>,
    /// Higher starts first within the pool; equal priorities in submission
    /// order.
    pub priority: i32,
    /// Not started before this time (a delayed or scheduled job).
    pub not_before: Option<SystemTime>,
    /// The running-time limit of each attempt, if any.
    pub timeout: Option<Duration>,
    /// How many attempts retryable failures may use in all (at least 1).
    pub max_attempts: u32,
    /// Whether an attempt lost with the process or worker running it may
    /// run again (the function's registration said so when the job was
    /// submitted); if not, the job fails instead.
    pub retry_safe: bool,
    /// When the server accepted it.
    pub submitted_at: SystemTime,
    /// When the latest attempt started.
    pub started_at: Option<SystemTime>,
    /// When it reached a terminal state.
    pub finished_at: Option<SystemTime>,
    /// How many times execution has started.
    pub attempt: u32,
    /// Set once the job is terminal.
    pub outcome: Option<Outcome>,
    /// The latest progress its current (or last) attempt reported; kept in
    /// memory only, never written to the durable store.
    pub progress: Option<Progress>,
}

/// Which output of a job a log entry came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum LogStream {
    /// A program's standard output.
    Stdout,
    /// A program's standard error.
    Stderr,
    /// A job function's own log lines ([`crate::Ctx::log`]).
    Log,
}

/// One entry of a job's log: a line (or a chunk of lines) one attempt
/// wrote, kept as bytes so that output that is not UTF-8 survives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEntry {
    /// Where it starts in the job's log: the bytes written before it, by
    /// every attempt, including entries no longer kept.
    pub offset: u64,
    /// The attempt that wrote it.
    pub attempt: u32,
    /// Which output it came from.
    pub stream: LogStream,
    /// When the server took it.
    pub at: SystemTime,
    /// What was written (a line keeps its newline).
    pub data: Vec<u8>,
}

impl LogEntry {
    /// Where the next entry starts.
    #[must_use]
    pub fn end(&self) -> u64 {
        self.offset + self.data.len() as u64
    }
}

/// A page of a job's log, as [`Engine::logs`](crate::Engine::logs) yields
/// them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogPage {
    /// The entries that end after the offset asked for, in order.
    pub entries: Vec<LogEntry>,
    /// Bytes after the offset asked for and before the first entry that are
    /// no longer kept (the log's cap dropped them).
    pub skipped: u64,
    /// Where to read on from.
    pub end: u64,
}

impl LogPage {
    /// The page of `entries`, read from offset `from`.
    #[must_use]
    pub fn new(entries: Vec<LogEntry>, from: u64) -> Self {
        Self {
            skipped: entries.first().map_or(0, |e| e.offset.saturating_sub(from)),
            end: entries.last().map_or(from, LogEntry::end),
            entries,
        }
    }
}

/// `outcome`, or a `ResultTooLarge` failure when its value is more than
/// `max_bytes` of JSON: a result too large to store and send fails the job
/// (as data), so the caller learns why instead of the answer failing in
/// transit.
pub(crate) fn cap_result(outcome: Outcome, max_bytes: usize) -> Outcome {
    outcome.and_then(|value| match json_len(&value) {
        len if len > max_bytes => Err(JobError::ResultTooLarge(format!(
            "the function returned {len} bytes of JSON; the server keeps at most {max_bytes} (--max-result-bytes)"
        ))),
        _ => Ok(value),
    })
}

/// The length of `value` as compact JSON text, without building the text.
pub(crate) fn json_len(value: &serde_json::Value) -> usize {
    struct Counter(usize);
    impl std::io::Write for Counter {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut counter = Counter(0);
    // Writing a `Value` into a sink that never fails cannot fail.
    let _ = serde_json::to_writer(&mut counter, value);
    counter.0
}

#[cfg(test)]
impl JobRecord {
    /// A new pending job of `function` on `pool`, with no argument and no
    /// options, for unit tests to adjust.
    pub(crate) fn pending_for_test(function: &str, pool: PoolKind) -> Self {
        Self {
            id: JobId::new(),
            function: Arc::from(function),
            pool: PoolName::of(pool),
            state: JobState::Pending,
            args: serde_json::Value::Null,
            labels: BTreeMap::new(),
            worker_labels: BTreeMap::new(),
            request_id: None,
            priority: 0,
            not_before: None,
            timeout: None,
            max_attempts: 1,
            retry_safe: true,
            submitted_at: crate::Clock::system().now(),
            started_at: None,
            finished_at: None,
            attempt: 0,
            outcome: None,
            progress: None,
        }
    }
}

/// How far a running job says it is (see [`crate::Ctx::set_progress`]), as
/// the server took the report.
#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    fraction: f64,
    /// Shared by the job's record and every event that carries it.
    message: Arc<str>,
    at: SystemTime,
}

impl Progress {
    /// The longest message kept, in bytes; longer ones are cut at a
    /// character boundary.
    pub const MAX_MESSAGE_BYTES: usize = 256;

    /// A report of `fraction` done (clamped into 0..=1; NaN counts as 0)
    /// with a short `message`, taken at `at`.
    #[must_use]
    pub(crate) fn new(fraction: f64, message: &str, at: SystemTime) -> Self {
        let fraction = if fraction.is_nan() {
            0.0
        } else {
            fraction.clamp(0.0, 1.0)
        };
        let mut end = message.len().min(Self::MAX_MESSAGE_BYTES);
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        Self {
            fraction,
            message: Arc::from(&message[..end]),
            at,
        }
    }

    /// Done so far, 0.0 to 1.0.
    #[must_use]
    pub fn fraction(&self) -> f64 {
        self.fraction
    }

    /// The job's note, at most [`Self::MAX_MESSAGE_BYTES`] bytes.
    #[must_use]
    pub fn message(&self) -> &str {
        &self.message
    }

    /// When the server took the report.
    #[must_use]
    pub fn at(&self) -> SystemTime {
        self.at
    }
}

/// A finished job's answer, as `Result` returns it.
#[derive(Debug, Clone, PartialEq)]
pub struct Finished {
    /// The terminal state.
    pub state: JobState,
    /// The value or the error.
    pub outcome: Outcome,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_is_clamped_and_its_message_cut_at_a_character_boundary() {
        let at = SystemTime::UNIX_EPOCH;
        assert_eq!(Progress::new(f64::NAN, "", at).fraction(), 0.0);
        assert_eq!(Progress::new(-3.0, "", at).fraction(), 0.0);
        assert_eq!(Progress::new(1.5, "", at).fraction(), 1.0);
        assert_eq!(Progress::new(0.25, "", at).fraction(), 0.25);
        // 255 ASCII bytes then a 2-byte character straddling the limit.
        let long = format!("{}é{}", "a".repeat(255), "b".repeat(100));
        let cut = Progress::new(0.5, &long, at);
        assert_eq!(cut.message(), "a".repeat(255));
        let exact = "c".repeat(Progress::MAX_MESSAGE_BYTES);
        assert_eq!(Progress::new(0.5, &exact, at).message(), exact);
    }
}

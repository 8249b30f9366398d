//! What the server answers, as the client's own types: a job's record and
//! outcome, its progress, a cancel report and outcome, a page of jobs, a map
//! item, a watch event, a function's description, an attached worker.
//!
//! Plain data, with no calls and no wire types: `wire` reads the generated
//! messages into these, and the modules that make calls hand them out.
//! Keeping them apart from both is what keeps the module graph a DAG.

use std::{
    collections::HashMap,
    time::{Duration, SystemTime},
};

use jobd_proto::{JobId, JobState};

use crate::error::{Error, ErrorKind};

/// One function the server can run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FunctionInfo {
    /// The name to submit it by.
    pub name: String,
    /// The pool it runs on ("async" or "blocking", or the pool of the remote
    /// workers that serve it).
    pub pool: String,
    /// The kind of that pool: which executor runs the function's jobs.
    pub pool_kind: PoolKind,
    /// For a function served by remote workers ([`PoolKind::Worker`]): how
    /// many worker sessions serve it now. Zero does not make it unknown: its
    /// jobs are accepted and wait for a worker.
    pub workers: u32,
    /// What it does and how to call it.
    pub description: String,
    /// The JSON Schema its argument must match, if it declared one; the
    /// server refuses a submission that does not match it.
    pub args_schema: Option<serde_json::Value>,
    /// What it returns, in words, if it said.
    pub returns: Option<String>,
}

/// The kind of pool a function runs on, in [`FunctionInfo::pool_kind`]. The
/// server may add kinds; one this client does not know reads as
/// [`PoolKind::Unspecified`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum PoolKind {
    /// The server named no kind, or one this client does not know.
    Unspecified,
    /// Tokio tasks in jobd: for I/O-bound functions.
    Async,
    /// Dedicated threads in jobd: for CPU-bound or blocking functions.
    Blocking,
    /// Remote worker processes attached to jobd (see
    /// [`Worker`](crate::Worker)): for the functions they declared.
    Worker,
    /// Child processes of jobd, one job at a time each: for functions that
    /// must not take the server down when they crash, and that a cancel or
    /// a time limit must kill for sure.
    Process,
}

impl PoolKind {
    /// The kind's name in `snake_case`, as `jobctl -o json` prints it.
    ///
    /// ```
    /// assert_eq!(jobd_client::PoolKind::Worker.as_str(), "worker");
    /// ```
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unspecified => "unspecified",
            Self::Async => "async",
            Self::Blocking => "blocking",
            Self::Worker => "worker",
            Self::Process => "process",
        }
    }
}

/// One remote worker session attached to the server
/// ([`JobClient::workers`](crate::JobClient::workers)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerInfo {
    /// The server's id of the session.
    pub session_id: String,
    /// What the worker calls itself.
    pub name: String,
    /// The worker process: the same across its reconnects.
    pub instance: String,
    /// Where it connects from, as the server sees it.
    pub peer: String,
    /// The functions it serves, sorted.
    pub functions: Vec<String>,
    /// Its labels (jobs submitted with worker labels go only to workers
    /// carrying all of them).
    pub labels: HashMap<String, String>,
    /// How many jobs it runs at once, at most.
    pub slots: u32,
    /// How many of its slots run a job now.
    pub busy: u32,
    /// The jobs it runs now.
    pub running: Vec<JobId>,
    /// When the server last heard from it.
    pub last_heartbeat: Option<SystemTime>,
    /// When it attached.
    pub attached_at: Option<SystemTime>,
    /// Its software and version, as it said.
    pub version: String,
    /// True once it is draining: it takes no new job.
    pub draining: bool,
}

/// Everything the server knows about a job (`GetJob`).
#[derive(Debug, Clone, PartialEq)]
pub struct JobInfo {
    /// The job id.
    pub id: JobId,
    /// The function it runs.
    pub function: String,
    /// The pool it runs on.
    pub pool: String,
    /// Its state.
    pub state: JobState,
    /// Its argument.
    pub args: serde_json::Value,
    /// Its labels.
    pub labels: HashMap<String, String>,
    /// The worker labels it was submitted with: only remote workers
    /// carrying all of them may run it.
    pub worker_labels: HashMap<String, String>,
    /// The request id it was submitted with, if any.
    pub request_id: Option<String>,
    /// When it was accepted.
    pub submitted_at: Option<SystemTime>,
    /// When its latest attempt started.
    pub started_at: Option<SystemTime>,
    /// When it finished.
    pub finished_at: Option<SystemTime>,
    /// How many attempts have started.
    pub attempt: u32,
    /// Its priority within its pool (higher starts first).
    pub priority: i32,
    /// For a delayed or scheduled job: the time before which it does not
    /// start.
    pub not_before: Option<SystemTime>,
    /// Its running-time limit per attempt, if it has one.
    pub timeout: Option<Duration>,
    /// How many attempts retryable failures may use in all.
    pub max_attempts: u32,
    /// Its outcome, once finished.
    pub outcome: Option<JobOutcome>,
    /// The latest progress its current (or last) attempt reported, if any
    /// (kept in the server's memory only).
    pub progress: Option<Progress>,
}

/// How a finished job ended, as data: a failed job is not an error here.
#[derive(Debug, Clone, PartialEq)]
pub struct JobOutcome {
    /// SUCCEEDED, FAILED or CANCELLED.
    pub state: JobState,
    /// The value, or the job's error kind and message.
    pub result: Result<serde_json::Value, (ErrorKind, String)>,
}

impl JobOutcome {
    /// The value, or the job's failure as an [`Error`].
    ///
    /// # Errors
    ///
    /// [`Error::JobFailed`] or [`Error::Cancelled`].
    pub fn into_value(self, id: JobId) -> Result<serde_json::Value, Error> {
        match self.result {
            Ok(value) => Ok(value),
            Err(_) if self.state == JobState::Cancelled => Err(Error::Cancelled { id }),
            Err((kind, message)) => Err(Error::JobFailed { id, kind, message }),
        }
    }
}

/// How far a running job says it is.
#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    /// Done so far, 0.0 to 1.0.
    pub fraction: f64,
    /// The job's short note (at most 256 bytes), possibly empty.
    pub message: String,
    /// When the server took the report.
    pub updated_at: Option<SystemTime>,
}

/// Which output of a job a log entry came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum LogStream {
    /// A program's standard output.
    Stdout,
    /// A program's standard error.
    Stderr,
    /// A line the job function logged ([`Ctx::log`](crate::Ctx::log) and
    /// jobd's own `Ctx::log`).
    Log,
    /// A stream this client does not know.
    Unspecified,
}

/// One entry of a job's log: a line (or a chunk of a long one), as bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEntry {
    /// Where it starts in the job's log (bytes written before it).
    pub offset: u64,
    /// The attempt that wrote it, from 1.
    pub attempt: u32,
    /// Which output it came from.
    pub stream: LogStream,
    /// When the server took it.
    pub at: Option<SystemTime>,
    /// What was written (a line keeps its newline); not necessarily UTF-8.
    pub data: Vec<u8>,
}

/// A page of a job's log, as [`JobClient::logs`](crate::JobClient::logs)
/// streams them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogPage {
    /// Entries, in order.
    pub entries: Vec<LogEntry>,
    /// Bytes before the first entry (after the previous page, or the
    /// offset asked for) that the server no longer keeps: its cap dropped
    /// them.
    pub skipped: u64,
    /// Where to resume: the offset after the last entry.
    pub next_offset: u64,
}

/// What a cancel request achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CancelReport {
    /// What happened (cancelled, aborted, requested, already done).
    pub outcome: CancelOutcome,
    /// True if the job is now cancelled, as `Future.cancel()` returns.
    pub cancelled: bool,
    /// The job's state after the request.
    pub state: JobState,
}

/// What a cancel request did, in a [`CancelReport`]. The server may add
/// outcomes; one this client does not know reads as
/// [`CancelOutcome::Unspecified`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CancelOutcome {
    /// The server named no outcome, or one this client does not know (a
    /// newer server's).
    Unspecified,
    /// The job was pending and is now cancelled; it will never run.
    Cancelled,
    /// The job was running on the async pool and was aborted; it is
    /// cancelled.
    Aborted,
    /// The job is running on the blocking pool, which cannot be interrupted:
    /// a cooperative cancel request was sent through the job's context. The
    /// job ends cancelled only if the function honours it.
    Requested,
    /// The job had already finished; nothing changed.
    AlreadyDone,
}

impl CancelOutcome {
    /// The outcome's name in `snake_case`, as `jobctl -o json` prints it.
    ///
    /// ```
    /// assert_eq!(jobd_client::CancelOutcome::AlreadyDone.as_str(), "already_done");
    /// ```
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unspecified => "unspecified",
            Self::Cancelled => "cancelled",
            Self::Aborted => "aborted",
            Self::Requested => "requested",
            Self::AlreadyDone => "already_done",
        }
    }
}

/// One page of [`JobClient::list_jobs`](crate::JobClient::list_jobs).
#[derive(Debug, Clone)]
pub struct JobPage {
    /// The jobs, newest first.
    pub jobs: Vec<JobInfo>,
    /// Pass it to the next `list_jobs` call with the same filter for the
    /// next page; `None` at the end. A page may be short (even empty) and
    /// still have a next one.
    pub next_page_token: Option<String>,
}

/// The answer for one argument of a map.
#[derive(Debug)]
pub struct MapItem {
    /// The argument's position in the input, from 0.
    pub index: u64,
    /// The job that ran it; `None` when the server refused to submit it.
    pub job: Option<JobId>,
    /// The job's value; or [`Error::JobFailed`] / [`Error::Cancelled`] for
    /// a job that did not succeed; or the refusal (e.g. [`Error::Rpc`] with
    /// `RESOURCE_EXHAUSTED` when the pool's queue was full).
    pub result: Result<serde_json::Value, Error>,
}

/// One event of a watch stream.
#[derive(Debug, Clone, PartialEq)]
pub struct JobEvent {
    /// The server-wide sequence number of the event.
    pub seq: u64,
    /// The server process's event numbering.
    pub epoch: String,
    /// What it reports.
    pub kind: JobEventKind,
    /// The job; `None` for [`JobEventKind::Lagged`].
    pub job: Option<JobId>,
    /// The job's function (empty for `Lagged`).
    pub function: String,
    /// The job's state after the event; `None` for `Lagged`.
    pub state: Option<JobState>,
    /// The job's attempt number (0 before it first starts).
    pub attempt: u32,
    /// The job's latest progress report, if any.
    pub progress: Option<Progress>,
    /// A finished job's outcome (value or error), as data.
    pub outcome: Option<JobOutcome>,
    /// For `Lagged`: how many server events were skipped.
    pub missed: u64,
}

impl JobEvent {
    /// Where to resume after this event.
    #[must_use]
    pub fn resume_point(&self) -> ResumePoint {
        ResumePoint {
            epoch: self.epoch.clone(),
            seq: self.seq,
        }
    }
}

/// What a [`JobEvent`] reports. The server may add kinds; an event of a
/// kind this client does not know comes as an [`Error::Protocol`] item
/// instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum JobEventKind {
    /// The job changed state.
    State,
    /// The running job reported progress.
    Progress,
    /// The job's state when the watch began (or again after a lag).
    Snapshot,
    /// The watcher fell behind (or resumed too late): [`JobEvent::missed`]
    /// server events were skipped. A watch of ids continues with fresh
    /// snapshots; a filter watch should re-read what it needs (list jobs).
    Lagged,
}

impl JobEventKind {
    /// The kind's name in `snake_case`, as `jobctl watch` prints it.
    ///
    /// ```
    /// assert_eq!(jobd_client::JobEventKind::Snapshot.as_str(), "snapshot");
    /// ```
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::State => "state",
            Self::Progress => "progress",
            Self::Snapshot => "snapshot",
            Self::Lagged => "lagged",
        }
    }
}

/// Where a watch stream got to: pass it to
/// [`Watch::resume_after`](crate::Watch::resume_after) after a reconnect to
/// miss nothing the server still holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResumePoint {
    /// The server process's event numbering (it changes on restart).
    pub epoch: String,
    /// The last sequence number received.
    pub seq: u64,
}

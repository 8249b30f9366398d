//! The store boundary: where job state lives, behind one interface,
//! `JobStore`, that every store implements and the engine alone calls.
//!
//! The interface speaks only of the domain: jobs ([`JobRecord`]), leases,
//! events, listings, and its own [`StoreError`]. It knows nothing of the
//! engine, its executors or the API: the engine asks for the next job of a
//! pool and gets a `Lease` (the attempt plus a fencing token); every later
//! write about that attempt carries the lease and is refused as
//! `Fenced::Stale` once the lease is no longer current, whoever holds an
//! old one. A cancel is recorded here; how it is honoured (dropping a
//! future, firing a token, killing a process, messaging a worker) is the
//! executor's business.
//!
//! Two stores implement it: `memory` (ephemeral) and `sqlite` (durable,
//! embedded). Both build on `live`, the in-memory machinery they share:
//! the job table, each pool's queue (priority with aging, delayed jobs) and
//! the event hub. With SQLite, that machinery is a cache of live jobs which
//! only the SQLite store reads or writes. One conformance suite
//! (`conformance`, in tests) runs against each store.
//!
//! The promise of the durable store: once Submit answers OK, the job is on
//! disk and will reach a terminal state whatever happens to the process.
//! Everything a client can observe is durable before it is visible: a job
//! is committed before its id is returned, and a terminal outcome before any
//! reader or waiter sees it. Execution is at-least-once.

mod listing;
pub(crate) mod live;
mod memory;
mod sqlite;

#[cfg(test)]
mod conformance;

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime},
};

use futures::{future::BoxFuture, stream::BoxStream};
use jobd_proto::{JobId, JobState};
use sha2::{Digest as _, Sha256};

pub(crate) use self::live::logs::LogFeed;
pub use self::{
    listing::{ListFilter, ListPage},
    sqlite::{DB_FILE, LOCK_FILE, POISON_LIMIT},
};
use crate::{
    clock::Clock,
    job::{Finished, JobRecord, LogEntry, LogPage, LogStream, Outcome, PoolName, Progress},
};

/// Which store holds job state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreConfig {
    /// Ephemeral: everything is lost when the process stops.
    Memory,
    /// Durable SQLite database in this directory (created if missing).
    Sqlite {
        /// The data directory.
        dir: PathBuf,
    },
}

/// Why a job id that is not found is not found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gone {
    /// It finished longer ago than the retention period and was removed.
    Expired,
    /// It was deleted.
    Deleted,
}

/// Why the store cannot open or cannot answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The data directory cannot be created, locked or written.
    #[error("data directory {}: {message}", path.display())]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// Another running jobd holds the data directory.
    #[error(
        "data directory {} is in use by another running jobd (it holds {}); stop it or use another --data-dir",
        .0.display(), LOCK_FILE
    )]
    Locked(PathBuf),
    /// The database cannot be opened, is corrupt, or is from a newer jobd.
    #[error("cannot open the job database {}: {message}", path.display())]
    Open {
        /// The database file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// A write could not be committed or a read failed; a failed commit
    /// stops the store acknowledging anything (fail-stop).
    #[error("the job store is unavailable: {0}")]
    Unavailable(String),
    /// The disk is full; the store stopped acknowledging.
    #[error("the job store's disk is full: {0}")]
    DiskFull(String),
}

impl StoreError {
    pub(crate) fn from_sqlite(err: &rusqlite::Error) -> Self {
        match err.sqlite_error_code() {
            Some(rusqlite::ErrorCode::DiskFull) => Self::DiskFull(err.to_string()),
            _ => Self::Unavailable(err.to_string()),
        }
    }
}

/// Deliberate faults, compiled only with the `fault-injection` feature
/// (which the test suites turn on): a release build cannot be told to lose
/// jobs.
#[cfg(feature = "fault-injection")]
#[derive(Debug, Clone, Copy, Default)]
pub struct Faults {
    /// Acknowledge Submit before its commit: the crash test's mutation,
    /// which must show lost jobs.
    pub ack_before_commit: bool,
    /// Cap the database at this many pages ("disk full" on demand).
    pub max_db_pages: Option<u64>,
}

/// The queue a job waits in. A pool has one queue, except a routed pool
/// (remote workers'), which has one per function and set of worker labels,
/// so that a claim for a function only ever sees jobs of that function that
/// the claimer may run.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct QueueName(Arc<str>);

impl QueueName {
    /// The one queue of an unrouted pool.
    pub(crate) fn pool(pool: &PoolName) -> Self {
        Self(Arc::from(pool.as_str()))
    }

    /// The queue of `function`'s jobs asking for `worker_labels` in the
    /// routed pool `pool`.
    pub(crate) fn routed(
        pool: &PoolName,
        function: &str,
        worker_labels: &BTreeMap<String, String>,
    ) -> Self {
        let mut name = format!("{pool}/{function}");
        if !worker_labels.is_empty() {
            // JSON of a sorted map: one spelling per label set.
            name.push_str(&serde_json::to_string(worker_labels).unwrap_or_default());
        }
        Self(Arc::from(name))
    }

    /// The pool the queue belongs to.
    pub(crate) fn pool_name(&self) -> &str {
        self.0.split_once('/').map_or(&self.0, |(pool, _)| pool)
    }

    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }
}

/// How to open a store: the pools it queues for and its bounds.
#[derive(Debug, Clone)]
pub(crate) struct StoreOptions {
    /// The pools whose queues the store keeps, by name.
    pub(crate) pools: Vec<PoolName>,
    /// Of those, the pools routed by function and worker labels (see
    /// [`QueueName`]).
    pub(crate) routed: Vec<PoolName>,
    /// Pending jobs each pool's queue holds before Submit is refused.
    pub(crate) max_queued: usize,
    /// One step of priority per this much waiting (zero: none).
    pub(crate) priority_aging: Duration,
    /// Job events held for watchers.
    pub(crate) event_history: std::num::NonZeroUsize,
    /// Finished jobs a durable store keeps in memory.
    pub(crate) cache_finished: usize,
    /// The bytes of each job's log kept (the newest).
    pub(crate) log_cap: u64,
    /// Where stored times come from.
    pub(crate) clock: Clock,
    #[cfg(feature = "fault-injection")]
    pub(crate) faults: Faults,
}

/// Opens the configured store (a durable one recovers what the previous
/// run left unfinished first). Call it inside the tokio runtime that will
/// drive it.
pub(crate) fn open(
    config: &StoreConfig,
    options: StoreOptions,
) -> Result<Arc<dyn JobStore>, StoreError> {
    Ok(match config {
        StoreConfig::Memory => Arc::new(memory::MemoryStore::new(options)),
        StoreConfig::Sqlite { dir } => Arc::new(sqlite::SqliteStore::open(dir, options)?),
    })
}

/// A job as the engine admitted it; the store gives it its id and its
/// submission time.
#[derive(Debug, Clone)]
pub(crate) struct NewJob {
    pub(crate) function: Arc<str>,
    pub(crate) pool: PoolName,
    pub(crate) args: serde_json::Value,
    pub(crate) labels: BTreeMap<String, String>,
    pub(crate) worker_labels: BTreeMap<String, String>,
    pub(crate) request_id: Option<String>,
    pub(crate) priority: i32,
    pub(crate) not_before: Option<SystemTime>,
    pub(crate) timeout: Option<Duration>,
    pub(crate) max_attempts: u32,
    pub(crate) retry_safe: bool,
}

impl NewJob {
    /// The pending record of this job, as `id`, submitted at `at`.
    pub(crate) fn into_record(self, id: JobId, at: SystemTime) -> JobRecord {
        JobRecord {
            id,
            function: self.function,
            pool: self.pool,
            state: JobState::Pending,
            args: self.args,
            labels: self.labels,
            worker_labels: self.worker_labels,
            request_id: self.request_id,
            priority: self.priority,
            not_before: self.not_before,
            timeout: self.timeout,
            max_attempts: self.max_attempts.max(1),
            retry_safe: self.retry_safe,
            submitted_at: at,
            started_at: None,
            finished_at: None,
            attempt: 0,
            outcome: None,
            progress: None,
        }
    }
}

/// What a submit did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Submitted {
    /// A new job, pending (or waiting for its `not_before`).
    New(JobId),
    /// The request id names an earlier job; `same_content` when it was
    /// submitted with the same function and arguments.
    Existing { id: JobId, same_content: bool },
    /// The pool's queue holds `capacity` jobs already.
    QueueFull { capacity: usize },
    /// A routed pool has as many queues as it may (`max` distinct
    /// functions and worker label sets).
    TooManyQueues { max: usize },
    /// The store takes no new jobs (it is closing).
    Closed,
}

/// Who holds a lease: this process's executors, or a remote worker.
pub(crate) type LeaseHolder = Arc<str>;

/// A number handed out once per claim, increasing for the life of the
/// store, and kept apart from the attempt count (which retries and admin
/// actions can reset): a write carrying an older token than the job's
/// current one is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct FencingToken(pub(crate) u64);

/// The right to run one attempt of a job and report how it ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Lease {
    pub(crate) job: JobId,
    /// The attempt it runs, from 1.
    pub(crate) attempt: u32,
    pub(crate) token: FencingToken,
    /// When it lapses unless renewed; `None`: held for as long as this
    /// process lives (the store's recovery handles what it held).
    pub(crate) expires_at: Option<SystemTime>,
}

/// What to claim and on whose behalf.
#[derive(Debug, Clone)]
pub(crate) struct ClaimRequest {
    pub(crate) queue: QueueName,
    pub(crate) holder: LeaseHolder,
    /// How long the lease lasts between renewals; `None`: for the life of
    /// this process.
    pub(crate) ttl: Option<Duration>,
}

/// A claimed job: its lease, and what running it needs.
#[derive(Debug, Clone)]
pub(crate) struct Claimed {
    pub(crate) lease: Lease,
    /// When the attempt started.
    pub(crate) started_at: SystemTime,
    pub(crate) function: Arc<str>,
    pub(crate) args: serde_json::Value,
    pub(crate) timeout: Option<Duration>,
    pub(crate) max_attempts: u32,
    /// Whether an attempt lost with the process running it may run again.
    pub(crate) retry_safe: bool,
}

/// What renewing a lease found.
#[allow(
    dead_code,
    reason = "for holders whose leases lapse (remote workers); the conformance suite tests it"
)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LeaseState {
    /// Still held, now until this time (`None`: for the life of the process).
    Live { expires_at: Option<SystemTime> },
    /// Still held, and a cancel was requested: the holder should stop.
    CancelRequested { expires_at: Option<SystemTime> },
    /// Lapsed or superseded: the job is someone else's (or ended).
    Lost,
}

/// What the fencing of a write about a lease's attempt decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fenced {
    /// The lease is current: the write was applied.
    Applied,
    /// This lease's end was recorded already (a report sent twice): nothing
    /// changed, and the first answer stands.
    Repeated,
    /// The lease is no longer current (the job ended, was cancelled, or its
    /// lease lapsed and it was given to another): nothing changed.
    Stale,
}

/// Why a job id names no job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Missing {
    /// It existed and was removed.
    Gone(Gone),
    /// As far as the store remembers, it never existed.
    Unknown,
}

/// A lookup by id: the thing, or why there is none.
pub(crate) type Found<T> = Result<T, Missing>;

/// What a cancel request found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum CancelResult {
    /// It was pending; it is now CANCELLED (durably) and will never run.
    Cancelled,
    /// It is running under `lease`, held by `holder`: the request is
    /// recorded, and the holder decides how to honour it.
    Requested {
        lease: Lease,
        holder: LeaseHolder,
        pool: PoolName,
    },
    /// It had already finished.
    AlreadyDone,
    /// No such job.
    Missing(Missing),
}

/// What a delete found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Deleted {
    /// Removed, leaving a "deleted" tombstone.
    Removed,
    /// Pending or running: not deleted.
    Unfinished(JobState),
    Missing(Missing),
}

/// One maintenance step.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Maintenance {
    /// Take back lapsed leases: the job runs again, or fails when it may not
    /// be retried or keeps losing its holders (a poison pill).
    pub(crate) expire_leases: bool,
    /// Retention: remove finished jobs and old tombstones.
    pub(crate) purge: Option<Purge>,
}

/// What retention removes in one step.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Purge {
    /// Jobs finished before this go, leaving an "expired" tombstone.
    pub(crate) finished_before: SystemTime,
    /// Tombstones older than this go.
    pub(crate) tombstones_before: SystemTime,
    /// At most this many jobs a step.
    pub(crate) limit: usize,
}

/// What a maintenance step did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Maintained {
    /// Finished jobs removed by retention.
    pub(crate) purged: usize,
    /// Retention stopped at its limit: another step may find more.
    pub(crate) more: bool,
    /// Lapsed leases whose jobs went back to pending.
    pub(crate) requeued: usize,
    /// Lapsed leases whose jobs failed (not safe to retry, or poison pills).
    pub(crate) failed: usize,
}

/// What one job event reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EventKind {
    /// The job reached `state`.
    State,
    /// The running job reported progress.
    Progress,
}

/// One numbered job event. Small: the function name and progress message
/// are shared, and outcomes are not copied (a watcher reads a finished job's
/// outcome from the store when it sends the event).
#[derive(Debug, Clone)]
pub(crate) struct Event {
    pub(crate) seq: u64,
    pub(crate) kind: EventKind,
    pub(crate) id: JobId,
    pub(crate) function: Arc<str>,
    pub(crate) state: JobState,
    pub(crate) attempt: u32,
    pub(crate) progress: Option<Progress>,
}

/// What an event stream yields.
#[derive(Debug, Clone)]
pub(crate) enum EventItem {
    Event(Event),
    /// `missed` events after the cursor are no longer held; the stream goes
    /// on after `resumed_after`.
    Lagged {
        missed: u64,
        resumed_after: u64,
    },
}

/// A position in the store's event stream: its epoch (which tells one
/// numbering from another, e.g. across restarts) and a sequence number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Cursor {
    pub(crate) epoch: Arc<str>,
    pub(crate) seq: u64,
}

/// What a running attempt wrote, for [`JobStore::append_log`].
#[derive(Debug, Clone)]
pub(crate) struct LogLine {
    pub(crate) stream: LogStream,
    pub(crate) data: Vec<u8>,
}

/// The most bytes one log entry holds: longer writes are split.
pub(crate) const MAX_LOG_ENTRY: usize = 64 * 1024;

/// The entries `lines` make for `attempt`, written at `at`, from offset
/// `start` on. Each line is split at [`MAX_LOG_ENTRY`], or at the log's
/// `cap` when that is smaller, so that the newest entry is always kept.
pub(crate) fn log_entries(
    lines: Vec<LogLine>,
    attempt: u32,
    at: SystemTime,
    start: u64,
    cap: u64,
) -> Vec<LogEntry> {
    let longest = usize::try_from(cap)
        .unwrap_or(usize::MAX)
        .clamp(1, MAX_LOG_ENTRY);
    let mut offset = start;
    let mut entries = Vec::with_capacity(lines.len());
    for line in lines {
        let mut rest = line.data;
        while !rest.is_empty() {
            let tail = if rest.len() > longest {
                rest.split_off(longest)
            } else {
                Vec::new()
            };
            let entry = LogEntry {
                offset,
                attempt,
                stream: line.stream,
                at,
                data: rest,
            };
            offset = entry.end();
            entries.push(entry);
            rest = tail;
        }
    }
    entries
}

/// Gauges for operators and tests.
#[derive(Debug, Clone, Default)]
pub(crate) struct StoreStats {
    /// Jobs held in memory, in any state.
    pub(crate) jobs: usize,
    /// Jobs held in memory per state name.
    pub(crate) by_state: BTreeMap<&'static str, usize>,
    /// Jobs waiting in each queue (delayed ones included).
    pub(crate) queued: BTreeMap<QueueName, usize>,
    /// Job events held for watchers.
    pub(crate) events_held: usize,
    /// A durable store's (commits, operations) so far.
    pub(crate) commits: Option<(u64, u64)>,
}

/// The store interface. Every operation is atomic: it happens wholly or not
/// at all, and the futures of those that change state may be dropped
/// without leaving a change half made (what was decided completes).
///
/// Writes that answer a client (`submit`, `cancel` of a pending job,
/// `delete`) return once durable. Writes about a lease (`complete`,
/// `retry`, `release`) return once decided: the change becomes visible to
/// readers and waiters only when it is durable, and [`JobStore::flush`]
/// waits for that.
#[async_trait::async_trait]
pub(crate) trait JobStore: Send + Sync + 'static {
    /// True when job state survives a restart.
    fn is_durable(&self) -> bool;

    /// Records a new job, idempotent by request id. Its place in its pool's
    /// queue is taken when this is *called*, so jobs submitted one after
    /// another keep that order even when their futures complete out of
    /// order (as a Map's do).
    fn submit(&self, job: NewJob) -> BoxFuture<'static, Result<Submitted, StoreError>>;

    /// Waits for the next job of `request.pool` that is due and claims it:
    /// pending -> running, the next attempt, a new lease. `None` once the
    /// store is closed. Cancel-safe: a dropped claim claims nothing.
    async fn claim(&self, request: &ClaimRequest) -> Result<Option<Claimed>, StoreError>;

    /// Extends a lease by `ttl` from now, and says whether a cancel was
    /// requested meanwhile.
    #[allow(
        dead_code,
        reason = "for holders whose leases lapse (remote workers); the conformance suite tests it"
    )]
    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<LeaseState, StoreError>;

    /// Ends the lease's attempt, and the job, with `outcome`.
    async fn complete(&self, lease: &Lease, outcome: Outcome) -> Result<Fenced, StoreError>;

    /// Ends the lease's attempt for another one: the job is pending again,
    /// due at `not_before`.
    async fn retry(&self, lease: &Lease, not_before: SystemTime) -> Result<Fenced, StoreError>;

    /// Gives the lease back without an outcome (a drain, a shutdown): the
    /// job is pending again at once, for its next attempt.
    async fn release(&self, lease: &Lease) -> Result<Fenced, StoreError>;

    /// Records the running attempt's progress (memory only: progress is not
    /// durable; a stale lease's report is dropped).
    fn progress(&self, lease: &Lease, fraction: f64, message: &str);

    /// Records a cancel request: a pending job is cancelled at once; for a
    /// running one, see [`CancelResult::Requested`].
    async fn cancel(&self, id: JobId) -> Result<CancelResult, StoreError>;

    /// A copy of the job.
    async fn get(&self, id: JobId) -> Result<Found<JobRecord>, StoreError>;

    /// The job's state (cheaper than `get`).
    async fn state(&self, id: JobId) -> Result<Found<JobState>, StoreError>;

    /// Waits, without polling, until the job is terminal and visible.
    /// Dropping the future is safe.
    async fn wait(&self, id: JobId) -> Result<Found<Finished>, StoreError>;

    /// One page of jobs matching `filter` with ids below `before`, newest
    /// first, at most `limit`.
    async fn list(
        &self,
        filter: &ListFilter,
        before: Option<JobId>,
        limit: usize,
    ) -> Result<ListPage, StoreError>;

    /// Removes a finished job, leaving a "deleted" tombstone.
    async fn delete(&self, id: JobId) -> Result<Deleted, StoreError>;

    /// One maintenance step.
    async fn maintain(&self, step: Maintenance) -> Result<Maintained, StoreError>;

    /// Returns once every change decided before the call is durable and
    /// visible.
    async fn flush(&self) -> Result<(), StoreError>;

    /// Stops handing out jobs: claims end with `None`, submits answer
    /// `Closed`. Jobs pending stay pending (a durable store runs them after
    /// a restart).
    fn close(&self);

    /// Appends what the lease's attempt wrote to the job's log (each line
    /// one entry, split at [`MAX_LOG_ENTRY`]), dropping the oldest entries
    /// past the cap. Returns once decided; followers see the entries once
    /// they are durable. A stale lease's lines are refused.
    async fn append_log(&self, lease: &Lease, lines: Vec<LogLine>) -> Result<Fenced, StoreError>;

    /// The entries of the job's log that end after `from`, up to about
    /// `max_bytes`.
    async fn read_log(
        &self,
        id: JobId,
        from: u64,
        max_bytes: usize,
    ) -> Result<Found<LogPage>, StoreError>;

    /// Subscribes to the growth of the job's log (subscribe, then read).
    fn follow_log(&self, id: JobId) -> LogFeed;

    /// The newest position of the event stream. The first call starts the
    /// recording of events: before it, no watcher can hold a position to
    /// resume from, and nothing is recorded.
    fn event_head(&self) -> Cursor;

    /// The events after `after` (of the current epoch), as they happen.
    fn events(&self, after: u64) -> BoxStream<'static, Result<EventItem, StoreError>>;

    /// Gauges.
    fn stats(&self) -> StoreStats;
}

/// What makes two submissions with one request id "the same": the function
/// and the arguments (JSON with sorted keys, so key order does not matter).
pub(crate) fn fingerprint(function: &str, args: &serde_json::Value) -> [u8; 16] {
    let mut hasher = Sha256::new();
    hasher.update(function.as_bytes());
    hasher.update([0]);
    hasher.update(args.to_string().as_bytes());
    let digest = hasher.finalize();
    let mut out = [0; 16];
    out.copy_from_slice(&digest[..16]);
    out
}

//! Where job state lives. The engine talks to `Store` only; behind it sit
//! the live in-memory `table` (every unfinished job, and finished ones
//! until evicted) and, by default, the durable SQLite store.
//!
//! The promise with the durable store: once Submit answers OK, the job is on
//! disk and will reach a terminal state whatever happens to the process.
//! Everything a client can observe is durable before it is visible: a job is
//! committed before its id is returned, and a terminal outcome is committed
//! before any reader or waiter sees it. Only the pending -> running claim
//! rides in the next batch unwaited; after a crash every job still marked
//! running is known to have been interrupted. Execution is at-least-once.

mod sqlite;
pub(crate) mod table;

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime},
};

use jobd_proto::{JobId, JobState};
use sha2::{Digest as _, Sha256};

pub use self::sqlite::{DB_FILE, LOCK_FILE, POISON_LIMIT};
pub(crate) use self::table::{CancelPlan, Claim, WaitFor};
use self::{
    sqlite::{Deleted, Inserted, Lookup, NewJob, Publish, SqliteStore},
    table::JobTable,
};
use crate::{
    Error,
    engine::{EventHub, ListFilter, ListPage, QueueKey},
    function::Registry,
    job::{Finished, JobError, JobRecord, Outcome},
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
    /// A write could not be committed; the store stopped acknowledging.
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

/// Retention and caching knobs.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Retention {
    /// Finished jobs are removed this long after they finish.
    pub(crate) keep_finished: Duration,
    /// Tombstones of removed jobs are kept this long after removal.
    pub(crate) keep_tombstones: Duration,
    /// Finished jobs held in memory (durable mode; the rest are read from
    /// disk on demand).
    pub(crate) cache_finished: usize,
}

/// Deliberate faults for tests; both off in production.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct TestKnobs {
    /// Acknowledge Submit before its commit (the crash test's mutation).
    pub(crate) ack_before_commit: bool,
    /// Cap the database at this many pages ("disk full" on demand).
    pub(crate) max_db_pages: Option<u64>,
}

/// The job store: the live table plus, optionally, the durable store.
pub(crate) struct Store {
    /// Shared with the writer thread, which publishes what it commits.
    table: Arc<JobTable>,
    durable: Option<SqliteStore>,
    /// Tombstones of removed jobs in memory mode (the durable store keeps
    /// its own on disk).
    tombstones: dashmap::DashMap<JobId, (Gone, SystemTime)>,
    retention: Retention,
}

/// What one retention step did.
pub(crate) struct Purged {
    pub(crate) removed: usize,
    /// It stopped at its limit: another step may find more.
    pub(crate) more: bool,
}

/// How Submit was admitted.
pub(crate) enum Admission {
    New,
    /// The request id names this earlier job with the same content.
    Existing(JobId),
}

impl Store {
    /// Opens the configured store and returns the jobs to queue again.
    pub(crate) fn open(
        config: &StoreConfig,
        registry: &Registry,
        retention: Retention,
        testing: TestKnobs,
        events: Arc<EventHub>,
    ) -> Result<(Self, Vec<JobRecord>), StoreError> {
        let table = Arc::new(JobTable::new(events));
        let (durable, pending) = match config {
            StoreConfig::Memory => (None, Vec::new()),
            StoreConfig::Sqlite { dir } => {
                let (store, recovered) = sqlite::open(dir, registry, testing, Arc::clone(&table))?;
                tracing::info!(
                    path = %store.path.display(),
                    boot = recovered.boot,
                    pending = recovered.pending.len(),
                    requeued = recovered.requeued,
                    failed_not_retry_safe = recovered.failed_unsafe,
                    poison_pills = recovered.poisoned,
                    "opened the job store"
                );
                (Some(store), recovered.pending)
            }
        };
        Ok((
            Self {
                table,
                durable,
                tombstones: dashmap::DashMap::new(),
                retention,
            },
            pending,
        ))
    }

    pub(crate) fn is_durable(&self) -> bool {
        self.durable.is_some()
    }

    /// Records a new job (durably first, if durable), de-duplicating by
    /// request id. `queue` runs exactly once: with the id once the job is
    /// recorded and visible (to queue it), or with `None` when it will not
    /// exist (to give its queue slot back). With the durable store that
    /// happens on the writer thread after the commit, so a caller that stops
    /// waiting cannot leave a committed job unqueued.
    pub(crate) async fn admit(
        &self,
        record: JobRecord,
        key: QueueKey,
        queue: impl FnOnce(Option<JobId>) + Send + 'static,
    ) -> Result<Admission, Error> {
        // Only a request id is ever compared by fingerprint; skip the hash
        // on the hot path when there is none.
        let fingerprint = if record.request_id.is_some() {
            fingerprint(&record)
        } else {
            [0; 16]
        };
        let request_id = record.request_id.clone();
        let id = record.id;
        let existing = match &self.durable {
            None => match self.table.insert(record, Some(key), fingerprint) {
                Ok(()) => {
                    queue(Some(id));
                    return Ok(Admission::New);
                }
                Err(existing) => {
                    queue(None);
                    existing
                }
            },
            Some(durable) => {
                let table = Arc::clone(&self.table);
                let publish = Publish::new(move |committed: Option<JobRecord>| match committed {
                    Some(record) => {
                        table.insert_unchecked(record, Some(key));
                        queue(Some(id));
                    }
                    None => queue(None),
                });
                let job = NewJob {
                    record,
                    fingerprint,
                };
                match durable
                    .writer
                    .insert(job, publish)
                    .await
                    .map_err(Error::Store)?
                {
                    Inserted::New => return Ok(Admission::New),
                    Inserted::Existing(existing) => existing,
                }
            }
        };
        if existing.fingerprint == fingerprint {
            Ok(Admission::Existing(existing.job))
        } else {
            Err(Error::DuplicateRequest {
                request_id: request_id.unwrap_or_default(),
                existing: existing.job,
            })
        }
    }

    /// Puts recovered jobs back in the live table.
    pub(crate) fn restore(&self, record: JobRecord, key: QueueKey) {
        self.table.restore(record, Some(key));
    }

    /// The live table, for a running job's context to report progress to
    /// (progress lives in memory only, never on disk).
    pub(crate) fn live_table(&self) -> &Arc<JobTable> {
        &self.table
    }

    /// A finished job's outcome, from memory or disk; `None` if the job is
    /// unfinished or gone.
    pub(crate) async fn finished(&self, id: JobId) -> Option<Finished> {
        if let Some(found) = self.table.view(id, table::finished) {
            return found;
        }
        self.lookup(id)
            .await
            .ok()
            .flatten()
            .and_then(|record| table::finished(&record))
    }

    /// Whether the job carries every one of `labels` (false if it is gone).
    pub(crate) async fn has_labels(
        &self,
        id: JobId,
        labels: &std::collections::BTreeMap<String, String>,
    ) -> bool {
        if labels.is_empty() {
            return true;
        }
        if let Some(found) = self.table.has_labels(id, labels) {
            return found;
        }
        self.lookup(id).await.ok().flatten().is_some_and(|record| {
            labels
                .iter()
                .all(|(key, value)| record.labels.get(key) == Some(value))
        })
    }

    /// Pending -> running; the durable claim rides in the next batch.
    pub(crate) async fn claim(&self, id: JobId) -> Option<Claim> {
        let claim = self.table.claim(id)?;
        if let Some(durable) = &self.durable {
            // A failure here means fail-stop; the completion will be refused
            // too, and the job re-runs after a restart.
            if let Err(err) = durable
                .writer
                .start(id, claim.attempt, claim.started_at)
                .await
            {
                tracing::warn!(%id, %err, "cannot record the job's start");
            }
        }
        Some(claim)
    }

    /// Puts a running job back to pending for another attempt (false when
    /// it is already ending); with the durable store, answers after the
    /// commit.
    pub(crate) async fn retry(&self, id: JobId, attempt: u32, key: QueueKey) -> bool {
        if !self.table.retry(id, attempt, key) {
            return false;
        }
        if let Some(durable) = &self.durable
            && let Err(err) = durable.writer.requeue(vec![(id, attempt)]).await
        {
            // Fail-stop: nothing more commits, and after a restart recovery
            // re-queues the job it finds running.
            tracing::warn!(%id, %err, "cannot record the job's retry");
        }
        true
    }

    /// Records how an attempt ended: durably first, then visible. With the
    /// durable store the writer publishes the outcome after its commit; the
    /// worker does not wait for that.
    pub(crate) async fn finish(&self, id: JobId, attempt: u32, outcome: Outcome) -> bool {
        if !self.table.begin_finish(id, attempt) {
            return false;
        }
        self.commit_terminal(id, attempt, outcome, false)
            .await
            .is_ok()
    }

    /// Writes a begun terminal transition; with `wait`, returns once it is
    /// durable and visible.
    async fn commit_terminal(
        &self,
        id: JobId,
        attempt: u32,
        outcome: Outcome,
        wait: bool,
    ) -> Result<(), Error> {
        let at = SystemTime::now();
        match &self.durable {
            None => self.table.complete(id, outcome, at),
            Some(durable) => {
                if let Err(err) = durable.writer.finish(id, attempt, outcome, at, wait).await {
                    tracing::error!(%id, %err, "cannot record the job's outcome");
                    self.table.abandon(id);
                    return Err(Error::Store(err));
                }
            }
        }
        self.evict();
        Ok(())
    }

    /// Returns once everything written so far is committed and visible.
    pub(crate) async fn flush(&self) {
        if let Some(durable) = &self.durable
            && let Err(err) = durable.writer.flush().await
        {
            tracing::warn!(%err, "cannot flush the store");
        }
    }

    /// Cancels what can be cancelled; see [`CancelPlan`].
    pub(crate) async fn cancel(&self, id: JobId) -> Result<CancelPlan, Error> {
        let Some(plan) = self.table.begin_cancel(id) else {
            return match self.lookup(id).await? {
                Some(_) => Ok(CancelPlan::AlreadyDone),
                None => Err(self.not_found(id).await),
            };
        };
        if matches!(plan, CancelPlan::Pending(..) | CancelPlan::AbortAsync) {
            let attempt = self.table.view(id, |r| r.attempt).unwrap_or(0);
            self.commit_terminal(id, attempt, Err(JobError::Cancelled), true)
                .await?;
        }
        Ok(plan)
    }

    /// A copy of the job, from memory or disk.
    pub(crate) async fn get(&self, id: JobId) -> Result<JobRecord, Error> {
        if let Some(record) = self.table.view(id, JobRecord::clone) {
            return Ok(record);
        }
        match self.lookup(id).await? {
            Some(record) => Ok(record),
            None => Err(self.not_found(id).await),
        }
    }

    /// The job's state, from memory or disk.
    pub(crate) async fn state(&self, id: JobId) -> Result<JobState, Error> {
        if let Some(state) = self.table.view(id, |r| r.state) {
            return Ok(state);
        }
        Ok(self.get(id).await?.state)
    }

    /// The finished job, or a `Notify` to wait on.
    pub(crate) async fn wait_for(&self, id: JobId) -> Result<WaitFor, Error> {
        if let Some(wait) = self.table.wait_for(id) {
            return Ok(wait);
        }
        let record = self.get(id).await?;
        table::finished(&record)
            .map(WaitFor::Finished)
            .ok_or_else(|| {
                // On disk but not in memory and not finished cannot happen: every
                // unfinished job is restored to the table at start.
                Error::Store(StoreError::Unavailable(format!(
                    "job {id} is unfinished but not loaded"
                )))
            })
    }

    pub(crate) fn is_terminal(&self, id: JobId) -> Option<bool> {
        self.table.is_terminal(id)
    }

    pub(crate) fn finished_in_memory(&self, id: JobId) -> Option<Finished> {
        self.table.view(id, table::finished).flatten()
    }

    /// Stops every running job at the end of a drain. In memory mode they
    /// fail as interrupted (nothing could run them again); with the durable
    /// store they go back to pending on disk and run again after a restart.
    pub(crate) async fn stop_running(&self, reason: &str) -> usize {
        let stopped = self.table.stop_running();
        let count = stopped.len();
        match &self.durable {
            None => {
                for (id, _) in stopped {
                    self.table
                        .complete(id, Err(table::interrupted(reason)), SystemTime::now());
                }
            }
            Some(durable) => {
                if let Err(err) = durable.writer.requeue(stopped).await {
                    tracing::warn!(%err, "cannot re-queue interrupted jobs; recovery will");
                }
            }
        }
        count
    }

    /// Removes jobs past retention (and, in memory, beyond the cache), at
    /// most `limit`.
    pub(crate) async fn purge(&self, limit: usize) -> Result<Purged, Error> {
        let now = SystemTime::now();
        let cutoff = now
            .checked_sub(self.retention.keep_finished)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let tombstone_cutoff = now
            .checked_sub(self.retention.keep_tombstones)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        match &self.durable {
            None => {
                let removed = self.table.evict_finished(cutoff, usize::MAX, limit);
                for id in &removed {
                    self.tombstones.insert(*id, (Gone::Expired, now));
                }
                self.tombstones.retain(|_, (_, at)| *at >= tombstone_cutoff);
                Ok(Purged {
                    removed: removed.len(),
                    more: removed.len() == limit,
                })
            }
            Some(durable) => {
                let swept = durable
                    .writer
                    .purge(cutoff, tombstone_cutoff, limit)
                    .await
                    .map_err(Error::Store)?;
                for id in &swept.ids {
                    self.table.forget(*id);
                }
                Ok(Purged {
                    removed: swept.ids.len(),
                    more: swept.more,
                })
            }
        }
    }

    /// One page of a listing; see [`crate::Engine::list`]. In memory the
    /// table holds every job. With the durable store the database holds
    /// every job, but the table is fresher for the jobs it holds (a claim is
    /// written after the fact), so both are read and, for an id in the
    /// table, the table's record wins.
    pub(crate) async fn list(
        &self,
        filter: &ListFilter,
        before: Option<JobId>,
        limit: usize,
    ) -> Result<ListPage, Error> {
        // One more than a page from each source: a source that fills it has
        // more to give.
        let want = limit + 1;
        let memory = self.table.list(filter, before, want);
        let disk = match &self.durable {
            None => Vec::new(),
            Some(durable) => durable
                .reader
                .list(filter.clone(), before, want)
                .await
                .map_err(Error::Store)?,
        };
        let in_table = |id: JobId| self.table.view(id, |_| ()).is_some();
        Ok(merge_page(memory, disk, want, limit, in_table))
    }

    /// Forgets a finished job and leaves a "deleted" tombstone; durably
    /// first, if durable.
    pub(crate) async fn delete(&self, id: JobId) -> Result<(), Error> {
        let Some(durable) = &self.durable else {
            // The tombstone goes in first, so that no reader finds neither
            // the job nor its tombstone; it is put back as it was if the job
            // is not deleted after all.
            let earlier = self
                .tombstones
                .insert(id, (Gone::Deleted, SystemTime::now()));
            let refused = match self.table.remove_finished(id) {
                table::Removal::Removed => return Ok(()),
                table::Removal::Unfinished(state) => Error::JobNotFinished { id, state },
                table::Removal::Absent => match earlier {
                    Some((gone, _)) => Error::JobGone { id, gone },
                    None => Error::JobNotFound(id),
                },
            };
            match earlier {
                Some(earlier) => self.tombstones.insert(id, earlier),
                None => self.tombstones.remove(&id).map(|(_, t)| t),
            };
            return Err(refused);
        };
        // Every unfinished job is in the table, and the table is the fresher
        // source for them (a running job may still be pending on disk).
        if let Some(state) = self.table.view(id, |r| r.state)
            && !state.is_terminal()
        {
            return Err(Error::JobNotFinished { id, state });
        }
        match durable.writer.delete(id).await.map_err(Error::Store)? {
            Deleted::Removed => {
                self.table.forget(id);
                Ok(())
            }
            Deleted::Unfinished(state) => Err(Error::JobNotFinished { id, state }),
            Deleted::Absent(Some(gone)) => Err(Error::JobGone { id, gone }),
            Deleted::Absent(None) => Err(Error::JobNotFound(id)),
        }
    }

    /// In durable mode, finished jobs beyond the cache size leave memory;
    /// they are still on disk.
    fn evict(&self) {
        if self.durable.is_some() {
            self.table
                .evict_finished(SystemTime::UNIX_EPOCH, self.retention.cache_finished, 64);
        }
    }

    async fn lookup(&self, id: JobId) -> Result<Option<JobRecord>, Error> {
        let Some(durable) = &self.durable else {
            return Ok(None);
        };
        match durable.reader.lookup(id).await.map_err(Error::Store)? {
            Lookup::Job(record) => Ok(Some(*record)),
            Lookup::Gone(_) | Lookup::Unknown => Ok(None),
        }
    }

    /// NOT_FOUND, saying "expired" or "deleted" where a tombstone says so.
    async fn not_found(&self, id: JobId) -> Error {
        let gone = match &self.durable {
            None => self.tombstones.get(&id).map(|t| t.0),
            Some(durable) => match durable.reader.lookup(id).await {
                Ok(Lookup::Gone(gone)) => Some(gone),
                _ => None,
            },
        };
        match gone {
            Some(gone) => Error::JobGone { id, gone },
            None => Error::JobNotFound(id),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.table.len()
    }

    pub(crate) fn counts(&self) -> std::collections::BTreeMap<&'static str, usize> {
        self.table.counts()
    }

    /// (commits, operations) of the durable writer, for the mean batch size.
    pub(crate) fn commit_stats(&self) -> Option<(u64, u64)> {
        self.durable.as_ref().map(|d| {
            let s = d.writer.stats();
            (
                s.commits.load(std::sync::atomic::Ordering::Relaxed),
                s.operations.load(std::sync::atomic::Ordering::Relaxed),
            )
        })
    }

    /// Why the durable store stopped acknowledging, if it did (fail-stop).
    pub(crate) fn failure(&self) -> Option<StoreError> {
        self.durable.as_ref().and_then(|d| d.writer.failure())
    }
}

/// Merges the newest jobs from the table (`memory`) and from the database
/// (`disk`), each newest first and at most `want` long, into a page of at
/// most `limit`. For ids in the table only the table's record counts.
///
/// A source that returned `want` jobs may hold more below its last id, so
/// the merged list is complete only down to the higher of those last ids
/// (`bound`); the page never goes below it, and the next page starts there.
fn merge_page(
    memory: Vec<JobRecord>,
    disk: Vec<JobRecord>,
    want: usize,
    limit: usize,
    in_table: impl Fn(JobId) -> bool,
) -> ListPage {
    let full_tail = |records: &[JobRecord]| {
        (records.len() == want)
            .then(|| records.last().map(|r| r.id))
            .flatten()
    };
    let bound = full_tail(&memory).max(full_tail(&disk));
    let mut merged: std::collections::BTreeMap<std::cmp::Reverse<JobId>, JobRecord> = memory
        .into_iter()
        .map(|r| (std::cmp::Reverse(r.id), r))
        .collect();
    for record in disk {
        if !in_table(record.id) {
            merged.entry(std::cmp::Reverse(record.id)).or_insert(record);
        }
    }
    let mut trusted: Vec<JobRecord> = merged
        .into_values()
        .take_while(|r| bound.is_none_or(|bound| r.id >= bound))
        .collect();
    let next = if trusted.len() > limit {
        trusted.truncate(limit);
        trusted.last().map(|r| r.id)
    } else {
        bound
    };
    ListPage {
        jobs: trusted,
        next,
    }
}

/// What makes two submissions with one request id "the same": the function
/// and the arguments (JSON with sorted keys, so key order does not matter).
fn fingerprint(record: &JobRecord) -> [u8; 16] {
    let mut hasher = Sha256::new();
    hasher.update(record.function.as_bytes());
    hasher.update([0]);
    hasher.update(record.args.to_string().as_bytes());
    let digest = hasher.finalize();
    let mut out = [0; 16];
    out.copy_from_slice(&digest[..16]);
    out
}

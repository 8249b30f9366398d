//! The durable embedded store: SQLite (bundled), WAL mode,
//! `synchronous=FULL`, in a data directory locked by one jobd at a time.
//!
//! Writes go through the group-committing [`writer`] thread; reads of jobs
//! that are not in the live cache go through the [`reader`] connections;
//! [`recover`] runs once at start and decides the fate of every unfinished
//! job. In front of the database sits the shared in-memory machinery
//! ([`super::live`]) as a cache of every unfinished job and the most recent
//! finished ones: claims are decided there and written unawaited (after a
//! crash every job still marked running is known to have been
//! interrupted), while new jobs and terminal outcomes reach it only after
//! their commit, from the writer thread. The cache is this store's own:
//! nothing outside it reads or writes it.

mod codec;
mod reader;
mod recover;
mod schema;
mod writer;

use std::{
    fs::File,
    path::Path,
    sync::Arc,
    time::{Duration, SystemTime},
};

use futures::{FutureExt as _, future::BoxFuture, stream::BoxStream};
use jobd_proto::{JobId, JobState};
use rusqlite::Connection;

use self::{
    reader::{Lookup, Reader},
    writer::{InsertJob, Inserted, Publish, Writer},
};
pub use super::live::table::POISON_LIMIT;
use super::{
    CancelResult, ClaimRequest, Claimed, Cursor, Deleted, EventItem, Fenced, Found, JobStore,
    Lease, LeaseState, ListFilter, ListPage, LogFeed, LogLine, Maintained, Maintenance, Missing,
    NewJob, StoreError, StoreOptions, StoreStats, Submitted, fingerprint,
    live::{
        Live,
        table::{self, CancelPlan, Lapsed},
    },
    log_entries,
};
use crate::job::{Finished, JobError, JobRecord, LogEntry, LogPage, Outcome};

/// The database file inside the data directory.
pub const DB_FILE: &str = "jobd.sqlite3";
/// The lock file that keeps a second jobd out of the data directory.
pub const LOCK_FILE: &str = "jobd.lock";
/// Read connections for jobs not held in memory.
const READERS: usize = 2;
/// Finished jobs evicted from the cache per completion at most, so a
/// completion never holds up its caller for long.
const EVICT_BATCH: usize = 64;

pub(crate) struct SqliteStore {
    live: Arc<Live>,
    writer: Writer,
    reader: Reader,
    /// Finished jobs kept in the cache (older ones are read from disk).
    cache_finished: usize,
    /// Where the logs of running jobs that wrote any end; an entry goes
    /// when its job finishes (completed, cancelled, or failed by a lapse).
    log_ends: dashmap::DashMap<JobId, u64>,
    /// Held for the life of the process: the advisory lock on the data dir.
    _lock: File,
}

impl SqliteStore {
    /// Opens (creating if needed) the store in `dir`, migrates it, and
    /// recovers unfinished jobs from the previous run into the cache.
    pub(crate) fn open(dir: &Path, options: StoreOptions) -> Result<Self, StoreError> {
        let data_dir_error = |action: &str, err: std::io::Error| StoreError::DataDir {
            path: dir.to_owned(),
            message: format!("{action}: {err}"),
        };
        std::fs::create_dir_all(dir).map_err(|e| data_dir_error("cannot create it", e))?;
        let lock_path = dir.join(LOCK_FILE);
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| data_dir_error("cannot create its lock file", e))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(StoreError::Locked(dir.to_owned()));
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(data_dir_error("cannot lock it", e));
            }
        }

        let path = dir.join(DB_FILE);
        let open_error = |err: &dyn std::fmt::Display| StoreError::Open {
            path: path.clone(),
            message: err.to_string(),
        };
        let mut conn = Connection::open(&path).map_err(|e| open_error(&e))?;
        configure(&conn).map_err(|e| open_error(&e))?;
        schema::migrate(&mut conn).map_err(|e| open_error(&e))?;
        let recovered =
            recover::recover(&mut conn, options.clock.now()).map_err(|e| open_error(&e))?;
        #[cfg(feature = "fault-injection")]
        if let Some(pages) = options.faults.max_db_pages {
            conn.pragma_update(
                None,
                "max_page_count",
                i64::try_from(pages).unwrap_or(i64::MAX),
            )
            .map_err(|e| open_error(&e))?;
        }
        #[cfg(feature = "fault-injection")]
        let ack_before_commit = options.faults.ack_before_commit;
        #[cfg(not(feature = "fault-injection"))]
        let ack_before_commit = false;
        // Tokens increase across restarts too: each run starts above every
        // token an earlier run can have handed out.
        let first_token = u64::try_from(recovered.boot).unwrap_or(0) << 32;
        let live = Arc::new(Live::new(&options, first_token));
        tracing::info!(
            path = %path.display(),
            boot = recovered.boot,
            pending = recovered.pending.len(),
            held_by_workers = recovered.running.len(),
            requeued = recovered.requeued,
            failed_not_retry_safe = recovered.failed_unsafe,
            poison_pills = recovered.poisoned,
            "opened the job store"
        );
        for (record, lost) in recovered.pending {
            live.restore(record, lost);
        }
        for running in recovered.running {
            live.restore_running(
                running.record,
                running.lost,
                running.token,
                running.holder,
                running.ttl,
            );
        }
        let reader = Reader::open(&path, READERS).map_err(|e| open_error(&e))?;
        let writer = Writer::spawn(conn, recovered.boot, ack_before_commit, Arc::clone(&live))
            .map_err(|e| StoreError::Open {
                path: path.clone(),
                message: format!("cannot start the writer thread: {e}"),
            })?;
        Ok(Self {
            live,
            writer,
            reader,
            cache_finished: options.cache_finished,
            log_ends: dashmap::DashMap::new(),
            _lock: lock,
        })
    }

    /// Finished jobs beyond the cache's size leave memory; they are still
    /// on disk.
    fn evict(&self) {
        self.live
            .table
            .evict_finished(SystemTime::UNIX_EPOCH, self.cache_finished, EVICT_BATCH);
    }

    /// The job as the database has it, when the cache does not hold it.
    async fn lookup(&self, id: JobId) -> Result<Found<JobRecord>, StoreError> {
        Ok(match self.reader.lookup(id).await? {
            Lookup::Job(record) => Ok(*record),
            Lookup::Gone(gone) => Err(Missing::Gone(gone)),
            Lookup::Unknown => Err(Missing::Unknown),
        })
    }
}

#[async_trait::async_trait]
impl JobStore for SqliteStore {
    fn is_durable(&self) -> bool {
        true
    }

    fn submit(&self, job: NewJob) -> BoxFuture<'static, Result<Submitted, StoreError>> {
        if let Some(failure) = self.writer.failure() {
            // Fail-stop: refuse at once, for the same reason as the first time.
            return std::future::ready(Err(failure)).boxed();
        }
        let record = self.live.stamp(job);
        let key = match self.live.reserve(&record) {
            Ok(Ok(key)) => key,
            Ok(Err(refused)) => return std::future::ready(Ok(refused)).boxed(),
            Err(err) => return std::future::ready(Err(err)).boxed(),
        };
        let fingerprint = match record.request_id {
            Some(_) => fingerprint(&record.function, &record.args),
            None => [0; 16],
        };
        let (id, queue, due) = (record.id, self.live.queue_name(&record), record.not_before);
        let live = Arc::clone(&self.live);
        // Runs on the writer thread right after the commit (or at once if
        // the job will not exist), whoever still waits: a client that hangs
        // up mid-Submit cannot leave a job committed but unqueued.
        let publish = Publish::new(move |committed: Option<JobRecord>| match committed {
            Some(record) => {
                live.table.insert_unchecked(record, key);
                live.enqueue(&queue, id, key, due);
            }
            None => live.release(&queue, key),
        });
        let writer = self.writer.clone();
        async move {
            let job = InsertJob {
                record,
                fingerprint,
            };
            Ok(match writer.insert(job, publish).await? {
                Inserted::New => Submitted::New(id),
                Inserted::Existing(existing) => Submitted::Existing {
                    id: existing.job,
                    same_content: existing.fingerprint == fingerprint,
                },
            })
        }
        .boxed()
    }

    async fn claim(&self, request: &ClaimRequest) -> Result<Option<Claimed>, StoreError> {
        // The write's place first, so a claim decided in the cache is always
        // written (unawaited: it rides in the next batch).
        let slot = self.writer.slot().await?;
        let Some(claimed) = self.live.claim(request).await? else {
            return Ok(None);
        };
        slot.start(
            &claimed,
            std::sync::Arc::clone(&request.holder),
            request.ttl,
        );
        Ok(Some(claimed))
    }

    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<LeaseState, StoreError> {
        // Leases live in the cache: after a restart, recovery decides the
        // fate of every job that was running.
        Ok(self.live.renew(lease, ttl))
    }

    async fn complete(&self, lease: &Lease, outcome: Outcome) -> Result<Fenced, StoreError> {
        let slot = self.writer.slot().await?;
        if !self.live.table.begin_finish(lease) {
            return Ok(self.live.table.not_current(lease));
        }
        slot.finish(lease.job, lease.attempt, outcome, self.live.clock.now());
        self.log_ends.remove(&lease.job);
        self.evict();
        Ok(Fenced::Applied)
    }

    async fn retry(&self, lease: &Lease, not_before: SystemTime) -> Result<Fenced, StoreError> {
        let slot = self.writer.slot().await?;
        if !self.live.requeue(lease, not_before) {
            return Ok(self.live.table.not_current(lease));
        }
        // A failure here means fail-stop; after a restart recovery re-queues
        // the job it finds running.
        slot.requeue(vec![(lease.job, lease.attempt)], self.live.clock.now())
            .await?;
        Ok(Fenced::Applied)
    }

    async fn release(&self, lease: &Lease) -> Result<Fenced, StoreError> {
        self.retry(lease, self.live.clock.now()).await
    }

    fn progress(&self, lease: &Lease, fraction: f64, message: &str) {
        self.live.progress(lease, fraction, message);
    }

    async fn cancel(&self, id: JobId) -> Result<CancelResult, StoreError> {
        let slot = self.writer.slot().await?;
        Ok(match self.live.begin_cancel(id) {
            Some(CancelPlan::Pending(..)) => {
                let attempt = self.live.table.view(id, |r| r.attempt).unwrap_or(0);
                slot.finish_visible(id, attempt, Err(JobError::Cancelled), self.live.clock.now())
                    .await?;
                // A job cancelled while waiting to retry may have logged.
                self.log_ends.remove(&id);
                self.evict();
                CancelResult::Cancelled
            }
            Some(CancelPlan::Running {
                lease,
                holder,
                pool,
            }) => CancelResult::Requested {
                lease,
                holder,
                pool,
            },
            Some(CancelPlan::AlreadyDone) => CancelResult::AlreadyDone,
            // Every unfinished job is in the cache: one that is not is
            // finished or gone.
            None => match self.lookup(id).await? {
                Ok(_) => CancelResult::AlreadyDone,
                Err(missing) => CancelResult::Missing(missing),
            },
        })
    }

    async fn append_log(&self, lease: &Lease, lines: Vec<LogLine>) -> Result<Fenced, StoreError> {
        if !self.log_ends.contains_key(&lease.job) {
            // Its first lines in this run: an earlier attempt, or this one
            // before a restart, may have written some.
            let end = self.reader.log_end(lease.job).await?;
            self.log_ends.entry(lease.job).or_insert(end);
        }
        let slot = self.writer.slot().await?;
        let at = self.live.clock.now();
        let appended = self.live.table.while_current(lease, || {
            let mut end = self.log_ends.entry(lease.job).or_insert(0);
            let entries = log_entries(lines, lease.attempt, at, *end, self.live.log_cap);
            *end = entries.last().map_or(*end, LogEntry::end);
            (entries, *end)
        });
        Ok(match appended {
            Some((entries, end)) => {
                slot.append_log(lease.job, entries, end.saturating_sub(self.live.log_cap));
                Fenced::Applied
            }
            None => Fenced::Stale,
        })
    }

    async fn read_log(
        &self,
        id: JobId,
        from: u64,
        max_bytes: usize,
    ) -> Result<Found<LogPage>, StoreError> {
        if let Err(missing) = self.state(id).await? {
            return Ok(Err(missing));
        }
        let entries = self.reader.log(id, from, max_bytes).await?;
        Ok(Ok(LogPage::new(entries, from)))
    }

    fn follow_log(&self, id: JobId) -> LogFeed {
        self.live.log_feeds.follow(id)
    }

    async fn get(&self, id: JobId) -> Result<Found<JobRecord>, StoreError> {
        match self.live.table.view(id, JobRecord::clone) {
            Some(record) => Ok(Ok(record)),
            None => self.lookup(id).await,
        }
    }

    async fn state(&self, id: JobId) -> Result<Found<JobState>, StoreError> {
        match self.live.table.state(id) {
            Some(state) => Ok(Ok(state)),
            None => Ok(self.lookup(id).await?.map(|record| record.state)),
        }
    }

    async fn wait(&self, id: JobId) -> Result<Found<Finished>, StoreError> {
        if let Some(finished) = self.live.wait(id).await {
            return Ok(Ok(finished));
        }
        match self.lookup(id).await? {
            Ok(record) => table::finished(&record).map(Ok).ok_or_else(|| {
                // Every unfinished job is in the cache from the start.
                StoreError::Unavailable(format!("job {id} is unfinished but not loaded"))
            }),
            Err(missing) => Ok(Err(missing)),
        }
    }

    /// In memory the cache holds the fresher record of the jobs it holds (a
    /// claim is written after the fact), and the database holds every job:
    /// both are read and, for an id in the cache, the cache's record wins.
    async fn list(
        &self,
        filter: &ListFilter,
        before: Option<JobId>,
        limit: usize,
    ) -> Result<ListPage, StoreError> {
        // One more than a page from each source: a source that fills it has
        // more to give.
        let want = limit + 1;
        let memory = self.live.table.list(filter, before, want);
        let disk = self.reader.list(filter.clone(), before, want).await?;
        let in_cache = |id: JobId| self.live.table.view(id, |_| ()).is_some();
        Ok(merge_page(memory, disk, want, limit, in_cache))
    }

    async fn delete(&self, id: JobId) -> Result<Deleted, StoreError> {
        // Every unfinished job is in the cache, and the cache is the fresher
        // source for them (a running job may still be pending on disk).
        if let Some(state) = self.live.table.state(id)
            && !state.is_terminal()
        {
            return Ok(Deleted::Unfinished(state));
        }
        // The writer forgets a removed job in the cache after the commit.
        self.writer.delete(id, self.live.clock.now()).await
    }

    async fn maintain(&self, step: Maintenance) -> Result<Maintained, StoreError> {
        let now = self.live.clock.now();
        let mut done = Maintained::default();
        if step.expire_leases {
            for (id, token) in self.live.expired_leases(now, usize::MAX) {
                let slot = self.writer.slot().await?;
                let attempt = self.live.table.view(id, |r| r.attempt).unwrap_or(0);
                match self.live.lapse(id, token, now) {
                    Some(Lapsed::Requeued) => {
                        slot.requeue(vec![(id, attempt)], now).await?;
                        done.requeued += 1;
                    }
                    Some(Lapsed::Failed(err)) => {
                        slot.finish(id, attempt, Err(err), now);
                        self.log_ends.remove(&id);
                        done.failed += 1;
                    }
                    None => {}
                }
            }
        }
        if let Some(purge) = step.purge {
            // The writer forgets the removed jobs in the cache.
            let swept = self
                .writer
                .purge(
                    purge.finished_before,
                    purge.tombstones_before,
                    now,
                    purge.limit,
                )
                .await?;
            done.purged = swept.ids.len();
            done.more = swept.more;
        }
        Ok(done)
    }

    async fn flush(&self) -> Result<(), StoreError> {
        self.writer.flush().await
    }

    fn close(&self) {
        self.live.close();
    }

    fn event_head(&self) -> Cursor {
        self.live.events.head()
    }

    fn events(&self, after: u64) -> BoxStream<'static, Result<EventItem, StoreError>> {
        self.live.events.stream(after)
    }

    fn stats(&self) -> StoreStats {
        let writer = self.writer.stats();
        StoreStats {
            jobs: self.live.table.len(),
            by_state: self.live.table.counts(),
            queued: self.live.queued(),
            events_held: self.live.events.held(),
            commits: Some((
                writer.commits.load(std::sync::atomic::Ordering::Relaxed),
                writer.operations.load(std::sync::atomic::Ordering::Relaxed),
            )),
        }
    }
}

/// Merges the newest jobs from the cache (`memory`) and from the database
/// (`disk`), each newest first and at most `want` long, into a page of at
/// most `limit`. For ids in the cache only the cache's record counts.
///
/// A source that returned `want` jobs may hold more below its last id, so
/// the merged list is complete only down to the higher of those last ids
/// (`bound`); the page never goes below it, and the next page starts there.
fn merge_page(
    memory: Vec<JobRecord>,
    disk: Vec<JobRecord>,
    want: usize,
    limit: usize,
    in_cache: impl Fn(JobId) -> bool,
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
        if !in_cache(record.id) {
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

fn configure(conn: &Connection) -> rusqlite::Result<()> {
    // Reading the journal mode back also proves the file is a database: a
    // corrupt or foreign file fails here, before anything is written.
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(rusqlite::Error::InvalidParameterName(format!(
            "journal_mode is {mode}, expected wal"
        )));
    }
    // FULL: every commit is fsynced, so an acknowledged job survives a power
    // cut, not just a process crash.
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    // Checkpointing every ~40 MiB of WAL instead of every 4 MiB copies a
    // page that many commits touched once instead of many times.
    //
    // The page cache is 8 MiB, not more: the writer touches only the right
    // edges of its B-trees, and a bigger cache costs every commit time. A
    // page split that reorders pages swaps their numbers through a spare one
    // past the 1 GiB lock-byte page; while the file is smaller than that,
    // the end of the transaction then walks the cache's whole hash table to
    // drop pages "past the end of the file". With 64 MiB that walk was ~10%
    // of the writer's time in `jobctl bench --mode submit`.
    conn.pragma_update(None, "cache_size", -8 * 1024)?;
    conn.pragma_update(None, "wal_autocheckpoint", 10_000)?;
    // No integrity check here: `quick_check` reads every page, which would
    // make start-up grow with history. Corruption surfaces as an error on the
    // first read or write that meets it, and then fails stop.
    Ok(())
}

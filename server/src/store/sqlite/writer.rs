//! The single writer: one thread owns the write connection and commits with
//! **group commit**. Handlers send operations over a bounded channel; the
//! writer takes everything queued (up to `MAX_BATCH`), applies it in one
//! transaction, commits once (one fsync), and only then answers every waiter.
//!
//! Fail-stop: if a commit fails, nothing in that batch is acknowledged, the
//! cause is logged, and every later operation is refused with the same
//! error. A server that cannot be sure its data is on disk stops saying yes.

use std::{
    sync::{
        Arc, LazyLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::SystemTime,
};

use jobd_proto::{JobId, JobState};
use rusqlite::{Connection, OptionalExtension as _, params};
use tokio::sync::{mpsc, oneshot};

use super::codec::{
    TOMBSTONE_DELETED, TOMBSTONE_EXPIRED, first_id_after, gone_from_reason, history_entry,
    id_bytes, id_from_bytes, json_text, labels_json, micros, outcome_columns, pool_value,
    push_history_entry, state_code, state_from_code, stored_state,
};
use crate::{
    job::{JobRecord, Outcome},
    store::{
        Claimed, Deleted, FencingToken, LeaseHolder, Missing, StoreError,
        live::{Live, table::RequestEntry},
    },
};

/// Most operations in one transaction: bounds the latency of a commit.
const MAX_BATCH: usize = 4096;
/// Operations that may wait for the writer: past it, senders wait (back
/// pressure), never buffer without bound.
const CHANNEL_CAPACITY: usize = 16 * 1024;

/// A job to insert, with what idempotency needs.
pub(crate) struct InsertJob {
    pub(crate) record: JobRecord,
    pub(crate) fingerprint: [u8; 16],
}

/// What one retention step removed.
pub(crate) struct Swept {
    pub(crate) ids: Vec<JobId>,
    /// The step stopped before the cutoff: call again.
    pub(crate) more: bool,
}

/// What an insert found.
#[derive(Clone, Copy)]
pub(crate) enum Inserted {
    New,
    /// The request id belongs to an earlier job.
    Existing(RequestEntry),
}

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

/// One write. Those that answer a caller carry their reply, and the
/// operations whose answer is computed in the transaction keep it in the op
/// (`found`, `swept`) until the commit: each op answers for itself, so no
/// answer can be paired with the wrong op.
enum Op {
    Insert {
        job: Box<InsertJob>,
        /// Taken early only by the test-only ack-before-commit mutation.
        reply: Option<Reply<Inserted>>,
        /// Makes the job visible once committed (or gives its queue slot
        /// back), even if the submitter has gone away meanwhile.
        publish: Publish,
        found: Option<Inserted>,
    },
    Start {
        id: JobId,
        attempt: u32,
        token: FencingToken,
        at: SystemTime,
        /// Who holds the lease, and its length when it can lapse: kept so
        /// that recovery can tell a lease that outlives the process.
        holder: LeaseHolder,
        ttl: Option<std::time::Duration>,
    },
    Finish {
        id: JobId,
        attempt: u32,
        outcome: Outcome,
        at: SystemTime,
        /// `None` when nobody waits: the writer itself makes the outcome
        /// visible after the commit.
        reply: Option<Reply<()>>,
    },
    Requeue {
        ids: Vec<(JobId, u32)>,
        at: SystemTime,
        reply: Reply<()>,
    },
    Delete {
        id: JobId,
        at: SystemTime,
        reply: Reply<Deleted>,
        found: Option<Deleted>,
    },
    Purge {
        cutoff: SystemTime,
        tombstone_cutoff: SystemTime,
        at: SystemTime,
        limit: usize,
        reply: Reply<Swept>,
        swept: Option<Swept>,
    },
    Flush {
        reply: Reply<()>,
    },
}

impl Op {
    /// After the commit: makes what was committed visible in the live
    /// cache (a new job, an outcome, a removal), then answers the waiter, if
    /// any. Done here, on the writer thread, so it happens even when the
    /// waiter gave up (its client went away); it no longer needs the
    /// answer, so a failed send is fine.
    fn answer(self, live: &Live) {
        match self {
            Self::Insert {
                job,
                reply,
                publish,
                found,
            } => {
                match found {
                    Some(Inserted::Existing(_)) => publish.withdraw(),
                    Some(Inserted::New) | None => publish.publish(job.record),
                }
                if let Some(reply) = reply {
                    drop(reply.send(found.ok_or_else(unanswered)));
                }
            }
            Self::Finish {
                id,
                outcome,
                at,
                reply,
                ..
            } => {
                live.table.complete(id, outcome, at);
                if let Some(reply) = reply {
                    drop(reply.send(Ok(())));
                }
            }
            Self::Requeue { reply, .. } | Self::Flush { reply } => drop(reply.send(Ok(()))),
            Self::Delete {
                id, reply, found, ..
            } => {
                if found == Some(Deleted::Removed) {
                    live.table.forget(id);
                }
                drop(reply.send(found.ok_or_else(unanswered)));
            }
            Self::Purge { reply, swept, .. } => {
                if let Some(swept) = &swept {
                    for id in &swept.ids {
                        live.table.forget(*id);
                    }
                }
                drop(reply.send(swept.ok_or_else(unanswered)));
            }
            Self::Start { .. } => {}
        }
    }

    /// The batch was not committed: nothing in it happened.
    fn refuse(self, err: &StoreError, live: &Live) {
        match self {
            Self::Insert { reply, publish, .. } => {
                publish.withdraw();
                if let Some(reply) = reply {
                    drop(reply.send(Err(err.clone())));
                }
            }
            Self::Finish { id, reply, .. } => {
                live.table.abandon(id);
                if let Some(reply) = reply {
                    drop(reply.send(Err(err.clone())));
                }
            }
            Self::Requeue { reply, .. } | Self::Flush { reply } => {
                drop(reply.send(Err(err.clone())));
            }
            Self::Delete { reply, .. } => drop(reply.send(Err(err.clone()))),
            Self::Purge { reply, .. } => drop(reply.send(Err(err.clone()))),
            Self::Start { .. } => {}
        }
    }
}

/// An op whose transaction committed but which holds no answer: a bug in
/// `apply_in`, reported to its caller rather than dropped.
fn unanswered() -> StoreError {
    StoreError::Unavailable("internal error: the store writer produced no answer".into())
}

/// What to do with a new job once its fate is committed: put it in the live
/// cache and its queue, or give its queue slot back. Exactly one of the two
/// happens, even when the operation is dropped unsent.
pub(crate) struct Publish(Option<Box<dyn FnOnce(Option<JobRecord>) + Send>>);

impl Publish {
    pub(crate) fn new(f: impl FnOnce(Option<JobRecord>) + Send + 'static) -> Self {
        Self(Some(Box::new(f)))
    }

    /// The job is committed: make it visible.
    pub(crate) fn publish(mut self, record: JobRecord) {
        if let Some(f) = self.0.take() {
            f(Some(record));
        }
    }

    /// The job will not exist (a duplicate, or the commit failed).
    pub(crate) fn withdraw(mut self) {
        if let Some(f) = self.0.take() {
            f(None);
        }
    }
}

impl Drop for Publish {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            f(None);
        }
    }
}

/// Counters for the benchmark report and operators.
#[derive(Debug, Default)]
pub(crate) struct WriterStats {
    pub(crate) commits: AtomicU64,
    pub(crate) operations: AtomicU64,
}

/// The handle every store operation writes through. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Writer {
    tx: mpsc::Sender<Op>,
    stats: Arc<WriterStats>,
    failure: Arc<Failure>,
}

/// Set once by the writer when a commit fails; read by every request.
#[derive(Default)]
struct Failure {
    failed: AtomicBool,
    cause: std::sync::OnceLock<StoreError>,
}

/// A place in the writer's queue, taken before a change is decided in the
/// cache, so that the write of a decided change can never be lost to a
/// caller that stops waiting (or to a full queue).
pub(crate) struct Slot<'a>(mpsc::Permit<'a, Op>);

impl Slot<'_> {
    /// Records a claim without waiting: it rides in the next batch.
    pub(crate) fn start(
        self,
        claimed: &Claimed,
        holder: LeaseHolder,
        ttl: Option<std::time::Duration>,
    ) {
        let lease = &claimed.lease;
        self.0.send(Op::Start {
            id: lease.job,
            attempt: lease.attempt,
            token: lease.token,
            at: claimed.started_at,
            holder,
            ttl,
        });
    }

    /// Records a terminal outcome; the writer makes it visible in the live
    /// cache after the commit. Nobody waits.
    pub(crate) fn finish(self, id: JobId, attempt: u32, outcome: Outcome, at: SystemTime) {
        self.0.send(Op::Finish {
            id,
            attempt,
            outcome,
            at,
            reply: None,
        });
    }

    /// As `finish`, and answers once it is committed and visible.
    pub(crate) async fn finish_visible(
        self,
        id: JobId,
        attempt: u32,
        outcome: Outcome,
        at: SystemTime,
    ) -> Result<(), StoreError> {
        let (reply, answer) = oneshot::channel();
        self.0.send(Op::Finish {
            id,
            attempt,
            outcome,
            at,
            reply: Some(reply),
        });
        answer.await.map_err(|_| stopped())?
    }

    /// Records that the jobs (each at its attempt) are pending again;
    /// answers after the commit.
    pub(crate) async fn requeue(
        self,
        ids: Vec<(JobId, u32)>,
        at: SystemTime,
    ) -> Result<(), StoreError> {
        let (reply, answer) = oneshot::channel();
        self.0.send(Op::Requeue { ids, at, reply });
        answer.await.map_err(|_| stopped())?
    }
}

impl Writer {
    /// Starts the writer thread on `conn`, making commits visible in `live`.
    /// `ack_before_commit` is the test-only mutation that breaks durability
    /// on purpose.
    pub(crate) fn spawn(
        conn: Connection,
        boot: i64,
        ack_before_commit: bool,
        live: Arc<Live>,
    ) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
        let stats = Arc::new(WriterStats::default());
        let failure = Arc::new(Failure::default());
        let mut worker = WriterThread {
            conn,
            boot,
            rx,
            stats: Arc::clone(&stats),
            failure: Arc::clone(&failure),
            ack_before_commit,
            live,
            sweep_from: None,
        };
        // The thread ends when the last sender is dropped, after applying
        // what was sent; every acknowledged operation was awaited by its
        // sender, so nothing acknowledged is left behind.
        std::thread::Builder::new()
            .name("jobd-store-writer".into())
            .spawn(move || worker.run())?;
        Ok(Self { tx, stats, failure })
    }

    pub(crate) fn stats(&self) -> &WriterStats {
        &self.stats
    }

    /// Why the store stopped acknowledging, once a commit failed.
    pub(crate) fn failure(&self) -> Option<StoreError> {
        if self.failure.failed.load(Ordering::Acquire) {
            self.failure.cause.get().cloned()
        } else {
            None
        }
    }

    /// A place in the queue for one write (see [`Slot`]).
    pub(crate) async fn slot(&self) -> Result<Slot<'_>, StoreError> {
        self.tx.reserve().await.map(Slot).map_err(|_| stopped())
    }

    /// Inserts a job; `publish` runs on the writer thread right after the
    /// commit, so the job becomes visible whether or not the caller is still
    /// waiting for the answer.
    pub(crate) async fn insert(
        &self,
        job: InsertJob,
        publish: Publish,
    ) -> Result<Inserted, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.send(Op::Insert {
            job: Box::new(job),
            reply: Some(reply),
            publish,
            found: None,
        })
        .await?;
        answer.await.map_err(|_| stopped())?
    }

    /// Returns once everything sent before it is committed and visible.
    pub(crate) async fn flush(&self) -> Result<(), StoreError> {
        let (reply, answer) = oneshot::channel();
        self.send(Op::Flush { reply }).await?;
        answer.await.map_err(|_| stopped())?
    }

    pub(crate) async fn purge(
        &self,
        cutoff: SystemTime,
        tombstone_cutoff: SystemTime,
        at: SystemTime,
        limit: usize,
    ) -> Result<Swept, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.send(Op::Purge {
            cutoff,
            tombstone_cutoff,
            at,
            limit,
            reply,
            swept: None,
        })
        .await?;
        answer.await.map_err(|_| stopped())?
    }

    /// Deletes a finished job at a client's request, leaving a "deleted"
    /// tombstone stamped `at`; answers after the commit.
    pub(crate) async fn delete(&self, id: JobId, at: SystemTime) -> Result<Deleted, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.send(Op::Delete {
            id,
            at,
            reply,
            found: None,
        })
        .await?;
        answer.await.map_err(|_| stopped())?
    }

    async fn send(&self, op: Op) -> Result<(), StoreError> {
        self.tx.send(op).await.map_err(|_| stopped())
    }
}

fn stopped() -> StoreError {
    StoreError::Unavailable("the store writer has stopped".into())
}

struct WriterThread {
    conn: Connection,
    boot: i64,
    rx: mpsc::Receiver<Op>,
    stats: Arc<WriterStats>,
    failure: Arc<Failure>,
    ack_before_commit: bool,
    /// Where committed changes become visible.
    live: Arc<Live>,
    /// Where the next retention step goes on from (see [`purge`]).
    sweep_from: Option<JobId>,
}

impl WriterThread {
    fn run(&mut self) {
        let mut batch = Vec::with_capacity(256);
        while let Some(op) = self.rx.blocking_recv() {
            batch.push(op);
            while batch.len() < MAX_BATCH {
                match self.rx.try_recv() {
                    Ok(op) => batch.push(op),
                    Err(_) => break,
                }
            }
            self.commit(&mut batch);
        }
        tracing::debug!("store writer stopped");
    }

    fn commit(&mut self, batch: &mut Vec<Op>) {
        if let Some(err) = self.failure.cause.get() {
            for op in batch.drain(..) {
                op.refuse(err, &self.live);
            }
            return;
        }
        match self.apply(batch) {
            Ok(()) => {
                self.stats.commits.fetch_add(1, Ordering::Relaxed);
                self.stats
                    .operations
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
                for op in batch.drain(..) {
                    op.answer(&self.live);
                }
            }
            Err(err) => {
                // Nothing in the batch is acknowledged: the transaction rolls
                // back when dropped, and every waiter hears why.
                let err = StoreError::from_sqlite(&err);
                tracing::error!(%err, "commit failed: the store stops acknowledging (fail-stop)");
                for op in batch.drain(..) {
                    op.refuse(&err, &self.live);
                }
                let _ = self.failure.cause.set(err);
                self.failure.failed.store(true, Ordering::Release);
            }
        }
    }

    /// Applies every operation in one transaction and commits it.
    fn apply(&mut self, batch: &mut [Op]) -> rusqlite::Result<()> {
        let tx = self.conn.transaction()?;
        apply_in(
            &tx,
            batch,
            self.boot,
            self.ack_before_commit,
            &mut self.sweep_from,
        )?;
        if self.ack_before_commit {
            // Widen the window a crash can fall into, as a slow disk would.
            #[allow(
                clippy::disallowed_methods,
                reason = "the test-only mutation imitates a slow disk on the writer's own thread"
            )]
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        tx.commit()
    }
}

/// Applies every operation of `batch` in `tx`, for the run numbered `boot`,
/// keeping each op's answer in it. `sweep_from` is where the retention
/// sweep stands.
fn apply_in(
    tx: &rusqlite::Transaction<'_>,
    batch: &mut [Op],
    boot: i64,
    ack_before_commit: bool,
    sweep_from: &mut Option<JobId>,
) -> rusqlite::Result<()> {
    let mut sql = Statements::new(tx);
    // Jobs that start and finish within this batch (the common case for
    // short jobs): their Start needs no row update of its own. Not a job
    // that is also re-queued in it (a quick retry): each of its changes
    // must match the row as the one before left it, or the history would
    // miss the retry.
    //
    // Sorted vectors, not hash sets: a batch holds a few hundred ids, and
    // sorting them costs less than hashing each one with SipHash.
    let mut requeued: Vec<JobId> = batch
        .iter()
        .filter_map(|op| match op {
            Op::Requeue { ids, .. } => Some(ids.iter().map(|(id, _)| *id)),
            _ => None,
        })
        .flatten()
        .collect();
    requeued.sort_unstable();
    let mut finishing: Vec<JobId> = batch
        .iter()
        .filter_map(|op| match op {
            Op::Finish { id, .. } if requeued.binary_search(id).is_err() => Some(*id),
            _ => None,
        })
        .collect();
    finishing.sort_unstable();
    let finishes = |id: &JobId| finishing.binary_search(id).is_ok();
    let mut starts: Vec<(JobId, u32, FencingToken, SystemTime)> = batch
        .iter()
        .filter_map(|op| match op {
            Op::Start {
                id,
                attempt,
                token,
                at,
                ..
            } if finishes(id) => Some((*id, *attempt, *token, *at)),
            _ => None,
        })
        .collect();
    starts.sort_unstable_by_key(|(id, ..)| *id);
    let start_of = |id: &JobId| {
        starts
            .binary_search_by_key(id, |(id, ..)| *id)
            .ok()
            .map(|found| (starts[found].1, starts[found].2, starts[found].3))
    };
    for op in batch.iter_mut() {
        match op {
            Op::Insert {
                job, reply, found, ..
            } => {
                let inserted = insert(&mut sql, job)?;
                if ack_before_commit && let Some(reply) = reply.take() {
                    // The deliberate bug the crash test must catch.
                    let _ = reply.send(Ok(inserted));
                }
                *found = Some(inserted);
            }
            Op::Start {
                id,
                attempt,
                token,
                at,
                holder,
                ttl,
            } => {
                // A job that also finishes in this batch gets its start
                // columns and history entry from the Finish update: one
                // row write, not two.
                if !finishes(id) {
                    sql.get(Sql::Start)?.execute(params![
                        *attempt,
                        micros(*at),
                        boot,
                        history_entry(JobState::Running, *attempt, *at),
                        token_value(*token),
                        &**holder,
                        ttl.map(|t| i64::try_from(t.as_millis()).unwrap_or(i64::MAX)),
                        id_bytes(*id)
                    ])?;
                }
            }
            Op::Finish {
                id,
                attempt,
                outcome,
                at,
                ..
            } => {
                let state = match outcome {
                    Ok(_) => JobState::Succeeded,
                    Err(e) => e.terminal_state(),
                };
                let (value, kind, message) = outcome_columns(outcome);
                let start = start_of(id);
                let mut history = String::with_capacity(64);
                if let Some((attempt, _, at)) = start {
                    push_history_entry(&mut history, JobState::Running, attempt, at);
                }
                push_history_entry(&mut history, state, *attempt, *at);
                sql.get(Sql::Finish)?.execute(params![
                    state_code(state),
                    micros(*at),
                    value,
                    kind,
                    message,
                    *attempt,
                    start.map(|(_, _, at)| micros(at)),
                    boot,
                    history,
                    start.map(|(_, token, _)| token_value(token)),
                    id_bytes(*id)
                ])?;
            }
            Op::Requeue { ids, at, .. } => {
                for (id, attempt) in ids.iter() {
                    sql.get(Sql::Requeue)?.execute(params![
                        history_entry(JobState::Pending, *attempt, *at),
                        id_bytes(*id)
                    ])?;
                }
            }
            Op::Purge {
                cutoff,
                tombstone_cutoff,
                at,
                limit,
                swept,
                ..
            } => {
                *swept = Some(purge(
                    tx,
                    *cutoff,
                    *tombstone_cutoff,
                    *at,
                    *limit,
                    sweep_from,
                )?);
            }
            Op::Delete { id, at, found, .. } => *found = Some(delete(tx, *id, *at)?),
            Op::Flush { .. } => {}
        }
    }
    Ok(())
}

/// A fencing token as stored (SQLite integers are signed).
fn token_value(token: FencingToken) -> i64 {
    i64::try_from(token.0).unwrap_or(i64::MAX)
}

/// The statements of the hot path, each taken from the connection's cache
/// at most once per batch instead of once per operation: a cache lookup
/// hashes the whole SQL text, and for a short job that was a tenth of the
/// writer's work.
struct Statements<'t> {
    tx: &'t rusqlite::Transaction<'t>,
    prepared: [Option<rusqlite::CachedStatement<'t>>; Sql::COUNT],
}

#[derive(Clone, Copy)]
enum Sql {
    // Keep `Requeue` last: `COUNT` counts up to it.
    FindRequest,
    Insert,
    Start,
    Finish,
    Requeue,
}

/// The hot path's SQL, with the stored state codes written in (as literals,
/// so the partial index on active states serves them).
static SQL_TEXT: LazyLock<[String; Sql::COUNT]> = LazyLock::new(|| {
    use stored_state::{PENDING, RUNNING};
    [
        "SELECT id, fingerprint FROM jobs WHERE request_id = ?1".to_owned(),
        format!(
            "INSERT INTO jobs (id, function, pool, state, args, labels, request_id, \
             fingerprint, submitted_at, attempt, priority, not_before, timeout_us, \
             max_attempts, history, retry_safe, worker_labels) \
             VALUES (?1, ?2, ?3, {PENDING}, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)"
        ),
        format!(
            "UPDATE jobs SET state = {RUNNING}, attempt = ?1, started_at = ?2, boot = ?3, \
             history = history || ?4, lease = ?5, holder = ?6, lease_ttl_ms = ?7 \
             WHERE id = ?8 AND state = {PENDING}"
        ),
        format!(
            "UPDATE jobs SET state = ?1, finished_at = ?2, value = ?3, error_kind = ?4, \
             error = ?5, attempt = MAX(attempt, ?6), \
             started_at = COALESCE(?7, started_at), \
             boot = CASE WHEN ?7 IS NULL THEN boot ELSE ?8 END, \
             history = history || ?9, lease = COALESCE(?10, lease) \
             WHERE id = ?11 AND state IN ({PENDING}, {RUNNING})"
        ),
        format!(
            "UPDATE jobs SET state = {PENDING}, history = history || ?1 \
             WHERE id = ?2 AND state = {RUNNING}"
        ),
    ]
});

impl Sql {
    /// How many there are: one slot each in [`Statements`].
    const COUNT: usize = Self::Requeue as usize + 1;

    fn text(self) -> &'static str {
        &SQL_TEXT[self as usize]
    }
}

impl<'t> Statements<'t> {
    fn new(tx: &'t rusqlite::Transaction<'t>) -> Self {
        Self {
            tx,
            prepared: Default::default(),
        }
    }

    fn get(&mut self, sql: Sql) -> rusqlite::Result<&mut rusqlite::CachedStatement<'t>> {
        let slot = &mut self.prepared[sql as usize];
        if slot.is_none() {
            *slot = Some(self.tx.prepare_cached(sql.text())?);
        }
        Ok(slot.as_mut().expect("prepared just above"))
    }
}

fn insert(sql: &mut Statements<'_>, job: &InsertJob) -> rusqlite::Result<Inserted> {
    let r = &job.record;
    if let Some(request_id) = &r.request_id {
        // The same connection sees rows inserted earlier in this batch, so
        // two concurrent submits with one request id are caught here too.
        let existing = sql
            .get(Sql::FindRequest)?
            .query_row([request_id], |row| {
                let id: Vec<u8> = row.get(0)?;
                let fp: Option<Vec<u8>> = row.get(1)?;
                Ok((id, fp))
            })
            .optional()?;
        if let Some((id, fp)) = existing {
            let mut fingerprint = [0; 16];
            if let Some(fp) = fp.filter(|fp| fp.len() == 16) {
                fingerprint.copy_from_slice(&fp);
            }
            return Ok(Inserted::Existing(RequestEntry {
                job: id_from_bytes(&id)?,
                fingerprint,
            }));
        }
    }
    sql.get(Sql::Insert)?.execute(params![
        id_bytes(r.id),
        &*r.function,
        pool_value(&r.pool),
        json_text(&r.args),
        labels_json(&r.labels),
        r.request_id,
        r.request_id.as_ref().map(|_| job.fingerprint.to_vec()),
        micros(r.submitted_at),
        r.attempt,
        r.priority,
        r.not_before.map(micros),
        r.timeout
            .map(|t| i64::try_from(t.as_micros()).unwrap_or(i64::MAX)),
        (r.max_attempts > 1).then_some(r.max_attempts),
        history_entry(JobState::Pending, r.attempt, r.submitted_at),
        r.retry_safe,
        labels_json(&r.worker_labels),
    ])?;
    Ok(Inserted::New)
}

/// Deletes one job if it is terminal (the `state` condition makes that
/// atomic with the check), with its history, leaving a tombstone stamped
/// `at` that says it was deleted.
fn delete(tx: &rusqlite::Transaction<'_>, id: JobId, at: SystemTime) -> rusqlite::Result<Deleted> {
    use stored_state::{CANCELLED, FAILED, SUCCEEDED};
    let key = id_bytes(id);
    let removed = tx
        .prepare_cached(&format!(
            "DELETE FROM jobs WHERE id = ?1 AND state IN ({SUCCEEDED}, {FAILED}, {CANCELLED})"
        ))?
        .execute([key])?;
    if removed == 1 {
        tx.prepare_cached(&format!(
            "INSERT OR REPLACE INTO tombstones (id, reason, at) VALUES (?1, {TOMBSTONE_DELETED}, ?2)"
        ))?
        .execute(params![key, micros(at)])?;
        return Ok(Deleted::Removed);
    }
    let state: Option<i64> = tx
        .prepare_cached("SELECT state FROM jobs WHERE id = ?1")?
        .query_row([key], |row| row.get(0))
        .optional()?;
    if let Some(code) = state {
        return Ok(Deleted::Unfinished(state_from_code(code)?));
    }
    let reason: Option<i64> = tx
        .prepare_cached("SELECT reason FROM tombstones WHERE id = ?1")?
        .query_row([key], |row| row.get(0))
        .optional()?;
    Ok(Deleted::Missing(
        reason.map_or(Missing::Unknown, |reason| {
            Missing::Gone(gone_from_reason(reason))
        }),
    ))
}

/// How many rows one retention step may look at, per job it may remove.
/// Jobs not expired yet (pending, running, or finished after the cutoff)
/// are stepped over; this bounds how long a step holds the writer when many
/// of them lie ahead.
const SWEEP_ROWS_PER_REMOVAL: usize = 4;

/// One retention step: walks the jobs in id order from where the last step
/// stopped, up to the first id minted after `cutoff`, and removes those
/// finished before `cutoff`, leaving an "expired" tombstone each. It removes
/// at most `limit` and looks at no more than [`SWEEP_ROWS_PER_REMOVAL`] ×
/// `limit` rows; `more` says it stopped short, and `from` keeps its place.
/// It also drops up to `limit` tombstones older than `tombstone_cutoff`.
///
/// Ids are UUIDv7 and a job finishes after it was submitted, so no expired
/// job lies past that first id: the primary key serves retention, and no
/// index on `finished_at` costs every finish a B-tree insert. (A wall clock
/// stepped back between a job's submit and its finish can put it there; it
/// then goes in a later sweep, once the cutoff passes its id.)
fn purge(
    tx: &rusqlite::Transaction<'_>,
    cutoff: SystemTime,
    tombstone_cutoff: SystemTime,
    at: SystemTime,
    limit: usize,
    from: &mut Option<JobId>,
) -> rusqlite::Result<Swept> {
    let scan = limit.saturating_mul(SWEEP_ROWS_PER_REMOVAL);
    let after = from.map_or_else(Vec::new, |id| id_bytes(id).to_vec());
    let rows: Vec<(Vec<u8>, Option<i64>)> = tx
        .prepare_cached(
            "SELECT id, finished_at FROM jobs WHERE id > ?1 AND id < ?2 ORDER BY id LIMIT ?3",
        )?
        .query_map(
            params![
                after,
                first_id_after(cutoff),
                i64::try_from(scan).unwrap_or(i64::MAX)
            ],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )?
        .collect::<Result<_, _>>()?;
    let (cutoff, now) = (micros(cutoff), micros(at));
    // Taken from the cache once per step, not once per removal (the SQL
    // text is formatted and hashed for each lookup).
    let mut remove = tx.prepare_cached("DELETE FROM jobs WHERE id = ?1")?;
    let mut tombstone = tx.prepare_cached(&format!(
        "INSERT OR REPLACE INTO tombstones (id, reason, at) VALUES (?1, {TOMBSTONE_EXPIRED}, ?2)"
    ))?;
    let mut ids = Vec::new();
    let mut last = None;
    for (id, finished_at) in &rows {
        if ids.len() == limit {
            break;
        }
        last = Some(id);
        if finished_at.is_some_and(|at| at < cutoff) {
            remove.execute([id])?;
            tombstone.execute(params![id, now])?;
            ids.push(id_from_bytes(id)?);
        }
    }
    let more = limit > 0 && (rows.len() == scan || ids.len() == limit);
    *from = match last {
        Some(id) if more => Some(id_from_bytes(id)?),
        _ => None,
    };
    tx.prepare_cached(
        "DELETE FROM tombstones WHERE id IN (SELECT id FROM tombstones WHERE at < ?1 LIMIT ?2)",
    )?
    .execute(params![
        micros(tombstone_cutoff),
        i64::try_from(limit).unwrap_or(i64::MAX)
    ])?;
    Ok(Swept { ids, more })
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;
    use crate::{
        function::PoolKind,
        store::sqlite::{codec::parse_history, schema},
    };

    fn new_job(submitted: u64) -> Box<InsertJob> {
        Box::new(InsertJob {
            record: JobRecord {
                max_attempts: 3,
                submitted_at: at(submitted),
                ..JobRecord::pending_for_test("noop", PoolKind::Async)
            },
            fingerprint: [0; 16],
        })
    }

    fn at(us: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_micros(us)
    }

    /// An in-memory database with the whole schema.
    fn migrated_db() -> Connection {
        let mut conn = Connection::open_in_memory().unwrap();
        schema::migrate(&mut conn).unwrap();
        conn
    }

    /// Applies `batches` one transaction each, and returns the job's
    /// history and state as stored.
    fn history_after(batches: Vec<Vec<Op>>, id: JobId) -> (Vec<(JobState, u32, SystemTime)>, i64) {
        let mut conn = migrated_db();
        for mut batch in batches {
            let tx = conn.transaction().unwrap();
            apply_in(&tx, &mut batch, 1, false, &mut None).unwrap();
            tx.commit().unwrap();
        }
        conn.query_row(
            "SELECT history, state FROM jobs WHERE id = ?1",
            [id_bytes(id)],
            |row| Ok((parse_history(&row.get::<_, String>(0)?)?, row.get(1)?)),
        )
        .unwrap()
    }

    fn insert(job: Box<InsertJob>) -> Op {
        Op::Insert {
            job,
            reply: None,
            publish: Publish::new(drop),
            found: None,
        }
    }

    fn start(id: JobId, attempt: u32, us: u64) -> Op {
        Op::Start {
            id,
            attempt,
            token: FencingToken(u64::from(attempt)),
            at: at(us),
            holder: std::sync::Arc::from("test"),
            ttl: None,
        }
    }

    fn finish(id: JobId, attempt: u32, us: u64) -> Op {
        Op::Finish {
            id,
            attempt,
            outcome: Ok(serde_json::json!(1)),
            at: at(us),
            reply: None,
        }
    }

    fn requeue(id: JobId, attempt: u32) -> Op {
        let (reply, _) = oneshot::channel();
        Op::Requeue {
            ids: vec![(id, attempt)],
            at: at(35),
            reply,
        }
    }

    #[test]
    fn a_start_and_finish_in_one_batch_keep_both_transitions() {
        let job = new_job(10);
        let id = job.record.id;
        let (history, state) = history_after(
            vec![vec![insert(job)], vec![start(id, 1, 20), finish(id, 1, 30)]],
            id,
        );
        assert_eq!(
            history,
            [
                (JobState::Pending, 0, at(10)),
                (JobState::Running, 1, at(20)),
                (JobState::Succeeded, 1, at(30)),
            ]
        );
        assert_eq!(state, 3);
    }

    #[test]
    fn a_retry_within_one_batch_keeps_every_transition() {
        let job = new_job(10);
        let id = job.record.id;
        let (history, state) = history_after(
            vec![
                vec![insert(job)],
                vec![
                    start(id, 1, 20),
                    requeue(id, 1),
                    start(id, 2, 40),
                    finish(id, 2, 50),
                ],
            ],
            id,
        );
        let states: Vec<(JobState, u32)> = history.iter().map(|(s, a, _)| (*s, *a)).collect();
        assert_eq!(
            states,
            [
                (JobState::Pending, 0),
                (JobState::Running, 1),
                (JobState::Pending, 1),
                (JobState::Running, 2),
                (JobState::Succeeded, 2),
            ]
        );
        assert_eq!(state, 3);
    }

    /// A job whose id was minted `ms` milliseconds after the epoch; `n`
    /// tells apart ids of one millisecond.
    fn job_minted_at(ms: u64, n: u8) -> Box<InsertJob> {
        let mut bytes = [n; 16];
        bytes[..6].copy_from_slice(&ms.to_be_bytes()[2..]);
        let mut job = new_job(ms * 1000);
        job.record.id = JobId::from(uuid::Uuid::from_bytes(bytes));
        job
    }

    fn apply_batch(
        conn: &mut Connection,
        sweep: &mut Option<JobId>,
        mut batch: Vec<Op>,
    ) -> Vec<Op> {
        let tx = conn.transaction().unwrap();
        apply_in(&tx, &mut batch, 1, false, sweep).unwrap();
        tx.commit().unwrap();
        batch
    }

    /// One retention step with cutoff `cutoff_us`: the ids it removed, and
    /// whether it stopped short.
    fn purge_step(
        conn: &mut Connection,
        sweep: &mut Option<JobId>,
        cutoff_us: u64,
        limit: usize,
    ) -> (Vec<JobId>, bool) {
        let (reply, _) = oneshot::channel();
        let purge = Op::Purge {
            cutoff: at(cutoff_us),
            tombstone_cutoff: UNIX_EPOCH,
            at: at(cutoff_us),
            limit,
            reply,
            swept: None,
        };
        match apply_batch(conn, sweep, vec![purge]).pop() {
            Some(Op::Purge {
                swept: Some(swept), ..
            }) => (swept.ids, swept.more),
            _ => panic!("a purge keeps what it swept"),
        }
    }

    fn stored_ids(conn: &Connection) -> Vec<JobId> {
        conn.prepare("SELECT id FROM jobs ORDER BY id")
            .unwrap()
            .query_map([], |row| id_from_bytes(&row.get::<_, Vec<u8>>(0)?))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    #[test]
    fn retention_steps_over_jobs_not_expired_and_goes_on_where_it_stopped() {
        let mut conn = migrated_db();
        let mut sweep = None;
        let jobs: Vec<Box<InsertJob>> =
            [(100, 1), (110, 2), (120, 3), (130, 4), (140, 5), (600, 6)]
                .into_iter()
                .map(|(ms, n)| job_minted_at(ms, n))
                .collect();
        let id: Vec<JobId> = jobs.iter().map(|job| job.record.id).collect();
        apply_batch(
            &mut conn,
            &mut sweep,
            jobs.into_iter().map(insert).collect(),
        );
        // id[0] stays pending; id[2] finishes after the cutoff (500 ms),
        // id[5] was submitted after it.
        apply_batch(
            &mut conn,
            &mut sweep,
            vec![
                finish(id[1], 1, 120_000),
                finish(id[2], 1, 900_000),
                finish(id[3], 1, 140_000),
                finish(id[4], 1, 150_000),
                finish(id[5], 1, 610_000),
            ],
        );

        // One removal per step: each goes on past the job it removed.
        let mut step = || purge_step(&mut conn, &mut sweep, 500_000, 1);
        assert_eq!(step(), (vec![id[1]], true));
        assert_eq!(step(), (vec![id[3]], true));
        assert_eq!(step(), (vec![id[4]], true));
        assert_eq!(step(), (vec![], false), "the sweep reached the cutoff");
        assert_eq!(step(), (vec![], false), "and starts over, finding none");
        assert_eq!(stored_ids(&conn), [id[0], id[2], id[5]]);
        let expired: i64 = conn
            .query_row(
                &format!("SELECT count(*) FROM tombstones WHERE reason = {TOMBSTONE_EXPIRED}"),
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(expired, 3);
    }

    #[test]
    fn retention_looks_at_no_more_rows_than_its_bound_per_step() {
        let mut conn = migrated_db();
        let mut sweep = None;
        // Nine jobs still pending ahead of one that expired.
        let jobs: Vec<Box<InsertJob>> = (1..=10)
            .map(|n| job_minted_at(100 + u64::from(n), n))
            .collect();
        let expired = jobs[9].record.id;
        apply_batch(
            &mut conn,
            &mut sweep,
            jobs.into_iter().map(insert).collect(),
        );
        apply_batch(&mut conn, &mut sweep, vec![finish(expired, 1, 200_000)]);

        // A limit of 2 looks at 8 rows: all pending, so nothing yet.
        assert_eq!(
            purge_step(&mut conn, &mut sweep, 500_000, 2),
            (vec![], true)
        );
        assert_eq!(
            purge_step(&mut conn, &mut sweep, 500_000, 2),
            (vec![expired], false)
        );
    }

    #[test]
    fn retention_leaves_a_job_minted_after_the_cutoff_for_a_later_sweep() {
        let mut conn = migrated_db();
        let mut sweep = None;
        let job = job_minted_at(600, 1);
        let id = job.record.id;
        apply_batch(&mut conn, &mut sweep, vec![insert(job)]);
        // The wall clock stepped back: it finished "before" it was minted.
        apply_batch(&mut conn, &mut sweep, vec![finish(id, 1, 400_000)]);

        assert_eq!(
            purge_step(&mut conn, &mut sweep, 500_000, 10),
            (vec![], false)
        );
        assert_eq!(
            purge_step(&mut conn, &mut sweep, 700_000, 10),
            (vec![id], false)
        );
    }

    #[test]
    fn a_finish_that_finds_the_job_already_done_records_nothing() {
        let job = new_job(10);
        let id = job.record.id;
        let (history, _) = history_after(
            vec![
                vec![insert(job)],
                vec![start(id, 1, 20), finish(id, 1, 30)],
                vec![finish(id, 1, 40)],
            ],
            id,
        );
        assert_eq!(history.len(), 3, "{history:?}");
    }
}

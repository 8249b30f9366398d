//! The in-memory machinery both embedded stores build on: the job table,
//! one queue per pool (priority with aging, delayed jobs), the event hub,
//! the lease counter and the expiry index of leases that can lapse.
//!
//! The memory store is this machinery alone. The SQLite store keeps it as a
//! cache of live jobs in front of its database, and changes it only after
//! the matching commit (a new job, a terminal state), or before an
//! unawaited write that a crash would undo harmlessly (a claim). Nothing
//! outside the stores reads or writes it.

pub(crate) mod events;
pub(crate) mod queue;
pub(crate) mod table;

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicI64, AtomicU64, Ordering},
    },
    time::SystemTime,
};

use jobd_proto::JobId;

use self::{
    events::EventHub,
    queue::{JobQueue, QueueKey, Rejected},
    table::{CancelPlan, JobTable, Lapsed, WaitFor},
};
use crate::{
    clock::{self, Clock},
    job::{Finished, JobRecord, PoolName, Progress},
    store::{
        ClaimRequest, Claimed, FencingToken, Lease, LeaseState, NewJob, StoreError, StoreOptions,
        Submitted,
    },
};

pub(crate) struct Live {
    pub(crate) table: JobTable,
    /// One queue per pool, fixed when the store opens.
    queues: HashMap<PoolName, JobQueue>,
    pub(crate) events: Arc<EventHub>,
    pub(crate) clock: Clock,
    /// The next fencing token to hand out.
    next_token: AtomicU64,
    /// Leases that can lapse, by expiry. An entry may be stale (the lease
    /// was renewed, or ended): the table decides when it is looked at.
    expiries: Mutex<BTreeMap<(SystemTime, JobId), FencingToken>>,
    /// The latest submission time handed out, in microseconds: each job gets
    /// a later one than the job before, so "submitted after the newest time
    /// I have seen" never misses a job submitted in the same microsecond.
    last_submitted: AtomicI64,
    /// Where coalesced progress reports are flushed from.
    runtime: tokio::runtime::Handle,
}

impl Live {
    /// Machinery for `options`, handing out fencing tokens from
    /// `first_token` on. Call it inside a tokio runtime.
    pub(crate) fn new(options: &StoreOptions, first_token: u64) -> Self {
        let epoch: Arc<str> = Arc::from(JobId::minted_at(options.clock.now()).to_string());
        let events = Arc::new(EventHub::new(options.event_history, epoch));
        Self {
            table: JobTable::new(Arc::clone(&events)),
            queues: options
                .pools
                .iter()
                .map(|pool| {
                    let queue = JobQueue::new(options.max_queued, options.priority_aging);
                    (pool.clone(), queue)
                })
                .collect(),
            events,
            clock: options.clock.clone(),
            next_token: AtomicU64::new(first_token),
            expiries: Mutex::new(BTreeMap::new()),
            last_submitted: AtomicI64::new(0),
            runtime: tokio::runtime::Handle::current(),
        }
    }

    /// The pending record of a new job: a fresh id and a submission time
    /// later than every one before. The id is minted from that time, so ids
    /// and submission times sort alike.
    pub(crate) fn stamp(&self, job: NewJob) -> JobRecord {
        let now = clock::micros(self.clock.now());
        let mut last = self.last_submitted.load(Ordering::Relaxed);
        let at = loop {
            let at = now.max(last + 1);
            match self.last_submitted.compare_exchange_weak(
                last,
                at,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => break at,
                Err(seen) => last = seen,
            }
        };
        let at = clock::from_micros(at);
        job.into_record(JobId::minted_at(at), at)
    }

    fn queue(&self, pool: &PoolName) -> Result<&JobQueue, StoreError> {
        self.queues
            .get(pool)
            .ok_or_else(|| StoreError::Unavailable(format!("no queue for pool {pool:?}")))
    }

    /// Takes a place in the job's pool's queue, or says why not.
    pub(crate) fn reserve(
        &self,
        record: &JobRecord,
    ) -> Result<Result<QueueKey, Submitted>, StoreError> {
        let queue = self.queue(&record.pool)?;
        Ok(
            match queue.reserve(record.priority, record.not_before, record.submitted_at) {
                Ok(key) => Ok(key),
                Err(Rejected::Full) => Err(Submitted::QueueFull {
                    capacity: queue.capacity(),
                }),
                Err(Rejected::Closed) => Err(Submitted::Closed),
            },
        )
    }

    /// Gives back a place that will not be used.
    pub(crate) fn release(&self, pool: &PoolName, key: QueueKey) {
        if let Ok(queue) = self.queue(pool) {
            queue.release(key);
        }
    }

    /// Makes a recorded pending job claimable under `key`: at once, or when
    /// its `not_before` comes.
    pub(crate) fn enqueue(
        &self,
        pool: &PoolName,
        id: JobId,
        key: QueueKey,
        due: Option<SystemTime>,
    ) {
        if let Ok(queue) = self.queue(pool) {
            queue.push(key, id, due, self.clock.now());
        }
    }

    /// Puts back a job recovered at start: a pending one in its queue (a
    /// never-started delayed one waits for its time again; aging counts
    /// from when it was due, across the restart), a finished one as it is.
    pub(crate) fn restore(&self, record: JobRecord, lost: u32) {
        if record.state.is_terminal() {
            self.table.restore(record, None, lost);
            return;
        }
        let Ok(queue) = self.queue(&record.pool) else {
            tracing::error!(id = %record.id, pool = %record.pool, "a recovered job names no known pool; it stays pending");
            self.table.restore(record, None, lost);
            return;
        };
        let due = record.not_before.filter(|_| record.attempt == 0);
        let ready_at = due.map_or(record.submitted_at, |at| at.max(record.submitted_at));
        let key = queue.reserve_again(record.priority, ready_at);
        let id = record.id;
        self.table.restore(record, Some(key), lost);
        queue.push(key, id, due, self.clock.now());
    }

    /// Waits for the next due job of the pool and claims it; `None` once
    /// closed. Cancel-safe: nothing is taken before the poll that returns.
    pub(crate) async fn claim(
        &self,
        request: &ClaimRequest,
    ) -> Result<Option<Claimed>, StoreError> {
        let queue = self.queue(&request.pool)?;
        loop {
            let Some(id) = queue.pop(&self.clock).await else {
                return Ok(None);
            };
            let now = self.clock.now();
            let expires_at = request.ttl.map(|ttl| now + ttl);
            let token = FencingToken(self.next_token.fetch_add(1, Ordering::Relaxed));
            if let Some(claimed) = self
                .table
                .claim(id, token, &request.holder, expires_at, now)
            {
                if let Some(at) = expires_at {
                    self.lock_expiries().insert((at, id), token);
                }
                return Ok(Some(claimed));
            }
            // Cancelled while queued: its slot is free already; take the
            // next one.
        }
    }

    /// Extends a current lease by `ttl` from now.
    pub(crate) fn renew(&self, lease: &Lease, ttl: std::time::Duration) -> LeaseState {
        let expires_at = self.clock.now() + ttl;
        let state = self.table.renew(lease, Some(expires_at));
        if state != LeaseState::Lost {
            self.lock_expiries()
                .insert((expires_at, lease.job), lease.token);
        }
        state
    }

    /// Puts the lease's job back to pending, due at `due`, for its next
    /// attempt. False when the lease is stale.
    pub(crate) fn requeue(&self, lease: &Lease, due: SystemTime) -> bool {
        let Some((pool, priority)) = self.table.view(lease.job, |r| (r.pool.clone(), r.priority))
        else {
            return false;
        };
        let Ok(queue) = self.queue(&pool) else {
            return false;
        };
        // The job was accepted long ago: its place is taken regardless of
        // the queue's bound, as recovery's is.
        let key = queue.reserve_again(priority, due);
        if self.table.requeue(lease, key) {
            queue.push(key, lease.job, Some(due), self.clock.now());
            true
        } else {
            queue.release(key);
            false
        }
    }

    /// Records the running attempt's progress; a report coalesced into the
    /// job's 100 ms window is announced when the window ends.
    pub(crate) fn progress(self: &Arc<Self>, lease: &Lease, fraction: f64, message: &str) {
        let progress = Progress::new(fraction, message, self.clock.now());
        if let Some(due) = self.table.set_progress(lease, progress) {
            let (live, lease) = (Arc::clone(self), lease.clone());
            self.runtime.spawn(async move {
                tokio::time::sleep_until(due).await;
                live.table.flush_progress(&lease);
            });
        }
    }

    /// Records a cancel request; a pending job leaves its queue at once and
    /// is then committing to CANCELLED.
    pub(crate) fn begin_cancel(&self, id: JobId) -> Option<CancelPlan> {
        let plan = self.table.begin_cancel(id)?;
        if let CancelPlan::Pending(pool, Some(key)) = &plan
            && let Ok(queue) = self.queue(pool)
        {
            queue.remove(*key);
        }
        Some(plan)
    }

    /// The leases due to lapse by `now`, oldest first, at most `limit`
    /// (taken out of the index).
    pub(crate) fn expired_leases(
        &self,
        now: SystemTime,
        limit: usize,
    ) -> Vec<(JobId, FencingToken)> {
        let mut expiries = self.lock_expiries();
        let mut due = Vec::new();
        while due.len() < limit {
            match expiries.first_entry() {
                Some(entry) if entry.key().0 <= now => {
                    let ((_, id), token) = entry.remove_entry();
                    due.push((id, token));
                }
                _ => break,
            }
        }
        due
    }

    /// Decides the fate of a job whose lease `token` lapsed by `now` (see
    /// [`Lapsed`]); `None` if it did not lapse after all. A requeued job is
    /// claimable at once.
    pub(crate) fn lapse(&self, id: JobId, token: FencingToken, now: SystemTime) -> Option<Lapsed> {
        let (pool, priority) = self.table.view(id, |r| (r.pool.clone(), r.priority))?;
        let queue = self.queue(&pool).ok()?;
        let key = queue.reserve_again(priority, now);
        let lapsed = self.table.lapse(id, token, now, key);
        match lapsed {
            Some(Lapsed::Requeued) => queue.push(key, id, None, now),
            Some(Lapsed::Failed(_)) | None => queue.release(key),
        }
        lapsed
    }

    /// Waits until the job is terminal; `None` when it is not (or no longer)
    /// in the table.
    pub(crate) async fn wait(&self, id: JobId) -> Option<Finished> {
        loop {
            let notify = match self.table.wait_for(id)? {
                WaitFor::Finished(finished) => return Some(finished),
                WaitFor::Pending(notify) => notify,
            };
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            // The job may have finished (or left) between `wait_for` and
            // `enable`; then look again.
            if self.table.is_terminal(id) != Some(false) {
                continue;
            }
            notified.await;
        }
    }

    /// Stops every queue handing out jobs.
    pub(crate) fn close(&self) {
        for queue in self.queues.values() {
            queue.close();
        }
    }

    /// Jobs waiting in each pool's queue.
    pub(crate) fn queued(&self) -> BTreeMap<PoolName, usize> {
        self.queues
            .iter()
            .map(|(pool, queue)| (pool.clone(), queue.len()))
            .collect()
    }

    fn lock_expiries(
        &self,
    ) -> std::sync::MutexGuard<'_, BTreeMap<(SystemTime, JobId), FencingToken>> {
        // Inserts and removals cannot leave the map half-updated.
        self.expiries.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

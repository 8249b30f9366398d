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
    collections::{BTreeMap, HashMap, HashSet},
    sync::{
        Arc, Mutex, PoisonError, RwLock,
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
        ClaimRequest, Claimed, FencingToken, Lease, LeaseHolder, LeaseState, NewJob, QueueName,
        StoreError, StoreOptions, Submitted,
    },
};

/// The most queues a store keeps (routed pools make one per function and
/// set of worker labels).
pub(crate) const MAX_QUEUES: usize = 4096;

pub(crate) struct Live {
    pub(crate) table: JobTable,
    /// One queue per pool, and per function and worker labels in routed
    /// pools (made when their first job comes).
    queues: RwLock<HashMap<QueueName, Arc<JobQueue>>>,
    /// Pools routed by function and worker labels.
    routed: HashSet<PoolName>,
    /// Each queue's bound, and its aging.
    max_queued: usize,
    priority_aging: std::time::Duration,
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

/// Why there is no queue of a name.
enum QueueMissing {
    /// Not a pool of this store.
    Unknown,
    /// A routed pool's, and there are [`MAX_QUEUES`] already.
    TooMany,
}

impl Live {
    /// Machinery for `options`, handing out fencing tokens from
    /// `first_token` on. Call it inside a tokio runtime.
    pub(crate) fn new(options: &StoreOptions, first_token: u64) -> Self {
        let epoch: Arc<str> = Arc::from(JobId::minted_at(options.clock.now()).to_string());
        let events = Arc::new(EventHub::new(options.event_history, epoch));
        let routed: HashSet<PoolName> = options.routed.iter().cloned().collect();
        let queues = options
            .pools
            .iter()
            .filter(|pool| !routed.contains(*pool))
            .map(|pool| {
                let queue = JobQueue::new(options.max_queued, options.priority_aging);
                (QueueName::pool(pool), Arc::new(queue))
            })
            .collect();
        Self {
            table: JobTable::new(Arc::clone(&events)),
            queues: RwLock::new(queues),
            routed,
            max_queued: options.max_queued,
            priority_aging: options.priority_aging,
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

    /// The queue `record` waits in.
    pub(crate) fn queue_name(&self, record: &JobRecord) -> QueueName {
        if self.routed.contains(&record.pool) {
            QueueName::routed(&record.pool, &record.function, &record.worker_labels)
        } else {
            QueueName::pool(&record.pool)
        }
    }

    /// The queue named `name`, made if it belongs to a routed pool and there
    /// is room for one more.
    fn queue(&self, name: &QueueName) -> Result<Arc<JobQueue>, QueueMissing> {
        if let Some(queue) = self.read_queues().get(name) {
            return Ok(Arc::clone(queue));
        }
        if !self.routed.contains(&PoolName::from(name.pool_name())) {
            return Err(QueueMissing::Unknown);
        }
        let mut queues = self.queues.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(queue) = queues.get(name) {
            return Ok(Arc::clone(queue));
        }
        if queues.len() >= MAX_QUEUES {
            return Err(QueueMissing::TooMany);
        }
        let queue = Arc::new(JobQueue::new(self.max_queued, self.priority_aging));
        // A store that is closing makes its new queues closed too.
        if queues.values().next().is_some_and(|any| any.is_closed()) {
            queue.close();
        }
        queues.insert(name.clone(), Arc::clone(&queue));
        Ok(queue)
    }

    /// The queue of a job that exists already.
    fn queue_of(&self, record: &JobRecord) -> Option<Arc<JobQueue>> {
        self.queue(&self.queue_name(record)).ok()
    }

    /// Takes a place in the job's queue, or says why not.
    pub(crate) fn reserve(
        &self,
        record: &JobRecord,
    ) -> Result<Result<QueueKey, Submitted>, StoreError> {
        let queue = match self.queue(&self.queue_name(record)) {
            Ok(queue) => queue,
            Err(QueueMissing::TooMany) => {
                return Ok(Err(Submitted::TooManyQueues { max: MAX_QUEUES }));
            }
            Err(QueueMissing::Unknown) => {
                return Err(StoreError::Unavailable(format!(
                    "no queue for pool {:?}",
                    record.pool.as_str()
                )));
            }
        };
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
    pub(crate) fn release(&self, queue: &QueueName, key: QueueKey) {
        if let Ok(queue) = self.queue(queue) {
            queue.release(key);
        }
    }

    /// Makes a recorded pending job claimable under `key`: at once, or when
    /// its `not_before` comes.
    pub(crate) fn enqueue(
        &self,
        queue: &QueueName,
        id: JobId,
        key: QueueKey,
        due: Option<SystemTime>,
    ) {
        if let Ok(queue) = self.queue(queue) {
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
        let Some(queue) = self.queue_of(&record) else {
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

    /// Puts back a job that was running at the restart under a lease that
    /// outlives the process (a remote worker's): still running, under the
    /// same token, until the lease lapses `ttl` from now unless its holder
    /// renews it.
    pub(crate) fn restore_running(
        &self,
        record: JobRecord,
        lost: u32,
        token: FencingToken,
        holder: LeaseHolder,
        ttl: std::time::Duration,
    ) {
        let id = record.id;
        let expires_at = self.clock.now() + ttl;
        self.table
            .restore_running(record, lost, token, holder, expires_at);
        self.lock_expiries().insert((expires_at, id), token);
    }

    /// Waits for the next due job of the queue and claims it; `None` once
    /// closed. Cancel-safe: nothing is taken before the poll that returns.
    pub(crate) async fn claim(
        &self,
        request: &ClaimRequest,
    ) -> Result<Option<Claimed>, StoreError> {
        let queue = self.queue(&request.queue).map_err(|_| {
            StoreError::Unavailable(format!("no queue {:?}", request.queue.as_str()))
        })?;
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
    /// attempt. False when the lease is not current.
    pub(crate) fn requeue(&self, lease: &Lease, due: SystemTime) -> bool {
        let Some((Some(queue), priority)) = self
            .table
            .view(lease.job, |r| (self.queue_of(r), r.priority))
        else {
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
        let queue = self.table.view(id, |r| self.queue_of(r)).flatten();
        let plan = self.table.begin_cancel(id)?;
        if let (CancelPlan::Pending(Some(key)), Some(queue)) = (&plan, queue) {
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
        let (queue, priority) = self.table.view(id, |r| (self.queue_of(r), r.priority))?;
        let queue = queue?;
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
        for queue in self.read_queues().values() {
            queue.close();
        }
    }

    /// Jobs waiting in each queue.
    pub(crate) fn queued(&self) -> BTreeMap<QueueName, usize> {
        self.read_queues()
            .iter()
            .map(|(name, queue)| (name.clone(), queue.len()))
            .collect()
    }

    fn read_queues(&self) -> std::sync::RwLockReadGuard<'_, HashMap<QueueName, Arc<JobQueue>>> {
        // Inserts cannot leave the map half-updated.
        self.queues.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn lock_expiries(
        &self,
    ) -> std::sync::MutexGuard<'_, BTreeMap<(SystemTime, JobId), FencingToken>> {
        // Inserts and removals cannot leave the map half-updated.
        self.expiries.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

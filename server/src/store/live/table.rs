//! The job table: every job a store holds in memory, with what only exists
//! while a job lives (its lease while running, its waiters while
//! unfinished, its place in its pool's queue while pending).
//!
//! Terminal transitions happen in two steps so that a durable store can
//! write them to disk in between: `begin_*` decides the transition under the
//! job's shard lock and marks it `committing` (nothing else may change the
//! job), `complete` makes it visible and wakes waiters. "Durable before
//! visible."
//!
//! Invariants kept here, under each job's shard lock:
//! - a terminal state never changes again;
//! - a write about an attempt must carry the job's current fencing token
//!   (handed out by the claim); an older one is refused;
//! - waiters are woken after the terminal state is written, never before;
//! - every visible change (a new pending job, a claim, a retry, a terminal
//!   state, a progress report) is published to the event hub after it is
//!   written and before the shard lock is released, so one job's events are
//!   numbered in the order of its changes.

use std::{
    cmp::Reverse,
    collections::{BTreeMap, BinaryHeap, VecDeque},
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, SystemTime},
};

use dashmap::{DashMap, mapref::entry::Entry};
use jobd_proto::{JobId, JobState};
use tokio::sync::Notify;

use super::{events::EventHub, queue::QueueKey};
use crate::{
    job::{Finished, JobError, JobRecord, Outcome, PoolName, Progress},
    store::{Claimed, EventKind, Fenced, FencingToken, Lease, LeaseHolder, LeaseState, ListFilter},
};

struct Slot {
    record: JobRecord,
    /// Where the job waits in its pool's queue, while pending.
    queue_key: Option<QueueKey>,
    /// The running attempt's lease.
    lease: Option<Held>,
    /// A cancel was requested for the running attempt.
    cancel_requested: bool,
    /// Created by the first waiter; woken and dropped when the job finishes.
    waiters: Option<Arc<Notify>>,
    /// A terminal transition is being made durable; the job is frozen.
    committing: bool,
    /// When the job's last progress event was published.
    progress_announced: Option<tokio::time::Instant>,
    /// A progress report is recorded but not announced yet (a flush is
    /// due).
    progress_unannounced: bool,
    /// Leases of this job that lapsed in a row (its poison-pill count).
    lost: u32,
    /// The token of the last lease whose end (an outcome, a retry, a give
    /// back) was recorded: the same report again is a repeat, not stale.
    settled: Option<FencingToken>,
}

/// A lease as the table keeps it.
#[derive(Debug, Clone)]
struct Held {
    token: FencingToken,
    holder: LeaseHolder,
    expires_at: Option<SystemTime>,
}

/// At most one progress event per job per this interval: a job reporting in
/// a tight loop cannot flood watchers or the event history.
pub(crate) const PROGRESS_INTERVAL: Duration = Duration::from_millis(100);

/// What a cancel request found. For `Pending` the job is now committing to
/// `CANCELLED`; the caller completes it.
pub(crate) enum CancelPlan {
    /// Pending: its queue slot, if it holds one, is the caller's to free.
    Pending(Option<QueueKey>),
    /// Running: the request is recorded.
    Running {
        lease: Lease,
        holder: LeaseHolder,
        pool: PoolName,
    },
    AlreadyDone,
}

/// Either the finished job or how to hear about it.
pub(crate) enum WaitFor {
    Finished(Finished),
    Pending(Arc<Notify>),
}

/// A request id's first job and the fingerprint of what it asked for.
#[derive(Clone, Copy)]
pub(crate) struct RequestEntry {
    pub(crate) job: JobId,
    pub(crate) fingerprint: [u8; 16],
}

/// What a lapsed lease's job becomes.
pub(crate) enum Lapsed {
    /// Pending again for its next attempt.
    Requeued,
    /// Failed: not safe to retry, or a poison pill; the caller completes it
    /// with this error (it is committing now).
    Failed(JobError),
}

/// Attempts of one job lost in a row (to crashes of the server, or to
/// holders that vanished) before it is failed as a poison pill.
pub const POISON_LIMIT: u32 = 3;

/// What an attempt was lost to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LostTo {
    /// The server stopped (crashed) while the job ran.
    Restart,
    /// The lease lapsed: its holder vanished.
    Holder,
}

/// The fate of a job whose attempt was just lost, the `lost`-th in a row:
/// `None` to run it again, or why it fails (as [`JobError::Interrupted`]): a
/// poison pill, or a function registered as not safe to retry.
pub(crate) fn lost_attempt(lost: u32, retry_safe: bool, to: LostTo) -> Option<String> {
    let message = if lost >= POISON_LIMIT {
        match to {
            LostTo::Restart => {
                format!("poison pill: the server died {lost} times in a row while running this job")
            }
            LostTo::Holder => format!("poison pill: lost its worker {lost} times in a row"),
        }
    } else if !retry_safe {
        match to {
            LostTo::Restart => {
                "interrupted by restart; the function is registered as not safe to retry".into()
            }
            LostTo::Holder => {
                "its worker was lost; the function is registered as not safe to retry".into()
            }
        }
    } else {
        return None;
    };
    Some(message)
}

pub(crate) struct JobTable {
    /// Boxed: a slot is a few hundred bytes, and the hash table's spare
    /// capacity (up to half of it just after growing) would otherwise hold
    /// that much per empty bucket, and every growth would move every slot.
    jobs: DashMap<JobId, Box<Slot>>,
    /// Request ids of the jobs in memory (used for idempotency when there is
    /// no durable store to ask).
    requests: DashMap<String, RequestEntry>,
    /// Terminal jobs in the order they finished: what retention and the
    /// finished-job cache evict from.
    finished: Mutex<VecDeque<(SystemTime, JobId)>>,
    /// Where visible changes are announced to watchers.
    events: Arc<EventHub>,
}

impl JobTable {
    pub(crate) fn new(events: Arc<EventHub>) -> Self {
        Self {
            jobs: DashMap::new(),
            requests: DashMap::new(),
            finished: Mutex::new(VecDeque::new()),
            events,
        }
    }

    /// Records a new job, unless its request id is already taken; then the
    /// existing entry is returned and nothing is recorded.
    pub(crate) fn insert(
        &self,
        record: JobRecord,
        queue_key: QueueKey,
        fingerprint: [u8; 16],
    ) -> Result<(), RequestEntry> {
        if let Some(request_id) = &record.request_id {
            match self.requests.entry(request_id.clone()) {
                Entry::Occupied(existing) => return Err(*existing.get()),
                Entry::Vacant(vacant) => {
                    vacant.insert(RequestEntry {
                        job: record.id,
                        fingerprint,
                    });
                }
            }
        }
        self.put(record, Some(queue_key), 0, true);
        Ok(())
    }

    /// Records a job whose request id was already checked (by a durable
    /// store).
    pub(crate) fn insert_unchecked(&self, record: JobRecord, queue_key: QueueKey) {
        self.put(record, Some(queue_key), 0, true);
    }

    /// Puts back a job recovered at start, with the leases it lost in a row
    /// so far. Not announced: it is not a change, and no watcher can be
    /// connected yet.
    pub(crate) fn restore(&self, record: JobRecord, queue_key: Option<QueueKey>, lost: u32) {
        self.put(record, queue_key, lost, false);
    }

    fn put(&self, record: JobRecord, queue_key: Option<QueueKey>, lost: u32, announce: bool) {
        let id = record.id;
        if let Some(finished_at) = record.finished_at.filter(|_| record.state.is_terminal()) {
            self.lock_finished().push_back((finished_at, id));
        }
        let slot = self.jobs.entry(id).insert(Box::new(Slot {
            record,
            queue_key,
            lease: None,
            cancel_requested: false,
            waiters: None,
            committing: false,
            progress_announced: None,
            progress_unannounced: false,
            lost,
            settled: None,
        }));
        if announce {
            self.events.publish(&slot.record, EventKind::State);
        }
    }

    /// Reads a job without cloning more than `read` takes.
    pub(crate) fn view<R>(&self, id: JobId, read: impl FnOnce(&JobRecord) -> R) -> Option<R> {
        self.jobs.get(&id).map(|slot| read(&slot.record))
    }

    /// Pending -> Running for the next attempt under a new lease; `None` if
    /// the job is gone or no longer pending (it was cancelled while queued).
    pub(crate) fn claim(
        &self,
        id: JobId,
        token: FencingToken,
        holder: &LeaseHolder,
        expires_at: Option<SystemTime>,
        now: SystemTime,
    ) -> Option<Claimed> {
        let mut slot = self.jobs.get_mut(&id)?;
        if slot.record.state != JobState::Pending || slot.committing {
            return None;
        }
        slot.queue_key = None;
        slot.cancel_requested = false;
        slot.lease = Some(Held {
            token,
            holder: Arc::clone(holder),
            expires_at,
        });
        let record = &mut slot.record;
        record.state = JobState::Running;
        record.attempt += 1;
        record.started_at = Some(now);
        // Progress belongs to an attempt.
        record.progress = None;
        self.events.publish(record, EventKind::State);
        Some(Claimed {
            lease: Lease {
                job: id,
                attempt: record.attempt,
                token,
                expires_at,
            },
            started_at: now,
            function: Arc::clone(&record.function),
            args: record.args.clone(),
            timeout: record.timeout,
            max_attempts: record.max_attempts,
            retry_safe: record.retry_safe,
        })
    }

    /// Runs `change` on the slot if `lease` is its current lease and the job
    /// runs and is not committing its end; `None` otherwise (stale).
    fn with_current<R>(&self, lease: &Lease, change: impl FnOnce(&mut Slot) -> R) -> Option<R> {
        let mut slot = self.jobs.get_mut(&lease.job)?;
        let current = slot.record.state == JobState::Running
            && !slot.committing
            && slot
                .lease
                .as_ref()
                .is_some_and(|held| held.token == lease.token);
        current.then(|| change(&mut slot))
    }

    /// Runs `then` while `lease` is current, holding it so (no end of the
    /// attempt can be decided meanwhile); `None` when it is not current.
    pub(crate) fn while_current<R>(&self, lease: &Lease, then: impl FnOnce() -> R) -> Option<R> {
        self.with_current(lease, |_| then())
    }

    /// Extends a current lease to `expires_at`.
    pub(crate) fn renew(&self, lease: &Lease, expires_at: Option<SystemTime>) -> LeaseState {
        self.with_current(lease, |slot| {
            if let Some(held) = &mut slot.lease {
                held.expires_at = expires_at;
            }
            if slot.cancel_requested {
                LeaseState::CancelRequested { expires_at }
            } else {
                LeaseState::Live { expires_at }
            }
        })
        .unwrap_or(LeaseState::Lost)
    }

    /// Running -> Pending for another attempt, held under `key`. False when
    /// the lease is stale.
    pub(crate) fn requeue(&self, lease: &Lease, key: QueueKey) -> bool {
        self.with_current(lease, |slot| {
            slot.settled = Some(lease.token);
            self.back_to_pending(slot, key);
        })
        .is_some()
    }

    /// What a write with a lease that is not current amounts to: a repeat
    /// when that lease's end was recorded already (the same report sent
    /// again), else stale.
    pub(crate) fn not_current(&self, lease: &Lease) -> Fenced {
        let repeated = self
            .jobs
            .get(&lease.job)
            .is_some_and(|slot| slot.settled == Some(lease.token));
        if repeated {
            Fenced::Repeated
        } else {
            Fenced::Stale
        }
    }

    /// Puts back a job recovered at start that is still running under a
    /// lease that outlives the process. Not announced, as `restore`.
    pub(crate) fn restore_running(
        &self,
        record: JobRecord,
        lost: u32,
        token: FencingToken,
        holder: LeaseHolder,
        expires_at: SystemTime,
    ) {
        let id = record.id;
        self.put(record, None, lost, false);
        if let Some(mut slot) = self.jobs.get_mut(&id) {
            slot.lease = Some(Held {
                token,
                holder,
                expires_at: Some(expires_at),
            });
        }
    }

    /// A running job's attempt ends without an outcome: pending again,
    /// waiting under `key`.
    fn back_to_pending(&self, slot: &mut Slot, key: QueueKey) {
        slot.record.state = JobState::Pending;
        slot.record.started_at = None;
        slot.lease = None;
        slot.cancel_requested = false;
        slot.queue_key = Some(key);
        self.events.publish(&slot.record, EventKind::State);
    }

    /// Records a running attempt's progress report (a stale lease's is
    /// dropped). Announced at once unless the job's last progress event is
    /// less than [`PROGRESS_INTERVAL`] old; then it is coalesced, and when
    /// this returns a time the caller must call [`Self::flush_progress`]
    /// then (one pending flush per job at most).
    pub(crate) fn set_progress(
        &self,
        lease: &Lease,
        progress: Progress,
    ) -> Option<tokio::time::Instant> {
        self.with_current(lease, |slot| {
            slot.record.progress = Some(progress);
            let now = tokio::time::Instant::now();
            match slot.progress_announced {
                Some(last) if now.duration_since(last) < PROGRESS_INTERVAL => {
                    if slot.progress_unannounced {
                        return None;
                    }
                    slot.progress_unannounced = true;
                    Some(last + PROGRESS_INTERVAL)
                }
                _ => {
                    slot.progress_announced = Some(now);
                    self.events.publish(&slot.record, EventKind::Progress);
                    None
                }
            }
        })
        .flatten()
    }

    /// Announces a coalesced progress report, if the attempt still runs.
    pub(crate) fn flush_progress(&self, lease: &Lease) {
        self.with_current(lease, |slot| {
            if slot.progress_unannounced {
                slot.progress_unannounced = false;
                slot.progress_announced = Some(tokio::time::Instant::now());
                self.events.publish(&slot.record, EventKind::Progress);
            }
        });
    }

    /// Starts the terminal transition of `lease`'s attempt. False when the
    /// lease is stale (the job is not running, is committing another end,
    /// or runs under a newer lease): the outcome is then dropped.
    pub(crate) fn begin_finish(&self, lease: &Lease) -> bool {
        self.with_current(lease, |slot| {
            slot.committing = true;
            slot.settled = Some(lease.token);
        })
        .is_some()
    }

    /// Records a cancel request: a pending job starts committing to
    /// CANCELLED; a running one is marked; `None` if the job is not here.
    pub(crate) fn begin_cancel(&self, id: JobId) -> Option<CancelPlan> {
        let mut slot = self.jobs.get_mut(&id)?;
        if slot.committing || slot.record.state.is_terminal() {
            return Some(CancelPlan::AlreadyDone);
        }
        let plan = match (slot.record.state, slot.lease.clone()) {
            (JobState::Running, Some(held)) => {
                slot.cancel_requested = true;
                CancelPlan::Running {
                    lease: Lease {
                        job: id,
                        attempt: slot.record.attempt,
                        token: held.token,
                        expires_at: held.expires_at,
                    },
                    holder: held.holder,
                    pool: slot.record.pool.clone(),
                }
            }
            _ => {
                slot.committing = true;
                CancelPlan::Pending(slot.queue_key.take())
            }
        };
        Some(plan)
    }

    /// A running job whose lease `token` may have lapsed by `now`: decides
    /// its fate (see [`Lapsed`]); `None` if that lease is no longer current
    /// or was renewed past `now`. A job that runs again waits under `key`,
    /// which the caller reserved (and gives back otherwise).
    pub(crate) fn lapse(
        &self,
        id: JobId,
        token: FencingToken,
        now: SystemTime,
        key: QueueKey,
    ) -> Option<Lapsed> {
        let mut slot = self.jobs.get_mut(&id)?;
        let lapsed = slot.record.state == JobState::Running
            && !slot.committing
            && slot.lease.as_ref().is_some_and(|held| {
                held.token == token && held.expires_at.is_some_and(|at| at <= now)
            });
        if !lapsed {
            return None;
        }
        slot.lost += 1;
        if let Some(reason) = lost_attempt(slot.lost, slot.record.retry_safe, LostTo::Holder) {
            slot.committing = true;
            return Some(Lapsed::Failed(JobError::WorkerLost(reason)));
        }
        self.back_to_pending(&mut slot, key);
        Some(Lapsed::Requeued)
    }

    /// Makes a begun terminal transition visible and wakes the waiters.
    pub(crate) fn complete(&self, id: JobId, outcome: Outcome, finished_at: SystemTime) {
        let Some(mut slot) = self.jobs.get_mut(&id) else {
            return;
        };
        let waiters = terminate(&mut slot, outcome, finished_at);
        self.events.publish(&slot.record, EventKind::State);
        drop(slot);
        self.lock_finished().push_back((finished_at, id));
        wake(waiters);
    }

    /// Lets a job whose terminal write failed be changed again (the store
    /// is failing-stop anyway; this keeps the table honest).
    pub(crate) fn abandon(&self, id: JobId) {
        if let Some(mut slot) = self.jobs.get_mut(&id) {
            slot.committing = false;
        }
    }

    pub(crate) fn wait_for(&self, id: JobId) -> Option<WaitFor> {
        let mut slot = self.jobs.get_mut(&id)?;
        if let Some(finished) = finished(&slot.record) {
            return Some(WaitFor::Finished(finished));
        }
        let notify = slot.waiters.get_or_insert_with(|| Arc::new(Notify::new()));
        Some(WaitFor::Pending(Arc::clone(notify)))
    }

    /// `Some(true)` once terminal; `None` if the job left the table.
    pub(crate) fn is_terminal(&self, id: JobId) -> Option<bool> {
        self.view(id, |r| r.state.is_terminal())
    }

    /// Removes terminal jobs that finished before `cutoff`, oldest first, at
    /// most `limit`; and, beyond that, the oldest terminal jobs while more
    /// than `keep` are held. Returns the removed ids. Waiters of a removed
    /// job are woken (they then find it gone, never hang).
    pub(crate) fn evict_finished(
        &self,
        cutoff: SystemTime,
        keep: usize,
        limit: usize,
    ) -> Vec<JobId> {
        let mut removed = Vec::new();
        let mut order = self.lock_finished();
        while removed.len() < limit {
            let Some(&(finished_at, id)) = order.front() else {
                break;
            };
            if finished_at >= cutoff && order.len() <= keep {
                break;
            }
            order.pop_front();
            if self.forget(id) {
                removed.push(id);
            }
        }
        removed
    }

    /// Forgets one terminal job (it was deleted or expired); false if it is
    /// not here or not terminal.
    pub(crate) fn forget(&self, id: JobId) -> bool {
        let Some((_, slot)) = self
            .jobs
            .remove_if(&id, |_, slot| slot.record.state.is_terminal())
        else {
            return false;
        };
        // The job's shard lock is released by now: `insert` takes the
        // request map's lock before the job map's, so never the reverse.
        if let Some(request_id) = &slot.record.request_id {
            self.requests
                .remove_if(request_id, |_, entry| entry.job == id);
        }
        wake(slot.waiters);
        true
    }

    /// The state of a job that is here.
    pub(crate) fn state(&self, id: JobId) -> Option<JobState> {
        self.view(id, |r| r.state)
    }

    /// The newest `limit` jobs matching `filter` with ids below `before`,
    /// newest first. One pass over the table keeping a heap of at most
    /// `limit` candidates, so a page costs O(jobs held), and a record is
    /// cloned only when it enters the heap.
    pub(crate) fn list(
        &self,
        filter: &ListFilter,
        before: Option<JobId>,
        limit: usize,
    ) -> Vec<JobRecord> {
        let mut newest: BinaryHeap<Reverse<ById>> = BinaryHeap::with_capacity(limit + 1);
        for slot in &self.jobs {
            let record = &slot.record;
            if before.is_some_and(|before| record.id >= before) || !filter.matches(record) {
                continue;
            }
            if newest.len() == limit
                && newest
                    .peek()
                    .is_some_and(|Reverse(oldest)| oldest.0.id > record.id)
            {
                continue;
            }
            newest.push(Reverse(ById(record.clone())));
            if newest.len() > limit {
                newest.pop();
            }
        }
        // Ascending by `Reverse` is descending by id: newest first.
        newest
            .into_sorted_vec()
            .into_iter()
            .map(|Reverse(ById(record))| record)
            .collect()
    }

    pub(crate) fn len(&self) -> usize {
        self.jobs.len()
    }

    /// Jobs per state, for tests and gauges.
    pub(crate) fn counts(&self) -> BTreeMap<&'static str, usize> {
        let mut counts = BTreeMap::new();
        for slot in &self.jobs {
            *counts.entry(slot.record.state.as_str()).or_default() += 1;
        }
        counts
    }

    fn lock_finished(&self) -> std::sync::MutexGuard<'_, VecDeque<(SystemTime, JobId)>> {
        // Pushes and pops cannot leave the deque half-updated.
        self.finished.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A record ordered by its id alone, for the listing heap.
struct ById(JobRecord);

impl PartialEq for ById {
    fn eq(&self, other: &Self) -> bool {
        self.0.id == other.0.id
    }
}

impl Eq for ById {}

impl PartialOrd for ById {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for ById {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.id.cmp(&other.0.id)
    }
}

fn terminate(slot: &mut Slot, outcome: Outcome, finished_at: SystemTime) -> Option<Arc<Notify>> {
    let record = &mut slot.record;
    record.state = match &outcome {
        Ok(_) => JobState::Succeeded,
        Err(err) => err.terminal_state(),
    };
    record.finished_at = Some(finished_at);
    record.outcome = Some(outcome);
    slot.queue_key = None;
    slot.lease = None;
    slot.committing = false;
    slot.waiters.take()
}

fn wake(waiters: Option<Arc<Notify>>) {
    if let Some(waiters) = waiters {
        waiters.notify_waiters();
    }
}

pub(crate) fn finished(record: &JobRecord) -> Option<Finished> {
    let outcome = record.outcome.as_ref()?;
    Some(Finished {
        state: record.state,
        outcome: outcome.clone(),
    })
}

//! The live job table: every job the server holds in memory, with the handles
//! that only exist while a job lives (its cancel token while running, its
//! waiters while unfinished).
//!
//! Terminal transitions happen in two steps so that a durable store can write
//! them to disk in between: `begin_*` decides the transition under the job's
//! shard lock and marks it `committing` (nothing else may change the job),
//! `complete` makes it visible and wakes waiters. "Durable before visible."
//!
//! Invariants kept here, under each job's shard lock:
//! - a terminal state never changes again;
//! - a completion carrying a stale attempt number is ignored;
//! - waiters are woken after the terminal state is written, never before;
//! - every visible change (a new pending job, a claim, a retry, a terminal
//!   state, a progress report) is published to the event hub after it is
//!   written and before the shard lock is released, so one job's events are
//!   numbered in the order of its changes.

use std::{
    cmp::Reverse,
    collections::{BTreeMap, BinaryHeap, VecDeque},
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant, SystemTime},
};

use dashmap::{DashMap, mapref::entry::Entry};
use jobd_proto::{JobId, JobState};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::{
    engine::{EventHub, EventKind, ListFilter, QueueKey},
    function::PoolKind,
    job::{Finished, JobError, JobRecord, Outcome, Progress},
};

struct Slot {
    record: JobRecord,
    /// Where the job waits in its pool's queue, while pending.
    queue_key: Option<QueueKey>,
    /// Fired to cancel the running attempt.
    cancel: Option<CancellationToken>,
    /// Created by the first waiter; woken and dropped when the job finishes.
    waiters: Option<Arc<Notify>>,
    /// A terminal transition is being made durable; the job is frozen.
    committing: bool,
    /// When the job's last progress event was published.
    progress_announced: Option<Instant>,
    /// A progress report is recorded but not announced yet (a flush is
    /// due).
    progress_unannounced: bool,
}

/// At most one progress event per job per this interval: a job reporting in
/// a tight loop cannot flood watchers or the event history.
pub(crate) const PROGRESS_INTERVAL: Duration = Duration::from_millis(100);

/// What a worker needs to run an attempt it has claimed.
pub(crate) struct Claim {
    pub(crate) function: Arc<str>,
    pub(crate) args: serde_json::Value,
    pub(crate) attempt: u32,
    pub(crate) started_at: SystemTime,
    pub(crate) cancel: CancellationToken,
    pub(crate) timeout: Option<std::time::Duration>,
    pub(crate) max_attempts: u32,
    pub(crate) priority: i32,
}

/// What a cancel request found. For `Pending` and `AbortAsync` the job is now
/// committing to `CANCELLED`; the caller completes it.
pub(crate) enum CancelPlan {
    Pending(PoolKind, Option<QueueKey>),
    AbortAsync,
    RequestBlocking,
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
        queue_key: Option<QueueKey>,
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
        self.insert_unchecked(record, queue_key);
        Ok(())
    }

    /// Records a job whose request id was already checked (by a durable
    /// store), or that was recovered from one.
    pub(crate) fn insert_unchecked(&self, record: JobRecord, queue_key: Option<QueueKey>) {
        self.put(record, queue_key, true);
    }

    /// Puts back a job recovered at start. Not announced: it is not a
    /// change, and no watcher can be connected yet.
    pub(crate) fn restore(&self, record: JobRecord, queue_key: Option<QueueKey>) {
        self.put(record, queue_key, false);
    }

    fn put(&self, record: JobRecord, queue_key: Option<QueueKey>, announce: bool) {
        let id = record.id;
        if let Some(finished_at) = record.finished_at.filter(|_| record.state.is_terminal()) {
            self.lock_finished().push_back((finished_at, id));
        }
        let slot = self.jobs.entry(id).insert(Box::new(Slot {
            record,
            queue_key,
            cancel: None,
            waiters: None,
            committing: false,
            progress_announced: None,
            progress_unannounced: false,
        }));
        if announce {
            self.events.publish(&slot.record, EventKind::State);
        }
    }

    /// Reads a job without cloning more than `read` takes.
    pub(crate) fn view<R>(&self, id: JobId, read: impl FnOnce(&JobRecord) -> R) -> Option<R> {
        self.jobs.get(&id).map(|slot| read(&slot.record))
    }

    /// Pending -> Running for the next attempt; `None` if the job is gone or
    /// no longer pending (it was cancelled while queued).
    pub(crate) fn claim(&self, id: JobId) -> Option<Claim> {
        let mut slot = self.jobs.get_mut(&id)?;
        if slot.record.state != JobState::Pending || slot.committing {
            return None;
        }
        let cancel = CancellationToken::new();
        let started_at = SystemTime::now();
        slot.queue_key = None;
        slot.cancel = Some(cancel.clone());
        let record = &mut slot.record;
        record.state = JobState::Running;
        record.attempt += 1;
        record.started_at = Some(started_at);
        // Progress belongs to an attempt.
        record.progress = None;
        self.events.publish(record, EventKind::State);
        Some(Claim {
            function: Arc::clone(&record.function),
            args: record.args.clone(),
            attempt: record.attempt,
            started_at,
            cancel,
            timeout: record.timeout,
            max_attempts: record.max_attempts,
            priority: record.priority,
        })
    }

    /// Running -> Pending for another attempt after a retryable failure,
    /// held under `key`. False when the attempt is stale or the job is
    /// already ending (cancelled, aborted, timed out, stopped).
    pub(crate) fn retry(&self, id: JobId, attempt: u32, key: QueueKey) -> bool {
        let Some(mut slot) = self.jobs.get_mut(&id) else {
            return false;
        };
        if slot.record.state != JobState::Running
            || slot.committing
            || slot.record.attempt != attempt
        {
            return false;
        }
        slot.record.state = JobState::Pending;
        slot.record.started_at = None;
        slot.cancel = None;
        slot.queue_key = Some(key);
        self.events.publish(&slot.record, EventKind::State);
        true
    }

    /// Records a running attempt's progress report (a stale attempt's, or
    /// one for a job no longer running, is dropped). Announced at once
    /// unless the job's last progress event is less than
    /// [`PROGRESS_INTERVAL`] old; then it is coalesced, and when this
    /// returns a time the caller must call [`Self::flush_progress`] then
    /// (one pending flush per job at most).
    pub(crate) fn set_progress(
        &self,
        id: JobId,
        attempt: u32,
        progress: Progress,
    ) -> Option<Instant> {
        let mut slot = self.jobs.get_mut(&id)?;
        if slot.record.state != JobState::Running
            || slot.committing
            || slot.record.attempt != attempt
        {
            return None;
        }
        slot.record.progress = Some(progress);
        let now = Instant::now();
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
    }

    /// Announces a coalesced progress report, if the attempt still runs.
    pub(crate) fn flush_progress(&self, id: JobId, attempt: u32) {
        let Some(mut slot) = self.jobs.get_mut(&id) else {
            return;
        };
        if !slot.progress_unannounced {
            return;
        }
        slot.progress_unannounced = false;
        if slot.record.state == JobState::Running
            && !slot.committing
            && slot.record.attempt == attempt
        {
            slot.progress_announced = Some(Instant::now());
            self.events.publish(&slot.record, EventKind::Progress);
        }
    }

    /// Whether the job carries every one of `labels`; `None` if it is not in
    /// memory.
    pub(crate) fn has_labels(&self, id: JobId, labels: &BTreeMap<String, String>) -> Option<bool> {
        self.view(id, |record| {
            labels
                .iter()
                .all(|(key, value)| record.labels.get(key) == Some(value))
        })
    }

    /// Starts the terminal transition of `attempt`. False when the job is
    /// not running (terminal, or pending again after a retry), committing
    /// (e.g. it was aborted), or the attempt is stale: the outcome is then
    /// dropped.
    pub(crate) fn begin_finish(&self, id: JobId, attempt: u32) -> bool {
        let Some(mut slot) = self.jobs.get_mut(&id) else {
            return false;
        };
        // Only a running attempt can end: the outcome of an attempt that was
        // already put back to pending for a retry (a blocking job's timeout
        // watchdog racing its own retry) is as stale as an older attempt's.
        if slot.record.state != JobState::Running
            || slot.committing
            || slot.record.attempt != attempt
        {
            return false;
        }
        slot.committing = true;
        true
    }

    pub(crate) fn begin_cancel(&self, id: JobId) -> Option<CancelPlan> {
        let mut slot = self.jobs.get_mut(&id)?;
        if slot.committing || slot.record.state.is_terminal() {
            return Some(CancelPlan::AlreadyDone);
        }
        let plan = match slot.record.state {
            JobState::Pending => {
                slot.committing = true;
                CancelPlan::Pending(slot.record.pool, slot.queue_key.take())
            }
            _ => {
                if let Some(token) = &slot.cancel {
                    token.cancel();
                }
                match slot.record.pool {
                    PoolKind::Async => {
                        // The task drops the job's future as soon as it sees
                        // the token; the job is cancelled from this moment.
                        slot.committing = true;
                        CancelPlan::AbortAsync
                    }
                    PoolKind::Blocking => CancelPlan::RequestBlocking,
                }
            }
        };
        Some(plan)
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

    /// Lets a job whose terminal write failed be changed again (the server
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

    /// The running jobs, with their cancel tokens fired: the last step of a
    /// shutdown whose grace period ran out. They are marked committing so no
    /// late completion changes them; the caller decides their fate.
    pub(crate) fn stop_running(&self) -> Vec<(JobId, u32)> {
        let mut stopped = Vec::new();
        for mut slot in self.jobs.iter_mut() {
            if slot.record.state != JobState::Running || slot.committing {
                continue;
            }
            if let Some(token) = &slot.cancel {
                token.cancel();
            }
            slot.committing = true;
            stopped.push((slot.record.id, slot.record.attempt));
        }
        stopped
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
            let gone = self
                .jobs
                .remove_if(&id, |_, slot| slot.record.state.is_terminal());
            if let Some((_, slot)) = gone {
                if let Some(request_id) = &slot.record.request_id {
                    self.requests
                        .remove_if(request_id, |_, entry| entry.job == id);
                }
                wake(slot.waiters);
                removed.push(id);
            }
        }
        removed
    }

    /// Forgets one terminal job (it was deleted or expired elsewhere).
    pub(crate) fn forget(&self, id: JobId) {
        if let Some((_, slot)) = self
            .jobs
            .remove_if(&id, |_, slot| slot.record.state.is_terminal())
        {
            if let Some(request_id) = &slot.record.request_id {
                self.requests
                    .remove_if(request_id, |_, entry| entry.job == id);
            }
            wake(slot.waiters);
        }
    }

    /// Removes a terminal job at a client's request. Its waiters (there are
    /// none once it is terminal, but a racing one may just have registered)
    /// are woken and then find it gone.
    pub(crate) fn remove_finished(&self, id: JobId) -> Removal {
        let slot = match self.jobs.entry(id) {
            Entry::Occupied(entry) if entry.get().record.state.is_terminal() => entry.remove(),
            Entry::Occupied(entry) => return Removal::Unfinished(entry.get().record.state),
            Entry::Vacant(_) => return Removal::Absent,
        };
        // The job's shard lock is released by now: `insert` takes the
        // request map's lock before the job map's, so never the reverse.
        if let Some(request_id) = &slot.record.request_id {
            self.requests
                .remove_if(request_id, |_, entry| entry.job == id);
        }
        wake(slot.waiters);
        Removal::Removed
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

/// What a client's delete found in the table.
pub(crate) enum Removal {
    Removed,
    /// Still pending or running (or committing its end): not deleted.
    Unfinished(JobState),
    Absent,
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
    slot.cancel = None;
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

/// The error a job gets when it is stopped by a shutdown in memory mode.
pub(crate) fn interrupted(reason: &str) -> JobError {
    JobError::Interrupted(reason.to_owned())
}

/// Property tests of the state machine: random sequences of the operations
/// the engine performs (claim, finish with current or stale attempts,
/// retry, cancel, stop, failed writes) never change a terminal job and never
/// let a stale attempt's outcome through. Cases: `PROPTEST_CASES` (default
/// 256).
#[cfg(test)]
mod properties {
    use std::{num::NonZeroUsize, sync::Arc, time::SystemTime};

    use jobd_proto::{JobId, JobState};
    use proptest::prelude::*;

    use super::{CancelPlan, JobTable};
    use crate::{
        engine::{EventHub, QueueKey},
        function::PoolKind,
        job::{JobError, JobRecord},
    };

    /// One step, as the engine and the store drive the table.
    #[derive(Debug, Clone)]
    enum Op {
        Claim,
        /// `begin_finish` with the current attempt plus `skew` (stale when
        /// not 0), then `complete` if it was allowed, or `abandon` when
        /// the write "failed".
        Finish {
            skew: i8,
            ok: bool,
            write_fails: bool,
        },
        /// A retryable failure asking for another attempt.
        Retry {
            skew: i8,
        },
        /// A client's cancel, completed as the store does.
        Cancel,
        /// A shutdown whose grace ran out (memory store: interrupted).
        Stop,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => Just(Op::Claim),
            4 => (-2i8..=1, any::<bool>(), prop::bool::weighted(0.1)).prop_map(
                |(skew, ok, write_fails)| Op::Finish {
                    skew,
                    ok,
                    write_fails
                }
            ),
            3 => (-1i8..=1).prop_map(|skew| Op::Retry { skew }),
            1 => Just(Op::Cancel),
            1 => Just(Op::Stop),
        ]
    }

    fn record(pool: PoolKind) -> JobRecord {
        JobRecord {
            max_attempts: 3,
            ..JobRecord::pending_for_test("f", pool)
        }
    }

    fn skewed(attempt: u32, skew: i8) -> u32 {
        attempt.saturating_add_signed(i32::from(skew))
    }

    fn apply(table: &JobTable, id: JobId, op: &Op, seq: &mut u64) {
        let attempt = table.view(id, |r| r.attempt).expect("the job stays");
        match *op {
            Op::Claim => {
                let _ = table.claim(id);
            }
            Op::Finish {
                skew,
                ok,
                write_fails,
            } => {
                if table.begin_finish(id, skewed(attempt, skew)) {
                    if write_fails {
                        table.abandon(id);
                    } else {
                        let outcome = if ok {
                            Ok(serde_json::json!(attempt))
                        } else {
                            Err(JobError::failed("boom"))
                        };
                        table.complete(id, outcome, SystemTime::now());
                    }
                }
            }
            Op::Retry { skew } => {
                *seq += 1;
                let _ = table.retry(id, skewed(attempt, skew), QueueKey::for_tests(*seq));
            }
            Op::Cancel => match table.begin_cancel(id) {
                Some(CancelPlan::Pending(..) | CancelPlan::AbortAsync) => {
                    table.complete(id, Err(JobError::Cancelled), SystemTime::now());
                }
                Some(CancelPlan::RequestBlocking | CancelPlan::AlreadyDone) | None => {}
            },
            Op::Stop => {
                for (stopped, _) in table.stop_running() {
                    table.complete(stopped, Err(super::interrupted("stop")), SystemTime::now());
                }
            }
        }
    }

    proptest! {
        #[test]
        fn terminal_states_never_change_and_stale_attempts_are_dropped(
            blocking in any::<bool>(),
            ops in prop::collection::vec(op(), 1..60),
        ) {
            let table = JobTable::new(Arc::new(EventHub::new(NonZeroUsize::new(16).unwrap(), 1)));
            let pool = if blocking { PoolKind::Blocking } else { PoolKind::Async };
            let job = record(pool);
            let id = job.id;
            table.insert_unchecked(job, None);
            let mut seq = 0;
            for op in &ops {
                let before = table.view(id, Clone::clone).unwrap();
                apply(&table, id, op, &mut seq);
                let after = table.view(id, Clone::clone).unwrap();
                if before.state.is_terminal() {
                    prop_assert_eq!(after.state, before.state, "{:?} changed a terminal job", op);
                    prop_assert_eq!(&after.outcome, &before.outcome);
                    prop_assert_eq!(after.attempt, before.attempt);
                }
                let stale = match *op {
                    Op::Finish { skew, .. } | Op::Retry { skew } => {
                        skewed(before.attempt, skew) != before.attempt
                    }
                    _ => false,
                };
                if let Op::Finish { .. } = op
                    && before.state != JobState::Running
                {
                    // Only a running attempt can finish.
                    prop_assert_eq!(after.state, before.state, "{:?} finished a {:?} job", op, before.state);
                }
                if stale {
                    prop_assert_eq!(after.state, before.state, "stale {:?} went through", op);
                    prop_assert_eq!(&after.outcome, &before.outcome);
                }
                prop_assert!(after.attempt >= before.attempt);
                prop_assert!(after.attempt <= before.attempt + 1);
                prop_assert_eq!(after.state.is_terminal(), after.outcome.is_some());
                if after.state == JobState::Running {
                    prop_assert!(after.attempt >= 1);
                }
                if after.state == JobState::Succeeded {
                    // The value records the attempt that produced it: only
                    // the current attempt can finish a job.
                    prop_assert_eq!(
                        after.outcome.clone().unwrap().unwrap(),
                        serde_json::json!(after.attempt)
                    );
                }
            }
        }
    }
}

//! A pool's bounded queue of pending jobs: those ready to start, ordered by
//! aged priority then arrival, and those delayed until a `not_before` (a
//! delayed start or a retry's backoff), ordered by due time. A delayed job
//! holds its slot and moves to the ready order when it is due, on the next
//! look by a claimer (no timer task: a claimer that finds nothing ready
//! sleeps until the earliest due time). Keyed, so a cancelled pending job
//! leaves the queue at once instead of holding a slot until a worker
//! reaches it.
//!
//! Aging: a job's effective priority grows by one step per `aging` interval
//! it has waited, so that no flood of higher-priority work starves it. At
//! any time t, job A (priority p, ready since a) outranks job B (q, since b)
//! when `p + (t - a)/aging > q + (t - b)/aging`, that is when
//! `p·aging - a > q·aging - b`: the order does not depend on t. So each job's
//! rank is computed once, when its slot is reserved, from wall-clock
//! microseconds (comparable between processes), and the queue stays a plain
//! ordered map (O(log n) push and pop, no rescans). The guarantee: a job of
//! priority p is overtaken only by jobs that became ready less than
//! (q - p)·aging after it (q their priority); with priorities bounded to
//! [-1000, 1000], nothing that arrives more than (1000 - p)·aging after it
//! runs before it. Equal ranks keep arrival order.

use std::{
    cmp::Reverse,
    collections::{BTreeMap, HashMap},
    sync::{
        Mutex, PoisonError,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, SystemTime},
};

use jobd_proto::JobId;
use tokio::sync::Notify;

use crate::clock::{self, Clock};

/// Where a job sits in its queue: higher rank (aged priority) first, then
/// arrival order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct QueueKey {
    rank: Reverse<i128>,
    seq: u64,
}

/// Why a job could not be queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Rejected {
    Full,
    Closed,
}

pub(crate) struct JobQueue {
    entries: Mutex<Entries>,
    /// Reserved slots plus queued entries (ready and delayed).
    len: AtomicUsize,
    capacity: usize,
    next_seq: AtomicU64,
    /// One priority step per this much waiting; zero turns aging off.
    aging: Duration,
    /// Wakes claimers on a push that may concern them, and on close.
    notify: Notify,
}

#[derive(Default)]
struct Entries {
    ready: BTreeMap<QueueKey, JobId>,
    delayed: BTreeMap<(SystemTime, QueueKey), JobId>,
    /// When each delayed entry is due, so a removal finds it without a scan.
    due_at: HashMap<QueueKey, SystemTime>,
    closed: bool,
}

impl JobQueue {
    pub(crate) fn new(capacity: usize, aging: Duration) -> Self {
        Self {
            entries: Mutex::new(Entries::default()),
            len: AtomicUsize::new(0),
            capacity,
            next_seq: AtomicU64::new(0),
            aging,
            notify: Notify::new(),
        }
    }

    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    /// Reserves a slot for a job that may start from `ready_at` (`None`, or
    /// a time past, for `now`): aging counts from then, so a delayed job
    /// gains nothing from its delay. Every reservation is followed by a
    /// `push` or a `release`.
    pub(crate) fn reserve(
        &self,
        priority: i32,
        ready_at: Option<SystemTime>,
        now: SystemTime,
    ) -> Result<QueueKey, Rejected> {
        if self.lock().closed {
            return Err(Rejected::Closed);
        }
        let before = self.len.fetch_add(1, Ordering::AcqRel);
        if before >= self.capacity {
            self.len.fetch_sub(1, Ordering::AcqRel);
            return Err(Rejected::Full);
        }
        Ok(self.key(priority, ready_at.map_or(now, |at| at.max(now))))
    }

    /// Takes a slot regardless of capacity: for jobs recovered at start and
    /// jobs going back for another attempt, which were accepted before and
    /// must not be refused now. `ready_at` may lie in the past: a recovered
    /// job keeps the credit of the time it has waited since it was due.
    pub(crate) fn reserve_again(&self, priority: i32, ready_at: SystemTime) -> QueueKey {
        self.len.fetch_add(1, Ordering::AcqRel);
        self.key(priority, ready_at)
    }

    fn key(&self, priority: i32, ready_at: SystemTime) -> QueueKey {
        let rank = if self.aging.is_zero() {
            i128::from(priority)
        } else {
            let aging = i128::try_from(self.aging.as_micros()).unwrap_or(i128::MAX);
            i128::from(priority).saturating_mul(aging) - i128::from(clock::micros(ready_at))
        };
        QueueKey {
            rank: Reverse(rank),
            seq: self.next_seq.fetch_add(1, Ordering::Relaxed),
        }
    }

    /// Gives back a reservation that will not be pushed.
    pub(crate) fn release(&self, _key: QueueKey) {
        self.len.fetch_sub(1, Ordering::AcqRel);
    }

    /// Makes a reserved job visible to claimers: now, or once `due` (when
    /// it is after `now`).
    pub(crate) fn push(&self, key: QueueKey, id: JobId, due: Option<SystemTime>, now: SystemTime) {
        let mut entries = self.lock();
        match due {
            Some(due) if due > now => {
                let earliest = entries
                    .delayed
                    .first_key_value()
                    .is_none_or(|(k, _)| due < k.0);
                entries.delayed.insert((due, key), id);
                entries.due_at.insert(key, due);
                drop(entries);
                // A claimer asleep until a later due time must look again.
                if earliest {
                    self.notify.notify_waiters();
                }
            }
            _ => {
                entries.ready.insert(key, id);
                drop(entries);
                self.notify.notify_one();
            }
        }
    }

    /// Drops a pending job (it was cancelled) and frees its slot. False if
    /// it is not queued (a claimer took it already).
    pub(crate) fn remove(&self, key: QueueKey) -> bool {
        let mut entries = self.lock();
        let removed = entries.ready.remove(&key).is_some()
            || entries
                .due_at
                .remove(&key)
                .is_some_and(|due| entries.delayed.remove(&(due, key)).is_some());
        drop(entries);
        if removed {
            self.len.fetch_sub(1, Ordering::AcqRel);
        }
        removed
    }

    /// Waits for the next job that is due; `None` once the queue is closed.
    /// Jobs still queued at close stay pending. Cancel-safe: a job is taken
    /// only in the poll that returns it.
    pub(crate) async fn pop(&self, clock: &Clock) -> Option<JobId> {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            // Register before looking, so a push or close between the look
            // and the await is not missed.
            notified.as_mut().enable();
            let next_due = {
                let mut entries = self.lock();
                if entries.closed {
                    return None;
                }
                let now = clock.now();
                while let Some(entry) = entries.delayed.first_entry() {
                    if entry.key().0 > now {
                        break;
                    }
                    let ((_, key), id) = entry.remove_entry();
                    entries.due_at.remove(&key);
                    entries.ready.insert(key, id);
                }
                if let Some((_, id)) = entries.ready.pop_first() {
                    drop(entries);
                    self.len.fetch_sub(1, Ordering::AcqRel);
                    return Some(id);
                }
                entries.delayed.first_key_value().map(|(k, _)| k.0)
            };
            match next_due {
                Some(due) => {
                    tokio::select! {
                        () = &mut notified => {}
                        () = clock.sleep_until(due) => {}
                    }
                }
                None => notified.await,
            }
        }
    }

    /// Stops handing out jobs and wakes every waiting claimer.
    pub(crate) fn close(&self) {
        self.lock().closed = true;
        self.notify.notify_waiters();
    }

    /// True once closed.
    pub(crate) fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// How many jobs are queued (ready or delayed) or reserved.
    pub(crate) fn len(&self) -> usize {
        self.len.load(Ordering::Acquire)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Entries> {
        // The critical sections cannot panic halfway through an update, so a
        // poisoned lock still guards consistent data.
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> JobId {
        JobId::new()
    }

    const NO_AGING: Duration = Duration::ZERO;
    const SECOND: Duration = Duration::from_secs(1);

    /// Pushes jobs as (priority, seconds from `now` they became ready) and
    /// returns their ids in that order.
    fn fill(q: &JobQueue, now: SystemTime, jobs: &[(i32, f64)]) -> Vec<JobId> {
        jobs.iter()
            .map(|&(priority, offset)| {
                let at = if offset >= 0.0 {
                    now + Duration::from_secs_f64(offset)
                } else {
                    now - Duration::from_secs_f64(-offset)
                };
                let job = id();
                q.push(q.reserve_again(priority, at), job, None, now);
                job
            })
            .collect()
    }

    async fn drain(q: &JobQueue, clock: &Clock, n: usize) -> Vec<JobId> {
        let mut out = Vec::new();
        for _ in 0..n {
            out.push(q.pop(clock).await.unwrap());
        }
        out
    }

    #[tokio::test(start_paused = true)]
    async fn higher_priority_first_then_fifo() {
        let clock = Clock::tokio();
        for aging in [NO_AGING, SECOND] {
            let q = JobQueue::new(10, aging);
            let (a, b, c) = (id(), id(), id());
            for (p, job) in [(0, a), (5, b), (0, c)] {
                let key = q.reserve(p, None, clock.now()).unwrap();
                q.push(key, job, None, clock.now());
            }
            assert_eq!(drain(&q, &clock, 3).await, [b, a, c], "aging {aging:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiting_job_gains_one_step_per_interval() {
        let clock = Clock::tokio();
        let q = JobQueue::new(10, SECOND);
        // Ready 10 s ago at priority 0: as good as priority 10 now, so it
        // beats a 9 but not an 11 that arrive now.
        let jobs = fill(&q, clock.now(), &[(0, -10.0), (9, 0.0), (11, 0.0)]);
        assert_eq!(drain(&q, &clock, 3).await, [jobs[2], jobs[0], jobs[1]]);
    }

    #[tokio::test(start_paused = true)]
    async fn without_aging_priority_alone_decides() {
        let clock = Clock::tokio();
        let q = JobQueue::new(10, NO_AGING);
        let jobs = fill(&q, clock.now(), &[(0, -3600.0), (1, 0.0)]);
        assert_eq!(drain(&q, &clock, 2).await, [jobs[1], jobs[0]]);
    }

    #[tokio::test(start_paused = true)]
    async fn the_bound_on_overtaking_is_priority_gap_times_interval() {
        let clock = Clock::tokio();
        let q = JobQueue::new(10, SECOND);
        // A priority-0 job, then priority-10 jobs arriving 9.5 s and 10.5 s
        // later: only the first may overtake it.
        let jobs = fill(&q, clock.now(), &[(0, -10.5), (10, -1.0), (10, 0.0)]);
        assert_eq!(drain(&q, &clock, 3).await, [jobs[1], jobs[0], jobs[2]]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_delayed_job_waits_for_its_time_and_gains_nothing_from_its_delay() {
        let clock = Clock::tokio();
        let q = JobQueue::new(10, SECOND);
        let now = clock.now();
        let due = now + 5 * SECOND;
        let later = q.reserve(0, Some(due), now).unwrap();
        let at_once = q.reserve(0, None, now).unwrap();
        // A not_before in the past counts as now, not as long-waited.
        let past = q.reserve(0, Some(SystemTime::UNIX_EPOCH), now).unwrap();
        let (a, b, c) = (id(), id(), id());
        q.push(later, a, Some(due), now);
        q.push(at_once, b, None, now);
        q.push(past, c, None, now);
        assert_eq!(drain(&q, &clock, 2).await, [b, c]);
        // Only the delayed one is left: the pop sleeps until it is due.
        assert_eq!(q.pop(&clock).await, Some(a));
        assert!(clock.now() >= due);
    }

    #[tokio::test(start_paused = true)]
    async fn an_earlier_delayed_job_wakes_a_claimer_asleep_until_a_later_one() {
        let clock = Clock::tokio();
        let q = std::sync::Arc::new(JobQueue::new(10, NO_AGING));
        let now = clock.now();
        let (late, early) = (id(), id());
        let key = q.reserve(0, Some(now + 60 * SECOND), now).unwrap();
        q.push(key, late, Some(now + 60 * SECOND), now);
        let claimer = tokio::spawn({
            let (q, clock) = (q.clone(), clock.clone());
            async move { q.pop(&clock).await }
        });
        tokio::task::yield_now().await;
        let key = q.reserve(0, Some(now + SECOND), clock.now()).unwrap();
        q.push(key, early, Some(now + SECOND), clock.now());
        assert_eq!(claimer.await.unwrap(), Some(early));
        assert!(clock.now() < now + 60 * SECOND);
    }

    #[test]
    fn bounded_and_removal_frees_a_slot_ready_or_delayed() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(100);
        let q = JobQueue::new(2, SECOND);
        let k1 = q.reserve(0, None, now).unwrap();
        q.push(k1, id(), None, now);
        let k2 = q.reserve(0, Some(now + SECOND), now).unwrap();
        q.push(k2, id(), Some(now + SECOND), now);
        assert_eq!(q.reserve(0, None, now), Err(Rejected::Full));
        assert!(q.remove(k1));
        assert!(!q.remove(k1));
        assert!(q.remove(k2));
        assert_eq!(q.len(), 0);
        assert!(q.reserve(0, None, now).is_ok());
    }

    #[tokio::test]
    async fn close_wakes_claimers_and_refuses_work() {
        let clock = Clock::system();
        let q = std::sync::Arc::new(JobQueue::new(2, SECOND));
        let waiter = tokio::spawn({
            let (q, clock) = (q.clone(), clock.clone());
            async move { q.pop(&clock).await }
        });
        tokio::task::yield_now().await;
        q.close();
        assert_eq!(waiter.await.unwrap(), None);
        assert_eq!(q.reserve(0, None, clock.now()), Err(Rejected::Closed));
    }
}

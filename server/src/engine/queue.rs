//! A pool's bounded queue of pending jobs.
//!
//! Ordered by aged priority, then arrival, and keyed so a cancelled pending
//! job leaves the queue at once instead of holding a slot until a worker
//! reaches it.
//!
//! Aging: a job's effective priority grows by one step per `aging` interval
//! it has waited, so that no flood of higher-priority work starves it. At
//! any time t, job A (priority p, ready since a) outranks job B (q, since b)
//! when `p + (t - a)/aging > q + (t - b)/aging`, that is when
//! `p·aging - a > q·aging - b`: the order does not depend on t. So each job's
//! rank is computed once, when its slot is reserved, and the queue stays a
//! plain ordered map (O(log n) push and pop, no rescans). The guarantee: a
//! job of priority p is overtaken only by jobs that became ready less than
//! (q - p)·aging after it (q their priority); with priorities bounded to
//! [-1000, 1000], nothing that arrives more than (1000 - p)·aging after it
//! runs before it. Equal ranks keep arrival order.

use std::{
    cmp::Reverse,
    collections::BTreeMap,
    sync::{
        Mutex, PoisonError,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use jobd_proto::JobId;
use tokio::sync::Notify;

/// Where a job sits in its queue: higher rank (aged priority) first, then
/// arrival order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct QueueKey {
    rank: Reverse<i128>,
    seq: u64,
}

#[cfg(test)]
impl QueueKey {
    /// A key for tests that need one without a queue.
    pub(crate) fn for_tests(seq: u64) -> Self {
        Self {
            rank: Reverse(0),
            seq,
        }
    }
}

/// Why a job could not be queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Rejected {
    Full,
    Closed,
}

pub(crate) struct JobQueue {
    entries: Mutex<Entries>,
    /// Reserved slots plus queued entries; never exceeds `capacity`.
    len: AtomicUsize,
    capacity: usize,
    next_seq: AtomicU64,
    /// One priority step per this much waiting; zero turns aging off.
    aging: Duration,
    /// The origin of ranks: times are measured from here, monotonically.
    epoch: Instant,
    /// Wakes consumers on push and on close.
    notify: Notify,
}

struct Entries {
    queued: BTreeMap<QueueKey, JobId>,
    closed: bool,
}

impl JobQueue {
    pub(crate) fn new(capacity: usize, aging: Duration) -> Self {
        Self {
            entries: Mutex::new(Entries {
                queued: BTreeMap::new(),
                closed: false,
            }),
            len: AtomicUsize::new(0),
            capacity,
            next_seq: AtomicU64::new(0),
            aging,
            epoch: Instant::now(),
            notify: Notify::new(),
        }
    }

    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    /// Reserves a slot, so that the job can be recorded before it becomes
    /// visible to workers. Every reservation must be followed by `push`.
    /// `ready_at` is when the job may start (`None`, or a time past, for
    /// now): aging counts from then, so a delayed job gains nothing from its
    /// delay.
    pub(crate) fn reserve(
        &self,
        priority: i32,
        ready_at: Option<SystemTime>,
    ) -> Result<QueueKey, Rejected> {
        if self.lock().closed {
            return Err(Rejected::Closed);
        }
        let before = self.len.fetch_add(1, Ordering::AcqRel);
        if before >= self.capacity {
            self.len.fetch_sub(1, Ordering::AcqRel);
            return Err(Rejected::Full);
        }
        let now = SystemTime::now();
        Ok(self.key(priority, ready_at.map_or(now, |at| at.max(now))))
    }

    /// Takes a slot regardless of capacity: for jobs recovered at start and
    /// jobs going back for another attempt, which were accepted before and
    /// must not be refused now. `ready_at` may lie in the past: a recovered
    /// job keeps the credit of the time it has waited since it was due.
    pub(crate) fn reserve_recovered(&self, priority: i32, ready_at: SystemTime) -> QueueKey {
        self.len.fetch_add(1, Ordering::AcqRel);
        self.key(priority, ready_at)
    }

    /// The key of a job of `priority` that may start from `ready_at`.
    fn key(&self, priority: i32, ready_at: SystemTime) -> QueueKey {
        let rank = if self.aging.is_zero() {
            i128::from(priority)
        } else {
            // Microseconds since the epoch on the monotonic clock; the wall
            // clock only converts `ready_at` (an offset from now).
            let now = micros_i128(self.epoch.elapsed());
            let ready = match ready_at.duration_since(SystemTime::now()) {
                Ok(ahead) => now + micros_i128(ahead),
                Err(past) => now - micros_i128(past.duration()),
            };
            i128::from(priority) * micros_i128(self.aging) - ready
        };
        QueueKey {
            rank: Reverse(rank),
            seq: self.next_seq.fetch_add(1, Ordering::Relaxed),
        }
    }

    /// Gives back a reservation that will not be pushed (the submission was
    /// refused or de-duplicated).
    pub(crate) fn release(&self, _key: QueueKey) {
        self.len.fetch_sub(1, Ordering::AcqRel);
    }

    /// Makes a reserved job visible to the pool's workers.
    pub(crate) fn push(&self, key: QueueKey, id: JobId) {
        self.lock().queued.insert(key, id);
        self.notify.notify_one();
    }

    /// Drops a job that was cancelled while pending. False if a worker
    /// already took it (the worker will then see it is cancelled).
    pub(crate) fn remove(&self, key: QueueKey) -> bool {
        let removed = self.lock().queued.remove(&key).is_some();
        if removed {
            self.len.fetch_sub(1, Ordering::AcqRel);
        }
        removed
    }

    /// Waits for the next job; `None` once the queue is closed. Jobs still
    /// queued at close stay pending (a durable store re-runs them on restart).
    pub(crate) async fn pop(&self) -> Option<JobId> {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            // Register before looking, so a push or close between the look
            // and the await is not missed.
            notified.as_mut().enable();
            {
                let mut entries = self.lock();
                if entries.closed {
                    return None;
                }
                if let Some((_, id)) = entries.queued.pop_first() {
                    drop(entries);
                    self.len.fetch_sub(1, Ordering::AcqRel);
                    return Some(id);
                }
            }
            notified.await;
        }
    }

    /// Stops handing out jobs and wakes every waiting consumer.
    pub(crate) fn close(&self) {
        self.lock().closed = true;
        self.notify.notify_waiters();
    }

    /// How many jobs are queued or reserved.
    pub(crate) fn len(&self) -> usize {
        self.len.load(Ordering::Acquire)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Entries> {
        // The critical sections cannot panic halfway through an update, so a
        // poisoned lock still guards consistent data.
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn micros_i128(d: Duration) -> i128 {
    i128::try_from(d.as_micros()).unwrap_or(i128::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> JobId {
        JobId::new()
    }

    const NO_AGING: Duration = Duration::ZERO;
    const SECOND: Duration = Duration::from_secs(1);

    /// Pushes jobs as (priority, seconds from now they became ready) and
    /// returns their ids in that order.
    fn fill(q: &JobQueue, jobs: &[(i32, f64)]) -> Vec<JobId> {
        jobs.iter()
            .map(|&(priority, offset)| {
                let now = SystemTime::now();
                let at = if offset >= 0.0 {
                    now + Duration::from_secs_f64(offset)
                } else {
                    now - Duration::from_secs_f64(-offset)
                };
                let job = id();
                q.push(q.reserve_recovered(priority, at), job);
                job
            })
            .collect()
    }

    async fn drain(q: &JobQueue, n: usize) -> Vec<JobId> {
        let mut out = Vec::new();
        for _ in 0..n {
            out.push(q.pop().await.unwrap());
        }
        out
    }

    #[tokio::test]
    async fn higher_priority_first_then_fifo() {
        for aging in [NO_AGING, SECOND] {
            let q = JobQueue::new(10, aging);
            let (a, b, c) = (id(), id(), id());
            for (p, job) in [(0, a), (5, b), (0, c)] {
                let key = q.reserve(p, None).unwrap();
                q.push(key, job);
            }
            assert_eq!(drain(&q, 3).await, [b, a, c], "aging {aging:?}");
        }
    }

    #[tokio::test]
    async fn a_waiting_job_gains_one_step_per_interval() {
        let q = JobQueue::new(10, SECOND);
        // Ready 10 s ago at priority 0: as good as priority 10 now, so it
        // beats a 9 but not an 11 that arrive now.
        let jobs = fill(&q, &[(0, -10.0), (9, 0.0), (11, 0.0)]);
        assert_eq!(drain(&q, 3).await, [jobs[2], jobs[0], jobs[1]]);
    }

    #[tokio::test]
    async fn without_aging_priority_alone_decides() {
        let q = JobQueue::new(10, NO_AGING);
        let jobs = fill(&q, &[(0, -3600.0), (1, 0.0)]);
        assert_eq!(drain(&q, 2).await, [jobs[1], jobs[0]]);
    }

    #[tokio::test]
    async fn the_bound_on_overtaking_is_priority_gap_times_interval() {
        let q = JobQueue::new(10, SECOND);
        // A priority-0 job, then priority-10 jobs arriving 9.5 s and 10.5 s
        // later: only the first may overtake it.
        let jobs = fill(&q, &[(0, -10.5), (10, -1.0), (10, 0.0)]);
        assert_eq!(drain(&q, 3).await, [jobs[1], jobs[0], jobs[2]]);
    }

    #[tokio::test]
    async fn a_delayed_job_gains_nothing_from_its_delay() {
        let q = JobQueue::new(10, SECOND);
        let later = q.reserve(0, Some(SystemTime::now() + 5 * SECOND)).unwrap();
        let now = q.reserve(0, None).unwrap();
        // A not_before in the past counts as now, not as long-waited.
        let past = q.reserve(0, Some(SystemTime::UNIX_EPOCH)).unwrap();
        let (a, b, c) = (id(), id(), id());
        q.push(later, a);
        q.push(now, b);
        q.push(past, c);
        assert_eq!(drain(&q, 3).await, [b, c, a]);
    }

    #[test]
    fn bounded_and_removal_frees_a_slot() {
        let q = JobQueue::new(2, SECOND);
        let k1 = q.reserve(0, None).unwrap();
        q.push(k1, id());
        let k2 = q.reserve(0, None).unwrap();
        q.push(k2, id());
        assert_eq!(q.reserve(0, None), Err(Rejected::Full));
        assert!(q.remove(k1));
        assert!(!q.remove(k1));
        assert!(q.reserve(0, None).is_ok());
    }

    #[tokio::test]
    async fn close_wakes_consumers_and_refuses_work() {
        let q = std::sync::Arc::new(JobQueue::new(2, SECOND));
        let waiter = tokio::spawn({
            let q = q.clone();
            async move { q.pop().await }
        });
        tokio::task::yield_now().await;
        q.close();
        assert_eq!(waiter.await.unwrap(), None);
        assert_eq!(q.reserve(0, None), Err(Rejected::Closed));
    }
}

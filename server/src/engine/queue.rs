//! A pool's bounded queue of pending jobs.
//!
//! Ordered by (priority, arrival), so later priorities slot in without a new
//! structure, and keyed so a cancelled pending job leaves the queue at once
//! instead of holding a slot until a worker reaches it.

use std::{
    cmp::Reverse,
    collections::BTreeMap,
    sync::{
        Mutex, PoisonError,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
};

use jobd_proto::JobId;
use tokio::sync::Notify;

/// Where a job sits in its queue: higher priority first, then arrival order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct QueueKey {
    priority: Reverse<i32>,
    seq: u64,
}

#[cfg(test)]
impl QueueKey {
    /// A key for tests that need one without a queue.
    pub(crate) fn for_tests(seq: u64) -> Self {
        Self {
            priority: Reverse(0),
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
    /// Wakes consumers on push and on close.
    notify: Notify,
}

struct Entries {
    queued: BTreeMap<QueueKey, JobId>,
    closed: bool,
}

impl JobQueue {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            entries: Mutex::new(Entries {
                queued: BTreeMap::new(),
                closed: false,
            }),
            len: AtomicUsize::new(0),
            capacity,
            next_seq: AtomicU64::new(0),
            notify: Notify::new(),
        }
    }

    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    /// Reserves a slot, so that the job can be recorded before it becomes
    /// visible to workers. Every reservation must be followed by `push`.
    pub(crate) fn reserve(&self, priority: i32) -> Result<QueueKey, Rejected> {
        if self.lock().closed {
            return Err(Rejected::Closed);
        }
        let before = self.len.fetch_add(1, Ordering::AcqRel);
        if before >= self.capacity {
            self.len.fetch_sub(1, Ordering::AcqRel);
            return Err(Rejected::Full);
        }
        Ok(QueueKey {
            priority: Reverse(priority),
            seq: self.next_seq.fetch_add(1, Ordering::Relaxed),
        })
    }

    /// Takes a slot regardless of capacity: for jobs recovered at start,
    /// which were accepted before and must not be refused now.
    pub(crate) fn reserve_recovered(&self, priority: i32) -> QueueKey {
        self.len.fetch_add(1, Ordering::AcqRel);
        QueueKey {
            priority: Reverse(priority),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> JobId {
        JobId::new()
    }

    #[tokio::test]
    async fn higher_priority_first_then_fifo() {
        let q = JobQueue::new(10);
        let (a, b, c) = (id(), id(), id());
        for (p, job) in [(0, a), (5, b), (0, c)] {
            let key = q.reserve(p).unwrap();
            q.push(key, job);
        }
        assert_eq!(q.pop().await, Some(b));
        assert_eq!(q.pop().await, Some(a));
        assert_eq!(q.pop().await, Some(c));
    }

    #[test]
    fn bounded_and_removal_frees_a_slot() {
        let q = JobQueue::new(2);
        let k1 = q.reserve(0).unwrap();
        q.push(k1, id());
        let k2 = q.reserve(0).unwrap();
        q.push(k2, id());
        assert_eq!(q.reserve(0), Err(Rejected::Full));
        assert!(q.remove(k1));
        assert!(!q.remove(k1));
        assert!(q.reserve(0).is_ok());
    }

    #[tokio::test]
    async fn close_wakes_consumers_and_refuses_work() {
        let q = std::sync::Arc::new(JobQueue::new(2));
        let waiter = tokio::spawn({
            let q = q.clone();
            async move { q.pop().await }
        });
        tokio::task::yield_now().await;
        q.close();
        assert_eq!(waiter.await.unwrap(), None);
        assert_eq!(q.reserve(0), Err(Rejected::Closed));
    }
}

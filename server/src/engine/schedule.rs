//! Delayed jobs: pending, holding their queue reservation, but kept out of
//! the pool's queue until their `not_before` time.
//!
//! One map ordered by due time and one task that sleeps until the earliest
//! entry is due (or until a new, earlier one arrives), then hands what is due
//! to its pool's queue. A timer per job would be simpler to write but would
//! cost a task per delayed job; this costs one task in all.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Mutex, PoisonError},
    time::SystemTime,
};

use jobd_proto::JobId;
use tokio::sync::Notify;

use super::queue::QueueKey;
use crate::function::PoolKind;

/// A job waiting for its time, and where it goes then.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Due {
    pub(crate) id: JobId,
    pub(crate) pool: PoolKind,
    pub(crate) key: QueueKey,
}

#[derive(Default)]
pub(crate) struct Schedule {
    entries: Mutex<Entries>,
    /// Wakes the timer task when an entry earlier than all others arrives.
    changed: Notify,
}

#[derive(Default)]
struct Entries {
    by_time: BTreeMap<(SystemTime, JobId), Due>,
    /// So that a cancel finds its entry without a scan.
    at: HashMap<JobId, SystemTime>,
}

impl Schedule {
    /// Holds `due` until `not_before`.
    pub(crate) fn add(&self, not_before: SystemTime, due: Due) {
        let earliest = {
            let mut entries = self.lock();
            entries.at.insert(due.id, not_before);
            entries.by_time.insert((not_before, due.id), due);
            entries.by_time.first_key_value().map(|(k, _)| k.1) == Some(due.id)
        };
        if earliest {
            self.changed.notify_one();
        }
    }

    /// Takes a job out (it was cancelled): its queue slot is the caller's to
    /// release. `None` if it is not scheduled (never was, or already due).
    pub(crate) fn remove(&self, id: JobId) -> Option<Due> {
        let mut entries = self.lock();
        let at = entries.at.remove(&id)?;
        entries.by_time.remove(&(at, id))
    }

    /// Removes and returns every entry due at `now`, and the time the next
    /// one is due.
    pub(crate) fn take_due(&self, now: SystemTime) -> (Vec<Due>, Option<SystemTime>) {
        let mut entries = self.lock();
        let mut due = Vec::new();
        while let Some(entry) = entries.by_time.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let (_, job) = entry.remove_entry();
            entries.at.remove(&job.id);
            due.push(job);
        }
        let next = entries.by_time.first_key_value().map(|(k, _)| k.0);
        (due, next)
    }

    /// Resolves when an earlier entry may have arrived.
    pub(crate) fn changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.changed.notified()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Entries> {
        // No critical section can panic halfway through an update.
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::engine::queue::JobQueue;

    #[test]
    fn due_in_time_order_and_removable() {
        let q = JobQueue::new(10, std::time::Duration::ZERO);
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(100);
        let schedule = Schedule::default();
        let due = |id| Due {
            id,
            pool: PoolKind::Async,
            key: q.reserve(0, None).unwrap(),
        };
        let (a, b, c) = (JobId::new(), JobId::new(), JobId::new());
        schedule.add(t0 + Duration::from_secs(2), due(a));
        schedule.add(t0 + Duration::from_secs(1), due(b));
        schedule.add(t0 + Duration::from_secs(3), due(c));
        assert!(schedule.remove(c).is_some());
        assert!(schedule.remove(c).is_none());
        let (none, next) = schedule.take_due(t0);
        assert!(none.is_empty());
        assert_eq!(next, Some(t0 + Duration::from_secs(1)));
        let (ready, next) = schedule.take_due(t0 + Duration::from_secs(5));
        assert_eq!(ready.iter().map(|d| d.id).collect::<Vec<_>>(), [b, a]);
        assert_eq!(next, None);
        assert!(schedule.remove(a).is_none());
    }
}

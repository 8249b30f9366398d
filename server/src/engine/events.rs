//! The event hub: one server-wide, numbered history of job events (state
//! changes and progress reports) that every `Watch` stream reads from.
//!
//! Why one shared history instead of a channel per watcher: a watcher then
//! costs a cursor (a sequence number), not a buffer, so a slow watcher cannot
//! grow memory; the history is what a reconnecting watcher resumes from; and
//! publishing stays O(1) with no allocation once the history is full (a push
//! and a pop on a ring under a short lock).
//!
//! Nothing is recorded until the first `Watch` call of the process: the
//! epoch and sequence numbers reach clients only through watch events, so no
//! client can resume from an event published before then, and a server
//! nobody watches pays one atomic load per state change instead of a lock
//! (`jobctl bench --mode batch`: ~6% of the server's CPU).
//!
//! Invariants:
//! - Events are published by the live job table (`store/table.rs`) *after*
//!   the change is visible there, and under the job's shard lock, so one
//!   job's events are numbered in the order its state changed. With the
//!   durable store, terminal states become visible only after their commit,
//!   so no event announces what is not on disk.
//! - Sequence numbers are contiguous from 1 per process, counted from the
//!   first `Watch` call; `epoch` tells processes apart.
//! - At most `capacity` events are held; the oldest is dropped first.

use std::{
    collections::VecDeque,
    num::NonZeroUsize,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
};

use jobd_proto::{JobId, JobState};
use tokio::sync::{Notify, futures::Notified};

use crate::job::{JobRecord, Progress};

/// What a published event reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EventKind {
    /// The job reached `state`.
    State,
    /// The running job reported progress.
    Progress,
}

/// One numbered event in the history. Small and cheap to clone: the function
/// name and the progress message are shared, and outcomes are not copied here
/// (a watcher reads a finished job's outcome from the store when it sends
/// the event), so the history's size in bytes is bounded by its length.
#[derive(Debug, Clone)]
pub(crate) struct Event {
    pub(crate) seq: u64,
    pub(crate) kind: EventKind,
    pub(crate) id: JobId,
    pub(crate) function: Arc<str>,
    pub(crate) state: JobState,
    pub(crate) attempt: u32,
    pub(crate) progress: Option<Progress>,
}

/// Events after the asked-for sequence number are no longer held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Gap {
    /// How many events are gone.
    pub(crate) missed: u64,
    /// The sequence number of the oldest event still held.
    pub(crate) oldest: u64,
}

/// Too many watch streams are open.
#[derive(Debug)]
pub(crate) struct Full;

pub(crate) struct EventHub {
    history: Mutex<History>,
    capacity: usize,
    /// Woken after each publish while at least one watcher is open.
    published: Notify,
    /// Set by the first subscriber, never cleared: from then on every event
    /// is numbered and held.
    recording: AtomicBool,
    /// Open watch streams (each holds a [`WatcherSlot`]).
    watchers: AtomicUsize,
    max_watchers: usize,
    /// Tells this process's sequence numbers from another's.
    epoch: Arc<str>,
}

struct History {
    events: VecDeque<Event>,
    /// The newest sequence number handed out (0 before the first event).
    latest: u64,
}

impl EventHub {
    pub(crate) fn new(capacity: NonZeroUsize, max_watchers: usize) -> Self {
        Self {
            history: Mutex::new(History {
                events: VecDeque::new(),
                latest: 0,
            }),
            capacity: capacity.get(),
            published: Notify::new(),
            recording: AtomicBool::new(false),
            watchers: AtomicUsize::new(0),
            max_watchers,
            // A UUIDv7: unique per process start, and sorts by start time.
            epoch: Arc::from(uuid::Uuid::now_v7().to_string()),
        }
    }

    /// Numbers and records an event about `record`'s current state. Called
    /// by the job table with the job's shard lock held.
    pub(crate) fn publish(&self, record: &JobRecord, kind: EventKind) {
        // SeqCst pairs with the store in `subscribe`: a change whose publish
        // saw `false` happened before the first watcher subscribed, so that
        // watcher's snapshot (read under the job's lock) already shows it.
        if !self.recording.load(Ordering::SeqCst) {
            return;
        }
        let mut history = self.lock();
        history.latest += 1;
        let event = Event {
            seq: history.latest,
            kind,
            id: record.id,
            function: Arc::clone(&record.function),
            state: record.state,
            attempt: record.attempt,
            progress: record.progress.clone(),
        };
        if history.events.len() == self.capacity {
            history.events.pop_front();
        }
        history.events.push_back(event);
        drop(history);
        if self.watchers.load(Ordering::SeqCst) > 0 {
            self.published.notify_waiters();
        }
    }

    /// The newest sequence number handed out so far.
    pub(crate) fn latest(&self) -> u64 {
        self.lock().latest
    }

    /// Appends to `out` up to `max` events numbered after `after`, oldest
    /// first; or says that some of those events are no longer held.
    pub(crate) fn read_after(
        &self,
        after: u64,
        max: usize,
        out: &mut VecDeque<Event>,
    ) -> Result<(), Gap> {
        let history = self.lock();
        let held = history.events.len() as u64;
        let oldest = history.latest + 1 - held;
        if after + 1 < oldest {
            return Err(Gap {
                missed: oldest - after - 1,
                oldest,
            });
        }
        let skip = usize::try_from(after + 1 - oldest).unwrap_or(usize::MAX);
        out.extend(history.events.iter().skip(skip).take(max).cloned());
        Ok(())
    }

    /// Resolves after a later publish; `enable` it before reading, so that a
    /// publish between the read and the wait is not missed.
    pub(crate) fn published(&self) -> Notified<'_> {
        self.published.notified()
    }

    /// Takes one of the `max_watchers` watch slots.
    pub(crate) fn subscribe(self: &Arc<Self>) -> Result<WatcherSlot, Full> {
        self.recording.store(true, Ordering::SeqCst);
        self.watchers
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |open| {
                (open < self.max_watchers).then_some(open + 1)
            })
            .map_err(|_| Full)?;
        Ok(WatcherSlot(Arc::clone(self)))
    }

    pub(crate) fn epoch(&self) -> &Arc<str> {
        &self.epoch
    }

    pub(crate) fn max_watchers(&self) -> usize {
        self.max_watchers
    }

    /// (events held, open watch streams).
    pub(crate) fn stats(&self) -> (usize, usize) {
        (
            self.lock().events.len(),
            self.watchers.load(Ordering::SeqCst),
        )
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, History> {
        // A push and a pop cannot leave the ring half-updated.
        self.history.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One open watch stream's place under the watcher cap; given back on drop
/// (when the stream ends or its client goes away).
pub(crate) struct WatcherSlot(Arc<EventHub>);

impl Drop for WatcherSlot {
    fn drop(&mut self) {
        self.0.watchers.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {

    use super::*;
    use crate::function::PoolKind;

    fn record() -> JobRecord {
        JobRecord::pending_for_test("noop", PoolKind::Async)
    }

    #[test]
    fn the_history_is_bounded_and_reports_what_it_lost() {
        let hub = Arc::new(EventHub::new(NonZeroUsize::new(4).unwrap(), 1));
        let job = record();
        // Before anyone watches, nothing is numbered or held.
        hub.publish(&job, EventKind::State);
        assert_eq!((hub.latest(), hub.stats().0), (0, 0));
        let _slot = hub.subscribe().unwrap();
        for _ in 0..10 {
            hub.publish(&job, EventKind::State);
        }
        assert_eq!(hub.latest(), 10);
        assert_eq!(hub.stats().0, 4);
        let mut out = VecDeque::new();
        assert_eq!(
            hub.read_after(2, 100, &mut out),
            Err(Gap {
                missed: 4,
                oldest: 7
            })
        );
        hub.read_after(6, 2, &mut out).unwrap();
        let seqs: Vec<u64> = out.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [7, 8]);
        out.clear();
        hub.read_after(10, 100, &mut out).unwrap();
        assert!(out.is_empty());
    }

    #[test]
    fn the_watcher_cap_is_enforced_and_given_back() {
        let hub = Arc::new(EventHub::new(NonZeroUsize::new(4).unwrap(), 1));
        let slot = hub.subscribe().unwrap();
        assert!(hub.subscribe().is_err());
        drop(slot);
        assert!(hub.subscribe().is_ok());
    }
}

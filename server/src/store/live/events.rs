//! The event hub: one numbered history of job events (state changes and
//! progress reports) that every event stream reads from.
//!
//! Why one shared history instead of a channel per watcher: a watcher then
//! costs a cursor (a sequence number), not a buffer, so a slow watcher cannot
//! grow memory; the history is what a reconnecting watcher resumes from; and
//! publishing stays O(1) with no allocation once the history is full (a push
//! and a pop on a ring under a short lock).
//!
//! Nothing is recorded until the first [`EventHub::head`] call of the
//! process: positions reach clients only through watch events, so no client
//! can resume from an event published before then, and a server nobody
//! watches pays one atomic load per state change instead of a lock
//! (`jobctl bench --mode batch`: ~6% of the server's CPU).
//!
//! Invariants:
//! - Events are published by the job table *after* the change is visible
//!   there, and under the job's shard lock, so one job's events are numbered
//!   in the order its state changed. With the durable store, terminal states
//!   become visible only after their commit, so no event announces what is
//!   not on disk.
//! - Sequence numbers are contiguous from 1 per process, counted from the
//!   first `head` call; `epoch` tells processes apart.
//! - At most `capacity` events are held; the oldest is dropped first.

use std::{
    collections::VecDeque,
    num::NonZeroUsize,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
};

use futures::stream::{self, BoxStream, StreamExt as _};
use tokio::sync::{Notify, futures::Notified};

use crate::{
    job::JobRecord,
    store::{Cursor, Event, EventItem, EventKind, StoreError},
};

/// Events read from the history at a time by one stream.
const BATCH: usize = 256;

/// Events after the asked-for sequence number are no longer held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Gap {
    /// How many events are gone.
    pub(crate) missed: u64,
    /// The sequence number of the oldest event still held.
    pub(crate) oldest: u64,
}

pub(crate) struct EventHub {
    history: Mutex<History>,
    capacity: usize,
    /// Woken after each publish while at least one stream is open.
    published: Notify,
    /// Set by the first `head`, never cleared: from then on every event is
    /// numbered and held.
    recording: AtomicBool,
    /// Open event streams.
    streams: AtomicUsize,
    /// Tells this process's sequence numbers from another's.
    epoch: Arc<str>,
}

struct History {
    events: VecDeque<Event>,
    /// The newest sequence number handed out (0 before the first event).
    latest: u64,
}

impl EventHub {
    pub(crate) fn new(capacity: NonZeroUsize, epoch: Arc<str>) -> Self {
        Self {
            history: Mutex::new(History {
                events: VecDeque::new(),
                latest: 0,
            }),
            capacity: capacity.get(),
            published: Notify::new(),
            recording: AtomicBool::new(false),
            streams: AtomicUsize::new(0),
            epoch,
        }
    }

    /// Numbers and records an event about `record`'s current state. Called
    /// by the job table with the job's shard lock held.
    pub(crate) fn publish(&self, record: &JobRecord, kind: EventKind) {
        // SeqCst pairs with the store in `head`: a change whose publish saw
        // `false` happened before the first watcher took its position, so
        // that watcher's snapshot (read under the job's lock) already shows
        // it.
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
        if self.streams.load(Ordering::SeqCst) > 0 {
            self.published.notify_waiters();
        }
    }

    /// The newest position; starts the recording.
    pub(crate) fn head(&self) -> Cursor {
        self.recording.store(true, Ordering::SeqCst);
        Cursor {
            epoch: Arc::clone(&self.epoch),
            seq: self.lock().latest,
        }
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
    fn published(&self) -> Notified<'_> {
        self.published.notified()
    }

    /// The events after `after`, as they are published. Costs a cursor and
    /// at most one batch; when the history has moved past the cursor, the
    /// stream says how many events it missed and goes on from the oldest
    /// held. It never ends by itself.
    pub(crate) fn stream(
        self: &Arc<Self>,
        after: u64,
    ) -> BoxStream<'static, Result<EventItem, StoreError>> {
        self.streams.fetch_add(1, Ordering::SeqCst);
        let reader = Reader {
            hub: Arc::clone(self),
            cursor: after,
            batch: VecDeque::new(),
        };
        stream::unfold(reader, |mut reader| async move {
            let item = reader.next().await;
            Some((Ok(item), reader))
        })
        .boxed()
    }

    /// Events held now.
    pub(crate) fn held(&self) -> usize {
        self.lock().events.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, History> {
        // A push and a pop cannot leave the ring half-updated.
        self.history.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One stream's place in the history.
struct Reader {
    hub: Arc<EventHub>,
    cursor: u64,
    batch: VecDeque<Event>,
}

impl Reader {
    async fn next(&mut self) -> EventItem {
        loop {
            if let Some(event) = self.batch.pop_front() {
                self.cursor = event.seq;
                return EventItem::Event(event);
            }
            let hub = Arc::clone(&self.hub);
            let published = hub.published();
            tokio::pin!(published);
            published.as_mut().enable();
            match hub.read_after(self.cursor, BATCH, &mut self.batch) {
                Err(gap) => {
                    self.cursor = gap.oldest - 1;
                    return EventItem::Lagged {
                        missed: gap.missed,
                        resumed_after: self.cursor,
                    };
                }
                Ok(()) if !self.batch.is_empty() => {}
                Ok(()) => published.await,
            }
        }
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.hub.streams.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use futures::FutureExt as _;

    use super::*;
    use crate::function::PoolKind;

    fn record() -> JobRecord {
        JobRecord::pending_for_test("noop", PoolKind::Async)
    }

    #[test]
    fn the_history_is_bounded_and_reports_what_it_lost() {
        let hub = Arc::new(EventHub::new(NonZeroUsize::new(4).unwrap(), "e".into()));
        let job = record();
        // Before anyone watches, nothing is numbered or held.
        hub.publish(&job, EventKind::State);
        assert_eq!((hub.head().seq, hub.held()), (0, 0));
        for _ in 0..10 {
            hub.publish(&job, EventKind::State);
        }
        assert_eq!(hub.head().seq, 10);
        assert_eq!(hub.held(), 4);
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

    #[tokio::test]
    async fn a_stream_says_what_it_missed_then_goes_on_and_waits_for_more() {
        let hub = Arc::new(EventHub::new(NonZeroUsize::new(2).unwrap(), "e".into()));
        let job = record();
        hub.head();
        for _ in 0..5 {
            hub.publish(&job, EventKind::State);
        }
        let mut events = hub.stream(1);
        let seq = |item: Option<Result<EventItem, StoreError>>| match item {
            Some(Ok(EventItem::Event(event))) => event.seq,
            other => panic!("expected an event, got {other:?}"),
        };
        match events.next().await {
            Some(Ok(EventItem::Lagged {
                missed: 2,
                resumed_after: 3,
            })) => {}
            other => panic!("expected a lag of 2, got {other:?}"),
        }
        assert_eq!(seq(events.next().await), 4);
        assert_eq!(seq(events.next().await), 5);
        let next = events.next();
        tokio::pin!(next);
        assert!(next.as_mut().now_or_never().is_none(), "nothing new yet");
        hub.publish(&job, EventKind::Progress);
        assert_eq!(seq(next.await), 6);
        drop(events);
        assert_eq!(hub.streams.load(Ordering::SeqCst), 0);
    }
}

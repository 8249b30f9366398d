//! `Watch`: a stream of job events for a set of ids or a filter, read from
//! the event hub's shared history ([`super::events`]).
//!
//! A watcher is a cursor into that history plus a small bounded batch, never
//! a queue of its own: when it reads too slowly and the history moves past
//! its cursor, it gets a `Lagged` event saying how many events it missed
//! instead of losing them silently or holding them in memory. A watch of ids
//! then re-reads each unfinished id's state (a `Snapshot`), so it still
//! sees every final event; a filter watch continues with the oldest event
//! held.
//!
//! The stream is polled by the transport, which stops polling while the
//! client does not read (HTTP/2 flow control): nothing is produced ahead of
//! the reader, and dropping the stream (the client went away) frees
//! everything, its watcher slot included. No task is spawned per watcher.

use std::{
    collections::{BTreeMap, HashSet, VecDeque},
    sync::Arc,
};

use futures::stream::{self, BoxStream, StreamExt as _};
use jobd_proto::{JobId, JobState};

use super::{
    Engine, Inner,
    events::{Event, EventKind, Gap, WatcherSlot},
};
use crate::{
    Error,
    job::{JobRecord, Outcome, Progress},
};

/// Events read from the history at a time (the most a watcher holds).
const BATCH: usize = 256;

/// What to watch: `ids`, or the jobs matching `filter` (when `ids` is
/// empty); and optionally where to resume.
#[derive(Debug, Clone, Default)]
pub struct WatchSpec {
    /// Distinct job ids to watch; empty to watch by `filter`.
    pub ids: Vec<JobId>,
    /// Which jobs' events a filter watch sends (ignored with `ids`).
    pub filter: WatchFilter,
    /// Resume: the epoch of the events received before and the sequence
    /// number of the last one (`None`: start now, with snapshots of `ids`).
    pub resume: Option<(String, u64)>,
}

/// Which events a filter watch sends; empty fields match everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WatchFilter {
    /// Only jobs of this function.
    pub function: Option<String>,
    /// Only events whose new state is one of these.
    pub states: Vec<JobState>,
    /// Only jobs carrying all of these labels with these values.
    pub labels: BTreeMap<String, String>,
}

/// What a [`WatchEvent`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchEventKind {
    /// The job changed state.
    State,
    /// The running job reported progress.
    Progress,
    /// The job's state when the watch began, or after a lag.
    Snapshot,
    /// `missed` events were skipped (the watcher was too slow, or resumed
    /// after events no longer held).
    Lagged,
}

/// One event of a watch stream.
#[derive(Debug, Clone, PartialEq)]
pub struct WatchEvent {
    /// The server-wide sequence number (see `Engine::stream_epoch`).
    pub seq: u64,
    /// What it reports.
    pub kind: WatchEventKind,
    /// The job; `None` for `Lagged`.
    pub job: Option<JobId>,
    /// The job's function; `None` for `Lagged`.
    pub function: Option<Arc<str>>,
    /// The job's state after the event; `None` for `Lagged`.
    pub state: Option<JobState>,
    /// The job's attempt number.
    pub attempt: u32,
    /// The job's latest progress report at the time, if any.
    pub progress: Option<Progress>,
    /// A finished job's outcome (absent only if it was deleted first).
    pub outcome: Option<Outcome>,
    /// For `Lagged`: how many server events were skipped.
    pub missed: u64,
}

impl WatchEvent {
    fn of_record(seq: u64, kind: WatchEventKind, record: JobRecord) -> Self {
        Self {
            seq,
            kind,
            job: Some(record.id),
            function: Some(record.function),
            state: Some(record.state),
            attempt: record.attempt,
            progress: record.progress,
            outcome: record.outcome,
            missed: 0,
        }
    }

    fn lagged(seq: u64, missed: u64) -> Self {
        Self {
            seq,
            kind: WatchEventKind::Lagged,
            job: None,
            function: None,
            state: None,
            attempt: 0,
            progress: None,
            outcome: None,
            missed,
        }
    }
}

impl Engine {
    /// Streams job events for `spec` (see the `Watch` RPC in the .proto for
    /// the whole contract). A watch of ids starts with a snapshot of each
    /// (unless resuming) and ends after each id's final event; a filter
    /// watch runs until dropped. Both end with `ShuttingDown` when the
    /// engine stops.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// use futures::StreamExt as _;
    /// use jobd::{Engine, EngineConfig, SubmitSpec, WatchSpec};
    ///
    /// let engine = Engine::start(jobd::builtins::registry(), EngineConfig::default());
    /// let (id, _) = engine
    ///     .submit(SubmitSpec { function: "noop".into(), ..Default::default() })
    ///     .await
    ///     .unwrap();
    /// let events = engine.watch(WatchSpec { ids: vec![id], ..Default::default() }).await.unwrap();
    /// let last = events.fold(None, |_, event| async move { Some(event.unwrap()) }).await.unwrap();
    /// assert_eq!(last.state, Some(jobd_proto::JobState::Succeeded));
    /// engine.shutdown(std::time::Duration::from_secs(1)).await;
    /// # }
    /// ```
    ///
    /// # Errors
    ///
    /// `TooManyWatchers`, `EpochMismatch`, `ResumeAhead`, `JobNotFound` /
    /// `JobGone` for a watched id, `ShuttingDown`, `Store`.
    pub async fn watch(
        &self,
        spec: WatchSpec,
    ) -> Result<BoxStream<'static, Result<WatchEvent, Error>>, Error> {
        let inner = &self.inner;
        if !inner.accepting.load(std::sync::atomic::Ordering::Acquire) {
            return Err(Error::ShuttingDown);
        }
        let events = &inner.events;
        let slot = events
            .subscribe()
            .map_err(|_| Error::TooManyWatchers(events.max_watchers()))?;
        if let Some((epoch, after)) = &spec.resume {
            if **events.epoch() != **epoch {
                return Err(Error::EpochMismatch {
                    asked: epoch.clone(),
                    current: events.epoch().to_string(),
                });
            }
            let latest = events.latest();
            if *after > latest {
                return Err(Error::ResumeAhead {
                    asked: *after,
                    latest,
                });
            }
        }
        let mut watcher = Watcher {
            inner: Arc::clone(inner),
            _slot: slot,
            mode: Mode::Filter(spec.filter),
            cursor: 0,
            batch: VecDeque::new(),
            ready: VecDeque::new(),
            stopping: false,
            ended: false,
        };
        if spec.ids.is_empty() {
            watcher.cursor = match spec.resume {
                Some((_, after)) => after,
                None => events.latest(),
            };
        } else {
            watcher.mode = Mode::Ids(Ids {
                watched: spec.ids.iter().copied().collect(),
                owed: HashSet::new(),
                final_sent: HashSet::new(),
                done_at: 0,
            });
            match spec.resume {
                Some((_, after)) => watcher.resume_ids(after).await?,
                None => watcher.snapshot_ids(true).await?,
            }
        }
        Ok(stream::unfold(watcher, |mut watcher| async move {
            let item = watcher.next().await?;
            Some((item, watcher))
        })
        .boxed())
    }

    /// Identifies this process's event numbering (see [`WatchEvent::seq`]):
    /// a fresh UUIDv7 on every start.
    #[must_use]
    pub fn stream_epoch(&self) -> &str {
        self.inner.events.epoch()
    }

    /// (job events held for `Watch`, open watch streams): the history never
    /// holds more than `EngineConfig::event_history`.
    #[must_use]
    pub fn event_stats(&self) -> (usize, usize) {
        self.inner.events.stats()
    }
}

enum Mode {
    Ids(Ids),
    Filter(WatchFilter),
}

struct Ids {
    watched: HashSet<JobId>,
    /// Ids whose final event this stream still owes.
    owed: HashSet<JobId>,
    /// Ids whose final event this stream has sent: later events of theirs
    /// (repeats of a snapshot) are skipped.
    final_sent: HashSet<JobId>,
    /// The stream may end once the cursor has reached this (on resume:
    /// the ids found finished have had their events replayed by then).
    done_at: u64,
}

struct Watcher {
    inner: Arc<Inner>,
    _slot: WatcherSlot,
    mode: Mode,
    /// The sequence number of the last history event consumed.
    cursor: u64,
    /// Events read from the history, not yet looked at.
    batch: VecDeque<Event>,
    /// Events ready to send (snapshots, lag notices).
    ready: VecDeque<WatchEvent>,
    /// The engine stopped: send what the history holds, then end.
    stopping: bool,
    ended: bool,
}

impl Watcher {
    async fn next(&mut self) -> Option<Result<WatchEvent, Error>> {
        loop {
            if let Some(event) = self.ready.pop_front() {
                return Some(Ok(event));
            }
            if self.ended {
                return None;
            }
            if let Mode::Ids(ids) = &self.mode
                && ids.owed.is_empty()
                && self.cursor >= ids.done_at
            {
                self.ended = true;
                return None;
            }
            if let Some(event) = self.batch.pop_front() {
                self.cursor = event.seq;
                if let Some(out) = self.admit(event).await {
                    return Some(Ok(out));
                }
                continue;
            }
            let hub = Arc::clone(&self.inner.events);
            let published = hub.published();
            tokio::pin!(published);
            // Registered before reading, so a publish after the read wakes us.
            published.as_mut().enable();
            match hub.read_after(self.cursor, BATCH, &mut self.batch) {
                Err(gap) => {
                    if let Err(err) = self.lagged(gap).await {
                        self.ended = true;
                        return Some(Err(err));
                    }
                    continue;
                }
                Ok(()) if !self.batch.is_empty() => continue,
                Ok(()) => {}
            }
            if self.stopping {
                self.ended = true;
                return Some(Err(Error::ShuttingDown));
            }
            tokio::select! {
                biased;
                () = &mut published => {}
                () = self.inner.stopped.cancelled() => self.stopping = true,
            }
        }
    }

    /// The event to send for `event`, if this watch wants it.
    async fn admit(&mut self, event: Event) -> Option<WatchEvent> {
        match &mut self.mode {
            Mode::Ids(ids) => {
                if !ids.watched.contains(&event.id) || ids.final_sent.contains(&event.id) {
                    return None;
                }
                if event.state.is_terminal() {
                    ids.owed.remove(&event.id);
                    ids.final_sent.insert(event.id);
                }
            }
            Mode::Filter(filter) => {
                if !filter.states.is_empty() && !filter.states.contains(&event.state)
                    || filter
                        .function
                        .as_deref()
                        .is_some_and(|f| *event.function != *f)
                    || !self.inner.store.has_labels(event.id, &filter.labels).await
                {
                    return None;
                }
            }
        }
        let outcome = if event.state.is_terminal() {
            self.inner.store.finished(event.id).await.map(|f| f.outcome)
        } else {
            None
        };
        Some(WatchEvent {
            seq: event.seq,
            kind: match event.kind {
                EventKind::State => WatchEventKind::State,
                EventKind::Progress => WatchEventKind::Progress,
            },
            job: Some(event.id),
            function: Some(event.function),
            state: Some(event.state),
            attempt: event.attempt,
            progress: event.progress,
            outcome,
            missed: 0,
        })
    }

    /// The history moved past the cursor: say so, then carry on as the
    /// mode allows.
    async fn lagged(&mut self, gap: Gap) -> Result<(), Error> {
        self.batch.clear();
        match self.mode {
            Mode::Filter(_) => {
                self.ready
                    .push_back(WatchEvent::lagged(gap.oldest - 1, gap.missed));
                self.cursor = gap.oldest - 1;
                Ok(())
            }
            Mode::Ids(_) => {
                let latest = self.inner.events.latest();
                self.ready
                    .push_back(WatchEvent::lagged(latest, latest - self.cursor));
                self.snapshot_ids(false).await
            }
        }
    }

    /// Sends each watched id's current state, except those whose final
    /// event was sent already, and continues from the newest event. On
    /// `subscribing`, an unknown id is an error; later (after a lag) an id
    /// that is gone was finished, and is no longer owed.
    async fn snapshot_ids(&mut self, subscribing: bool) -> Result<(), Error> {
        let Mode::Ids(ids) = &mut self.mode else {
            return Ok(());
        };
        // Read the newest number first: every event after it is sent too,
        // so no change between the two reads is lost (at worst repeated).
        let latest = self.inner.events.latest();
        let mut order: Vec<JobId> = ids.watched.difference(&ids.final_sent).copied().collect();
        order.sort_unstable();
        for id in order {
            let record = match self.inner.store.get(id).await {
                Ok(record) => record,
                Err(err) if subscribing => return Err(err),
                Err(_) => {
                    ids.owed.remove(&id);
                    continue;
                }
            };
            if record.state.is_terminal() {
                ids.owed.remove(&id);
                ids.final_sent.insert(id);
            } else {
                ids.owed.insert(id);
            }
            self.ready.push_back(WatchEvent::of_record(
                latest,
                WatchEventKind::Snapshot,
                record,
            ));
        }
        self.cursor = latest;
        ids.done_at = latest;
        Ok(())
    }

    /// Resuming a watch of ids: no snapshots; the history from `after` on
    /// is replayed. Ids unfinished now are owed a final event; ids finished
    /// already had theirs at or before the newest event, which the replay
    /// reaches before the stream may end.
    async fn resume_ids(&mut self, after: u64) -> Result<(), Error> {
        let Mode::Ids(ids) = &mut self.mode else {
            return Ok(());
        };
        for &id in &ids.watched {
            if !self.inner.store.state(id).await?.is_terminal() {
                ids.owed.insert(id);
            }
        }
        // Read after the states: a state seen finished was published at or
        // before this number.
        ids.done_at = self.inner.events.latest();
        self.cursor = after;
        Ok(())
    }
}

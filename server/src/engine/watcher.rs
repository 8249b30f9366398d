//! `Watch`: a stream of job events for a set of ids or a filter, read from
//! the store's event stream.
//!
//! A watcher is a cursor into the store's event history plus what it is
//! about to send, never a queue of its own: when it reads too slowly and the
//! history moves past its cursor, it gets a `Lagged` event saying how many
//! events it missed instead of losing them silently or holding them in
//! memory. A watch of ids then re-reads each unfinished id's state (a
//! `Snapshot`), so it still sees every final event; a filter watch continues
//! with the oldest event held.
//!
//! The stream is polled by the transport, which stops polling while the
//! client does not read (HTTP/2 flow control): nothing is produced ahead of
//! the reader, and dropping the stream (the client went away) frees
//! everything, its watcher slot included. No task is spawned per watcher.
//! A store error (a failed read of a job's labels or outcome) ends the
//! stream with that error, never drops an event silently.

use std::{
    collections::{BTreeMap, HashSet, VecDeque},
    sync::Arc,
};

use futures::{
    FutureExt as _,
    stream::{self, BoxStream, StreamExt as _},
};
use jobd_proto::{JobId, JobState};
use tokio::sync::OwnedSemaphorePermit;

use super::{Engine, Inner, found};
use crate::{
    Error,
    job::{JobRecord, Outcome, Progress},
    store::{Event, EventItem, EventKind, StoreError},
};

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
        let slot = inner.stream_slot()?;
        let head = inner.store.event_head();
        if let Some((epoch, after)) = &spec.resume {
            if *head.epoch != **epoch {
                return Err(Error::EpochMismatch {
                    asked: epoch.clone(),
                    current: head.epoch.to_string(),
                });
            }
            if *after > head.seq {
                return Err(Error::ResumeAhead {
                    asked: *after,
                    latest: head.seq,
                });
            }
        }
        let mut watcher = Watcher {
            inner: Arc::clone(inner),
            _slot: slot,
            mode: Mode::Filter(spec.filter),
            cursor: 0,
            events: None,
            ready: VecDeque::new(),
            stopping: false,
            ended: false,
        };
        if spec.ids.is_empty() {
            watcher.follow(match spec.resume {
                Some((_, after)) => after,
                None => head.seq,
            });
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
    pub fn stream_epoch(&self) -> String {
        self.inner.store.event_head().epoch.to_string()
    }

    /// (job events held for `Watch`, open watch streams): the history never
    /// holds more than `EngineConfig::event_history`.
    #[must_use]
    pub fn event_stats(&self) -> (usize, usize) {
        let inner = &self.inner;
        (
            inner.store.stats().events_held,
            inner.max_watchers - inner.watchers.available_permits(),
        )
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
    _slot: OwnedSemaphorePermit,
    mode: Mode,
    /// The sequence number of the last event consumed.
    cursor: u64,
    /// The store's events after the cursor.
    events: Option<BoxStream<'static, Result<EventItem, StoreError>>>,
    /// Events ready to send (snapshots, lag notices).
    ready: VecDeque<WatchEvent>,
    /// The engine stopped: send what the store holds now, then end.
    stopping: bool,
    ended: bool,
}

impl Watcher {
    /// Reads the store's events from `after` on.
    fn follow(&mut self, after: u64) {
        self.cursor = after;
        self.events = Some(self.inner.store.events(after));
    }

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
            let events = self.events.as_mut()?;
            let item = if self.stopping {
                // Drained: deliver what is there now, then end.
                match events.next().now_or_never() {
                    Some(item) => item,
                    None => {
                        self.ended = true;
                        return Some(Err(Error::ShuttingDown));
                    }
                }
            } else {
                tokio::select! {
                    biased;
                    item = events.next() => item,
                    () = self.inner.stopped.cancelled() => {
                        self.stopping = true;
                        continue;
                    }
                }
            };
            let result = match item {
                Some(Ok(EventItem::Event(event))) => {
                    self.cursor = event.seq;
                    match self.admit(event).await {
                        Ok(Some(out)) => return Some(Ok(out)),
                        Ok(None) => continue,
                        Err(err) => Err(err),
                    }
                }
                Some(Ok(EventItem::Lagged {
                    missed,
                    resumed_after,
                })) => self.lagged(missed, resumed_after).await,
                Some(Err(err)) => Err(Error::Store(err)),
                None => Err(Error::Store(StoreError::Unavailable(
                    "the job event stream ended".into(),
                ))),
            };
            if let Err(err) = result {
                self.ended = true;
                return Some(Err(err));
            }
        }
    }

    /// The event to send for `event`, if this watch wants it.
    async fn admit(&mut self, event: Event) -> Result<Option<WatchEvent>, Error> {
        // The job as it is now, read only when the event needs it: for a
        // label filter, and for a final event's outcome.
        let mut job: Option<Option<JobRecord>> = None;
        match &mut self.mode {
            Mode::Ids(ids) => {
                if !ids.watched.contains(&event.id) || ids.final_sent.contains(&event.id) {
                    return Ok(None);
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
                {
                    return Ok(None);
                }
                if !filter.labels.is_empty() {
                    let record = current(&self.inner, event.id).await?;
                    // A job gone by now (deleted or expired) is not shown.
                    let matches = record.as_ref().is_some_and(|record| {
                        filter
                            .labels
                            .iter()
                            .all(|(key, value)| record.labels.get(key) == Some(value))
                    });
                    if !matches {
                        return Ok(None);
                    }
                    job = Some(record);
                }
            }
        }
        let outcome = if event.state.is_terminal() {
            let record = match job {
                Some(record) => record,
                None => current(&self.inner, event.id).await?,
            };
            record.and_then(|record| record.outcome)
        } else {
            None
        };
        Ok(Some(WatchEvent {
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
        }))
    }

    /// The history moved past the cursor: say so, then carry on as the
    /// mode allows.
    async fn lagged(&mut self, missed: u64, resumed_after: u64) -> Result<(), Error> {
        match self.mode {
            Mode::Filter(_) => {
                self.ready
                    .push_back(WatchEvent::lagged(resumed_after, missed));
                self.cursor = resumed_after;
                Ok(())
            }
            Mode::Ids(_) => {
                let latest = self.inner.store.event_head().seq;
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
        let latest = self.inner.store.event_head().seq;
        let mut order: Vec<JobId> = ids.watched.difference(&ids.final_sent).copied().collect();
        order.sort_unstable();
        for id in order {
            let record = match found(id, self.inner.store.get(id).await) {
                Ok(record) => record,
                Err(err @ Error::Store(_)) => return Err(err),
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
        ids.done_at = latest;
        self.follow(latest);
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
            if !self.inner.state(id).await?.is_terminal() {
                ids.owed.insert(id);
            }
        }
        // Read after the states: a state seen finished was published at or
        // before this number.
        ids.done_at = self.inner.store.event_head().seq;
        self.follow(after);
        Ok(())
    }
}

/// The job as the store has it now; `None` if it is gone.
async fn current(inner: &Inner, id: JobId) -> Result<Option<JobRecord>, Error> {
    Ok(inner.store.get(id).await.map_err(Error::Store)?.ok())
}

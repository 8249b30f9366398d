//! `Watch`: a live stream of job events (state changes, progress, final
//! outcomes) for a set of jobs or for every job matching a filter: the
//! network's `add_done_callback`, with progress.

use std::{
    collections::{HashMap, HashSet},
    time::SystemTime,
};

use futures::{StreamExt as _, stream::BoxStream};
use jobd_proto::{JobId, JobState};

use crate::{
    Error, JobClient, JobOutcome,
    retry::{RETRY_PAUSES, breaks_connection},
    wire,
};

/// What to watch: job ids, or a filter (function, states, labels), not
/// both; and optionally where to resume.
///
/// ```
/// use jobd_client::{JobState, Watch};
/// let finished_resizes = Watch::all()
///     .function("resize")
///     .state(JobState::Succeeded)
///     .state(JobState::Failed)
///     .label("team", "media");
/// assert_eq!(finished_resizes.states.len(), 2);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Watch {
    /// The jobs to watch (1 to 1,000); empty to watch by filter.
    pub ids: Vec<JobId>,
    /// Only jobs of this function.
    pub function: Option<String>,
    /// Only events whose new state is one of these (progress events are
    /// `Running`).
    pub states: Vec<JobState>,
    /// Only jobs carrying all of these labels with these values.
    pub labels: HashMap<String, String>,
    /// Resume after this event (see [`JobEvent::resume_point`]).
    pub resume: Option<ResumePoint>,
    /// Reconnect by itself when the stream breaks (see
    /// [`Watch::auto_resume`]).
    pub auto_resume: bool,
}

impl Watch {
    /// Watches these jobs: a snapshot of each first (a finished job's final
    /// event at once), then every change; the stream ends after the final
    /// event of the last one.
    pub fn ids(ids: impl IntoIterator<Item = JobId>) -> Self {
        Self {
            ids: ids.into_iter().collect(),
            ..Self::default()
        }
    }

    /// Watches every job's events from now on (narrow it with the filter
    /// methods); the stream runs until dropped.
    #[must_use]
    pub fn all() -> Self {
        Self::default()
    }

    /// Only jobs of `function`.
    #[must_use]
    pub fn function(mut self, function: impl Into<String>) -> Self {
        self.function = Some(function.into());
        self
    }

    /// Also events that move a job into `state`.
    #[must_use]
    pub fn state(mut self, state: JobState) -> Self {
        self.states.push(state);
        self
    }

    /// Only jobs with label `key` set to `value`.
    #[must_use]
    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }

    /// Resumes after `point`: the server replays the matching events since
    /// then from its history, without snapshots.
    #[must_use]
    pub fn resume_after(mut self, point: ResumePoint) -> Self {
        self.resume = Some(point);
        self
    }

    /// With `true`, a stream that breaks (a transport error or
    /// `UNAVAILABLE`) resumes by itself: the client watches again with the
    /// last event's [`ResumePoint`] (and, for a watch of ids, only the ids
    /// whose final event it has not had yet), so the stream goes on with
    /// no gap and no repeat. It tries up to 3 times per break, pausing
    /// 50 ms, 200 ms, then 800 ms before each try (a resumed stream that
    /// breaks again before any event draws on the same 3), and then yields
    /// the error: so a server that shut down still ends the stream, about a
    /// second later. A server that restarted meanwhile refuses the resume with
    /// `FAILED_PRECONDITION`: that error ends the stream, since the caller
    /// must re-read the jobs' state. [`JobEventKind::Lagged`] events pass
    /// through as they come.
    ///
    /// It cannot resume a break before the stream's first event (there is
    /// no resume point yet, unless [`Watch::resume_after`] gave one), nor
    /// one in the middle of a watch of ids' snapshots (resuming sends no
    /// snapshots, so those not received would be lost): then the error
    /// ends the stream as without this option.
    ///
    /// ```no_run
    /// # async fn run(client: jobd_client::JobClient) -> Result<(), jobd_client::Error> {
    /// use futures::StreamExt as _;
    /// use jobd_client::Watch;
    ///
    /// let mut events = client
    ///     .watch(Watch::all().function("resize").auto_resume(true))
    ///     .await?;
    /// while let Some(event) = events.next().await {
    ///     // A dropped connection does not end the loop; a restarted
    ///     // server does (FAILED_PRECONDITION).
    ///     let event = event?;
    ///     println!("{} {:?} {:?}", event.seq, event.job, event.state);
    /// }
    /// # Ok(()) }
    /// ```
    #[must_use]
    pub fn auto_resume(mut self, on: bool) -> Self {
        self.auto_resume = on;
        self
    }
}

/// Where a watch stream got to: pass it to [`Watch::resume_after`] after a
/// reconnect to miss nothing the server still holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResumePoint {
    /// The server process's event numbering (it changes on restart).
    pub epoch: String,
    /// The last sequence number received.
    pub seq: u64,
}

/// What a [`JobEvent`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobEventKind {
    /// The job changed state.
    State,
    /// The running job reported progress.
    Progress,
    /// The job's state when the watch began (or again after a lag).
    Snapshot,
    /// The watcher fell behind (or resumed too late): [`JobEvent::missed`]
    /// server events were skipped. A watch of ids continues with fresh
    /// snapshots; a filter watch should re-read what it needs (list jobs).
    Lagged,
}

/// How far a running job says it is.
#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    /// Done so far, 0.0 to 1.0.
    pub fraction: f64,
    /// The job's short note (at most 256 bytes), possibly empty.
    pub message: String,
    /// When the server took the report.
    pub updated_at: Option<SystemTime>,
}

/// One event of a watch stream.
#[derive(Debug, Clone, PartialEq)]
pub struct JobEvent {
    /// The server-wide sequence number of the event.
    pub seq: u64,
    /// The server process's event numbering.
    pub epoch: String,
    /// What it reports.
    pub kind: JobEventKind,
    /// The job; `None` for [`JobEventKind::Lagged`].
    pub job: Option<JobId>,
    /// The job's function (empty for `Lagged`).
    pub function: String,
    /// The job's state after the event; `None` for `Lagged`.
    pub state: Option<JobState>,
    /// The job's attempt number (0 before it first starts).
    pub attempt: u32,
    /// The job's latest progress report, if any.
    pub progress: Option<Progress>,
    /// A finished job's outcome (value or error), as data.
    pub outcome: Option<JobOutcome>,
    /// For `Lagged`: how many server events were skipped.
    pub missed: u64,
}

impl JobEvent {
    /// Where to resume after this event.
    #[must_use]
    pub fn resume_point(&self) -> ResumePoint {
        ResumePoint {
            epoch: self.epoch.clone(),
            seq: self.seq,
        }
    }
}

impl JobClient {
    /// Streams job events for `watch`: `as_completed` and
    /// `add_done_callback` across the network, with progress. A watch of
    /// ids ends after each job's final event; a filter watch runs until
    /// dropped. Either ends with an error (`UNAVAILABLE`) when the server
    /// shuts down; reconnect with [`Watch::resume_after`] and the last
    /// event's [`JobEvent::resume_point`] to carry on without losing
    /// anything the server still holds, or let [`Watch::auto_resume`] do
    /// it when the connection breaks.
    ///
    /// ```no_run
    /// # async fn run(client: jobd_client::JobClient) -> Result<(), jobd_client::Error> {
    /// use futures::StreamExt as _;
    /// use jobd_client::Watch;
    ///
    /// let job = client.submit("count", serde_json::json!({"steps": 5})).await?;
    /// let mut events = client.watch(Watch::ids([job.id()])).await?;
    /// while let Some(event) = events.next().await {
    ///     let event = event?;
    ///     if let Some(progress) = &event.progress {
    ///         println!("{:.0}% {}", progress.fraction * 100.0, progress.message);
    ///     }
    ///     if let Some(outcome) = event.outcome {
    ///         println!("finished: {:?}", outcome.result);
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// At the start: [`Error::InvalidArgument`] (ids and a filter together,
    /// over 1,000 ids), [`Error::NotFound`] for an unknown id, [`Error::Rpc`]
    /// with `FAILED_PRECONDITION` (resuming across a server restart),
    /// `OUT_OF_RANGE` or `RESOURCE_EXHAUSTED` (too many watchers), and
    /// transport errors. In the stream: the error that ended it.
    pub async fn watch(
        &self,
        watch: Watch,
    ) -> Result<BoxStream<'static, Result<JobEvent, Error>>, Error> {
        if !watch.auto_resume {
            return self.watch_once(watch).await;
        }
        let events = self.watch_once(watch.clone()).await?;
        let resuming = Resuming::new(self.clone(), watch, events);
        Ok(
            futures::stream::unfold(resuming, |mut resuming| async move {
                let item = resuming.next().await?;
                Some((item, resuming))
            })
            .boxed(),
        )
    }

    /// One `Watch` call, without reconnecting.
    async fn watch_once(
        &self,
        watch: Watch,
    ) -> Result<BoxStream<'static, Result<JobEvent, Error>>, Error> {
        let events = self
            .rpc()
            .watch(wire::watch_request(watch))
            .await?
            .into_inner();
        Ok(events
            .map(|event| wire::job_event(event.map_err(Error::from)?))
            .boxed())
    }
}

/// An auto-resuming watch: the current stream plus what it takes to carry
/// on after a break without a gap or a repeat.
struct Resuming {
    client: JobClient,
    /// The request as first made (ids or filter).
    watch: Watch,
    events: BoxStream<'static, Result<JobEvent, Error>>,
    /// After the last event received (or the caller's own resume point).
    last: Option<ResumePoint>,
    /// A watch of ids: the ids whose final event has not come yet. A
    /// resume asks for these only (a finished id may have been deleted
    /// since, and the server would refuse it as unknown).
    unfinished: HashSet<JobId>,
    /// A watch of ids: the ids owed a snapshot (at the start, and again
    /// after a lag). The server resends no snapshots on resume, so a break
    /// while any is owed cannot be resumed without a gap.
    owed_snapshots: HashSet<JobId>,
    /// Resume tries since the last event received: a server that takes the
    /// resume but breaks again before sending anything uses up the same
    /// budget, so a break never turns into an endless loop.
    failed_tries: usize,
    ended: bool,
}

impl Resuming {
    fn new(
        client: JobClient,
        watch: Watch,
        events: BoxStream<'static, Result<JobEvent, Error>>,
    ) -> Self {
        let unfinished: HashSet<JobId> = watch.ids.iter().copied().collect();
        let owed_snapshots = if watch.resume.is_some() {
            HashSet::new()
        } else {
            unfinished.clone()
        };
        Self {
            client,
            last: watch.resume.clone(),
            watch,
            events,
            unfinished,
            owed_snapshots,
            failed_tries: 0,
            ended: false,
        }
    }

    fn watches_ids(&self) -> bool {
        !self.watch.ids.is_empty()
    }

    async fn next(&mut self) -> Option<Result<JobEvent, Error>> {
        if self.ended {
            return None;
        }
        loop {
            match self.events.next().await {
                Some(Ok(event)) => {
                    self.note(&event);
                    return Some(Ok(event));
                }
                None => {
                    self.ended = true;
                    return None;
                }
                Some(Err(err)) if breaks_connection(&err) => {
                    if self.watches_ids() && self.unfinished.is_empty() {
                        // Every final event arrived; only the server's OK
                        // was lost.
                        self.ended = true;
                        return None;
                    }
                    match self.resume(err).await {
                        Ok(events) => self.events = events,
                        Err(err) => {
                            self.ended = true;
                            return Some(Err(err));
                        }
                    }
                }
                Some(Err(err)) => {
                    self.ended = true;
                    return Some(Err(err));
                }
            }
        }
    }

    /// Keeps the books a resume needs.
    fn note(&mut self, event: &JobEvent) {
        self.last = Some(event.resume_point());
        self.failed_tries = 0;
        if !self.watches_ids() {
            return;
        }
        match (event.kind, event.job) {
            // The server re-snapshots each unfinished id after a lag.
            (JobEventKind::Lagged, _) => self.owed_snapshots = self.unfinished.clone(),
            (kind, Some(id)) => {
                if kind == JobEventKind::Snapshot {
                    self.owed_snapshots.remove(&id);
                }
                if event.state.is_some_and(JobState::is_terminal) {
                    self.unfinished.remove(&id);
                    self.owed_snapshots.remove(&id);
                }
            }
            (_, None) => {}
        }
    }

    /// Watches again from the last event, a bounded number of times;
    /// `broke` is the error that broke the stream, yielded when resuming is
    /// not possible.
    async fn resume(
        &mut self,
        broke: Error,
    ) -> Result<BoxStream<'static, Result<JobEvent, Error>>, Error> {
        let Some(point) = self.last.clone() else {
            return Err(broke);
        };
        if !self.owed_snapshots.is_empty() {
            return Err(broke);
        }
        let mut watch = self.watch.clone();
        if self.watches_ids() {
            let mut ids: Vec<JobId> = self.unfinished.iter().copied().collect();
            ids.sort_unstable();
            watch.ids = ids;
        }
        watch.resume = Some(point);
        let mut error = broke;
        // One resume after each of the client's retry pauses.
        while let Some(&delay) = RETRY_PAUSES.get(self.failed_tries) {
            self.failed_tries += 1;
            tracing::debug!(%error, attempt = self.failed_tries, "watch stream broke; resuming");
            tokio::time::sleep(delay).await;
            match self.client.watch_once(watch.clone()).await {
                Ok(events) => return Ok(events),
                Err(err) if breaks_connection(&err) => error = err,
                Err(err) => return Err(err),
            }
        }
        Err(error)
    }
}

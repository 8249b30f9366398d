//! `Watch`: a live stream of job events (state changes, progress, final
//! outcomes) for a set of jobs or for every job matching a filter: the
//! network's `add_done_callback`, with progress.

use std::{collections::HashMap, time::SystemTime};

use futures::{StreamExt as _, stream::BoxStream};
use jobd_proto::{JobId, JobState, pb};

use crate::{
    Error, JobClient, JobOutcome,
    client::{parse_id, parse_state},
    handle::outcome,
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
    /// anything the server still holds. There is no automatic reconnect.
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
        let (stream_epoch, after_seq) = watch
            .resume
            .map(|point| (point.epoch, point.seq))
            .unwrap_or_default();
        let request = pb::WatchRequest {
            job_ids: watch.ids.iter().map(ToString::to_string).collect(),
            function: watch.function.unwrap_or_default(),
            states: watch
                .states
                .into_iter()
                .map(|s| pb::JobState::from(s).into())
                .collect(),
            labels: watch.labels,
            after_seq,
            stream_epoch,
        };
        let events = self.rpc().watch(request).await?.into_inner();
        Ok(events
            .map(|event| job_event(event.map_err(Error::from)?))
            .boxed())
    }
}

fn job_event(event: pb::WatchEvent) -> Result<JobEvent, Error> {
    let kind = match pb::WatchEventKind::try_from(event.kind) {
        Ok(pb::WatchEventKind::State) => JobEventKind::State,
        Ok(pb::WatchEventKind::Progress) => JobEventKind::Progress,
        Ok(pb::WatchEventKind::Snapshot) => JobEventKind::Snapshot,
        Ok(pb::WatchEventKind::Lagged) => JobEventKind::Lagged,
        _ => {
            return Err(Error::Protocol(format!(
                "the server sent an unknown watch event kind {}",
                event.kind
            )));
        }
    };
    let (job, state) = if kind == JobEventKind::Lagged {
        (None, None)
    } else {
        (
            Some(parse_id(&event.job_id)?),
            Some(parse_state(event.state)?),
        )
    };
    Ok(JobEvent {
        seq: event.seq,
        epoch: event.stream_epoch,
        kind,
        job,
        function: event.function,
        state,
        attempt: event.attempt,
        progress: event.progress.map(progress),
        outcome: state.and_then(|state| outcome(state, event.value, event.error)),
        missed: event.missed,
    })
}

pub(crate) fn progress(progress: pb::Progress) -> Progress {
    Progress {
        fraction: progress.fraction,
        message: progress.message,
        updated_at: progress
            .update_time
            .and_then(|t| SystemTime::try_from(t).ok()),
    }
}

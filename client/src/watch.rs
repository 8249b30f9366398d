//! [`JobClient::watch`]: a live stream of job events (state changes,
//! progress, final outcomes) for a set of jobs or for every job matching a
//! filter: the network's `add_done_callback`, with progress. Also the
//! bookkeeping that resumes a broken stream without a gap or a repeat.

use std::collections::HashSet;

use futures::{StreamExt as _, stream::BoxStream};
use jobd_proto::{JobId, JobState};

use crate::{
    answer::{JobEvent, JobEventKind, ResumePoint},
    client::JobClient,
    error::Error,
    request::Watch,
    retry::{RETRY_PAUSES, breaks_connection},
    wire,
};

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

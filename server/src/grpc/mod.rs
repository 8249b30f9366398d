//! The gRPC face of the engine: `jobd.v1.JobService`. Each handler decodes
//! and validates its request ([`decode`]), calls the engine, and encodes the
//! answer; errors become statuses in one place ([`status`]).

mod deadline;
pub(crate) mod decode;
mod map;
mod status;
mod worker;

pub use self::worker::WorkerService;

use std::{sync::Arc, time::Duration};

use futures::{StreamExt as _, stream::BoxStream};
use jobd_proto::{JobState, pb, value};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::{Request, Response, Status};

use self::decode::Received;
use crate::{
    Error,
    engine::{CancelOutcome, Engine, SubmitSpec, WatchEvent, WatchEventKind, WatchSpec},
    function::PoolKind,
    job::{JobError, JobRecord, Outcome, Progress},
};

/// Implements `jobd.v1.JobService` over an [`Engine`].
#[derive(Clone)]
pub struct JobService {
    engine: Engine,
    /// The longest one Result or Wait call waits (`--max-wait`).
    max_wait: Duration,
    /// One permit per Result or Wait call in progress (`--max-waiters`).
    waiters: Arc<Semaphore>,
    max_waiters: usize,
}

impl JobService {
    /// Serves `engine`, with the default wait limits of
    /// [`ServerLimits`](crate::ServerLimits).
    #[must_use]
    pub fn new(engine: Engine) -> Self {
        let defaults = crate::ServerLimits::default();
        Self {
            engine,
            max_wait: defaults.max_wait,
            waiters: Arc::new(Semaphore::new(defaults.max_waiters)),
            max_waiters: defaults.max_waiters,
        }
    }

    /// Sets how long one `Result`/`Wait` call may wait at most, and how
    /// many may be in progress at once (see
    /// [`ServerLimits::max_wait`](crate::ServerLimits::max_wait)).
    ///
    /// ```no_run
    /// # async fn run() {
    /// use std::time::Duration;
    /// let engine = jobd::Engine::start(jobd::builtins::registry(), Default::default());
    /// let service = jobd::JobService::new(engine)
    ///     .with_wait_limits(Duration::from_secs(30), 1000)
    ///     .into_server();
    /// # }
    /// ```
    #[must_use]
    pub fn with_wait_limits(mut self, max_wait: Duration, max_waiters: usize) -> Self {
        self.max_wait = max_wait;
        self.waiters = Arc::new(Semaphore::new(max_waiters));
        self.max_waiters = max_waiters;
        self
    }

    /// A waiter slot for one Result or Wait call, or `TooManyWaiters` at once.
    fn waiter_slot(&self) -> Result<OwnedSemaphorePermit, Error> {
        Arc::clone(&self.waiters)
            .try_acquire_owned()
            .map_err(|_| Error::TooManyWaiters {
                max: self.max_waiters,
            })
    }

    /// How long a wait may last: the request's timeout, the caller's
    /// deadline and the server's cap, whichever ends first.
    fn wait_limit(&self, timeout: Option<Duration>, caller: Option<Duration>) -> Duration {
        earliest(earliest(timeout, caller), Some(self.max_wait)).unwrap_or(self.max_wait)
    }

    /// Wraps this service for `tonic::transport::Server::add_service`.
    #[must_use]
    pub fn into_server(self) -> pb::job_service_server::JobServiceServer<Self> {
        pb::job_service_server::JobServiceServer::new(self)
    }
}

#[tonic::async_trait]
impl pb::job_service_server::JobService for JobService {
    async fn submit(
        &self,
        request: Request<pb::SubmitRequest>,
    ) -> Result<Response<pb::SubmitResponse>, Status> {
        let spec = SubmitSpec::try_from(Received(request.into_inner(), self.engine.clock().now()))?;
        let (id, state) = self.engine.submit(spec).await?;
        Ok(Response::new(pb::SubmitResponse {
            job_id: id.to_string(),
            state: wire_state(state),
        }))
    }

    async fn submit_batch(
        &self,
        request: Request<pb::SubmitBatchRequest>,
    ) -> Result<Response<pb::SubmitBatchResponse>, Status> {
        let requests = request.into_inner().requests;
        let now = self.engine.clock().now();
        decode::batch_len(requests.len())?;
        // Malformed items are answered in place; the rest go to the engine
        // together so they share commits.
        let mut valid = Vec::with_capacity(requests.len());
        let decoded: Vec<Option<Error>> = requests
            .into_iter()
            .map(
                |request| match SubmitSpec::try_from(Received(request, now)) {
                    Ok(spec) => {
                        valid.push(spec);
                        None
                    }
                    Err(err) => Some(err),
                },
            )
            .collect();
        let mut admitted = self.engine.submit_batch(valid).await.into_iter();
        let results = decoded
            .into_iter()
            .map(|refused| {
                let answer = match refused {
                    None => admitted.next().unwrap_or(Err(Error::ShuttingDown)),
                    Some(err) => Err(err),
                };
                match answer {
                    Ok((id, state)) => pb::SubmitBatchResult {
                        job: Some(pb::SubmitResponse {
                            job_id: id.to_string(),
                            state: wire_state(state),
                        }),
                        error: None,
                    },
                    Err(err) => pb::SubmitBatchResult {
                        job: None,
                        error: Some(item_error(err)),
                    },
                }
            })
            .collect();
        Ok(Response::new(pb::SubmitBatchResponse { results }))
    }

    async fn done(
        &self,
        request: Request<pb::DoneRequest>,
    ) -> Result<Response<pb::DoneResponse>, Status> {
        let id = decode::job_id(&request.get_ref().job_id)?;
        let state = self.engine.state(id).await?;
        Ok(Response::new(pb::DoneResponse {
            done: state.is_terminal(),
            state: wire_state(state),
        }))
    }

    async fn result(
        &self,
        request: Request<pb::ResultRequest>,
    ) -> Result<Response<pb::ResultResponse>, Status> {
        let caller_deadline = deadline::remaining(request.metadata());
        let req = request.into_inner();
        let id = decode::job_id(&req.job_id)?;
        let timeout = decode::timeout("timeout", req.timeout)?;
        let _slot = self.waiter_slot()?;
        let limit = self.wait_limit(timeout, caller_deadline);
        let finished = tokio::time::timeout(limit, self.engine.wait(id))
            .await
            .map_err(|_| Error::WaitTimedOut(id))??;
        let (value, error) = wire_outcome(finished.outcome);
        Ok(Response::new(pb::ResultResponse {
            job_id: req.job_id,
            state: wire_state(finished.state),
            value,
            error,
        }))
    }

    async fn cancel(
        &self,
        request: Request<pb::CancelRequest>,
    ) -> Result<Response<pb::CancelResponse>, Status> {
        let id = decode::job_id(&request.get_ref().job_id)?;
        let (outcome, state) = self.engine.cancel(id).await?;
        Ok(Response::new(pb::CancelResponse {
            outcome: pb::CancelOutcome::from(outcome).into(),
            cancelled: outcome.cancelled(),
            state: wire_state(state),
        }))
    }

    async fn get_job(
        &self,
        request: Request<pb::GetJobRequest>,
    ) -> Result<Response<pb::GetJobResponse>, Status> {
        let id = decode::job_id(&request.get_ref().job_id)?;
        let record = self.engine.get(id).await?;
        Ok(Response::new(pb::GetJobResponse {
            job: Some(wire_job(record)),
        }))
    }

    async fn wait(
        &self,
        request: Request<pb::WaitRequest>,
    ) -> Result<Response<pb::WaitResponse>, Status> {
        let caller_deadline = deadline::remaining(request.metadata());
        let query = decode::WaitQuery::try_from(request.into_inner())?;
        let _slot = self.waiter_slot()?;
        // Unlike Result, running out of time is an answer here (as in
        // Python): the split at that moment, just before the caller's
        // deadline so that it arrives.
        let limit = self.wait_limit(query.timeout, caller_deadline);
        let split = self
            .engine
            .wait_many(&query.ids, query.return_when, Some(limit))
            .await?;
        let ids = |ids: Vec<jobd_proto::JobId>| ids.iter().map(ToString::to_string).collect();
        Ok(Response::new(pb::WaitResponse {
            done: ids(split.done),
            not_done: ids(split.not_done),
        }))
    }

    async fn list_jobs(
        &self,
        request: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        let query = decode::ListQuery::try_from(request.into_inner())?;
        let page = self
            .engine
            .list(&query.filter, query.before, query.page_size)
            .await?;
        Ok(Response::new(pb::ListJobsResponse {
            jobs: page.jobs.into_iter().map(wire_job).collect(),
            next_page_token: page
                .next
                .map(|last| decode::page_token(last, &query.filter))
                .unwrap_or_default(),
        }))
    }

    async fn delete_job(
        &self,
        request: Request<pb::DeleteJobRequest>,
    ) -> Result<Response<pb::DeleteJobResponse>, Status> {
        let id = decode::job_id(&request.get_ref().job_id)?;
        self.engine.delete(id).await?;
        Ok(Response::new(pb::DeleteJobResponse {}))
    }

    type WatchStream = BoxStream<'static, Result<pb::WatchEvent, Status>>;

    async fn watch(
        &self,
        request: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let spec = WatchSpec::try_from(request.into_inner())?;
        let events = self.engine.watch(spec).await?;
        let epoch = self.engine.stream_epoch();
        Ok(Response::new(
            events
                .map(move |event| {
                    event
                        .map(|event| wire_event(event, &epoch))
                        .map_err(Status::from)
                })
                .boxed(),
        ))
    }

    type MapStream = map::MapStream;

    async fn map(
        &self,
        request: Request<tonic::Streaming<pb::MapRequest>>,
    ) -> Result<Response<Self::MapStream>, Status> {
        let permit = request
            .extensions()
            .get::<crate::limits::InFlightPermit>()
            .cloned();
        let stream = map::start(self.engine.clone(), permit, request.into_inner()).await?;
        Ok(Response::new(stream))
    }

    async fn list_functions(
        &self,
        _request: Request<pb::ListFunctionsRequest>,
    ) -> Result<Response<pb::ListFunctionsResponse>, Status> {
        let info = |f: &crate::function::Function, workers: usize| pb::FunctionInfo {
            name: f.name().to_string(),
            pool: f.pool().as_str().to_owned(),
            pool_kind: wire_pool_kind(f.pool()).into(),
            description: f.description().to_owned(),
            args_schema: f.args_schema().cloned().map(value::from_json),
            returns: f.returns().unwrap_or_default().to_owned(),
            workers: u32::try_from(workers).unwrap_or(u32::MAX),
        };
        let mut functions: Vec<pb::FunctionInfo> = self
            .engine
            .registry()
            .iter()
            .map(|f| info(f, 0))
            .chain(
                self.engine
                    .worker_functions()
                    .iter()
                    .map(|(f, serving)| info(f, *serving)),
            )
            .collect();
        functions.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Response::new(pb::ListFunctionsResponse { functions }))
    }

    async fn list_workers(
        &self,
        _request: Request<pb::ListWorkersRequest>,
    ) -> Result<Response<pb::ListWorkersResponse>, Status> {
        let workers = self
            .engine
            .worker_sessions()
            .into_iter()
            .map(|w| pb::WorkerInfo {
                session_id: w.session_id,
                name: w.name,
                instance: w.instance,
                peer: w.peer.map(|p| p.to_string()).unwrap_or_default(),
                functions: w.functions,
                labels: w.labels.into_iter().collect(),
                slots: w.slots,
                busy: w.busy,
                running: w.running.iter().map(ToString::to_string).collect(),
                last_heartbeat: Some(w.last_heard.into()),
                attached_at: Some(w.attached_at.into()),
                version: w.version,
                draining: w.draining,
            })
            .collect();
        Ok(Response::new(pb::ListWorkersResponse { workers }))
    }

    type LogsStream = BoxStream<'static, Result<pb::LogsResponse, Status>>;

    async fn logs(
        &self,
        request: Request<pb::LogsRequest>,
    ) -> Result<Response<Self::LogsStream>, Status> {
        let request = request.into_inner();
        let id = decode::job_id(&request.job_id)?;
        let pages = self.engine.logs(id, request.offset, request.follow).await?;
        Ok(Response::new(
            pages
                .map(|page| page.map(wire_log_page).map_err(Status::from))
                .boxed(),
        ))
    }
}

fn wire_log_page(page: crate::job::LogPage) -> pb::LogsResponse {
    pb::LogsResponse {
        entries: page
            .entries
            .into_iter()
            .map(|entry| pb::LogEntry {
                offset: entry.offset,
                attempt: entry.attempt,
                stream: wire_log_stream(entry.stream).into(),
                at: Some(entry.at.into()),
                data: entry.data,
            })
            .collect(),
        skipped: page.skipped,
        next_offset: page.end,
    }
}

fn wire_log_stream(stream: crate::job::LogStream) -> pb::LogStream {
    match stream {
        crate::job::LogStream::Stdout => pb::LogStream::Stdout,
        crate::job::LogStream::Stderr => pb::LogStream::Stderr,
        crate::job::LogStream::Log => pb::LogStream::Log,
    }
}

/// The sooner of two optional limits.
fn earliest(a: Option<Duration>, b: Option<Duration>) -> Option<Duration> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// A refused submission as one item's answer (SubmitBatch, Map): the status
/// Submit would have failed with.
fn item_error(err: Error) -> pb::BatchItemError {
    let field_violations = status::field_violations(&err)
        .into_iter()
        .map(|(field, description)| pb::FieldViolation { field, description })
        .collect();
    let status = Status::from(err);
    pb::BatchItemError {
        code: status.code().into(),
        message: status.message().to_owned(),
        field_violations,
    }
}

fn wire_state(state: JobState) -> i32 {
    pb::JobState::from(state).into()
}

fn wire_pool_kind(pool: PoolKind) -> pb::PoolKind {
    match pool {
        PoolKind::Async => pb::PoolKind::Async,
        PoolKind::Blocking => pb::PoolKind::Blocking,
        PoolKind::Worker => pb::PoolKind::Worker,
        PoolKind::Process => pb::PoolKind::Process,
    }
}

impl From<CancelOutcome> for pb::CancelOutcome {
    fn from(outcome: CancelOutcome) -> Self {
        match outcome {
            CancelOutcome::Cancelled => Self::Cancelled,
            CancelOutcome::Aborted => Self::Aborted,
            CancelOutcome::Requested => Self::Requested,
            CancelOutcome::AlreadyDone => Self::AlreadyDone,
        }
    }
}

fn wire_error(err: JobError) -> pb::JobError {
    let kind = match &err {
        JobError::Failed(_) => pb::ErrorKind::Failed,
        JobError::Panicked(_) => pb::ErrorKind::Panicked,
        JobError::Cancelled => pb::ErrorKind::Cancelled,
        JobError::Interrupted(_) => pb::ErrorKind::Interrupted,
        JobError::TimedOut(_) => pb::ErrorKind::TimedOut,
        JobError::ResultTooLarge(_) => pb::ErrorKind::ResultTooLarge,
        JobError::WorkerLost(_) => pb::ErrorKind::WorkerLost,
        // Out of attempts: to the client it is a plain failure.
        JobError::Retryable(_) => pb::ErrorKind::Failed,
    };
    pb::JobError {
        kind: kind.into(),
        message: err.to_string(),
    }
}

fn wire_outcome(outcome: Outcome) -> (Option<prost_types::Value>, Option<pb::JobError>) {
    match outcome {
        Ok(v) => (Some(value::from_json(v)), None),
        Err(e) => (None, Some(wire_error(e))),
    }
}

fn wire_job(record: JobRecord) -> pb::Job {
    let (value, error) = record.outcome.map_or((None, None), wire_outcome);
    pb::Job {
        id: record.id.to_string(),
        function: record.function.to_string(),
        pool: record.pool.as_str().to_owned(),
        state: wire_state(record.state),
        args: Some(value::from_json(record.args)),
        labels: record.labels.into_iter().collect(),
        request_id: record.request_id.unwrap_or_default(),
        submit_time: Some(record.submitted_at.into()),
        start_time: record.started_at.map(Into::into),
        finish_time: record.finished_at.map(Into::into),
        attempt: record.attempt,
        value,
        error,
        priority: record.priority,
        not_before: record.not_before.map(Into::into),
        timeout: record
            .timeout
            .and_then(|t| prost_types::Duration::try_from(t).ok()),
        max_attempts: record.max_attempts,
        progress: record.progress.as_ref().map(wire_progress),
        worker_labels: record.worker_labels.into_iter().collect(),
    }
}

fn wire_progress(progress: &Progress) -> pb::Progress {
    pb::Progress {
        fraction: progress.fraction(),
        message: progress.message().to_owned(),
        update_time: Some(progress.at().into()),
    }
}

fn wire_event(event: WatchEvent, epoch: &str) -> pb::WatchEvent {
    let (value, error) = event.outcome.map_or((None, None), wire_outcome);
    let kind = match event.kind {
        WatchEventKind::State => pb::WatchEventKind::State,
        WatchEventKind::Progress => pb::WatchEventKind::Progress,
        WatchEventKind::Snapshot => pb::WatchEventKind::Snapshot,
        WatchEventKind::Lagged => pb::WatchEventKind::Lagged,
    };
    pb::WatchEvent {
        seq: event.seq,
        stream_epoch: epoch.to_owned(),
        kind: kind.into(),
        job_id: event.job.map(|id| id.to_string()).unwrap_or_default(),
        function: event.function.as_deref().unwrap_or_default().to_owned(),
        state: event.state.map_or(0, wire_state),
        attempt: event.attempt,
        progress: event.progress.as_ref().map(wire_progress),
        value,
        error,
        missed: event.missed,
    }
}

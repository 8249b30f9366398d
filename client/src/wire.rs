//! Every conversion between the generated `pb` types and the client's own:
//! requests built from what the caller asked for, and answers read into
//! what the caller gets back.
//!
//! It is the one place that knows the wire's conventions (an empty string
//! for "none", an `i32` for an enum, `UNSPECIFIED`, the well-known types),
//! so the modules that make calls never decode a field themselves; they
//! only wrap a job id in the request that carries it, and `map` frames its
//! arguments into messages by size. An answer this client cannot read (a
//! bad id, a state it does not know) is [`Error::Protocol`], never a panic;
//! an error kind or cancel outcome it does not know reads as `Unspecified`,
//! since the rest of the answer is still good.

use std::time::{Duration, SystemTime};

use jobd_proto::{JobId, JobState, pb, value};

use crate::{
    answer::{
        CancelOutcome, CancelReport, FunctionInfo, JobEvent, JobEventKind, JobInfo, JobOutcome,
        JobPage, LogEntry, LogPage, LogStream, MapItem, PoolKind, Progress, WorkerInfo,
    },
    error::{Error, ErrorKind},
    request::{ListFilter, MapOptions, ReturnWhen, Submission, Watch},
};

// Requests: the caller's types to the wire.

/// The wire form of a submission, with a fresh request id when the caller
/// gave none, so that retries are idempotent.
pub(crate) fn submit_request(submission: Submission) -> pb::SubmitRequest {
    pb::SubmitRequest {
        function: submission.function,
        args: Some(value::from_json(submission.args)),
        pool: submission.pool.unwrap_or_default(),
        request_id: submission
            .request_id
            .unwrap_or_else(|| uuid::Uuid::now_v7().to_string()),
        labels: submission.labels,
        priority: submission.priority,
        // The server takes at most one of them.
        delay: submission
            .delay
            .filter(|_| submission.not_before.is_none())
            .map(duration),
        not_before: submission.not_before.map(Into::into),
        timeout: submission.timeout.map(duration),
        max_attempts: submission.max_attempts,
        worker_labels: submission.worker_labels,
    }
}

/// The first message of a Map stream: what every job of the map shares.
pub(crate) fn map_start(options: MapOptions) -> pb::MapStart {
    pb::MapStart {
        function: options.function,
        pool: options.pool.unwrap_or_default(),
        labels: options.labels,
        priority: options.priority,
        timeout: options.timeout.map(duration),
        max_attempts: options.max_attempts,
        ordered: options.ordered,
        max_in_flight: options.max_in_flight,
    }
}

/// One `ListJobs` call for `filter`.
pub(crate) fn list_request(
    filter: &ListFilter,
    page_size: u32,
    page_token: String,
) -> pb::ListJobsRequest {
    pb::ListJobsRequest {
        states: filter.states.iter().map(|&s| state(s)).collect(),
        function: filter.function.clone().unwrap_or_default(),
        labels: filter.labels.clone(),
        submitted_after: filter.submitted_after.map(Into::into),
        submitted_before: filter.submitted_before.map(Into::into),
        // The server coerces anything above its maximum (1,000).
        page_size: i32::try_from(page_size).unwrap_or(i32::MAX),
        page_token,
    }
}

/// One `Wait` call for `job_ids`, waiting at most `timeout` on the server.
pub(crate) fn wait_request(
    job_ids: &[String],
    return_when: ReturnWhen,
    timeout: Option<Duration>,
) -> pb::WaitRequest {
    let return_when = match return_when {
        ReturnWhen::FirstCompleted => pb::ReturnWhen::FirstCompleted,
        ReturnWhen::FirstException => pb::ReturnWhen::FirstException,
        ReturnWhen::AllCompleted => pb::ReturnWhen::AllCompleted,
    };
    pb::WaitRequest {
        job_ids: job_ids.to_vec(),
        return_when: return_when.into(),
        timeout: timeout.map(duration),
    }
}

/// One `Watch` call for `watch`, resuming where it says.
pub(crate) fn watch_request(watch: Watch) -> pb::WatchRequest {
    let (stream_epoch, after_seq) = watch
        .resume
        .map(|point| (point.epoch, point.seq))
        .unwrap_or_default();
    pb::WatchRequest {
        job_ids: watch.ids.iter().map(ToString::to_string).collect(),
        function: watch.function.unwrap_or_default(),
        states: watch.states.into_iter().map(state).collect(),
        labels: watch.labels,
        after_seq,
        stream_epoch,
    }
}

/// A duration as `google.protobuf.Duration`, saturating far beyond any
/// limit the server accepts.
pub(crate) fn duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        // Always below 10^9, so it fits.
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

fn state(state: JobState) -> i32 {
    pb::JobState::from(state).into()
}

// Answers: the wire to the caller's types.

pub(crate) fn parse_id(raw: &str) -> Result<JobId, Error> {
    raw.parse()
        .map_err(|e| Error::Protocol(format!("the server sent a bad job id: {e}")))
}

pub(crate) fn parse_state(raw: i32) -> Result<JobState, Error> {
    JobState::try_from(raw)
        .map_err(|raw| Error::Protocol(format!("the server sent an unknown job state {raw}")))
}

/// The refusal of one item of a batch or a map, carried as a code and a
/// message instead of a status of the call.
fn refusal(code: i32, message: String) -> Error {
    Error::from(tonic::Status::new(tonic::Code::from_i32(code), message))
}

/// One item of a `SubmitBatch` answer: the accepted job, or why not.
pub(crate) fn batch_item(result: pb::SubmitBatchResult) -> Result<JobId, Error> {
    match (result.job, result.error) {
        (Some(job), _) => parse_id(&job.job_id),
        (None, Some(error)) => Err(refusal(error.code, error.message)),
        (None, None) => Err(Error::Protocol(
            "a batch result with neither job nor error".into(),
        )),
    }
}

pub(crate) fn function_info(f: pb::FunctionInfo) -> FunctionInfo {
    FunctionInfo {
        name: f.name,
        pool: f.pool,
        pool_kind: pool_kind(f.pool_kind),
        workers: f.workers,
        description: f.description,
        args_schema: f.args_schema.map(value::to_json),
        returns: Some(f.returns).filter(|r| !r.is_empty()),
    }
}

/// A function's pool kind; one this client does not know (a newer
/// server's) reads as unspecified.
fn pool_kind(raw: i32) -> PoolKind {
    // No `_` arm, as for error kinds.
    match pb::PoolKind::try_from(raw) {
        Ok(pb::PoolKind::Unspecified) | Err(_) => PoolKind::Unspecified,
        Ok(pb::PoolKind::Async) => PoolKind::Async,
        Ok(pb::PoolKind::Blocking) => PoolKind::Blocking,
        Ok(pb::PoolKind::Worker) => PoolKind::Worker,
        Ok(pb::PoolKind::Process) => PoolKind::Process,
    }
}

/// One attached worker session of a `ListWorkers` answer.
pub(crate) fn worker_info(w: pb::WorkerInfo) -> Result<WorkerInfo, Error> {
    Ok(WorkerInfo {
        session_id: w.session_id,
        name: w.name,
        instance: w.instance,
        peer: w.peer,
        functions: w.functions,
        labels: w.labels,
        slots: w.slots,
        busy: w.busy,
        running: w
            .running
            .iter()
            .map(|id| parse_id(id))
            .collect::<Result<_, _>>()?,
        last_heartbeat: time(w.last_heartbeat),
        attached_at: time(w.attached_at),
        version: w.version,
        draining: w.draining,
    })
}

/// The outcome of a terminal job; `None` if the state is not terminal.
fn outcome(
    state: JobState,
    value: Option<prost_types::Value>,
    error: Option<pb::JobError>,
) -> Option<JobOutcome> {
    if !state.is_terminal() {
        return None;
    }
    let result = match (state, error) {
        (JobState::Succeeded, _) => Ok(value::option_to_json(value)),
        (_, Some(e)) => Err((error_kind(e.kind), e.message)),
        (_, None) => Err((ErrorKind::Unspecified, state.to_string())),
    };
    Some(JobOutcome { state, result })
}

/// A `Result` answer, which the server gives only for a finished job.
pub(crate) fn result_outcome(answer: pb::ResultResponse) -> Result<JobOutcome, Error> {
    let state = parse_state(answer.state)?;
    outcome(state, answer.value, answer.error)
        .ok_or_else(|| Error::Protocol(format!("Result answered in state {state}")))
}

/// A job's error kind; one this client does not know (a newer server's)
/// reads as unspecified.
fn error_kind(raw: i32) -> ErrorKind {
    // No `_` arm: a kind added to the proto must be given a place here.
    match pb::ErrorKind::try_from(raw) {
        Ok(pb::ErrorKind::Unspecified) | Err(_) => ErrorKind::Unspecified,
        Ok(pb::ErrorKind::Failed) => ErrorKind::Failed,
        Ok(pb::ErrorKind::Panicked) => ErrorKind::Panicked,
        Ok(pb::ErrorKind::Cancelled) => ErrorKind::Cancelled,
        Ok(pb::ErrorKind::Interrupted) => ErrorKind::Interrupted,
        Ok(pb::ErrorKind::TimedOut) => ErrorKind::TimedOut,
        Ok(pb::ErrorKind::ResultTooLarge) => ErrorKind::ResultTooLarge,
        Ok(pb::ErrorKind::WorkerLost) => ErrorKind::WorkerLost,
    }
}

pub(crate) fn cancel_report(answer: pb::CancelResponse) -> Result<CancelReport, Error> {
    // No `_` arm, as for error kinds.
    let outcome = match pb::CancelOutcome::try_from(answer.outcome) {
        Ok(pb::CancelOutcome::Unspecified) | Err(_) => CancelOutcome::Unspecified,
        Ok(pb::CancelOutcome::Cancelled) => CancelOutcome::Cancelled,
        Ok(pb::CancelOutcome::Aborted) => CancelOutcome::Aborted,
        Ok(pb::CancelOutcome::Requested) => CancelOutcome::Requested,
        Ok(pb::CancelOutcome::AlreadyDone) => CancelOutcome::AlreadyDone,
    };
    Ok(CancelReport {
        outcome,
        cancelled: answer.cancelled,
        state: parse_state(answer.state)?,
    })
}

pub(crate) fn job_info(job: pb::Job) -> Result<JobInfo, Error> {
    let state = parse_state(job.state)?;
    Ok(JobInfo {
        id: parse_id(&job.id)?,
        function: job.function,
        pool: job.pool,
        state,
        args: value::option_to_json(job.args),
        labels: job.labels,
        worker_labels: job.worker_labels,
        request_id: Some(job.request_id).filter(|r| !r.is_empty()),
        submitted_at: time(job.submit_time),
        started_at: time(job.start_time),
        finished_at: time(job.finish_time),
        attempt: job.attempt,
        priority: job.priority,
        not_before: time(job.not_before),
        timeout: job.timeout.and_then(|t| Duration::try_from(t).ok()),
        max_attempts: job.max_attempts,
        outcome: outcome(state, job.value, job.error),
        progress: job.progress.map(progress),
    })
}

pub(crate) fn job_page(answer: pb::ListJobsResponse) -> Result<JobPage, Error> {
    Ok(JobPage {
        jobs: answer
            .jobs
            .into_iter()
            .map(job_info)
            .collect::<Result<_, _>>()?,
        next_page_token: Some(answer.next_page_token).filter(|t| !t.is_empty()),
    })
}

/// A `Wait` answer: the ids done and not done, each in the order asked.
pub(crate) fn wait_split(answer: pb::WaitResponse) -> Result<(Vec<JobId>, Vec<JobId>), Error> {
    let ids = |ids: Vec<String>| -> Result<Vec<JobId>, Error> {
        ids.iter().map(|id| parse_id(id)).collect()
    };
    Ok((ids(answer.done)?, ids(answer.not_done)?))
}

fn progress(progress: pb::Progress) -> Progress {
    Progress {
        fraction: progress.fraction,
        message: progress.message,
        updated_at: time(progress.update_time),
    }
}

pub(crate) fn job_event(event: pb::WatchEvent) -> Result<JobEvent, Error> {
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

/// One answer of a Map stream: the argument's job outcome, or the server's
/// refusal to submit it.
pub(crate) fn map_item(response: pb::MapResponse) -> Result<MapItem, Error> {
    let index = response.index;
    if let Some(rejected) = response.rejected {
        return Ok(MapItem {
            index,
            job: None,
            result: Err(refusal(rejected.code, rejected.message)),
        });
    }
    let id = parse_id(&response.job_id)?;
    let state = parse_state(response.state)?;
    let outcome = outcome(state, response.value, response.error)
        .ok_or_else(|| Error::Protocol(format!("a map result for job {id} in state {state}")))?;
    Ok(MapItem {
        index,
        job: Some(id),
        result: outcome.into_value(id),
    })
}

/// A page of a job's log as the server sent it.
pub(crate) fn log_page(page: pb::LogsResponse) -> LogPage {
    LogPage {
        entries: page
            .entries
            .into_iter()
            .map(|entry| LogEntry {
                offset: entry.offset,
                attempt: entry.attempt,
                stream: log_stream(entry.stream),
                at: time(entry.at),
                data: entry.data,
            })
            .collect(),
        skipped: page.skipped,
        next_offset: page.next_offset,
    }
}

fn log_stream(raw: i32) -> LogStream {
    match pb::LogStream::try_from(raw) {
        Ok(pb::LogStream::Stdout) => LogStream::Stdout,
        Ok(pb::LogStream::Stderr) => LogStream::Stderr,
        Ok(pb::LogStream::Log) => LogStream::Log,
        Ok(pb::LogStream::Unspecified) | Err(_) => LogStream::Unspecified,
    }
}

/// A timestamp the server sent, if it is one this platform can hold.
fn time(t: Option<prost_types::Timestamp>) -> Option<SystemTime> {
    t.and_then(|t| SystemTime::try_from(t).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_and_outcomes_this_client_does_not_know_read_as_unspecified() {
        assert_eq!(
            error_kind(pb::ErrorKind::TimedOut.into()),
            ErrorKind::TimedOut
        );
        assert_eq!(
            error_kind(pb::ErrorKind::Unspecified.into()),
            ErrorKind::Unspecified
        );
        assert_eq!(error_kind(99), ErrorKind::Unspecified);
        let report = |outcome: i32| {
            cancel_report(pb::CancelResponse {
                outcome,
                cancelled: false,
                state: pb::JobState::Running.into(),
            })
            .unwrap()
            .outcome
        };
        assert_eq!(
            report(pb::CancelOutcome::Requested.into()),
            CancelOutcome::Requested
        );
        assert_eq!(report(99), CancelOutcome::Unspecified);
    }

    #[test]
    fn filters_become_requests() {
        let request = list_request(
            &ListFilter::default()
                .state(JobState::Running)
                .function("hello")
                .label("k", "v"),
            5000,
            "tok".into(),
        );
        assert_eq!(request.states, [pb::JobState::Running as i32]);
        assert_eq!(request.function, "hello");
        assert_eq!(request.labels.get("k").map(String::as_str), Some("v"));
        assert_eq!(request.page_size, 5000);
        assert_eq!(request.page_token, "tok");
        assert_eq!(
            list_request(&ListFilter::default(), 0, String::new()).function,
            ""
        );
    }
}

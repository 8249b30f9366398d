//! Every conversion between the worker protocol's generated messages
//! (`jobd.v1.WorkerService`) and the worker's own types, as `wire` is for
//! the job API: the attach and its declarations, reports, progress, give
//! backs, and what jobd sends (attached, assignments, lost leases).
//!
//! It is the one place that knows the wire's conventions (an empty string
//! for "none", durations and timestamps as well-known types, a oneof per
//! message), so `session` reads and writes only the worker's own types.

use std::{collections::HashMap, time::Duration};

use jobd_proto::{
    JobId,
    pb::{self, server_message, worker_failure, worker_message},
    value,
};

use super::{
    ctx::{JobFailure, JobTerms, Lease},
    function::Function,
    jobs::{Ended, Finished},
};
use crate::{answer::LogStream, wire};

/// How often a worker speaks when jobd's `attached` did not say (an older
/// or odd jobd): well inside any lease timeout jobd would choose.
const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(5);

/// The shortest heartbeat interval the worker keeps to, whatever jobd says,
/// so that a zero cannot make it send heartbeats in a loop.
const MIN_HEARTBEAT: Duration = Duration::from_millis(10);

/// Who the worker is and what it serves, for `attach`.
pub(crate) struct Identity<'a> {
    pub(crate) name: &'a str,
    pub(crate) instance: &'a str,
    pub(crate) slots: u32,
    pub(crate) labels: &'a HashMap<String, String>,
    pub(crate) version: &'a str,
}

/// A lease still running here, for `attach.running`.
pub(crate) struct Held<'a> {
    pub(crate) lease: &'a Lease,
    pub(crate) attempt: u32,
}

fn message(kind: worker_message::Kind) -> pb::WorkerMessage {
    pb::WorkerMessage { kind: Some(kind) }
}

/// The first message of a session.
pub(crate) fn attach<'a>(
    who: &Identity<'_>,
    functions: impl IntoIterator<Item = &'a Function>,
    running: impl IntoIterator<Item = Held<'a>>,
) -> pb::WorkerMessage {
    message(worker_message::Kind::Attach(pb::Attach {
        name: who.name.to_owned(),
        instance: who.instance.to_owned(),
        functions: functions.into_iter().map(declaration).collect(),
        slots: who.slots,
        labels: who.labels.clone(),
        version: who.version.to_owned(),
        running: running
            .into_iter()
            .map(|held| pb::HeldLease {
                job_id: held.lease.job_id.clone(),
                attempt: held.attempt,
                fencing_token: held.lease.fencing_token,
            })
            .collect(),
    }))
}

fn declaration(function: &Function) -> pb::FunctionDeclaration {
    pb::FunctionDeclaration {
        name: function.name.clone(),
        description: function.description.clone(),
        args_schema: function.args_schema.clone().map(value::from_json),
        not_safe_to_retry: function.not_safe_to_retry,
        returns: function.returns.clone().unwrap_or_default(),
    }
}

pub(crate) fn heartbeat() -> pb::WorkerMessage {
    message(worker_message::Kind::Heartbeat(pb::Heartbeat {}))
}

pub(crate) fn draining() -> pb::WorkerMessage {
    message(worker_message::Kind::Draining(pb::Draining {}))
}

pub(crate) fn credit(slots: u32) -> pb::WorkerMessage {
    message(worker_message::Kind::Credit(pb::Credit { slots }))
}

pub(crate) fn cancel_ack(lease: &Lease) -> pb::WorkerMessage {
    message(worker_message::Kind::CancelAck(pb::CancelAck {
        job_id: lease.job_id.clone(),
        fencing_token: lease.fencing_token,
    }))
}

pub(crate) fn give_back(lease: &Lease) -> pb::WorkerMessage {
    message(worker_message::Kind::GiveBack(pb::GiveBack {
        job_id: lease.job_id.clone(),
        fencing_token: lease.fencing_token,
    }))
}

pub(crate) fn progress(lease: &Lease, fraction: f64, note: &str) -> pb::WorkerMessage {
    message(worker_message::Kind::Progress(pb::ProgressReport {
        job_id: lease.job_id.clone(),
        fencing_token: lease.fencing_token,
        // jobd clamps too; NaN is no fraction at all.
        fraction: if fraction.is_nan() {
            0.0
        } else {
            fraction.clamp(0.0, 1.0)
        },
        message: note.to_owned(),
    }))
}

/// Log lines of a running job.
pub(crate) fn log_lines(lease: &Lease, lines: Vec<(LogStream, Vec<u8>)>) -> pb::WorkerMessage {
    message(worker_message::Kind::Log(pb::LogLines {
        job_id: lease.job_id.clone(),
        fencing_token: lease.fencing_token,
        lines: lines
            .into_iter()
            .map(|(stream, data)| pb::LogLine {
                stream: log_stream(stream).into(),
                data,
            })
            .collect(),
    }))
}

fn log_stream(stream: LogStream) -> pb::LogStream {
    match stream {
        LogStream::Stdout => pb::LogStream::Stdout,
        LogStream::Stderr => pb::LogStream::Stderr,
        LogStream::Log | LogStream::Unspecified => pb::LogStream::Log,
    }
}

/// The report of a finished job.
pub(crate) fn report(finished: &Finished) -> pb::WorkerMessage {
    use pb::report::Outcome;
    use worker_failure::Kind;
    let failure = |kind: Kind, message: String| {
        Outcome::Failure(pb::WorkerFailure {
            kind: kind.into(),
            message,
        })
    };
    let outcome = match &finished.ended {
        Ended::Returned(Ok(value)) => Outcome::Value(value::from_json(value.clone())),
        Ended::Returned(Err(error)) => {
            let kind = match error {
                JobFailure::Failed(_) => Kind::Failed,
                JobFailure::Retryable(_) => Kind::Retryable,
                JobFailure::Cancelled => Kind::Cancelled,
                JobFailure::TimedOut(_) => Kind::TimedOut,
            };
            failure(kind, error.to_string())
        }
        Ended::Panicked(message) => failure(Kind::Panicked, format!("job panicked: {message}")),
        Ended::TooLarge { bytes, limit } => failure(
            Kind::Failed,
            format!(
                "result too large: {bytes} bytes of JSON, over the worker's limit of {limit} \
                 (Worker::max_result_bytes)"
            ),
        ),
    };
    message(worker_message::Kind::Report(pb::Report {
        job_id: finished.lease.job_id.clone(),
        fencing_token: finished.lease.fencing_token,
        outcome: Some(outcome),
    }))
}

/// jobd's answer to `attach`.
#[derive(Debug)]
pub(crate) struct Attached {
    pub(crate) session_id: String,
    pub(crate) heartbeat_interval: Duration,
    /// Leases of `attach.running` that are no longer this worker's.
    pub(crate) lost: Vec<Lease>,
}

/// One job to run.
#[derive(Debug)]
pub(crate) struct Assignment {
    pub(crate) lease: Lease,
    pub(crate) function: String,
    pub(crate) args: serde_json::Value,
    /// What the job's `Ctx` says; `Err` when the job id cannot be read (the
    /// job is then failed without running).
    pub(crate) terms: Result<JobTerms, String>,
}

/// A report's fate.
#[derive(Debug)]
pub(crate) struct Ack {
    pub(crate) lease: Lease,
    /// Why jobd refused it (`None`: it was committed).
    pub(crate) stale: Option<String>,
}

/// What jobd sends, in the worker's terms.
#[derive(Debug)]
pub(crate) enum FromJobd {
    Attached(Attached),
    Assignment(Assignment),
    Cancel(Lease),
    Ack(Ack),
    /// jobd is shutting down: take nothing new.
    Drain,
    /// A message this worker does not know (a newer jobd's), or none.
    Unknown,
}

fn lease(job_id: String, fencing_token: u64) -> Lease {
    Lease {
        job_id,
        fencing_token,
    }
}

pub(crate) fn from_jobd(message: pb::ServerMessage) -> FromJobd {
    match message.kind {
        Some(server_message::Kind::Attached(attached)) => FromJobd::Attached(Attached {
            session_id: attached.session_id,
            heartbeat_interval: attached
                .heartbeat_interval
                .and_then(|d| Duration::try_from(d).ok())
                .filter(|d| !d.is_zero())
                .unwrap_or(DEFAULT_HEARTBEAT)
                .max(MIN_HEARTBEAT),
            lost: attached
                .lost
                .into_iter()
                .map(|held| lease(held.job_id, held.fencing_token))
                .collect(),
        }),
        Some(server_message::Kind::Assignment(a)) => {
            let terms = wire::parse_id(&a.job_id)
                .map(|job_id: JobId| JobTerms {
                    job_id,
                    attempt: a.attempt,
                    max_attempts: a.max_attempts.max(1),
                    deadline: a
                        .deadline
                        .and_then(|t| std::time::SystemTime::try_from(t).ok()),
                })
                .map_err(|e| e.to_string());
            FromJobd::Assignment(Assignment {
                lease: lease(a.job_id, a.fencing_token),
                function: a.function,
                args: value::option_to_json(a.args),
                terms,
            })
        }
        Some(server_message::Kind::Cancel(cancel)) => {
            FromJobd::Cancel(lease(cancel.job_id, cancel.fencing_token))
        }
        Some(server_message::Kind::Ack(ack)) => {
            let stale = match pb::report_ack::Result::try_from(ack.result) {
                Ok(pb::report_ack::Result::Stale) => Some(ack.reason),
                // Accepted; or a result this worker does not know, which
                // cannot make it send the report again any better.
                _ => None,
            };
            FromJobd::Ack(Ack {
                lease: lease(ack.job_id, ack.fencing_token),
                stale,
            })
        }
        Some(server_message::Kind::Drain(_)) => FromJobd::Drain,
        None => FromJobd::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn lease(job_id: &str, fencing_token: u64) -> Lease {
        Lease {
            job_id: job_id.to_owned(),
            fencing_token,
        }
    }

    fn failure(finished: &Finished) -> (i32, String) {
        let Some(worker_message::Kind::Report(report)) = report(finished).kind else {
            panic!("a report");
        };
        match report.outcome {
            Some(pb::report::Outcome::Failure(f)) => (f.kind, f.message),
            other => panic!("not a failure: {other:?}"),
        }
    }

    #[test]
    fn every_ending_has_its_failure_kind() {
        let ended = |ended| Finished {
            lease: lease("j", 7),
            ended,
        };
        use worker_failure::Kind;
        let cases = [
            (
                Ended::Returned(Err(JobFailure::failed("boom"))),
                Kind::Failed,
                "boom",
            ),
            (
                Ended::Returned(Err(JobFailure::retryable("busy"))),
                Kind::Retryable,
                "busy",
            ),
            (
                Ended::Returned(Err(JobFailure::Cancelled)),
                Kind::Cancelled,
                "job was cancelled",
            ),
            (
                Ended::Panicked("oops".into()),
                Kind::Panicked,
                "job panicked: oops",
            ),
        ];
        for (end, kind, text) in cases {
            assert_eq!(failure(&ended(end)), (kind as i32, text.to_owned()));
        }
        let (kind, text) = failure(&ended(Ended::TooLarge {
            bytes: 10,
            limit: 5,
        }));
        assert_eq!(kind, Kind::Failed as i32);
        assert!(text.starts_with("result too large: 10 bytes"), "{text}");

        let Some(worker_message::Kind::Report(ok)) =
            report(&ended(Ended::Returned(Ok(json!([1]))))).kind
        else {
            panic!("a report");
        };
        assert_eq!((ok.job_id.as_str(), ok.fencing_token), ("j", 7));
        let Some(pb::report::Outcome::Value(v)) = ok.outcome else {
            panic!("a value");
        };
        assert_eq!(value::to_json(v), json!([1]));
    }

    #[test]
    fn a_heartbeat_interval_is_never_zero() {
        let attached = |interval: Option<prost_types::Duration>| {
            let FromJobd::Attached(a) = from_jobd(pb::ServerMessage {
                kind: Some(server_message::Kind::Attached(pb::Attached {
                    heartbeat_interval: interval,
                    ..Default::default()
                })),
            }) else {
                panic!("attached");
            };
            a.heartbeat_interval
        };
        assert_eq!(attached(None), DEFAULT_HEARTBEAT);
        assert_eq!(
            attached(Some(prost_types::Duration::default())),
            DEFAULT_HEARTBEAT
        );
        assert_eq!(
            attached(Some(prost_types::Duration {
                seconds: 0,
                nanos: 1
            })),
            MIN_HEARTBEAT
        );
        assert_eq!(
            attached(Some(prost_types::Duration {
                seconds: 2,
                nanos: 0
            })),
            Duration::from_secs(2)
        );
    }

    #[test]
    fn progress_is_clamped() {
        let fraction = |f: f64| match progress(&lease("j", 1), f, "").kind {
            Some(worker_message::Kind::Progress(p)) => p.fraction,
            _ => panic!("progress"),
        };
        assert_eq!(fraction(f64::NAN), 0.0);
        assert_eq!(fraction(1.5), 1.0);
        assert_eq!(fraction(0.25), 0.25);
    }
}

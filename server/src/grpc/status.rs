//! The one mapping from engine errors to gRPC status codes. Exhaustive with no
//! catch-all arm, so a new error variant cannot ship without choosing its code.
//!
//! Every refused request field travels twice: in the message, for humans,
//! and as a `google.rpc.BadRequest` detail with one field violation per
//! problem (`grpc-status-details-bin`), for programs. Internal failures
//! reach clients with a generic message only; their cause (paths, SQL) is
//! logged here.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt as _};

use crate::{Error, store::StoreError};

impl From<Error> for Status {
    fn from(err: Error) -> Self {
        let code = code(&err);
        match &err {
            Error::Store(cause) => {
                // Paths and SQL stay in the log; the client learns what it can act on.
                tracing::error!(%cause, "store error answered as {code:?}");
                let message = match code {
                    Code::ResourceExhausted => {
                        "the job store's disk is full; nothing was acknowledged"
                    }
                    _ => {
                        "the job store is unavailable; nothing was acknowledged (see the server log)"
                    }
                };
                Status::new(code, message)
            }
            Error::InvalidArgument { field, reason } => {
                let details = ErrorDetails::with_bad_request_violation(*field, reason.clone());
                Status::with_error_details(code, err.to_string(), details)
            }
            Error::ArgsRejected { violations, .. } => {
                let mut details = ErrorDetails::new();
                for violation in violations {
                    details.add_bad_request_violation(
                        violation.field.clone(),
                        violation.description.clone(),
                    );
                }
                Status::with_error_details(code, err.to_string(), details)
            }
            _ => Status::new(code, err.to_string()),
        }
    }
}

/// The field violations behind an error, as `(field, description)` pairs:
/// what a `google.rpc.BadRequest` detail carries, for answers (SubmitBatch
/// items) that hold them in a field of their own.
pub(crate) fn field_violations(err: &Error) -> Vec<(String, String)> {
    match err {
        Error::InvalidArgument { field, reason } => vec![((*field).to_owned(), reason.clone())],
        Error::ArgsRejected { violations, .. } => violations
            .iter()
            .map(|v| (v.field.clone(), v.description.clone()))
            .collect(),
        _ => Vec::new(),
    }
}

fn code(err: &Error) -> Code {
    match err {
        Error::UnknownFunction(_) | Error::JobNotFound(_) | Error::JobGone { .. } => Code::NotFound,
        Error::DuplicateRequest { .. } => Code::AlreadyExists,
        Error::JobNotFinished { .. }
        | Error::EpochMismatch { .. }
        | Error::FunctionConflict { .. }
        | Error::OutOfOrder(_) => Code::FailedPrecondition,
        Error::ResumeAhead { .. } => Code::OutOfRange,
        Error::InvalidArgument { .. } | Error::ArgsRejected { .. } => Code::InvalidArgument,
        Error::QueueFull { .. }
        | Error::TooManyWaiters { .. }
        | Error::TooManyWatchers(_)
        | Error::TooManyWorkers(_) => Code::ResourceExhausted,
        Error::ShuttingDown => Code::Unavailable,
        Error::WaitTimedOut(_) => Code::DeadlineExceeded,
        Error::Store(StoreError::DiskFull(_)) => Code::ResourceExhausted,
        Error::Store(
            StoreError::Unavailable(_)
            | StoreError::DataDir { .. }
            | StoreError::Locked(_)
            | StoreError::Open { .. },
        ) => Code::Unavailable,
    }
}

#[cfg(test)]
mod tests {
    use jobd_proto::JobId;

    use super::*;
    use crate::{ArgsViolation, function::PoolKind};

    #[test]
    fn codes_are_the_documented_ones() {
        let cases = [
            (Error::UnknownFunction("x".into()), Code::NotFound),
            (Error::JobNotFound(JobId::new()), Code::NotFound),
            (Error::invalid("job_id", "bad"), Code::InvalidArgument),
            (
                Error::ArgsRejected {
                    function: "f".into(),
                    violations: vec![],
                },
                Code::InvalidArgument,
            ),
            (
                Error::QueueFull {
                    pool: crate::PoolName::of(PoolKind::Async),
                    capacity: 1,
                },
                Code::ResourceExhausted,
            ),
            (Error::TooManyWaiters { max: 1 }, Code::ResourceExhausted),
            (Error::ShuttingDown, Code::Unavailable),
            (
                Error::JobNotFinished {
                    id: JobId::new(),
                    state: jobd_proto::JobState::Running,
                },
                Code::FailedPrecondition,
            ),
            (Error::WaitTimedOut(JobId::new()), Code::DeadlineExceeded),
            (Error::TooManyWatchers(1), Code::ResourceExhausted),
            (Error::TooManyWorkers(1), Code::ResourceExhausted),
            (
                Error::FunctionConflict {
                    function: "f".into(),
                    reason: "r".into(),
                },
                Code::FailedPrecondition,
            ),
            (
                Error::OutOfOrder("attach twice".into()),
                Code::FailedPrecondition,
            ),
            (
                Error::EpochMismatch {
                    asked: "a".into(),
                    current: "b".into(),
                },
                Code::FailedPrecondition,
            ),
            (
                Error::ResumeAhead {
                    asked: 9,
                    latest: 1,
                },
                Code::OutOfRange,
            ),
            (
                Error::JobGone {
                    id: JobId::new(),
                    gone: crate::store::Gone::Expired,
                },
                Code::NotFound,
            ),
            (
                Error::DuplicateRequest {
                    request_id: "r".into(),
                    existing: JobId::new(),
                },
                Code::AlreadyExists,
            ),
            (
                Error::Store(StoreError::DiskFull("x".into())),
                Code::ResourceExhausted,
            ),
            (
                Error::Store(StoreError::Unavailable("x".into())),
                Code::Unavailable,
            ),
        ];
        for (err, code) in cases {
            assert_eq!(Status::from(err).code(), code);
        }
    }

    #[test]
    fn invalid_arguments_carry_bad_request_field_violations() {
        let status = Status::from(Error::invalid("job_id", "is not a UUID"));
        let bad_request = status.get_details_bad_request().expect("BadRequest detail");
        assert_eq!(bad_request.field_violations.len(), 1);
        assert_eq!(bad_request.field_violations[0].field, "job_id");
        assert_eq!(bad_request.field_violations[0].description, "is not a UUID");

        let violation = |field: &str| ArgsViolation {
            field: field.into(),
            description: format!("{field} is wrong"),
        };
        let status = Status::from(Error::ArgsRejected {
            function: "f".into(),
            violations: vec![violation("args.a"), violation("args[1]")],
        });
        let fields: Vec<_> = status
            .get_details_bad_request()
            .expect("BadRequest detail")
            .field_violations
            .into_iter()
            .map(|v| v.field)
            .collect();
        assert_eq!(fields, ["args.a", "args[1]"]);
        assert!(status.message().contains("args.a: args.a is wrong"));
    }

    #[test]
    fn internal_errors_reach_clients_without_their_cause() {
        let secret = "/var/lib/jobd/jobs.db: UPDATE jobs SET ... failed";
        for cause in [
            StoreError::Unavailable(secret.into()),
            StoreError::DiskFull(secret.into()),
        ] {
            let status = Status::from(Error::Store(cause));
            assert!(!status.message().contains("/var/lib"), "{status:?}");
            assert!(!status.message().contains("UPDATE"), "{status:?}");
            assert!(status.details().is_empty());
        }
    }
}

//! The one mapping from engine errors to gRPC status codes. Exhaustive with no
//! catch-all arm, so a new error variant cannot ship without choosing its code.

use tonic::{Code, Status};

use crate::{Error, store::StoreError};

impl From<Error> for Status {
    fn from(err: Error) -> Self {
        let code = match &err {
            Error::UnknownFunction(_) | Error::JobNotFound(_) | Error::JobGone { .. } => {
                Code::NotFound
            }
            Error::DuplicateRequest { .. } => Code::AlreadyExists,
            Error::JobNotFinished { .. } | Error::EpochMismatch { .. } => Code::FailedPrecondition,
            Error::TooManyWatchers(_) => Code::ResourceExhausted,
            Error::ResumeAhead { .. } => Code::OutOfRange,
            Error::InvalidArgument { .. } => Code::InvalidArgument,
            Error::QueueFull { .. } => Code::ResourceExhausted,
            Error::ShuttingDown => Code::Unavailable,
            Error::WaitTimedOut(_) => Code::DeadlineExceeded,
            Error::Store(StoreError::DiskFull(_)) => Code::ResourceExhausted,
            Error::Store(
                StoreError::Unavailable(_)
                | StoreError::DataDir { .. }
                | StoreError::Locked(_)
                | StoreError::Open { .. },
            ) => Code::Unavailable,
        };
        if let Error::Store(cause) = &err {
            // Paths and SQL stay in the log; the client learns what it can act on.
            tracing::error!(%cause, "store error answered as {code:?}");
            let message = match code {
                Code::ResourceExhausted => "the job store's disk is full; nothing was acknowledged",
                _ => "the job store is unavailable; nothing was acknowledged (see the server log)",
            };
            return Status::new(code, message);
        }
        Status::new(code, err.to_string())
    }
}

#[cfg(test)]
mod tests {
    use jobd_proto::JobId;

    use super::*;
    use crate::function::PoolKind;

    #[test]
    fn codes_are_the_documented_ones() {
        let cases = [
            (Error::UnknownFunction("x".into()), Code::NotFound),
            (Error::JobNotFound(JobId::new()), Code::NotFound),
            (Error::invalid("job_id", "bad"), Code::InvalidArgument),
            (
                Error::QueueFull {
                    pool: PoolKind::Async,
                    capacity: 1,
                },
                Code::ResourceExhausted,
            ),
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
}

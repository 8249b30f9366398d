//! The one mapping from engine errors to gRPC status codes. Exhaustive with no
//! catch-all arm, so a new error variant cannot ship without choosing its code.

use tonic::{Code, Status};

use crate::Error;

impl From<Error> for Status {
    fn from(err: Error) -> Self {
        let code = match &err {
            Error::UnknownFunction(_) | Error::JobNotFound(_) => Code::NotFound,
            Error::InvalidArgument { .. } => Code::InvalidArgument,
            Error::QueueFull { .. } => Code::ResourceExhausted,
            Error::ShuttingDown => Code::Unavailable,
            Error::WaitTimedOut(_) => Code::DeadlineExceeded,
        };
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
            (Error::WaitTimedOut(JobId::new()), Code::DeadlineExceeded),
        ];
        for (err, code) in cases {
            assert_eq!(Status::from(err).code(), code);
        }
    }
}

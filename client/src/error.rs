//! The client's one error type: tells transport failures, unknown jobs,
//! timeouts, job failure and cancellation apart. Also [`ErrorKind`], the
//! kind of failure a job reports, which [`Error::JobFailed`] carries.

use jobd_proto::JobId;

/// Why a client call did not produce what was asked for.
///
/// Non-exhaustive: later versions may tell more failures apart, so a match
/// on it needs a `_` arm (for most callers, "the request failed").
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The server address is not a valid URI.
    #[error("invalid server address {addr:?}: {reason}")]
    InvalidAddress {
        /// The address as given.
        addr: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The connection options are unusable (bad PEM, a token that cannot be
    /// sent as a header, TLS settings for an `http://` address).
    #[error("invalid connection options: {0}")]
    InvalidOptions(String),
    /// The connection could not be made or broke.
    #[error("cannot reach jobd: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The job (or function) does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The server refused the request as malformed.
    #[error("invalid request: {0}")]
    InvalidArgument(String),
    /// The wait ended before the job did (a `Result` timeout or deadline).
    #[error("timed out waiting for the job")]
    Timeout,
    /// The job ran and failed (returned an error, panicked, or was interrupted).
    #[error("job {id} failed: {message}")]
    JobFailed {
        /// The job.
        id: JobId,
        /// Which kind of failure.
        kind: ErrorKind,
        /// The job's error message.
        message: String,
    },
    /// The job was cancelled.
    #[error("job {id} was cancelled")]
    Cancelled {
        /// The job.
        id: JobId,
    },
    /// Any other error status from the server (overload, shutdown, ...).
    #[error("jobd answered {}: {}", .0.code(), .0.message())]
    Rpc(tonic::Status),
    /// The server's answer could not be understood (a version mismatch?).
    #[error("unexpected answer from jobd: {0}")]
    Protocol(String),
    /// A value could not be converted to or from the requested Rust type.
    #[error("cannot convert job value: {0}")]
    Json(#[from] serde_json::Error),
    /// A [`Worker`](crate::Worker)'s definition is unusable (no function, a
    /// bad or repeated name, slots out of range); every mistake is named.
    #[error("invalid worker: {0}")]
    InvalidWorker(String),
}

/// Which kind of failure a job that did not succeed reports, in
/// [`Error::JobFailed`] and in a [`JobOutcome`](crate::JobOutcome)'s error.
/// The server may add kinds; one this client does not know reads as
/// [`ErrorKind::Unspecified`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The server named no kind, or one this client does not know (a newer
    /// server's).
    Unspecified,
    /// The function returned an error.
    Failed,
    /// The function panicked; the worker survived and the job failed.
    Panicked,
    /// The job was cancelled (before it started, aborted, or it honoured a
    /// cooperative cancel request).
    Cancelled,
    /// The job was interrupted because the server stopped while it ran.
    Interrupted,
    /// The job ran longer than the timeout it was submitted with: an async
    /// job was aborted; a blocking job was asked to stop and marked failed
    /// (its function may still run to the end, unheeded).
    TimedOut,
    /// The function returned a value larger than the server's result cap
    /// (`jobd --max-result-bytes`, measured as JSON); the value was dropped.
    ResultTooLarge,
    /// The remote worker running the job was lost and the job may not run
    /// again (its function is not safe to retry, or it lost its workers too
    /// many times in a row).
    WorkerLost,
}

impl ErrorKind {
    /// The kind's name in `snake_case`, as `jobctl -o json` prints it.
    ///
    /// ```
    /// assert_eq!(jobd_client::ErrorKind::TimedOut.as_str(), "timed_out");
    /// ```
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unspecified => "unspecified",
            Self::Failed => "failed",
            Self::Panicked => "panicked",
            Self::Cancelled => "cancelled",
            Self::Interrupted => "interrupted",
            Self::TimedOut => "timed_out",
            Self::ResultTooLarge => "result_too_large",
            Self::WorkerLost => "worker_lost",
        }
    }
}

impl Error {
    /// The gRPC status code behind this error, if it came from one.
    #[must_use]
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            Self::NotFound(_) => Some(tonic::Code::NotFound),
            Self::InvalidArgument(_) => Some(tonic::Code::InvalidArgument),
            Self::Timeout => Some(tonic::Code::DeadlineExceeded),
            Self::Rpc(status) => Some(status.code()),
            _ => None,
        }
    }

    /// True for failures of the request itself (transport or status), as
    /// opposed to the job failing or being cancelled.
    #[must_use]
    pub fn is_rpc_error(&self) -> bool {
        !matches!(self, Self::JobFailed { .. } | Self::Cancelled { .. })
    }
}

/// The status message, followed by every field violation of its
/// `google.rpc.BadRequest` detail that the message does not name already,
/// so that one line says everything the server refused.
fn with_violations(status: &tonic::Status) -> String {
    use tonic_types::StatusExt as _;
    let mut message = status.message().to_owned();
    if let Some(bad_request) = status.get_details_bad_request() {
        for violation in bad_request.field_violations {
            let named = format!("{}: ", violation.field);
            if !message.contains(&named)
                && !message.contains(&format!("invalid {}", violation.field))
            {
                message.push_str(&format!("; {named}{}", violation.description));
            }
        }
    }
    message
}

impl From<tonic::Status> for Error {
    fn from(status: tonic::Status) -> Self {
        match status.code() {
            tonic::Code::NotFound => Self::NotFound(status.message().to_owned()),
            tonic::Code::InvalidArgument => Self::InvalidArgument(with_violations(&status)),
            tonic::Code::DeadlineExceeded => Self::Timeout,
            // tonic's client reports a transport failure as UNAVAILABLE or
            // UNKNOWN with the source attached; keep the status as it is.
            _ => Self::Rpc(status),
        }
    }
}

#[cfg(test)]
mod tests {
    use tonic_types::{ErrorDetails, StatusExt as _};

    use super::*;

    #[test]
    fn invalid_argument_lists_field_violations_the_message_does_not_name() {
        let mut details = ErrorDetails::new();
        details
            .add_bad_request_violation("args.name", "5 is not of type \"string\"")
            .add_bad_request_violation("args.age", "-1 is less than 0");
        let status = tonic::Status::with_error_details(
            tonic::Code::InvalidArgument,
            "args do not match: args.name: 5 is not of type \"string\"",
            details,
        );
        let err = Error::from(status);
        assert_eq!(
            err.to_string(),
            "invalid request: args do not match: args.name: 5 is not of type \"string\"; \
             args.age: -1 is less than 0"
        );
        assert_eq!(err.code(), Some(tonic::Code::InvalidArgument));
    }
}

//! The client's one error type: tells transport failures, unknown jobs,
//! timeouts, job failure and cancellation apart.

use jobd_proto::{JobId, pb};

/// Why a client call did not produce what was asked for.
#[derive(Debug, thiserror::Error)]
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
        kind: pb::ErrorKind,
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

impl From<tonic::Status> for Error {
    fn from(status: tonic::Status) -> Self {
        match status.code() {
            tonic::Code::NotFound => Self::NotFound(status.message().to_owned()),
            tonic::Code::InvalidArgument => Self::InvalidArgument(status.message().to_owned()),
            tonic::Code::DeadlineExceeded => Self::Timeout,
            // tonic's client reports a transport failure as UNAVAILABLE or
            // UNKNOWN with the source attached; keep the status as it is.
            _ => Self::Rpc(status),
        }
    }
}

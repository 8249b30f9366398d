//! The errors the engine reports to its callers. They are mapped to gRPC
//! status codes in exactly one place, `grpc::status`.

use jobd_proto::JobId;

use crate::{
    function::ArgsViolation,
    job::PoolName,
    store::{Gone, StoreError},
};

/// Why a request to the engine failed. A job that failed is *not* an
/// `Error`: it is a [`Finished`](crate::job::Finished) job whose outcome says
/// so.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// No function of that name is registered.
    #[error("unknown job function {0:?}; see ListFunctions for the registered ones")]
    UnknownFunction(String),
    /// A request field is malformed.
    #[error("invalid {field}: {reason}")]
    InvalidArgument {
        /// The request field, as named in the .proto.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The argument does not match the function's declared schema.
    #[error("args do not match the schema of {function:?}: {}{}", first_violations(violations), if violations.len() > MAX_LISTED { " ..." } else { "" })]
    ArgsRejected {
        /// The function submitted.
        function: String,
        /// Every violation, each naming the part of `args` at fault.
        violations: Vec<ArgsViolation>,
    },
    /// As many `Result`/`Wait` calls as allowed are blocked already.
    #[error(
        "server busy: {max} Result/Wait calls are waiting already (--max-waiters); retry later"
    )]
    TooManyWaiters {
        /// The cap (`--max-waiters`).
        max: usize,
    },
    /// No job with that id exists, and none ever did as far as the server
    /// remembers.
    #[error("job {0} not found")]
    JobNotFound(JobId),
    /// The job existed but was removed.
    #[error("job {id} not found: it {}", match gone {
        Gone::Expired => "finished longer ago than the retention period and was removed",
        Gone::Deleted => "was deleted",
    })]
    JobGone {
        /// The job.
        id: JobId,
        /// Why it is gone.
        gone: Gone,
    },
    /// The job is pending or running, so it cannot be deleted.
    #[error("job {id} is {state}; cancel it first, then delete it once it has finished")]
    JobNotFinished {
        /// The job.
        id: JobId,
        /// Its state (pending or running).
        state: jobd_proto::JobState,
    },
    /// The request id was used before for a different submission.
    #[error(
        "request_id {request_id:?} was already used for job {existing} with a different function or arguments"
    )]
    DuplicateRequest {
        /// The reused request id.
        request_id: String,
        /// The job it belongs to.
        existing: JobId,
    },
    /// The pool's queue holds `capacity` jobs already.
    #[error("the {pool} pool's queue is full ({capacity} jobs waiting); retry later")]
    QueueFull {
        /// The pool that is full.
        pool: PoolName,
        /// Its queue capacity (`--max-queued`).
        capacity: usize,
    },
    /// The server is draining for shutdown and takes no new work.
    #[error("the server is shutting down")]
    ShuttingDown,
    /// A wait for a job ended before the job did: the request's timeout,
    /// the caller's deadline, or the server's cap on one wait
    /// (`--max-wait`), after which the caller asks again.
    #[error(
        "job {0} did not finish before the timeout (one Result call waits at most the server's --max-wait; call again to keep waiting)"
    )]
    WaitTimedOut(JobId),
    /// The server already serves its maximum of `Watch` streams.
    #[error("too many watch streams open (at most {0}); retry later")]
    TooManyWatchers(usize),
    /// A `Watch` resume names another server process's event numbering.
    #[error(
        "stream_epoch {asked:?} is not this server's ({current:?}): it restarted and numbers events anew; re-read state with GetJob/ListJobs and watch again without after_seq"
    )]
    EpochMismatch {
        /// The epoch the client resumed with.
        asked: String,
        /// This server process's epoch.
        current: String,
    },
    /// A `Watch` resume after an event that was never sent.
    #[error("after_seq {asked} is ahead of the newest event ({latest})")]
    ResumeAhead {
        /// The sequence number asked for.
        asked: u64,
        /// The newest one handed out.
        latest: u64,
    },
    /// A worker declared a function jobd cannot take from it: jobd has one
    /// of that name itself, or another worker serves it now with another
    /// contract.
    #[error("worker function {function:?} refused: {reason}")]
    FunctionConflict {
        /// The function.
        function: String,
        /// Why.
        reason: String,
    },
    /// As many worker sessions as allowed are attached already.
    #[error("too many workers attached (at most {0}); retry later")]
    TooManyWorkers(usize),
    /// A worker message came out of order (a second attach, a report
    /// before the attach).
    #[error("{0}")]
    OutOfOrder(String),
    /// The job store cannot be written (fail-stop) or read.
    #[error(transparent)]
    Store(StoreError),
}

/// How many schema violations an error message lists (the status's
/// BadRequest details carry them all).
const MAX_LISTED: usize = 3;

fn first_violations(violations: &[ArgsViolation]) -> String {
    violations
        .iter()
        .take(MAX_LISTED)
        .map(|v| format!("{}: {}", v.field, v.description))
        .collect::<Vec<_>>()
        .join("; ")
}

impl Error {
    pub(crate) fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field,
            reason: reason.into(),
        }
    }
}

//! Why a jobctl run did not succeed, the exit code each reason maps to, and
//! how it is told to the user: one line on stderr, never a Debug dump.
//!
//! The exit-code table is an exhaustive match over [`Failure`] (no `_` arm),
//! so a new kind of failure cannot be added without choosing its code. The
//! client library's error is `#[non_exhaustive]`: its variants are all
//! listed, and one it adds later counts as a failed request (exit 3) until
//! it is listed too.

use std::{error::Error as _, io, process::ExitCode, time::Duration};

use jobd_client::{Error as ClientError, JobId, JobState};

/// Everything that ends a run with a non-zero exit code once the command
/// line has parsed (clap's own errors go through [`usage_line`]).
#[derive(Debug, thiserror::Error)]
pub(crate) enum Failure {
    /// The connection to the server could not be made.
    #[error("cannot reach jobd at {addr}: {reason}")]
    Unreachable {
        /// The address as given.
        addr: String,
        /// The root cause, in a few words.
        reason: String,
    },
    /// The connection broke during a call (the server stopped or crashed).
    #[error("lost the connection to jobd at {addr}: {reason}")]
    ConnectionLost {
        /// The address as given.
        addr: String,
        /// The root cause, in a few words.
        reason: String,
    },
    /// `result --timeout` (or `submit --wait --timeout`) ran out.
    #[error("job {id} did not finish within {}s; it keeps running", .after.as_secs_f64())]
    TimedOut {
        /// The job waited for.
        id: JobId,
        /// The timeout given.
        after: Duration,
    },
    /// The user pressed Ctrl-C while jobctl waited for a job.
    #[error("interrupted; job {id} keeps running")]
    Interrupted {
        /// The job waited for.
        id: JobId,
    },
    /// The job ended without a value: not a failure of jobctl, but scripts
    /// must be able to tell from the exit code.
    #[error("{}", unsuccessful(*.id, *.state, .message))]
    Job {
        /// The job.
        id: JobId,
        /// FAILED or CANCELLED.
        state: JobState,
        /// The job's own error message.
        message: String,
    },
    /// `bench`: not one request of a phase succeeded, so there is nothing
    /// to measure.
    #[error("bench: {} {what} failed, none succeeded; the first error: {first}", .errors)]
    NothingSucceeded {
        /// What was attempted, in the plural: "health checks", "submits", ...
        what: &'static str,
        /// How many failed.
        errors: u64,
        /// The first failure, on one line.
        first: String,
    },
    /// `bench --worker-slots`: the worker the bench starts did not come to
    /// serve its function (jobd refused it, or it could not start).
    #[error("bench: the remote worker: {reason}")]
    BenchWorker {
        /// What went wrong, in a few words.
        reason: String,
    },
    /// `bench --server-pid`: the process's memory cannot be read.
    #[error("cannot read the memory of process {pid} (--server-pid): {reason}")]
    ServerMemory {
        /// The process id given.
        pid: u32,
        /// Why, in a few words.
        reason: String,
    },
    /// A file named by a flag (certificate, key, token) cannot be used.
    #[error("cannot use {what} {path}: {reason}")]
    File {
        /// Which flag's file, e.g. "--ca-cert".
        what: &'static str,
        /// The file.
        path: String,
        /// Why, in a few words.
        reason: String,
    },
    /// `map`: some inputs got no value (their lines say why).
    #[error("{failed} of {total} map jobs did not succeed")]
    MapUnsuccessful {
        /// Inputs whose job failed, was cancelled or was refused.
        failed: u64,
        /// Inputs answered.
        total: u64,
    },
    /// `map`: the Map stream ended with an error (the server refused a
    /// later request, e.g. an input over its message size limit, or the
    /// connection broke) after `answered` inputs were answered and printed.
    /// Inputs after those got no answer, so this is never a success.
    #[error("the map ended after {}: {}", answers(*.answered), .cause.describe())]
    MapStopped {
        /// Inputs answered (and printed) before the stream ended.
        answered: u64,
        /// Why it ended.
        cause: Box<Failure>,
    },
    /// `map`: stdin could not be read (e.g. it is not UTF-8 text).
    /// An `--exec` command whose program cannot be started here.
    #[error("--exec {name}: cannot run {program:?}: {reason}")]
    ExecProgram {
        name: String,
        program: String,
        reason: jobd_command::SpawnError,
    },

    #[error("cannot read stdin: {0}")]
    Stdin(io::Error),
    /// Any other failure reported by the client library.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// Stdout could not be written.
    #[error("cannot write the answer: {0}")]
    Output(#[from] io::Error),
}

/// The exit codes jobctl documents in `--help`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Exit {
    /// The job failed or was cancelled.
    JobUnsuccessful = 1,
    /// The command line was wrong (clap uses the same code for its errors).
    Usage = 2,
    /// The request failed: transport, unknown job or function, timeout, ...
    Rpc = 3,
    /// Ctrl-C, by the shell's 128 + SIGINT convention.
    Interrupted = 130,
}

impl Failure {
    /// The one line to print on stderr, or `None` when silence is right.
    pub(crate) fn message(&self) -> Option<String> {
        if self.is_broken_pipe() {
            return None;
        }
        Some(format!("jobctl: {}", self.describe()))
    }

    /// The failure on one line, without the `jobctl: ` prefix: for reports
    /// that quote an error among other things.
    pub(crate) fn describe(&self) -> String {
        one_line(self)
    }

    /// The process exit code for this failure.
    pub(crate) fn exit_code(&self) -> ExitCode {
        ExitCode::from(self.code())
    }

    fn code(&self) -> u8 {
        if self.is_broken_pipe() {
            // The reader went away (`jobctl functions | head -1`): it got what
            // it wanted, as with ripgrep or cat.
            return 0;
        }
        let exit = match self {
            Self::Unreachable { .. }
            | Self::ConnectionLost { .. }
            | Self::TimedOut { .. }
            | Self::NothingSucceeded { .. }
            | Self::BenchWorker { .. }
            | Self::MapStopped { .. } => Exit::Rpc,
            Self::ServerMemory { .. }
            | Self::File { .. }
            | Self::Stdin(_)
            | Self::ExecProgram { .. } => Exit::Usage,
            Self::Interrupted { .. } => Exit::Interrupted,
            Self::Job { .. } | Self::MapUnsuccessful { .. } | Self::Output(_) => {
                Exit::JobUnsuccessful
            }
            Self::Client(error) => match error {
                ClientError::InvalidAddress { .. }
                | ClientError::InvalidOptions(_)
                | ClientError::InvalidWorker(_) => Exit::Usage,
                ClientError::JobFailed { .. } | ClientError::Cancelled { .. } => {
                    Exit::JobUnsuccessful
                }
                ClientError::Transport(_)
                | ClientError::NotFound(_)
                | ClientError::InvalidArgument(_)
                | ClientError::Timeout
                | ClientError::Rpc(_)
                | ClientError::Protocol(_)
                | ClientError::Json(_) => Exit::Rpc,
                // A variant newer than this table: every variant but the
                // job's own failures and bad options is a failed request.
                _ => Exit::Rpc,
            },
        };
        exit as u8
    }

    /// Tells a broken connection from an answer of the server. tonic reports
    /// both as a status, but only one made up by the client carries the
    /// transport error as its source.
    pub(crate) fn lost_connection(self, addr: &str) -> Self {
        if let Self::MapStopped { answered, cause } = self {
            return Self::MapStopped {
                answered,
                cause: Box::new(cause.lost_connection(addr)),
            };
        }
        match &self {
            Self::Client(ClientError::Rpc(status)) => match status.source() {
                Some(cause) => Self::ConnectionLost {
                    addr: addr.to_owned(),
                    reason: root_cause(cause),
                },
                None => self,
            },
            _ => self,
        }
    }

    fn is_broken_pipe(&self) -> bool {
        matches!(self, Self::Output(e) if e.kind() == io::ErrorKind::BrokenPipe)
    }
}

/// A usage error from clap on one line, like every other error: clap's
/// message and tips without the usage block, which `--help` shows anyway.
pub(crate) fn usage_line(error: &clap::Error) -> String {
    let rendered = error.render().to_string();
    let parts: Vec<String> = rendered
        .split("\n\n")
        .map(str::trim)
        .filter(|part| {
            !part.is_empty()
                && !part.starts_with("Usage:")
                && !part.starts_with("For more information")
        })
        .map(|part| part.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    let message = parts.join("; ");
    let message = message.strip_prefix("error: ").unwrap_or(&message);
    format!("jobctl: {message} (see --help)")
}

fn answers(count: u64) -> String {
    match count {
        1 => "1 answer".to_owned(),
        _ => format!("{count} answers"),
    }
}

fn unsuccessful(id: JobId, state: JobState, message: &str) -> String {
    // The server's message already says how it failed ("job panicked: ...");
    // the kind is in the JSON output for scripts that care.
    match (state, message) {
        (JobState::Cancelled, _) => format!("job {id} was cancelled"),
        (_, "") => format!("job {id} failed"),
        (_, message) => format!("job {id} failed: {message}"),
    }
}

/// The error and its causes on one line, joined with ": ". A cause whose text
/// its parent already shows (thiserror's `{0}` plus `#[from]` does that) is
/// skipped, and line breaks inside messages are flattened.
fn one_line(error: &dyn std::error::Error) -> String {
    let mut line = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        let text = e.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        cause = e.source();
    }
    line.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Says in a few words why a connection failed: the innermost I/O error if
/// there is one (that is what the user can act on), else the innermost cause.
pub(crate) fn root_cause(error: &(dyn std::error::Error + 'static)) -> String {
    let mut innermost = error;
    let mut cause = Some(error);
    while let Some(e) = cause {
        if let Some(io) = e.downcast_ref::<io::Error>() {
            return io_reason(io);
        }
        innermost = e;
        cause = e.source();
    }
    one_line(innermost)
}

fn io_reason(error: &io::Error) -> String {
    match error.kind() {
        io::ErrorKind::ConnectionRefused => "connection refused".to_owned(),
        io::ErrorKind::ConnectionReset => "connection reset".to_owned(),
        io::ErrorKind::TimedOut => "connection timed out".to_owned(),
        _ => one_line(error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer: {0}")]
    struct Outer(#[source] Inner);

    #[derive(Debug, thiserror::Error)]
    #[error("inner\nsecond line")]
    struct Inner(#[source] io::Error);

    #[test]
    fn causes_are_joined_on_one_line_without_repeats() {
        let error = Outer(Inner(io::Error::other("root")));
        assert_eq!(one_line(&error), "outer: inner second line: root");
    }

    #[test]
    fn exit_codes_follow_the_documented_table() {
        let id = JobId::new();
        let code = |f: Failure| f.code();
        let job = Failure::Job {
            id,
            state: JobState::Failed,
            message: "boom".to_owned(),
        };
        assert_eq!(code(job), 1);
        assert_eq!(
            code(Failure::Client(ClientError::InvalidAddress {
                addr: "x".to_owned(),
                reason: "y".to_owned()
            })),
            2
        );
        assert_eq!(
            code(Failure::Client(ClientError::NotFound("job".to_owned()))),
            3
        );
        assert_eq!(
            code(Failure::TimedOut {
                id,
                after: Duration::from_millis(200)
            }),
            3
        );
        assert_eq!(
            code(Failure::NothingSucceeded {
                what: "submits",
                errors: 5,
                first: "queue full".to_owned()
            }),
            3
        );
        assert_eq!(
            code(Failure::ServerMemory {
                pid: 1,
                reason: "no such process".to_owned()
            }),
            2
        );
        let pipe = Failure::Output(io::Error::from(io::ErrorKind::BrokenPipe));
        assert_eq!(pipe.message(), None);
        assert_eq!(code(pipe), 0);
    }

    #[test]
    fn a_map_that_stopped_early_exits_3_and_says_how_far_it_got() {
        let stopped = |answered| Failure::MapStopped {
            answered,
            cause: Box::new(Failure::Client(ClientError::Rpc(
                tonic::Status::out_of_range("message length too large"),
            ))),
        };
        assert_eq!(stopped(2).code(), 3);
        let message = stopped(2).message().unwrap();
        assert!(
            message.starts_with("jobctl: the map ended after 2 answers: jobd answered "),
            "{message}"
        );
        assert!(message.ends_with(": message length too large"), "{message}");
        assert!(stopped(1).message().unwrap().contains("after 1 answer:"));
        // A connection that broke under the map is told as such.
        let broken = Failure::MapStopped {
            answered: 0,
            cause: Box::new(Failure::Client(ClientError::Rpc(
                tonic::Status::from_error(Box::new(io::Error::from(
                    io::ErrorKind::ConnectionReset,
                ))),
            ))),
        }
        .lost_connection("http://h:1");
        assert_eq!(
            broken.message().unwrap(),
            "jobctl: the map ended after 0 answers: lost the connection to jobd at http://h:1: \
             connection reset"
        );
    }

    #[test]
    fn job_failures_read_as_sentences() {
        let id = JobId::new();
        let failed = Failure::Job {
            id,
            state: JobState::Failed,
            message: "boom".to_owned(),
        };
        assert_eq!(
            failed.message().unwrap(),
            format!("jobctl: job {id} failed: boom")
        );
        let cancelled = Failure::Job {
            id,
            state: JobState::Cancelled,
            message: "cancelled".to_owned(),
        };
        assert_eq!(
            cancelled.message().unwrap(),
            format!("jobctl: job {id} was cancelled")
        );
    }
}

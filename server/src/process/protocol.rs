//! What the server and a process-pool child say to each other: one JSON
//! object per line, over the child's stdin (server to child) and the
//! child's stdout (child to server). Both ends are this crate, built into
//! the same program, so the protocol is private and versioned only to
//! catch a child program built from another version of jobd.
//!
//! A conversation: the server says `hello` (with the limits the child
//! sets on itself), the child answers `ready`; then, one job at a time,
//! the server sends a `job`, and the child answers with any number of
//! `progress` and `log` messages and one `done`. JSON lines suit this:
//! serde_json escapes every newline inside a value, a line is easy to bound
//! on the reading side, and a human can read a captured conversation.

use serde::{Deserialize, Serialize};

use crate::job::{JobError, LogStream, Outcome};

/// The first argument of a child: a program started with it serves jobs
/// (see [`run_child_if_requested`](super::run_child_if_requested)). An
/// argument rather than an environment variable, so that a program that
/// does not know it (one whose `main` forgot the call) fails on an unknown
/// argument instead of starting a second server, and so that nothing the
/// job starts inherits the marker.
pub(crate) const CHILD_FLAG: &str = "--jobd-process-child";

/// Bumped whenever a message changes meaning.
pub(crate) const VERSION: u32 = 1;

/// The longest piece of output one `log` message carries; longer output is
/// sent as several messages, so no line of the protocol grows with what a
/// job prints.
pub(crate) const MAX_LOG_CHUNK: usize = 64 * 1024;

/// From the server to a child.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub(crate) enum ToChild {
    /// The first message: who the child works for and under which limits.
    Hello {
        version: u32,
        /// The address-space limit (RLIMIT_AS) the child sets on itself
        /// before it runs anything, in bytes.
        memory_limit: Option<u64>,
        /// Results longer than this (as JSON text) are not sent back: the
        /// child reports the job failed instead.
        max_result_bytes: usize,
    },
    /// Run one job.
    Job {
        id: String,
        attempt: u32,
        function: String,
        args: serde_json::Value,
    },
}

/// From a child to the server.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub(crate) enum FromChild {
    /// The answer to `hello`: the child has set its limits and waits for
    /// jobs.
    Ready { version: u32, pid: u32 },
    /// The answer to `hello` when the child cannot serve (another protocol
    /// version, a limit it could not set); it exits after saying so.
    Refused { reason: String },
    /// The running job's `Ctx::set_progress`.
    Progress { fraction: f64, message: String },
    /// The running job's `Ctx::log` and `Ctx::log_output`.
    Log { stream: Stream, data: Bytes },
    /// The running job's end.
    Done {
        outcome: WireOutcome,
        /// Processes the job started were still running when it returned;
        /// the server stops them (with this child) before it ends the job.
        leftovers: bool,
    },
}

/// [`LogStream`] on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Stream {
    Stdout,
    Stderr,
    Log,
}

impl From<LogStream> for Stream {
    fn from(stream: LogStream) -> Self {
        match stream {
            LogStream::Stdout => Self::Stdout,
            LogStream::Stderr => Self::Stderr,
            LogStream::Log => Self::Log,
        }
    }
}

impl From<Stream> for LogStream {
    fn from(stream: Stream) -> Self {
        match stream {
            Stream::Stdout => Self::Stdout,
            Stream::Stderr => Self::Stderr,
            Stream::Log => Self::Log,
        }
    }
}

/// Output bytes: a JSON string when they are UTF-8 (nearly always, and
/// compact), an array of numbers when not, so no byte is lost.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub(crate) enum Bytes {
    Text(String),
    Raw(Vec<u8>),
}

impl Bytes {
    pub(crate) fn new(data: &[u8]) -> Self {
        match std::str::from_utf8(data) {
            Ok(text) => Self::Text(text.to_owned()),
            Err(_) => Self::Raw(data.to_vec()),
        }
    }

    pub(crate) fn into_vec(self) -> Vec<u8> {
        match self {
            Self::Text(text) => text.into_bytes(),
            Self::Raw(bytes) => bytes,
        }
    }
}

/// An [`Outcome`] on the wire.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum WireOutcome {
    Ok(serde_json::Value),
    Err { kind: ErrorKind, message: String },
}

/// The variants of [`JobError`], by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum ErrorKind {
    Failed,
    Panicked,
    Cancelled,
    Interrupted,
    TimedOut,
    Retryable,
    ResultTooLarge,
    WorkerLost,
}

impl From<Outcome> for WireOutcome {
    fn from(outcome: Outcome) -> Self {
        let err = match outcome {
            Ok(value) => return Self::Ok(value),
            Err(err) => err,
        };
        let (kind, message) = match err {
            JobError::Failed(m) => (ErrorKind::Failed, m),
            JobError::Panicked(m) => (ErrorKind::Panicked, m),
            JobError::Cancelled => (ErrorKind::Cancelled, String::new()),
            JobError::Interrupted(m) => (ErrorKind::Interrupted, m),
            JobError::TimedOut(m) => (ErrorKind::TimedOut, m),
            JobError::Retryable(m) => (ErrorKind::Retryable, m),
            JobError::ResultTooLarge(m) => (ErrorKind::ResultTooLarge, m),
            JobError::WorkerLost(m) => (ErrorKind::WorkerLost, m),
        };
        Self::Err { kind, message }
    }
}

impl From<WireOutcome> for Outcome {
    fn from(outcome: WireOutcome) -> Self {
        let (kind, message) = match outcome {
            WireOutcome::Ok(value) => return Ok(value),
            WireOutcome::Err { kind, message } => (kind, message),
        };
        Err(match kind {
            ErrorKind::Failed => JobError::Failed(message),
            ErrorKind::Panicked => JobError::Panicked(message),
            ErrorKind::Cancelled => JobError::Cancelled,
            ErrorKind::Interrupted => JobError::Interrupted(message),
            ErrorKind::TimedOut => JobError::TimedOut(message),
            ErrorKind::Retryable => JobError::Retryable(message),
            ErrorKind::ResultTooLarge => JobError::ResultTooLarge(message),
            ErrorKind::WorkerLost => JobError::WorkerLost(message),
        })
    }
}

/// One message as a line (its JSON and a newline).
pub(crate) fn encode<T: Serialize>(message: &T) -> Vec<u8> {
    // These types always serialize: every map key is a string, and serde_json
    // writes a non-finite number as null rather than failing.
    let mut line = serde_json::to_vec(message).expect("protocol messages always serialize");
    line.push(b'\n');
    line
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn every_outcome_survives_the_trip() {
        let outcomes: Vec<Outcome> = vec![
            Ok(json!({"a": [1, "two\nlines"]})),
            Err(JobError::Failed("f".into())),
            Err(JobError::Panicked("p".into())),
            Err(JobError::Cancelled),
            Err(JobError::Interrupted("i".into())),
            Err(JobError::TimedOut("t".into())),
            Err(JobError::Retryable("r".into())),
            Err(JobError::ResultTooLarge("l".into())),
            Err(JobError::WorkerLost("w".into())),
        ];
        for outcome in outcomes {
            let line = encode(&FromChild::Done {
                outcome: outcome.clone().into(),
                leftovers: false,
            });
            assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1);
            let FromChild::Done { outcome: back, .. } = serde_json::from_slice(&line).unwrap()
            else {
                panic!("a done message");
            };
            assert_eq!(Outcome::from(back), outcome);
        }
    }

    #[test]
    fn output_that_is_not_utf8_keeps_every_byte() {
        for data in [&b"plain text\n"[..], &[0xff, 0xfe, b'\n'][..], &[][..]] {
            let line = encode(&FromChild::Log {
                stream: Stream::Stderr,
                data: Bytes::new(data),
            });
            let FromChild::Log { data: back, .. } = serde_json::from_slice(&line).unwrap() else {
                panic!("a log message");
            };
            assert_eq!(back.into_vec(), data);
        }
    }
}

//! Runs one assigned job: the function's code on the runtime (async) or on
//! its blocking threads, a cancel that drops the future or raises the
//! context's flag, a panic caught and turned into a failure, and the end of
//! the job sent to the session as a [`Finished`].
//!
//! Each job is one detached task. It never holds the session: it ends by
//! sending one `Finished` into a channel that outlives sessions, so a job
//! that finishes while the worker reconnects is reported by the next
//! session.

use std::{any::Any, io, panic::AssertUnwindSafe, sync::Arc};

use futures::FutureExt as _;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{
    ctx::{Ctx, JobFailure, JobTerms, Lease, ProgressBoard},
    function::{Body, Outcome},
};

/// How a job ended on this worker.
#[derive(Debug)]
pub(crate) enum Ended {
    /// The function returned (a value or its own failure).
    Returned(Outcome),
    /// The function panicked; the message of the panic.
    Panicked(String),
    /// The function returned a value larger than the worker sends.
    TooLarge {
        /// The value's size as JSON text.
        bytes: usize,
        /// The worker's limit.
        limit: usize,
    },
}

/// The end of one job, for the session to report.
#[derive(Debug)]
pub(crate) struct Finished {
    pub(crate) lease: Lease,
    pub(crate) ended: Ended,
}

/// What a job needs besides its function and arguments.
pub(crate) struct Launch {
    pub(crate) terms: JobTerms,
    pub(crate) lease: Lease,
    pub(crate) progress: Arc<ProgressBoard>,
    /// Where the job's end goes.
    pub(crate) finished: mpsc::Sender<Finished>,
    /// The largest value (as JSON text) the worker reports.
    pub(crate) max_result_bytes: usize,
}

/// Starts `body` on `args` and returns the token that cancels it. Must be
/// called inside the runtime.
pub(crate) fn start(body: &Body, args: serde_json::Value, launch: Launch) -> CancellationToken {
    let cancel = CancellationToken::new();
    let ctx = Ctx::new(
        launch.terms,
        launch.lease.clone(),
        cancel.clone(),
        launch.progress,
    );
    let Launch {
        lease,
        finished,
        max_result_bytes,
        ..
    } = launch;
    let report = move |ended: Ended| async move {
        // The receiver lives as long as the worker runs; after it, nobody
        // is left to tell.
        let _ = finished.send(Finished { lease, ended }).await;
    };
    match body {
        Body::Async(body) => {
            let body = Arc::clone(body);
            let cancelled = cancel.clone();
            tokio::spawn(async move {
                // Calling the function is inside the guard too: it may panic
                // before it returns its future.
                let run = AssertUnwindSafe(async move { body(ctx, args).await }).catch_unwind();
                let ended = tokio::select! {
                    // A cancel drops the function's future at once: its next
                    // await is never reached.
                    biased;
                    () = cancelled.cancelled() => Ended::Returned(Err(JobFailure::Cancelled)),
                    result = run => match result {
                        Ok(outcome) => returned(outcome, max_result_bytes),
                        Err(panic) => Ended::Panicked(panic_message(panic.as_ref())),
                    },
                };
                report(ended).await;
            });
        }
        Body::Blocking(body) => {
            let body = Arc::clone(body);
            let call = tokio::task::spawn_blocking(move || body(ctx, args));
            tokio::spawn(async move {
                let ended = match call.await {
                    Ok(outcome) => returned(outcome, max_result_bytes),
                    Err(error) => match error.try_into_panic() {
                        Ok(panic) => Ended::Panicked(panic_message(panic.as_ref())),
                        // Not a panic: the runtime is shutting down and
                        // dropped the call before it started.
                        Err(_) => Ended::Returned(Err(JobFailure::Cancelled)),
                    },
                };
                report(ended).await;
            });
        }
    }
    cancel
}

/// A returned outcome, unless its value is larger than the worker sends.
fn returned(outcome: Outcome, limit: usize) -> Ended {
    if let Ok(value) = &outcome {
        let bytes = json_len(value);
        if bytes > limit {
            return Ended::TooLarge { bytes, limit };
        }
    }
    Ended::Returned(outcome)
}

/// The length of `value` as compact JSON text, counted without building it.
fn json_len(value: &serde_json::Value) -> usize {
    struct Count(usize);
    impl io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    // Writing a Value into a sink that never fails cannot fail.
    let _ = serde_json::to_writer(&mut count, value);
    count.0
}

/// The message a panic was raised with, as `std` prints it.
fn panic_message(panic: &(dyn Any + Send)) -> String {
    if let Some(text) = panic.downcast_ref::<&str>() {
        (*text).to_owned()
    } else if let Some(text) = panic.downcast_ref::<String>() {
        text.clone()
    } else {
        "a panic without a message".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn json_length_is_that_of_the_compact_text() {
        let value = json!({"a": [1, "two", null], "b": "é"});
        assert_eq!(json_len(&value), serde_json::to_vec(&value).unwrap().len());
        assert!(matches!(
            returned(Ok(json!("x".repeat(10))), 11),
            Ended::TooLarge {
                bytes: 12,
                limit: 11
            }
        ));
        assert!(matches!(
            returned(Ok(json!("x".repeat(10))), 12),
            Ended::Returned(Ok(_))
        ));
    }

    #[test]
    fn panic_messages_are_kept() {
        assert_eq!(panic_message(&"static"), "static");
        assert_eq!(panic_message(&"owned".to_owned()), "owned");
        assert_eq!(panic_message(&42), "a panic without a message");
    }
}

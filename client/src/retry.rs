//! When the client asks again by itself, and how long it pauses first.
//!
//! A [`Worker`](crate::Worker) reconnects its session whenever it breaks,
//! until it is told to stop, after the pauses of [`Backoff`]; a session that
//! jobd ended by refusing the worker ([`reconnects_worker`] says which)
//! ends the worker instead, since asking again would be refused again.
//!
//! Three calls are retried without the caller seeing it: a submit cut off by
//! a broken connection or a briefly unavailable server (safe, because every
//! submission carries a request id), a watch stream that broke (resumed
//! after its last event), and a wait that the server's cap on one call
//! ended before the caller's own deadline. The first two share one pause
//! schedule, so that both ride out a server restart the same way. The
//! decisions live here, apart from the calls, so that they can be tested
//! without a server and read in one place.

use std::{
    future::Future,
    time::{Duration, Instant},
};

use crate::Error;

/// The pauses before each retry of a call cut off by a broken connection or
/// a briefly unavailable server (submit retries, watch resumes): a call is
/// tried once more after each, and together they ride out a server restart.
pub(crate) const RETRY_PAUSES: [Duration; 3] = [
    Duration::from_millis(50),
    Duration::from_millis(200),
    Duration::from_millis(800),
];

/// Runs `call`, and again after each of [`RETRY_PAUSES`] while it fails in
/// a way [`retries_submit`] allows. Only for calls that are safe to repeat:
/// the submit calls, whose request ids make a repeat return the first job.
pub(crate) async fn with_retries<T, F, Fut>(mut call: F) -> Result<T, Error>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, tonic::Status>>,
{
    let mut pauses = RETRY_PAUSES.iter();
    loop {
        match call().await {
            Ok(answer) => return Ok(answer),
            Err(status) if retries_submit(&status) => {
                let Some(&pause) = pauses.next() else {
                    return Err(status.into());
                };
                tracing::debug!(%status, "submit failed; retrying with the same request id");
                tokio::time::sleep(pause).await;
            }
            Err(status) => return Err(status.into()),
        }
    }
}

/// True when a submit that failed with `status` may be sent again: the
/// connection failed or the server was briefly unavailable. tonic reports a
/// connection that broke under a call as UNKNOWN.
fn retries_submit(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unavailable | tonic::Code::Unknown
    )
}

/// True for errors that mean the connection broke (or the server was
/// briefly unavailable), as opposed to the server refusing the watch.
pub(crate) fn breaks_connection(err: &Error) -> bool {
    match err {
        Error::Transport(_) => true,
        // A connection that breaks mid-stream shows as UNKNOWN with the
        // transport's error attached (an answer from the server has none).
        Error::Rpc(status) => match status.code() {
            tonic::Code::Unavailable => true,
            tonic::Code::Unknown => std::error::Error::source(status).is_some(),
            _ => false,
        },
        _ => false,
    }
}

/// The shortest wait cap a jobd allows (`--max-wait` is at least 100 ms):
/// a wait that ended sooner was not cut by the cap.
const MIN_SERVER_CAP: Duration = Duration::from_millis(100);

/// True when a wait that began at `asked` ended (with DEADLINE_EXCEEDED or
/// an unfinished split) before the caller's own `deadline`, after long
/// enough to be the server's cap on one wait: then the caller asks again.
pub(crate) fn cut_short(asked: Instant, deadline: Option<Instant>) -> bool {
    let now = Instant::now();
    now.duration_since(asked) >= MIN_SERVER_CAP && deadline.is_none_or(|d| now < d)
}

/// The first pause before a worker reconnects.
const FIRST_RECONNECT: Duration = Duration::from_millis(100);

/// The longest pause before a worker reconnects: short enough that a worker
/// is back within seconds of jobd, long enough that a thousand workers
/// waiting for it do not flood it.
const MAX_RECONNECT: Duration = Duration::from_secs(5);

/// The pauses between a worker's reconnects: 100 ms, doubling up to 5 s,
/// each with jitter (between half and all of it), so that workers cut off
/// together do not come back together.
#[derive(Debug)]
pub(crate) struct Backoff {
    next: Duration,
}

impl Backoff {
    pub(crate) fn new() -> Self {
        Self {
            next: FIRST_RECONNECT,
        }
    }

    /// Starts over from the first pause (after a session that attached).
    pub(crate) fn reset(&mut self) {
        self.next = FIRST_RECONNECT;
    }

    /// The next pause.
    pub(crate) fn pause(&mut self) -> Duration {
        let full = self.next;
        self.next = (full * 2).min(MAX_RECONNECT);
        // The low 53 bits of a v4 UUID (a dependency already), all random
        // (its fixed version and variant bits are higher up), in [0, 1).
        let bits = uuid::Uuid::new_v4().as_u128() as u64 & ((1 << 53) - 1);
        let random = bits as f64 / (1u64 << 53) as f64;
        full.mul_f64(0.5 + random / 2.0)
    }
}

/// True when a worker whose session ended with `status` should connect
/// again: the connection broke, jobd was unavailable (restarting, shutting
/// down), or it ended a session it thought dead (DEADLINE_EXCEEDED). False
/// when jobd refused the worker itself (a bad definition, a token without
/// the `worker` capability, a jobd without the worker service, a message
/// over its size limit): the same attach would be refused again.
pub(crate) fn reconnects_worker(status: &tonic::Status) -> bool {
    !matches!(
        status.code(),
        tonic::Code::InvalidArgument
            | tonic::Code::FailedPrecondition
            | tonic::Code::Unauthenticated
            | tonic::Code::PermissionDenied
            | tonic::Code::Unimplemented
            | tonic::Code::OutOfRange
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnect_pauses_double_up_to_five_seconds_with_jitter() {
        let mut backoff = Backoff::new();
        let mut full = FIRST_RECONNECT;
        for _ in 0..12 {
            let pause = backoff.pause();
            assert!(pause >= full / 2 && pause <= full, "{pause:?} for {full:?}");
            full = (full * 2).min(MAX_RECONNECT);
        }
        assert_eq!(full, MAX_RECONNECT);
        backoff.reset();
        assert!(backoff.pause() <= FIRST_RECONNECT);
        // Jitter: twenty pauses of the same step are not all alike.
        let pauses: std::collections::HashSet<Duration> = (0..20)
            .map(|_| {
                backoff.reset();
                backoff.pause()
            })
            .collect();
        assert!(pauses.len() > 1);
    }

    #[test]
    fn a_worker_reconnects_unless_jobd_refused_it() {
        for status in [
            tonic::Status::unavailable("restarting"),
            tonic::Status::deadline_exceeded("silent for 15s"),
            tonic::Status::unknown("connection reset"),
            tonic::Status::internal("oops"),
            tonic::Status::resource_exhausted("too many sessions"),
        ] {
            assert!(reconnects_worker(&status), "{status:?}");
        }
        for status in [
            tonic::Status::invalid_argument("bad schema"),
            tonic::Status::failed_precondition("function defined otherwise"),
            tonic::Status::permission_denied("not a worker token"),
            tonic::Status::unauthenticated("no token"),
            tonic::Status::unimplemented("no worker service"),
        ] {
            assert!(!reconnects_worker(&status), "{status:?}");
        }
    }

    #[test]
    fn a_submit_is_retried_only_when_it_may_not_have_reached_the_server() {
        assert!(retries_submit(&tonic::Status::unavailable("restarting")));
        assert!(retries_submit(&tonic::Status::unknown("connection reset")));
        assert!(!retries_submit(&tonic::Status::resource_exhausted(
            "queue full"
        )));
        assert!(!retries_submit(&tonic::Status::invalid_argument(
            "bad args"
        )));
    }

    #[test]
    fn only_a_broken_connection_is_resumed() {
        let unavailable = Error::Rpc(tonic::Status::unavailable("draining"));
        assert!(breaks_connection(&unavailable));
        // UNKNOWN from the server itself (no transport error attached).
        let answered = Error::Rpc(tonic::Status::unknown("odd"));
        assert!(!breaks_connection(&answered));
        let restarted = Error::Rpc(tonic::Status::failed_precondition("epoch"));
        assert!(!breaks_connection(&restarted));
        assert!(!breaks_connection(&Error::NotFound("gone".into())));
    }
}

//! Executors: what runs claimed jobs. Every kind runs the same loop — claim
//! a job of its pool from the store, run it, end the attempt (complete it,
//! or retry it after a backoff) — and each decides how to honour a cancel:
//! the async pool drops the job's future ([`Honour::Abort`]), the blocking
//! pool fires the job's cancel signal and lets the function decide
//! ([`Honour::Request`]).
//!
//! The executors know the store only through its interface, and hold a
//! lease for every attempt they run: an outcome that arrives after the lease
//! was taken away (a timeout that already failed the job, a cancel, a
//! shutdown) is refused by the store as stale.

mod async_tasks;
mod blocking_threads;
pub(crate) mod remote;
mod running;

use std::{panic::AssertUnwindSafe, sync::Arc, time::Duration};

use jobd_proto::JobId;

pub(crate) use self::running::{Registered, Running};
use super::{Inner, admission::json_len};
use crate::{
    Ctx,
    ctx::Reports,
    function::PoolKind,
    job::{JobError, Outcome, PoolName},
    store::{ClaimRequest, Claimed, Fenced, JobStore, Lease, QueueName},
};

/// How an executor kind honours a cancel of a running job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Honour {
    /// The job is stopped at once (its future dropped); the canceller ends
    /// it as CANCELLED.
    Abort,
    /// The job's cancel signal fires; the function decides whether to stop.
    Request,
}

impl Honour {
    /// How executors of `kind` honour a cancel.
    pub(crate) fn of(kind: PoolKind) -> Self {
        match kind {
            PoolKind::Async => Self::Abort,
            // A remote job is told to stop (over its worker's session) and
            // ends when the worker reports it.
            PoolKind::Blocking | PoolKind::Worker => Self::Request,
        }
    }
}

/// Starts the executors of every pool.
pub(super) fn start(inner: &Arc<Inner>, async_concurrency: usize, blocking_threads: usize) {
    async_tasks::start(inner, PoolName::of(PoolKind::Async), async_concurrency);
    blocking_threads::start(inner, PoolName::of(PoolKind::Blocking), blocking_threads);
}

/// The pause after a claim the store could not answer, before the next try.
const CLAIM_RETRY: Duration = Duration::from_millis(500);

/// Where a running job's progress goes: the store, under the attempt's
/// lease.
struct StoreReports {
    store: Arc<dyn JobStore>,
    lease: Lease,
}

impl Reports for StoreReports {
    fn progress(&self, fraction: f64, message: &str) {
        self.store.progress(&self.lease, fraction, message);
    }
}

impl Inner {
    /// The claim an executor of `pool` makes.
    fn claim_request(&self, pool: PoolName) -> ClaimRequest {
        ClaimRequest {
            queue: QueueName::pool(&pool),
            holder: Arc::clone(&self.holder),
            ttl: None,
        }
    }

    /// Waits until not paused, then claims the next job of the pool; `None`
    /// once the store is closed (or the engine dropped its pause switch).
    async fn next_claim(
        &self,
        request: &ClaimRequest,
        paused: &mut tokio::sync::watch::Receiver<bool>,
    ) -> Option<Claimed> {
        loop {
            paused.wait_for(|paused| !paused).await.ok()?;
            match self.store.claim(request).await {
                Ok(claimed) => return claimed,
                Err(err) => {
                    tracing::error!(queue = request.queue.as_str(), %err, "cannot claim a job; trying again");
                    tokio::select! {
                        () = tokio::time::sleep(CLAIM_RETRY) => {}
                        () = self.stopped.cancelled() => return None,
                    }
                }
            }
        }
    }

    /// What the function of `claimed` sees.
    fn ctx(&self, claimed: &Claimed, registered: &Registered<'_>) -> Ctx {
        Ctx::new(
            claimed.lease.job,
            claimed.lease.attempt,
            registered.cancel.clone(),
            self.runtime.clone(),
            Arc::new(StoreReports {
                store: Arc::clone(&self.store),
                lease: claimed.lease.clone(),
            }),
        )
    }

    /// Ends an attempt a local executor ran.
    async fn end_attempt(&self, claimed: &Claimed, outcome: Outcome) {
        let lease = &claimed.lease;
        if let Err(err) = self.ending.end(lease, claimed.max_attempts, outcome).await {
            tracing::warn!(id = %lease.job, %err, "cannot record how the job's attempt ended");
        }
    }
}

/// How an attempt ends, the same for every executor: a result too large to
/// keep fails the job; a retryable failure with attempts left puts the job
/// back to pending after a backoff; anything else completes it.
pub(crate) struct Ending {
    pub(crate) store: Arc<dyn JobStore>,
    pub(crate) clock: crate::clock::Clock,
    pub(crate) max_result_bytes: usize,
}

impl Ending {
    /// Ends `lease`'s attempt with `outcome` (`max_attempts`: the job's).
    /// A lease that is not current changes nothing (the job was already
    /// ended by a timeout, a cancel or a shutdown, or went to another
    /// holder).
    pub(crate) async fn end(
        &self,
        lease: &Lease,
        max_attempts: u32,
        outcome: Outcome,
    ) -> Result<Fenced, crate::store::StoreError> {
        // A result too large to store and send fails the job (as data);
        // the caller learns why instead of the answer failing in transit.
        let outcome = outcome.and_then(|value| match json_len(&value) {
            len if len > self.max_result_bytes => Err(JobError::ResultTooLarge(format!(
                "the function returned {len} bytes of JSON; the server keeps at most {} (--max-result-bytes)",
                self.max_result_bytes
            ))),
            _ => Ok(value),
        });
        if let Err(JobError::Retryable(reason)) = &outcome
            && lease.attempt < max_attempts
        {
            let wait = backoff(lease.job, lease.attempt);
            let applied = self.store.retry(lease, self.clock.now() + wait).await?;
            if applied == Fenced::Applied {
                tracing::debug!(id = %lease.job, attempt = lease.attempt, ?wait, %reason, "retrying");
            }
            return Ok(applied);
        }
        self.store.complete(lease, outcome).await
    }
}

/// The pause before the attempt after `attempt`: 100 ms doubling per
/// attempt, at most 60 s, scaled by a jitter factor in [0.5, 1) drawn from
/// the job id and attempt (a fixed hash of them), so that jobs failing
/// together do not retry in lockstep, and one job's pauses are the same
/// whenever they are computed.
pub(crate) fn backoff(id: JobId, attempt: u32) -> Duration {
    use std::hash::{Hash as _, Hasher as _};
    let base = Duration::from_millis(100)
        .saturating_mul(1 << attempt.saturating_sub(1).min(20))
        .min(Duration::from_secs(60));
    // `DefaultHasher::new()` is SipHash with fixed keys: the same input
    // hashes the same in every process.
    let mut hasher = std::hash::DefaultHasher::new();
    id.hash(&mut hasher);
    attempt.hash(&mut hasher);
    // 16 bits are plenty for a jitter factor.
    let jitter = f64::from(u16::try_from(hasher.finish() >> 48).unwrap_or(0)) / 65_536.0;
    base.mul_f64(0.5 + jitter / 2.0)
}

/// Resolves with the timeout error once `limit` has passed; never without a
/// limit.
async fn time_limit(limit: Option<Duration>) -> JobError {
    match limit {
        Some(limit) => {
            tokio::time::sleep(limit).await;
            JobError::TimedOut(format!("ran longer than its {limit:?} limit"))
        }
        None => std::future::pending().await,
    }
}

/// Runs user code that may panic; a panic fails the job, not the executor.
fn guarded<T>(run: impl FnOnce() -> T) -> Result<T, JobError> {
    std::panic::catch_unwind(AssertUnwindSafe(run)).map_err(|panic| panicked(&*panic))
}

/// The message of a caught panic, which is a `&str` or a `String` unless the
/// code panicked with some other payload.
fn panicked(payload: &(dyn std::any::Any + Send)) -> JobError {
    let message = payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a non-string panic payload".to_owned());
    JobError::Panicked(message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_fixed_by_the_job_and_attempt() {
        let id = JobId::from(uuid::Uuid::from_u128(42));
        for attempt in 1..=5 {
            let base = Duration::from_millis(100 << (attempt - 1));
            let pause = backoff(id, attempt);
            assert!(
                pause >= base / 2 && pause < base,
                "attempt {attempt}: {pause:?}"
            );
            assert_eq!(pause, backoff(id, attempt), "the same every time");
        }
        assert_eq!(backoff(id, 40), backoff(id, 40));
        assert!(backoff(id, 40) < Duration::from_secs(60));
        let other = JobId::from(uuid::Uuid::from_u128(43));
        assert_ne!(
            backoff(id, 3),
            backoff(other, 3),
            "jobs do not retry in lockstep"
        );
    }
}

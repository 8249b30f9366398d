//! Executors: what runs claimed jobs. Every kind runs the same loop — claim
//! a job of its pool from the store, run it, end the attempt (complete it,
//! or retry it after a backoff) — and each decides how to honour a cancel:
//! the async pool drops the job's future ([`Honour::Abort`]), the blocking
//! pool fires the job's cancel signal and lets the function decide
//! ([`Honour::Request`]), the process pool kills the job's child process
//! and everything it started ([`Honour::Kill`]).
//!
//! The executors know the store only through its interface, and hold a
//! lease for every attempt they run: an outcome that arrives after the lease
//! was taken away (a timeout that already failed the job, a cancel, a
//! shutdown) is refused by the store as stale.

mod async_tasks;
mod blocking_threads;
pub(crate) mod process_pool;
pub(crate) mod remote;
mod running;

use std::{
    sync::{Arc, PoisonError},
    time::Duration,
};

use jobd_proto::JobId;

pub(crate) use self::running::{Registered, Running};
use super::Inner;
use crate::function::{guarded, panicked};
use crate::{
    Ctx,
    ctx::Reports,
    function::PoolKind,
    job::{JobError, LogStream, Outcome, PoolName, cap_result},
    store::{ClaimRequest, Claimed, Fenced, JobStore, Lease, LogLine, QueueName},
};

/// How an executor kind honours a cancel of a running job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Honour {
    /// The job is stopped at once (its future dropped); the canceller ends
    /// it as CANCELLED.
    Abort,
    /// The job's cancel signal fires; the function decides whether to stop.
    Request,
    /// The job's cancel signal fires and its executor kills what runs it
    /// (a child process and its whole group), then ends the job as
    /// CANCELLED; the canceller waits for that end.
    Kill,
}

impl Honour {
    /// How executors of `kind` honour a cancel.
    pub(crate) fn of(kind: PoolKind) -> Self {
        match kind {
            PoolKind::Async => Self::Abort,
            PoolKind::Process => Self::Kill,
            // A remote job is told to stop (over its worker's session) and
            // ends when the worker reports it.
            PoolKind::Blocking | PoolKind::Worker => Self::Request,
        }
    }
}

/// Starts the executors of every local pool.
pub(super) fn start(
    inner: &Arc<Inner>,
    async_concurrency: usize,
    blocking_threads: usize,
    processes: process_pool::ProcessConfig,
) {
    async_tasks::start(inner, PoolName::of(PoolKind::Async), async_concurrency);
    blocking_threads::start(inner, PoolName::of(PoolKind::Blocking), blocking_threads);
    process_pool::start(inner, PoolName::of(PoolKind::Process), processes);
}

/// The pause after a claim the store could not answer, before the next try.
const CLAIM_RETRY: Duration = Duration::from_millis(500);

/// How long a job's log lines wait to be stored together.
const LOG_FLUSH_DELAY: Duration = Duration::from_millis(20);
/// Bytes of log lines one attempt may have waiting; past it lines are
/// dropped (and counted) until the next flush.
const MAX_LOG_BUFFER: usize = 256 * 1024;

/// Where a running job's progress and log lines go: the store, under the
/// attempt's lease. Log lines are buffered briefly and stored in batches,
/// so a job that logs in a loop costs one store write per batch; the
/// executor flushes what is left before it ends the attempt.
pub(crate) struct StoreReports {
    store: Arc<dyn JobStore>,
    lease: Lease,
    runtime: tokio::runtime::Handle,
    /// For the delayed flush a first buffered line schedules.
    me: std::sync::Weak<StoreReports>,
    buffer: std::sync::Mutex<LogBuffer>,
    /// One flush at a time, so batches are stored in the order written.
    flushing: tokio::sync::Mutex<()>,
    logged: std::sync::atomic::AtomicBool,
}

#[derive(Default)]
struct LogBuffer {
    lines: Vec<LogLine>,
    bytes: usize,
    dropped: u64,
    flush_scheduled: bool,
}

impl StoreReports {
    pub(crate) fn new(
        store: Arc<dyn JobStore>,
        lease: Lease,
        runtime: tokio::runtime::Handle,
    ) -> Arc<Self> {
        Arc::new_cyclic(|me| Self {
            store,
            lease,
            runtime,
            me: me.clone(),
            buffer: std::sync::Mutex::default(),
            flushing: tokio::sync::Mutex::new(()),
            logged: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Stores the lines written so far (the lease must still be current
    /// for them to be kept).
    pub(crate) async fn flush_log(&self) {
        if !self.logged.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        let _one_at_a_time = self.flushing.lock().await;
        let lines = {
            let mut buffer = self.buffer.lock().unwrap_or_else(PoisonError::into_inner);
            buffer.flush_scheduled = false;
            buffer.bytes = 0;
            let dropped = std::mem::take(&mut buffer.dropped);
            let mut lines = std::mem::take(&mut buffer.lines);
            if dropped > 0 {
                lines.push(LogLine {
                    stream: LogStream::Log,
                    data: format!(
                        "[jobd: {dropped} log lines dropped: the job wrote faster than they could be stored]\n"
                    )
                    .into_bytes(),
                });
            }
            lines
        };
        if lines.is_empty() {
            return;
        }
        match self.store.append_log(&self.lease, lines).await {
            Ok(Fenced::Applied) => {}
            Ok(Fenced::Repeated | Fenced::Stale) => {
                tracing::debug!(id = %self.lease.job, "log lines of an attempt that ended were dropped");
            }
            Err(err) => {
                tracing::warn!(id = %self.lease.job, %err, "cannot store a job's log lines");
            }
        }
    }
}

impl Reports for StoreReports {
    fn progress(&self, fraction: f64, message: &str) {
        self.store.progress(&self.lease, fraction, message);
    }

    fn log(&self, stream: LogStream, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        self.logged
            .store(true, std::sync::atomic::Ordering::Release);
        let schedule = {
            let mut buffer = self.buffer.lock().unwrap_or_else(PoisonError::into_inner);
            if buffer.bytes + data.len() > MAX_LOG_BUFFER {
                buffer.dropped += 1;
            } else {
                buffer.bytes += data.len();
                buffer.lines.push(LogLine {
                    stream,
                    data: data.to_vec(),
                });
            }
            !std::mem::replace(&mut buffer.flush_scheduled, true)
        };
        if schedule && let Some(me) = self.me.upgrade() {
            self.runtime.spawn(async move {
                tokio::time::sleep(LOG_FLUSH_DELAY).await;
                me.flush_log().await;
            });
        }
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

    /// Where the attempt of `claimed` reports to.
    fn reports(&self, claimed: &Claimed) -> Arc<StoreReports> {
        StoreReports::new(
            Arc::clone(&self.store),
            claimed.lease.clone(),
            self.runtime.clone(),
        )
    }

    /// What the function of `claimed` sees.
    fn ctx(
        &self,
        claimed: &Claimed,
        registered: &Registered<'_>,
        reports: &Arc<StoreReports>,
    ) -> Ctx {
        Ctx::new(
            claimed.lease.job,
            claimed.lease.attempt,
            registered.cancel.clone(),
            self.runtime.clone(),
            Arc::clone(reports) as Arc<dyn Reports>,
        )
    }

    /// Ends an attempt a local executor ran, after storing what it logged.
    async fn end_attempt(&self, claimed: &Claimed, outcome: Outcome, reports: &StoreReports) {
        reports.flush_log().await;
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
        let outcome = cap_result(outcome, self.max_result_bytes);
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

//! The process pool: jobs run in child processes of the server, one job at
//! a time per child, `process_workers` children at most. Each child is
//! owned by a *slot*, a task that starts it when the slot's first job
//! comes (a server that runs no process job starts no process), hands it
//! one job at a time, watches it while idle, and replaces it when it dies,
//! is killed, or has run its `max_jobs_per_child`.
//!
//! A dispatcher takes an idle slot, then claims a job (so no job is held
//! claimed while every slot is busy), and hands the job over. The slot
//! ends the attempt through the same `Ending` as every executor. A cancel
//! and the time limit are hard stops
//! ([`Honour::Kill`](super::Honour::Kill)): the child's whole process
//! group gets SIGTERM, [`KILL_GRACE`], then SIGKILL, and the job ends
//! (CANCELLED, TIMED_OUT) only once nothing of the group is left and the
//! child is reaped. A child that dies mid-job costs that job one attempt:
//! it runs again when its function is safe to retry and attempts remain,
//! and otherwise fails with `WORKER_LOST`. The pool itself never breaks:
//! the slot starts a new child and goes on (unlike Python's
//! `BrokenProcessPool`).

mod child;

use std::{
    num::NonZeroU64,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::sync::{Semaphore, oneshot};
use tokio_util::task::TaskTracker;

pub(crate) use self::child::Spawn;
use self::child::{ChildProcess, IdleEnd, Lost, Ran, memory_hint};
use super::StoreReports;
use crate::{
    ctx::Reports as _,
    engine::Inner,
    job::{JobError, LogStream, Outcome, PoolName},
    store::Claimed,
};

/// Between SIGTERM and SIGKILL when a child's process group is stopped. A
/// job's code gets no cooperative cancel (SIGTERM ends a child at once
/// unless the job installed a handler), so the grace is for what the job
/// started and for handlers: short, since a cancel waits for it.
pub(crate) const KILL_GRACE: Duration = Duration::from_secs(2);

/// How long a stop can take at most: the grace, then SIGKILL and the
/// bounded wait for the group to be gone (jobd-command's), with a margin.
pub(crate) const STOP_BOUND: Duration = Duration::from_secs(6);

/// How the process pool is sized and what its children get.
#[derive(Debug, Clone)]
pub(crate) struct ProcessConfig {
    pub(crate) workers: usize,
    pub(crate) max_jobs_per_child: Option<NonZeroU64>,
    pub(crate) spawn: Spawn,
}

/// What the engine keeps of the process pool: what a shutdown waits for,
/// and how many children are alive.
#[derive(Default)]
pub(crate) struct ProcessPool {
    /// The slots; each ends once its child is gone.
    slots: TaskTracker,
    /// Children alive now.
    live: Arc<AtomicUsize>,
}

impl ProcessPool {
    /// Children alive now.
    pub(crate) fn children(&self) -> usize {
        self.live.load(Ordering::Acquire)
    }

    /// Waits, at most `bound`, until every slot has stopped its child.
    pub(crate) async fn stopped(&self, bound: Duration) -> bool {
        tokio::time::timeout(bound, self.slots.wait()).await.is_ok()
    }
}

/// Starts the dispatcher and the slots of the pool named `pool`.
pub(super) fn start(inner: &Arc<Inner>, pool: PoolName, config: ProcessConfig) {
    let idle = Arc::new(Idle::new(config.workers));
    let config = Arc::new(config);
    for _ in 0..config.workers {
        let slot = Slot {
            inner: Arc::clone(inner),
            config: Arc::clone(&config),
            idle: Arc::clone(&idle),
            child: None,
        };
        // Counted in the engine's tasks too, so a drain waits for running
        // process jobs as for the other pools.
        let token = inner.tasks.token();
        inner.processes.slots.spawn(async move {
            slot.serve().await;
            drop(token);
        });
    }
    inner.processes.slots.close();
    inner.tasks.spawn(dispatch(Arc::clone(inner), pool, idle));
}

/// Takes an idle slot, then a job, and hands the job to the slot.
async fn dispatch(inner: Arc<Inner>, pool: PoolName, idle: Arc<Idle>) {
    let request = inner.claim_request(pool);
    let mut paused = inner.paused.subscribe();
    while let Some(slot) = idle.take().await {
        let Some(claimed) = inner.next_claim(&request, &mut paused).await else {
            break;
        };
        if let Err(claimed) = slot.send(claimed) {
            // The slot stopped between offering itself and now (its task
            // ended): the job goes back, to run at once elsewhere.
            if let Err(err) = inner.store.release(&claimed.lease).await {
                tracing::warn!(id = %claimed.lease.job, %err, "cannot give a job back");
            }
        }
    }
    // The store is closed: no more jobs. Idle slots stop their children.
    idle.close();
}

/// The idle slots, last in first out, so that a light load keeps reusing
/// the same warm child.
struct Idle {
    slots: Mutex<Vec<oneshot::Sender<Claimed>>>,
    /// One permit per slot in `slots`; closed when the pool stops.
    ready: Semaphore,
    closed: AtomicBool,
}

impl Idle {
    fn new(capacity: usize) -> Self {
        Self {
            slots: Mutex::new(Vec::with_capacity(capacity)),
            ready: Semaphore::new(0),
            closed: AtomicBool::new(false),
        }
    }

    /// Offers a slot; false once the pool stops.
    fn offer(&self, slot: oneshot::Sender<Claimed>) -> bool {
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        if self.closed.load(Ordering::Acquire) {
            return false;
        }
        slots.push(slot);
        self.ready.add_permits(1);
        true
    }

    /// The most recently offered slot; `None` once the pool stops.
    async fn take(&self) -> Option<oneshot::Sender<Claimed>> {
        self.ready.acquire().await.ok()?.forget();
        self.slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop()
    }

    /// Stops the pool: every idle slot is told (its offer dropped), and no
    /// slot is taken or offered again.
    fn close(&self) {
        let offers = {
            let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
            self.closed.store(true, Ordering::Release);
            std::mem::take(&mut *slots)
        };
        self.ready.close();
        drop(offers);
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }
}

/// One place in the pool, and the child that runs its jobs.
struct Slot {
    inner: Arc<Inner>,
    config: Arc<ProcessConfig>,
    idle: Arc<Idle>,
    child: Option<ChildProcess>,
}

impl Slot {
    async fn serve(mut self) {
        loop {
            let (offer, job) = oneshot::channel();
            if !self.idle.offer(offer) {
                break;
            }
            let Some(claimed) = self.wait_for_job(job).await else {
                break;
            };
            self.run(claimed).await;
        }
        if let Some(child) = self.child.take() {
            child.retire(KILL_GRACE).await;
        }
    }

    /// Waits for the dispatcher's job, watching the idle child meanwhile;
    /// `None` when the pool stops.
    async fn wait_for_job(&mut self, mut job: oneshot::Receiver<Claimed>) -> Option<Claimed> {
        loop {
            let Some(child) = &mut self.child else {
                return job.await.ok();
            };
            let ended = tokio::select! {
                biased;
                claimed = &mut job => return claimed.ok(),
                ended = child.idle() => ended,
            };
            let child = self.child.take()?;
            match ended {
                IdleEnd::Died(lost) => {
                    tracing::warn!(reason = %lost.reason, "an idle process-pool child died; replacing it");
                }
                IdleEnd::Broken(what) => {
                    tracing::warn!(pid = child.pid(), %what, "an idle process-pool child broke the protocol; replacing it");
                }
            }
            child.stop(KILL_GRACE).await;
            self.replace().await;
        }
    }

    /// Starts a child in place of the one that went, so the pool keeps its
    /// size (unless it is stopping). A failure is logged; the next job
    /// tries again.
    async fn replace(&mut self) {
        if self.child.is_some() || self.idle.is_closed() {
            return;
        }
        match ChildProcess::spawn(&self.config.spawn, &self.inner.processes.live).await {
            Ok(child) => self.child = Some(child),
            Err(err) => tracing::error!(%err, "cannot start a process-pool child"),
        }
    }

    /// Runs one claimed job to the end of its attempt.
    async fn run(&mut self, claimed: Claimed) {
        let inner = Arc::clone(&self.inner);
        // Registered until the attempt has ended, so a cancel meanwhile
        // still finds it.
        let registered = inner.running.register(&claimed.lease);
        let reports = inner.reports(&claimed);
        let cancel = registered.cancel.clone();
        let outcome = self.attempt(&claimed, &reports, &cancel).await;
        inner.end_attempt(&claimed, outcome, &reports).await;
        drop(registered);
        // A child that has run its share leaves once the job has ended, so
        // the caller does not wait for its replacement.
        if let (Some(child), Some(max)) = (&self.child, self.config.max_jobs_per_child)
            && child.jobs >= max.get()
            && let Some(child) = self.child.take()
        {
            child.retire(KILL_GRACE).await;
        }
        self.replace().await;
    }

    /// The outcome of one attempt, once nothing the job started still
    /// runs.
    async fn attempt(
        &mut self,
        claimed: &Claimed,
        reports: &Arc<StoreReports>,
        cancel: &tokio_util::sync::CancellationToken,
    ) -> Outcome {
        // A cancel that came before the job reached its slot: the child
        // (if any) never saw the job, and stays.
        if cancel.is_cancelled() {
            return Err(JobError::Cancelled);
        }
        if self.child.is_none() {
            let spawned = tokio::select! {
                biased;
                () = cancel.cancelled() => return Err(JobError::Cancelled),
                spawned = ChildProcess::spawn(&self.config.spawn, &self.inner.processes.live) => spawned,
            };
            match spawned {
                Ok(child) => self.child = Some(child),
                Err(err) => {
                    tracing::error!(id = %claimed.lease.job, %err, "cannot start a process-pool child");
                    return Err(JobError::failed(format!(
                        "the process pool cannot start a child process: {err}"
                    )));
                }
            }
        }
        let Some(child) = &mut self.child else {
            unreachable!("a child was just started");
        };
        let ran = child
            .run(claimed, reports.as_ref(), cancel, claimed.timeout)
            .await;
        // Past a normal end, the child goes with the job: it was killed, it
        // died, or something the job started must go with its group.
        let outcome = match ran {
            Ran::Finished {
                outcome,
                leftovers: false,
            } => return outcome,
            Ran::Finished {
                outcome,
                leftovers: true,
            } => {
                reports.log(
                    LogStream::Log,
                    b"[jobd: the job left processes running; they were stopped with its child process]\n",
                );
                outcome
            }
            Ran::Cancelled => Err(JobError::Cancelled),
            Ran::TimedOut(limit) => Err(JobError::TimedOut(format!(
                "ran longer than its {limit:?} limit; its child process was killed"
            ))),
            Ran::Lost(lost) => Err(self.lost(claimed, lost)),
        };
        if let Some(child) = self.child.take() {
            child.stop(KILL_GRACE).await;
        }
        outcome
    }

    /// What a job whose child died mid-way becomes: another attempt after
    /// the usual backoff (a retryable failure) when its function is safe to
    /// retry and it has attempts left, else `WORKER_LOST`. A crash is most
    /// often the job's own doing, so only the job's own attempt budget
    /// (`max_attempts`) pays for it; unlike a remote worker's lapsed lease,
    /// which may be the network's fault, it is never retried for free.
    fn lost(&self, claimed: &Claimed, lost: Lost) -> JobError {
        let hint = memory_hint(&lost, self.config.spawn.memory_limit);
        let mut reason = lost.reason;
        if let Some(hint) = hint {
            reason.push_str(" (");
            reason.push_str(&hint);
            reason.push(')');
        }
        tracing::warn!(id = %claimed.lease.job, attempt = claimed.lease.attempt, %reason, "process-pool child lost mid-job");
        if !claimed.retry_safe {
            JobError::WorkerLost(format!(
                "{reason}; the function is registered as not safe to retry"
            ))
        } else if claimed.lease.attempt < claimed.max_attempts {
            JobError::Retryable(reason)
        } else {
            JobError::WorkerLost(reason)
        }
    }
}

//! The engine: admission plus executors, over the store interface.
//!
//! The life of a job: `submit` checks it ([`admission`]) and hands it to the
//! store, which records it and queues it in its pool. An executor of that
//! pool ([`executor`]) claims it (pending -> running, under a lease), runs
//! the function with panics caught, and ends the attempt through the store,
//! which wakes every waiter. Cancel asks the store to record the request and
//! then honours it the way the job's executor does. The engine holds no job
//! state of its own beyond the attempts running in this process.

mod admission;
mod config;
mod executor;
mod logs;
mod maintenance;
mod many;
mod watcher;

use std::{
    collections::BTreeMap,
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use jobd_proto::{JobId, JobState};
use tokio::sync::{Semaphore, watch};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

pub(crate) use self::executor::remote::{
    Ack, DeclaredFunction, HeldLease, Session, ToWorker, WorkerAttach,
};
use self::executor::{
    Ending, Honour, Running,
    process_pool::{self, ProcessConfig, ProcessPool},
    remote::{WORKERS_HOLDER, WorkerConfig, Workers},
};
pub use self::{
    admission::SubmitSpec,
    config::EngineConfig,
    many::{ReturnWhen, WaitSplit},
    watcher::{WatchEvent, WatchEventKind, WatchFilter, WatchSpec},
};
use crate::{
    Error,
    clock::Clock,
    function::{PoolKind, Registry},
    job::{Finished, JobError, JobRecord, PoolName},
    store::{
        self, CancelResult, Fenced, Found, JobStore, LeaseHolder, Missing, StoreConfig, StoreError,
        StoreOptions,
    },
};

/// How long a shutdown waits for the jobs it interrupted to return.
const INTERRUPTED_BOUND: Duration = Duration::from_secs(2);

/// What `Cancel` did, as `Future.cancel()` would report it and more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelOutcome {
    /// It was pending and will never run.
    Cancelled,
    /// It was running on the async pool and was aborted, or on the process
    /// pool and its child process (with everything it started) was killed.
    Aborted,
    /// It is running where it cannot be stopped from outside (the blocking
    /// pool); a cooperative request was sent.
    Requested,
    /// It had already finished.
    AlreadyDone,
}

impl CancelOutcome {
    /// True when the job is now cancelled (`Future.cancel()`'s answer).
    #[must_use]
    pub fn cancelled(self) -> bool {
        matches!(self, Self::Cancelled | Self::Aborted)
    }
}

/// Handle to a running engine. Cheap to clone.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use jobd::{Engine, EngineConfig, Registry, SubmitSpec};
///
/// let mut registry = Registry::new();
/// registry.register_async("double", "Doubles a number", |_ctx, args| async move {
///     Ok(serde_json::json!(args.as_i64().unwrap_or(0) * 2))
/// });
/// let engine = Engine::start(registry, EngineConfig::default());
/// let id = engine
///     .submit(SubmitSpec { function: "double".into(), args: 21.into(), ..Default::default() })
///     .await
///     .unwrap()
///     .0;
/// let finished = engine.wait(id).await.unwrap();
/// assert_eq!(finished.outcome, Ok(serde_json::json!(42)));
/// engine.shutdown(std::time::Duration::from_secs(1)).await;
/// # }
/// ```
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("durable", &self.inner.store.is_durable())
            .field("running", &self.inner.running.len())
            .finish_non_exhaustive()
    }
}

struct Inner {
    registry: Registry,
    /// Where every job lives; the engine's only way to job state.
    store: Arc<dyn JobStore>,
    clock: Clock,
    /// This process, as the holder of the leases its executors take.
    holder: LeaseHolder,
    /// The attempts running in this process.
    running: Running,
    /// Cleared when a drain starts: Submit then answers `ShuttingDown`.
    accepting: AtomicBool,
    /// Fired at the end of shutdown: every waiter still waiting gives up.
    stopped: CancellationToken,
    /// Callers currently inside `wait` (an operator's gauge, and how tests
    /// know a Result call has reached the server).
    waiters: AtomicUsize,
    /// While true, executors take no job from the store.
    paused: watch::Sender<bool>,
    /// `EngineConfig::max_args_bytes`.
    max_args_bytes: usize,
    /// How every executor ends an attempt (result cap, retries).
    ending: Arc<Ending>,
    /// The remote worker pool.
    workers: Arc<Workers>,
    /// The process pool's slots and children.
    processes: ProcessPool,
    /// One permit per open `Watch` stream (`EngineConfig::max_watchers`).
    watchers: Arc<Semaphore>,
    max_watchers: usize,
    /// Running async jobs, the dispatcher, and one token per blocking thread.
    tasks: TaskTracker,
    /// The maintenance task. It ends with `stopped`; shutdown waits for it,
    /// so that once it returns and the caller drops its engine, nothing
    /// holds the store (and a durable store's lock) open.
    background: TaskTracker,
    runtime: tokio::runtime::Handle,
}

impl Engine {
    /// Starts an engine with the in-memory store: the pools (a dispatcher
    /// task for the async pool, `blocking_workers` dedicated OS threads) and
    /// the maintenance task.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime.
    #[must_use]
    pub fn start(registry: Registry, config: EngineConfig) -> Self {
        Self::open(registry, config, &StoreConfig::Memory)
            .expect("the in-memory store always opens")
    }

    /// Opens `store` (recovering what a previous run left unfinished, for a
    /// durable store) and starts the engine on it. Opening a durable store is
    /// blocking file I/O; call it before serving, or from a blocking context.
    ///
    /// # Errors
    ///
    /// [`StoreError`] when the data directory or database cannot be used.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime.
    pub fn open(
        registry: Registry,
        config: EngineConfig,
        store: &StoreConfig,
    ) -> Result<Self, StoreError> {
        let store = store::open(
            store,
            StoreOptions {
                pools: vec![
                    PoolName::of(PoolKind::Async),
                    PoolName::of(PoolKind::Blocking),
                    PoolName::of(PoolKind::Worker),
                    PoolName::of(PoolKind::Process),
                ],
                routed: vec![PoolName::of(PoolKind::Worker)],
                max_queued: config.max_queued.get(),
                priority_aging: config.priority_aging,
                event_history: config.event_history,
                cache_finished: config.cache_finished,
                log_cap: config.max_log_bytes,
                clock: config.clock.clone(),
                #[cfg(feature = "fault-injection")]
                faults: config.faults,
            },
        )?;
        let holder: LeaseHolder =
            Arc::from(format!("local:{}", JobId::minted_at(config.clock.now())));
        let ending = Arc::new(Ending {
            store: Arc::clone(&store),
            clock: config.clock.clone(),
            max_result_bytes: config.max_result_bytes,
        });
        let stopped = CancellationToken::new();
        let background = TaskTracker::new();
        let workers = Workers::new(
            WorkerConfig {
                heartbeat_interval: config.worker_heartbeat_interval,
                lease_timeout: config.worker_lease_timeout,
                max_sessions: config.max_workers,
            },
            Arc::clone(&store),
            config.clock.clone(),
            stopped.clone(),
            background.clone(),
            Arc::clone(&ending),
        );
        let inner = Arc::new(Inner {
            registry,
            store,
            clock: config.clock,
            holder,
            running: Running::default(),
            accepting: AtomicBool::new(true),
            stopped,
            waiters: AtomicUsize::new(0),
            paused: watch::Sender::new(config.paused),
            max_args_bytes: config.max_args_bytes,
            ending,
            workers,
            processes: ProcessPool::default(),
            watchers: Arc::new(Semaphore::new(config.max_watchers)),
            max_watchers: config.max_watchers,
            tasks: TaskTracker::new(),
            background,
            runtime: tokio::runtime::Handle::current(),
        });
        executor::start(
            &inner,
            config.async_concurrency.get(),
            config.blocking_workers.get(),
            ProcessConfig {
                workers: config.process_workers.get(),
                max_jobs_per_child: config.process_max_jobs_per_child,
                spawn: process_pool::Spawn {
                    program: config.process_program,
                    memory_limit: config.process_memory_limit,
                    max_result_bytes: config.max_result_bytes,
                },
            },
        );
        inner.workers.resume_lanes();
        inner
            .background
            .spawn(Arc::clone(&inner).maintain(config.retention));
        Ok(Self { inner })
    }

    /// The registered functions.
    #[must_use]
    pub fn registry(&self) -> &Registry {
        &self.inner.registry
    }

    /// Where the engine reads time (what a `delay` counts from).
    #[must_use]
    pub fn clock(&self) -> &Clock {
        &self.inner.clock
    }

    /// Accepts a job; returns its id and state at the time of the answer.
    /// With a durable store the job is on disk when this returns. A request
    /// id seen before with the same function and arguments returns the
    /// earlier job instead of creating one.
    ///
    /// # Errors
    ///
    /// `UnknownFunction`, `InvalidArgument` (pool mismatch, argument too
    /// large), `ArgsRejected`, `QueueFull`, `DuplicateRequest`,
    /// `ShuttingDown`, `Store` (fail-stop).
    pub async fn submit(&self, spec: SubmitSpec) -> Result<(JobId, JobState), Error> {
        let job = self.inner.prepare(spec)?;
        self.inner.admit(job).await
    }

    /// As [`Engine::submit`], but the job is checked and takes its place in
    /// its pool's queue before this returns; the future only records it. So
    /// a caller that submits several jobs this way and awaits the futures
    /// concurrently (sharing commits) still has them start in call order.
    pub fn submit_in_order(
        &self,
        spec: SubmitSpec,
    ) -> impl Future<Output = Result<(JobId, JobState), Error>> + Send + 'static {
        let admitted = self.inner.prepare(spec).map(|job| self.inner.admit(job));
        async move { admitted?.await }
    }

    /// Checks what `submit` would check of `spec` before taking a queue
    /// slot: the function exists and runs on the pool asked for.
    ///
    /// # Errors
    ///
    /// `UnknownFunction`, `InvalidArgument` (pool mismatch).
    pub fn check(&self, spec: &SubmitSpec) -> Result<(), Error> {
        self.inner.function_for(spec).map(drop)
    }

    /// Submits many jobs; each is accepted or refused on its own, and the
    /// answers come back in order. With a durable store they share group
    /// commits, so a batch costs a few fsyncs, not one per job.
    pub async fn submit_batch(
        &self,
        specs: Vec<SubmitSpec>,
    ) -> Vec<Result<(JobId, JobState), Error>> {
        // Not `join_all`: past 30 futures it keeps them in a
        // `FuturesOrdered`, whose per-future task node and waker cost about
        // as much as an in-memory admission itself (callgrind, batches of
        // 1,000). Here nearly every admission is ready on its first poll
        // (memory store) or within the few group commits the batch shares
        // (SQLite), so polling the unfinished ones again on each wake is
        // cheaper.
        let mut admissions: Vec<_> = specs
            .into_iter()
            .map(|spec| Box::pin(futures::future::maybe_done(self.submit_in_order(spec))))
            .collect();
        std::future::poll_fn(|cx| {
            let mut ready = true;
            for admission in &mut admissions {
                ready &= admission.as_mut().poll(cx).is_ready();
            }
            if ready {
                std::task::Poll::Ready(())
            } else {
                std::task::Poll::Pending
            }
        })
        .await;
        admissions
            .iter_mut()
            .map(|admission| {
                admission
                    .as_mut()
                    .take_output()
                    .unwrap_or(Err(Error::ShuttingDown))
            })
            .collect()
    }

    /// Pauses or resumes every pool. While paused, jobs are accepted and
    /// queued but none starts (running ones carry on).
    pub fn set_paused(&self, paused: bool) {
        self.inner.paused.send_replace(paused);
    }

    /// The job's current state.
    ///
    /// # Errors
    ///
    /// `JobNotFound`, `JobGone`, `Store`.
    pub async fn state(&self, id: JobId) -> Result<JobState, Error> {
        self.inner.state(id).await
    }

    /// A copy of the job's whole record.
    ///
    /// # Errors
    ///
    /// `JobNotFound`, `JobGone`, `Store`.
    pub async fn get(&self, id: JobId) -> Result<JobRecord, Error> {
        found(id, self.inner.store.get(id).await)
    }

    /// Waits, without polling, until the job is terminal. Callers bound the
    /// wait with `tokio::time::timeout`; dropping the future is safe.
    ///
    /// # Errors
    ///
    /// `JobNotFound`, `JobGone`, `Store`, or `ShuttingDown` if the engine
    /// stops first.
    pub async fn wait(&self, id: JobId) -> Result<Finished, Error> {
        let inner = &self.inner;
        let _waiting = WaiterGauge::enter(&inner.waiters);
        tokio::select! {
            biased;
            finished = inner.store.wait(id) => found(id, finished),
            () = inner.stopped.cancelled() => {
                // Jobs interrupted by the stop finished just before it: that
                // is still an answer.
                match inner.store.get(id).await {
                    Ok(Ok(record)) => record
                        .outcome
                        .map(|outcome| Finished { state: record.state, outcome })
                        .ok_or(Error::ShuttingDown),
                    _ => Err(Error::ShuttingDown),
                }
            }
        }
    }

    /// Cancels the job if it can, as described on [`CancelOutcome`]; the
    /// job's state after the cancel comes with it.
    ///
    /// # Errors
    ///
    /// `JobNotFound`, `JobGone`, `Store`.
    pub async fn cancel(&self, id: JobId) -> Result<(CancelOutcome, JobState), Error> {
        // Safe to drop mid-way: every store write it makes completes once
        // decided, and an abort left half-way is finished by the attempt's
        // own end (its lease is still current) or a shutdown.
        let outcome = self.inner.cancel(id).await?;
        Ok((outcome, self.inner.state(id).await?))
    }

    /// How many jobs the engine's store holds in memory, in any state.
    #[must_use]
    pub fn job_count(&self) -> usize {
        self.inner.store.stats().jobs
    }

    /// Jobs held in memory per state name ("pending", "running", ...).
    #[must_use]
    pub fn job_counts(&self) -> BTreeMap<&'static str, usize> {
        self.inner.store.stats().by_state
    }

    /// With a durable store: (commits, operations) so far; their ratio is the
    /// mean group-commit batch size.
    #[must_use]
    pub fn commit_stats(&self) -> Option<(u64, u64)> {
        self.inner.store.stats().commits
    }

    /// True when job state survives a restart.
    #[must_use]
    pub fn is_durable(&self) -> bool {
        self.inner.store.is_durable()
    }

    /// How many child processes the process pool has right now (each
    /// started when first needed, and replaced when it dies or retires).
    #[must_use]
    pub fn process_children(&self) -> usize {
        self.inner.processes.children()
    }

    /// How many callers are waiting for a job to finish right now.
    #[must_use]
    pub fn waiters(&self) -> usize {
        self.inner.waiters.load(Ordering::Acquire)
    }

    /// How many jobs wait in the queue of the pool named `pool` (0 for a
    /// pool that does not exist). Delayed jobs and jobs waiting to retry
    /// count too: they hold their places.
    #[must_use]
    pub fn queued(&self, pool: &str) -> usize {
        self.inner
            .store
            .stats()
            .queued
            .iter()
            .filter(|(queue, _)| queue.pool_name() == pool)
            .map(|(_, n)| n)
            .sum()
    }

    /// Drains: refuses new jobs, starts no pending job, lets running jobs
    /// finish for up to `grace`, then interrupts whatever still runs here
    /// (async jobs are aborted, blocking jobs are asked to stop, process
    /// jobs are killed with their child's process group; with the
    /// in-memory store they are marked failed, with a durable store they go
    /// back to pending and run again after a restart) and releases every
    /// waiter. Returns once the interrupted jobs have returned and every
    /// child process of the process pool is gone (both bounded), so that a
    /// durable store can be opened again in the same process. Idempotent.
    pub async fn shutdown(&self, grace: Duration) {
        let inner = &self.inner;
        inner.accepting.store(false, Ordering::Release);
        inner.store.close();
        // Paused executors must wake to see the closed store and exit.
        inner.paused.send_replace(false);
        inner.tasks.close();
        let local = tokio::time::timeout(grace, inner.tasks.wait());
        let (local, ()) = tokio::join!(local, inner.workers.drain(grace));
        if local.is_err() {
            let n = inner
                .interrupt_running("the server shut down before the job finished")
                .await;
            tracing::warn!(
                jobs = n,
                ?grace,
                "grace period over; interrupted running jobs"
            );
        }
        // The interrupted jobs were told to stop: let them return, so that
        // nothing of this engine (its store, and a durable store's lock on
        // its directory) outlives the shutdown. An async job returns at
        // once; a blocking function that ignores its signal cannot be made
        // to, hence the bound. Meanwhile the interrupted process jobs'
        // children are being killed (and idle ones retired): none may
        // outlive the server.
        let (returned, stopped) = tokio::join!(
            tokio::time::timeout(INTERRUPTED_BOUND, inner.tasks.wait()),
            inner.processes.stopped(process_pool::STOP_BOUND)
        );
        if returned.is_err() {
            tracing::warn!(
                ?INTERRUPTED_BOUND,
                "interrupted jobs still running; they keep the store open until they return"
            );
        }
        if !stopped {
            tracing::error!(
                children = inner.processes.children(),
                "process-pool children still stopping after {:?}",
                process_pool::STOP_BOUND
            );
        }
        // Outcomes of jobs that finished during the drain may still be on
        // their way to the disk; let them land before waiters give up.
        if let Err(err) = inner.store.flush().await {
            tracing::warn!(%err, "cannot flush the store");
        }
        inner.stopped.cancel();
        inner.background.close();
        inner.background.wait().await;
    }
}

impl Inner {
    /// One of the bounded slots every open stream (Watch, a followed log)
    /// holds for its life.
    fn stream_slot(&self) -> Result<tokio::sync::OwnedSemaphorePermit, Error> {
        Arc::clone(&self.watchers)
            .try_acquire_owned()
            .map_err(|_| Error::TooManyWatchers(self.max_watchers))
    }

    async fn state(&self, id: JobId) -> Result<JobState, Error> {
        found(id, self.store.state(id).await)
    }

    async fn cancel(&self, id: JobId) -> Result<CancelOutcome, Error> {
        let (lease, holder, pool) = match self.store.cancel(id).await.map_err(Error::Store)? {
            CancelResult::Cancelled => return Ok(CancelOutcome::Cancelled),
            CancelResult::AlreadyDone => return Ok(CancelOutcome::AlreadyDone),
            CancelResult::Missing(missing) => return Err(missing_error(id, missing)),
            CancelResult::Requested {
                lease,
                holder,
                pool,
            } => (lease, holder, pool),
        };
        if *holder == *WORKERS_HOLDER {
            // A remote worker runs it: the cancel is pushed to its session,
            // and the job ends when the worker reports it.
            self.workers.cancel(&lease);
            return Ok(CancelOutcome::Requested);
        }
        if holder != self.holder {
            // Held elsewhere: the holder honours the recorded request.
            return Ok(CancelOutcome::Requested);
        }
        self.running.cancel(&lease);
        match self.honour(&pool) {
            Honour::Request => Ok(CancelOutcome::Requested),
            Honour::Kill => {
                // The executor kills the job's process group, then ends the
                // job; waiting for that end means that when Cancel answers,
                // nothing the job started still runs.
                match tokio::time::timeout(process_pool::STOP_BOUND, self.store.wait(id)).await {
                    Ok(finished) => match found(id, finished)?.outcome {
                        Err(JobError::Cancelled) => Ok(CancelOutcome::Aborted),
                        _ => Ok(CancelOutcome::AlreadyDone),
                    },
                    Err(_) => Ok(CancelOutcome::Requested),
                }
            }
            Honour::Abort => {
                // The job's future is dropped at its next await; the job is
                // cancelled from this moment, unless it ended first.
                match self
                    .store
                    .complete(&lease, Err(JobError::Cancelled))
                    .await
                    .map_err(Error::Store)?
                {
                    Fenced::Applied => {
                        self.store.flush().await.map_err(Error::Store)?;
                        Ok(CancelOutcome::Aborted)
                    }
                    Fenced::Stale | Fenced::Repeated => Ok(CancelOutcome::AlreadyDone),
                }
            }
        }
    }

    /// How the executors of the pool named `pool` honour a cancel.
    fn honour(&self, pool: &PoolName) -> Honour {
        PoolKind::from_name(pool.as_str()).map_or(Honour::Request, Honour::of)
    }

    /// Ends every attempt still running here at the end of a drain: with a
    /// durable store the job goes back to pending (it runs again after a
    /// restart); in memory nothing could run it again, so it fails as
    /// interrupted. Each job's end is recorded before its cancel signal
    /// fires, so the function's own late outcome is refused as stale.
    async fn interrupt_running(&self, reason: &str) -> usize {
        let running = self.running.all();
        let durable = self.store.is_durable();
        let ends = running.iter().map(|(lease, cancel)| async move {
            let ended = if durable {
                self.store.release(lease).await
            } else {
                self.store
                    .complete(lease, Err(JobError::Interrupted(reason.to_owned())))
                    .await
            };
            if let Err(err) = ended {
                tracing::warn!(id = %lease.job, %err, "cannot record an interrupted job; recovery will");
            }
            cancel.cancel();
        });
        futures::future::join_all(ends).await;
        running.len()
    }
}

/// A store lookup as the engine answers it.
fn found<T>(id: JobId, answer: Result<Found<T>, StoreError>) -> Result<T, Error> {
    answer
        .map_err(Error::Store)?
        .map_err(|missing| missing_error(id, missing))
}

/// NOT_FOUND, saying "expired" or "deleted" where the store knows.
fn missing_error(id: JobId, missing: Missing) -> Error {
    match missing {
        Missing::Gone(gone) => Error::JobGone { id, gone },
        Missing::Unknown => Error::JobNotFound(id),
    }
}

/// Counts a caller inside `wait` for as long as its future lives, including
/// when it is dropped mid-wait by a timeout or a client that went away.
struct WaiterGauge<'a>(&'a AtomicUsize);

impl<'a> WaiterGauge<'a> {
    fn enter(counter: &'a AtomicUsize) -> Self {
        counter.fetch_add(1, Ordering::AcqRel);
        Self(counter)
    }
}

impl Drop for WaiterGauge<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

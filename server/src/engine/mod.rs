//! The engine: accepts submissions, runs them on the async and blocking
//! pools, and answers questions about jobs. Plain Rust with domain types; the
//! gRPC layer in [`crate::grpc`] is a thin translation in front of it.
//!
//! The life of a job: `submit` reserves a slot in the pool's bounded queue,
//! records the job as pending, then queues it (a delayed job waits in the
//! schedule first, holding its slot). A pool worker claims it
//! (pending -> running), runs the function with panics caught, and records
//! the outcome, which wakes every waiter. Cancel and shutdown act on the same
//! records through the store, which owns every state transition.

mod events;
mod many;
mod queue;
mod schedule;
mod watcher;

use std::{
    collections::BTreeMap,
    num::NonZeroUsize,
    panic::AssertUnwindSafe,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, SystemTime},
};

use std::future::Future;

use futures::FutureExt as _;
use jobd_proto::{JobId, JobState};
use tokio::sync::{Semaphore, watch};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

pub(crate) use self::events::{EventHub, EventKind};
pub(crate) use self::many::micros;
pub use self::many::{ListFilter, ListPage, ReturnWhen, WaitSplit};
pub(crate) use self::queue::QueueKey;
use self::queue::{JobQueue, Rejected};
use self::schedule::{Due, Schedule};
pub use self::watcher::{WatchEvent, WatchEventKind, WatchFilter, WatchSpec};
use crate::{
    Error,
    ctx::Ctx,
    function::{Body, Function, PoolKind, Registry},
    job::{Finished, JobError, JobRecord, Outcome},
    store::{Admission, CancelPlan, Purged, Retention, Store, StoreConfig, StoreError, WaitFor},
};

/// Finished jobs removed per retention step; small, so a purge never holds
/// the writer for long.
const PURGE_BATCH: usize = 1000;

/// Pool sizes and queue bounds.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// How many async jobs may run at once.
    pub async_concurrency: NonZeroUsize,
    /// How many dedicated threads the blocking pool has.
    pub blocking_workers: NonZeroUsize,
    /// How many pending jobs each pool's queue holds before Submit is refused
    /// with `RESOURCE_EXHAUSTED`.
    pub max_queued: NonZeroUsize,
    /// How long finished jobs and their results are kept.
    pub retention: Duration,
    /// With a durable store, how many finished jobs stay in memory for fast
    /// reads (older ones are read from disk).
    pub cache_finished: usize,
    /// Start with both pools paused (see [`Engine::set_paused`]).
    pub paused: bool,
    /// How many recent job events (state changes and progress reports, of
    /// all jobs) the server keeps for `Watch`: what a slow watcher may fall
    /// behind by, and what a reconnecting one can resume from.
    pub event_history: NonZeroUsize,
    /// How many `Watch` streams may be open at once; one more is refused
    /// with `RESOURCE_EXHAUSTED`.
    pub max_watchers: usize,
    /// Priority aging: each interval a pending job has waited counts as one
    /// more step of priority, so a flood of higher-priority jobs cannot hold
    /// it back for ever (see the queue's guarantee in the README). Zero turns
    /// aging off: priority alone decides.
    pub priority_aging: Duration,
    /// The largest argument a job may be submitted with, in bytes of JSON
    /// text; a larger one is refused with `InvalidArgument` (field `args`).
    pub max_args_bytes: usize,
    /// The largest value a job may return, in bytes of JSON text; a job
    /// returning more ends `FAILED` with [`JobError::ResultTooLarge`].
    pub max_result_bytes: usize,
    /// Test-only mutation: acknowledge Submit before its commit. Exists so
    /// the crash test can prove it detects lost jobs. Never set it.
    #[doc(hidden)]
    pub unsafe_ack_before_commit: bool,
    /// Test-only: cap the database size (in pages) to make "disk full"
    /// happen on demand.
    #[doc(hidden)]
    pub unsafe_max_db_pages: Option<u64>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            async_concurrency: NonZeroUsize::new(1024).expect("nonzero"),
            blocking_workers: std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN),
            max_queued: NonZeroUsize::new(100_000).expect("nonzero"),
            retention: Duration::from_secs(7 * 24 * 3600),
            cache_finished: 100_000,
            paused: false,
            event_history: NonZeroUsize::new(65_536).expect("nonzero"),
            max_watchers: 1024,
            priority_aging: Duration::from_secs(1),
            max_args_bytes: 1024 * 1024,
            max_result_bytes: 1024 * 1024,
            unsafe_ack_before_commit: false,
            unsafe_max_db_pages: None,
        }
    }
}

/// A validated submission.
#[derive(Debug, Clone, Default)]
pub struct SubmitSpec {
    /// The registered function to run.
    pub function: String,
    /// Its argument.
    pub args: serde_json::Value,
    /// The pool the client asked for, if any; must match the function's.
    pub pool: Option<PoolKind>,
    /// The client's request id, if any.
    pub request_id: Option<String>,
    /// Labels to store with the job.
    pub labels: BTreeMap<String, String>,
    /// Higher starts first within the pool; equal priorities in submission
    /// order. The gRPC layer accepts -1000 to 1000; the engine takes any.
    pub priority: i32,
    /// Not started before this time; `None` (or a time past) for at once.
    pub not_before: Option<SystemTime>,
    /// The running-time limit of each attempt, if any.
    pub timeout: Option<Duration>,
    /// How many attempts retryable failures may use in all; 0 counts as 1.
    pub max_attempts: u32,
}

/// What `Cancel` did, as `Future.cancel()` would report it and more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelOutcome {
    /// It was pending and will never run.
    Cancelled,
    /// It was running on the async pool and was aborted.
    Aborted,
    /// It is running on the blocking pool; a cooperative request was sent.
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

struct Inner {
    registry: Registry,
    store: Store,
    async_queue: JobQueue,
    blocking_queue: JobQueue,
    async_slots: Arc<Semaphore>,
    /// Delayed jobs, each holding its queue slot until it is due.
    schedule: Schedule,
    /// Cleared when a drain starts: Submit then answers `ShuttingDown`.
    accepting: AtomicBool,
    /// Fired at the end of shutdown: every waiter still waiting gives up.
    stopped: CancellationToken,
    /// Callers currently inside `wait` (an operator's gauge, and how tests
    /// know a Result call has reached the server).
    waiters: AtomicUsize,
    /// While true, workers take no job from the queues.
    paused: watch::Sender<bool>,
    /// `EngineConfig::max_args_bytes` and `max_result_bytes`.
    max_args_bytes: usize,
    max_result_bytes: usize,
    /// Running async jobs, the dispatcher, and one token per blocking thread.
    workers: TaskTracker,
    /// The schedule and retention tasks. They end with `stopped`; shutdown
    /// waits for them, so that once it returns and the caller drops its
    /// engine, nothing holds the store (and a durable store's lock) open.
    background: TaskTracker,
    runtime: tokio::runtime::Handle,
    /// Every job event, numbered, for `Watch` (shared with the job table,
    /// which publishes into it).
    events: Arc<EventHub>,
}

impl Engine {
    /// Starts an engine with the in-memory store: the pools (a dispatcher
    /// task for the async pool, `blocking_workers` dedicated OS threads) and
    /// the retention task.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime, or if the OS refuses to spawn a thread.
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
    /// Outside a tokio runtime, or if the OS refuses to spawn a thread.
    pub fn open(
        registry: Registry,
        config: EngineConfig,
        store: &StoreConfig,
    ) -> Result<Self, StoreError> {
        let retention = Retention {
            keep_finished: config.retention,
            keep_tombstones: config.retention.saturating_mul(4),
            cache_finished: config.cache_finished,
        };
        let testing = crate::store::TestKnobs {
            ack_before_commit: config.unsafe_ack_before_commit,
            max_db_pages: config.unsafe_max_db_pages,
        };
        let events = Arc::new(EventHub::new(config.event_history, config.max_watchers));
        let (store, recovered) =
            Store::open(store, &registry, retention, testing, Arc::clone(&events))?;
        let inner = Arc::new(Inner {
            registry,
            store,
            async_queue: JobQueue::new(config.max_queued.get(), config.priority_aging),
            blocking_queue: JobQueue::new(config.max_queued.get(), config.priority_aging),
            async_slots: Arc::new(Semaphore::new(config.async_concurrency.get())),
            schedule: Schedule::default(),
            accepting: AtomicBool::new(true),
            stopped: CancellationToken::new(),
            waiters: AtomicUsize::new(0),
            paused: watch::Sender::new(config.paused),
            max_args_bytes: config.max_args_bytes,
            max_result_bytes: config.max_result_bytes,
            workers: TaskTracker::new(),
            background: TaskTracker::new(),
            runtime: tokio::runtime::Handle::current(),
            events,
        });
        for record in recovered {
            let queue = inner.queue(record.pool);
            let (id, pool, not_before) = (record.id, record.pool, record.not_before);
            // A job interrupted while running was due already, so only
            // never-started delayed jobs wait again.
            let not_before = not_before.filter(|_| record.attempt == 0);
            // Aging counts from when the job was due, across the restart.
            let ready_at = not_before.map_or(record.submitted_at, |at| at.max(record.submitted_at));
            let key = queue.reserve_recovered(record.priority, ready_at);
            inner.store.restore(record, key);
            inner.enqueue(Due { id, pool, key }, not_before);
        }
        inner.background.spawn(Arc::clone(&inner).release_due());
        inner.workers.spawn(Arc::clone(&inner).dispatch_async());
        for n in 0..config.blocking_workers.get() {
            let inner = Arc::clone(&inner);
            let token = inner.workers.token();
            std::thread::Builder::new()
                .name(format!("jobd-blocking-{n}"))
                .spawn(move || {
                    inner.serve_blocking();
                    // Let go of the engine before reporting this thread
                    // done, so a finished shutdown leaves nothing holding
                    // the store (and a durable store's lock).
                    drop(inner);
                    drop(token);
                })
                .expect("spawn a blocking-pool thread");
        }
        // Not tracked: it stops with `stopped`, and a drain need not wait for it.
        inner
            .background
            .spawn(Arc::clone(&inner).retain(config.retention));
        Ok(Self { inner })
    }

    /// The registered functions.
    #[must_use]
    pub fn registry(&self) -> &Registry {
        &self.inner.registry
    }

    /// Accepts a job; returns its id and state at the time of the answer.
    /// With a durable store the job is on disk when this returns. A request
    /// id seen before with the same function and arguments returns the
    /// earlier job instead of creating one.
    ///
    /// # Errors
    ///
    /// `UnknownFunction`, `InvalidArgument` (pool mismatch), `QueueFull`,
    /// `DuplicateRequest`, `ShuttingDown`, `Store` (fail-stop).
    pub async fn submit(&self, spec: SubmitSpec) -> Result<(JobId, JobState), Error> {
        let (record, key) = self.inner.prepare(spec)?;
        // Safe to drop mid-way (a client that hangs up): once the store has
        // the job it queues it itself (with a durable store, on the writer
        // thread right after the commit), whoever still waits.
        self.inner.admit(record, key).await
    }

    /// As [`Engine::submit`], but the job is checked and takes its place in
    /// its pool's queue before this returns; the future only records it. So
    /// a caller that submits several jobs this way and awaits the futures
    /// concurrently (sharing commits) still has them start in call order.
    pub fn submit_in_order(
        &self,
        spec: SubmitSpec,
    ) -> impl Future<Output = Result<(JobId, JobState), Error>> + Send + 'static {
        let prepared = self.inner.prepare(spec);
        let inner = Arc::clone(&self.inner);
        async move {
            let (record, key) = prepared?;
            inner.admit(record, key).await
        }
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
        let prepared: Vec<_> = specs
            .into_iter()
            .map(|spec| self.inner.prepare(spec))
            .collect();
        let inner = &self.inner;
        // Not `join_all`: past 30 futures it keeps them in a
        // `FuturesOrdered`, whose per-future task node and waker cost about
        // as much as an in-memory admission itself (callgrind, batches of
        // 1,000). Here nearly every admission is ready on its first poll
        // (memory store) or within the few group commits the batch shares
        // (SQLite), so polling the unfinished ones again on each wake is
        // cheaper.
        let mut admissions: Vec<_> = prepared
            .into_iter()
            .map(|prepared| {
                Box::pin(futures::future::maybe_done(async move {
                    let (record, key) = prepared?;
                    inner.admit(record, key).await
                }))
            })
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

    /// Pauses or resumes both pools. While paused, jobs are accepted and
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
        self.inner.store.state(id).await
    }

    /// A copy of the job's whole record.
    ///
    /// # Errors
    ///
    /// `JobNotFound`, `JobGone`, `Store`.
    pub async fn get(&self, id: JobId) -> Result<JobRecord, Error> {
        self.inner.store.get(id).await
    }

    /// Waits, without polling, until the job is terminal. Callers bound the
    /// wait with `tokio::time::timeout`; dropping the future is safe.
    ///
    /// # Errors
    ///
    /// `JobNotFound`, or `ShuttingDown` if the engine stops first.
    pub async fn wait(&self, id: JobId) -> Result<Finished, Error> {
        let store = &self.inner.store;
        let _waiting = WaiterGauge::enter(&self.inner.waiters);
        loop {
            let notify = match store.wait_for(id).await? {
                WaitFor::Finished(finished) => return Ok(finished),
                WaitFor::Pending(notify) => notify,
            };
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            // The job may have finished (or left memory) between `wait_for`
            // and `enable`; then look again.
            if store.is_terminal(id) != Some(false) {
                continue;
            }
            tokio::select! {
                biased;
                () = &mut notified => {}
                () = self.inner.stopped.cancelled() => {
                    // Jobs interrupted by the stop finished just before it:
                    // that is still an answer.
                    return store.finished_in_memory(id).ok_or(Error::ShuttingDown);
                }
            }
        }
    }

    /// Cancels the job if it can, as described on [`CancelOutcome`].
    ///
    /// # Errors
    ///
    /// `JobNotFound`, `JobGone`, `Store`.
    pub async fn cancel(&self, id: JobId) -> Result<(CancelOutcome, JobState), Error> {
        // Safe to drop mid-way: the writer publishes a committed cancel by
        // itself, and a queue entry left behind is skipped by its worker.
        self.inner.cancel(id).await
    }

    /// How many jobs the engine holds in memory, in any state.
    #[must_use]
    pub fn job_count(&self) -> usize {
        self.inner.store.len()
    }

    /// Jobs held in memory per state name ("pending", "running", ...).
    #[must_use]
    pub fn job_counts(&self) -> std::collections::BTreeMap<&'static str, usize> {
        self.inner.store.counts()
    }

    /// With a durable store: (commits, operations) so far; their ratio is the
    /// mean group-commit batch size.
    #[must_use]
    pub fn commit_stats(&self) -> Option<(u64, u64)> {
        self.inner.store.commit_stats()
    }

    /// True when job state survives a restart.
    #[must_use]
    pub fn is_durable(&self) -> bool {
        self.inner.store.is_durable()
    }

    /// How many callers are waiting for a job to finish right now.
    #[must_use]
    pub fn waiters(&self) -> usize {
        self.inner.waiters.load(Ordering::Acquire)
    }

    /// How many jobs wait in each pool's queue: (async, blocking). Delayed
    /// jobs and jobs waiting to retry count too: they hold their slots.
    #[must_use]
    pub fn queued(&self) -> (usize, usize) {
        (
            self.inner.async_queue.len(),
            self.inner.blocking_queue.len(),
        )
    }

    /// Drains: refuses new jobs, starts no pending job, lets running jobs
    /// finish for up to `grace`, then interrupts whatever still runs (async
    /// jobs are aborted, blocking jobs are asked to stop; in memory they are
    /// marked failed, with a durable store they run again after a restart)
    /// and releases every waiter. Idempotent.
    pub async fn shutdown(&self, grace: Duration) {
        let inner = &self.inner;
        inner.accepting.store(false, Ordering::Release);
        inner.async_queue.close();
        inner.blocking_queue.close();
        // Paused workers must wake to see the closed queues and exit.
        inner.paused.send_replace(false);
        inner.workers.close();
        if tokio::time::timeout(grace, inner.workers.wait())
            .await
            .is_err()
        {
            let n = inner
                .store
                .stop_running("the server shut down before the job finished")
                .await;
            tracing::warn!(
                jobs = n,
                ?grace,
                "grace period over; interrupted running jobs"
            );
        }
        // Outcomes of jobs that finished during the drain may still be on
        // their way to the writer; let them land before waiters give up.
        inner.store.flush().await;
        inner.stopped.cancel();
        inner.background.close();
        inner.background.wait().await;
    }
}

impl Inner {
    /// Checks a submission and reserves its queue slot.
    fn prepare(&self, spec: SubmitSpec) -> Result<(JobRecord, QueueKey), Error> {
        if !self.accepting.load(Ordering::Acquire) {
            return Err(Error::ShuttingDown);
        }
        if let Some(failure) = self.store.failure() {
            // Fail-stop: refuse at once, for the same reason as the first time.
            return Err(Error::Store(failure));
        }
        let function = self.function_for(&spec)?;
        let args_bytes = json_len(&spec.args);
        if args_bytes > self.max_args_bytes {
            return Err(Error::invalid(
                "args",
                format!(
                    "is {args_bytes} bytes of JSON; the server takes at most {} (--max-args-bytes)",
                    self.max_args_bytes
                ),
            ));
        }
        let violations = function.check_args(&spec.args);
        if !violations.is_empty() {
            return Err(Error::ArgsRejected {
                function: spec.function,
                violations,
            });
        }
        let pool = function.pool();
        let queue = self.queue(pool);
        let key =
            queue
                .reserve(spec.priority, spec.not_before)
                .map_err(|rejected| match rejected {
                    Rejected::Full => Error::QueueFull {
                        pool,
                        capacity: queue.capacity(),
                    },
                    Rejected::Closed => Error::ShuttingDown,
                })?;
        let record = JobRecord {
            id: JobId::new(),
            function: Arc::clone(function.name()),
            pool,
            state: JobState::Pending,
            args: spec.args,
            labels: spec.labels,
            request_id: spec.request_id,
            priority: spec.priority,
            not_before: spec.not_before,
            timeout: spec.timeout,
            max_attempts: spec.max_attempts.max(1),
            submitted_at: SystemTime::now(),
            started_at: None,
            finished_at: None,
            attempt: 0,
            outcome: None,
            progress: None,
        };
        Ok((record, key))
    }

    /// The function `spec` names, if it exists and runs on the pool asked for.
    fn function_for(&self, spec: &SubmitSpec) -> Result<&Function, Error> {
        let function = self
            .registry
            .get(&spec.function)
            .ok_or_else(|| Error::UnknownFunction(spec.function.clone()))?;
        let pool = function.pool();
        if let Some(requested) = spec.pool
            && requested != pool
        {
            return Err(Error::invalid(
                "pool",
                format!(
                    "function {:?} runs on the {pool} pool, not the {requested} pool",
                    spec.function
                ),
            ));
        }
        Ok(function)
    }

    /// Records a reserved job and queues it, or gives the reservation back.
    async fn admit(
        self: &Arc<Self>,
        record: JobRecord,
        key: QueueKey,
    ) -> Result<(JobId, JobState), Error> {
        let (id, pool) = (record.id, record.pool);
        let inner = Arc::clone(self);
        // Runs exactly once, when the store has decided: queue the job, or
        // give its slot back.
        let not_before = record.not_before;
        let queue = move |admitted: Option<JobId>| match admitted {
            Some(id) => inner.enqueue(Due { id, pool, key }, not_before),
            None => inner.queue(pool).release(key),
        };
        match self.store.admit(record, key, queue).await? {
            Admission::New => Ok((id, JobState::Pending)),
            Admission::Existing(existing) => Ok((existing, self.store.state(existing).await?)),
        }
    }

    async fn cancel(&self, id: JobId) -> Result<(CancelOutcome, JobState), Error> {
        let outcome = match self.store.cancel(id).await? {
            CancelPlan::Pending(pool, key) => {
                if let Some(due) = self.schedule.remove(id) {
                    // Still waiting for its time: give its slot back now,
                    // not when it would have been due.
                    self.queue(due.pool).release(due.key);
                } else if let Some(key) = key {
                    self.queue(pool).remove(key);
                }
                CancelOutcome::Cancelled
            }
            CancelPlan::AbortAsync => CancelOutcome::Aborted,
            CancelPlan::RequestBlocking => CancelOutcome::Requested,
            CancelPlan::AlreadyDone => CancelOutcome::AlreadyDone,
        };
        Ok((outcome, self.store.state(id).await?))
    }

    /// Makes an admitted job startable: at once, or through the schedule
    /// when `not_before` is still ahead.
    fn enqueue(&self, due: Due, not_before: Option<SystemTime>) {
        match not_before {
            Some(at) if at > SystemTime::now() => self.schedule.add(at, due),
            _ => self.queue(due.pool).push(due.key, due.id),
        }
    }

    /// The schedule's one task: sleeps until the earliest delayed job is due
    /// (or an earlier one is added), then queues whatever is due.
    async fn release_due(self: Arc<Self>) {
        loop {
            let changed = self.schedule.changed();
            tokio::pin!(changed);
            // Register before looking, so an `add` after the look wakes us.
            changed.as_mut().enable();
            let (due, next) = self.schedule.take_due(SystemTime::now());
            for job in due {
                self.queue(job.pool).push(job.key, job.id);
            }
            let sleep = async {
                match next {
                    Some(at) => {
                        let wait = at.duration_since(SystemTime::now()).unwrap_or_default();
                        tokio::time::sleep(wait).await;
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = &mut changed => {}
                () = sleep => {}
                () = self.stopped.cancelled() => return,
            }
        }
    }

    fn queue(&self, pool: PoolKind) -> &JobQueue {
        match pool {
            PoolKind::Async => &self.async_queue,
            PoolKind::Blocking => &self.blocking_queue,
        }
    }

    /// Takes a concurrency slot, then a job, and runs it as a task; the slot
    /// is held until the job ends, so at most `async_concurrency` run at once.
    async fn dispatch_async(self: Arc<Self>) {
        let mut paused = self.paused.subscribe();
        loop {
            if paused.wait_for(|paused| !paused).await.is_err() {
                return;
            }
            let Ok(slot) = Arc::clone(&self.async_slots).acquire_owned().await else {
                return;
            };
            let Some(id) = self.async_queue.pop().await else {
                return;
            };
            let inner = Arc::clone(&self);
            self.workers.spawn(async move {
                let _slot = slot;
                inner.run_async(id).await;
            });
        }
    }

    async fn run_async(&self, id: JobId) {
        let Some(claim) = self.store.claim(id).await else {
            return;
        };
        let attempt = Attempt::of(&claim);
        let outcome = match self.function(&claim.function).map(Function::body) {
            Some(Body::Async(body)) => {
                let ctx = Ctx::new(
                    id,
                    claim.attempt,
                    claim.cancel.clone(),
                    self.runtime.clone(),
                    Arc::clone(self.store.live_table()),
                );
                // Building the future runs user code too, so it is guarded
                // like the future itself.
                let limit = time_limit(claim.timeout);
                match std::panic::catch_unwind(AssertUnwindSafe(|| body(ctx, claim.args))) {
                    Ok(job) => tokio::select! {
                        biased;
                        () = claim.cancel.cancelled() => Err(JobError::Cancelled),
                        // Dropping the job's future is the abort.
                        err = limit => Err(err),
                        result = AssertUnwindSafe(job).catch_unwind() => {
                            result.unwrap_or_else(|panic| Err(panicked(&*panic)))
                        }
                    },
                    Err(panic) => Err(panicked(&*panic)),
                }
            }
            _ => Err(JobError::failed(format!(
                "function {:?} is not an async function",
                claim.function
            ))),
        };
        self.end_attempt(id, PoolKind::Async, attempt, outcome)
            .await;
    }

    /// Records how an attempt ended, or, for a retryable failure with
    /// attempts left, puts the job back to pending and schedules its next
    /// attempt after a backoff. The retry takes a queue slot regardless of
    /// the bound, as recovery does: the job was accepted long ago.
    async fn end_attempt(&self, id: JobId, pool: PoolKind, attempt: Attempt, outcome: Outcome) {
        let Attempt {
            attempt,
            max_attempts,
            priority,
        } = attempt;
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
            && attempt < max_attempts
        {
            let queue = self.queue(pool);
            let wait = backoff(id, attempt);
            let due = SystemTime::now() + wait;
            let key = queue.reserve_recovered(priority, due);
            if self.store.retry(id, attempt, key).await {
                tracing::debug!(%id, attempt, ?wait, %reason, "retrying");
                self.schedule.add(due, Due { id, pool, key });
                return;
            }
            queue.release(key);
        }
        self.store.finish(id, attempt, outcome).await;
    }

    /// The loop of one blocking-pool thread.
    fn serve_blocking(self: &Arc<Self>) {
        let mut paused = self.paused.subscribe();
        let next = |paused: &mut watch::Receiver<bool>| {
            self.runtime.block_on(async {
                paused.wait_for(|paused| !paused).await.ok()?;
                self.blocking_queue.pop().await
            })
        };
        while let Some(id) = next(&mut paused) {
            let Some(claim) = self.runtime.block_on(self.store.claim(id)) else {
                continue;
            };
            let attempt = Attempt::of(&claim);
            // A blocking function cannot be stopped from outside: at the
            // limit the job is failed and its context cancelled, and the
            // function's own late outcome is then refused as stale.
            let watchdog = claim.timeout.map(|limit| {
                let (inner, cancel, attempt) =
                    (Arc::clone(self), claim.cancel.clone(), claim.attempt);
                self.runtime.spawn(async move {
                    tokio::select! {
                        err = time_limit(Some(limit)) => {
                            if inner.store.finish(id, attempt, Err(err)).await {
                                cancel.cancel();
                            }
                        }
                        () = inner.stopped.cancelled() => {}
                    }
                })
            });
            let outcome: Outcome = match self.function(&claim.function).map(Function::body) {
                Some(Body::Blocking(body)) => {
                    let ctx = Ctx::new(
                        id,
                        claim.attempt,
                        claim.cancel,
                        self.runtime.clone(),
                        Arc::clone(self.store.live_table()),
                    );
                    std::panic::catch_unwind(AssertUnwindSafe(|| body(ctx, claim.args)))
                        .unwrap_or_else(|panic| Err(panicked(&*panic)))
                }
                _ => Err(JobError::failed(format!(
                    "function {:?} is not a blocking function",
                    claim.function
                ))),
            };
            if let Some(watchdog) = watchdog {
                watchdog.abort();
            }
            self.runtime
                .block_on(self.end_attempt(id, PoolKind::Blocking, attempt, outcome));
        }
    }

    /// Removes finished jobs past retention, in small batches, until stopped.
    async fn retain(self: Arc<Self>, retention: Duration) {
        let interval = (retention / 4).clamp(Duration::from_millis(10), Duration::from_secs(60));
        loop {
            tokio::select! {
                () = self.stopped.cancelled() => return,
                () = tokio::time::sleep(interval) => {}
            }
            loop {
                match self.store.purge(PURGE_BATCH).await {
                    Ok(Purged { removed, more }) => {
                        if removed > 0 {
                            tracing::debug!(removed, "retention removed finished jobs");
                        }
                        if !more {
                            break;
                        }
                        tokio::task::yield_now().await;
                    }
                    Err(err) => {
                        tracing::warn!(%err, "retention could not remove finished jobs");
                        break;
                    }
                }
            }
        }
    }

    fn function(&self, name: &str) -> Option<&Function> {
        self.registry.get(name)
    }
}

/// Runs `work` so that it completes even if the caller's future is dropped:
/// as a task of its own when it writes to a durable store (where it awaits a
/// commit), inline otherwise (the in-memory store never yields mid-update).
async fn run_to_completion<T, F>(detach: bool, work: F) -> Result<T, Error>
where
    F: Future<Output = Result<T, Error>> + Send + 'static,
    T: Send + 'static,
{
    if !detach {
        return work.await;
    }
    tokio::spawn(work).await.unwrap_or_else(|err| {
        tracing::error!(%err, "a store update task failed");
        Err(Error::Store(StoreError::Unavailable(
            "internal error".into(),
        )))
    })
}

/// The length of `value` as compact JSON text, without building the text.
fn json_len(value: &serde_json::Value) -> usize {
    struct Counter(usize);
    impl std::io::Write for Counter {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut counter = Counter(0);
    // Writing a `Value` into a sink that never fails cannot fail.
    let _ = serde_json::to_writer(&mut counter, value);
    counter.0
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

/// What deciding on a retry needs to know about the attempt that ended.
#[derive(Clone, Copy)]
struct Attempt {
    attempt: u32,
    max_attempts: u32,
    priority: i32,
}

impl Attempt {
    fn of(claim: &crate::store::Claim) -> Self {
        Self {
            attempt: claim.attempt,
            max_attempts: claim.max_attempts,
            priority: claim.priority,
        }
    }
}

/// The pause before the attempt after `attempt`: 100 ms doubling per
/// attempt, at most 60 s, scaled by a jitter factor in [0.5, 1) drawn from
/// the job id and attempt, so that jobs failing together do not retry in
/// lockstep.
fn backoff(id: JobId, attempt: u32) -> Duration {
    use std::hash::{BuildHasher as _, Hasher as _};
    let base = Duration::from_millis(100)
        .saturating_mul(1 << attempt.saturating_sub(1).min(20))
        .min(Duration::from_secs(60));
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write(id.as_uuid().as_bytes());
    hasher.write_u32(attempt);
    // 16 random bits are plenty for a jitter factor.
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

//! How an engine is sized and bounded: its pools, queues, retention, event
//! history and caps.

use std::{
    num::{NonZeroU64, NonZeroUsize},
    path::PathBuf,
    time::Duration,
};

use crate::clock::Clock;

/// Pool sizes, queue bounds and caps of an [`Engine`](crate::Engine).
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// How many async jobs may run at once.
    pub async_concurrency: NonZeroUsize,
    /// How many dedicated threads the blocking pool has.
    pub blocking_workers: NonZeroUsize,
    /// How many child processes the process pool may run at once (one job
    /// each). Children start when the first process job comes, so a
    /// server that runs none starts none.
    pub process_workers: NonZeroUsize,
    /// A child of the process pool is replaced after this many jobs (like
    /// Python's `max_tasks_per_child`); `None`: never.
    pub process_max_jobs_per_child: Option<NonZeroU64>,
    /// The address-space limit (RLIMIT_AS) each child of the process pool
    /// sets on itself, in bytes; `None`: none. A job that allocates past it
    /// kills its child (the job fails with `WORKER_LOST`), not the server.
    pub process_memory_limit: Option<u64>,
    /// The program the process pool's children run, with a marker argument
    /// that [`run_child_if_requested`](crate::process::run_child_if_requested)
    /// recognises; `None`: this program (`std::env::current_exe`). Its
    /// `main` must make that call first thing, with a registry holding the
    /// functions sent to the pool.
    pub process_program: Option<PathBuf>,
    /// How many pending jobs each pool's queue holds before Submit is refused
    /// with `RESOURCE_EXHAUSTED`.
    pub max_queued: NonZeroUsize,
    /// How long finished jobs and their results are kept.
    pub retention: Duration,
    /// With a durable store, how many finished jobs stay in memory for fast
    /// reads (older ones are read from disk).
    pub cache_finished: usize,
    /// Start with every local pool paused (see [`Engine::set_paused`](crate::Engine::set_paused)).
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
    /// it back for ever (see the queue's guarantee in the operations guide).
    /// Zero turns aging off: priority alone decides.
    pub priority_aging: Duration,
    /// The largest argument a job may be submitted with, in bytes of JSON
    /// text; a larger one is refused with `InvalidArgument` (field `args`).
    pub max_args_bytes: usize,
    /// The largest value a job may return, in bytes of JSON text; a job
    /// returning more ends `FAILED` with
    /// [`JobError::ResultTooLarge`](crate::JobError::ResultTooLarge).
    pub max_result_bytes: usize,
    /// The bytes of each job's log kept: past it the oldest entries are
    /// dropped (a reader is told how many bytes it missed).
    pub max_log_bytes: u64,
    /// How often a remote worker must be heard from (it sends a heartbeat
    /// when it has nothing else to say).
    pub worker_heartbeat_interval: Duration,
    /// How long a remote worker's leases last without hearing from it: its
    /// running jobs go back to pending (or fail, when not safe to retry)
    /// within this plus a second after it vanished.
    pub worker_lease_timeout: Duration,
    /// How many remote worker sessions may be attached at once.
    pub max_workers: usize,
    /// Where stored times come from: [`Clock::system`] (the default), or
    /// [`Clock::tokio`] for tests on tokio's paused clock.
    pub clock: Clock,
    /// Deliberate faults for tests (only with the `fault-injection`
    /// feature).
    #[cfg(feature = "fault-injection")]
    pub faults: crate::store::Faults,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            async_concurrency: NonZeroUsize::new(1024).expect("nonzero"),
            blocking_workers: std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN),
            process_workers: std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN),
            process_max_jobs_per_child: None,
            process_memory_limit: None,
            process_program: None,
            max_queued: NonZeroUsize::new(100_000).expect("nonzero"),
            retention: Duration::from_secs(7 * 24 * 3600),
            cache_finished: 100_000,
            paused: false,
            event_history: NonZeroUsize::new(65_536).expect("nonzero"),
            max_watchers: 1024,
            priority_aging: Duration::from_secs(1),
            max_args_bytes: 1024 * 1024,
            max_result_bytes: 1024 * 1024,
            max_log_bytes: 1024 * 1024,
            worker_heartbeat_interval: Duration::from_secs(5),
            worker_lease_timeout: Duration::from_secs(30),
            max_workers: 1024,
            clock: Clock::system(),
            #[cfg(feature = "fault-injection")]
            faults: crate::store::Faults::default(),
        }
    }
}

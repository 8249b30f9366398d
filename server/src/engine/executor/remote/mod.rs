//! The remote worker pool: processes anywhere that attach over the worker
//! protocol (`grpc/worker.rs` speaks the wire), declare the functions they
//! serve, and run the jobs jobd hands them. A worker session is one more
//! executor on the store boundary: it claims through the store, holds a
//! lease per job (renewed while the worker is heard from), and ends each
//! attempt with its lease, so a worker that vanished, or a report that
//! comes too late, is fenced off by the store.
//!
//! - [`functions`]: what workers have declared; a declared function stays
//!   known while no worker serves it (its jobs are accepted and wait).
//! - [`session`]: one attached worker: its credit, its running jobs, its
//!   outbox.
//! - [`lanes`]: one dispatcher per queue of the worker pool (a function and
//!   a set of worker labels): waits for a worker with a free slot, claims,
//!   and assigns fairly (the worker with the most free slots first).
//!
//! Credits, not prefetch: a session is assigned a job only against a free
//! slot it announced. Leases lapse `lease_timeout` after the worker was last
//! heard from; the engine's maintenance then takes them back.

mod functions;
mod lanes;
mod session;

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use jobd_proto::JobId;
use tokio::sync::{Notify, mpsc};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

pub(crate) use self::session::{Ack, Session};
use super::Ending;
use crate::{
    Error,
    clock::Clock,
    function::{Function, Registry},
    job::{JobError, PoolName},
    store::{JobStore, Lease, LeaseHolder, QueueName},
};

/// The holder of every lease a remote worker holds. Stable across restarts,
/// so a lease recovered from disk still routes cancels to the worker that
/// re-attaches with it.
pub(crate) const WORKERS_HOLDER: &str = "workers";

/// How long a cancel that came before its job was assigned waits for the
/// assignment.
const EARLY_CANCEL_TTL: Duration = Duration::from_secs(60);

/// How the worker pool is paced and bounded.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WorkerConfig {
    /// How often a worker must be heard from.
    pub(crate) heartbeat_interval: Duration,
    /// How long a worker's leases last without hearing from it.
    pub(crate) lease_timeout: Duration,
    /// How many sessions may be attached at once.
    pub(crate) max_sessions: usize,
}

/// What a worker says when it attaches (decoded and checked by the gRPC
/// layer).
#[derive(Debug, Clone)]
pub(crate) struct WorkerAttach {
    pub(crate) name: String,
    pub(crate) instance: String,
    pub(crate) functions: Vec<DeclaredFunction>,
    pub(crate) slots: u32,
    pub(crate) labels: BTreeMap<String, String>,
    pub(crate) version: String,
    pub(crate) running: Vec<HeldLease>,
    pub(crate) peer: Option<SocketAddr>,
}

/// One function a worker declares.
#[derive(Debug, Clone)]
pub(crate) struct DeclaredFunction {
    pub(crate) name: String,
    pub(crate) description: String,
    pub(crate) args_schema: Option<serde_json::Value>,
    pub(crate) returns: Option<String>,
    pub(crate) retry_safe: bool,
}

/// A lease as a worker holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct HeldLease {
    pub(crate) job: JobId,
    pub(crate) attempt: u32,
    pub(crate) token: u64,
}

/// What jobd sends a worker.
#[derive(Debug, Clone)]
pub(crate) enum ToWorker {
    Assign(Assignment),
    Cancel { job: JobId, token: u64 },
    Drain { grace: Duration },
}

/// A job for a worker to run.
#[derive(Debug, Clone)]
pub(crate) struct Assignment {
    pub(crate) job: JobId,
    pub(crate) attempt: u32,
    pub(crate) token: u64,
    pub(crate) function: Arc<str>,
    pub(crate) args: serde_json::Value,
    pub(crate) deadline: Option<SystemTime>,
    pub(crate) max_attempts: u32,
}

/// The answer to an attach.
#[derive(Debug)]
pub(crate) struct Attached {
    pub(crate) session: Arc<Session>,
    pub(crate) outbox: mpsc::Receiver<ToWorker>,
    /// Leases the worker still held that are not current any more.
    pub(crate) lost: Vec<HeldLease>,
}

/// A session as `ListWorkers` shows it.
#[derive(Debug, Clone)]
pub(crate) struct WorkerInfo {
    pub(crate) session_id: String,
    pub(crate) name: String,
    pub(crate) instance: String,
    pub(crate) peer: Option<SocketAddr>,
    pub(crate) functions: Vec<String>,
    pub(crate) labels: BTreeMap<String, String>,
    pub(crate) slots: u32,
    pub(crate) busy: u32,
    pub(crate) running: Vec<JobId>,
    pub(crate) last_heard: SystemTime,
    pub(crate) attached_at: SystemTime,
    pub(crate) version: String,
    pub(crate) draining: bool,
}

/// The remote worker pool.
pub(crate) struct Workers {
    config: WorkerConfig,
    store: Arc<dyn JobStore>,
    clock: Clock,
    pub(crate) declared: functions::Declarations,
    /// Attached sessions, by session id.
    sessions: Mutex<HashMap<Arc<str>, Arc<Session>>>,
    /// Woken when some session's free slots, functions or state change:
    /// the lanes look again.
    changed: Notify,
    /// The dispatchers, one per queue of the worker pool.
    lanes: Mutex<HashMap<QueueName, ()>>,
    /// Breaks ties between equally free workers in turn.
    turn: AtomicU64,
    /// Cancels not yet pushed to a session (the job was claimed for a
    /// worker but not yet assigned, or no attached session runs it), with
    /// when they came; swept after a minute.
    early_cancels: Mutex<HashMap<JobId, (u64, tokio::time::Instant)>>,
    /// Fired when the engine stops.
    stopped: CancellationToken,
    /// Where the lanes and deadline watchdogs run (the engine waits for it
    /// at shutdown).
    tasks: TaskTracker,
    /// The engine's end of an attempt (result cap, retries): shared with the
    /// local executors.
    ends: Arc<Ending>,
}

impl std::fmt::Debug for Workers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workers")
            .field("config", &self.config)
            .field("sessions", &self.lock_sessions().len())
            .finish_non_exhaustive()
    }
}

impl Workers {
    pub(crate) fn new(
        config: WorkerConfig,
        store: Arc<dyn JobStore>,
        clock: Clock,
        stopped: CancellationToken,
        tasks: TaskTracker,
        ends: Arc<Ending>,
    ) -> Arc<Self> {
        Arc::new(Self {
            config,
            store,
            clock,
            declared: functions::Declarations::default(),
            sessions: Mutex::new(HashMap::new()),
            changed: Notify::new(),
            lanes: Mutex::new(HashMap::new()),
            turn: AtomicU64::new(0),
            early_cancels: Mutex::new(HashMap::new()),
            stopped,
            tasks,
            ends,
        })
    }

    pub(crate) fn config(&self) -> WorkerConfig {
        self.config
    }

    pub(crate) fn holder() -> LeaseHolder {
        Arc::from(WORKERS_HOLDER)
    }

    /// The declared function `name`, if a worker declared it.
    pub(crate) fn function(&self, name: &str) -> Option<Arc<Function>> {
        self.declared.get(name)
    }

    /// Attaches a worker: checks and records its functions, re-attaches the
    /// leases it still holds, and opens its session. A session of the same
    /// process (same instance) still attached is closed first: the worker
    /// reconnected.
    pub(crate) async fn attach(
        self: &Arc<Self>,
        attach: WorkerAttach,
        registry: &Registry,
    ) -> Result<Attached, Error> {
        let previous = self
            .lock_sessions()
            .values()
            .find(|s| s.instance() == attach.instance)
            .cloned();
        if let Some(previous) = previous {
            tracing::info!(session = %previous.id(), instance = %attach.instance, "a worker reconnected; closing its previous session");
            self.detach(&previous);
        }
        if self.lock_sessions().len() >= self.config.max_sessions {
            return Err(Error::TooManyWorkers(self.config.max_sessions));
        }
        let functions = self.declared.declare(&attach.functions, registry)?;
        let (session, outbox) = Session::new(Arc::clone(self), &attach, functions, &self.clock);
        // Re-attach what the worker still runs: each lease the store still
        // considers current is the worker's again.
        let mut lost = Vec::new();
        for held in &attach.running {
            if !session.adopt(held).await {
                lost.push(*held);
            }
        }
        session.grant_initial_credit(attach.slots, attach.running.len() - lost.len());
        self.lock_sessions()
            .insert(Arc::clone(session.id_arc()), Arc::clone(&session));
        for function in session.functions() {
            self.lanes_for_function(function);
        }
        self.changed.notify_waiters();
        tracing::info!(session = %session.id(), name = %attach.name, instance = %attach.instance, slots = attach.slots, functions = attach.functions.len(), "worker attached");
        Ok(Attached {
            session,
            outbox,
            lost,
        })
    }

    /// Ends a session: its running jobs keep their leases until they lapse
    /// (or the worker re-attaches and renews them).
    pub(crate) fn detach(&self, session: &Arc<Session>) {
        let removed = self.lock_sessions().remove(session.id_arc()).is_some();
        if removed {
            self.declared.release(session.functions());
            session.close();
            self.changed.notify_waiters();
            tracing::info!(session = %session.id(), running = session.busy(), "worker detached");
        }
    }

    /// Honours a cancel of a job a worker runs: the cancel is pushed to its
    /// session at once. When no attached session runs it, the worker learns
    /// of the recorded request when it re-attaches.
    pub(crate) fn cancel(&self, lease: &Lease) {
        // A lane may be handing the job to a session right now. The cancel
        // is recorded first, then the sessions looked at; the lane assigns
        // first, then looks for a record. So whichever of the two comes
        // second sees the other's step, and the one that takes the record
        // pushes the cancel: once, never not at all.
        {
            let mut early = self.lock_early_cancels();
            early.retain(|_, (_, at)| at.elapsed() < EARLY_CANCEL_TTL);
            early.insert(lease.job, (lease.token.0, tokio::time::Instant::now()));
        }
        if let Some(session) = self.session_running(lease.job)
            && self.take_early_cancel(lease)
        {
            session.push_cancel(lease.job, lease.token.0);
        }
    }

    /// Takes the cancel that came for `lease` before it was assigned.
    fn take_early_cancel(&self, lease: &Lease) -> bool {
        let mut early = self.lock_early_cancels();
        match early.get(&lease.job) {
            Some((token, _)) if *token == lease.token.0 => early.remove(&lease.job).is_some(),
            _ => false,
        }
    }

    fn lock_early_cancels(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<JobId, (u64, tokio::time::Instant)>> {
        self.early_cancels
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Makes sure a dispatcher serves `queue`.
    pub(crate) fn ensure_lane(self: &Arc<Self>, queue: &QueueName) {
        let mut lanes = self.lanes.lock().unwrap_or_else(PoisonError::into_inner);
        if lanes.contains_key(queue) {
            return;
        }
        let Some(route) = lanes::Route::of(queue) else {
            tracing::error!(queue = queue.as_str(), "not a worker queue");
            return;
        };
        lanes.insert(queue.clone(), ());
        self.tasks
            .spawn(lanes::run(Arc::clone(self), queue.clone(), route));
    }

    /// Starts the dispatchers of every queue of the worker pool that holds
    /// jobs (after a restart).
    pub(crate) fn resume_lanes(self: &Arc<Self>) {
        let pool = PoolName::of(crate::PoolKind::Worker);
        for queue in self.store.stats().queued.keys() {
            if queue.pool_name() == pool.as_str() {
                self.ensure_lane(queue);
            }
        }
    }

    /// The lanes of `function` with no worker labels exist as soon as a
    /// worker serves it; labelled ones come with their first job.
    fn lanes_for_function(self: &Arc<Self>, function: &Arc<str>) {
        let pool = PoolName::of(crate::PoolKind::Worker);
        self.ensure_lane(&QueueName::routed(&pool, function, &BTreeMap::new()));
    }

    /// Asks every session to drain (jobd is shutting down), waits up to
    /// `grace` for their running jobs' reports, then closes them. With an
    /// ephemeral store, jobs still running then fail as interrupted;
    /// durable ones keep their leases for the workers to re-attach after
    /// the restart.
    pub(crate) async fn drain(&self, grace: Duration) {
        let sessions: Vec<Arc<Session>> = self.lock_sessions().values().cloned().collect();
        for session in &sessions {
            session.push_drain(grace);
        }
        let deadline = tokio::time::Instant::now() + grace;
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            // A worker that went away meanwhile owes no report: its jobs
            // keep their leases until they lapse or it re-attaches.
            if sessions
                .iter()
                .all(|s| s.busy() == 0 || s.closed().is_cancelled())
            {
                break;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                break;
            }
        }
        if !self.store.is_durable() {
            for session in &sessions {
                for lease in session.leases() {
                    let interrupted = JobError::Interrupted(
                        "the server shut down before the job finished".into(),
                    );
                    if let Err(err) = self.store.complete(&lease, Err(interrupted)).await {
                        tracing::warn!(id = %lease.job, %err, "cannot record an interrupted job");
                    }
                }
            }
        }
        for session in &sessions {
            self.detach(session);
        }
    }

    /// Every attached session.
    pub(crate) fn info(&self) -> Vec<WorkerInfo> {
        let mut sessions: Vec<WorkerInfo> =
            self.lock_sessions().values().map(|s| s.info()).collect();
        sessions.sort_by_key(|s| s.attached_at);
        sessions
    }

    fn session_running(&self, job: JobId) -> Option<Arc<Session>> {
        self.lock_sessions().values().find(|s| s.runs(job)).cloned()
    }

    /// The session that should take the next job of `route`, with a free
    /// slot taken from it: the one with the most free slots, ties in turn.
    fn take_slot(&self, route: &lanes::Route) -> Option<Arc<Session>> {
        let sessions = self.lock_sessions();
        let mut eligible: Vec<&Arc<Session>> = sessions
            .values()
            .filter(|s| s.can_run(&route.function, &route.labels))
            .collect();
        if eligible.is_empty() {
            return None;
        }
        eligible.sort_by_key(|s| std::cmp::Reverse(s.free()));
        let most = eligible[0].free();
        let tied: Vec<&&Arc<Session>> = eligible.iter().take_while(|s| s.free() == most).collect();
        let start = usize::try_from(self.turn.fetch_add(1, Ordering::Relaxed)).unwrap_or(0);
        for n in 0..tied.len() {
            let session = tied[(start + n) % tied.len()];
            if session.take_credit() {
                return Some(Arc::clone(session));
            }
        }
        None
    }

    /// True when some attached session could take a job of `route` now.
    fn has_taker(&self, route: &lanes::Route) -> bool {
        self.lock_sessions()
            .values()
            .any(|s| s.can_run(&route.function, &route.labels))
    }

    /// True when some attached session takes jobs of `route`, busy or not.
    fn has_server(&self, route: &lanes::Route) -> bool {
        self.lock_sessions()
            .values()
            .any(|s| s.serves(&route.function, &route.labels))
    }

    fn lock_sessions(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Arc<Session>>> {
        // Inserts and removals cannot leave the map half-updated.
        self.sessions.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The engine's face for the worker protocol (`grpc/worker.rs`).
impl crate::Engine {
    /// Attaches a remote worker (see [`Workers::attach`]).
    pub(crate) async fn attach_worker(&self, attach: WorkerAttach) -> Result<Attached, Error> {
        if !self
            .inner
            .accepting
            .load(std::sync::atomic::Ordering::Acquire)
        {
            return Err(Error::ShuttingDown);
        }
        self.inner
            .workers
            .attach(attach, &self.inner.registry)
            .await
    }

    /// Ends a worker's session.
    pub(crate) fn detach_worker(&self, session: &Arc<Session>) {
        self.inner.workers.detach(session);
    }

    /// How workers are paced.
    pub(crate) fn worker_config(&self) -> WorkerConfig {
        self.inner.workers.config()
    }

    /// The attached worker sessions, oldest first.
    pub(crate) fn worker_sessions(&self) -> Vec<WorkerInfo> {
        self.inner.workers.info()
    }

    /// The functions remote workers declared, each with how many sessions
    /// serve it now.
    pub(crate) fn worker_functions(&self) -> Vec<(Arc<Function>, usize)> {
        self.inner
            .workers
            .declared
            .all()
            .into_iter()
            .map(|declared| (declared.function, declared.serving))
            .collect()
    }
}

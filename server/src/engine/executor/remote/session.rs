//! One attached worker: what it serves, the slots it has said are free, the
//! jobs it runs (each under its lease), and the outbox of what jobd tells
//! it. The gRPC layer drives it: each message from the worker becomes a
//! call here, and the outbox is written to the worker's stream.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Arc, Mutex, PoisonError, Weak,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    time::{Duration, SystemTime},
};

use jobd_proto::JobId;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{Assignment, HeldLease, ToWorker, WorkerAttach, WorkerInfo, Workers};
use crate::{
    clock::Clock,
    job::{JobError, Outcome},
    store::{Claimed, Fenced, FencingToken, Lease, LeaseState, LogLine, StoreError},
};

/// What became of a report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Ack {
    /// Committed (or it was already: a repeat).
    Accepted,
    /// Refused: the lease is not current; nothing changed.
    Stale(String),
}

/// A job the worker runs.
struct Run {
    lease: Lease,
    max_attempts: u32,
    /// Fails the job at its deadline, if it has one.
    watchdog: Option<tokio::task::AbortHandle>,
}

pub(crate) struct Session {
    id: Arc<str>,
    workers: Weak<Workers>,
    name: String,
    instance: String,
    version: String,
    peer: Option<std::net::SocketAddr>,
    labels: BTreeMap<String, String>,
    functions: Vec<Arc<str>>,
    slots: u32,
    /// Slots the worker said are free and no job took yet.
    credit: AtomicU32,
    draining: AtomicBool,
    /// Fired when the session is over (detached, replaced, jobd stopping):
    /// its stream ends.
    closed: CancellationToken,
    jobs: Mutex<HashMap<JobId, Run>>,
    /// Bounded: at most a slot's worth of assignments and cancels each, and
    /// a drain.
    outbox: mpsc::Sender<ToWorker>,
    heard: Mutex<Heard>,
    attached_at: SystemTime,
    clock: Clock,
}

struct Heard {
    /// When the worker was last heard from (shown by `ListWorkers`).
    at: SystemTime,
    /// When its leases were last renewed.
    renewed: tokio::time::Instant,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("instance", &self.instance)
            .finish_non_exhaustive()
    }
}

impl Session {
    pub(super) fn new(
        workers: Arc<Workers>,
        attach: &WorkerAttach,
        functions: Vec<Arc<str>>,
        clock: &Clock,
    ) -> (Arc<Self>, mpsc::Receiver<ToWorker>) {
        let capacity = usize::try_from(attach.slots)
            .unwrap_or(usize::MAX)
            .saturating_mul(2)
            .saturating_add(16);
        let (outbox, inbox) = mpsc::channel(capacity);
        let now = clock.now();
        let session = Arc::new(Self {
            id: Arc::from(jobd_proto::JobId::minted_at(now).to_string()),
            workers: Arc::downgrade(&workers),
            name: attach.name.clone(),
            instance: attach.instance.clone(),
            version: attach.version.clone(),
            peer: attach.peer,
            labels: attach.labels.clone(),
            functions,
            slots: attach.slots,
            credit: AtomicU32::new(0),
            draining: AtomicBool::new(false),
            closed: CancellationToken::new(),
            jobs: Mutex::new(HashMap::new()),
            outbox,
            heard: Mutex::new(Heard {
                at: now,
                renewed: tokio::time::Instant::now(),
            }),
            attached_at: now,
            clock: clock.clone(),
        });
        (session, inbox)
    }

    pub(crate) fn id(&self) -> &str {
        &self.id
    }

    pub(super) fn id_arc(&self) -> &Arc<str> {
        &self.id
    }

    pub(super) fn instance(&self) -> &str {
        &self.instance
    }

    pub(super) fn functions(&self) -> &[Arc<str>] {
        &self.functions
    }

    /// Fired when the session is over.
    pub(crate) fn closed(&self) -> &CancellationToken {
        &self.closed
    }

    pub(super) fn close(&self) {
        self.closed.cancel();
    }

    /// The first credit: the slots, less the jobs it re-attached.
    pub(super) fn grant_initial_credit(&self, slots: u32, running: usize) {
        let running = u32::try_from(running).unwrap_or(u32::MAX);
        self.credit
            .store(slots.saturating_sub(running), Ordering::Release);
    }

    /// Takes back a lease the worker still holds after a reconnect, if the
    /// store still considers it current.
    pub(super) async fn adopt(&self, held: &HeldLease) -> bool {
        let Some(workers) = self.workers.upgrade() else {
            return false;
        };
        let lease = Lease {
            job: held.job,
            attempt: held.attempt,
            token: FencingToken(held.token),
            expires_at: None,
        };
        let state = match workers
            .store
            .renew(&lease, workers.config.lease_timeout)
            .await
        {
            Ok(state) => state,
            Err(err) => {
                tracing::warn!(id = %held.job, %err, "cannot renew a re-attached lease");
                return false;
            }
        };
        let cancel = match state {
            LeaseState::Lost => return false,
            LeaseState::Live { .. } => false,
            LeaseState::CancelRequested { .. } => true,
        };
        let max_attempts = match workers.store.get(held.job).await {
            Ok(Ok(record)) => record.max_attempts,
            _ => 1,
        };
        self.lock_jobs().insert(
            held.job,
            Run {
                lease,
                max_attempts,
                watchdog: None,
            },
        );
        if cancel {
            self.push_cancel(held.job, held.token);
        }
        true
    }

    /// Whether this session may take a job of `function` requiring
    /// `labels` now.
    pub(super) fn can_run(&self, function: &str, labels: &BTreeMap<String, String>) -> bool {
        self.free() > 0 && self.serves(function, labels)
    }

    /// Whether this session takes jobs of `function` requiring `labels`,
    /// once it has a free slot (it is neither draining nor closed).
    pub(super) fn serves(&self, function: &str, labels: &BTreeMap<String, String>) -> bool {
        !self.draining.load(Ordering::Acquire)
            && !self.closed.is_cancelled()
            && self.functions.iter().any(|f| **f == *function)
            && labels
                .iter()
                .all(|(key, value)| self.labels.get(key) == Some(value))
    }

    pub(super) fn free(&self) -> u32 {
        self.credit.load(Ordering::Acquire)
    }

    /// Takes one free slot, if there is one.
    pub(super) fn take_credit(&self) -> bool {
        self.credit
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |c| c.checked_sub(1))
            .is_ok()
    }

    /// The worker freed `slots` more slots.
    pub(crate) fn credit(&self, slots: u32) {
        let _ = self
            .credit
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |c| {
                Some(c.saturating_add(slots).min(self.slots))
            });
        self.changed();
    }

    /// How many jobs it runs.
    pub(crate) fn busy(&self) -> usize {
        self.lock_jobs().len()
    }

    pub(super) fn runs(&self, job: JobId) -> bool {
        self.lock_jobs().contains_key(&job)
    }

    /// The leases of the jobs it runs.
    pub(super) fn leases(&self) -> Vec<Lease> {
        self.lock_jobs().values().map(|r| r.lease.clone()).collect()
    }

    /// Hands the worker a claimed job (a slot was taken for it). False when
    /// the session is over: the caller finds another.
    pub(super) fn assign(&self, claimed: &Claimed, deadline: Option<SystemTime>) -> bool {
        if self.closed.is_cancelled() {
            return false;
        }
        let lease = claimed.lease.clone();
        let assignment = Assignment {
            job: lease.job,
            attempt: lease.attempt,
            token: lease.token.0,
            function: Arc::clone(&claimed.function),
            args: claimed.args.clone(),
            deadline,
            max_attempts: claimed.max_attempts,
        };
        self.lock_jobs().insert(
            lease.job,
            Run {
                lease,
                max_attempts: claimed.max_attempts,
                watchdog: None,
            },
        );
        if self.outbox.try_send(ToWorker::Assign(assignment)).is_err() {
            self.lock_jobs().remove(&claimed.lease.job);
            return false;
        }
        true
    }

    /// Records the watchdog that fails `job` at its deadline.
    pub(super) fn watch_deadline(&self, job: JobId, watchdog: tokio::task::AbortHandle) {
        if let Some(run) = self.lock_jobs().get_mut(&job) {
            run.watchdog = Some(watchdog);
        } else {
            watchdog.abort();
        }
    }

    /// Tells the worker to stop a job. True when the message went out.
    pub(crate) fn push_cancel(&self, job: JobId, token: u64) -> bool {
        self.outbox
            .try_send(ToWorker::Cancel { job, token })
            .is_ok()
    }

    /// Tells the worker jobd is shutting down: it takes nothing new.
    pub(super) fn push_drain(&self, grace: Duration) {
        self.draining.store(true, Ordering::Release);
        let _ = self.outbox.try_send(ToWorker::Drain { grace });
    }

    /// The worker said something: it is alive. Its leases are renewed when
    /// half the heartbeat interval has passed since the last renewal; a
    /// lease the store no longer considers current is dropped here and its
    /// job cancelled on the worker.
    pub(crate) async fn heard(&self) {
        let Some(workers) = self.workers.upgrade() else {
            return;
        };
        let due = {
            let mut heard = self.lock_heard();
            heard.at = self.clock.now();
            let due = heard.renewed.elapsed() >= workers.config.heartbeat_interval / 2;
            if due {
                heard.renewed = tokio::time::Instant::now();
            }
            due
        };
        if !due {
            return;
        }
        for lease in self.leases() {
            match workers
                .store
                .renew(&lease, workers.config.lease_timeout)
                .await
            {
                Ok(LeaseState::Live { .. } | LeaseState::CancelRequested { .. }) => {}
                Ok(LeaseState::Lost) => {
                    self.forget(lease.job, lease.token.0);
                    self.push_cancel(lease.job, lease.token.0);
                }
                Err(err) => tracing::warn!(id = %lease.job, %err, "cannot renew a worker's lease"),
            }
        }
    }

    /// A progress report.
    pub(crate) fn progress(&self, job: JobId, token: u64, fraction: f64, message: &str) {
        let lease = self.lease_of(job, token);
        if let (Some(lease), Some(workers)) = (lease, self.workers.upgrade()) {
            workers.store.progress(&lease, fraction, message);
        }
    }

    /// Lines a running job wrote, appended to its log under the lease
    /// (dropped when the lease is not this session's, or not current).
    /// Awaited before the worker's next message is read, so that the lines
    /// are stored before a report that follows them.
    pub(crate) async fn log(
        &self,
        job: JobId,
        token: u64,
        lines: Vec<LogLine>,
    ) -> Result<(), StoreError> {
        let (Some(lease), Some(workers)) = (self.lease_of(job, token), self.workers.upgrade())
        else {
            return Ok(());
        };
        workers.store.append_log(&lease, lines).await.map(|_| ())
    }

    /// How a job ended: recorded through the store, under the lease, and
    /// answered once durable. A report for a lease that is not current is
    /// stale (a repeat of a recorded one is accepted again).
    pub(crate) async fn report(
        &self,
        job: JobId,
        token: u64,
        outcome: Outcome,
    ) -> Result<Ack, StoreError> {
        let Some(workers) = self.workers.upgrade() else {
            return Err(StoreError::Unavailable("jobd is shutting down".into()));
        };
        let (lease, max_attempts) = match self.run_of(job, token) {
            Some(found) => found,
            // Not (or no longer) this session's: a report sent again after
            // a reconnect, for a job that ended while the worker was away.
            // The store decides (current, a repeat, or stale), with the
            // job's own attempt and retry budget, so a retryable failure
            // is still retried.
            None => {
                let (attempt, max_attempts) = match workers.store.get(job).await? {
                    Ok(record) => (record.attempt, record.max_attempts),
                    Err(_) => (0, 1),
                };
                (
                    Lease {
                        job,
                        attempt,
                        token: FencingToken(token),
                        expires_at: None,
                    },
                    max_attempts,
                )
            }
        };
        let applied = workers.ends.end(&lease, max_attempts, outcome).await?;
        self.forget(job, token);
        match applied {
            Fenced::Applied | Fenced::Repeated => {
                // Acknowledged only once the report is on disk.
                workers.store.flush().await?;
                Ok(Ack::Accepted)
            }
            Fenced::Stale => Ok(Ack::Stale(stale_reason(job, token))),
        }
    }

    /// The worker gives a job back: pending again at once, for its next
    /// attempt; its slot is free again.
    pub(crate) async fn give_back(&self, job: JobId, token: u64) -> Result<Ack, StoreError> {
        let Some(workers) = self.workers.upgrade() else {
            return Err(StoreError::Unavailable("jobd is shutting down".into()));
        };
        let Some((lease, _)) = self.run_of(job, token) else {
            return Ok(Ack::Stale(stale_reason(job, token)));
        };
        let applied = workers.store.release(&lease).await?;
        if self.forget(job, token) {
            self.credit(1);
        }
        Ok(match applied {
            Fenced::Applied | Fenced::Repeated => Ack::Accepted,
            Fenced::Stale => Ack::Stale(stale_reason(job, token)),
        })
    }

    /// The worker takes no new job from now on.
    pub(crate) fn draining(&self) {
        self.draining.store(true, Ordering::Release);
        self.changed();
    }

    /// Fails `job` at its deadline (if the worker has not reported it by
    /// then) and cancels it on the worker.
    pub(super) async fn deadline_passed(&self, lease: Lease, limit: Duration) {
        let Some(workers) = self.workers.upgrade() else {
            return;
        };
        let timed_out = JobError::TimedOut(format!("ran longer than its {limit:?} limit"));
        match workers.store.complete(&lease, Err(timed_out)).await {
            Ok(Fenced::Applied) => {
                self.forget(lease.job, lease.token.0);
                self.push_cancel(lease.job, lease.token.0);
            }
            Ok(Fenced::Repeated | Fenced::Stale) => {}
            Err(err) => {
                tracing::warn!(id = %lease.job, %err, "cannot record a worker job's time-out");
            }
        }
    }

    pub(super) fn info(&self) -> WorkerInfo {
        let jobs = self.lock_jobs();
        let mut functions: Vec<String> = self.functions.iter().map(|f| f.to_string()).collect();
        functions.sort();
        WorkerInfo {
            session_id: self.id.to_string(),
            name: self.name.clone(),
            instance: self.instance.clone(),
            peer: self.peer,
            functions,
            labels: self.labels.clone(),
            slots: self.slots,
            busy: u32::try_from(jobs.len()).unwrap_or(u32::MAX),
            running: jobs.keys().copied().collect(),
            last_heard: self.lock_heard().at,
            attached_at: self.attached_at,
            version: self.version.clone(),
            draining: self.draining.load(Ordering::Acquire),
        }
    }

    /// The lease of `job` if this session runs it under `token`.
    fn lease_of(&self, job: JobId, token: u64) -> Option<Lease> {
        self.run_of(job, token).map(|(lease, _)| lease)
    }

    fn run_of(&self, job: JobId, token: u64) -> Option<(Lease, u32)> {
        self.lock_jobs()
            .get(&job)
            .filter(|run| run.lease.token.0 == token)
            .map(|run| (run.lease.clone(), run.max_attempts))
    }

    /// Drops `job` (under `token`) from the running jobs; true if it was
    /// there.
    fn forget(&self, job: JobId, token: u64) -> bool {
        let mut jobs = self.lock_jobs();
        let here = jobs.get(&job).is_some_and(|run| run.lease.token.0 == token);
        if here
            && let Some(run) = jobs.remove(&job)
            && let Some(watchdog) = run.watchdog
        {
            watchdog.abort();
        }
        drop(jobs);
        if here {
            self.changed();
        }
        here
    }

    fn changed(&self) {
        if let Some(workers) = self.workers.upgrade() {
            workers.changed.notify_waiters();
        }
    }

    fn lock_jobs(&self) -> std::sync::MutexGuard<'_, HashMap<JobId, Run>> {
        // Inserts and removals cannot leave the map half-updated.
        self.jobs.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn lock_heard(&self) -> std::sync::MutexGuard<'_, Heard> {
        self.heard.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn stale_reason(job: JobId, token: u64) -> String {
    format!(
        "the lease of job {job} with fencing token {token} is not current: the job ended, or went to another worker"
    )
}

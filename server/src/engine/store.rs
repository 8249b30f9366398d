//! The job table: every job's record and the live handles that belong to it
//! (its cancel token while running, its waiters while unfinished).
//!
//! This is the one module boundary behind which job state lives. It is in
//! memory today; a durable store persists the same transitions behind the
//! same methods.
//!
//! Invariants kept here, under each job's shard lock:
//! - a terminal state never changes again;
//! - a completion carrying a stale attempt number is ignored;
//! - waiters are woken after the terminal state is written, never before.

use std::{sync::Arc, time::SystemTime};

use dashmap::DashMap;
use jobd_proto::{JobId, JobState};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::queue::QueueKey;
use crate::{
    function::PoolKind,
    job::{Finished, JobError, JobRecord, Outcome},
};

struct Slot {
    record: JobRecord,
    /// Where the job waits in its pool's queue, while pending.
    queue_key: Option<QueueKey>,
    /// Fired to cancel the running attempt.
    cancel: Option<CancellationToken>,
    /// Created by the first waiter; woken and dropped when the job finishes.
    waiters: Option<Arc<Notify>>,
}

/// What a worker needs to run an attempt it has claimed.
pub(crate) struct Claim {
    pub(crate) function: Arc<str>,
    pub(crate) args: serde_json::Value,
    pub(crate) attempt: u32,
    pub(crate) cancel: CancellationToken,
}

/// What a cancel request found and did.
pub(crate) enum Cancelled {
    /// Was pending; now cancelled. The caller removes it from its queue.
    Pending(PoolKind, Option<QueueKey>),
    /// Was running on the async pool; now cancelled and its token fired.
    AbortedAsync,
    /// Running on the blocking pool; its token fired, state unchanged.
    RequestedBlocking,
    /// Already terminal.
    AlreadyDone,
}

/// Either the finished job or how to hear about it.
pub(crate) enum WaitFor {
    Finished(Finished),
    Pending(Arc<Notify>),
}

#[derive(Default)]
pub(crate) struct JobStore {
    jobs: DashMap<JobId, Slot>,
}

impl JobStore {
    pub(crate) fn insert(&self, record: JobRecord, queue_key: QueueKey) {
        let id = record.id;
        self.jobs.insert(
            id,
            Slot {
                record,
                queue_key: Some(queue_key),
                cancel: None,
                waiters: None,
            },
        );
    }

    /// Reads a job without cloning more than `read` takes.
    pub(crate) fn view<R>(&self, id: JobId, read: impl FnOnce(&JobRecord) -> R) -> Option<R> {
        self.jobs.get(&id).map(|slot| read(&slot.record))
    }

    /// Pending -> Running for the next attempt; `None` if the job is gone or
    /// no longer pending (it was cancelled while queued).
    pub(crate) fn claim(&self, id: JobId) -> Option<Claim> {
        let mut slot = self.jobs.get_mut(&id)?;
        if slot.record.state != JobState::Pending {
            return None;
        }
        let cancel = CancellationToken::new();
        slot.queue_key = None;
        slot.cancel = Some(cancel.clone());
        let record = &mut slot.record;
        record.state = JobState::Running;
        record.attempt += 1;
        record.started_at = Some(SystemTime::now());
        Some(Claim {
            function: Arc::clone(&record.function),
            args: record.args.clone(),
            attempt: record.attempt,
            cancel,
        })
    }

    /// Records how an attempt ended. Ignored (returns false) when the job
    /// already reached a terminal state, e.g. it was aborted, or when the
    /// attempt is stale.
    pub(crate) fn finish(&self, id: JobId, attempt: u32, outcome: Outcome) -> bool {
        let Some(mut slot) = self.jobs.get_mut(&id) else {
            return false;
        };
        if slot.record.state.is_terminal() || slot.record.attempt != attempt {
            return false;
        }
        let waiters = Self::terminate(&mut slot, outcome);
        drop(slot);
        wake(waiters);
        true
    }

    pub(crate) fn cancel(&self, id: JobId) -> Option<Cancelled> {
        let mut slot = self.jobs.get_mut(&id)?;
        let result = match slot.record.state {
            JobState::Pending => {
                let key = slot.queue_key.take();
                let pool = slot.record.pool;
                let waiters = Self::terminate(&mut slot, Err(JobError::Cancelled));
                drop(slot);
                wake(waiters);
                Cancelled::Pending(pool, key)
            }
            JobState::Running => {
                if let Some(token) = &slot.cancel {
                    token.cancel();
                }
                match slot.record.pool {
                    PoolKind::Async => {
                        // The task drops the job's future as soon as it sees
                        // the token; the job is cancelled from this moment.
                        let waiters = Self::terminate(&mut slot, Err(JobError::Cancelled));
                        drop(slot);
                        wake(waiters);
                        Cancelled::AbortedAsync
                    }
                    PoolKind::Blocking => Cancelled::RequestedBlocking,
                }
            }
            _ => Cancelled::AlreadyDone,
        };
        Some(result)
    }

    pub(crate) fn wait_for(&self, id: JobId) -> Option<WaitFor> {
        let mut slot = self.jobs.get_mut(&id)?;
        if let Some(finished) = finished(&slot.record) {
            return Some(WaitFor::Finished(finished));
        }
        let notify = slot.waiters.get_or_insert_with(|| Arc::new(Notify::new()));
        Some(WaitFor::Pending(Arc::clone(notify)))
    }

    pub(crate) fn is_terminal(&self, id: JobId) -> Option<bool> {
        self.view(id, |r| r.state.is_terminal())
    }

    /// Fails every running job with `reason` and fires its cancel token: the
    /// last step of a shutdown whose grace period ran out.
    pub(crate) fn interrupt_running(&self, reason: &str) -> usize {
        let mut interrupted = 0;
        for mut slot in self.jobs.iter_mut() {
            if slot.record.state != JobState::Running {
                continue;
            }
            if let Some(token) = &slot.cancel {
                token.cancel();
            }
            let waiters = Self::terminate(&mut slot, Err(JobError::Interrupted(reason.to_owned())));
            wake(waiters);
            interrupted += 1;
        }
        interrupted
    }

    pub(crate) fn len(&self) -> usize {
        self.jobs.len()
    }

    fn terminate(slot: &mut Slot, outcome: Outcome) -> Option<Arc<Notify>> {
        let record = &mut slot.record;
        record.state = match &outcome {
            Ok(_) => JobState::Succeeded,
            Err(err) => err.terminal_state(),
        };
        record.finished_at = Some(SystemTime::now());
        record.outcome = Some(outcome);
        slot.queue_key = None;
        slot.cancel = None;
        slot.waiters.take()
    }
}

fn wake(waiters: Option<Arc<Notify>>) {
    if let Some(waiters) = waiters {
        waiters.notify_waiters();
    }
}

pub(crate) fn finished(record: &JobRecord) -> Option<Finished> {
    let outcome = record.outcome.as_ref()?;
    Some(Finished {
        state: record.state,
        outcome: outcome.clone(),
    })
}

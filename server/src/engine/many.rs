//! Operations over many jobs at once: `wait` for a set of jobs
//! (`concurrent.futures.wait` across the network), listing jobs page by
//! page, and deleting finished ones.
//!
//! They live apart from the single-job calls in the parent module because
//! their concerns differ: `wait_many` composes many single waits and decides
//! when enough of them have ended; listing needs a filter and a cursor that
//! stay meaningful while jobs come and go.

use std::{collections::HashSet, time::Duration};

use futures::{FutureExt as _, StreamExt as _, stream::FuturesUnordered};
use jobd_proto::{JobId, JobState};

use super::{Engine, missing_error};
use crate::{
    Error,
    store::{Deleted, ListFilter, ListPage},
};

/// When [`Engine::wait_many`] answers, as `concurrent.futures.wait`'s
/// `return_when`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReturnWhen {
    /// As soon as any job is done (at once if one already is).
    FirstCompleted,
    /// As soon as any job ends failed (a cancelled job does not count, as in
    /// Python); with no failure, when all are done.
    FirstException,
    /// When every job is done.
    #[default]
    AllCompleted,
}

/// The answer of a wait: which jobs are done and which are not, each in the
/// order they were asked for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WaitSplit {
    /// Jobs in a terminal state.
    pub done: Vec<JobId>,
    /// Jobs still pending or running.
    pub not_done: Vec<JobId>,
}

impl Engine {
    /// Waits, without polling, until `return_when` holds for `ids` or
    /// `limit` passes, and returns which jobs are done at that moment.
    /// Running out of time is an answer, not an error. Dropping the future
    /// is safe: it only waits.
    ///
    /// # Errors
    ///
    /// `JobNotFound` or `JobGone` if any id is unknown (checked before any
    /// waiting), `ShuttingDown`, `Store`.
    pub async fn wait_many(
        &self,
        ids: &[JobId],
        return_when: ReturnWhen,
        limit: Option<Duration>,
    ) -> Result<WaitSplit, Error> {
        let deadline = limit.map(|limit| tokio::time::Instant::now() + limit);
        // Every id is looked up first: an unknown id is an error, not a job
        // that is never done. The states found are also Python's first step,
        // collecting the futures that are already done.
        let states = futures::future::try_join_all(ids.iter().map(|&id| self.state(id))).await?;
        let mut tally = Tally {
            done: HashSet::new(),
            failed: false,
            total: ids.len(),
            return_when,
        };
        for (&id, &state) in ids.iter().zip(&states) {
            if state.is_terminal() {
                tally.record(id, state);
            }
        }
        if !tally.satisfied() {
            let mut waits: FuturesUnordered<_> = ids
                .iter()
                .filter(|id| !tally.done.contains(id))
                .map(|&id| self.wait(id).map(move |finished| (id, finished)))
                .collect();
            loop {
                let next = match deadline {
                    Some(deadline) => match tokio::time::timeout_at(deadline, waits.next()).await {
                        Ok(next) => next,
                        Err(_) => break,
                    },
                    None => waits.next().await,
                };
                let Some((id, finished)) = next else {
                    break;
                };
                tally.finished(id, finished)?;
                if tally.satisfied() {
                    // Take in whatever else has finished meanwhile, so the
                    // split is as of now, not as of the first wake-up.
                    while let Some(Some((id, finished))) = waits.next().now_or_never() {
                        tally.finished(id, finished)?;
                    }
                    break;
                }
            }
        }
        let (done, not_done) = ids.iter().copied().partition(|id| tally.done.contains(id));
        Ok(WaitSplit { done, not_done })
    }

    /// One page of jobs matching `filter`, newest first, holding only ids
    /// below `before` (the previous page's cursor) and at most `page_size`
    /// jobs. Jobs submitted after a walk began have higher ids than its
    /// cursor, so a walk sees each job that existed when it began once.
    ///
    /// # Errors
    ///
    /// `Store` when the durable store cannot be read.
    pub async fn list(
        &self,
        filter: &ListFilter,
        before: Option<JobId>,
        page_size: usize,
    ) -> Result<ListPage, Error> {
        self.inner
            .store
            .list(filter, before, page_size.max(1))
            .await
            .map_err(Error::Store)
    }

    /// Forgets a finished job, its record and result; afterwards the id is
    /// "not found: deleted". With a durable store the deletion is committed
    /// before this returns, and completes even if the caller goes away.
    ///
    /// # Errors
    ///
    /// `JobNotFinished` for a pending or running job, `JobNotFound`,
    /// `JobGone` (already deleted or expired), `Store`.
    pub async fn delete(&self, id: JobId) -> Result<(), Error> {
        match self.inner.store.delete(id).await.map_err(Error::Store)? {
            Deleted::Removed => Ok(()),
            Deleted::Unfinished(state) => Err(Error::JobNotFinished { id, state }),
            Deleted::Missing(missing) => Err(missing_error(id, missing)),
        }
    }
}

/// What a wait has seen so far.
struct Tally {
    done: HashSet<JobId>,
    /// A job ended failed (FIRST_EXCEPTION's condition).
    failed: bool,
    total: usize,
    return_when: ReturnWhen,
}

impl Tally {
    fn record(&mut self, id: JobId, state: JobState) {
        self.done.insert(id);
        self.failed |= state == JobState::Failed;
    }

    /// Takes in the end of one single-job wait.
    fn finished(
        &mut self,
        id: JobId,
        finished: Result<crate::Finished, Error>,
    ) -> Result<(), Error> {
        match finished {
            Ok(finished) => self.record(id, finished.state),
            // Only finished jobs are deleted or expire, so it is done; how
            // it ended is no longer known, so it is not counted as failed.
            Err(Error::JobGone { .. }) => {
                self.done.insert(id);
            }
            Err(err) => return Err(err),
        }
        Ok(())
    }

    fn satisfied(&self) -> bool {
        let all = self.done.len() == self.total;
        match self.return_when {
            ReturnWhen::FirstCompleted => !self.done.is_empty(),
            ReturnWhen::FirstException => self.failed || all,
            ReturnWhen::AllCompleted => all,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn return_when_follows_python() {
        let tally = |return_when, done: usize, failed| Tally {
            done: (0..done).map(|_| JobId::new()).collect(),
            failed,
            total: 3,
            return_when,
        };
        assert!(!tally(ReturnWhen::FirstCompleted, 0, false).satisfied());
        assert!(tally(ReturnWhen::FirstCompleted, 1, false).satisfied());
        assert!(!tally(ReturnWhen::FirstException, 2, false).satisfied());
        assert!(tally(ReturnWhen::FirstException, 1, true).satisfied());
        assert!(tally(ReturnWhen::FirstException, 3, false).satisfied());
        assert!(!tally(ReturnWhen::AllCompleted, 2, true).satisfied());
        assert!(tally(ReturnWhen::AllCompleted, 3, false).satisfied());
    }
}

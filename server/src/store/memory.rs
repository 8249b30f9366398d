//! The ephemeral store: the shared in-memory machinery ([`super::live`])
//! alone, plus tombstones of removed jobs. Every change is visible the
//! moment it is made; everything is lost when the process stops.

use std::{sync::Arc, time::SystemTime};

use futures::{FutureExt as _, future::BoxFuture, stream::BoxStream};
use jobd_proto::{JobId, JobState};

use super::{
    CancelResult, ClaimRequest, Claimed, Cursor, Deleted, EventItem, Fenced, Found, JobStore,
    Lease, LeaseState, ListFilter, ListPage, Maintained, Maintenance, Missing, NewJob, StoreError,
    StoreOptions, StoreStats, Submitted, fingerprint,
    live::{
        Live,
        table::{CancelPlan, Lapsed},
    },
};
use crate::{
    Gone,
    job::{Finished, JobError, JobRecord, Outcome},
};

pub(crate) struct MemoryStore {
    live: Arc<Live>,
    /// Why removed jobs are gone, and since when.
    tombstones: dashmap::DashMap<JobId, (Gone, SystemTime)>,
}

impl MemoryStore {
    pub(crate) fn new(options: StoreOptions) -> Self {
        Self {
            live: Arc::new(Live::new(&options, 1)),
            tombstones: dashmap::DashMap::new(),
        }
    }

    fn missing(&self, id: JobId) -> Missing {
        self.tombstones
            .get(&id)
            .map_or(Missing::Unknown, |tombstone| Missing::Gone(tombstone.0))
    }

    fn finish(&self, id: JobId, outcome: Outcome) {
        self.live.table.complete(id, outcome, self.live.clock.now());
    }
}

#[async_trait::async_trait]
impl JobStore for MemoryStore {
    fn is_durable(&self) -> bool {
        false
    }

    fn submit(&self, job: NewJob) -> BoxFuture<'static, Result<Submitted, StoreError>> {
        // Everything happens now, in the call: the future only carries the
        // answer.
        let answer = (|| {
            let record = self.live.stamp(job);
            let key = match self.live.reserve(&record)? {
                Ok(key) => key,
                Err(refused) => return Ok(refused),
            };
            // Only a request id is ever compared by fingerprint; skip the
            // hash on the hot path when there is none.
            let fingerprint = match record.request_id {
                Some(_) => fingerprint(&record.function, &record.args),
                None => [0; 16],
            };
            let (id, queue, due) = (record.id, self.live.queue_name(&record), record.not_before);
            match self.live.table.insert(record, key, fingerprint) {
                Ok(()) => {
                    self.live.enqueue(&queue, id, key, due);
                    Ok(Submitted::New(id))
                }
                Err(existing) => {
                    self.live.release(&queue, key);
                    Ok(Submitted::Existing {
                        id: existing.job,
                        same_content: existing.fingerprint == fingerprint,
                    })
                }
            }
        })();
        std::future::ready(answer).boxed()
    }

    async fn claim(&self, request: &ClaimRequest) -> Result<Option<Claimed>, StoreError> {
        self.live.claim(request).await
    }

    async fn renew(
        &self,
        lease: &Lease,
        ttl: std::time::Duration,
    ) -> Result<LeaseState, StoreError> {
        Ok(self.live.renew(lease, ttl))
    }

    async fn complete(&self, lease: &Lease, outcome: Outcome) -> Result<Fenced, StoreError> {
        if !self.live.table.begin_finish(lease) {
            return Ok(self.live.table.not_current(lease));
        }
        self.finish(lease.job, outcome);
        Ok(Fenced::Applied)
    }

    async fn retry(&self, lease: &Lease, not_before: SystemTime) -> Result<Fenced, StoreError> {
        Ok(if self.live.requeue(lease, not_before) {
            Fenced::Applied
        } else {
            self.live.table.not_current(lease)
        })
    }

    async fn release(&self, lease: &Lease) -> Result<Fenced, StoreError> {
        self.retry(lease, self.live.clock.now()).await
    }

    fn progress(&self, lease: &Lease, fraction: f64, message: &str) {
        self.live.progress(lease, fraction, message);
    }

    async fn cancel(&self, id: JobId) -> Result<CancelResult, StoreError> {
        Ok(match self.live.begin_cancel(id) {
            None => CancelResult::Missing(self.missing(id)),
            Some(CancelPlan::Pending(..)) => {
                self.finish(id, Err(JobError::Cancelled));
                CancelResult::Cancelled
            }
            Some(CancelPlan::Running {
                lease,
                holder,
                pool,
            }) => CancelResult::Requested {
                lease,
                holder,
                pool,
            },
            Some(CancelPlan::AlreadyDone) => CancelResult::AlreadyDone,
        })
    }

    async fn get(&self, id: JobId) -> Result<Found<JobRecord>, StoreError> {
        Ok(self
            .live
            .table
            .view(id, JobRecord::clone)
            .ok_or_else(|| self.missing(id)))
    }

    async fn state(&self, id: JobId) -> Result<Found<JobState>, StoreError> {
        Ok(self.live.table.state(id).ok_or_else(|| self.missing(id)))
    }

    async fn wait(&self, id: JobId) -> Result<Found<Finished>, StoreError> {
        Ok(self.live.wait(id).await.ok_or_else(|| self.missing(id)))
    }

    async fn list(
        &self,
        filter: &ListFilter,
        before: Option<JobId>,
        limit: usize,
    ) -> Result<ListPage, StoreError> {
        // One more than a page: a source that fills it has more to give.
        let mut jobs = self.live.table.list(filter, before, limit + 1);
        let next = if jobs.len() > limit {
            jobs.truncate(limit);
            jobs.last().map(|r| r.id)
        } else {
            None
        };
        Ok(ListPage { jobs, next })
    }

    async fn delete(&self, id: JobId) -> Result<Deleted, StoreError> {
        // The tombstone goes in first, so that no reader finds neither the
        // job nor its tombstone; it is put back as it was if the job is not
        // deleted after all.
        let earlier = self
            .tombstones
            .insert(id, (Gone::Deleted, self.live.clock.now()));
        if self.live.table.forget(id) {
            return Ok(Deleted::Removed);
        }
        let refused = match self.live.table.state(id) {
            Some(state) => Deleted::Unfinished(state),
            None => {
                Deleted::Missing(earlier.map_or(Missing::Unknown, |(gone, _)| Missing::Gone(gone)))
            }
        };
        match earlier {
            Some(earlier) => self.tombstones.insert(id, earlier),
            None => self.tombstones.remove(&id).map(|(_, t)| t),
        };
        Ok(refused)
    }

    async fn maintain(&self, step: Maintenance) -> Result<Maintained, StoreError> {
        let now = self.live.clock.now();
        let mut done = Maintained::default();
        if step.expire_leases {
            for (id, token) in self.live.expired_leases(now, usize::MAX) {
                match self.live.lapse(id, token, now) {
                    Some(Lapsed::Requeued) => done.requeued += 1,
                    Some(Lapsed::Failed(err)) => {
                        self.finish(id, Err(err));
                        done.failed += 1;
                    }
                    None => {}
                }
            }
        }
        if let Some(purge) = step.purge {
            let removed =
                self.live
                    .table
                    .evict_finished(purge.finished_before, usize::MAX, purge.limit);
            for id in &removed {
                self.tombstones.insert(*id, (Gone::Expired, now));
            }
            self.tombstones
                .retain(|_, (_, at)| *at >= purge.tombstones_before);
            done.purged = removed.len();
            done.more = removed.len() == purge.limit;
        }
        Ok(done)
    }

    async fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }

    fn close(&self) {
        self.live.close();
    }

    fn event_head(&self) -> Cursor {
        self.live.events.head()
    }

    fn events(&self, after: u64) -> BoxStream<'static, Result<EventItem, StoreError>> {
        self.live.events.stream(after)
    }

    fn stats(&self) -> StoreStats {
        StoreStats {
            jobs: self.live.table.len(),
            by_state: self.live.table.counts(),
            queued: self.live.queued(),
            events_held: self.live.events.held(),
            commits: None,
        }
    }
}

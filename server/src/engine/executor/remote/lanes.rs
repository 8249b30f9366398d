//! One dispatcher per queue of the worker pool (a function, and a set of
//! worker labels): it waits until some worker that can run the queue's jobs
//! has a free slot, claims the next job, and hands it to the worker with the
//! most free slots (ties in turn). A claimed job is on disk as running
//! before any worker hears of it (the claim is flushed), so a restart of
//! jobd cannot make a worker's job run twice.

use std::{collections::BTreeMap, sync::Arc};

use super::Workers;
use crate::store::{ClaimRequest, Claimed, Fenced, Lease, LeaseState, QueueName};

/// The pause after a claim the store could not answer.
const CLAIM_RETRY: std::time::Duration = std::time::Duration::from_millis(500);

/// What a queue's jobs need of a worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Route {
    pub(super) function: Arc<str>,
    pub(super) labels: BTreeMap<String, String>,
}

impl Route {
    /// The route of a worker-pool queue name (`worker/FUNCTION` and, with
    /// worker labels, their JSON object after it).
    pub(super) fn of(queue: &QueueName) -> Option<Self> {
        let (_, rest) = queue.as_str().split_once('/')?;
        // Function names have no `{`; the labels' JSON starts with one.
        let (function, labels) = match rest.find('{') {
            Some(at) => (&rest[..at], serde_json::from_str(&rest[at..]).ok()?),
            None => (rest, BTreeMap::new()),
        };
        Some(Self {
            function: Arc::from(function),
            labels,
        })
    }
}

/// The dispatcher of `queue`, until the engine stops.
pub(super) async fn run(workers: Arc<Workers>, queue: QueueName, route: Route) {
    let request = ClaimRequest {
        queue,
        holder: Workers::holder(),
        ttl: Some(workers.config.lease_timeout),
    };
    loop {
        if !wait_for_taker(&workers, &route).await {
            return;
        }
        let claimed = tokio::select! {
            biased;
            () = workers.stopped.cancelled() => return,
            claimed = workers.store.claim(&request) => claimed,
        };
        let claimed = match claimed {
            Ok(Some(claimed)) => claimed,
            Ok(None) => return,
            Err(err) => {
                tracing::error!(queue = request.queue.as_str(), %err, "cannot claim a job for a worker; trying again");
                tokio::select! {
                    () = tokio::time::sleep(CLAIM_RETRY) => continue,
                    () = workers.stopped.cancelled() => return,
                }
            }
        };
        if workers.store.is_durable()
            && let Err(err) = workers.store.flush().await
        {
            tracing::warn!(%err, "cannot make a worker's claim durable");
        }
        assign(&workers, &route, claimed).await;
    }
}

/// Waits until an attached worker can take a job of `route`; false once the
/// engine stops.
async fn wait_for_taker(workers: &Workers, route: &Route) -> bool {
    loop {
        let changed = workers.changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        if workers.has_taker(route) {
            return true;
        }
        tokio::select! {
            () = &mut changed => {}
            () = workers.stopped.cancelled() => return false,
        }
    }
}

/// Hands `claimed` to a worker with a free slot, waiting for one when the
/// free slots were taken meanwhile (renewing the job's lease while it
/// waits). When no attached worker serves the job any more (the one that
/// had a free slot detached or started draining meanwhile), the job is
/// given back at once: held here, it would look running with nobody to
/// run it. A job cancelled meanwhile ends here; one whose lease is lost is
/// someone else's.
async fn assign(workers: &Arc<Workers>, route: &Route, claimed: Claimed) {
    let lease = &claimed.lease;
    let ttl = workers.config.lease_timeout;
    let deadline = claimed.timeout.map(|limit| claimed.started_at + limit);
    let mut renew = tokio::time::interval_at(
        tokio::time::Instant::now() + workers.config.heartbeat_interval,
        workers.config.heartbeat_interval,
    );
    loop {
        let changed = workers.changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        if let Some(session) = workers.take_slot(route) {
            if session.assign(&claimed, deadline) {
                if let Some(limit) = claimed.timeout {
                    let (watched, expiring) = (Arc::clone(&session), lease.clone());
                    let due = claimed.started_at + limit;
                    let clock = workers.clock.clone();
                    let watchdog = workers.tasks.spawn(async move {
                        clock.sleep_until(due).await;
                        watched.deadline_passed(expiring, limit).await;
                    });
                    session.watch_deadline(lease.job, watchdog.abort_handle());
                }
                if workers.take_early_cancel(lease) {
                    session.push_cancel(lease.job, lease.token.0);
                }
                return;
            }
            // That session is over; look again.
            continue;
        }
        if !workers.has_server(route) {
            give_back(workers, lease, "no worker serves it any more").await;
            return;
        }
        tokio::select! {
            () = &mut changed => {}
            _ = renew.tick() => match workers.store.renew(lease, ttl).await {
                Ok(LeaseState::Live { .. }) => {}
                Ok(LeaseState::CancelRequested { .. }) => {
                    // No worker started it: it is cancelled here.
                    let cancelled = Err(crate::job::JobError::Cancelled);
                    if let Err(err) = workers.store.complete(lease, cancelled).await {
                        tracing::warn!(id = %lease.job, %err, "cannot cancel a job no worker took");
                    }
                    return;
                }
                Ok(LeaseState::Lost) => return,
                Err(err) => tracing::warn!(id = %lease.job, %err, "cannot renew the lease of a job waiting for a worker"),
            },
            () = workers.stopped.cancelled() => {
                give_back(workers, lease, "jobd is stopping").await;
                return;
            }
        }
    }
}

/// Gives back a job no worker took: pending again, for its next attempt.
async fn give_back(workers: &Workers, lease: &Lease, why: &str) {
    match workers.store.release(lease).await {
        Ok(Fenced::Applied | Fenced::Repeated | Fenced::Stale) => {
            tracing::debug!(id = %lease.job, why, "gave back a job no worker took");
        }
        Err(err) => {
            tracing::warn!(id = %lease.job, %err, why, "cannot give back a job no worker took");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::PoolName;

    #[test]
    fn a_route_reads_back_from_its_queue_name() {
        let pool = PoolName::from("worker");
        let mut labels = BTreeMap::new();
        labels.insert("gpu".to_owned(), "true".to_owned());
        labels.insert("zone".to_owned(), "a{b}".to_owned());
        for labels in [BTreeMap::new(), labels] {
            let queue = QueueName::routed(&pool, "resize.v2", &labels);
            assert_eq!(
                Route::of(&queue),
                Some(Route {
                    function: Arc::from("resize.v2"),
                    labels
                })
            );
        }
        assert_eq!(Route::of(&QueueName::pool(&PoolName::from("async"))), None);
    }
}

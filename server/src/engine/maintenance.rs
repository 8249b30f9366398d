//! The engine's one background task: it asks the store, step by step, to
//! take back lapsed leases (every second) and to remove finished jobs past
//! retention (every quarter of the retention period, at most a minute).
//! Small steps, so maintenance never holds a durable store's writer for
//! long.

use std::{sync::Arc, time::Duration};

use super::Inner;
use crate::store::{Maintained, Maintenance, Purge};

/// Finished jobs removed per retention step.
const PURGE_BATCH: usize = 1000;
/// How often lapsed leases are looked for: a job whose holder vanished runs
/// again within its lease's length plus this.
const LEASE_CHECK: Duration = Duration::from_secs(1);

impl Inner {
    /// Runs maintenance until the engine stops.
    pub(super) async fn maintain(self: Arc<Self>, retention: Duration) {
        let purge_every = (retention / 4).clamp(Duration::from_millis(10), Duration::from_secs(60));
        let tick = purge_every.min(LEASE_CHECK);
        let mut next_purge = tokio::time::Instant::now() + purge_every;
        loop {
            tokio::select! {
                () = self.stopped.cancelled() => return,
                () = tokio::time::sleep(tick) => {}
            }
            let purge = (tokio::time::Instant::now() >= next_purge).then(|| {
                next_purge = tokio::time::Instant::now() + purge_every;
                let now = self.clock.now();
                Purge {
                    finished_before: now.checked_sub(retention).unwrap_or(std::time::UNIX_EPOCH),
                    tombstones_before: now
                        .checked_sub(retention.saturating_mul(4))
                        .unwrap_or(std::time::UNIX_EPOCH),
                    limit: PURGE_BATCH,
                }
            });
            self.maintenance_step(Maintenance {
                expire_leases: true,
                purge,
            })
            .await;
            self.running.sweep_early_cancels();
        }
    }

    /// One step, repeated while retention stops at its limit.
    async fn maintenance_step(&self, mut step: Maintenance) {
        loop {
            match self.store.maintain(step).await {
                Ok(Maintained {
                    purged,
                    more,
                    requeued,
                    failed,
                }) => {
                    if purged > 0 {
                        tracing::debug!(purged, "retention removed finished jobs");
                    }
                    if requeued + failed > 0 {
                        tracing::info!(requeued, failed, "took back lapsed leases");
                    }
                    if !more {
                        return;
                    }
                    step.expire_leases = false;
                    tokio::task::yield_now().await;
                }
                Err(err) => {
                    tracing::warn!(%err, "store maintenance failed");
                    return;
                }
            }
        }
    }
}

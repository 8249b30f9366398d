//! The attempts running in this process, and how to reach each one's cancel
//! signal: the engine's own record, next to the store's leases. The store
//! records that a cancel was requested; this is where the engine finds the
//! attempt to honour it.
//!
//! A cancel can reach the engine between a claim and the moment its
//! executor registers the attempt here. It then leaves an early cancel for
//! that lease, which the executor finds when it registers (and honours at
//! once). An early cancel whose attempt never registers (it had already
//! ended) is swept after [`EARLY_CANCEL_TTL`].

use std::{
    collections::HashMap,
    sync::{Mutex, PoisonError},
    time::Duration,
};

use dashmap::{DashMap, mapref::entry::Entry};
use jobd_proto::JobId;
use tokio_util::sync::CancellationToken;

use crate::store::{FencingToken, Lease};

/// How long an early cancel waits for its attempt to register.
pub(crate) const EARLY_CANCEL_TTL: Duration = Duration::from_secs(60);

#[derive(Default)]
pub(crate) struct Running {
    jobs: DashMap<JobId, Attempt>,
    /// Cancels that arrived before their attempt registered.
    early: Mutex<HashMap<JobId, (FencingToken, tokio::time::Instant)>>,
}

struct Attempt {
    lease: Lease,
    cancel: CancellationToken,
}

/// Registers an attempt for as long as it lives.
pub(crate) struct Registered<'a> {
    running: &'a Running,
    job: JobId,
    token: FencingToken,
    /// Fired to cancel the attempt (by a cancel request or a shutdown).
    pub(crate) cancel: CancellationToken,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        let token = self.token;
        self.running
            .jobs
            .remove_if(&self.job, |_, attempt| attempt.lease.token == token);
    }
}

impl Running {
    /// Registers the attempt `lease` runs; its cancel signal has fired
    /// already if a cancel for it came early.
    pub(crate) fn register(&self, lease: &Lease) -> Registered<'_> {
        let cancel = CancellationToken::new();
        let early = {
            let mut early = self.lock_early();
            match early.get(&lease.job) {
                Some((token, _)) if *token == lease.token => early.remove(&lease.job).is_some(),
                _ => false,
            }
        };
        if early {
            cancel.cancel();
        }
        self.jobs.insert(
            lease.job,
            Attempt {
                lease: lease.clone(),
                cancel: cancel.clone(),
            },
        );
        Registered {
            running: self,
            job: lease.job,
            token: lease.token,
            cancel,
        }
    }

    /// Fires the cancel signal of the attempt `lease` runs here; or, when it
    /// has not registered yet, leaves an early cancel for it.
    pub(crate) fn cancel(&self, lease: &Lease) {
        match self.jobs.entry(lease.job) {
            Entry::Occupied(attempt) if attempt.get().lease.token == lease.token => {
                attempt.get().cancel.cancel();
            }
            Entry::Occupied(_) => {}
            Entry::Vacant(_) => {
                self.lock_early()
                    .insert(lease.job, (lease.token, tokio::time::Instant::now()));
            }
        }
    }

    /// Every attempt running here, with its cancel signal (not fired).
    pub(crate) fn all(&self) -> Vec<(Lease, CancellationToken)> {
        self.jobs
            .iter()
            .map(|attempt| (attempt.lease.clone(), attempt.cancel.clone()))
            .collect()
    }

    /// Forgets early cancels older than [`EARLY_CANCEL_TTL`].
    pub(crate) fn sweep_early_cancels(&self) {
        self.lock_early()
            .retain(|_, (_, at)| at.elapsed() < EARLY_CANCEL_TTL);
    }

    /// How many attempts run here.
    pub(crate) fn len(&self) -> usize {
        self.jobs.len()
    }

    fn lock_early(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<JobId, (FencingToken, tokio::time::Instant)>> {
        // Inserts and removals cannot leave the map half-updated.
        self.early.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(token: u64) -> Lease {
        Lease {
            job: JobId::from(uuid::Uuid::from_u128(7)),
            attempt: 1,
            token: FencingToken(token),
            expires_at: None,
        }
    }

    #[test]
    fn a_cancel_reaches_the_registered_attempt_and_only_that_one() {
        let running = Running::default();
        let registered = running.register(&lease(2));
        running.cancel(&lease(1));
        assert!(!registered.cancel.is_cancelled(), "an older lease's cancel");
        running.cancel(&lease(2));
        assert!(registered.cancel.is_cancelled());
        drop(registered);
        assert_eq!(running.len(), 0);
    }

    #[test]
    fn a_cancel_before_registration_is_honoured_on_registration() {
        let running = Running::default();
        running.cancel(&lease(3));
        let registered = running.register(&lease(3));
        assert!(registered.cancel.is_cancelled());
        drop(registered);
        // Used up: the next attempt starts clean.
        assert!(!running.register(&lease(4)).cancel.is_cancelled());
    }

    #[tokio::test(start_paused = true)]
    async fn early_cancels_that_find_no_attempt_are_swept() {
        let running = Running::default();
        running.cancel(&lease(5));
        tokio::time::advance(EARLY_CANCEL_TTL + Duration::from_secs(1)).await;
        running.sweep_early_cancels();
        assert!(!running.register(&lease(5)).cancel.is_cancelled());
    }
}

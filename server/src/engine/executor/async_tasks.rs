//! The async pool: one dispatcher task takes a concurrency slot, claims a
//! job and runs it as a tokio task holding the slot, so at most
//! `async_concurrency` jobs run at once. A cancel drops the job's future at
//! its next await ([`Honour::Abort`](super::Honour::Abort)): the canceller,
//! not the task, ends the job.

use std::sync::Arc;

use futures::FutureExt as _;
use tokio::sync::Semaphore;

use super::{guarded, panicked, time_limit};
use crate::{
    engine::Inner,
    function::Body,
    job::{JobError, PoolName},
    store::Claimed,
};

pub(super) fn start(inner: &Arc<Inner>, pool: PoolName, concurrency: usize) {
    let slots = Arc::new(Semaphore::new(concurrency));
    inner.tasks.spawn(dispatch(Arc::clone(inner), pool, slots));
}

/// Takes a slot, then a job, and runs it as a task; the slot is held until
/// the job ends.
async fn dispatch(inner: Arc<Inner>, pool: PoolName, slots: Arc<Semaphore>) {
    let request = inner.claim_request(pool);
    let mut paused = inner.paused.subscribe();
    loop {
        let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
            return;
        };
        let Some(claimed) = inner.next_claim(&request, &mut paused).await else {
            return;
        };
        let job = Arc::clone(&inner);
        inner.tasks.spawn(async move {
            let _slot = slot;
            run(&job, claimed).await;
        });
    }
}

async fn run(inner: &Inner, claimed: Claimed) {
    let registered = inner.running.register(&claimed.lease);
    let outcome = match inner
        .registry
        .get(&claimed.function)
        .map(crate::function::Function::body)
    {
        Some(Body::Async(body)) => {
            let ctx = inner.ctx(&claimed, &registered);
            // Building the future runs user code too, so it is guarded like
            // the future itself.
            match guarded(|| body(ctx, claimed.args.clone())) {
                Ok(job) => tokio::select! {
                    biased;
                    // Dropping the job's future is the abort; whoever fired
                    // the signal (a cancel, a shutdown) ends the job.
                    () = registered.cancel.cancelled() => return,
                    err = time_limit(claimed.timeout) => Err(err),
                    result = std::panic::AssertUnwindSafe(job).catch_unwind() => {
                        result.unwrap_or_else(|panic| Err(panicked(&*panic)))
                    }
                },
                Err(panic) => Err(panic),
            }
        }
        _ => Err(JobError::failed(format!(
            "function {:?} is not an async function of this server",
            claimed.function
        ))),
    };
    inner.end_attempt(&claimed, outcome).await;
}

//! The blocking pool: dedicated OS threads (never tokio's blocking pool),
//! each claiming a job and running it to its end, so a CPU-bound or
//! blocking job never stalls the runtime. A blocking function cannot be
//! stopped from outside: a cancel fires its cancel signal
//! ([`Honour::Request`](super::Honour::Request)), and at its time limit a
//! watchdog fails the job and fires the signal; the function's own late
//! outcome is then refused as stale.

use std::sync::Arc;

use super::{Registered, guarded, time_limit};
use crate::{
    engine::Inner,
    function::Body,
    job::{JobError, Outcome, PoolName},
    store::{Claimed, Fenced},
};

pub(super) fn start(inner: &Arc<Inner>, pool: PoolName, threads: usize) {
    for n in 0..threads {
        let inner = Arc::clone(inner);
        let pool = pool.clone();
        let token = inner.tasks.token();
        let spawned = std::thread::Builder::new()
            .name(format!("jobd-blocking-{n}"))
            .spawn(move || {
                serve(&inner, pool);
                // Let go of the engine before reporting this thread done, so
                // a finished shutdown leaves nothing holding the store (and
                // a durable store's lock).
                drop(inner);
                drop(token);
            });
        if let Err(err) = spawned {
            tracing::error!(%err, "cannot start a blocking-pool thread; the pool runs with fewer");
        }
    }
}

/// The loop of one thread.
fn serve(inner: &Arc<Inner>, pool: PoolName) {
    let request = inner.claim_request(pool);
    let mut paused = inner.paused.subscribe();
    while let Some(claimed) = inner
        .runtime
        .block_on(inner.next_claim(&request, &mut paused))
    {
        // Registered until the attempt has ended, so a cancel meanwhile
        // still finds it.
        let registered = inner.running.register(&claimed.lease);
        let outcome = run(inner, &claimed, &registered);
        inner.runtime.block_on(inner.end_attempt(&claimed, outcome));
        drop(registered);
    }
}

fn run(inner: &Arc<Inner>, claimed: &Claimed, registered: &Registered<'_>) -> Outcome {
    let Some(Body::Blocking(body)) = inner
        .registry
        .get(&claimed.function)
        .map(crate::function::Function::body)
    else {
        return Err(JobError::failed(format!(
            "function {:?} is not a blocking function of this server",
            claimed.function
        )));
    };
    let watchdog = claimed.timeout.map(|limit| {
        let (inner, lease, cancel) = (
            Arc::clone(inner),
            claimed.lease.clone(),
            registered.cancel.clone(),
        );
        inner.runtime.clone().spawn(async move {
            tokio::select! {
                err = time_limit(Some(limit)) => {
                    if let Ok(Fenced::Applied) = inner.store.complete(&lease, Err(err)).await {
                        cancel.cancel();
                    }
                }
                () = inner.stopped.cancelled() => {}
            }
        })
    });
    let ctx = inner.ctx(claimed, registered);
    let outcome = guarded(|| body(ctx, claimed.args.clone())).and_then(|outcome| outcome);
    if let Some(watchdog) = watchdog {
        watchdog.abort();
    }
    outcome
}

//! The engine's hot path without gRPC: what a no-op job costs the engine
//! itself (queue, store, pool, waiters), so that `jobctl bench` figures can
//! be split into engine time and transport time.
//!
//! - `submit_and_wait_noop`: one job at a time, submitted then awaited: the
//!   latency of a job's whole life in process.
//! - `submit_only_noop`: batches of 1000 submits, reported in jobs/s; the
//!   batch is awaited untimed afterwards so every batch starts on an idle
//!   engine.
//!
//! Run with `cargo bench -p jobd --bench engine` (about 10 s), or add
//! `-- --quick` for a rough figure in a few seconds.

#![allow(
    clippy::disallowed_methods,
    reason = "a benchmark measures real elapsed time"
)]

use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use jobd::{Engine, EngineConfig, SubmitSpec};
use tokio::runtime::Runtime;

/// Jobs per `submit_only_noop` iteration.
const BATCH: u64 = 1000;

fn main() {
    // Short defaults so the whole bench stays quick on a 2-core machine;
    // command-line flags (`--measurement-time`, `--quick`, ...) still win.
    let mut criterion = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(20)
        .configure_from_args();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    submit_and_wait_noop(&mut criterion, &runtime);
    submit_only_noop(&mut criterion, &runtime);
    criterion.final_summary();
}

/// A fresh engine with the built-ins and the in-memory store, so each bench
/// starts empty and its jobs are freed when it ends.
fn engine(runtime: &Runtime) -> Engine {
    let _context = runtime.enter();
    Engine::start(
        jobd::builtins::registry(),
        EngineConfig {
            // Room for every job a burst of submits can queue before the
            // pool catches up: a refusal would end the bench with a panic.
            max_queued: std::num::NonZeroUsize::new(1_000_000).expect("nonzero"),
            ..EngineConfig::default()
        },
    )
}

fn noop() -> SubmitSpec {
    SubmitSpec {
        function: "noop".to_owned(),
        ..SubmitSpec::default()
    }
}

fn submit_and_wait_noop(criterion: &mut Criterion, runtime: &Runtime) {
    let engine = engine(runtime);
    criterion.bench_function("submit_and_wait_noop", |b| {
        // One block_on per sample, not per job: entering the runtime would
        // otherwise be part of what is measured.
        b.iter_custom(|iters| {
            runtime.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    let (id, _) = engine.submit(noop()).await.expect("noop is accepted");
                    let finished = engine.wait(id).await.expect("a submitted job is known");
                    std::hint::black_box(finished);
                }
                start.elapsed()
            })
        });
    });
    runtime.block_on(engine.shutdown(Duration::from_secs(1)));
}

fn submit_only_noop(criterion: &mut Criterion, runtime: &Runtime) {
    let engine = engine(runtime);
    let mut group = criterion.benchmark_group("submit_only_noop");
    group.throughput(Throughput::Elements(BATCH));
    group.bench_function("batch_of_1000", |b| {
        b.iter_custom(|iters| {
            runtime.block_on(async {
                let mut ids = Vec::with_capacity(BATCH as usize);
                let mut timed = Duration::ZERO;
                for _ in 0..iters {
                    let start = Instant::now();
                    for _ in 0..BATCH {
                        ids.push(engine.submit(noop()).await.expect("noop is accepted").0);
                    }
                    timed += start.elapsed();
                    // Untimed: let the pool finish this batch, so the next
                    // one does not compete with its execution.
                    for id in ids.drain(..) {
                        engine.wait(id).await.expect("a submitted job is known");
                    }
                }
                timed
            })
        });
    });
    group.finish();
    runtime.block_on(engine.shutdown(Duration::from_secs(1)));
}

//! Test functions, registered next to the built-ins: ones that record what
//! they observe from inside the pools ([`Probe`]), ones that tell the test
//! they have started (so a test waits on a signal, never a guessed delay),
//! and ones that panic or fail on purpose.

use std::{
    num::NonZeroUsize,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use jobd::{EngineConfig, JobError, Registry};
use serde_json::json;
use tokio::sync::mpsc;

/// What the `probe_*` functions observe from inside the pools.
#[derive(Debug, Default)]
pub struct Probe {
    running: AtomicUsize,
    max_running: AtomicUsize,
    started: AtomicUsize,
}

impl Probe {
    /// The most probes that ran at once.
    pub fn max_running(&self) -> usize {
        self.max_running.load(Ordering::SeqCst)
    }

    /// How many probes started.
    pub fn started(&self) -> usize {
        self.started.load(Ordering::SeqCst)
    }

    fn enter(&self) {
        self.started.fetch_add(1, Ordering::SeqCst);
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_running.fetch_max(now, Ordering::SeqCst);
    }

    fn exit(&self) {
        self.running.fetch_sub(1, Ordering::SeqCst);
    }
}

/// What a test holds of the fixture functions: the probe, and where the
/// `*_started` functions send their argument as they begin.
#[derive(Debug)]
pub struct Fixtures {
    /// What the `probe_*` functions observed.
    pub probe: Arc<Probe>,
    /// The argument of each `*_started` job, as it starts.
    pub started: mpsc::Receiver<serde_json::Value>,
    /// What `log_gated` jobs wait for between their two lines: one permit
    /// lets one job on.
    pub gate: Arc<tokio::sync::Semaphore>,
}

impl Fixtures {
    /// Waits (at most 10 s) for the next `*_started` job to begin, and
    /// returns its argument.
    pub async fn next_started(&mut self) -> serde_json::Value {
        tokio::time::timeout(Duration::from_secs(10), self.started.recv())
            .await
            .expect("a *_started job should have started")
            .expect("the fixture functions live as long as the server")
    }
}

/// The built-ins plus the test functions:
///
/// - `probe_blocking`, `probe_async`: record concurrency in the probe,
///   sleep `args` ms;
/// - `async_started`: signals its start, then sleeps 60 s;
/// - `blocking_started`: signals, then blocks `args` ms (500 by default)
///   deaf to cancel;
/// - `polite_started`: signals, then waits up to 60 s for a cancel and
///   honours it;
/// - `panic_async`, `panic_blocking`: panic ("async boom", "blocking boom");
/// - `fail`: fails with "failed on purpose" (and its argument, if any);
/// - `log_lines`: logs `args` lines ("line 0" ...) from a blocking thread,
///   returns how many;
/// - `log_gated`: logs "first", signals its start, waits for a permit of
///   the gate, then writes the bytes `ff fe 0a` as stdout and logs
///   "second".
#[must_use]
pub fn registry() -> (Registry, Fixtures) {
    let probe = Arc::new(Probe::default());
    let (started_tx, started) = mpsc::channel(1024);
    let mut registry = jobd::builtins::registry();
    let p = Arc::clone(&probe);
    registry.register_blocking(
        "probe_blocking",
        "records concurrency, sleeps args ms",
        move |_ctx, args| {
            p.enter();
            std::thread::sleep(Duration::from_millis(args.as_u64().unwrap_or(100)));
            p.exit();
            Ok(json!("probed"))
        },
    );
    let p = Arc::clone(&probe);
    registry.register_async(
        "probe_async",
        "records concurrency, sleeps args ms",
        move |_ctx, args| {
            let p = Arc::clone(&p);
            async move {
                p.enter();
                tokio::time::sleep(Duration::from_millis(args.as_u64().unwrap_or(100))).await;
                p.exit();
                Ok(json!("probed"))
            }
        },
    );
    let tx = started_tx.clone();
    registry.register_async(
        "async_started",
        "signals start, then sleeps 60 s",
        move |_ctx, args| {
            let tx = tx.clone();
            async move {
                // A test that no longer listens does not fail the job.
                let _ = tx.send(args).await;
                tokio::time::sleep(Duration::from_secs(60)).await;
                Ok(json!("woke up"))
            }
        },
    );
    let tx = started_tx.clone();
    registry.register_blocking(
        "blocking_started",
        "signals start, then sleeps args ms ignoring cancel",
        move |_ctx, args| {
            let _ = tx.blocking_send(args.clone());
            std::thread::sleep(Duration::from_millis(args.as_u64().unwrap_or(500)));
            Ok(json!("finished anyway"))
        },
    );
    registry.register_blocking("log_lines", "logs args lines", |ctx, args| {
        let n = args.as_u64().unwrap_or(3);
        for i in 0..n {
            ctx.log(format!("line {i}"));
        }
        Ok(json!(n))
    });
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let (tx, open) = (started_tx.clone(), Arc::clone(&gate));
    registry.register_async(
        "log_gated",
        "logs a line, signals, waits for the gate, writes more",
        move |ctx, args| {
            let (tx, open) = (tx.clone(), Arc::clone(&open));
            async move {
                ctx.log("first");
                let _ = tx.send(args).await;
                open.acquire().await.expect("never closed").forget();
                ctx.log_output(jobd::LogStream::Stdout, b"\xff\xfe\n");
                ctx.log("second");
                Ok(json!("logged"))
            }
        },
    );
    let tx = started_tx;
    registry.register_blocking(
        "polite_started",
        "signals start, then waits up to 60 s for a cancel and honours it",
        move |ctx, args| {
            let _ = tx.blocking_send(args);
            ctx.sleep_blocking(Duration::from_secs(60))?;
            Ok(json!("never cancelled"))
        },
    );
    registry
        .register_async("panic_async", "panics", |_ctx, _args| async {
            panic!("async boom")
        })
        .register_blocking("panic_blocking", "panics", |_ctx, _args| {
            panic!("blocking boom")
        })
        .register_async("fail", "returns an error", |_ctx, args| async move {
            Err(JobError::failed(if args.is_null() {
                "failed on purpose".to_owned()
            } else {
                format!("failed on purpose: {args}")
            }))
        });
    (
        registry,
        Fixtures {
            probe,
            started,
            gate,
        },
    )
}

/// An engine configuration with these pool sizes and queue bound.
#[must_use]
pub fn config(
    async_concurrency: usize,
    blocking_workers: usize,
    max_queued: usize,
) -> EngineConfig {
    EngineConfig {
        async_concurrency: NonZeroUsize::new(async_concurrency).expect("nonzero"),
        blocking_workers: NonZeroUsize::new(blocking_workers).expect("nonzero"),
        max_queued: NonZeroUsize::new(max_queued).expect("nonzero"),
        ..EngineConfig::default()
    }
}

//! A small, honest harness: a server bound to port 0 before it serves (so no
//! sleep-then-connect), plus job functions that report what they observe.

use std::{
    net::SocketAddr,
    num::NonZeroUsize,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use jobd::{Engine, EngineConfig, JobError, Registry};
use jobd_client::{JobClient, JobHandle, Submission};
use serde_json::json;
use tokio::{sync::mpsc, task::JoinHandle};
use tokio_util::sync::CancellationToken;

pub(crate) struct TestServer {
    pub(crate) addr: SocketAddr,
    pub(crate) engine: Engine,
    stop: CancellationToken,
    task: JoinHandle<Result<(), jobd::ServeError>>,
}

/// Observations made by the test functions from inside the pools.
#[derive(Default)]
pub(crate) struct Probe {
    running: AtomicUsize,
    max_running: AtomicUsize,
    started: AtomicUsize,
}

impl Probe {
    pub(crate) fn max_running(&self) -> usize {
        self.max_running.load(Ordering::SeqCst)
    }

    pub(crate) fn started(&self) -> usize {
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

/// Test functions plus the built-ins. `started` receives the job's argument
/// each time a `*_started` function begins, so tests wait on a signal, not a
/// sleep.
pub(crate) struct Fixtures {
    pub(crate) probe: Arc<Probe>,
    pub(crate) started: mpsc::Receiver<serde_json::Value>,
}

pub(crate) fn registry() -> (Registry, Fixtures) {
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
                tx.send(args).await.expect("test listens");
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
            tx.blocking_send(args.clone()).expect("test listens");
            std::thread::sleep(Duration::from_millis(args.as_u64().unwrap_or(500)));
            Ok(json!("finished anyway"))
        },
    );
    let tx = started_tx;
    registry.register_blocking(
        "polite_started",
        "signals start, then waits up to 60 s for a cancel and honours it",
        move |ctx, args| {
            tx.blocking_send(args).expect("test listens");
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
            Err(JobError::failed(format!("failed on purpose: {args}")))
        });
    (registry, Fixtures { probe, started })
}

pub(crate) fn config(
    async_concurrency: usize,
    blocking_workers: usize,
    max_queued: usize,
) -> EngineConfig {
    EngineConfig {
        async_concurrency: NonZeroUsize::new(async_concurrency).unwrap(),
        blocking_workers: NonZeroUsize::new(blocking_workers).unwrap(),
        max_queued: NonZeroUsize::new(max_queued).unwrap(),
        ..EngineConfig::default()
    }
}

impl TestServer {
    pub(crate) async fn start(registry: Registry, config: EngineConfig) -> Self {
        Self::start_with_grace(registry, config, Duration::from_secs(5)).await
    }

    pub(crate) async fn start_with_grace(
        registry: Registry,
        config: EngineConfig,
        grace: Duration,
    ) -> Self {
        Self::start_on(registry, config, grace, &jobd::StoreConfig::Memory).await
    }

    /// A server on the given store (e.g. SQLite in a temp dir).
    pub(crate) async fn start_on(
        registry: Registry,
        config: EngineConfig,
        grace: Duration,
        store: &jobd::StoreConfig,
    ) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let engine = Engine::open(registry, config, store).expect("open the store");
        let stop = CancellationToken::new();
        let task = tokio::spawn(jobd::serve(
            listener,
            engine.clone(),
            stop.clone().cancelled_owned(),
            grace,
        ));
        Self {
            addr,
            engine,
            stop,
            task,
        }
    }

    /// The default fixture server: 4 blocking workers, 1024 async slots.
    pub(crate) async fn with_fixtures() -> (Self, Fixtures) {
        let (registry, fixtures) = registry();
        (Self::start(registry, config(1024, 4, 1000)).await, fixtures)
    }

    pub(crate) fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub(crate) async fn client(&self) -> JobClient {
        JobClient::connect(self.url()).await.unwrap()
    }

    /// Returns once `n` callers are waiting inside the server for a job, so
    /// a test knows its Result calls are in flight. Polls an in-process
    /// counter, bounded.
    pub(crate) async fn until_waiters(&self, n: usize) {
        for _ in 0..100_000 {
            if self.engine.waiters() >= n {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("never saw {n} waiters (saw {})", self.engine.waiters());
    }

    /// Starts the drain without waiting for it.
    pub(crate) fn begin_shutdown(&self) {
        self.stop.cancel();
    }

    /// Drains and joins the server, re-raising its panic or error.
    pub(crate) async fn shutdown(self) {
        self.stop.cancel();
        self.task
            .await
            .expect("server task panicked")
            .expect("server failed");
    }

    /// Joins a server whose shutdown was begun elsewhere.
    pub(crate) async fn join(self) {
        self.task
            .await
            .expect("server task panicked")
            .expect("server failed");
    }
}

/// Submits `n` `noop` jobs in one SubmitBatch, job `k` with argument `k`
/// (so its result is `k`); every one must be accepted.
pub(crate) async fn submit_noops(client: &JobClient, n: usize) -> Vec<JobHandle> {
    let batch = (0..n).map(|k| Submission::new("noop", json!(k))).collect();
    client
        .submit_batch(batch)
        .await
        .expect("SubmitBatch")
        .into_iter()
        .map(|job| job.expect("every noop accepted"))
        .collect()
}

/// Runs `test` against a fixture server on the in-memory store and then on a
/// SQLite one in a fresh directory, both with `config`.
pub(crate) async fn on_both_stores<F, Fut>(config: EngineConfig, test: F)
where
    F: Fn(TestServer, Fixtures) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let dir = tempfile::tempdir().unwrap();
    for store in [
        jobd::StoreConfig::Memory,
        jobd::StoreConfig::Sqlite {
            dir: dir.path().to_owned(),
        },
    ] {
        let (registry, fixtures) = registry();
        let server =
            TestServer::start_on(registry, config.clone(), Duration::from_secs(5), &store).await;
        assert_eq!(
            server.engine.is_durable(),
            store != jobd::StoreConfig::Memory
        );
        test(server, fixtures).await;
    }
}

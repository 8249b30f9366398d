//! A real jobd served in this process: the same assembly `main` uses
//! (`jobd::serve`), on a listener bound to `127.0.0.1:0` before it serves.

use std::{
    future::{Future, IntoFuture as _},
    net::SocketAddr,
    time::Duration,
};

use jobd::{Engine, EngineConfig, Registry, Security, ServeError, StoreConfig};
use jobd_client::JobClient;
use tokio::{runtime::Runtime, task::JoinHandle};
use tokio_util::sync::CancellationToken;

use crate::fixtures::{self, Fixtures};

/// How long running jobs get to finish when a test server stops, unless a
/// test says otherwise; tests cancel what they start, so this only bounds a
/// failing test.
const GRACE: Duration = Duration::from_secs(5);

/// A jobd served in this process. `shutdown` drains it and re-raises the
/// server's panic or error, so a server that failed fails its test.
pub struct TestServer {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its engine, for a test to observe.
    pub engine: Engine,
    stop: CancellationToken,
    task: JoinHandle<Result<(), ServeError>>,
}

impl TestServer {
    /// Serves `registry` with `config` on the in-memory store.
    pub async fn start(registry: Registry, config: EngineConfig) -> Self {
        Self::start_with_grace(registry, config, GRACE).await
    }

    /// As [`TestServer::start`], giving running jobs `grace` at shutdown.
    pub async fn start_with_grace(
        registry: Registry,
        config: EngineConfig,
        grace: Duration,
    ) -> Self {
        Self::start_on(registry, config, grace, &StoreConfig::Memory).await
    }

    /// As [`TestServer::start_with_grace`], on the given store (e.g. SQLite
    /// in a temp dir).
    pub async fn start_on(
        registry: Registry,
        config: EngineConfig,
        grace: Duration,
        store: &StoreConfig,
    ) -> Self {
        Self::launch(registry, config, grace, store, Security::default()).await
    }

    /// Serves the built-ins with TLS and tokens as `security` says.
    pub async fn start_secure(security: Security) -> Self {
        Self::launch(
            jobd::builtins::registry(),
            EngineConfig::default(),
            GRACE,
            &StoreConfig::Memory,
            security,
        )
        .await
    }

    /// The fixture functions on the default test sizes: 4 blocking workers,
    /// 1024 async slots, queues of 1000.
    pub async fn with_fixtures() -> (Self, Fixtures) {
        let (registry, fixtures) = fixtures::registry();
        (
            Self::start(registry, fixtures::config(1024, 4, 1000)).await,
            fixtures,
        )
    }

    async fn launch(
        registry: Registry,
        config: EngineConfig,
        grace: Duration,
        store: &StoreConfig,
        security: Security,
    ) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("the bound address");
        let engine = Engine::open(registry, config, store).expect("open the store");
        let stop = CancellationToken::new();
        let task = tokio::spawn(
            jobd::serve(listener, engine.clone())
                .security(security)
                .with_graceful_shutdown(stop.clone().cancelled_owned(), grace)
                .into_future(),
        );
        Self {
            addr,
            engine,
            stop,
            task,
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `https://localhost:PORT`, for a server with TLS (the test
    /// certificates name `localhost`).
    pub fn https_url(&self) -> String {
        format!("https://localhost:{}", self.addr.port())
    }

    /// A client of this server (plaintext).
    pub async fn client(&self) -> JobClient {
        JobClient::connect(self.url())
            .await
            .expect("connect to the test server")
    }

    /// Returns once `n` callers are waiting inside the server for a job, so
    /// a test knows its Result calls are in flight. Polls an in-process
    /// counter (the engine has no signal for it), bounded.
    pub async fn until_waiters(&self, n: usize) {
        for _ in 0..100_000 {
            if self.engine.waiters() >= n {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("never saw {n} waiters (saw {})", self.engine.waiters());
    }

    /// Starts the drain without waiting for it.
    pub fn begin_shutdown(&self) {
        self.stop.cancel();
    }

    /// Drains and joins the server, re-raising its panic or error.
    pub async fn shutdown(self) {
        self.stop.cancel();
        self.join().await;
    }

    /// Joins a server whose shutdown was begun elsewhere.
    pub async fn join(self) {
        match self.task.await {
            Ok(served) => served.expect("the server should stop cleanly"),
            Err(join) => std::panic::resume_unwind(join.into_panic()),
        }
    }
}

/// A [`TestServer`] on a multi-threaded runtime of its own, so it keeps
/// answering while the test's thread blocks (on a `jobctl` child process).
pub struct BlockingServer {
    server: Option<TestServer>,
    runtime: Runtime,
}

impl BlockingServer {
    /// Starts the server `start` builds, on a fresh two-thread runtime.
    pub fn start<F: Future<Output = TestServer>>(start: impl FnOnce() -> F) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a test runtime");
        let server = runtime.block_on(start());
        Self {
            server: Some(server),
            runtime,
        }
    }

    /// The server.
    pub fn server(&self) -> &TestServer {
        self.server.as_ref().expect("running until shut down")
    }

    /// Its engine.
    pub fn engine(&self) -> &Engine {
        &self.server().engine
    }

    /// Runs `future` on the server's runtime.
    pub fn block_on<F: Future>(&self, future: F) -> F::Output {
        self.runtime.block_on(future)
    }

    /// Stops the server as a crash would: every task and connection dropped
    /// at once, nothing drained.
    pub fn crash(self) {
        let Self { server, runtime } = self;
        drop(server);
        runtime.shutdown_background();
    }

    /// Drains and joins the server, re-raising its panic or error.
    pub fn shutdown(mut self) {
        let server = self.server.take().expect("shut down once");
        self.runtime.block_on(server.shutdown());
    }
}

//! Assembles the gRPC server: `jobd.v1.JobService`, `grpc.health.v1.Health`
//! and reflection (`v1` and `v1alpha`), on a listener the caller bound, with
//! one shutdown path shared by `main` and the tests. Every transport limit
//! ([`ServerLimits`]) is applied here, in one place, so none is left at a
//! "no limit" default by accident, and so is [`Security`]: TLS on the
//! transport, and the token check wrapped around the whole of JobService
//! (health always open, reflection open unless `auth_reflection`).

use std::{
    future::{Future, IntoFuture},
    pin::Pin,
    sync::Arc,
    time::Duration,
};

use jobd_proto::pb::{
    job_service_server::JobServiceServer, worker_service_server::WorkerServiceServer,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;

use crate::{
    auth::{Authenticated, Guard, TokenSet},
    engine::Engine,
    grpc::{JobService, WorkerService},
    limits::{InFlightLimit, ServerLimits, limited_incoming},
    tls::TlsConfig,
};

/// Who may connect and call: TLS and bearer tokens. `Default` is neither
/// (plaintext, every call allowed), as [`serve`] starts with.
///
/// ```
/// let tokens = jobd::auth::TokenSet::parse("inline", "0123456789abcdef0123 name=ci")?;
/// let security = jobd::Security {
///     tokens: Some(std::sync::Arc::new(tokens)),
///     ..Default::default()
/// };
/// assert!(security.tls.is_none());
/// # Ok::<(), jobd::auth::TokenFileError>(())
/// ```
#[derive(Debug, Clone, Default)]
pub struct Security {
    /// Serve TLS (and require client certificates when it has a client CA).
    pub tls: Option<TlsConfig>,
    /// Require one of these bearer tokens on every JobService call.
    pub tokens: Option<Arc<TokenSet>>,
    /// Require a token for reflection too (any valid token, read-only ones
    /// included). Health checks never need one.
    pub auth_reflection: bool,
}

/// How long the transport gets, after the engine has drained, to flush its
/// last answers and close connections before `serve` returns anyway.
const TRANSPORT_DRAIN: Duration = Duration::from_secs(5);

/// Why the server could not start or stopped on its own.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Building the reflection service failed (a broken descriptor set).
    #[error("cannot build the reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The transport failed.
    #[error("gRPC transport error: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// The default time running jobs get to finish after the shutdown signal.
const DEFAULT_GRACE: Duration = Duration::from_secs(30);

/// Serves `engine` on `listener`: `jobd.v1.JobService`, health and
/// reflection, with the default [`ServerLimits`], no TLS and no tokens,
/// until the transport fails. Set those, and a shutdown signal, on the
/// returned [`Serve`], then await it.
///
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use jobd::{builtins, Engine, EngineConfig, ServerLimits};
///
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
/// println!("listening on {}", listener.local_addr()?);
/// let engine = Engine::start(builtins::registry(), EngineConfig::default());
/// let shutdown = async { let _ = tokio::signal::ctrl_c().await; };
/// jobd::serve(listener, engine)
///     .limits(ServerLimits { max_connections: 64, ..Default::default() })
///     .with_graceful_shutdown(shutdown, Duration::from_secs(30))
///     .await?;
/// # Ok(()) }
/// ```
#[must_use = "a server does nothing until awaited"]
pub fn serve(listener: TcpListener, engine: Engine) -> Serve {
    Serve {
        listener,
        engine,
        limits: ServerLimits::default(),
        security: Security::default(),
        shutdown: Box::pin(std::future::pending()),
        grace: DEFAULT_GRACE,
    }
}

/// A server being set up; see [`serve`]. Awaiting it serves until the
/// shutdown signal, then drains: health turns `NOT_SERVING`, no new
/// connections or calls are accepted, no pending job starts, running jobs
/// get the grace period to finish (then they are interrupted), waiting
/// callers are answered, and the future resolves.
#[must_use = "a server does nothing until awaited"]
pub struct Serve {
    listener: TcpListener,
    engine: Engine,
    limits: ServerLimits,
    security: Security,
    shutdown: Pin<Box<dyn Future<Output = ()> + Send>>,
    grace: Duration,
}

impl std::fmt::Debug for Serve {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Serve")
            .field("listener", &self.listener)
            .field("limits", &self.limits)
            .field("security", &self.security)
            .field("grace", &self.grace)
            .finish_non_exhaustive()
    }
}

impl Serve {
    /// Serves within `limits` instead of the defaults.
    pub fn limits(mut self, limits: ServerLimits) -> Self {
        self.limits = limits;
        self
    }

    /// Serves with TLS and bearer-token authentication as `security` says.
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// use std::{path::Path, sync::Arc};
    /// use jobd::{builtins, auth::TokenSet, tls::TlsConfig, Engine, EngineConfig, Security};
    ///
    /// let security = Security {
    ///     tls: Some(TlsConfig::from_files(Path::new("server.pem"), Path::new("server.key"), None)?),
    ///     tokens: Some(Arc::new(TokenSet::load(Path::new("tokens"))?)),
    ///     auth_reflection: false,
    /// };
    /// let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    /// let engine = Engine::start(builtins::registry(), EngineConfig::default());
    /// jobd::serve(listener, engine).security(security).await?;
    /// # Ok(()) }
    /// ```
    pub fn security(mut self, security: Security) -> Self {
        self.security = security;
        self
    }

    /// Drains when `signal` resolves, giving running jobs `grace` to
    /// finish.
    pub fn with_graceful_shutdown(
        mut self,
        signal: impl Future<Output = ()> + Send + 'static,
        grace: Duration,
    ) -> Self {
        self.shutdown = Box::pin(signal);
        self.grace = grace;
        self
    }
}

impl IntoFuture for Serve {
    type Output = Result<(), ServeError>;
    type IntoFuture = Pin<Box<dyn Future<Output = Self::Output> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(run(self))
    }
}

/// Serves until the shutdown signal, then drains.
async fn run(serve: Serve) -> Result<(), ServeError> {
    let Serve {
        listener,
        engine,
        limits,
        security,
        shutdown,
        grace,
    } = serve;
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<JobServiceServer<JobService>>().await;
    health
        .set_serving::<WorkerServiceServer<WorkerService>>()
        .await;

    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;

    // Small RPCs are the workload: never let Nagle hold an answer back.
    // TCP keepalive is set here because `Server::tcp_keepalive` only applies
    // to listeners tonic binds itself.
    let incoming = TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(limits.tcp_keepalive));
    let incoming = limited_incoming(incoming, limits.max_connections);
    let job_service = JobService::new(engine.clone())
        .with_wait_limits(limits.max_wait, limits.max_waiters)
        .into_server()
        .max_decoding_message_size(limits.max_decoding_message_size)
        .max_encoding_message_size(limits.max_encoding_message_size);
    // Only JobService is behind the global in-flight limit: health and
    // reflection are cheap and must keep answering while it sheds load.
    let job_service = InFlightLimit::new(job_service, limits.max_in_flight);
    // Outermost, so a call without a valid token costs no in-flight permit
    // and reaches nothing. Wrapping the whole service (not listing methods)
    // is what makes every JobService method, present and future, checked.
    let job_service = Authenticated::new(job_service, security.tokens.clone(), Guard::JobService);
    // Worker sessions are long-lived streams, capped by the engine
    // (`max_workers`), not by the in-flight limit of short calls. Only
    // worker tokens pass.
    let worker_service = WorkerService::new(engine.clone())
        .into_server()
        .max_decoding_message_size(limits.max_decoding_message_size)
        .max_encoding_message_size(limits.max_encoding_message_size);
    let worker_service = Authenticated::new(
        worker_service,
        security.tokens.clone(),
        Guard::WorkerService,
    );
    let reflection_tokens = security.tokens.clone().filter(|_| security.auth_reflection);
    let reflection_v1 =
        Authenticated::new(reflection_v1, reflection_tokens.clone(), Guard::AnyToken);
    let reflection_v1alpha =
        Authenticated::new(reflection_v1alpha, reflection_tokens, Guard::AnyToken);
    let stop_transport = CancellationToken::new();
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = &security.tls {
        builder = builder.tls_config(tls.server_config())?;
    }
    let server = builder
        .max_concurrent_streams(limits.max_concurrent_streams)
        // With load shedding on, a call beyond the per-connection limit is
        // answered RESOURCE_EXHAUSTED at once instead of waiting in a queue
        // that has no bound of its own.
        .concurrency_limit_per_connection(limits.max_in_flight_per_connection)
        .load_shed(true)
        .http2_max_header_list_size(limits.max_header_list_size)
        .http2_max_local_error_reset_streams(Some(limits.max_local_error_reset_streams))
        .http2_max_pending_accept_reset_streams(Some(limits.max_pending_accept_reset_streams))
        .http2_keepalive_interval(Some(limits.http2_keepalive_interval))
        .http2_keepalive_timeout(Some(limits.http2_keepalive_timeout))
        .add_service(job_service)
        .add_service(worker_service)
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .serve_with_incoming_shutdown(incoming, stop_transport.clone().cancelled_owned());
    tokio::pin!(server);

    tokio::select! {
        result = &mut server => {
            // The transport stopped by itself: nothing left to drain into.
            engine.shutdown(Duration::ZERO).await;
            return result.map_err(Into::into);
        }
        () = shutdown => {}
    }

    tracing::info!(?grace, "shutting down: draining running jobs");
    health
        .set_not_serving::<JobServiceServer<JobService>>()
        .await;
    health
        .set_not_serving::<WorkerServiceServer<WorkerService>>()
        .await;
    health
        .set_service_status("", ServingStatus::NotServing)
        .await;
    stop_transport.cancel();
    let drain_engine = async {
        engine.shutdown(grace).await;
        match engine.commit_stats() {
            Some((commits, operations)) => tracing::info!(
                commits,
                operations,
                mean_batch = format!("{:.1}", operations as f64 / commits.max(1) as f64),
                "engine drained"
            ),
            None => tracing::info!("engine drained"),
        }
    };
    let (result, ()) = tokio::join!(
        async {
            match tokio::time::timeout(grace + TRANSPORT_DRAIN, &mut server).await {
                Ok(result) => result,
                Err(_) => {
                    tracing::warn!("connections still open after the drain; closing them");
                    Ok(())
                }
            }
        },
        drain_engine
    );
    result.map_err(Into::into)
}

fn reflection() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(jobd_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
}

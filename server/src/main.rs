//! The `jobd` server binary: the built-in job functions behind gRPC on
//! 127.0.0.1:50051 by default.

use std::{
    net::SocketAddr,
    num::{NonZeroU32, NonZeroU64, NonZeroUsize},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use clap::Parser;
use jobd::{
    Engine, EngineConfig, Security, ServerLimits, StoreConfig, auth::TokenSet, tls::TlsConfig,
};
use tracing_subscriber::EnvFilter;

/// Jobs are allocated on the gRPC threads and often freed on the store's
/// writer thread; glibc's malloc pays for that hand-off in arena locking, and
/// mimalloc does not (see docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// jobd: run named job functions on async, blocking and process pools, over gRPC.
///
/// Submit jobs with `jobctl submit hello`, fetch results with
/// `jobctl result ID`, or talk to it with any gRPC tool (`grpcurl -plaintext
/// 127.0.0.1:50051 list`; reflection and health checks are built in).
/// Every flag can also be set through the environment variable shown.
/// Logging follows RUST_LOG (default: info).
#[derive(Debug, Parser)]
#[command(version, about, long_about)]
struct Args {
    /// Address to listen on. Port 0 picks a free port; the actual address is
    /// printed as `listening on ADDR`. A non-loopback address needs TLS and
    /// authentication, or --insecure-listen.
    #[arg(long, env = "JOBD_LISTEN", default_value = "127.0.0.1:50051")]
    listen: SocketAddr,

    /// How many async jobs may run at once on the async pool.
    #[arg(long, env = "JOBD_ASYNC_CONCURRENCY", default_value = "1024")]
    async_concurrency: NonZeroUsize,

    /// Dedicated OS threads in the blocking pool [default: number of cores].
    #[arg(long, env = "JOBD_BLOCKING_WORKERS")]
    blocking_workers: Option<NonZeroUsize>,

    /// Child processes in the process pool, one job at a time each
    /// [default: number of cores]. Children start when the first process
    /// job comes, and are replaced when they die.
    #[arg(long, env = "JOBD_PROCESS_WORKERS")]
    process_workers: Option<NonZeroUsize>,

    /// Replace a process-pool child after it has run this many jobs (0:
    /// never), so that what a job leaks (memory, file descriptors, global
    /// state) goes with its child.
    #[arg(
        long,
        env = "JOBD_PROCESS_MAX_JOBS_PER_CHILD",
        value_name = "N",
        default_value = "0"
    )]
    process_max_jobs_per_child: u64,

    /// The address space each process-pool child may use (RLIMIT_AS, set by
    /// the child itself before it runs anything), e.g. "512MiB", "2GiB" or
    /// bytes. A job that allocates past it kills its child, not jobd: the
    /// job fails with WORKER_LOST. At least 64MiB (a child needs some to
    /// start). Default: no limit.
    #[arg(long, env = "JOBD_PROCESS_MEMORY_LIMIT", value_name = "BYTES", value_parser = parse_memory_limit)]
    process_memory_limit: Option<u64>,

    /// Pending jobs each pool's queue holds; past it Submit answers
    /// RESOURCE_EXHAUSTED.
    #[arg(long, env = "JOBD_MAX_QUEUED", default_value = "100000")]
    max_queued: NonZeroUsize,

    /// On SIGINT/SIGTERM, how long running jobs may take to finish before they
    /// are interrupted, e.g. "30s", "500ms", "2m".
    #[arg(long, env = "JOBD_SHUTDOWN_GRACE", default_value = "30s", value_parser = jobd::units::parse_duration)]
    shutdown_grace: Duration,

    /// Priority aging: each such interval a pending job waits counts as one
    /// more step of priority, so a flood of higher-priority jobs cannot hold
    /// a lower one back for ever: a job of priority p is overtaken only by
    /// jobs queued less than (q - p) intervals after it (q their priority).
    /// "0" turns aging off (priority alone decides).
    #[arg(long, env = "JOBD_PRIORITY_AGING", default_value = "1s", value_parser = jobd::units::parse_duration)]
    priority_aging: Duration,

    /// Where job state lives: "sqlite" (durable: an acknowledged job survives
    /// crashes and restarts) or "memory" (ephemeral, lost on exit).
    #[arg(long, env = "JOBD_STORE", value_enum, default_value = "sqlite")]
    store: StoreKind,

    /// Directory of the sqlite store (created if missing; one jobd at a time).
    #[arg(long, env = "JOBD_DATA_DIR", default_value = "jobd-data")]
    data_dir: PathBuf,

    /// How long finished jobs and their results are kept, e.g. "7d", "12h".
    /// Removed jobs leave a small tombstone so lookups say "expired".
    #[arg(long, env = "JOBD_RETENTION", default_value = "7d", value_parser = jobd::units::parse_duration)]
    retention: Duration,

    /// With the sqlite store: finished jobs kept in memory for fast reads
    /// (older ones are read from disk).
    #[arg(long, env = "JOBD_CACHE_FINISHED", default_value = "100000")]
    cache_finished: usize,

    /// Start with every local pool paused: jobs are accepted and queued,
    /// none starts. For maintenance windows and for measuring the cost of queued
    /// jobs (see `jobctl bench --help`).
    #[arg(long, env = "JOBD_PAUSED")]
    paused: bool,

    /// Recent job events (state changes and progress reports of all jobs)
    /// kept in memory for Watch: how far a slow watcher may fall behind
    /// before it is told it lagged, and how far back a reconnecting watcher
    /// can resume (~100 bytes each).
    #[arg(long, env = "JOBD_EVENT_HISTORY", default_value = "65536")]
    event_history: std::num::NonZeroUsize,

    /// Watch streams open at once; one more is answered RESOURCE_EXHAUSTED.
    /// Watch streams do not count against --max-in-flight.
    #[arg(long, env = "JOBD_MAX_WATCHERS", default_value = "1024")]
    max_watchers: usize,

    /// A function whose interrupted runs must not be repeated: if jobd dies
    /// while it runs, recovery marks the job FAILED instead of running it
    /// again. Repeatable. (Execution is otherwise at-least-once.)
    #[arg(long = "not-safe-to-retry", value_name = "FUNCTION")]
    not_safe_to_retry: Vec<String>,

    /// Concurrent client connections. One more is closed as soon as it is
    /// accepted (clients see the connection end and may retry), so a flood
    /// of connections cannot exhaust memory or file descriptors.
    #[arg(long, env = "JOBD_MAX_CONNECTIONS", default_value = "1024")]
    max_connections: NonZeroUsize,

    /// JobService calls handled at once over all connections (blocked Result
    /// and Wait calls count, and open Map streams). Past it calls are answered RESOURCE_EXHAUSTED
    /// at once, not queued. Health checks and reflection are not limited.
    #[arg(long, env = "JOBD_MAX_IN_FLIGHT", default_value = "4096")]
    max_in_flight: NonZeroUsize,

    /// Calls handled at once on one connection (any service); past it that
    /// connection's calls are answered RESOURCE_EXHAUSTED at once.
    #[arg(long, env = "JOBD_MAX_IN_FLIGHT_PER_CONNECTION", default_value = "256")]
    max_in_flight_per_connection: NonZeroUsize,

    /// HTTP/2 streams one connection may have open at once (announced to
    /// clients, which wait for a free stream).
    #[arg(long, env = "JOBD_MAX_CONCURRENT_STREAMS", default_value = "256")]
    max_concurrent_streams: NonZeroU32,

    /// Largest request message JobService accepts, in bytes (arguments
    /// included). A larger one is refused (OUT_OF_RANGE) before decoding and
    /// creates no job.
    #[arg(long, env = "JOBD_MAX_MESSAGE_BYTES", default_value = "4194304")]
    max_message_bytes: NonZeroUsize,

    /// Largest response message JobService sends, in bytes (results
    /// included). A larger answer fails with OUT_OF_RANGE instead.
    #[arg(long, env = "JOBD_MAX_RESPONSE_BYTES", default_value = "16777216")]
    max_response_bytes: NonZeroUsize,

    /// Largest header list one request may carry, in bytes (after HPACK
    /// decoding).
    #[arg(long, env = "JOBD_MAX_HEADER_LIST_BYTES", default_value = "16384")]
    max_header_list_bytes: NonZeroU32,

    /// Streams the server may reset for protocol errors on one connection
    /// before closing it (HTTP/2 reset-flood defence).
    #[arg(long, env = "JOBD_MAX_LOCAL_ERROR_RESETS", default_value = "1024")]
    max_local_error_resets: NonZeroUsize,

    /// Streams a client may open and reset before the server accepts them,
    /// per connection, before the connection is closed (HTTP/2 "rapid reset"
    /// defence, CVE-2023-44487).
    #[arg(long, env = "JOBD_MAX_PENDING_ACCEPT_RESETS", default_value = "20")]
    max_pending_accept_resets: NonZeroUsize,

    /// How often idle HTTP/2 connections are pinged, so dead peers give back
    /// their connection slot.
    #[arg(long, env = "JOBD_HTTP2_KEEPALIVE_INTERVAL", default_value = "60s", value_parser = jobd::units::parse_duration)]
    http2_keepalive_interval: Duration,

    /// How long a keepalive ping may go unanswered before the connection is
    /// closed.
    #[arg(long, env = "JOBD_HTTP2_KEEPALIVE_TIMEOUT", default_value = "20s", value_parser = jobd::units::parse_duration)]
    http2_keepalive_timeout: Duration,

    /// TCP keepalive idle time on accepted connections (finds peers that
    /// vanished without closing).
    #[arg(long, env = "JOBD_TCP_KEEPALIVE", default_value = "60s", value_parser = jobd::units::parse_duration)]
    tcp_keepalive: Duration,

    /// Serve TLS with this certificate chain (PEM). Needs --tls-key. Clients
    /// then connect to https://HOST:PORT.
    #[arg(long, env = "JOBD_TLS_CERT", value_name = "PEM", requires = "tls_key")]
    tls_cert: Option<PathBuf>,

    /// The private key of --tls-cert (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, env = "JOBD_TLS_KEY", value_name = "PEM", requires = "tls_cert")]
    tls_key: Option<PathBuf>,

    /// Mutual TLS: require every client to present a certificate issued by
    /// one of these CAs (PEM). Needs --tls-cert.
    #[arg(
        long,
        env = "JOBD_TLS_CLIENT_CA",
        value_name = "PEM",
        requires = "tls_cert"
    )]
    tls_client_ca: Option<PathBuf>,

    /// How long a client may take to finish the TLS handshake before its
    /// connection is closed (it holds a connection slot meanwhile).
    #[arg(long, env = "JOBD_TLS_HANDSHAKE_TIMEOUT", value_name = "DURATION", default_value = "10s", value_parser = jobd::units::parse_duration)]
    tls_handshake_timeout: Duration,

    /// Require a bearer token on every JobService call. FILE holds one token
    /// per line, `TOKEN [name=NAME] [readonly|worker]` (# starts a comment);
    /// tokens are at least 16 characters, and the file must not be
    /// world-readable. A readonly token may ask (Done, Result, GetJob,
    /// ListJobs, Wait, ListFunctions, ListWorkers) but not change (Submit,
    /// SubmitBatch, Cancel, DeleteJob); a worker token may only attach
    /// remote workers, and only a worker token may.
    /// Health checks never need a token. SIGHUP reloads the file (a file
    /// that fails these checks is refused, and the old tokens stay).
    #[arg(long, env = "JOBD_AUTH_TOKEN_FILE", value_name = "FILE")]
    auth_token_file: Option<PathBuf>,

    /// Require a token for server reflection too (any valid token).
    #[arg(long, env = "JOBD_AUTH_REFLECTION", requires = "auth_token_file")]
    auth_reflection: bool,

    /// Allow listening on a non-loopback address without TLS and
    /// authentication (tokens or client certificates). Without it jobd
    /// refuses, since anyone who can reach the port could run jobs and read
    /// every result.
    #[arg(long, env = "JOBD_INSECURE_LISTEN")]
    insecure_listen: bool,
    /// Largest argument one job may be submitted with, in bytes of JSON text
    /// (Submit and each SubmitBatch item). A larger one is refused with
    /// INVALID_ARGUMENT (field "args") and creates no job.
    #[arg(long, env = "JOBD_MAX_ARGS_BYTES", default_value = "1048576")]
    max_args_bytes: NonZeroUsize,

    /// Largest value one job may return, in bytes of JSON text. A job that
    /// returns more ends FAILED with error kind RESULT_TOO_LARGE (the value
    /// is dropped). Keep it well below --max-response-bytes.
    #[arg(long, env = "JOBD_MAX_RESULT_BYTES", default_value = "1048576")]
    max_result_bytes: NonZeroUsize,

    /// A TOML file of command functions: named jobs that run a program
    /// (`[functions.NAME]` with `command`, `args_schema`, `timeout`, `env`,
    /// `cwd`, `result`, `limits`, ...; see docs/guide.md). They run on the
    /// blocking pool. A file with a mistake stops jobd at start.
    #[arg(long, env = "JOBD_FUNCTIONS", value_name = "FILE")]
    functions: Option<PathBuf>,

    /// Bytes of each job's log kept (what it printed, and its log lines):
    /// past it the oldest entries are dropped, and a reader is told how
    /// many bytes it missed.
    #[arg(long, env = "JOBD_MAX_LOG_BYTES", default_value = "1048576")]
    max_log_bytes: NonZeroU64,

    /// The longest one Result or Wait call waits, whatever timeout it asks
    /// for (at least 100ms). Past it Result answers DEADLINE_EXCEEDED and
    /// Wait its done/not-done split; clients call again to keep waiting
    /// (jobd-client and jobctl do so by themselves).
    #[arg(long, env = "JOBD_MAX_WAIT", default_value = "60s", value_parser = parse_max_wait)]
    max_wait: Duration,

    /// How often a remote worker must be heard from (it sends a heartbeat
    /// when idle), e.g. "5s".
    #[arg(long, env = "JOBD_WORKER_HEARTBEAT_INTERVAL", default_value = "5s", value_parser = jobd::units::parse_duration)]
    worker_heartbeat_interval: Duration,

    /// How long a remote worker's leases last without hearing from it: its
    /// running jobs go back to pending (or fail, when not safe to retry)
    /// within this plus a second after it vanished. At least twice the
    /// heartbeat interval.
    #[arg(long, env = "JOBD_WORKER_LEASE_TIMEOUT", default_value = "30s", value_parser = jobd::units::parse_duration)]
    worker_lease_timeout: Duration,

    /// Remote worker sessions attached at once; one more is refused with
    /// RESOURCE_EXHAUSTED.
    #[arg(long, env = "JOBD_MAX_WORKERS", default_value = "1024")]
    max_workers: NonZeroUsize,

    /// Result and Wait calls in progress at once (over all connections);
    /// one more is answered RESOURCE_EXHAUSTED at once. Keep it below
    /// --max-in-flight so waiters leave room for other calls.
    #[arg(long, env = "JOBD_MAX_WAITERS", default_value = "3072")]
    max_waiters: NonZeroUsize,

    /// TEST ONLY (built with the `fault-injection` feature): cap the
    /// database at this many pages, to make "disk full" happen on demand.
    #[cfg(feature = "fault-injection")]
    #[arg(long, hide = true)]
    unsafe_max_db_pages: Option<u64>,

    /// TEST ONLY (built with the `fault-injection` feature): acknowledge
    /// Submit before its commit, breaking durability on purpose so the
    /// crash test can prove it detects loss.
    #[cfg(feature = "fault-injection")]
    #[arg(long, hide = true)]
    unsafe_ack_before_commit: bool,
}

/// The `--store` choices.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum StoreKind {
    Sqlite,
    Memory,
}

impl Args {
    /// The transport limits the flags describe.
    fn limits(&self) -> ServerLimits {
        ServerLimits {
            max_connections: self.max_connections.get(),
            max_in_flight: self.max_in_flight.get(),
            max_concurrent_streams: self.max_concurrent_streams.get(),
            max_in_flight_per_connection: self.max_in_flight_per_connection.get(),
            max_header_list_size: self.max_header_list_bytes.get(),
            max_local_error_reset_streams: self.max_local_error_resets.get(),
            max_pending_accept_reset_streams: self.max_pending_accept_resets.get(),
            http2_keepalive_interval: self.http2_keepalive_interval,
            http2_keepalive_timeout: self.http2_keepalive_timeout,
            tcp_keepalive: self.tcp_keepalive,
            max_decoding_message_size: self.max_message_bytes.get(),
            max_encoding_message_size: self.max_response_bytes.get(),
            max_wait: self.max_wait,
            max_waiters: self.max_waiters.get(),
        }
    }
}

/// Refuses to expose jobd beyond this machine unprotected: a non-loopback
/// address needs TLS (or the token travels in clear) and a way to tell
/// clients apart (tokens or client certificates), unless the operator says
/// `--insecure-listen`.
fn check_exposure(
    addr: SocketAddr,
    tls: bool,
    authenticated: bool,
    insecure_listen: bool,
) -> anyhow::Result<()> {
    if addr.ip().is_loopback() || insecure_listen {
        return Ok(());
    }
    let missing = match (tls, authenticated) {
        (true, true) => return Ok(()),
        (false, false) => "TLS and authentication",
        (false, true) => "TLS (tokens would travel in clear)",
        (true, false) => "authentication (anyone reaching the port could run jobs)",
    };
    anyhow::bail!(
        "refusing to listen on {addr} without {missing}: give --tls-cert/--tls-key and \
         --auth-token-file (or --tls-client-ca), or --insecure-listen to accept the risk"
    )
}

/// The TLS and token settings the flags describe, each file read and checked.
fn security(args: &Args) -> anyhow::Result<Security> {
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => {
            let mut tls = TlsConfig::from_files(cert, key, args.tls_client_ca.as_deref())
                .context("--tls-cert/--tls-key")?;
            tls.handshake_timeout = args.tls_handshake_timeout;
            Some(tls)
        }
        // clap's `requires` makes one without the other a usage error.
        _ => None,
    };
    let tokens = args
        .auth_token_file
        .as_deref()
        .map(TokenSet::load)
        .transpose()
        .context("--auth-token-file")?
        .map(Arc::new);
    Ok(Security {
        tls,
        tokens,
        auth_reflection: args.auth_reflection,
    })
}

/// The smallest `--process-memory-limit`: a child is this program, and its
/// code, runtime and thread stacks take address space before any job runs.
const MIN_PROCESS_MEMORY: u64 = 64 * 1024 * 1024;

/// `--process-memory-limit`: a size (see [`jobd::units::parse_bytes`]), at
/// least [`MIN_PROCESS_MEMORY`].
fn parse_memory_limit(raw: &str) -> Result<u64, String> {
    let bytes = jobd::units::parse_bytes(raw)?;
    if bytes < MIN_PROCESS_MEMORY {
        return Err(format!(
            "{raw:?} is too small: a child needs at least 64MiB of address space to start"
        ));
    }
    Ok(bytes)
}

/// `--max-wait`: a duration of at least 100 ms, so that a client asking
/// again after each cut-off cannot turn into a busy loop.
fn parse_max_wait(raw: &str) -> Result<Duration, String> {
    let wait = jobd::units::parse_duration(raw)?;
    if wait < Duration::from_millis(100) {
        return Err(format!("{raw:?} is too short: at least 100ms"));
    }
    Ok(wait)
}

fn main() -> std::process::ExitCode {
    // Command functions with limits start their program through this
    // binary: in that role it sets the limits and becomes the program.
    jobd_command::exec_if_helper();
    // A child of the process pool is this program run again: it serves the
    // built-ins' jobs and exits here, before any flag is read.
    jobd::process::run_child_if_requested(jobd::builtins::registry);
    let args = Args::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("jobd: cannot start the async runtime: {err}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            // One line with the whole cause chain; never a backtrace.
            eprintln!("jobd: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();

    let config = EngineConfig {
        async_concurrency: args.async_concurrency,
        blocking_workers: args
            .blocking_workers
            .unwrap_or_else(|| EngineConfig::default().blocking_workers),
        process_workers: args
            .process_workers
            .unwrap_or_else(|| EngineConfig::default().process_workers),
        process_max_jobs_per_child: NonZeroU64::new(args.process_max_jobs_per_child),
        process_memory_limit: args.process_memory_limit,
        process_program: None,
        max_queued: args.max_queued,
        retention: args.retention,
        cache_finished: args.cache_finished,
        paused: args.paused,
        event_history: args.event_history,
        max_watchers: args.max_watchers,
        priority_aging: args.priority_aging,
        max_args_bytes: args.max_args_bytes.get(),
        max_result_bytes: args.max_result_bytes.get(),
        max_log_bytes: args.max_log_bytes.get(),
        worker_heartbeat_interval: args.worker_heartbeat_interval,
        worker_lease_timeout: args.worker_lease_timeout,
        max_workers: args.max_workers.get(),
        clock: jobd::Clock::system(),
        #[cfg(feature = "fault-injection")]
        faults: jobd::store::Faults {
            ack_before_commit: args.unsafe_ack_before_commit,
            max_db_pages: args.unsafe_max_db_pages,
        },
    };
    anyhow::ensure!(
        args.worker_lease_timeout >= args.worker_heartbeat_interval * 2,
        "--worker-lease-timeout ({:?}) must be at least twice --worker-heartbeat-interval ({:?}), \
         or a worker that misses one heartbeat loses its jobs",
        args.worker_lease_timeout,
        args.worker_heartbeat_interval
    );
    let mut registry = jobd::builtins::registry();
    if let Some(path) = &args.functions {
        let functions = jobd::command_functions::load(path)?;
        for function in &functions {
            // Not fatal: the program may be installed later, and each job
            // looks it up again (failing with this reason meanwhile).
            if let Err(reason) = function.find_program() {
                tracing::warn!(
                    function = function.name(),
                    %reason,
                    "the program of a command function cannot be started now; its jobs fail until it can"
                );
            }
        }
        let helper = std::env::current_exe()
            .map_err(|e| anyhow::anyhow!("cannot find jobd's own executable: {e}"))?;
        let count = functions.len();
        jobd::command_functions::register(&mut registry, functions, &helper)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        tracing::info!(path = %path.display(), functions = count, "loaded command functions");
    }
    for name in &args.not_safe_to_retry {
        if registry.get(name).is_none() {
            anyhow::bail!("--not-safe-to-retry {name:?}: no such function");
        }
        registry.not_safe_to_retry(name);
    }
    let store = match args.store {
        StoreKind::Sqlite => StoreConfig::Sqlite {
            dir: args.data_dir.clone(),
        },
        StoreKind::Memory => StoreConfig::Memory,
    };
    let security = security(&args)?;
    if let (Some(path), Some(tokens)) = (&args.auth_token_file, &security.tokens) {
        reload_tokens_on_sighup(path.clone(), Arc::clone(tokens))?;
    }
    check_exposure(
        args.listen,
        security.tls.is_some(),
        security.tokens.is_some()
            || security
                .tls
                .as_ref()
                .is_some_and(|tls| tls.client_ca_pem.is_some()),
        args.insecure_listen,
    )?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let addr = listener
        .local_addr()
        .context("cannot read the bound address")?;
    tracing::info!(?config, ?store, "starting jobd");
    // Opening a durable store reads the disk and recovers unfinished jobs:
    // blocking work, kept off the async workers.
    let engine = tokio::task::spawn_blocking(move || Engine::open(registry, config, &store))
        .await
        .context("opening the job store panicked")??;
    let shutdown = shutdown_signal()?;
    // Printed on stdout (not a log line) so scripts and tests can read it.
    println!("listening on {addr}");
    let limits = args.limits();
    tracing::info!(?limits, "transport limits");
    tracing::info!(
        tls = ?security.tls,
        tokens = ?security.tokens,
        auth_reflection = security.auth_reflection,
        "security"
    );
    jobd::serve(listener, engine)
        .limits(limits)
        .security(security)
        .with_graceful_shutdown(shutdown, args.shutdown_grace)
        .await?;
    tracing::info!("stopped");
    Ok(())
}

/// Reloads the token file on every SIGHUP, so tokens can be added, rotated
/// and revoked without a restart. A file that no longer passes the checks is
/// refused with an error log, and the tokens in force stay.
fn reload_tokens_on_sighup(path: PathBuf, tokens: Arc<TokenSet>) -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hangups = signal(SignalKind::hangup()).context("cannot listen for SIGHUP")?;
        tokio::spawn(async move {
            while hangups.recv().await.is_some() {
                let file = path.clone();
                match tokio::task::spawn_blocking(move || TokenSet::load(&file)).await {
                    Ok(Ok(newer)) => {
                        tokens.replace_with(newer);
                        tracing::info!(?tokens, "SIGHUP: token file reloaded");
                    }
                    Ok(Err(err)) => {
                        tracing::error!(%err, "SIGHUP: token file refused; the old tokens stay");
                    }
                    Err(err) => tracing::error!(%err, "SIGHUP: reading the token file panicked"),
                }
            }
        });
    }
    #[cfg(not(unix))]
    let _ = (path, tokens);
    Ok(())
}

/// Listens for SIGINT and SIGTERM from now on, and returns what resolves
/// on the first of them. Called before jobd says it is listening: a signal
/// that came between that line and the first poll of a lazily registered
/// handler would otherwise kill jobd with the default action, skipping the
/// drain.
#[cfg(unix)]
fn shutdown_signal() -> anyhow::Result<impl Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?;
    let mut terminate = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    Ok(async move {
        tokio::select! {
            _ = interrupt.recv() => tracing::info!("SIGINT received"),
            _ = terminate.recv() => tracing::info!("SIGTERM received"),
        }
    })
}

/// Resolves on the first Ctrl-C.
#[cfg(not(unix))]
fn shutdown_signal() -> anyhow::Result<impl Future<Output = ()>> {
    Ok(async {
        if let Err(err) = tokio::signal::ctrl_c().await {
            tracing::error!(%err, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
        tracing::info!("Ctrl-C received");
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_limits_have_a_floor() {
        assert_eq!(parse_memory_limit("512MiB"), Ok(512 << 20));
        assert_eq!(parse_memory_limit("65536KiB"), Ok(64 << 20));
        assert!(
            parse_memory_limit("1MiB")
                .unwrap_err()
                .contains("too small")
        );
        assert!(
            parse_memory_limit("5TB")
                .unwrap_err()
                .contains("unknown unit")
        );
    }

    /// The flag defaults are written as strings for `--help`; this keeps
    /// them equal to the library's `ServerLimits::default()`.
    #[test]
    fn limit_flag_defaults_match_the_library() {
        let args = Args::try_parse_from(["jobd"]).unwrap();
        let from_flags = format!("{:?}", args.limits());
        assert_eq!(from_flags, format!("{:?}", ServerLimits::default()));
        let engine = EngineConfig::default();
        assert_eq!(args.max_args_bytes.get(), engine.max_args_bytes);
        assert_eq!(args.max_result_bytes.get(), engine.max_result_bytes);
        assert!(Args::try_parse_from(["jobd", "--max-wait", "50ms"]).is_err());
    }

    #[test]
    fn only_loopback_may_listen_unprotected() {
        let at = |addr: &str| addr.parse::<SocketAddr>().unwrap();
        for loopback in ["127.0.0.1:1", "127.1.2.3:1", "[::1]:1"] {
            assert!(check_exposure(at(loopback), false, false, false).is_ok());
        }
        for exposed in ["0.0.0.0:1", "[::]:1", "10.0.0.7:1"] {
            let refused = |tls, auth| {
                check_exposure(at(exposed), tls, auth, false)
                    .unwrap_err()
                    .to_string()
            };
            assert!(refused(false, false).contains("without TLS and authentication"));
            assert!(refused(false, true).contains("without TLS"));
            assert!(refused(true, false).contains("without authentication"));
            assert!(refused(false, false).contains("--insecure-listen"));
            assert!(check_exposure(at(exposed), true, true, false).is_ok());
            assert!(check_exposure(at(exposed), false, false, true).is_ok());
        }
    }

    #[test]
    fn cli_definition_is_valid() {
        use clap::CommandFactory as _;
        Args::command().debug_assert();
    }
}

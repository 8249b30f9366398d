//! jobd: Python's `concurrent.futures` across the network.
//!
//! Clients submit named job functions with JSON arguments over gRPC; the
//! server runs them on an async pool (tokio tasks, for I/O-bound work), a
//! blocking pool (dedicated OS threads, for CPU-bound or blocking work) or a
//! process pool (child processes, for work that must be isolated and
//! killable), or hands them to remote workers, and
//! answers `Done`, `Result`, `Wait`, `Cancel`, listing and status questions.
//! Job state is durable by default (embedded SQLite; see [`store`]).
//!
//! This crate is both the `jobd` binary and a library for embedding: build a
//! [`Registry`] of your own functions, [`Engine::start`] it (or
//! [`Engine::open`] it on a durable store), and [`serve`] it.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use jobd::{Engine, EngineConfig, JobError, Registry};
//! use serde_json::json;
//!
//! let mut registry = jobd::builtins::registry();
//! registry.register_blocking("add", "Adds [a, b]", |_ctx, args| {
//!     let (a, b) = serde_json::from_value::<(f64, f64)>(args)?;
//!     Ok(json!(a + b))
//! });
//! let engine = Engine::start(registry, EngineConfig::default());
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:50051").await?;
//! let ctrl_c = async { let _ = tokio::signal::ctrl_c().await; };
//! jobd::serve(listener, engine)
//!     .with_graceful_shutdown(ctrl_c, Duration::from_secs(30))
//!     .await?;
//! # Ok(()) }
//! ```
//!
//! Module map: [`function`] (the registry), [`ctx`] (what a running job
//! sees), [`job`] (records and outcomes), [`clock`] (the one source of
//! time), `engine` (admission and the executors that run jobs), [`store`]
//! (where job state lives, behind one interface: in memory or in SQLite),
//! `grpc` (the wire), [`server`] (assembly and shutdown), [`limits`]
//! (transport limits and load shedding), [`process`] (the process pool's
//! children), [`auth`] (bearer tokens),
//! [`tls`] (certificates), [`builtins`] (the shipped functions).

pub mod auth;
pub mod builtins;
pub mod clock;
pub mod command_functions;
pub mod ctx;
mod engine;
mod error;
pub mod function;
mod grpc;
pub mod job;
pub mod limits;
pub mod process;
pub mod server;
pub mod store;
pub mod tls;
pub mod units;

pub use clock::Clock;
pub use ctx::Ctx;
pub use engine::{
    CancelOutcome, Engine, EngineConfig, ReturnWhen, SubmitSpec, WaitSplit, WatchEvent,
    WatchEventKind, WatchFilter, WatchSpec,
};
pub use error::Error;
pub use function::{ArgsViolation, InvalidSchema, PoolKind, Registry};
pub use grpc::{JobService, WorkerService};
pub use job::{
    Finished, JobError, JobRecord, LogEntry, LogPage, LogStream, Outcome, PoolName, Progress,
};
pub use limits::ServerLimits;
pub use server::{Security, Serve, ServeError, serve};
pub use store::{Gone, ListFilter, ListPage, StoreConfig, StoreError};

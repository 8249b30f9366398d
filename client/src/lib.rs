//! Rust client for [jobd](https://example.invalid/jobd): submit named job
//! functions to a remote server and await their results, the way
//! `concurrent.futures` does in one process.
//!
//! ```no_run
//! # async fn run() -> Result<(), jobd_client::Error> {
//! use jobd_client::JobClient;
//!
//! let client = JobClient::connect("http://127.0.0.1:50051").await?;
//! let job = client.submit("hello", serde_json::json!("Ann")).await?;
//! println!("submitted {}", job.id());
//! let greeting = job.await?; // same as job.result().await
//! assert_eq!(greeting, "Hello, Ann!");
//! # Ok(()) }
//! ```
//!
//! A job that fails or is cancelled is reported as [`Error::JobFailed`] or
//! [`Error::Cancelled`]; every other variant means the request itself failed.
//! Use [`JobHandle::outcome`] to get a failed job's outcome as data instead.
//!
//! A server with TLS or tokens: [`JobClient::connect_with`] and
//! [`ConnectOptions`] (CA certificate, client certificate, bearer token).
//!
//! Many jobs at once: [`JobClient::wait`] and [`JobClient::as_completed`]
//! are `concurrent.futures.wait` and `as_completed`; [`JobClient::list_jobs`]
//! and [`JobClient::list_all`] list jobs, newest first, with filters.
//! [`JobClient::watch`] streams live events (state changes, progress, final
//! outcomes) for jobs or a filter, resumable by sequence number.
//! [`JobClient::map`] is `Executor.map`: one function over many arguments,
//! results in order (or as completed), with bounded jobs in flight.
//!
//! This crate's default `cli` feature builds the `jobctl` binary; library
//! users depend on it with `default-features = false` and pay for none of the
//! CLI's dependencies.

mod client;
mod connect;
mod error;
mod handle;
mod map;
mod retry;
mod sets;
mod watch;
mod wire;

pub use client::{FunctionInfo, JobClient, RpcClient, Submission};
pub use connect::{CallCredentials, ConnectOptions};
pub use error::Error;
pub use handle::{CancelReport, JobHandle, JobInfo, JobOutcome};
pub use jobd_proto::{JobId, JobState, pb};
pub use map::{MapItem, MapOptions, MapResults};
pub use sets::{JobPage, ListFilter, ReturnWhen, WaitResult};
pub use watch::{JobEvent, JobEventKind, Progress, ResumePoint, Watch};

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
//! [`JobClient::logs`] reads or follows a job's log.
//!
//! Every type in this API is the crate's own (or `jobd-proto`'s [`JobId`]
//! and [`JobState`]); the one way to the generated gRPC code is
//! [`JobClient::rpc`], the raw generated client, for calls this crate does
//! not wrap.
//!
//! Serving functions from a process of your own, on any machine: a
//! [`Worker`] attaches to jobd, runs the jobs of the functions it declared
//! and reports them, with the same [`Ctx`] jobd gives its own functions.
//!
//! This crate's default `cli` feature builds the `jobctl` binary; library
//! users depend on it with `default-features = false` and pay for none of the
//! CLI's dependencies.

// The modules form layers; each uses only the layers above it, so that the
// module graph is a DAG. The one pair that refers both ways is `client` and
// `handle`: a client makes handles, and a handle calls through its client.
//
// 1. `error`: the error enum and a failed job's kind.
// 2. `answer`, `request`: the library's own data types, no calls
//    (`request` names `answer::ResumePoint`).
// 3. `wire` (every pb <-> own-type conversion), `retry` (what is asked
//    again, and after which pause), `connect` (address, TLS, token).
// 4. `client` <-> `handle`: the connection, and one job.
// 5. `watch`, `map`, `sets`, `logs`: more `JobClient` calls, each on its
//    own stream or set of jobs.
// 6. `worker`: serving functions to jobd over the worker protocol. It uses
//    `connect`, `retry`, `wire` and `error`, never a `JobClient`; its own
//    pb conversions live in `worker::protocol`, as the job API's live in
//    `wire`, and nothing above it knows it exists.
mod answer;
mod client;
mod connect;
mod error;
mod handle;
mod logs;
mod map;
mod request;
mod retry;
mod sets;
mod watch;
mod wire;
mod worker;

pub use answer::{
    CancelOutcome, CancelReport, FunctionInfo, JobEvent, JobEventKind, JobInfo, JobOutcome,
    JobPage, LogEntry, LogPage, LogStream, MapItem, PoolKind, Progress, ResumePoint, WorkerInfo,
};
pub use client::{JobClient, RpcClient};
pub use connect::{CallCredentials, ConnectOptions};
pub use error::{Error, ErrorKind};
pub use handle::JobHandle;
pub use jobd_proto::{JobId, JobState};
pub use map::MapResults;
pub use request::{ListFilter, MapOptions, ReturnWhen, Submission, Watch};
pub use sets::WaitResult;
pub use worker::{Ctx, JobFailure, Worker};

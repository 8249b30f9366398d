//! The one test harness of the jobd workspace, shared by every test binary
//! (the end-to-end tests, the server's, the client's):
//!
//! - [`TestServer`]: a real jobd served in this process on `127.0.0.1:0`
//!   (bound before it serves, so no test sleeps before connecting), with
//!   its engine at hand; [`BlockingServer`] runs one on a runtime of its own
//!   for tests that block their thread on a child process;
//! - [`JobdProcess`]: the real `jobd` binary as a child process, for tests
//!   of flags, signals, crashes and restarts;
//! - [`fixtures`]: test functions that tell a test when they run, and what
//!   they observe;
//! - [`tools`]: the external tools some tests drive (grpcurl, Python's h2),
//!   which fail a test that cannot run, saying how to install them;
//! - [`pki`]: certificates made at test time;
//! - [`procs`]: processes as `/proc` shows them (children, groups, who is
//!   still alive), for the process pool's tests;
//! - [`proxy`]: a TCP proxy a test can partition or reset;
//! - [`time`]: a paused clock that moves only when the test moves it;
//! - [`worker`]: a worker that speaks the worker protocol message by
//!   message.

pub mod fixtures;
pub mod pki;
mod process;
pub mod procs;
pub mod proxy;
mod server;
pub mod time;
pub mod tools;
pub mod worker;

pub use fixtures::{Fixtures, Probe, config, registry};
pub use process::{
    JobdProcess, free_listen, job_count, refused_start, refused_start_output, seed_example,
    submit_noop, wait_exit,
};
pub use server::{BlockingServer, TestServer};

/// The `jobd` binary Cargo built for the calling package's tests (only the
/// server package's tests have one).
#[macro_export]
macro_rules! jobd_binary {
    () => {
        env!("CARGO_BIN_EXE_jobd")
    };
}

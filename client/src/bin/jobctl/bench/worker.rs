//! `jobctl bench --worker-slots N`: the remote worker the bench starts, so
//! that the jobs it measures are served over the worker protocol instead
//! of by jobd's own pools.
//!
//! The worker is this same binary as a child process (`jobctl worker
//! --noop FUNCTION --concurrency N`), not a task in this process: a
//! worker's costs (its connection, its runtime, the job round trips) then
//! land where a real worker's would, and the bench measures the protocol,
//! not a shortcut. The child is stopped the way an operator stops a worker,
//! with SIGTERM (through kill(1): the workspace forbids unsafe code), and
//! waited for.

use std::{
    ffi::OsString,
    process::{Child, ExitStatus, Stdio},
    time::Duration,
};

use jobd_client::{JobClient, PoolKind};
use tokio::task::JoinHandle;

use crate::failure::Failure;

/// How long the worker has to attach and declare its function.
const ATTACH_LIMIT: Duration = Duration::from_secs(30);

/// How often the bench asks jobd whether the worker serves the function
/// yet: jobd has no event for it, and a worker attaches in milliseconds.
const POLL: Duration = Duration::from_millis(50);

/// The drain the bench gives the worker when it stops it: its jobs are
/// no-ops, so anything still running after this is stuck.
const WORKER_GRACE_SECS: &str = "5";

/// How long the worker has to exit after SIGTERM (its grace and a margin)
/// before it is killed.
const EXIT_LIMIT: Duration = Duration::from_secs(15);

/// A running `jobctl worker` child.
pub(crate) struct WorkerChild {
    pid: u32,
    /// The child's exit, awaited on a blocking thread (`Child::wait`).
    exited: JoinHandle<std::io::Result<ExitStatus>>,
    /// Set once the child has exited or been stopped: until then, dropping
    /// this (a bench that failed half-way) sends it SIGTERM, so that no
    /// worker outlives its bench.
    gone: bool,
}

impl Drop for WorkerChild {
    fn drop(&mut self) {
        if !self.gone {
            // Not awaited: the worker drains and exits on its own.
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &self.pid.to_string()])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// What the worker child needs besides its function and slots: the
/// connection flags of this jobctl (address, TLS, token file), which it
/// takes as they were given.
pub(crate) type Flags = Vec<OsString>;

impl WorkerChild {
    /// Starts `jobctl worker --noop FUNCTION --concurrency SLOTS` with
    /// `flags`. Its stdout is dropped; its stderr is this process's, so
    /// that its warnings and its one-line error (if jobd refuses it) are
    /// seen. Its log stays at `warn` unless RUST_LOG says otherwise.
    pub(crate) fn start(flags: &Flags, function: &str, slots: u32) -> Result<Self, Failure> {
        let exe = std::env::current_exe().map_err(|error| Failure::BenchWorker {
            reason: format!("cannot find this jobctl's own binary: {error}"),
        })?;
        let mut command = std::process::Command::new(exe);
        command
            .args(flags)
            .args(["worker", "--name", "jobctl-bench", "--noop", function])
            .args(["--concurrency", &slots.to_string()])
            .args(["--grace", WORKER_GRACE_SECS])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        if std::env::var_os("RUST_LOG").is_none() {
            command.env("RUST_LOG", "warn");
        }
        let mut child: Child = command.spawn().map_err(|error| Failure::BenchWorker {
            reason: format!("cannot start `jobctl worker`: {error}"),
        })?;
        let pid = child.id();
        let exited = tokio::task::spawn_blocking(move || child.wait());
        Ok(Self {
            pid,
            exited,
            gone: false,
        })
    }

    pub(crate) fn pid(&self) -> u32 {
        self.pid
    }

    /// Waits until jobd lists `function` as served by at least one worker,
    /// at most [`ATTACH_LIMIT`]; fails at once if the worker exits first
    /// (jobd refused it: its own error line is on stderr already).
    pub(crate) async fn wait_served(
        &mut self,
        client: &JobClient,
        function: &str,
    ) -> Result<(), Failure> {
        let served = async {
            loop {
                let functions = client.functions().await?;
                if functions
                    .iter()
                    .any(|f| f.name == function && f.pool_kind == PoolKind::Worker && f.workers > 0)
                {
                    return Ok::<(), Failure>(());
                }
                tokio::time::sleep(POLL).await;
            }
        };
        tokio::select! {
            served = tokio::time::timeout(ATTACH_LIMIT, served) => served.unwrap_or_else(|_| {
                Err(Failure::BenchWorker {
                    reason: format!(
                        "jobd did not list {function:?} as served by a worker within {}s",
                        ATTACH_LIMIT.as_secs()
                    ),
                })
            }),
            exited = &mut self.exited => {
                self.gone = true;
                Err(Failure::BenchWorker {
                    reason: format!("`jobctl worker` stopped before serving: {}", describe(exited)),
                })
            }
        }
    }

    /// Stops the worker with SIGTERM and waits for it (killing it if it
    /// does not exit in time). Its exit, in words, when it was not a clean
    /// one.
    pub(crate) async fn stop(mut self) -> Option<String> {
        if self.gone {
            return None;
        }
        if let Err(reason) = signal(self.pid, "TERM").await {
            return Some(reason);
        }
        self.gone = true;
        match tokio::time::timeout(EXIT_LIMIT, &mut self.exited).await {
            Ok(Ok(Ok(status))) if status.success() => None,
            Ok(exited) => Some(describe(exited)),
            Err(_) => {
                let _ = signal(self.pid, "KILL").await;
                let _ = (&mut self.exited).await;
                Some(format!(
                    "it did not exit within {}s of SIGTERM and was killed",
                    EXIT_LIMIT.as_secs()
                ))
            }
        }
    }
}

/// Sends `SIG` to `pid` through kill(1), on a blocking thread.
async fn signal(pid: u32, signal: &'static str) -> Result<(), String> {
    let status = tokio::task::spawn_blocking(move || {
        std::process::Command::new("kill")
            .args([format!("-{signal}"), pid.to_string()])
            .stderr(Stdio::null())
            .status()
    })
    .await;
    match status {
        Ok(Ok(status)) if status.success() => Ok(()),
        Ok(Ok(status)) => Err(format!("kill -{signal} {pid} failed ({status})")),
        Ok(Err(error)) => Err(format!("cannot run kill: {error}")),
        Err(error) => Err(format!("cannot run kill: {error}")),
    }
}

/// A child's exit as the blocking wait reported it, in words.
fn describe(exited: Result<std::io::Result<ExitStatus>, tokio::task::JoinError>) -> String {
    match exited {
        Ok(Ok(status)) => format!("it ended with {status}"),
        Ok(Err(error)) => format!("cannot wait for it: {error}"),
        Err(error) => format!("cannot wait for it: {error}"),
    }
}

//! `jobctl`: the command line for jobd. Submit jobs, wait for their results,
//! ask whether they are done, inspect and cancel them, list functions.
//!
//! Module map: `cli` (the command line and what its words mean), `commands`
//! (one server call per command), `output` (text and JSON answers), `waiting`
//! (spinner or progress bar, and Ctrl-C, while blocked on a job), `watch`
//! (live events of jobs), `sets` (wait, list and delete: the commands about
//! many jobs), `map` (stdin lines through one Map stream), `bench` (load and
//! measurement), `worker` (this process serving functions to jobd),
//! `workers` (the workers attached to jobd), `failure` (exit codes and
//! one-line error messages).
//!
//! Errors are a typed [`failure::Failure`] rather than `anyhow::Error`: the
//! exit code depends on what went wrong, and that is a match on a type, not a
//! search through a chain.

mod bench;
mod cli;
mod commands;
mod failure;
mod logs;
mod map;
mod output;
mod sets;
mod waiting;
mod watch;
mod worker;
mod workers;

use std::{
    io::{IsTerminal as _, Write as _},
    process::ExitCode,
};

use clap::{Parser as _, error::ErrorKind};

/// `jobctl bench` shares the machine with the server it measures: the less
/// CPU it spends per request, the more the figures are the server's. mimalloc
/// costs less than glibc's malloc for its many small per-request buffers.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = match cli::Cli::try_parse() {
        Ok(cli) => cli,
        // --help, --version, and a bare `jobctl` (which shows the help): clap
        // prints them as they are meant to look.
        Err(error)
            if !error.use_stderr()
                || error.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand =>
        {
            error.exit()
        }
        Err(error) => {
            let _ = writeln!(std::io::stderr(), "{}", failure::usage_line(&error));
            // 2, as clap itself would exit.
            return ExitCode::from(u8::try_from(error.exit_code()).unwrap_or(2));
        }
    };
    init_logging(&cli.command);

    let runtime = match runtime_for(&cli.command) {
        Ok(runtime) => runtime,
        Err(error) => {
            // Not a job failure, but nothing more specific fits; it means the
            // machine is out of threads or file descriptors.
            let _ = writeln!(
                std::io::stderr(),
                "jobctl: cannot start the async runtime: {error}"
            );
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(commands::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            tracing::debug!(?failure, "command failed");
            if let Some(message) = failure.message() {
                // Not eprintln!, which panics if stderr is closed.
                let _ = writeln!(std::io::stderr(), "{message}");
            }
            failure.exit_code()
        }
    }
}

/// The async runtime a command needs. One connection and one request at a
/// time: a single thread is plenty. `bench` keeps hundreds of requests in
/// flight and would measure jobctl instead of jobd on one thread, and
/// `worker` runs many jobs at once, so they get one worker per core.
fn runtime_for(command: &cli::Command) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = match command {
        cli::Command::Bench(_) | cli::Command::Worker(_) => {
            tokio::runtime::Builder::new_multi_thread()
        }
        _ => tokio::runtime::Builder::new_current_thread(),
    };
    builder.enable_all().build()
}

/// Logs to stderr, filtered by RUST_LOG. The default is `warn`: jobctl's
/// answers are its output, and logging is for finding out why they are
/// wrong. A worker has no answers: what it tells (attached, reconnecting,
/// draining) is its log, so the worker library logs at `info` by default.
/// A malformed RUST_LOG falls back to the default rather than failing the
/// command.
fn init_logging(command: &cli::Command) {
    let default = match command {
        cli::Command::Worker(_) => "warn,jobd_client=info",
        _ => "warn",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only where a terminal will interpret them.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

//! Child processes for the process pool: the call a program makes at the
//! top of its `main` so that it can serve as a child, and the protocol
//! between the server and its children.
//!
//! The process pool runs jobs in child processes of the server, one job at
//! a time per child, so that a job that crashes, aborts, leaks, loops or
//! overflows its stack costs one child and never the server, and so that a
//! cancel or a time limit can stop it for sure: the child's whole process
//! group gets SIGTERM, a grace, then SIGKILL. Functions registered with
//! [`Registry::register_process`](crate::Registry::register_process) run
//! only there; async and blocking functions run there when a Submit asks
//! for the `process` pool.
//!
//! A child is the server's own program run again (like the spawn start
//! method of Python's multiprocessing): a Rust closure cannot be sent to
//! another process, but its name can, and the child finds the function by
//! name in a registry it builds itself. So the program must let the child
//! take over before it does anything else, which is what
//! [`run_child_if_requested`] is for, like multiprocessing's
//! `freeze_support()`:
//!
//! ```no_run
//! fn registry() -> jobd::Registry {
//!     let mut registry = jobd::builtins::registry();
//!     registry.register_process("parse", "Parses untrusted input", |_ctx, args| Ok(args));
//!     registry
//! }
//!
//! fn main() {
//!     // In a child of the process pool this serves jobs and exits; in the
//!     // server it returns at once.
//!     jobd::process::run_child_if_requested(registry);
//!     // ... build the runtime, `Engine::start(registry(), config)`, serve.
//! }
//! ```
//!
//! A child knows nothing of the store, the engine or the network: it gets
//! a function's name, an argument, and the job's id and attempt, and
//! answers with the outcome, progress and log lines. Its stdin and stdout
//! carry the protocol (moved to private descriptors at start, so what a
//! job prints goes to stderr, which the server keeps in the job's log).

mod child;
pub(crate) mod protocol;

use std::io::Write as _;

use crate::Registry;

/// The exit code of a child that could not serve (see `sysexits.h`'s
/// `EX_SOFTWARE`).
const EXIT_CANNOT_SERVE: i32 = 70;

/// In a child of the process pool, serves jobs with the functions of the
/// registry `registry` builds, and exits; in any other process, returns at
/// once without calling `registry`.
///
/// Call it first thing in `main`, before any thread, runtime or server is
/// started: the process pool starts its children by running this program
/// again (or the program [`EngineConfig::process_program`] names) with a
/// marker argument, and a program that did not make the call would go on
/// as if it were the server. The registry must hold the functions the
/// server sends to the pool under the same names; building it from the
/// same function as the server's registry is the simple way.
///
/// The child sets the limits the server passes (the address-space limit of
/// `--process-memory-limit`) on itself before it builds the registry, and
/// ends when the server closes the conversation or goes away; a job still
/// running then is killed with its whole process group.
///
/// [`EngineConfig::process_program`]: crate::EngineConfig::process_program
pub fn run_child_if_requested(registry: impl FnOnce() -> Registry) {
    if std::env::args_os().nth(1).as_deref() != Some(protocol::CHILD_FLAG.as_ref()) {
        return;
    }
    let code = match child::serve(registry) {
        Ok(()) => 0,
        Err(err) => {
            // Not eprintln!, which panics if stderr is closed.
            let _ = writeln!(std::io::stderr(), "jobd process-pool child: {err}");
            EXIT_CANNOT_SERVE
        }
    };
    std::process::exit(code);
}

//! How jobd runs a program for a job, written once for every caller: a
//! remote worker serving a function by running a command per job
//! (`jobctl worker --exec NAME=COMMAND`) and jobd's own command functions.
//!
//! A program run here is argv words handed to `execve`, never a shell
//! line ([`split_command_line`], [`Template`]); it starts with an empty
//! environment unless the spec says otherwise; its stdin gets the job's
//! input and is closed; its stdout and stderr are read with bounded memory;
//! and a cancel or a time limit stops its whole process group (SIGTERM, a
//! grace, SIGKILL) before [`run`] returns, so no process or zombie is left
//! behind. [`Finished::into_outcome`] turns the run into a job's result or
//! failure.
//!
//! ```
//! use jobd_command::{CommandSpec, ResultMode, run, split_command_line};
//! use serde_json::json;
//! use tokio_util::sync::CancellationToken;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let argv = split_command_line("tr a-z A-Z")?;
//! let spec = CommandSpec::from_argv(argv).expect("one word at least")
//!     .inherit_path(true)
//!     .stdin(r#""shout""#);
//! let finished = run(spec, &CancellationToken::new()).await?;
//! assert_eq!(finished.into_outcome(ResultMode::Json)?, json!("SHOUT"));
//! # Ok(()) }
//! ```
//!
//! Architecture invariants:
//! - This crate knows nothing of jobd: it depends on neither the server nor
//!   the client, and names no gRPC or job type. Its callers map a
//!   [`Finished`] onto their own jobs.
//! - No shell anywhere: nothing here interprets `;`, `$`, globs or quotes
//!   in a value; a template's placeholder is always one argv element.
//! - Everything is bounded: kept output (head of stdout, tail of stderr),
//!   line lengths, the line sink (never waited on), and every wait while a
//!   group is stopped.
//! - Unix only: process groups and signals are the mechanism.
//!
//! Resource limits (address space, CPU time, open files) are set before
//! the program runs, by a small re-exec helper ([`exec_if_helper`]), since
//! setting them between `fork` and `exec` would need `unsafe`.

// Layers: `argv` and `template` (words), `spec` and `ending` (data),
// `output`, `group` and `limits` (mechanisms), `run` (uses all of them),
// `stop` (the group stop of `run`, for children spawned elsewhere),
// `outcome` (reads what `run` returns).
mod argv;
mod ending;
mod group;
mod limits;
mod outcome;
mod output;
mod run;
mod spec;
mod stop;
mod template;

pub use argv::{SplitError, split_command_line};
pub use ending::{Ending, Exit, GroupCleanup, Signal};
pub use limits::{HELPER_ARG, Limits, exec_if_helper, probe_helper};
pub use outcome::{Failure, ResultMode, UnknownResultMode};
pub use run::{Finished, RunError, SpawnError, run};
pub use spec::{
    CommandSpec, DEFAULT_KILL_GRACE, DEFAULT_MAX_OUTPUT, DEFAULT_STDERR_TAIL, MAX_LINE, OutputLine,
    Stream,
};
pub use stop::{GroupStop, ProcessGroup};
pub use template::{Template, TemplateError};

//! How jobd runs a program for a job, written once for every caller: a
//! remote worker serving a function by running a command per job
//! (`jobctl worker --exec NAME=COMMAND`) and jobd's own command functions.
//!
//! A program run here is argv words handed to `execve`, never a shell
//! line: [`split_command_line`] turns a command line into those words, and
//! a [`Template`] fills `{name}` placeholders from a job's JSON arguments,
//! each value always exactly one argv element.
//!
//! Architecture invariants:
//! - This crate knows nothing of jobd: it depends on neither the server nor
//!   the client, and names no gRPC or job type.
//! - No shell anywhere: nothing here interprets `;`, `$`, globs or quotes
//!   in a value; a template's placeholder is always one argv element.

mod argv;
mod template;

pub use argv::{SplitError, split_command_line};
pub use template::{Template, TemplateError};

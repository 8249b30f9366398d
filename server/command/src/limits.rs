//! Resource limits for a program, set before it starts.
//!
//! Setting a limit in a child between `fork` and `exec` needs `pre_exec`,
//! which is `unsafe`, and the workspace forbids `unsafe`. Setting it from
//! the parent after the spawn (`prlimit`) leaves a window in which the
//! program runs unlimited. So the program is started through a helper: the
//! calling binary re-executed in a helper mode ([`exec_if_helper`], which
//! the binary calls first thing in `main`), which sets the limits on itself
//! and then `exec`s the program, which inherits them. The program never
//! runs a single instruction without its limits.

use std::{
    ffi::{OsStr, OsString},
    os::unix::process::CommandExt as _,
    path::PathBuf,
    time::Duration,
};

use rustix::process::{Resource, Rlimit, setrlimit};

/// The first argument that puts a binary in helper mode.
pub const HELPER_ARG: &str = "__jobd-command-limits";

/// Limits on a program, each enforced by the kernel (`setrlimit`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    /// Address space, in bytes (`RLIMIT_AS`): allocations past it fail, so
    /// most programs exit with an out-of-memory error.
    pub address_space: Option<u64>,
    /// CPU time (`RLIMIT_CPU`, whole seconds, at least 1): the program gets
    /// SIGXCPU when it is used, and SIGKILL a second later.
    pub cpu_time: Option<Duration>,
    /// Open file descriptors (`RLIMIT_NOFILE`).
    pub open_files: Option<u64>,
}

impl Limits {
    /// True when no limit is set.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// The helper's arguments for these limits, then `--`, the resolved
    /// program, its argv\[0\] and its arguments.
    pub(crate) fn helper_args(
        &self,
        resolved: &OsStr,
        argv0: &OsStr,
        args: &[OsString],
    ) -> Vec<OsString> {
        let mut out: Vec<OsString> = vec![HELPER_ARG.into()];
        if let Some(bytes) = self.address_space {
            out.push(format!("as={bytes}").into());
        }
        if let Some(cpu) = self.cpu_time {
            out.push(format!("cpu={}", cpu_seconds(cpu)).into());
        }
        if let Some(files) = self.open_files {
            out.push(format!("nofile={files}").into());
        }
        out.push("--".into());
        out.push(resolved.to_owned());
        out.push(argv0.to_owned());
        out.extend(args.iter().cloned());
        out
    }
}

/// Where a spec's program is started through the helper: the binary that
/// serves [`exec_if_helper`], and the limits it sets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Helper {
    pub(crate) binary: PathBuf,
    pub(crate) limits: Limits,
}

fn cpu_seconds(limit: Duration) -> u64 {
    limit.as_secs().max(1)
}

/// In a process started as the limits helper (its first argument is
/// [`HELPER_ARG`]): sets the limits its arguments name and `exec`s the
/// program; never returns. In any other process, returns at once. Call it
/// first thing in `main` of a binary that runs commands with limits.
///
/// # Examples
///
/// ```no_run
/// // First thing in `main`:
/// jobd_command::exec_if_helper();
/// // ... the program proper ...
/// ```
pub fn exec_if_helper() {
    let mut args = std::env::args_os().skip(1);
    if args.next().as_deref() != Some(OsStr::new(HELPER_ARG)) {
        return;
    }
    let mut args = args.peekable();
    if args.peek().map(OsString::as_os_str) == Some(OsStr::new(PROBE_ARG)) {
        println!("{PROBE_ANSWER}");
        std::process::exit(0);
    }
    let status = match helper(args) {
        Ok(never) => match never {},
        Err(message) => {
            eprintln!("jobd limits helper: {message}");
            // The code a shell gives a command it cannot run.
            127
        }
    };
    std::process::exit(status);
}

const PROBE_ARG: &str = "--probe";
const PROBE_ANSWER: &str = "jobd-command limits helper";
/// How long a probed binary may take to answer.
const PROBE_LIMIT: Duration = Duration::from_secs(5);

/// Checks that `binary` serves [`exec_if_helper`], so that a misconfigured
/// program fails at start, not on its first job: it must answer the probe
/// within 5 s (a binary that does something else instead is killed).
///
/// # Errors
///
/// Why the binary cannot be the helper, in a few words.
#[allow(
    clippy::disallowed_methods,
    reason = "runs once at start, before any runtime: a bounded wait on a child process"
)]
pub fn probe_helper(binary: &std::path::Path) -> Result<(), String> {
    let mut child = std::process::Command::new(binary)
        .args([HELPER_ARG, PROBE_ARG])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|err| format!("cannot start {}: {err}", binary.display()))?;
    let started = std::time::Instant::now();
    // Polled: a child's exit has no signal to wait on with a bound without
    // unsafe code; this runs once, at start.
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if started.elapsed() < PROBE_LIMIT => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Ok(None) | Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "{} did not answer as the limits helper (its main must call jobd_command::exec_if_helper first)",
                    binary.display()
                ));
            }
        }
    };
    let mut out = String::new();
    if let Some(mut stdout) = child.stdout.take() {
        use std::io::Read as _;
        let _ = stdout.read_to_string(&mut out);
    }
    if status.success() && out.trim() == PROBE_ANSWER {
        Ok(())
    } else {
        Err(format!(
            "{} is not the limits helper (its main must call jobd_command::exec_if_helper first)",
            binary.display()
        ))
    }
}

/// Sets the limits and `exec`s; returns only why it could not.
fn helper(mut args: impl Iterator<Item = OsString>) -> Result<std::convert::Infallible, String> {
    for arg in args.by_ref() {
        if arg == "--" {
            break;
        }
        let arg = arg.to_string_lossy().into_owned();
        let (name, value) = arg
            .split_once('=')
            .ok_or_else(|| format!("expected NAME=VALUE, got {arg:?}"))?;
        let value: u64 = value
            .parse()
            .map_err(|_| format!("{name}: {value:?} is not a whole number"))?;
        let (resource, limit) = match name {
            "as" => (
                Resource::As,
                Rlimit {
                    current: Some(value),
                    maximum: Some(value),
                },
            ),
            // The soft limit sends SIGXCPU; the hard one, a second on, kills.
            "cpu" => (
                Resource::Cpu,
                Rlimit {
                    current: Some(value),
                    maximum: Some(value.saturating_add(1)),
                },
            ),
            "nofile" => (
                Resource::Nofile,
                Rlimit {
                    current: Some(value),
                    maximum: Some(value),
                },
            ),
            other => return Err(format!("unknown limit {other:?}")),
        };
        setrlimit(resource, limit).map_err(|err| format!("cannot set {name}={value}: {err}"))?;
    }
    let program = args.next().ok_or("no program after --")?;
    let argv0 = args.next().ok_or("no argv[0] after the program")?;
    let err = std::process::Command::new(&program)
        .arg0(argv0)
        .args(args)
        .exec();
    Err(format!("cannot run {}: {err}", program.to_string_lossy()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn helper_arguments_name_each_limit_then_the_program() {
        let limits = Limits {
            address_space: Some(1 << 30),
            cpu_time: Some(Duration::from_millis(1500)),
            open_files: None,
        };
        let args = limits.helper_args(OsStr::new("/bin/echo"), OsStr::new("echo"), &["a b".into()]);
        assert_eq!(
            args,
            [
                HELPER_ARG,
                "as=1073741824",
                "cpu=1",
                "--",
                "/bin/echo",
                "echo",
                "a b"
            ]
        );
        assert!(Limits::default().is_empty());
    }
}

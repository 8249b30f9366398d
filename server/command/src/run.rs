//! Running one program to its end: spawn it as the leader of its own
//! process group, feed its stdin, read its outputs, and wait, while a
//! cancel or the time limit may stop it. However it ends, the run is not
//! over until its whole group is gone (SIGTERM, the grace, SIGKILL) and the
//! program is reaped, so a job never leaves a process or a zombie behind
//! in the runner.
//!
//! The run goes in three phases, with the pipes read throughout:
//! 1. wait for the first of: the program exits, the cancel token fires,
//!    the time limit passes;
//! 2. clean up the group: nothing to do if it is already gone; else
//!    SIGTERM, wait up to the grace for the group to be gone (reaping the
//!    program), SIGKILL, wait again (bounded);
//! 3. finish reading the pipes, bounded: once the group is gone only a
//!    process that left it can still hold them open.

use std::ffi::{OsStr, OsString};
use std::future::Future;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::pin::{Pin, pin};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use rustix::process::Signal as RawSignal;
use tokio::io::AsyncWriteExt;
use tokio::process::{Child, ChildStderr, ChildStdin, ChildStdout};
use tokio::time::{Instant, sleep_until, timeout};
use tokio_util::sync::CancellationToken;

use crate::ending::{Ending, Exit, GroupCleanup};
use crate::group::Group;
use crate::output::{Capture, Keep, Lines, drain};
use crate::spec::{CommandSpec, Stream};

/// How long a group has to be gone after SIGKILL, which cannot be caught:
/// only a process stuck in the kernel (uninterruptible I/O) takes longer.
const AFTER_KILL_WAIT: Duration = Duration::from_secs(2);
/// How long the pipes may stay open once the group is gone; only a process
/// that left the group (`setsid`) can hold them, and it is not waited for.
const PIPE_DRAIN_WAIT: Duration = Duration::from_secs(1);
/// The first and the longest pause between two looks at a stopping group:
/// a group's end has no event to wait for, so it is polled, quickly at
/// first (most programs die at once), then less often.
const FIRST_POLL: Duration = Duration::from_millis(1);
const MAX_POLL: Duration = Duration::from_millis(50);

/// A program's run, once it is over and its process group is gone.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Finished {
    /// The program's pid, which was also its process group id.
    pub pid: u32,
    /// How it ended.
    pub ending: Ending,
    /// Its stdout, at most the spec's `max_output` bytes (the first ones).
    pub stdout: Vec<u8>,
    /// Stdout bytes read past `max_output` and dropped; non-zero means the
    /// output was truncated.
    pub stdout_dropped: u64,
    /// The last bytes of its stderr, at most the spec's `stderr_tail`.
    pub stderr_tail: Vec<u8>,
    /// All stderr bytes it wrote.
    pub stderr_total: u64,
    /// Output lines the line sink had no room for.
    pub lines_dropped: u64,
    /// What had to be done to its process group.
    pub group: GroupCleanup,
    /// False when the pipes could not be read to their end: a process that
    /// left the group still held them after the group was gone, or a read
    /// failed. The output may then miss its last part.
    pub output_complete: bool,
    /// From spawn to the group gone.
    pub elapsed: Duration,
}

impl Finished {
    /// Whether stdout went past `max_output` (see
    /// [`Finished::stdout_dropped`]).
    #[must_use]
    pub fn stdout_truncated(&self) -> bool {
        self.stdout_dropped > 0
    }
}

/// Why a program could not be run to its end.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunError {
    /// The program could not be started; nothing ran.
    #[error("cannot start {program:?}: {reason}")]
    Spawn {
        /// The program as the spec named it.
        program: String,
        /// Why.
        reason: SpawnError,
    },
    /// Waiting for the program failed (something else in this process
    /// reaped it, or ignores SIGCHLD). Its group was sent SIGKILL.
    #[error("lost track of {program:?} (pid {pid}): {source}")]
    Wait {
        /// The program as the spec named it.
        program: String,
        /// Its pid.
        pid: u32,
        /// The error from `wait`.
        source: io::Error,
    },
}

/// Why a program could not be started.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SpawnError {
    /// A bare program name that no absolute `PATH` entry holds as an
    /// executable file.
    #[error("not found in PATH")]
    NotInPath,
    /// A bare program name, but the program gets no `PATH` (see
    /// [`CommandSpec::inherit_path`]).
    #[error("no PATH to look it up in (give a path with a '/', set PATH, or inherit it)")]
    NoPath,
    /// A program path that does not exist.
    #[error("{} does not exist", .0.display())]
    NotFound(PathBuf),
    /// A program that exists but is not an executable file.
    #[error("{} is not an executable file", .0.display())]
    NotExecutable(PathBuf),
    /// The working directory is missing or not a directory.
    #[error("working directory {}: {source}", dir.display())]
    WorkingDir {
        /// The directory the spec gave.
        dir: PathBuf,
        /// Why it cannot be used.
        source: io::Error,
    },
    /// The system refused to start it (for example `Exec format error`
    /// for a script without `#!`).
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Why phase 1 ended.
enum Stop {
    Exited(ExitStatus),
    Cancelled,
    TimedOut(Duration),
}

/// Runs the program `spec` describes until it ends, `cancel` fires or the
/// spec's time limit passes, and returns once its whole process group is
/// gone and it has been reaped.
///
/// On a cancel or the time limit (and when the program exits but leaves
/// processes of its group running), the group is sent SIGTERM, given the
/// spec's `kill_grace` to be gone, then sent SIGKILL. Processes that leave
/// the group (`setsid`, `setpgid`) are out of reach, as with any process
/// group. If the returned future is dropped before it completes, the group
/// is sent SIGKILL at once.
///
/// Stdout and stderr are read to their ends while the program runs, so it
/// never blocks on a full pipe. The stdin bytes are written, then stdin is
/// closed; a program that exits without reading all of it is not an error.
/// The program runs in a new process group, so a terminal's Ctrl-C reaches
/// the runner, which then decides (through `cancel`), not the program.
///
/// # Errors
///
/// [`RunError::Spawn`] when the program cannot be started (not found, not
/// executable, bad working directory): nothing ran. [`RunError::Wait`] if
/// the program could not be waited for. A program that fails, crashes or
/// is stopped is not an error: see [`Finished::ending`].
///
/// # Examples
///
/// ```
/// use jobd_command::{CommandSpec, Ending, run};
/// use tokio_util::sync::CancellationToken;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), jobd_command::RunError> {
/// let spec = CommandSpec::new("tr").args(["a-z", "A-Z"]).inherit_path(true).stdin("hello\n");
/// let finished = run(spec, &CancellationToken::new()).await?;
/// assert_eq!(finished.ending, Ending::Exited(0));
/// assert_eq!(finished.stdout, b"HELLO\n");
/// # Ok(()) }
/// ```
pub async fn run(spec: CommandSpec, cancel: &CancellationToken) -> Result<Finished, RunError> {
    let program = spec.program.to_string_lossy().into_owned();
    let CommandSpec {
        program: argv0,
        args,
        env,
        inherit_path,
        cwd,
        stdin,
        max_output,
        stderr_tail,
        timeout: limit,
        kill_grace,
        lines,
        helper,
    } = spec;

    let inherited = if inherit_path {
        std::env::var_os("PATH")
    } else {
        None
    };
    let path = program_path(&env, inherited.as_ref());
    let resolved = {
        let (argv0, path, cwd) = (argv0.clone(), path.clone(), cwd.clone());
        // A few stat calls, but file I/O all the same (a PATH entry may be
        // on a slow mount): keep it off the async workers.
        tokio::task::spawn_blocking(move || resolve(&argv0, path.as_deref(), cwd.as_deref()))
            .await
            .map_err(|join| SpawnError::Io(io::Error::other(join)))
            .and_then(|resolved| resolved)
    }
    .map_err(|reason| RunError::Spawn {
        program: program.clone(),
        reason,
    })?;

    let mut command = match &helper {
        // The helper sets the limits on itself, then becomes the program.
        Some(helper) => {
            let mut command = std::process::Command::new(&helper.binary);
            command.args(
                helper
                    .limits
                    .helper_args(resolved.as_os_str(), &argv0, &args),
            );
            command
        }
        None => {
            let mut command = std::process::Command::new(resolved);
            command.arg0(&argv0).args(&args);
            command
        }
    };
    command
        .env_clear()
        // A new process group led by the program: its pgid is its pid.
        .process_group(0)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(path) = inherited {
        command.env("PATH", path);
    }
    // After the inherited PATH, so that the spec's own PATH replaces it.
    command.envs(env);
    if let Some(dir) = &cwd {
        command.current_dir(dir);
    }
    let mut child = tokio::process::Command::from(command)
        .spawn()
        .map_err(|error| RunError::Spawn {
            program: program.clone(),
            reason: SpawnError::Io(error),
        })?;
    let started = Instant::now();
    let pid = child
        .id()
        .expect("a child that has not been waited for has a pid");
    let mut group = Group::led_by(pid).expect("a spawned child's pid is a valid pid");
    let lost = |source| RunError::Wait {
        program: program.clone(),
        pid,
        source,
    };

    let mut out = Capture {
        keep: Keep::head(max_output),
        lines: Lines::new(Stream::Stdout, lines.clone()),
    };
    let mut err = Capture {
        keep: Keep::tail(stderr_tail),
        lines: Lines::new(Stream::Stderr, lines),
    };
    let pipes = (child.stdin.take(), child.stdout.take(), child.stderr.take());

    let (stop, status, cleanup, output_complete) = {
        let io = pin!(pump(pipes, stdin, &mut out, &mut err));
        let mut io = Io {
            future: io,
            done: None,
        };

        // Phase 1.
        let deadline = limit.map(|limit| (started + limit, limit));
        let stop = io
            .alongside(first_stop(&mut child, cancel, deadline))
            .await
            .map_err(lost)?;
        let exited = match &stop {
            Stop::Exited(status) => Some(*status),
            Stop::Cancelled | Stop::TimedOut(_) => None,
        };

        // Phase 2.
        let (status, cleanup) = io
            .alongside(clean_up(&group, &mut child, exited, kill_grace))
            .await
            .map_err(lost)?;
        group.disarm();

        // Phase 3.
        let output_complete = match io.done {
            Some(complete) => complete,
            None => timeout(PIPE_DRAIN_WAIT, io.future.as_mut())
                .await
                .unwrap_or(false),
        };
        (stop, status, cleanup, output_complete)
    };

    let exit = status.map(Exit::from_status);
    let ending = match stop {
        Stop::Exited(status) => match Exit::from_status(status) {
            Exit::Code(code) => Ending::Exited(code),
            Exit::Signal(signal) => Ending::Signalled(signal),
        },
        Stop::Cancelled => Ending::Cancelled { exit },
        Stop::TimedOut(after) => Ending::TimedOut { after, exit },
    };
    let Keep::Head {
        bytes: stdout,
        dropped: stdout_dropped,
        ..
    } = out.keep
    else {
        unreachable!("stdout keeps its head")
    };
    let Keep::Tail {
        bytes: stderr_tail,
        total: stderr_total,
        ..
    } = err.keep
    else {
        unreachable!("stderr keeps its tail")
    };
    Ok(Finished {
        pid,
        ending,
        stdout,
        stdout_dropped,
        stderr_tail: Vec::from(stderr_tail),
        stderr_total,
        lines_dropped: out.lines.dropped + err.lines.dropped,
        group: cleanup,
        output_complete,
        elapsed: started.elapsed(),
    })
}

/// The pipes' future, kept running beside each phase until it is done.
struct Io<F> {
    future: F,
    /// Its result once done: whether both outputs were read to their end.
    done: Option<bool>,
}

impl<F: Future<Output = bool>> Io<Pin<&mut F>> {
    /// Runs `phase` to its end while the pipes go on being read.
    async fn alongside<T>(&mut self, phase: impl Future<Output = T>) -> T {
        let mut phase = pin!(phase);
        loop {
            tokio::select! {
                biased;
                result = &mut phase => return result,
                complete = self.future.as_mut(), if self.done.is_none() => {
                    self.done = Some(complete);
                }
            }
        }
    }
}

/// Writes `input` to stdin and closes it, and reads stdout and stderr to
/// their ends; true when both were read to the end.
async fn pump(
    (stdin, stdout, stderr): (Option<ChildStdin>, Option<ChildStdout>, Option<ChildStderr>),
    input: Vec<u8>,
    out: &mut Capture,
    err: &mut Capture,
) -> bool {
    let write = async move {
        if let Some(mut stdin) = stdin {
            // An error here means the program closed its stdin (EPIPE):
            // it did not want the rest, which is its business.
            let _ = stdin.write_all(&input).await;
            // Dropping `stdin` closes it: the program sees end of file.
        }
    };
    let read_out = async {
        match stdout {
            Some(pipe) => drain(pipe, out).await.is_ok(),
            None => true,
        }
    };
    let read_err = async {
        match stderr {
            Some(pipe) => drain(pipe, err).await.is_ok(),
            None => true,
        }
    };
    let ((), out_complete, err_complete) = tokio::join!(write, read_out, read_err);
    out_complete && err_complete
}

/// Phase 1: the first of exit, cancel and time limit.
async fn first_stop(
    child: &mut Child,
    cancel: &CancellationToken,
    deadline: Option<(Instant, Duration)>,
) -> io::Result<Stop> {
    let time_limit = async {
        match deadline {
            Some((at, limit)) => {
                sleep_until(at).await;
                limit
            }
            None => std::future::pending().await,
        }
    };
    // Biased toward the exit: a program that has already exited ended by
    // itself, whatever else happened meanwhile.
    tokio::select! {
        biased;
        status = child.wait() => status.map(Stop::Exited),
        () = cancel.cancelled() => Ok(Stop::Cancelled),
        limit = time_limit => Ok(Stop::TimedOut(limit)),
    }
}

/// Phase 2: makes sure nothing of the group is left alive and the program
/// is reaped. `status` is the program's exit status if it has already
/// been reaped.
pub(crate) async fn clean_up(
    group: &Group,
    child: &mut Child,
    mut status: Option<ExitStatus>,
    grace: Duration,
) -> io::Result<(Option<ExitStatus>, GroupCleanup)> {
    if status.is_some() && !group.alive().await {
        return Ok((status, GroupCleanup::Empty));
    }
    group.signal(RawSignal::TERM);
    if gone_by(group, child, &mut status, Instant::now() + grace).await? {
        return Ok((status, GroupCleanup::Terminated));
    }
    group.signal(RawSignal::KILL);
    if gone_by(group, child, &mut status, Instant::now() + AFTER_KILL_WAIT).await? {
        return Ok((status, GroupCleanup::Killed));
    }
    // A program still not reaped is handed to tokio, which reaps a dropped
    // child in the background once it exits.
    Ok((status, GroupCleanup::Lingering))
}

/// Waits until the program is reaped and no process of its group is alive,
/// or until `deadline`; true if both happened.
async fn gone_by(
    group: &Group,
    child: &mut Child,
    status: &mut Option<ExitStatus>,
    deadline: Instant,
) -> io::Result<bool> {
    let mut pause = FIRST_POLL;
    loop {
        if status.is_some() && !group.alive().await {
            return Ok(true);
        }
        let now = Instant::now();
        if now >= deadline {
            return Ok(false);
        }
        // The program's exit has an event (SIGCHLD); the rest of the
        // group's does not, so it is looked at again after a pause.
        let next_look = sleep_until((now + pause).min(deadline));
        tokio::select! {
            reaped = child.wait(), if status.is_none() => *status = Some(reaped?),
            () = next_look => pause = (pause * 2).min(MAX_POLL),
        }
    }
}

/// Finds the file to execute for `program`, the way `execvp` would in the
/// program's own environment, but with every surprise made an error.
/// The PATH the program will get, which is the one its name is looked up
/// in: its own, given in the spec, wins over an inherited one.
fn program_path(env: &[(OsString, OsString)], inherited: Option<&OsString>) -> Option<OsString> {
    env.iter()
        .find(|(name, _)| name == "PATH")
        .map(|(_, value)| value.clone())
        .or_else(|| inherited.cloned())
}

impl CommandSpec {
    /// Where the program would be found if it ran now, as [`run`] looks it
    /// up: a name with a `/` as a path (from the working directory), a bare
    /// name in the program's `PATH`. For checking a configuration before
    /// any job runs; [`run`] looks again each time. Blocking (a few
    /// `stat` calls).
    ///
    /// ```
    /// use jobd_command::{CommandSpec, SpawnError};
    ///
    /// assert!(CommandSpec::new("sh").inherit_path(true).find_program().is_ok());
    /// assert!(matches!(
    ///     CommandSpec::new("no-such-program-here").inherit_path(true).find_program(),
    ///     Err(SpawnError::NotInPath)
    /// ));
    /// ```
    ///
    /// # Errors
    ///
    /// Why it could not be started: not in `PATH`, no `PATH`, missing, not
    /// executable, or a missing working directory.
    pub fn find_program(&self) -> Result<PathBuf, SpawnError> {
        let inherited = if self.inherit_path {
            std::env::var_os("PATH")
        } else {
            None
        };
        let path = program_path(&self.env, inherited.as_ref());
        resolve(&self.program, path.as_deref(), self.cwd.as_deref())
    }
}

fn resolve(
    program: &OsStr,
    path: Option<&OsStr>,
    cwd: Option<&Path>,
) -> Result<PathBuf, SpawnError> {
    if let Some(dir) = cwd {
        match std::fs::metadata(dir) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => {
                return Err(SpawnError::WorkingDir {
                    dir: dir.to_owned(),
                    source: io::Error::from(io::ErrorKind::NotADirectory),
                });
            }
            Err(source) => {
                return Err(SpawnError::WorkingDir {
                    dir: dir.to_owned(),
                    source,
                });
            }
        }
    }
    if program.as_bytes().contains(&b'/') {
        let program = Path::new(program);
        // Relative to the program's working directory, made absolute, so
        // it means the same before and after the child changes directory.
        let file = if program.is_absolute() {
            program.to_owned()
        } else {
            let base = std::env::current_dir()?;
            match cwd {
                Some(dir) => base.join(dir).join(program),
                None => base.join(program),
            }
        };
        return match executable(&file) {
            Ok(true) => Ok(file),
            Ok(false) => Err(SpawnError::NotExecutable(file)),
            Err(error) if error.kind() == io::ErrorKind::NotFound => {
                Err(SpawnError::NotFound(file))
            }
            Err(error) => Err(SpawnError::Io(error)),
        };
    }
    if program.is_empty() {
        return Err(SpawnError::NotInPath);
    }
    let path = path.ok_or(SpawnError::NoPath)?;
    let mut not_executable = None;
    // Relative entries (and the empty one, which means ".") are skipped:
    // what runs must not depend on the directory the runner is in.
    for dir in std::env::split_paths(path).filter(|dir| dir.is_absolute()) {
        let file = dir.join(program);
        match executable(&file) {
            Ok(true) => return Ok(file),
            Ok(false) => {
                not_executable.get_or_insert(file);
            }
            Err(_) => {}
        }
    }
    Err(not_executable.map_or(SpawnError::NotInPath, SpawnError::NotExecutable))
}

/// Whether `file` is a regular file with an execute bit.
fn executable(file: &Path) -> io::Result<bool> {
    let meta = std::fs::metadata(file)?;
    Ok(meta.is_file() && meta.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use std::ffi::OsString;

    use super::*;

    #[test]
    fn resolve_looks_in_absolute_path_entries_only() {
        let path = OsString::from("relative:/nonexistent:/bin:/usr/bin");
        let found = resolve(OsStr::new("sh"), Some(&path), None).unwrap();
        assert!(found.is_absolute() && found.ends_with("sh"), "{found:?}");
        assert!(matches!(
            resolve(OsStr::new("sh"), Some(OsStr::new("bin:usr/bin")), None),
            Err(SpawnError::NotInPath)
        ));
        assert!(matches!(
            resolve(OsStr::new("sh"), None, None),
            Err(SpawnError::NoPath)
        ));
    }
}

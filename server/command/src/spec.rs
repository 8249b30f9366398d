//! What to run and under which limits: the one description both callers
//! (a remote worker's `--exec` and jobd's own command functions) fill in.
//! Every choice that matters for safety is a field with a stated default,
//! so a caller never inherits an environment, an unbounded buffer or an
//! unbounded wait by accident.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::mpsc;

/// The default cap on kept stdout: 1 MiB, jobd's default cap on a job's
/// result.
pub const DEFAULT_MAX_OUTPUT: usize = 1024 * 1024;
/// The default number of stderr bytes kept (the last ones).
pub const DEFAULT_STDERR_TAIL: usize = 4 * 1024;
/// The default wait between SIGTERM and SIGKILL.
pub const DEFAULT_KILL_GRACE: Duration = Duration::from_secs(5);
/// The longest line sent to a line sink; a longer one arrives as several
/// lines of at most this many bytes.
pub const MAX_LINE: usize = 64 * 1024;

/// A program to run: argv, environment, working directory, input, and the
/// bounds on its output and its time.
///
/// The environment starts **empty**: the program sees only the variables
/// given with [`CommandSpec::env`], plus this process's `PATH` when
/// [`CommandSpec::inherit_path`] says so. A job's program should not
/// depend on (or see the secrets in) the environment of the process that
/// runs it.
///
/// A program name without a `/` is looked up in the `PATH` the program
/// itself will get (an explicit `PATH` from [`CommandSpec::env`], else the
/// inherited one); with neither, only a name with a `/` can run. Relative
/// `PATH` entries are skipped, and a relative program path (`./tool`) is
/// taken relative to the working directory given here, so what runs never
/// depends on where the runner happens to be.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use jobd_command::CommandSpec;
///
/// let spec = CommandSpec::new("tr")
///     .args(["a-z", "A-Z"])
///     .inherit_path(true)
///     .env("LC_ALL", "C")
///     .stdin("hello\n")
///     .timeout(Duration::from_secs(30));
/// assert_eq!(spec.program(), "tr");
/// ```
#[derive(Debug, Clone)]
pub struct CommandSpec {
    /// argv\[0\]: the program as named (looked up at run time).
    pub(crate) program: OsString,
    /// argv\[1..\].
    pub(crate) args: Vec<OsString>,
    /// The whole environment the program sees (besides an inherited PATH).
    pub(crate) env: Vec<(OsString, OsString)>,
    /// Whether to add this process's PATH; off by default (clean env).
    pub(crate) inherit_path: bool,
    /// Where the program starts; this process's directory when `None`.
    pub(crate) cwd: Option<PathBuf>,
    /// Written to the program's stdin, which is then closed.
    pub(crate) stdin: Vec<u8>,
    /// Stdout bytes kept; the rest is read and counted, so the program
    /// never blocks on a full pipe.
    pub(crate) max_output: usize,
    /// Stderr bytes kept, the last ones (where the error usually is).
    pub(crate) stderr_tail: usize,
    /// Limit on the program's running time, from spawn.
    pub(crate) timeout: Option<Duration>,
    /// How long a stopped group has between SIGTERM and SIGKILL.
    pub(crate) kill_grace: Duration,
    /// Where every output line also goes, if anywhere (for job logs).
    pub(crate) lines: Option<mpsc::Sender<OutputLine>>,
}

impl CommandSpec {
    /// A spec that runs `program` with no arguments, an empty environment,
    /// empty stdin, and the default bounds ([`DEFAULT_MAX_OUTPUT`],
    /// [`DEFAULT_STDERR_TAIL`], [`DEFAULT_KILL_GRACE`], no timeout).
    #[must_use]
    pub fn new(program: impl Into<OsString>) -> Self {
        Self {
            program: program.into(),
            args: Vec::new(),
            env: Vec::new(),
            inherit_path: false,
            cwd: None,
            stdin: Vec::new(),
            max_output: DEFAULT_MAX_OUTPUT,
            stderr_tail: DEFAULT_STDERR_TAIL,
            timeout: None,
            kill_grace: DEFAULT_KILL_GRACE,
            lines: None,
        }
    }

    /// A spec for a whole argv (program first), as
    /// [`split_command_line`](crate::split_command_line) and
    /// [`Template::render`](crate::Template::render) return it; `None` when
    /// `argv` is empty.
    ///
    /// # Examples
    ///
    /// ```
    /// use jobd_command::{CommandSpec, split_command_line};
    ///
    /// let spec = CommandSpec::from_argv(split_command_line("tr a-z A-Z").unwrap()).unwrap();
    /// assert_eq!(spec.program(), "tr");
    /// assert!(CommandSpec::from_argv(Vec::<String>::new()).is_none());
    /// ```
    #[must_use]
    pub fn from_argv<A, S>(argv: A) -> Option<Self>
    where
        A: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        let mut argv = argv.into_iter();
        let program = argv.next()?;
        Some(Self::new(program).args(argv))
    }

    /// Appends one argument.
    #[must_use]
    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// Appends arguments.
    #[must_use]
    pub fn args<A, S>(mut self, args: A) -> Self
    where
        A: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Adds (or, for a name given twice, replaces) one environment
    /// variable; the environment holds nothing else unless
    /// [`CommandSpec::inherit_path`] adds `PATH`.
    #[must_use]
    pub fn env(mut self, name: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        let name = name.into();
        self.env.retain(|(existing, _)| *existing != name);
        self.env.push((name, value.into()));
        self
    }

    /// Whether the program gets this process's `PATH` (default: no). A
    /// `PATH` given with [`CommandSpec::env`] wins over the inherited one.
    #[must_use]
    pub fn inherit_path(mut self, inherit: bool) -> Self {
        self.inherit_path = inherit;
        self
    }

    /// The program's working directory (default: this process's).
    #[must_use]
    pub fn current_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.cwd = Some(dir.into());
        self
    }

    /// Bytes written to the program's stdin before it is closed (default:
    /// none, so stdin is at end of file at once). For a job, its arguments
    /// as JSON.
    #[must_use]
    pub fn stdin(mut self, bytes: impl Into<Vec<u8>>) -> Self {
        self.stdin = bytes.into();
        self
    }

    /// At most this many stdout bytes are kept (default
    /// [`DEFAULT_MAX_OUTPUT`]); the rest is read, counted and dropped
    /// ([`Finished::stdout_dropped`](crate::Finished::stdout_dropped)).
    #[must_use]
    pub fn max_output(mut self, bytes: usize) -> Self {
        self.max_output = bytes;
        self
    }

    /// The last this many stderr bytes are kept (default
    /// [`DEFAULT_STDERR_TAIL`]).
    #[must_use]
    pub fn stderr_tail(mut self, bytes: usize) -> Self {
        self.stderr_tail = bytes;
        self
    }

    /// Stops the program's process group once it has run this long
    /// (default: no limit); the result then says
    /// [`Ending::TimedOut`](crate::Ending::TimedOut).
    #[must_use]
    pub fn timeout(mut self, limit: Duration) -> Self {
        self.timeout = Some(limit);
        self
    }

    /// How long a group being stopped has between SIGTERM and SIGKILL
    /// (default [`DEFAULT_KILL_GRACE`]).
    #[must_use]
    pub fn kill_grace(mut self, grace: Duration) -> Self {
        self.kill_grace = grace;
        self
    }

    /// Also sends every line of stdout and stderr to `sink`, without ever
    /// waiting for room: a line that finds the channel full (or closed) is
    /// dropped and counted in
    /// [`Finished::lines_dropped`](crate::Finished::lines_dropped). Lines
    /// longer than [`MAX_LINE`] are split.
    #[must_use]
    pub fn lines(mut self, sink: mpsc::Sender<OutputLine>) -> Self {
        self.lines = Some(sink);
        self
    }

    /// The program, as named.
    #[must_use]
    pub fn program(&self) -> &std::ffi::OsStr {
        &self.program
    }
}

/// Which of the program's outputs a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// One line of a program's output, as a line sink receives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputLine {
    /// Where it came from.
    pub stream: Stream,
    /// The line without its `\n`, as the program wrote it: not
    /// necessarily UTF-8, at most [`MAX_LINE`] bytes. The last line has no
    /// `\n` to drop when the output did not end in one.
    pub bytes: Vec<u8>,
}

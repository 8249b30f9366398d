//! How a run ended, in words a job's failure message can use: an exit
//! code, a signal by name, or the runner's own reason for stopping the
//! program (a cancel or the time limit), kept apart from how the program
//! then died.

use std::fmt;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::time::Duration;

use rustix::process::Signal as RawSignal;

/// A Unix signal, by number, with its conventional name when it has one.
///
/// # Examples
///
/// ```
/// use jobd_command::Signal;
///
/// let kill = Signal::from_number(9);
/// assert_eq!(kill.name(), Some("SIGKILL"));
/// assert_eq!(kill.to_string(), "SIGKILL (9)");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Signal(i32);

/// The names of the signals POSIX defines, by their number on this
/// platform (numbers differ between architectures, names do not).
const NAMES: &[(RawSignal, &str)] = &[
    (RawSignal::HUP, "SIGHUP"),
    (RawSignal::INT, "SIGINT"),
    (RawSignal::QUIT, "SIGQUIT"),
    (RawSignal::ILL, "SIGILL"),
    (RawSignal::TRAP, "SIGTRAP"),
    (RawSignal::ABORT, "SIGABRT"),
    (RawSignal::BUS, "SIGBUS"),
    (RawSignal::FPE, "SIGFPE"),
    (RawSignal::KILL, "SIGKILL"),
    (RawSignal::USR1, "SIGUSR1"),
    (RawSignal::SEGV, "SIGSEGV"),
    (RawSignal::USR2, "SIGUSR2"),
    (RawSignal::PIPE, "SIGPIPE"),
    (RawSignal::ALARM, "SIGALRM"),
    (RawSignal::TERM, "SIGTERM"),
    (RawSignal::CHILD, "SIGCHLD"),
    (RawSignal::CONT, "SIGCONT"),
    (RawSignal::STOP, "SIGSTOP"),
    (RawSignal::TSTP, "SIGTSTP"),
    (RawSignal::TTIN, "SIGTTIN"),
    (RawSignal::TTOU, "SIGTTOU"),
    (RawSignal::URG, "SIGURG"),
    (RawSignal::XCPU, "SIGXCPU"),
    (RawSignal::XFSZ, "SIGXFSZ"),
    (RawSignal::VTALARM, "SIGVTALRM"),
    (RawSignal::PROF, "SIGPROF"),
    (RawSignal::WINCH, "SIGWINCH"),
    (RawSignal::IO, "SIGIO"),
    (RawSignal::SYS, "SIGSYS"),
];

impl Signal {
    /// SIGTERM, the polite stop.
    pub const TERM: Self = Self(RawSignal::TERM.as_raw());
    /// SIGKILL, the stop that cannot be refused.
    pub const KILL: Self = Self(RawSignal::KILL.as_raw());

    /// The signal with this number.
    #[must_use]
    pub fn from_number(number: i32) -> Self {
        Self(number)
    }

    /// Its number on this platform.
    #[must_use]
    pub fn number(self) -> i32 {
        self.0
    }

    /// Its conventional name (`"SIGSEGV"`), or `None` for one without a
    /// POSIX name (real-time signals, platform extras).
    #[must_use]
    pub fn name(self) -> Option<&'static str> {
        NAMES
            .iter()
            .find(|(signal, _)| signal.as_raw() == self.0)
            .map(|&(_, name)| name)
    }
}

impl fmt::Display for Signal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => write!(f, "{name} ({})", self.0),
            None => write!(f, "signal {}", self.0),
        }
    }
}

/// How the program's own process ended, as `wait` reported it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Exit {
    /// It exited with this code.
    Code(i32),
    /// A signal killed it.
    Signal(Signal),
}

impl From<ExitStatus> for Exit {
    fn from(status: ExitStatus) -> Self {
        Self::from_status(status)
    }
}

impl Exit {
    pub(crate) fn from_status(status: ExitStatus) -> Self {
        match (status.code(), status.signal()) {
            (Some(code), _) => Self::Code(code),
            (None, Some(signal)) => Self::Signal(Signal(signal)),
            // `wait` without WUNTRACED reports only these two; keep the
            // raw status rather than invent one.
            (None, None) => Self::Code(status.into_raw()),
        }
    }
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Code(code) => write!(f, "exited with code {code}"),
            Self::Signal(signal) => write!(f, "killed by signal {signal}"),
        }
    }
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Ending {
    /// The program exited by itself with this code.
    Exited(i32),
    /// A signal the runner did not send killed the program.
    Signalled(Signal),
    /// The cancel token fired and the runner stopped the process group.
    Cancelled {
        /// How the program then died; `None` if it could not be reaped
        /// even after SIGKILL (see [`GroupCleanup::Lingering`]).
        exit: Option<Exit>,
    },
    /// The spec's time limit passed and the runner stopped the process
    /// group.
    TimedOut {
        /// The limit.
        after: Duration,
        /// How the program then died, as for [`Ending::Cancelled`].
        exit: Option<Exit>,
    },
}

impl Ending {
    /// Whether the program exited by itself with code 0.
    #[must_use]
    pub fn success(&self) -> bool {
        *self == Self::Exited(0)
    }
}

impl fmt::Display for Ending {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exited(code) => Exit::Code(*code).fmt(f),
            Self::Signalled(signal) => Exit::Signal(*signal).fmt(f),
            Self::Cancelled { .. } => f.write_str("cancelled"),
            Self::TimedOut { after, .. } => write!(f, "timed out after {after:?}"),
        }
    }
}

/// What the runner had to do about the program's process group once the
/// program ended or was stopped. "Gone" means no live process: on Linux,
/// members that are already dead but wait for their parent (PID 1 or a
/// subreaper, for orphans) to reap them count as gone, since nothing but
/// that parent can remove them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum GroupCleanup {
    /// Nothing of the group was left when the program exited.
    Empty,
    /// The group was sent SIGTERM (to stop the run, or because the program
    /// left processes behind when it exited) and was gone within the
    /// grace.
    Terminated,
    /// Something in the group outlived the grace and was sent SIGKILL;
    /// then the group was gone.
    Killed,
    /// Even after SIGKILL (and a further wait) a process of the group was
    /// still alive, or could not be signalled (a setuid program). Nothing
    /// more can be done from here; the processes were left to the system.
    Lingering,
}

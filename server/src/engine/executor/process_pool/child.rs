//! One child process as the server sees it: spawned as the leader of its
//! own process group, greeted, handed one job at a time, watched while
//! idle, and stopped for sure (its whole group SIGTERM, grace, SIGKILL,
//! verified gone and reaped) when it must go.
//!
//! Its stdout carries the protocol (one JSON message per line, bounded);
//! its stderr is what its jobs print, kept line by line in the running
//! job's log, and the last of it names the cause when the child dies.

use std::{
    collections::VecDeque,
    io,
    os::fd::AsFd as _,
    path::PathBuf,
    process::Stdio,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use jobd_command::{Exit, GroupCleanup, ProcessGroup};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    process::{Child, ChildStderr, ChildStdin, ChildStdout},
    time::Instant,
};
use tokio_util::sync::CancellationToken;

use crate::{
    ctx::Reports,
    job::LogStream,
    process::protocol::{CHILD_FLAG, FromChild, ToChild, VERSION, encode},
    store::Claimed,
};

/// How long a new child may take to answer the hello: it is this program
/// starting again, which takes milliseconds; a loaded machine and a debug
/// build take longer, and a program that does not speak the protocol is
/// usually caught at once (it exits, or prints something else).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(20);

/// How long a retired child (its stdin closed) has to exit by itself before
/// it is stopped like a killed one.
const RETIRE_WAIT: Duration = Duration::from_secs(2);

/// After a child died, how long its last messages may take to be read.
const LAST_WORDS_WAIT: Duration = Duration::from_secs(1);

/// mimalloc's setting of how much address space it reserves at a time.
const ARENA_RESERVE: &str = "MIMALLOC_ARENA_RESERVE";

/// Bytes of stderr kept to say why a child died.
const STDERR_TAIL: usize = 2048;

/// The longest stderr line kept whole; a longer one is cut into lines of
/// this size, so a job that prints without newlines cannot grow the buffer.
const MAX_LINE: usize = 64 * 1024;

/// What the pool's children are started with.
#[derive(Debug, Clone)]
pub(crate) struct Spawn {
    /// The program to run (this one when `None`).
    pub(crate) program: Option<PathBuf>,
    pub(crate) memory_limit: Option<u64>,
    pub(crate) max_result_bytes: usize,
}

/// Why a child could not be started.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SpawnError {
    #[error("cannot find the program to run: {0}")]
    Program(io::Error),
    #[error("cannot start {program}: {source}")]
    Start { program: String, source: io::Error },
    #[error("{program} refused to serve: {reason}")]
    Refused { program: String, reason: String },
    #[error(
        "{program} does not speak the process pool's protocol ({what}); its `main` must call \
         jobd::process::run_child_if_requested first thing{stderr}"
    )]
    NotAChild {
        program: String,
        what: String,
        stderr: String,
    },
    #[error("{program} did not answer within {HANDSHAKE_TIMEOUT:?}")]
    Silent { program: String },
}

/// How a job on a child ended, as the child's owner must act on it.
#[derive(Debug)]
pub(crate) enum Ran {
    /// The child answered. `leftovers`: processes the job started are
    /// still running.
    Finished {
        outcome: crate::job::Outcome,
        leftovers: bool,
    },
    /// The job's cancel signal fired; the child must be stopped.
    Cancelled,
    /// The time limit passed; the child must be stopped.
    TimedOut(Duration),
    /// The child died, or broke the protocol, mid-job.
    Lost(Lost),
}

/// A child lost mid-job: why, in words, and how it ended if it did.
#[derive(Debug)]
pub(crate) struct Lost {
    pub(crate) reason: String,
    /// The child said an allocation failed.
    pub(crate) allocation_failed: bool,
}

impl Lost {
    fn broke(pid: u32, what: impl std::fmt::Display) -> Self {
        Self {
            reason: format!(
                "the child process running the job (pid {pid}) broke the protocol: {what}"
            ),
            allocation_failed: false,
        }
    }
}

/// What happened to an idle child.
#[derive(Debug)]
pub(crate) enum IdleEnd {
    /// It died.
    Died(Lost),
    /// It sent something it should not have.
    Broken(String),
}

/// A live child of the pool.
pub(crate) struct ChildProcess {
    child: Child,
    /// Its process group; SIGKILL to all of it if this is dropped before it
    /// was stopped.
    group: ProcessGroup,
    pid: u32,
    /// `None` once closed, which asks the child to leave.
    stdin: Option<ChildStdin>,
    frames: Frames,
    stderr: Stderr,
    /// Jobs it was given.
    pub(crate) jobs: u64,
    _counted: Counted,
}

impl ChildProcess {
    /// Starts a child and waits for its answer to the hello. `live` counts
    /// the pool's children.
    pub(crate) async fn spawn(spawn: &Spawn, live: &Arc<AtomicUsize>) -> Result<Self, SpawnError> {
        let program = match &spawn.program {
            Some(program) => program.clone(),
            None => std::env::current_exe().map_err(SpawnError::Program)?,
        };
        let name = program.display().to_string();
        let mut command = tokio::process::Command::new(&program);
        command
            .arg(CHILD_FLAG)
            // The leader of a new process group: one signal reaches
            // everything the child's jobs start, and a terminal's Ctrl-C
            // reaches the server, which then decides.
            .process_group(0)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if spawn.memory_limit.is_some() && std::env::var_os(ARENA_RESERVE).is_none() {
            // jobd's allocator, mimalloc, reserves 1 GiB of address space
            // at start by default, before the child can set its limit; a
            // smaller limit then faults its next reservation. Reserving a
            // little at a time keeps a limited child working (an operator's
            // own setting wins; other allocators ignore the variable).
            command.env(ARENA_RESERVE, "16MiB");
        }
        let mut child = command.spawn().map_err(|source| SpawnError::Start {
            program: name.clone(),
            source,
        })?;
        let group = ProcessGroup::led_by(&child).map_err(|source| SpawnError::Start {
            program: name.clone(),
            source,
        })?;
        let (Some(stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            unreachable!("all three are piped");
        };
        let mut process = Self {
            pid: group.pid(),
            child,
            group,
            stdin: Some(stdin),
            frames: Frames::new(stdout, spawn.max_result_bytes.saturating_add(1024 * 1024)),
            stderr: Stderr::new(stderr),
            jobs: 0,
            _counted: Counted::new(live),
        };
        match process.handshake(spawn, &name).await {
            Ok(()) => Ok(process),
            Err(err) => {
                process.stop(Duration::ZERO).await;
                Err(err)
            }
        }
    }

    async fn handshake(&mut self, spawn: &Spawn, program: &str) -> Result<(), SpawnError> {
        let hello = encode(&ToChild::Hello {
            version: VERSION,
            memory_limit: spawn.memory_limit,
            max_result_bytes: spawn.max_result_bytes,
        });
        // A program that is not a child may exit before reading: its
        // answer (or its exit) says more than the broken pipe would.
        if let Some(stdin) = &mut self.stdin {
            let _ = stdin.write_all(&hello).await;
        }
        let not_a_child = |what: String, stderr: &Stderr| SpawnError::NotAChild {
            program: program.to_owned(),
            what,
            stderr: stderr
                .last_words()
                .map(|w| format!("; it said: {w}"))
                .unwrap_or_default(),
        };
        let answer = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
            let mut discard = Discard;
            loop {
                tokio::select! {
                    frame = self.frames.next() => return frame,
                    () = self.stderr.read_into(&mut discard), if self.stderr.open => {}
                }
            }
        })
        .await;
        match answer {
            Ok(Ok(Some(FromChild::Ready {
                version: VERSION, ..
            }))) => Ok(()),
            Ok(Ok(Some(FromChild::Refused { reason }))) => Err(SpawnError::Refused {
                program: program.to_owned(),
                reason,
            }),
            Ok(Ok(Some(other))) => Err(not_a_child(format!("it answered {other:?}"), &self.stderr)),
            Ok(Ok(None)) => {
                // Its last words come on stderr, possibly just after stdout
                // closed.
                let exit = tokio::time::timeout(LAST_WORDS_WAIT, self.child.wait()).await;
                self.stderr.drain_now(&mut Discard);
                let what = match exit {
                    Ok(Ok(status)) => format!("it ended at once: {}", Exit::from(status)),
                    _ => "it closed its stdout".to_owned(),
                };
                Err(not_a_child(what, &self.stderr))
            }
            Ok(Err(err)) => Err(not_a_child(err.to_string(), &self.stderr)),
            Err(_) => Err(SpawnError::Silent {
                program: program.to_owned(),
            }),
        }
    }

    /// Its pid (the id of its process group too).
    pub(crate) fn pid(&self) -> u32 {
        self.pid
    }

    /// Runs the job `claimed` on this child: sends it, relays its progress,
    /// log lines and output to `reports`, and returns when the child
    /// answers, dies, or `cancel` or `limit` (counted from now) says stop.
    pub(crate) async fn run(
        &mut self,
        claimed: &Claimed,
        reports: &dyn Reports,
        cancel: &CancellationToken,
        limit: Option<Duration>,
    ) -> Ran {
        self.jobs += 1;
        self.stderr.tail.clear();
        let deadline = limit.map(|limit| (Instant::now() + limit, limit));
        let time_limit = async {
            match deadline {
                Some((at, limit)) => {
                    tokio::time::sleep_until(at).await;
                    limit
                }
                None => std::future::pending().await,
            }
        };
        let mut time_limit = std::pin::pin!(time_limit);
        let request = encode(&ToChild::Job {
            id: claimed.lease.job.to_string(),
            attempt: claimed.lease.attempt,
            function: claimed.function.to_string(),
            args: claimed.args.clone(),
        });
        let mut sink = JobLog(reports);
        let Some(stdin) = &mut self.stdin else {
            unreachable!("a child's stdin is closed only when it retires");
        };
        let sent = tokio::select! {
            biased;
            () = cancel.cancelled() => return Ran::Cancelled,
            limit = &mut time_limit => return Ran::TimedOut(limit),
            sent = stdin.write_all(&request) => sent,
        };
        if let Err(err) = sent {
            let what = format!("could not be sent the job ({err})");
            return Ran::Lost(self.death(&what, &mut sink).await);
        }
        loop {
            // Cancel and the time limit first: a child that floods its
            // messages must not be able to put off its own stop.
            let event = tokio::select! {
                biased;
                () = cancel.cancelled() => return Ran::Cancelled,
                limit = &mut time_limit => return Ran::TimedOut(limit),
                frame = self.frames.next() => Event::Frame(frame),
                () = self.stderr.read_into(&mut sink), if self.stderr.open => continue,
                _ = self.child.wait() => Event::Exited,
            };
            match event {
                Event::Frame(Ok(Some(FromChild::Done { outcome, leftovers }))) => {
                    // What the job wrote on stderr before it returned is in
                    // the pipe by now: it belongs to this job.
                    self.stderr.drain_now(&mut sink);
                    self.stderr.flush_partial(&mut sink);
                    return Ran::Finished {
                        outcome: outcome.into(),
                        leftovers,
                    };
                }
                Event::Frame(Ok(Some(message))) => {
                    if let Err(unexpected) = relay(message, reports) {
                        return Ran::Lost(Lost::broke(
                            self.pid,
                            format_args!("it sent {unexpected:?} during a job"),
                        ));
                    }
                }
                Event::Frame(Ok(None)) => {
                    return Ran::Lost(self.death("closed its output", &mut sink).await);
                }
                Event::Frame(Err(err)) => return Ran::Lost(Lost::broke(self.pid, err)),
                Event::Exited => return Ran::Lost(self.death("died", &mut sink).await),
            }
        }
    }

    /// Why the child is gone, once it is: its exit, and its last words on
    /// stderr. Reads what it still had to say first (bounded).
    async fn death(&mut self, what: &str, sink: &mut dyn LineSink) -> Lost {
        let status = tokio::time::timeout(LAST_WORDS_WAIT, self.child.wait()).await;
        self.stderr.drain_now(sink);
        self.stderr.flush_partial(sink);
        let exit = match status {
            Ok(Ok(status)) => Some(Exit::from(status)),
            _ => None,
        };
        let how = exit.map_or_else(|| what.to_owned(), |exit| exit.to_string());
        let mut reason = format!("the child process running the job (pid {}) {how}", self.pid);
        if let Some(words) = self.stderr.last_words() {
            reason.push_str(": ");
            reason.push_str(&words);
        }
        Lost {
            reason,
            allocation_failed: self.stderr.allocation_failed(),
        }
    }

    /// Waits while the child is idle, keeping what it prints in the
    /// server's log; returns only if it dies or sends what it should not.
    /// Cancel-safe: the pool drops it when a job arrives.
    pub(crate) async fn idle(&mut self) -> IdleEnd {
        let pid = self.pid;
        let mut log = IdleLog(pid);
        loop {
            let event = tokio::select! {
                frame = self.frames.next() => Event::Frame(frame),
                () = self.stderr.read_into(&mut log), if self.stderr.open => continue,
                _ = self.child.wait() => Event::Exited,
            };
            match event {
                // A thread a finished job left behind may still log: that
                // job has ended, and the lines are no one's.
                Event::Frame(Ok(Some(FromChild::Log { .. } | FromChild::Progress { .. }))) => {
                    tracing::debug!(pid, "an idle child sent log or progress lines; dropped");
                }
                Event::Frame(Ok(Some(other))) => {
                    return IdleEnd::Broken(format!("it sent {other:?} while idle"));
                }
                Event::Frame(Err(err)) => return IdleEnd::Broken(err.to_string()),
                Event::Frame(Ok(None)) => {
                    return IdleEnd::Died(self.death("closed its output", &mut log).await);
                }
                Event::Exited => return IdleEnd::Died(self.death("died", &mut log).await),
            }
        }
    }

    /// Stops the child and its whole process group: SIGTERM, up to `grace`
    /// for all of it to be gone, then SIGKILL; returns once it is gone and
    /// the child is reaped (or could not be, which is logged).
    pub(crate) async fn stop(self, grace: Duration) {
        let Self {
            mut child,
            group,
            pid,
            stdin,
            ..
        } = self;
        drop(stdin);
        match group.stop(&mut child, grace).await {
            Ok(stop) => match stop.cleanup {
                GroupCleanup::Lingering => tracing::warn!(
                    pid,
                    "a process of a process-pool child's group outlived SIGKILL; left to the system"
                ),
                cleanup => {
                    tracing::debug!(pid, ?cleanup, exit = ?stop.exit, "process-pool child stopped");
                }
            },
            Err(err) => {
                tracing::warn!(pid, %err, "cannot wait for a process-pool child; its group was sent SIGKILL");
            }
        }
    }

    /// Retires a healthy idle child: closes its stdin, so that it exits by
    /// itself, and stops it like a killed one if it does not within a
    /// moment.
    pub(crate) async fn retire(mut self, grace: Duration) {
        self.stdin = None;
        let _ = tokio::time::timeout(RETIRE_WAIT, self.child.wait()).await;
        self.stop(grace).await;
    }
}

/// What woke a child's watcher.
enum Event {
    Frame(Result<Option<FromChild>, FrameError>),
    Exited,
}

/// Passes a message of a running job on; the message back if it is not
/// one a running job may send.
fn relay(message: FromChild, reports: &dyn Reports) -> Result<(), FromChild> {
    match message {
        FromChild::Progress { fraction, message } => reports.progress(fraction, &message),
        FromChild::Log { stream, data } => reports.log(LogStream::from(stream), &data.into_vec()),
        other => return Err(other),
    }
    Ok(())
}

/// Counts a live child for as long as it lives.
struct Counted(Arc<AtomicUsize>);

impl Counted {
    fn new(live: &Arc<AtomicUsize>) -> Self {
        live.fetch_add(1, Ordering::AcqRel);
        Self(Arc::clone(live))
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The child's messages, one JSON line at a time, each at most `max` bytes.
struct Frames {
    reader: BufReader<ChildStdout>,
    /// The line read so far; kept across cancelled reads.
    line: Vec<u8>,
    max: usize,
}

/// A message that could not be read.
#[derive(Debug, thiserror::Error)]
enum FrameError {
    #[error("cannot read its messages: {0}")]
    Io(#[from] io::Error),
    #[error("a message of more than {0} bytes")]
    TooLong(usize),
    #[error("a message cut short by the end of its output")]
    Truncated,
    #[error("a message that is not one: {0}")]
    Invalid(serde_json::Error),
}

impl Frames {
    fn new(stdout: ChildStdout, max: usize) -> Self {
        Self {
            reader: BufReader::new(stdout),
            line: Vec::new(),
            max,
        }
    }

    /// The next message; `None` at the end of the output. Cancel-safe.
    async fn next(&mut self) -> Result<Option<FromChild>, FrameError> {
        loop {
            let buf = self.reader.fill_buf().await?;
            if buf.is_empty() {
                return if self.line.is_empty() {
                    Ok(None)
                } else {
                    Err(FrameError::Truncated)
                };
            }
            let (taken, done) = match buf.iter().position(|&b| b == b'\n') {
                Some(end) => (end + 1, true),
                None => (buf.len(), false),
            };
            self.line.extend_from_slice(&buf[..taken]);
            self.reader.consume(taken);
            if self.line.len() > self.max {
                return Err(FrameError::TooLong(self.max));
            }
            if done {
                let line = std::mem::take(&mut self.line);
                return serde_json::from_slice(&line)
                    .map(Some)
                    .map_err(FrameError::Invalid);
            }
        }
    }
}

/// Where complete stderr lines go.
trait LineSink: Send {
    fn line(&mut self, line: &[u8]);
}

/// A running job's log.
struct JobLog<'a>(&'a dyn Reports);

impl LineSink for JobLog<'_> {
    fn line(&mut self, line: &[u8]) {
        self.0.log(LogStream::Stderr, line);
    }
}

/// The server's own log, for what an idle child prints.
struct IdleLog(u32);

impl LineSink for IdleLog {
    fn line(&mut self, line: &[u8]) {
        let text = String::from_utf8_lossy(line);
        tracing::info!(pid = self.0, "idle process-pool child: {}", text.trim_end());
    }
}

/// Nowhere (the handshake keeps only the tail, to explain a failure).
struct Discard;

impl LineSink for Discard {
    fn line(&mut self, _line: &[u8]) {}
}

/// The child's stderr: read as it comes, cut into lines, the last bytes
/// kept to explain a death.
struct Stderr {
    pipe: ChildStderr,
    /// A line not yet ended.
    partial: Vec<u8>,
    /// The last bytes read during the current job.
    tail: VecDeque<u8>,
    /// False once the pipe reached its end (every process that had it is
    /// gone).
    open: bool,
}

impl Stderr {
    fn new(pipe: ChildStderr) -> Self {
        Self {
            pipe,
            partial: Vec::new(),
            tail: VecDeque::new(),
            open: true,
        }
    }

    /// Reads what is there (waiting for something) and passes complete
    /// lines on. Cancel-safe: a read either happened or did not.
    async fn read_into(&mut self, sink: &mut dyn LineSink) {
        let mut buf = [0; 8192];
        match self.pipe.read(&mut buf).await {
            Ok(0) | Err(_) => {
                self.open = false;
                self.flush_partial(sink);
            }
            Ok(n) => self.take(&buf[..n], sink),
        }
    }

    /// Reads, without waiting, whatever the pipe holds right now. It goes
    /// around tokio's readiness cache with a plain non-blocking read, so
    /// that bytes a child wrote before its last message are surely taken,
    /// even if the reactor has not reported them yet.
    fn drain_now(&mut self, sink: &mut dyn LineSink) {
        let mut buf = [0; 8192];
        while self.open {
            match rustix::io::read(self.pipe.as_fd(), &mut buf) {
                Ok(0) => self.open = false,
                Ok(n) => self.take(&buf[..n], sink),
                Err(rustix::io::Errno::INTR) => {}
                // EAGAIN: nothing more for now.
                Err(_) => break,
            }
        }
    }

    fn take(&mut self, mut bytes: &[u8], sink: &mut dyn LineSink) {
        self.tail
            .extend(&bytes[bytes.len().saturating_sub(STDERR_TAIL)..]);
        let excess = self.tail.len().saturating_sub(STDERR_TAIL);
        self.tail.drain(..excess);
        while let Some(end) = bytes.iter().position(|&b| b == b'\n') {
            if self.partial.is_empty() {
                sink.line(&bytes[..=end]);
            } else {
                self.partial.extend_from_slice(&bytes[..=end]);
                sink.line(&self.partial);
                self.partial.clear();
            }
            bytes = &bytes[end + 1..];
        }
        self.partial.extend_from_slice(bytes);
        while self.partial.len() >= MAX_LINE {
            let rest = self.partial.split_off(MAX_LINE);
            sink.line(&self.partial);
            self.partial = rest;
        }
    }

    /// Passes on a last line that has no newline.
    fn flush_partial(&mut self, sink: &mut dyn LineSink) {
        if !self.partial.is_empty() {
            sink.line(&self.partial);
            self.partial.clear();
        }
    }

    /// The line of stderr that best says why the child died (cut to 500
    /// bytes): the last one that is not part of a backtrace, if any.
    fn last_words(&self) -> Option<String> {
        let tail: Vec<u8> = self.tail.iter().copied().collect();
        let text = String::from_utf8_lossy(&tail);
        let last = text.lines().rfind(|line| {
            let trimmed = line.trim();
            // A Rust backtrace (RUST_BACKTRACE=1) follows the message that
            // matters: its frames are indented, its header and note are not.
            !trimmed.is_empty()
                && !line.starts_with(char::is_whitespace)
                && trimmed != "stack backtrace:"
                && !trimmed.starts_with("note: ")
        })?;
        let last = last.trim();
        let mut end = last.len().min(500);
        while !last.is_char_boundary(end) {
            end -= 1;
        }
        Some(last[..end].to_owned())
    }

    /// Whether the child said an allocation failed (Rust's message before
    /// it aborts).
    fn allocation_failed(&self) -> bool {
        let tail: Vec<u8> = self.tail.iter().copied().collect();
        String::from_utf8_lossy(&tail).contains("memory allocation of")
    }
}

/// The pool's own setting that explains a death, when the child's last
/// words point at it (Rust aborts with "memory allocation of N bytes
/// failed" when an allocation fails under the address-space limit).
pub(crate) fn memory_hint(lost: &Lost, memory_limit: Option<u64>) -> Option<String> {
    let limit = memory_limit?;
    lost.allocation_failed.then(|| {
        format!(
            "the child reached the process pool's limit of {limit} bytes of address space (--process-memory-limit)"
        )
    })
}

//! The child's side: take the protocol off stdin and stdout, set the
//! limits the server asked for, then run one job at a time until the
//! server closes the conversation (or dies).
//!
//! Everything here runs in the child process, which knows no store, no
//! engine and no network: it receives a function's name and argument and
//! answers with the outcome, progress and log lines.

use std::{
    fs::File,
    io::{self, BufRead as _, BufReader, Write as _},
    os::fd::AsFd as _,
    panic::AssertUnwindSafe,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
};

use futures::FutureExt as _;
use jobd_proto::JobId;
use tokio_util::sync::CancellationToken;

use super::protocol::{Bytes, FromChild, MAX_LOG_CHUNK, Stream, ToChild, VERSION, encode};
use crate::{
    Ctx, Registry,
    ctx::Reports,
    function::{Body, guarded, panicked},
    job::{JobError, LogStream, Outcome, cap_result},
};

/// Why a child could not serve; printed on its stderr (which the server
/// logs) before it exits.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ChildError {
    #[error("cannot take over stdin and stdout for the protocol: {0}")]
    Stdio(io::Error),
    #[error("the server said nothing (stdin closed before the hello)")]
    NoHello,
    #[error("cannot read the server's hello: {0}")]
    BadHello(String),
    #[error("cannot set the memory limit of {limit} bytes: {source}")]
    MemoryLimit { limit: u64, source: io::Error },
    #[error("cannot start the child's runtime: {0}")]
    Runtime(io::Error),
    #[error("cannot write to the server: {0}")]
    Write(io::Error),
}

/// Serves jobs until the server closes stdin. Returns only on an error
/// before the first job; afterwards the child ends from the stdin reader
/// (see [`read_requests`]).
pub(crate) fn serve(registry: impl FnOnce() -> Registry) -> Result<(), ChildError> {
    let (input, output) = take_stdio().map_err(ChildError::Stdio)?;
    let mut input = BufReader::new(input);
    let out = Arc::new(Output(Mutex::new(output)));

    let mut line = String::new();
    match input.read_line(&mut line) {
        Ok(0) => return Err(ChildError::NoHello),
        Ok(_) => {}
        Err(err) => return Err(ChildError::BadHello(err.to_string())),
    }
    let (memory_limit, max_result_bytes) = match serde_json::from_str(&line) {
        Ok(ToChild::Hello {
            version: VERSION,
            memory_limit,
            max_result_bytes,
        }) => (memory_limit, max_result_bytes),
        Ok(ToChild::Hello { version, .. }) => {
            let reason = format!(
                "the server speaks process protocol version {version}, this program {VERSION}: \
                 the children must run the same build of jobd as the server"
            );
            out.send(&FromChild::Refused {
                reason: reason.clone(),
            })?;
            return Err(ChildError::BadHello(reason));
        }
        Ok(ToChild::Job { .. }) => return Err(ChildError::BadHello("a job before hello".into())),
        Err(err) => return Err(ChildError::BadHello(err.to_string())),
    };
    if let Some(limit) = memory_limit
        && let Err(err) = limit_memory(limit)
    {
        out.send(&FromChild::Refused {
            reason: format!("cannot set the memory limit of {limit} bytes: {err}"),
        })?;
        return Err(ChildError::MemoryLimit { limit, source: err });
    }
    adopt_orphans();

    let registry = registry();
    // One worker thread: it drives the timers and I/O of async functions
    // and of a blocking function's `Ctx::sleep_blocking`, while the job
    // itself runs on the main thread.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("jobd-child-runtime")
        .enable_all()
        .build()
        .map_err(ChildError::Runtime)?;

    let busy = Arc::new(AtomicBool::new(false));
    // Room for one request: the server sends the next job only after this
    // one's `done`.
    let (requests, next) = mpsc::sync_channel(1);
    {
        let busy = Arc::clone(&busy);
        std::thread::Builder::new()
            .name("jobd-child-input".into())
            .spawn(move || read_requests(input, &requests, &busy))
            .map_err(ChildError::Runtime)?;
    }
    out.send(&FromChild::Ready {
        version: VERSION,
        pid: std::process::id(),
    })?;

    let reports: Arc<dyn Reports> = Arc::clone(&out) as Arc<dyn Reports>;
    while let Ok(request) = next.recv() {
        busy.store(true, Ordering::Release);
        let outcome = match request {
            Request::Job {
                id,
                attempt,
                function,
                args,
            } => {
                let ctx = Ctx::new(
                    id,
                    attempt,
                    // Never fired: a process job is not asked to stop, it
                    // is killed with its child.
                    CancellationToken::new(),
                    runtime.handle().clone(),
                    Arc::clone(&reports),
                );
                run(&registry, &runtime, &function, ctx, args)
            }
            Request::Bad(reason) => Err(JobError::failed(format!(
                "the child could not read the job: {reason}"
            ))),
        };
        // Checked here too: a result past the cap would not fit the frame
        // that carries it to the server.
        let outcome = cap_result(outcome, max_result_bytes);
        // What the function printed with `print!` waits in std's buffer:
        // it belongs to this job's log, so it goes out before the `done`.
        let _ = io::stdout().flush();
        let leftovers = reap_and_check_leftovers();
        out.send(&FromChild::Done {
            outcome: outcome.into(),
            leftovers,
        })?;
        busy.store(false, Ordering::Release);
    }
    Ok(())
}

/// A request as the main thread gets it from the reader thread.
enum Request {
    Job {
        id: JobId,
        attempt: u32,
        function: String,
        args: serde_json::Value,
    },
    /// A line that was not a job; answered as a failed job so that the
    /// conversation stays in step.
    Bad(String),
}

/// Runs one job on this thread, with panics caught.
fn run(
    registry: &Registry,
    runtime: &tokio::runtime::Runtime,
    function: &str,
    ctx: Ctx,
    args: serde_json::Value,
) -> Outcome {
    match registry.get(function).map(crate::function::Function::body) {
        Some(Body::Blocking(body) | Body::Process(body)) => {
            guarded(|| body(ctx, args)).and_then(|outcome| outcome)
        }
        Some(Body::Async(body)) => match guarded(|| body(ctx, args)) {
            Ok(job) => runtime.block_on(async move {
                AssertUnwindSafe(job)
                    .catch_unwind()
                    .await
                    .unwrap_or_else(|panic| Err(panicked(&*panic)))
            }),
            Err(panic) => Err(panic),
        },
        Some(Body::Worker) | None => Err(JobError::failed(format!(
            "function {function:?} is not registered in the process pool's child program \
             (it must build its registry with the same functions as the server)"
        ))),
    }
}

/// Reads the server's requests for the main thread. When the server closes
/// stdin (it retires this child, or it died), the child ends: at once if it
/// is idle and alone; otherwise with SIGKILL to its whole process group, so
/// a job whose server is gone cannot run on, nor leave processes behind.
fn read_requests(
    mut input: BufReader<File>,
    requests: &mpsc::SyncSender<Request>,
    busy: &AtomicBool,
) {
    let mut line = String::new();
    loop {
        line.clear();
        match input.read_line(&mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let request = match serde_json::from_str(&line) {
            Ok(ToChild::Job {
                id,
                attempt,
                function,
                args,
            }) => match id.parse() {
                Ok(id) => Request::Job {
                    id,
                    attempt,
                    function,
                    args,
                },
                Err(err) => Request::Bad(format!("job id {id:?}: {err}")),
            },
            Ok(ToChild::Hello { .. }) => Request::Bad("a second hello".into()),
            Err(err) => Request::Bad(err.to_string()),
        };
        if requests.send(request).is_err() {
            break;
        }
    }
    if busy.load(Ordering::Acquire) || reap_and_check_leftovers() {
        let _ = rustix::process::kill_current_process_group(rustix::process::Signal::KILL);
    }
    std::process::exit(0);
}

/// Where the child's messages go: the protocol pipe, one whole line at a
/// time (the job's own threads may log while the main thread reports).
struct Output(Mutex<File>);

impl Output {
    fn send(&self, message: &FromChild) -> Result<(), ChildError> {
        let line = encode(message);
        let mut out = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        out.write_all(&line).map_err(ChildError::Write)
    }
}

impl Reports for Output {
    fn progress(&self, fraction: f64, message: &str) {
        // JSON has no NaN; the server clamps the rest.
        let fraction = if fraction.is_nan() { 0.0 } else { fraction };
        // A server that cannot be written to is gone: the reader thread
        // ends this child.
        let _ = self.send(&FromChild::Progress {
            fraction,
            message: message.to_owned(),
        });
    }

    fn log(&self, stream: LogStream, data: &[u8]) {
        for chunk in data.chunks(MAX_LOG_CHUNK) {
            let _ = self.send(&FromChild::Log {
                stream: Stream::from(stream),
                data: Bytes::new(chunk),
            });
        }
    }
}

/// Moves the protocol off fds 0 and 1, which a job's code (and every
/// program it starts) would otherwise share: the protocol gets new,
/// close-on-exec descriptors; fd 1 becomes a copy of stderr, so what a job
/// prints lands in its log instead of corrupting the protocol; fd 0 reads
/// /dev/null.
fn take_stdio() -> io::Result<(File, File)> {
    use rustix::io::fcntl_dupfd_cloexec;
    // Above the standard three, so the copies never land on them.
    let input = File::from(fcntl_dupfd_cloexec(io::stdin().as_fd(), 3)?);
    let output = File::from(fcntl_dupfd_cloexec(io::stdout().as_fd(), 3)?);
    rustix::stdio::dup2_stdout(io::stderr().as_fd())?;
    rustix::stdio::dup2_stdin(File::open("/dev/null")?)?;
    Ok((input, output))
}

/// Sets the child's address-space limit (soft and hard, so a job cannot
/// raise it again).
fn limit_memory(bytes: u64) -> io::Result<()> {
    use rustix::process::{Resource, Rlimit, setrlimit};
    setrlimit(
        Resource::As,
        Rlimit {
            current: Some(bytes),
            maximum: Some(bytes),
        },
    )
    .map_err(io::Error::from)
}

/// Makes this child the reaper of every process its jobs start, even of
/// those whose parent exits (a shell's `sleep 1000 &`): they stay its
/// children, so after a job it can tell whether the job left anything
/// running ([`reap_and_check_leftovers`]). Linux only; elsewhere such
/// orphans go to init and are noticed only when the group is stopped.
fn adopt_orphans() {
    #[cfg(target_os = "linux")]
    {
        let me = rustix::process::getpid();
        if let Err(err) = rustix::process::set_child_subreaper(Some(me)) {
            // Not fatal: leftovers are then only found when the child is
            // stopped.
            let _ = writeln!(io::stderr(), "jobd child: cannot become a subreaper: {err}");
        }
    }
}

/// Reaps the child processes that have exited and says whether any is
/// still running. Called between jobs only, never while one runs (its code
/// may be waiting for its own children).
fn reap_and_check_leftovers() -> bool {
    use rustix::{
        io::Errno,
        process::{WaitOptions, waitpid},
    };
    loop {
        match waitpid(None, WaitOptions::NOHANG) {
            // Reaped one; look again.
            Ok(Some(_)) => {}
            // Children, none of them exited.
            Ok(None) => return true,
            Err(Errno::CHILD) => return false,
            Err(Errno::INTR) => {}
            // Cannot tell: say nothing is left rather than recycle.
            Err(_) => return false,
        }
    }
}

//! The command line as clap sees it, and what its raw words mean as values.
//!
//! Everything that can be wrong with the words alone (a malformed job id, a
//! label without `=`, a negative timeout) is rejected here, so clap reports it
//! as a usage error with exit code 2 before any connection is made.

use std::{
    num::{NonZeroU32, NonZeroU64},
    path::PathBuf,
    time::Duration,
};

use clap::{Args, Parser, Subcommand, ValueEnum};
use jobd_client::{JobId, Submission};

const LONG_ABOUT: &str = "\
jobctl: submit jobs to a jobd server and wait for their results.

jobd runs named job functions (see `jobctl functions`) on its async and
blocking pools, like Python's concurrent.futures across the network. `submit`
answers with a job id at once; `result`, `done`, `status` and `cancel` ask
about that job later, from any shell.

Examples:
  jobctl submit hello Ann              prints the new job's id
  jobctl result <id>                   waits, then prints: Hello, Ann!
  jobctl submit --wait hello Ann       submits and waits in one step
  jobctl submit echo a 1 '{\"x\":2}'     several arguments become [\"a\",1,{\"x\":2}]
  jobctl submit sleep 30 --label team=infra
  jobctl submit resize img.png --worker-label gpu=true   only on workers labelled gpu=true
  jobctl done <id>                     true or false, without waiting
  jobctl result <id> --timeout 0.5     gives up (exit 3) if not done in 0.5 s
  jobctl cancel <id>
  jobctl wait <id> <id> --return-when first    which finished first
  jobctl list --state failed --limit 20
  jobctl delete <id>                   forget a finished job
  seq 1000 | jobctl map echo           one job per line, results in order
  jobctl -o json status <id>           the whole job as one JSON object
  jobctl bench --mode roundtrip        jobs/s and latency, next to the gRPC floor
  jobctl worker --noop my.noop --concurrency 8   serve a function from this process
  jobctl workers                       the workers attached to jobd
  JOBD_ADDR=http://10.0.0.7:50051 jobctl functions
  jobctl --addr https://jobd.example:50051 --ca-cert ca.pem --token-file ~/.jobd-token list
  JOBD_TOKEN=$(cat token) jobctl --addr https://jobd.example:50051 functions";

const AFTER_LONG_HELP: &str = "\
Exit codes:
    0  success
    1  the job failed or was cancelled (the reason is on stderr), or the
       answer could not be written; for `map`: any input's job failed, was
       cancelled or was refused
    2  usage error: bad flags, a malformed job id or label, a bad --addr,
       stdin of `map` that is not text
    3  the request failed: jobd unreachable, unknown job or function, timeout;
       for `map`: the server ended the map early (the answers before are
       printed)
  130  interrupted by Ctrl-C while waiting (the job keeps running)

TLS and tokens: an https:// address uses TLS (--ca-cert, or the system's
roots). The bearer token comes from --token-file, else from the JOBD_TOKEN
environment variable (the token itself; never a flag, which `ps` would show).

Logging goes to stderr and follows RUST_LOG (default: warn).";

#[derive(Debug, Parser)]
#[command(
    name = "jobctl",
    version,
    about = "Submit jobs to a jobd server and wait for their results",
    long_about = LONG_ABOUT,
    after_long_help = AFTER_LONG_HELP,
    propagate_version = true
)]
pub(crate) struct Cli {
    /// The jobd server to talk to: a URI such as http://127.0.0.1:50051, or
    /// a bare host:port.
    #[arg(
        long,
        env = "JOBD_ADDR",
        default_value = "http://127.0.0.1:50051",
        global = true
    )]
    pub(crate) addr: String,

    /// Trust this CA certificate (PEM) for the server's TLS certificate,
    /// instead of the system's roots. For https:// addresses.
    #[arg(long, env = "JOBD_CA_CERT", value_name = "PEM", global = true)]
    pub(crate) ca_cert: Option<PathBuf>,

    /// Present this certificate (PEM) to a server that requires client
    /// certificates (mutual TLS). Needs --client-key.
    #[arg(
        long,
        env = "JOBD_CLIENT_CERT",
        value_name = "PEM",
        global = true,
        requires = "client_key"
    )]
    pub(crate) client_cert: Option<PathBuf>,

    /// The private key (PEM) of --client-cert.
    #[arg(
        long,
        env = "JOBD_CLIENT_KEY",
        value_name = "PEM",
        global = true,
        requires = "client_cert"
    )]
    pub(crate) client_key: Option<PathBuf>,

    /// Read the bearer token from FILE (its first word that is not in a
    /// # comment, so jobd's own token file works too). Without it the token
    /// comes from the JOBD_TOKEN environment variable, if set.
    #[arg(long, env = "JOBD_TOKEN_FILE", value_name = "FILE", global = true)]
    pub(crate) token_file: Option<PathBuf>,

    /// How to print answers: `text` for people, `json` for scripts (one
    /// compact JSON object per line).
    #[arg(short, long, value_enum, default_value_t = Format::Text, global = true)]
    pub(crate) output: Format,

    #[command(subcommand)]
    pub(crate) command: Command,
}

/// The output format, chosen once for the whole invocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Format {
    /// Plain lines: the id, the raw result, aligned tables.
    Text,
    /// One compact JSON object per line.
    Json,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Submit a job and print its id (or, with --wait, its result).
    ///
    /// Each ARG is taken as JSON if it parses as JSON, else as a string:
    /// `jobctl submit hello Ann` sends "Ann", `jobctl submit sleep 1.5` sends
    /// the number 1.5, and `jobctl submit echo '"42"'` the string "42". No
    /// ARG sends null, one ARG sends that value, several ARGs are sent as a
    /// JSON array.
    Submit(Submit),

    /// Wait for a job to finish and print its result.
    ///
    /// A string result is printed raw (no quotes), any other value as compact
    /// JSON. A job that failed or was cancelled exits with code 1 and its
    /// reason on stderr.
    Result {
        /// The job id that `submit` printed.
        id: JobId,
        /// Give up after this many seconds (fractions allowed, e.g. 0.5; 0
        /// answers at once) and exit with code 3. The job keeps running.
        // Hyphen values are let through so that `-1` is refused as a negative
        // timeout, not mistaken for a flag.
        #[arg(long, value_name = "SECS", value_parser = parse_seconds, allow_hyphen_values = true)]
        timeout: Option<Duration>,
    },

    /// Print whether a job has finished (true or false), without waiting.
    Done {
        /// The job id that `submit` printed.
        id: JobId,
    },

    /// Print everything the server knows about a job.
    ///
    /// State, function, pool, arguments, labels, request id, submit, start
    /// and finish times, attempt, and the result or error once finished.
    Status {
        /// The job id that `submit` printed.
        id: JobId,
    },

    /// Ask the server to cancel a job and print what happened.
    ///
    /// `cancelled`: it was still pending and will never run. `aborted`: it
    /// was running on the async pool and was stopped. `requested`: it is
    /// running on the blocking pool, which cannot be interrupted; it ends
    /// cancelled only if its function honours the request. `already done`:
    /// it had finished; nothing changed.
    Cancel {
        /// The job id that `submit` printed.
        id: JobId,
    },

    /// List the job functions the server can run, with their pools, the
    /// JSON Schema their arguments must match ("args:") and what they
    /// return, when the function declared them.
    Functions,

    /// Wait for several jobs, like Python's concurrent.futures.wait, and
    /// print which are done and which are not.
    ///
    /// Waits on the server until the first job finishes (`--return-when
    /// first`), the first job fails (`exception`; a cancelled job does not
    /// count), or all have finished (`all`, the default), or until
    /// --timeout. Either way the answer is the split at that moment, and the
    /// exit code is 0.
    Wait(crate::sets::Wait),

    /// List jobs, newest first, optionally filtered.
    ///
    /// An aligned table on a terminal; one JSON object per job (as `status
    /// -o json` prints it) when stdout is not a terminal or with -o json.
    List(crate::sets::List),

    /// Forget a finished job: its record and its result.
    ///
    /// A pending or running job is refused (exit 3): cancel it first.
    /// Afterwards the server answers "not found: deleted" for it.
    Delete {
        /// The job id that `submit` printed.
        id: JobId,
    },

    /// Follow jobs live: state changes, progress and final results.
    ///
    /// With ids: each job's current state first (a finished job's result at
    /// once), then every change, until all have finished; exit 1 if one
    /// failed or was cancelled. Without ids: the events of every job matching
    /// --function/--state/--label from now on, until Ctrl-C or --count.
    /// A line per event (`ID STATE [PERCENT MESSAGE] [RESULT]`); progress
    /// bars instead on a terminal; one JSON object per event with -o json
    /// (seq, epoch, kind, job_id, function, state, attempt, progress, value,
    /// error, missed). A "lagged" line or event means this watcher read too
    /// slowly and the server skipped `missed` events.
    Watch(crate::watch::Watch),
    /// Run a function on every line of stdin, one job per line, and print
    /// one result per line, in input order.
    ///
    /// Like Python's Executor.map: each non-empty line is one job's argument
    /// (JSON if the line parses as JSON, else the line as a string, as
    /// `submit` treats its ARGs), at most --max-in-flight jobs run at once,
    /// and results are printed in input order (or as they finish with
    /// --unordered). A string result is printed raw, any other value as
    /// compact JSON, and an input without a value as `error: REASON`; with
    /// -o json each line is {"index", "job_id", "state", "value" or
    /// "error"}. Exit code 1 if any job failed, was cancelled or was
    /// refused by the server; 3 if the server ended the map early (e.g. a
    /// line over its message size limit, `jobd --max-message-bytes`), after
    /// printing the answers it gave. Ctrl-C cancels the jobs not yet
    /// finished.
    Map(crate::map::Map),

    /// Load a server with jobs and measure jobs/s and latency, next to the
    /// gRPC floor (health checks) measured in the same run.
    #[command(long_about = BENCH_LONG_ABOUT, after_long_help = BENCH_AFTER_LONG_HELP)]
    Bench(Bench),

    /// Print a job's log: what it printed and logged, across its attempts.
    ///
    /// The bytes as the job wrote them go to stdout (output that is not
    /// UTF-8 included); with --follow (-f), the log is followed until the
    /// job ends, like `kubectl logs -f`, resuming by itself if the
    /// connection breaks. When the server's cap (`jobd --max-log-bytes`)
    /// dropped older lines, a note on stderr says how many bytes. With -o
    /// json, one object per entry: offset, attempt, stream, at, and text
    /// (or data_base64 for bytes that are not UTF-8).
    Logs(crate::logs::Logs),

    /// Serve job functions from this process to jobd, until SIGINT or SIGTERM.
    #[command(long_about = WORKER_LONG_ABOUT)]
    Worker(crate::worker::Serve),

    /// List the remote workers attached to jobd: name, instance, peer,
    /// functions, slots busy/free, running jobs, last heartbeat, draining.
    ///
    /// An aligned table on a terminal; one JSON object per worker (with
    /// every field: session_id, labels, version, running job ids, times)
    /// when stdout is not a terminal or with -o json.
    Workers,
}

const WORKER_LONG_ABOUT: &str = "\
Serve job functions from this process to jobd (a remote worker), until SIGINT
or SIGTERM.

The worker attaches to jobd and declares its functions, which `jobctl
functions` then lists on the pool \"worker\"; jobs submitted to them run here.
It waits for jobd when it is away and reattaches after a restart, with the
jobs it still runs. SIGINT or SIGTERM drains it: it takes no new job, lets the
running ones finish within --grace, gives back the rest, and exits 0. A server
with tokens needs a token with the `worker` capability (--token-file or
JOBD_TOKEN).

--exec NAME=COMMAND runs COMMAND for each job of NAME: the words of COMMAND
are the program and its arguments (no shell runs it), the job's arguments
arrive as one line of JSON on stdin, and stdout is the result (JSON when it
parses as JSON, else a string). A non-zero exit fails the job with the exit
code and the tail of stderr. The command starts in this directory with a clean
environment: PATH, JOBD_JOB_ID and JOBD_ATTEMPT only. Cancelling the job (or
the worker giving it back) kills the command's whole process group at once;
the job's --run-timeout stops it with SIGTERM, then SIGKILL 5 s later.

Examples:
  jobctl worker --exec upper='tr a-z A-Z' --concurrency 4
  jobctl worker --exec resize='convert - -resize 50% -' --label gpu=true
  jobctl worker --noop remote.noop      (what `bench --worker-slots` runs)

Logs (attach, reconnects, drain) go to stderr; RUST_LOG=debug shows every job.";

const BENCH_LONG_ABOUT: &str = "\
Load a jobd server with jobs and measure throughput and latency.

C connections (--connections; each its own HTTP/2 connection) carry K requests
in flight each (--concurrency), for --duration seconds after --warmup seconds
that are not counted, or until --jobs jobs are done.

Modes:
  submit     Submit only: jobs accepted per second.
  roundtrip  Submit, then Result (waits up to 30 s) for each job: jobs
             completed end to end per second; latency from the start of
             Submit to the answer of Result.
  batch      SubmitBatch with --batch-size jobs per call: jobs accepted per
             second; latency per call. A rejected item counts as an error.
             4 x 64 calls of 1000 no-op jobs outrun the pool and fill its
             queue (RESOURCE_EXHAUSTED); try --concurrency 1 as well.
  floor      grpc.health.v1.Health/Check only: the cost of a gRPC call on
             this machine and connection set-up, in RPC/s.

Every submit, roundtrip or batch run measures the floor first, with the same
connections, concurrency, warmup and stop rule (--jobs counts RPCs there, and
with --jobs alone the floor runs at most 5 s), then the mode. With --rounds R
they alternate R times, each round taking its share of --duration and --jobs,
so that a machine whose speed drifts during the run (a shared VM, a laptop)
slows both alike. The ratio of the
mode's jobs/s to the floor's RPC/s compares across machines and noisy runs
better than either figure alone. Latencies (p50, p90, p99, max) of the
successful requests are in microseconds, from an HDR histogram.

Failed requests are counted (`errors`, in jobs), and the first error is
shown. A run where every request failed exits with code 3.

Measuring the memory of a million queued jobs: start jobd with its pools
paused (jobs are accepted and queued, none starts), submit a million no-op
jobs without warmup, and compare the server's resident memory before and
after (read from /proc/PID/status, so the server must run on this machine):
  jobd --store memory --paused --max-queued 2000000 --listen 127.0.0.1:50051 &
  jobctl bench --mode submit --jobs 1000000 --warmup 0 --server-pid $!
The report's server_rss_per_job_bytes, (server_rss_bytes -
server_rss_before_bytes) / jobs, is the cost of one queued job (plus whatever
the allocator keeps); it is only given without warmup, whose jobs the server
holds too but the count leaves out.

With --server-pid, the server's CPU time (user + system, from /proc/PID/stat,
in 10 ms ticks) is also read over each measured window: server CPU per floor
RPC and per job, and cpu_ratio, the first over the second. On a machine
shared with other load, or with jobctl itself, the CPU cost per job moves
less from run to run than jobs/s does.

Over the worker protocol: with --worker-slots N the jobs are not run by
jobd's own pools but by a remote worker the bench starts for the run, this
jobctl as a child process (`jobctl worker --noop bench.noop --concurrency N`,
its connection flags as the bench's). The bench waits until jobd lists the
function as served by a worker (at most 30 s; a worker jobd refuses ends the
bench with exit code 3), measures as usual, then stops the worker with
SIGTERM and waits for it to drain and exit. The report says a remote worker
served the jobs (worker_slots). Roundtrip mode measures the whole path: submit,
assignment to the worker, its report, the result. A server with tokens needs
a worker token for the worker: --worker-token-file.

Examples:
  jobctl bench                                      submit, 4 x 64, 5 s
  jobctl bench --mode roundtrip --worker-slots 8    jobs served by a remote worker
  jobctl bench --mode roundtrip --duration 10
  jobctl bench --mode batch --batch-size 500 -o json
  jobctl bench --mode submit --jobs 100000 --payload-bytes 1024";

const BENCH_AFTER_LONG_HELP: &str = "\
Output: an aligned table, or with --output json one JSON object with mode,
connections, concurrency, jobs, errors, first_error, duration_secs,
jobs_per_sec, p50_us, p90_us, p99_us, max_us, the same for the floor (floor_*),
ratio, batch_size, server_rss_before_bytes, server_rss_bytes,
server_rss_per_job_bytes and worker_slots (the remote worker's slots, null when
jobd's own pools ran the jobs). A key that does not apply to the run is null.
A live progress line goes to stderr when it is a terminal, never to a pipe.

Exit codes: 0 the run finished (errors, if any, are in the report); 2 usage
error, or --server-pid is not a readable process; 3 jobd unreachable, every
request of a phase failed, or the --worker-slots worker did not come to serve
the function.";

/// What `jobctl bench` measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum BenchMode {
    /// Submit only: jobs accepted per second.
    Submit,
    /// Submit, then Result for each job: jobs completed per second.
    Roundtrip,
    /// SubmitBatch calls of --batch-size jobs: jobs accepted per second.
    Batch,
    /// Health checks only: the gRPC floor, in RPC/s.
    Floor,
}

impl BenchMode {
    /// The mode's name, as typed on the command line.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Submit => "submit",
            Self::Roundtrip => "roundtrip",
            Self::Batch => "batch",
            Self::Floor => "floor",
        }
    }
}

#[derive(Debug, Args)]
pub(crate) struct Bench {
    /// What to measure.
    #[arg(long, value_enum, default_value_t = BenchMode::Submit)]
    pub(crate) mode: BenchMode,

    /// How many HTTP/2 connections to open (each one separate, not shared).
    #[arg(long, value_name = "C", default_value = "4")]
    pub(crate) connections: NonZeroU32,

    /// Requests in flight on each connection.
    #[arg(long, value_name = "K", default_value = "64")]
    pub(crate) concurrency: NonZeroU32,

    /// Seconds to measure for, after the warmup [default: 5, or with --jobs
    /// until the jobs are done (at most 10 minutes)].
    #[arg(long, value_name = "SECS", value_parser = parse_positive_seconds)]
    pub(crate) duration: Option<Duration>,

    /// Stop after this many jobs (counted after the warmup); with --duration
    /// too, whichever comes first.
    #[arg(long, value_name = "N")]
    pub(crate) jobs: Option<NonZeroU64>,

    /// Seconds of load before measuring, not counted (fractions allowed).
    #[arg(long, value_name = "SECS", default_value = "1", value_parser = parse_seconds)]
    pub(crate) warmup: Duration,

    /// Alternate the floor and the mode this many times, each for its share
    /// of --duration (and of --jobs), and add the rounds up: both then see
    /// the same spells of a machine whose speed drifts (other tenants, CPU
    /// boost). The warmup runs once, before the first round.
    #[arg(long, value_name = "R", default_value = "1", value_parser = clap::value_parser!(u32).range(1..=100))]
    pub(crate) rounds: u32,

    /// The job function to submit (see `jobctl functions`) [default: noop;
    /// with --worker-slots: bench.noop, since a worker cannot serve one of
    /// jobd's own functions].
    #[arg(long)]
    pub(crate) function: Option<String>,

    /// Run the jobs on this pool ("async", "blocking" or "process")
    /// instead of the function's own, to compare pools on one function in
    /// one run [default: the function's pool].
    #[arg(long, value_name = "POOL", conflicts_with = "worker_slots")]
    pub(crate) pool: Option<String>,

    /// The size of each job's argument: 0 sends null, more sends a JSON
    /// string of this many bytes.
    #[arg(long, value_name = "B", default_value = "0")]
    pub(crate) payload_bytes: usize,

    /// Jobs per SubmitBatch call, in batch mode (1 to 10000).
    #[arg(long, value_name = "N", default_value = "1000", value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub(crate) batch_size: u32,

    /// Report the resident memory (VmRSS) of this process, the jobd server on
    /// this machine, before and after the measured load, and its CPU time per
    /// floor RPC and per job (`cpu_ratio`: the floor's over the mode's, a
    /// steadier figure than the throughput ratio on a busy machine).
    #[arg(long, value_name = "PID")]
    pub(crate) server_pid: Option<u32>,

    /// Serve the jobs from a remote worker with N slots instead of jobd's
    /// own pools: the bench starts `jobctl worker --noop FUNCTION
    /// --concurrency N` (this binary, as a child process), waits until jobd
    /// lists the function as served, runs, then stops the worker with
    /// SIGTERM. Not for floor mode, which submits no job.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub(crate) worker_slots: Option<u32>,

    /// With --worker-slots on a server with tokens: the token file of the
    /// worker, whose token needs the `worker` capability (the bench's own
    /// token, a client's, cannot attach) [default: --token-file].
    #[arg(long, value_name = "FILE", requires = "worker_slots")]
    pub(crate) worker_token_file: Option<PathBuf>,
}

impl Bench {
    /// The function the bench submits.
    pub(crate) fn function(&self) -> &str {
        match (&self.function, self.worker_slots) {
            (Some(function), _) => function,
            (None, None) => "noop",
            (None, Some(_)) => "bench.noop",
        }
    }
}

#[derive(Debug, Args)]
pub(crate) struct Submit {
    /// The job function to run, e.g. hello, echo, sleep (see `jobctl
    /// functions`).
    pub(crate) function: String,

    /// The function's arguments: JSON where they parse as JSON, else strings.
    /// Put `--` before arguments that start with a dash (negative numbers
    /// work without it).
    #[arg(value_name = "ARG", allow_negative_numbers = true)]
    pub(crate) args: Vec<String>,

    /// Wait for the job to finish and print its result, as `jobctl result`
    /// does, instead of its id.
    #[arg(long)]
    pub(crate) wait: bool,

    /// With --wait: give up after this many seconds (fractions allowed) and
    /// exit with code 3. The job keeps running.
    #[arg(long, value_name = "SECS", value_parser = parse_seconds, allow_hyphen_values = true, requires = "wait")]
    pub(crate) timeout: Option<Duration>,

    /// Require the job to run on this pool ("async", "blocking" or
    /// "process"); by default it runs on the function's own.
    #[arg(long)]
    pub(crate) pool: Option<String>,

    /// A request id of your choosing, stored with the job and shown by
    /// `status`.
    #[arg(long, value_name = "ID")]
    pub(crate) request_id: Option<String>,

    /// A label stored with the job and shown by `status`; repeat for more
    /// labels, e.g. --label team=infra --label ticket=42.
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
    pub(crate) labels: Vec<(String, String)>,

    /// Only remote workers carrying this label may run the job (for
    /// functions served by workers, see `jobctl workers`); repeat to
    /// require several, e.g. --worker-label gpu=true --worker-label zone=eu.
    #[arg(long = "worker-label", value_name = "KEY=VALUE", value_parser = parse_label)]
    pub(crate) worker_labels: Vec<(String, String)>,

    /// Priority within the job's pool, -1000 to 1000 (default 0): a higher
    /// one starts first, equal ones in submission order.
    #[arg(long, value_name = "N", allow_hyphen_values = true,
          value_parser = clap::value_parser!(i32).range(-1000..=1000))]
    pub(crate) priority: Option<i32>,

    /// Do not start the job until this many seconds (fractions allowed, at
    /// most 30 days) after the server accepts it. (--timeout is the wait
    /// bound of --wait, not a limit on the job.)
    #[arg(long, value_name = "SECS", value_parser = parse_seconds, allow_hyphen_values = true)]
    pub(crate) delay: Option<Duration>,

    /// Limit how long the job may run, in seconds (fractions allowed): past
    /// it the job fails as timed out. Named --run-timeout because --timeout
    /// bounds the wait of --wait.
    #[arg(long, value_name = "SECS", value_parser = parse_seconds, allow_hyphen_values = true)]
    pub(crate) run_timeout: Option<Duration>,

    /// Allow up to N attempts in all (1 to 100) when the function fails
    /// with a retryable error; retries back off exponentially, with jitter.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=100))]
    pub(crate) max_attempts: Option<u32>,
}

impl Submit {
    /// The submission these words describe.
    pub(crate) fn submission(&self) -> Submission {
        let mut submission = Submission::new(&self.function, json_args(&self.args));
        submission.pool.clone_from(&self.pool);
        submission.request_id.clone_from(&self.request_id);
        submission.labels.extend(self.labels.iter().cloned());
        submission
            .worker_labels
            .extend(self.worker_labels.iter().cloned());
        submission.priority = self.priority.unwrap_or_default();
        submission.delay = self.delay;
        submission.timeout = self.run_timeout;
        submission.max_attempts = self.max_attempts.unwrap_or_default();
        submission
    }
}

/// Turns command-line words into the job's one JSON argument, so that the
/// common cases need no JSON quoting in the shell.
fn json_args(words: &[String]) -> serde_json::Value {
    match words {
        [] => serde_json::Value::Null,
        [one] => json_arg(one),
        many => many.iter().map(|word| json_arg(word)).collect(),
    }
}

/// One word (or `map` input line) as a JSON value: JSON if it parses, else
/// the word as a string.
pub(crate) fn json_arg(word: &str) -> serde_json::Value {
    serde_json::from_str(word).unwrap_or_else(|_| serde_json::Value::String(word.to_owned()))
}

pub(crate) fn parse_seconds(raw: &str) -> Result<Duration, String> {
    let secs: f64 = raw
        .trim()
        .parse()
        .map_err(|_| format!("{raw:?} is not a number of seconds, such as 5 or 0.5"))?;
    Duration::try_from_secs_f64(secs).map_err(|_| {
        format!("{raw:?} is not a usable timeout: it must be a finite number of seconds, 0 or more")
    })
}

/// As [`parse_seconds`], refusing 0: a measurement needs some time.
fn parse_positive_seconds(raw: &str) -> Result<Duration, String> {
    match parse_seconds(raw)? {
        Duration::ZERO => Err(format!(
            "{raw:?} is too short: measure for more than 0 seconds"
        )),
        duration => Ok(duration),
    }
}

pub(crate) fn parse_label(raw: &str) -> Result<(String, String), String> {
    match raw.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
        _ => Err(format!(
            "{raw:?} is not a label: write KEY=VALUE, e.g. team=infra"
        )),
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;
    use serde_json::json;

    use super::*;

    fn words(ws: &[&str]) -> Vec<String> {
        ws.iter().map(|&w| w.to_owned()).collect()
    }

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn words_become_one_json_argument() {
        assert_eq!(json_args(&[]), json!(null));
        assert_eq!(json_args(&words(&["Ann"])), json!("Ann"));
        assert_eq!(json_args(&words(&["1.5"])), json!(1.5));
        assert_eq!(json_args(&words(&["\"42\""])), json!("42"));
        assert_eq!(
            json_args(&words(&["a", "1", r#"{"x":2}"#])),
            json!(["a", 1, {"x": 2}])
        );
        // Almost-JSON stays a string rather than failing.
        assert_eq!(json_args(&words(&["{oops"])), json!("{oops"));
    }

    #[test]
    fn timeouts_are_non_negative_seconds() {
        assert_eq!(parse_seconds("0.2"), Ok(Duration::from_millis(200)));
        assert_eq!(parse_seconds("0"), Ok(Duration::ZERO));
        assert!(parse_seconds("-1").is_err());
        assert!(parse_seconds("NaN").is_err());
        assert!(parse_seconds("5s").is_err());
    }

    #[test]
    fn labels_need_a_key_and_an_equals_sign() {
        assert_eq!(
            parse_label("team=infra"),
            Ok(("team".to_owned(), "infra".to_owned()))
        );
        assert_eq!(
            parse_label("expr=a=b"),
            Ok(("expr".to_owned(), "a=b".to_owned()))
        );
        assert_eq!(
            parse_label("empty="),
            Ok(("empty".to_owned(), String::new()))
        );
        assert!(parse_label("team").is_err());
        assert!(parse_label("=infra").is_err());
    }

    #[test]
    fn negative_numbers_are_arguments_not_flags() {
        let cli = Cli::try_parse_from(["jobctl", "submit", "echo", "-1", "x"]).unwrap();
        let Command::Submit(submit) = cli.command else {
            panic!("parsed as {:?}", cli.command);
        };
        assert_eq!(submit.submission().args, json!([-1, "x"]));
    }

    #[test]
    fn job_options_reach_the_submission() {
        let cli = Cli::try_parse_from([
            "jobctl",
            "submit",
            "sleep",
            "1",
            "--priority",
            "-5",
            "--delay",
            "0.5",
            "--run-timeout",
            "2",
            "--max-attempts",
            "3",
            "--worker-label",
            "gpu=true",
            "--worker-label",
            "zone=eu",
            "--label",
            "team=infra",
        ])
        .unwrap();
        let Command::Submit(submit) = cli.command else {
            panic!("parsed as {:?}", cli.command);
        };
        let submission = submit.submission();
        assert_eq!(submission.priority, -5);
        assert_eq!(submission.delay, Some(Duration::from_millis(500)));
        assert_eq!(submission.timeout, Some(Duration::from_secs(2)));
        assert_eq!(submission.max_attempts, 3);
        assert_eq!(
            submission.worker_labels,
            [("gpu", "true"), ("zone", "eu")]
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .into()
        );
        assert_eq!(
            submission.labels.len(),
            1,
            "labels and worker labels stay apart"
        );
        // --timeout stays the wait bound of --wait, not the job's limit.
        assert!(Cli::try_parse_from(["jobctl", "submit", "sleep", "--timeout", "2"]).is_err());
        assert!(Cli::try_parse_from(["jobctl", "submit", "sleep", "--priority", "1001"]).is_err());
    }
}

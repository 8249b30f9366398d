//! `jobctl worker`: this process serves job functions to jobd, through the
//! client library's [`Worker`], until SIGINT or SIGTERM drains it.
//!
//! It exists so that serving a function needs no Rust: `--exec NAME=COMMAND`
//! serves NAME by running COMMAND for each job, through `jobd-command` (the
//! one runner jobd's workspace has: argv without a shell, a clean
//! environment, the process group killed on cancel and timeout); `--noop
//! NAME` serves a function that returns its argument at once (the load
//! `jobctl bench --worker-slots` puts on the worker protocol).

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use clap::Args;
use jobd_client::{ConnectOptions, Ctx, JobFailure, LogStream, Worker};
use jobd_command::{CommandSpec, Ending, OutputLine, ResultMode, Stream, split_command_line};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::{
    cli::{parse_label, parse_seconds},
    failure::Failure,
};

#[derive(Debug, Args)]
#[command(group(
    clap::ArgGroup::new("functions").required(true).multiple(true).args(["exec", "noop"])
))]
pub(crate) struct Serve {
    /// Serve NAME by running COMMAND for each job; repeat for more. COMMAND
    /// is split into words as a shell would (quotes group words), but no
    /// shell runs it: `$`, `;`, `|` and globs are plain characters.
    #[arg(long = "exec", value_name = "NAME=COMMAND", value_parser = parse_exec)]
    pub(crate) exec: Vec<Exec>,

    /// Serve NAME as a function that returns its argument at once (for
    /// benchmarks); repeat for more.
    #[arg(long = "noop", value_name = "NAME")]
    pub(crate) noop: Vec<String>,

    /// How many jobs to run at once [default: one per CPU].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub(crate) concurrency: Option<u32>,

    /// A label of this worker: jobs submitted with --worker-label go only
    /// to workers carrying all of theirs; repeat for more.
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
    pub(crate) labels: Vec<(String, String)>,

    /// What this worker calls itself in `jobctl workers` [default: jobctl].
    #[arg(long, value_name = "NAME")]
    pub(crate) name: Option<String>,

    /// Seconds running jobs get to finish after SIGINT or SIGTERM; what
    /// still runs then is given back to jobd, which runs it elsewhere.
    #[arg(long, value_name = "SECS", default_value = "30", value_parser = parse_seconds)]
    pub(crate) grace: Duration,
}

/// The description jobd lists for a `--noop` function.
const NOOP_DESCRIPTION: &str = "Returns its argument at once (jobctl worker --noop)";

/// What jobd lists as an `--exec` function's result.
const EXEC_RETURNS: &str = "the command's stdout: JSON when it parses as JSON, else a string";

/// One `--exec NAME=COMMAND`: the function's name and the command's words.
#[derive(Debug, Clone)]
pub(crate) struct Exec {
    pub(crate) name: String,
    pub(crate) argv: Vec<String>,
}

/// `NAME=COMMAND`, with COMMAND split into words now, so that an unclosed
/// quote is a usage error before anything connects.
fn parse_exec(raw: &str) -> Result<Exec, String> {
    let (name, command) = raw
        .split_once('=')
        .filter(|(name, _)| !name.is_empty())
        .ok_or_else(|| format!("{raw:?} is not NAME=COMMAND, e.g. upper='tr a-z A-Z'"))?;
    let argv = split_command_line(command).map_err(|error| format!("{raw:?}: {error}"))?;
    Ok(Exec {
        name: name.to_owned(),
        argv,
    })
}

/// Runs the worker `args` describes against the jobd at `addr` until SIGINT
/// or SIGTERM, then drains it. jobd need not be up yet: the worker waits
/// for it, and for it to come back after a restart.
pub(crate) async fn serve(
    addr: &str,
    options: ConnectOptions,
    args: &Serve,
) -> Result<(), Failure> {
    // A program that cannot start would fail every job this worker took:
    // better not to attach at all. (Each job looks it up again.)
    for exec in &args.exec {
        let program = &exec.argv[0];
        if let Err(reason) = CommandSpec::new(program).inherit_path(true).find_program() {
            return Err(Failure::ExecProgram {
                name: exec.name.clone(),
                program: program.clone(),
                reason,
            });
        }
    }
    let mut worker = Worker::new(addr)
        .connect_options(options)
        .version(concat!("jobctl ", env!("CARGO_PKG_VERSION")))
        .grace(args.grace);
    if let Some(slots) = args.concurrency {
        worker = worker.slots(slots);
    }
    if let Some(name) = &args.name {
        worker = worker.name(name);
    }
    for (key, value) in &args.labels {
        worker = worker.label(key, value);
    }
    for exec in &args.exec {
        let description = format!(
            "Runs {} for each job, its arguments as JSON on stdin (jobctl worker --exec)",
            // The program alone: its arguments may hold what `jobctl
            // functions` should not show everyone.
            exec.argv[0]
        );
        let argv: Arc<[String]> = exec.argv.clone().into();
        worker = worker
            .register_async(&exec.name, &description, move |ctx: Ctx, args| {
                let argv = Arc::clone(&argv);
                async move { run_command(&argv, &ctx, &args).await }
            })
            .returns(EXEC_RETURNS);
    }
    for name in &args.noop {
        worker = worker
            .register_async(
                name,
                NOOP_DESCRIPTION,
                |_ctx: Ctx, args| async move { Ok(args) },
            )
            .returns("its argument, unchanged");
    }
    worker.run(stop_signal()).await?;
    Ok(())
}

/// Runs one job's command: the job's arguments as one line of JSON on
/// stdin, a clean environment (PATH, JOBD_JOB_ID and JOBD_ATTEMPT only, so
/// that the worker's token and the rest of its environment stay its own),
/// the job's deadline as the time limit. Exit code 0 gives the result
/// (stdout, as JSON when it parses); anything else fails the job with the
/// exit code or signal and the tail of stderr.
///
/// A cancel (or the worker giving the job back) drops this future, and
/// with it the run: jobd-command then kills the command's whole process
/// group at once. The time limit stops it more gently (SIGTERM, then
/// SIGKILL after a grace), since nobody is waiting to reuse its slot.
async fn run_command(argv: &[String], ctx: &Ctx, args: &Value) -> Result<Value, JobFailure> {
    let mut stdin = args.to_string().into_bytes();
    stdin.push(b'\n');
    let mut spec = CommandSpec::from_argv(argv.iter())
        .ok_or_else(|| JobFailure::failed("the command has no program"))?
        .inherit_path(true)
        .env("JOBD_JOB_ID", ctx.job_id().to_string())
        .env("JOBD_ATTEMPT", ctx.attempt().to_string())
        .stdin(stdin);
    if let Some(deadline) = ctx.deadline() {
        // Past already (or a clock ahead of jobd's): stop it at once.
        spec = spec.timeout(
            deadline
                .duration_since(SystemTime::now())
                .unwrap_or_default(),
        );
    }
    // Every line it writes goes to the job's log as well.
    let (lines, mut written) = tokio::sync::mpsc::channel::<OutputLine>(1024);
    let forward = async {
        while let Some(line) = written.recv().await {
            let mut data = line.bytes;
            data.push(b'\n');
            let stream = match line.stream {
                Stream::Stdout => LogStream::Stdout,
                Stream::Stderr => LogStream::Stderr,
            };
            ctx.log_output(stream, &data);
        }
    };
    let never = CancellationToken::new();
    let (finished, ()) = tokio::join!(jobd_command::run(spec.lines(lines), &never), forward);
    let finished = finished.map_err(JobFailure::failed)?;
    finished
        .into_outcome(ResultMode::Json)
        .map_err(|failure| match failure.ending {
            Ending::TimedOut { .. } => JobFailure::TimedOut(failure.message),
            Ending::Cancelled { .. } => JobFailure::Cancelled,
            _ => JobFailure::Failed(failure.message),
        })
}

/// SIGINT or SIGTERM, whichever comes first: both drain the worker. If a
/// handler cannot be installed that signal keeps its default (it ends the
/// process at once), rather than the worker refusing to start.
fn stop_signal() -> impl Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    // Registered now, not when first polled: a SIGTERM that comes while the
    // worker connects must drain it, not kill it with the default action.
    let interrupt = signal(SignalKind::interrupt());
    let terminate = signal(SignalKind::terminate());
    async move {
        let interrupt = async {
            match interrupt {
                Ok(mut interrupt) => {
                    interrupt.recv().await;
                }
                Err(_) => std::future::pending().await,
            }
        };
        let terminate = async {
            match terminate {
                Ok(mut terminate) => {
                    terminate.recv().await;
                }
                Err(_) => std::future::pending().await,
            }
        };
        tokio::select! {
            () = interrupt => {}
            () = terminate => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_takes_a_name_and_words_never_a_shell_line() {
        let exec = parse_exec(r#"up=tr "a-z" 'A-Z'"#).unwrap();
        assert_eq!(
            (exec.name.as_str(), exec.argv.as_slice()),
            ("up", &["tr", "a-z", "A-Z"].map(String::from)[..])
        );
        // `=` after the first belongs to the command.
        let exec = parse_exec("env=env A=B").unwrap();
        assert_eq!(exec.argv, ["env", "A=B"]);
        // Shell syntax is plain text in a word.
        assert_eq!(
            parse_exec("x=echo $(id);").unwrap().argv,
            ["echo", "$(id);"]
        );
        for bad in ["no-equals", "=tr a b", "x=", "x=echo 'unclosed"] {
            assert!(parse_exec(bad).is_err(), "{bad:?} was accepted");
        }
    }
}

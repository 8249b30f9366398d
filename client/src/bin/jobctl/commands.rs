//! Runs one parsed command against the server: the client library call, the
//! answer handed to `output`, and every failure turned into a [`Failure`] so
//! that `main` can pick the exit code.

use std::{
    io::{self, Write as _},
    time::Duration,
};

use jobd_client::{ConnectOptions, Error as ClientError, JobClient, JobHandle, JobId, JobOutcome};

use crate::{
    bench,
    cli::{Cli, Command, Format, Submit},
    failure::{Failure, root_cause},
    logs, map, output, sets, waiting, watch, worker, workers,
};

/// How long to try to connect before saying the server is unreachable: long
/// enough for a slow network, short enough that a wrong address does not
/// look like a hang (the OS default can be minutes).
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs `cli.command`, printing its answer on stdout.
pub(crate) async fn run(cli: Cli) -> Result<(), Failure> {
    let options = connect_options(&cli)?;
    let flags = worker_flags(&cli);
    match cli.command {
        // A worker waits for jobd when it is away, instead of failing as a
        // request does: it connects (and reconnects) by itself.
        Command::Worker(args) => worker::serve(&cli.addr, options, &args).await,
        command => {
            let client = connect(&cli.addr, options.clone()).await?;
            execute(&client, &cli.addr, &options, &flags, command, cli.output)
                .await
                .map_err(|failure| failure.lost_connection(&cli.addr))
        }
    }
}

async fn execute(
    client: &JobClient,
    addr: &str,
    options: &ConnectOptions,
    worker_flags: &bench::WorkerFlags,
    command: Command,
    format: Format,
) -> Result<(), Failure> {
    match command {
        Command::Submit(args) => submit(client, format, &args).await,
        Command::Result { id, timeout } => {
            let outcome = wait(client, &client.job(id), timeout).await?;
            finish(format, id, outcome)
        }
        Command::Done { id } => {
            let state = client.job(id).state().await?;
            print(&output::done(format, id, state))
        }
        Command::Status { id } => {
            let job = client.job(id).status().await?;
            print(&output::status(format, &job))
        }
        Command::Cancel { id } => {
            let report = client.job(id).cancel().await?;
            tracing::debug!(%id, ?report, "cancel answered");
            print(&output::cancel(format, id, &report))
        }
        Command::Functions => {
            let functions = client.functions().await?;
            print(&output::functions(format, &functions))
        }
        Command::Wait(args) => sets::wait(client, format, &args).await,
        Command::List(args) => sets::list(client, format, &args).await,
        Command::Delete { id } => sets::delete(client, format, id).await,
        Command::Watch(args) => watch::watch(client, format, &args).await,
        Command::Logs(args) => logs::print(client, format, &args).await,
        Command::Map(args) => map::run(client, format, &args).await,
        Command::Bench(args) => {
            let report = bench::run(client, addr, options, worker_flags, &args).await?;
            print(&bench::render(format, &report))
        }
        Command::Workers => workers::list(client, format).await,
        Command::Worker(args) => worker::serve(addr, options.clone(), &args).await,
    }
}

/// The connection flags a worker started by `bench --worker-slots` gets:
/// this jobctl's own, with the worker's token file in place of the bench's
/// when one is given. The environment (JOBD_TOKEN among it) it inherits.
fn worker_flags(cli: &Cli) -> bench::WorkerFlags {
    let mut flags: bench::WorkerFlags = vec!["--addr".into(), cli.addr.clone().into()];
    let token_file = match &cli.command {
        Command::Bench(bench) => bench.worker_token_file.as_ref(),
        _ => None,
    }
    .or(cli.token_file.as_ref());
    for (flag, path) in [
        ("--ca-cert", cli.ca_cert.as_ref()),
        ("--client-cert", cli.client_cert.as_ref()),
        ("--client-key", cli.client_key.as_ref()),
        ("--token-file", token_file),
    ] {
        if let Some(path) = path {
            flags.push(flag.into());
            flags.push(path.clone().into_os_string());
        }
    }
    flags
}

/// The TLS files and token the flags and environment name, read now so that
/// a missing file is a usage error, not a connection failure.
fn connect_options(cli: &Cli) -> Result<ConnectOptions, Failure> {
    let read = |what, path: &std::path::Path| {
        std::fs::read(path).map_err(|error| Failure::File {
            what,
            path: path.display().to_string(),
            reason: error.to_string(),
        })
    };
    let mut options = ConnectOptions::new();
    if let Some(path) = &cli.ca_cert {
        options = options.ca_certificate_pem(read("--ca-cert", path)?);
    }
    if let (Some(cert), Some(key)) = (&cli.client_cert, &cli.client_key) {
        options =
            options.client_identity_pem(read("--client-cert", cert)?, read("--client-key", key)?);
    }
    let token = match &cli.token_file {
        Some(path) => {
            let text = read("--token-file", path)?;
            let token = token_in(&String::from_utf8_lossy(&text)).ok_or_else(|| Failure::File {
                what: "--token-file",
                path: path.display().to_string(),
                reason: "it holds no token".to_owned(),
            })?;
            Some(token)
        }
        None => std::env::var("JOBD_TOKEN")
            .ok()
            .filter(|t| !t.trim().is_empty()),
    };
    if let Some(token) = token {
        options = options.bearer_token(token);
    }
    Ok(options)
}

/// The token in a token file: the first word of the first line that is
/// neither blank nor a `#` comment (jobd's `TOKEN [name=NAME] [readonly]`
/// lines work as they are).
fn token_in(text: &str) -> Option<String> {
    text.lines()
        .map(str::trim)
        .find(|line| !line.is_empty() && !line.starts_with('#'))
        .and_then(|line| line.split_whitespace().next())
        .map(str::to_owned)
}

async fn connect(addr: &str, options: ConnectOptions) -> Result<JobClient, Failure> {
    let unreachable = |reason| Failure::Unreachable {
        addr: addr.to_owned(),
        reason,
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, JobClient::connect_with(addr, options)).await {
        Ok(Ok(client)) => Ok(client),
        Ok(Err(ClientError::Transport(error))) => Err(unreachable(root_cause(&error))),
        Ok(Err(error)) => Err(error.into()),
        Err(_) => Err(unreachable(format!(
            "no answer within {}s",
            CONNECT_TIMEOUT.as_secs()
        ))),
    }
}

async fn submit(client: &JobClient, format: Format, args: &Submit) -> Result<(), Failure> {
    let (job, state) = client.submit_with_state(args.submission()).await?;
    tracing::debug!(id = %job.id(), %state, "submitted");
    if !args.wait {
        return print(&output::submitted(format, job.id(), state));
    }
    let outcome = wait(client, &job, args.timeout).await?;
    finish(format, job.id(), outcome)
}

/// Waits for `job` to finish, at most `timeout` if given, on the server (no
/// polling), showing its progress on a terminal.
async fn wait(
    client: &JobClient,
    job: &JobHandle,
    timeout: Option<Duration>,
) -> Result<JobOutcome, Failure> {
    let id = job.id();
    waiting::wait_for(client, id, async {
        job.outcome(timeout)
            .await
            .map_err(|error| match (error, timeout) {
                (ClientError::Timeout, Some(after)) => Failure::TimedOut { id, after },
                (error, _) => error.into(),
            })
    })
    .await
}

/// Prints a finished job's outcome; one without a value becomes the failure
/// that gives exit code 1.
fn finish(format: Format, id: JobId, outcome: JobOutcome) -> Result<(), Failure> {
    if let Some(text) = output::outcome(format, id, &outcome) {
        print(&text)?;
    }
    match outcome.result {
        Ok(_) => Ok(()),
        Err((_, message)) => Err(Failure::Job {
            id,
            state: outcome.state,
            message,
        }),
    }
}

/// Writes one answer. Not `println!`, which panics when stdout is a closed
/// pipe.
pub(crate) fn print(text: &str) -> Result<(), Failure> {
    let mut stdout = io::stdout().lock();
    writeln!(stdout, "{text}")?;
    stdout.flush()?;
    Ok(())
}

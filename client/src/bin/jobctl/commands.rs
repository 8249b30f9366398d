//! Runs one parsed command against the server: the client library call, the
//! answer handed to `output`, and every failure turned into a [`Failure`] so
//! that `main` can pick the exit code.

use std::{
    io::{self, Write as _},
    time::Duration,
};

use jobd_client::{Error as ClientError, JobClient, JobHandle, JobId, JobOutcome};

use crate::{
    bench,
    cli::{Cli, Command, Format, Submit},
    failure::{Failure, root_cause},
    map, output, sets, waiting,
};

/// How long to try to connect before saying the server is unreachable: long
/// enough for a slow network, short enough that a wrong address does not
/// look like a hang (the OS default can be minutes).
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs `cli.command`, printing its answer on stdout.
pub(crate) async fn run(cli: Cli) -> Result<(), Failure> {
    let client = connect(&cli.addr).await?;
    execute(&client, &cli.addr, cli.command, cli.output)
        .await
        .map_err(|failure| failure.lost_connection(&cli.addr))
}

async fn execute(
    client: &JobClient,
    addr: &str,
    command: Command,
    format: Format,
) -> Result<(), Failure> {
    match command {
        Command::Submit(args) => submit(client, format, &args).await,
        Command::Result { id, timeout } => {
            let outcome = wait(&client.job(id), timeout).await?;
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
        Command::Map(args) => map::run(client, format, &args).await,
        Command::Bench(args) => {
            let report = bench::run(client, addr, &args).await?;
            print(&bench::render(format, &report))
        }
    }
}

async fn connect(addr: &str) -> Result<JobClient, Failure> {
    let unreachable = |reason| Failure::Unreachable {
        addr: addr.to_owned(),
        reason,
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, JobClient::connect(addr)).await {
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
    let outcome = wait(&job, args.timeout).await?;
    finish(format, job.id(), outcome)
}

/// Waits for `job` to finish, at most `timeout` if given, on the server (no
/// polling).
async fn wait(job: &JobHandle, timeout: Option<Duration>) -> Result<JobOutcome, Failure> {
    let id = job.id();
    waiting::wait_for(id, async {
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
fn print(text: &str) -> Result<(), Failure> {
    let mut stdout = io::stdout().lock();
    writeln!(stdout, "{text}")?;
    stdout.flush()?;
    Ok(())
}

//! `jobctl map`: one job per line of stdin, over one Map stream, results
//! printed one line per input as they come back.
//!
//! Stdin is read on its own thread (reading a terminal or pipe blocks) into
//! a small bounded channel, which the Map stream drains only as fast as the
//! server accepts arguments: a huge input is never held in memory.

use std::{
    io::{BufRead as _, Write as _},
    sync::{Arc, Mutex, PoisonError},
};

use clap::Args;
use futures::TryStreamExt as _;
use jobd_client::{JobClient, MapOptions};
use tokio::sync::mpsc;

use crate::{
    cli::{Format, json_arg, parse_label},
    failure::Failure,
    output,
};

/// Lines read ahead of what the stream has taken.
const READ_AHEAD: usize = 256;

#[derive(Debug, Args)]
pub(crate) struct Map {
    /// The job function to run on each line, e.g. hello, sha256 (see
    /// `jobctl functions`).
    pub(crate) function: String,

    /// How many jobs may be submitted and unfinished at once (the server
    /// caps it at 1024) [default: 64, the server's].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub(crate) max_in_flight: Option<u32>,

    /// Print each result as soon as its job finishes, not in input order
    /// (use -o json to see which input each line answers).
    #[arg(long)]
    pub(crate) unordered: bool,

    /// Require the jobs to run on this pool ("async" or "blocking").
    #[arg(long)]
    pub(crate) pool: Option<String>,

    /// A label stored with every job; repeat for more labels.
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
    pub(crate) labels: Vec<(String, String)>,

    /// Priority of every job within its pool, -1000 to 1000 (default 0).
    #[arg(long, value_name = "N", allow_hyphen_values = true,
          value_parser = clap::value_parser!(i32).range(-1000..=1000))]
    pub(crate) priority: Option<i32>,

    /// Allow up to N attempts per job (1 to 100) when the function fails
    /// with a retryable error.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=100))]
    pub(crate) max_attempts: Option<u32>,
}

impl Map {
    fn options(&self) -> MapOptions {
        let mut options = MapOptions::new(&self.function);
        options.ordered = !self.unordered;
        options.max_in_flight = self.max_in_flight.unwrap_or_default();
        options.pool.clone_from(&self.pool);
        options.labels.extend(self.labels.iter().cloned());
        options.priority = self.priority.unwrap_or_default();
        options.max_attempts = self.max_attempts.unwrap_or_default();
        options
    }
}

/// Runs the map and prints each answer as it arrives. Every input gets
/// exactly one line; any job without a value makes the exit code 1. A
/// stream that ends with an error instead (the server refused a later
/// request, or the connection broke) leaves the inputs after the printed
/// ones unanswered: [`Failure::MapStopped`], never a success.
pub(crate) async fn run(client: &JobClient, format: Format, args: &Map) -> Result<(), Failure> {
    let read_error = Arc::new(Mutex::new(None));
    let lines = stdin_lines(Arc::clone(&read_error));
    let mut results = client.map_with(args.options(), lines).await?;
    let (mut total, mut failed) = (0_u64, 0_u64);
    let mut stdout = std::io::stdout().lock();
    loop {
        let item = match results.try_next().await {
            Ok(Some(item)) => item,
            Ok(None) => break,
            Err(error) => {
                return Err(Failure::MapStopped {
                    answered: total,
                    cause: Box::new(error.into()),
                });
            }
        };
        total += 1;
        if item.result.is_err() {
            failed += 1;
        }
        writeln!(stdout, "{}", output::map_item(format, &item))?;
        stdout.flush()?;
    }
    if let Some(error) = read_error
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .take()
    {
        return Err(Failure::Stdin(error));
    }
    if failed > 0 {
        return Err(Failure::MapUnsuccessful { failed, total });
    }
    Ok(())
}

/// Non-empty stdin lines as job arguments (JSON where a line parses as
/// JSON, else the line as a string), read on a thread of their own. A read
/// error ends the input and is kept in `read_error`.
fn stdin_lines(
    read_error: Arc<Mutex<Option<std::io::Error>>>,
) -> impl futures::Stream<Item = serde_json::Value> + Send + 'static {
    let (tx, rx) = mpsc::channel(READ_AHEAD);
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            match line {
                Ok(line) if line.trim().is_empty() => {}
                Ok(line) => {
                    if tx.blocking_send(json_arg(&line)).is_err() {
                        // The map ended early; stop reading.
                        return;
                    }
                }
                Err(error) => {
                    *read_error.lock().unwrap_or_else(PoisonError::into_inner) = Some(error);
                    return;
                }
            }
        }
    });
    futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|value| (value, rx))
    })
}

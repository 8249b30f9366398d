//! `jobctl logs`: a job's log on stdout, as the job wrote it, or followed
//! until the job ends (`kubectl logs -f`).

use std::io::Write as _;

use base64::Engine as _;
use clap::Args;
use futures::StreamExt as _;
use jobd_client::{JobClient, JobId, LogEntry, LogStream};
use serde_json::json;

use crate::{cli::Format, failure::Failure};

#[derive(Debug, Args)]
pub(crate) struct Logs {
    /// The job id that `submit` printed.
    pub(crate) id: JobId,

    /// Keep printing what the job writes until it ends.
    #[arg(short, long)]
    pub(crate) follow: bool,

    /// Start at this byte offset of the log (an entry's `offset` in -o
    /// json), instead of the beginning.
    #[arg(long, value_name = "BYTES", default_value_t = 0)]
    pub(crate) offset: u64,
}

/// `jobctl logs`.
pub(crate) async fn print(client: &JobClient, format: Format, args: &Logs) -> Result<(), Failure> {
    let mut pages = client.logs(args.id, args.offset, args.follow).await?;
    while let Some(page) = pages.next().await {
        let page = page?;
        if page.skipped > 0 {
            eprintln!(
                "jobctl: {} bytes of this log are no longer kept (the server keeps the newest; see jobd --max-log-bytes)",
                page.skipped
            );
        }
        let mut stdout = std::io::stdout().lock();
        for entry in &page.entries {
            match format {
                Format::Text => stdout.write_all(&entry.data)?,
                Format::Json => writeln!(stdout, "{}", entry_json(entry))?,
            }
        }
        stdout.flush()?;
    }
    Ok(())
}

fn entry_json(entry: &LogEntry) -> serde_json::Value {
    let stream = match entry.stream {
        LogStream::Stdout => "stdout",
        LogStream::Stderr => "stderr",
        LogStream::Log => "log",
        _ => "unspecified",
    };
    let mut out = json!({
        "offset": entry.offset,
        "attempt": entry.attempt,
        "stream": stream,
        "at": entry.at.map(crate::output::timestamp),
    });
    match std::str::from_utf8(&entry.data) {
        Ok(text) => out["text"] = json!(text),
        Err(_) => {
            out["data_base64"] =
                json!(base64::engine::general_purpose::STANDARD.encode(&entry.data));
        }
    }
    out
}

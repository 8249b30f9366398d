//! The commands about many jobs at once, `wait` and `list`, and `delete`:
//! their arguments, their one call (or walk of pages), and how their answers
//! are printed.
//!
//! Kept together and apart from `commands`/`output` because they share the
//! listing's types and the choice between a table and JSON lines, which the
//! single-job commands do not need.

use std::{
    collections::BTreeMap,
    io::IsTerminal as _,
    time::{Duration, SystemTime},
};

use clap::{Args, ValueEnum};
use jobd_client::{JobClient, JobId, JobInfo, JobState, ListFilter, ReturnWhen};
use serde_json::json;

use crate::{
    cli::{Format, parse_label, parse_seconds},
    commands::print,
    failure::Failure,
    output::{self, timestamp},
};

/// The server's largest page; `list` never asks for more than it still
/// needs, nor for more than this.
const MAX_PAGE: usize = 1000;

#[derive(Debug, Args)]
pub(crate) struct Wait {
    /// The job ids to wait for (1 to 1000).
    #[arg(required = true, value_name = "ID")]
    pub(crate) ids: Vec<JobId>,

    /// When to stop waiting: when the first job finishes, when the first
    /// job fails (a cancelled job does not count), or when all have
    /// finished.
    #[arg(long, value_enum, default_value_t = When::All)]
    pub(crate) return_when: When,

    /// Stop waiting after this many seconds (fractions allowed) and print
    /// the split at that moment; still exit 0. The jobs keep running.
    #[arg(long, value_name = "SECS", value_parser = parse_seconds, allow_hyphen_values = true)]
    pub(crate) timeout: Option<Duration>,
}

/// `--return-when`, as concurrent.futures.wait's `return_when`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum When {
    /// FIRST_COMPLETED.
    First,
    /// FIRST_EXCEPTION.
    Exception,
    /// ALL_COMPLETED.
    All,
}

#[derive(Debug, Args)]
pub(crate) struct List {
    /// Only jobs in this state; repeat for several states.
    #[arg(long = "state", value_enum, value_name = "STATE")]
    pub(crate) states: Vec<StateArg>,

    /// Only jobs of this function.
    #[arg(long)]
    pub(crate) function: Option<String>,

    /// Only jobs with this label; repeat to require several.
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
    pub(crate) labels: Vec<(String, String)>,

    /// Only jobs submitted after this time: an RFC 3339 timestamp such as
    /// 2026-11-24T18:00:00Z, or a time ago such as 90s, 10m, 2h or 7d.
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    pub(crate) submitted_after: Option<SystemTime>,

    /// Only jobs submitted before this time: an RFC 3339 timestamp, or a
    /// time ago such as 10m (as --submitted-after).
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    pub(crate) submitted_before: Option<SystemTime>,

    /// Print at most this many jobs (newest first).
    #[arg(long, value_name = "N", default_value = "100")]
    pub(crate) limit: usize,
}

/// A job state as typed on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum StateArg {
    /// Queued, not started.
    Pending,
    /// Being executed.
    Running,
    /// Returned a value.
    Succeeded,
    /// Returned an error or panicked.
    Failed,
    /// Cancelled.
    Cancelled,
}

impl From<StateArg> for JobState {
    fn from(state: StateArg) -> Self {
        match state {
            StateArg::Pending => Self::Pending,
            StateArg::Running => Self::Running,
            StateArg::Succeeded => Self::Succeeded,
            StateArg::Failed => Self::Failed,
            StateArg::Cancelled => Self::Cancelled,
        }
    }
}

/// `jobctl wait`: one Wait call; the split is the answer, whatever it is.
pub(crate) async fn wait(client: &JobClient, format: Format, args: &Wait) -> Result<(), Failure> {
    let return_when = match args.return_when {
        When::First => ReturnWhen::FirstCompleted,
        When::Exception => ReturnWhen::FirstException,
        When::All => ReturnWhen::AllCompleted,
    };
    let split = client
        .wait(args.ids.iter().copied(), return_when, args.timeout)
        .await?;
    let ids = |jobs: &[jobd_client::JobHandle]| -> Vec<String> {
        jobs.iter().map(|job| job.id().to_string()).collect()
    };
    let (done, not_done) = (ids(&split.done), ids(&split.not_done));
    print(&match format {
        Format::Text => format!("done: {}\nnot_done: {}", done.join(" "), not_done.join(" "))
            .lines()
            .map(str::trim_end)
            .collect::<Vec<_>>()
            .join("\n"),
        Format::Json => json!({"done": done, "not_done": not_done}).to_string(),
    })
}

/// `jobctl list`: walks pages until `--limit` jobs are printed or there are
/// no more. A table for a person at a terminal; JSON lines for anything
/// else, so a pipe gets something a script can read.
pub(crate) async fn list(client: &JobClient, format: Format, args: &List) -> Result<(), Failure> {
    let filter = ListFilter {
        states: args.states.iter().map(|&s| s.into()).collect(),
        function: args.function.clone(),
        labels: args.labels.iter().cloned().collect(),
        submitted_after: args.submitted_after,
        submitted_before: args.submitted_before,
    };
    let mut jobs = Vec::new();
    let mut token = None;
    while jobs.len() < args.limit {
        let want = (args.limit - jobs.len()).min(MAX_PAGE);
        let page = client
            .list_jobs(&filter, u32::try_from(want).unwrap_or(u32::MAX), token)
            .await?;
        jobs.extend(page.jobs.into_iter().take(want));
        match page.next_page_token {
            Some(next) => token = Some(next),
            None => break,
        }
    }
    let table = format == Format::Text && std::io::stdout().is_terminal();
    if table {
        print(&render_table(&jobs))
    } else if jobs.is_empty() {
        Ok(())
    } else {
        let lines: Vec<String> = jobs
            .iter()
            .map(|job| output::status(Format::Json, job))
            .collect();
        print(&lines.join("\n"))
    }
}

/// `jobctl delete`.
pub(crate) async fn delete(client: &JobClient, format: Format, id: JobId) -> Result<(), Failure> {
    client.job(id).delete().await?;
    print(&match format {
        Format::Text => "deleted".to_owned(),
        Format::Json => json!({"job_id": id.to_string(), "deleted": true}).to_string(),
    })
}

/// An aligned table with a header: one row per job, the columns a person
/// scans for (the rest is in `jobctl status`).
fn render_table(jobs: &[JobInfo]) -> String {
    let rows: Vec<[String; 5]> =
        std::iter::once(["ID", "STATE", "FUNCTION", "SUBMITTED", "LABELS"].map(str::to_owned))
            .chain(jobs.iter().map(|job| {
                let labels: BTreeMap<&str, &str> = job
                    .labels
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect();
                [
                    job.id.to_string(),
                    job.state.to_string(),
                    job.function.clone(),
                    job.submitted_at.map(timestamp).unwrap_or_default(),
                    labels
                        .iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect::<Vec<_>>()
                        .join(","),
                ]
            }))
            .collect();
    output::columns(&rows)
}

/// A point in time for `list`'s time filters: an RFC 3339 timestamp, or a
/// duration with a unit (s, m, h, d; fractions allowed) meaning that long
/// ago.
fn parse_time(raw: &str) -> Result<SystemTime, String> {
    parse_time_at(raw, SystemTime::now())
}

fn parse_time_at(raw: &str, now: SystemTime) -> Result<SystemTime, String> {
    let raw = raw.trim();
    if let Ok(at) = raw.parse::<prost_types::Timestamp>() {
        return SystemTime::try_from(at).map_err(|e| format!("{raw:?} is not a usable time: {e}"));
    }
    let usage = || {
        format!(
            "{raw:?} is neither an RFC 3339 time (2026-11-24T18:00:00Z) nor a time ago \
             (90s, 10m, 2h, 7d)"
        )
    };
    let split = raw
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(usage)?;
    let (number, unit) = raw.split_at(split);
    let n: f64 = number.parse().map_err(|_| usage())?;
    let unit_secs = match unit {
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        "d" => 86_400.0,
        _ => return Err(usage()),
    };
    let ago = Duration::try_from_secs_f64(n * unit_secs).map_err(|_| usage())?;
    now.checked_sub(ago)
        .ok_or_else(|| format!("{raw:?} ago is before the clock's beginning"))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    #[test]
    fn times_are_rfc3339_or_a_duration_ago() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        assert_eq!(
            parse_time_at("2026-11-24T18:00:00Z", now),
            Ok(SystemTime::UNIX_EPOCH + Duration::from_secs(1795543200))
        );
        assert_eq!(
            parse_time_at("1970-01-01T00:01:00+00:00", now),
            Ok(SystemTime::UNIX_EPOCH + Duration::from_secs(60))
        );
        assert_eq!(
            parse_time_at("10m", now),
            Ok(now - Duration::from_secs(600))
        );
        assert_eq!(
            parse_time_at("1.5h", now),
            Ok(now - Duration::from_secs(5400))
        );
        assert_eq!(
            parse_time_at("7d", now),
            Ok(now - Duration::from_secs(7 * 86_400))
        );
        assert_eq!(
            parse_time_at(" 90s ", now),
            Ok(now - Duration::from_secs(90))
        );
        for bad in ["10", "10w", "yesterday", "-5m", "", "2026-13-01T00:00:00Z"] {
            assert!(parse_time_at(bad, now).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn the_table_lines_up() {
        let job = |function: &str, labels: &[(&str, &str)]| JobInfo {
            id: JobId::new(),
            function: function.to_owned(),
            pool: "async".to_owned(),
            state: JobState::Succeeded,
            args: json!(null),
            labels: labels
                .iter()
                .map(|&(k, v)| (k.to_owned(), v.to_owned()))
                .collect::<HashMap<_, _>>(),
            worker_labels: HashMap::new(),
            request_id: None,
            submitted_at: Some(SystemTime::UNIX_EPOCH + Duration::from_secs(86_400)),
            started_at: None,
            finished_at: None,
            attempt: 1,
            priority: 0,
            not_before: None,
            timeout: None,
            max_attempts: 1,
            outcome: None,
            progress: None,
        };
        let jobs = [
            job("hello", &[("b", "2"), ("a", "1")]),
            job("return_future", &[]),
        ];
        let table = render_table(&jobs);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3);
        let column = |line: &str| line.find("FUNCTION").or_else(|| line.find("hello"));
        assert_eq!(column(lines[0]), column(lines[1]));
        assert!(
            lines[1].ends_with("1970-01-02T00:00:00Z  a=1,b=2"),
            "{table}"
        );
        assert!(lines[2].ends_with("1970-01-02T00:00:00Z"), "{table}");
    }
}

//! `jobctl watch`: follows jobs live through the `Watch` stream. One line
//! per event (or one JSON object per line with `-o json`); on a terminal, in
//! text, a progress bar per job instead, kept up to date in place.
//!
//! Watching ids ends when each has finished (exit 1 if one failed or was
//! cancelled, as `result` does); watching a filter runs until Ctrl-C or
//! `--count` events.

use std::{collections::HashMap, io::IsTerminal as _, time::Duration};

use clap::Args;
use futures::StreamExt as _;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use jobd_client::{JobClient, JobEvent, JobEventKind, JobId, JobState, Watch as WatchSpec};
use serde_json::json;

use crate::{
    cli::{Format, parse_label},
    failure::Failure,
    output,
    sets::StateArg,
};

#[derive(Debug, Args)]
pub(crate) struct Watch {
    /// Jobs to follow (1 to 1000) until each has finished. Without ids,
    /// every job's events from now on (narrowed by the filters) until
    /// Ctrl-C.
    #[arg(value_name = "ID")]
    pub(crate) ids: Vec<JobId>,

    /// Only jobs of this function (not with ids).
    #[arg(long, conflicts_with = "ids")]
    pub(crate) function: Option<String>,

    /// Only events into this state; repeat for several (not with ids).
    /// Progress events count as running.
    #[arg(
        long = "state",
        value_enum,
        value_name = "STATE",
        conflicts_with = "ids"
    )]
    pub(crate) states: Vec<StateArg>,

    /// Only jobs with this label; repeat to require several (not with ids).
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label, conflicts_with = "ids")]
    pub(crate) labels: Vec<(String, String)>,

    /// Exit 0 after this many events (for scripts).
    #[arg(long, value_name = "N")]
    pub(crate) count: Option<u64>,
}

/// `jobctl watch`.
pub(crate) async fn watch(client: &JobClient, format: Format, args: &Watch) -> Result<(), Failure> {
    let spec = WatchSpec {
        ids: args.ids.clone(),
        function: args.function.clone(),
        states: args.states.iter().map(|&s| s.into()).collect(),
        labels: args.labels.iter().cloned().collect(),
        resume: None,
        // A blip in the connection should not end a long watch in a shell;
        // a restarted server still does (FAILED_PRECONDITION).
        auto_resume: true,
    };
    let mut events = client.watch(spec).await?;
    let mut view = View::new(format);
    let mut printed = 0;
    let mut unsuccessful = None;
    let follow = async {
        while let Some(event) = events.next().await {
            let event = event?;
            if unsuccessful.is_none() {
                unsuccessful = failure_of(&event);
            }
            view.show(&event)?;
            printed += 1;
            if args.count.is_some_and(|count| printed >= count) {
                break;
            }
        }
        Ok::<_, Failure>(())
    };
    tokio::select! {
        result = follow => result?,
        // Ctrl-C is how a filter watch ends; no job is affected.
        Ok(()) = tokio::signal::ctrl_c() => return Ok(()),
    }
    match unsuccessful {
        Some(failure) if !args.ids.is_empty() && args.count.is_none() => Err(failure),
        _ => Ok(()),
    }
}

/// The exit-1 failure a final event stands for, if the job did not succeed.
fn failure_of(event: &JobEvent) -> Option<Failure> {
    let outcome = event.outcome.as_ref()?;
    let (_, message) = outcome.result.as_ref().err()?;
    Some(Failure::Job {
        id: event.job?,
        state: outcome.state,
        message: message.clone(),
    })
}

/// Where events go: lines on stdout, or bars on a terminal.
enum View {
    Lines(Format),
    Bars {
        bars: MultiProgress,
        by_job: HashMap<JobId, ProgressBar>,
    },
}

/// Positions of a bar: progress fractions in thousandths.
const BAR_LENGTH: u64 = 1000;

impl View {
    fn new(format: Format) -> Self {
        if format == Format::Text && std::io::stdout().is_terminal() {
            Self::Bars {
                bars: MultiProgress::with_draw_target(ProgressDrawTarget::stdout()),
                by_job: HashMap::new(),
            }
        } else {
            Self::Lines(format)
        }
    }

    fn show(&mut self, event: &JobEvent) -> Result<(), Failure> {
        match self {
            Self::Lines(format) => crate::commands::print(&line(*format, event)),
            Self::Bars { bars, by_job } => {
                let Some(id) = event.job else {
                    bars.println(line(Format::Text, event))?;
                    return Ok(());
                };
                let bar = by_job.entry(id).or_insert_with(|| {
                    let bar = bars.add(ProgressBar::new(BAR_LENGTH).with_style(bar_style()));
                    bar.set_prefix(id.to_string());
                    bar.enable_steady_tick(Duration::from_millis(200));
                    bar
                });
                if let Some(progress) = &event.progress {
                    bar.set_position(position(progress.fraction));
                }
                let state = event.state.map_or("?", JobState::as_str);
                let note = event.progress.as_ref().map_or("", |p| p.message.as_str());
                bar.set_message(format!("{state:<9} {note}"));
                if event.state.is_some_and(JobState::is_terminal) {
                    bar.finish_with_message(describe(event));
                    by_job.remove(&id);
                }
                Ok(())
            }
        }
    }
}

fn bar_style() -> ProgressStyle {
    ProgressStyle::with_template("{prefix} [{bar:30}] {percent:>3}% {msg}")
        .map(|style| style.progress_chars("=> "))
        .unwrap_or_else(|_| ProgressStyle::default_bar())
}

fn position(fraction: f64) -> u64 {
    // In 0..=1, so the product is in 0..=1000.
    (fraction.clamp(0.0, 1.0) * BAR_LENGTH as f64).round() as u64
}

/// One event as a line: `ID STATE [PERCENT MESSAGE] [VALUE | ERROR]` in
/// text, one JSON object in JSON.
fn line(format: Format, event: &JobEvent) -> String {
    match format {
        Format::Text => {
            if event.kind == JobEventKind::Lagged {
                return format!(
                    "lagged: {} events were missed; re-read state with `jobctl list` or `jobctl status`",
                    event.missed
                );
            }
            let id = event.job.map(|id| id.to_string()).unwrap_or_default();
            format!("{id}  {}", describe(event))
        }
        Format::Json => {
            let mut object = json!({
                "seq": event.seq,
                "epoch": event.epoch,
                "kind": event.kind.as_str(),
                "job_id": event.job.map(|id| id.to_string()),
                "function": Some(&event.function).filter(|f| !f.is_empty()),
                "state": event.state.map(JobState::as_str),
                "attempt": event.attempt,
                "progress": event.progress.as_ref().map(|p| json!({
                    "fraction": p.fraction,
                    "message": p.message,
                })),
                "value": null,
                "error": null,
                "missed": event.missed,
            });
            if let Some(outcome) = &event.outcome {
                match &outcome.result {
                    Ok(value) => object["value"] = value.clone(),
                    Err((kind, message)) => object["error"] = output::error(*kind, message),
                }
            }
            object.to_string()
        }
    }
}

/// A job event without its id: `STATE [PERCENT MESSAGE] [VALUE | ERROR]`.
fn describe(event: &JobEvent) -> String {
    let mut parts = vec![event.state.map_or("?", JobState::as_str).to_owned()];
    if let Some(progress) = &event.progress {
        parts.push(format!("{:.0}%", progress.fraction * 100.0));
        if !progress.message.is_empty() {
            parts.push(progress.message.clone());
        }
    }
    if let Some(outcome) = &event.outcome
        && let Some(id) = event.job
    {
        parts.push(
            output::outcome(Format::Text, id, outcome).unwrap_or_else(|| {
                outcome
                    .result
                    .as_ref()
                    .err()
                    .map(|(_, message)| message.clone())
                    .unwrap_or_default()
            }),
        );
    }
    parts.join("  ")
}

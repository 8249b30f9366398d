//! How each answer is written on stdout, in both formats: plain text for
//! people, one compact JSON object per line for scripts.
//!
//! The functions are pure (answer in, text out) so the formats can be tested
//! without a server, and so that a format is decided in one place.

use std::{collections::BTreeMap, time::SystemTime};

use jobd_client::{
    CancelOutcome, CancelReport, Error as ClientError, ErrorKind, FunctionInfo, JobId, JobInfo,
    JobOutcome, JobState, MapItem, PoolKind,
};
use serde_json::{Value, json};

use crate::cli::Format;

/// What `submit` prints: the id alone, so that `id=$(jobctl submit ...)`
/// works.
pub(crate) fn submitted(format: Format, id: JobId, state: JobState) -> String {
    match format {
        Format::Text => id.to_string(),
        Format::Json => json!({"job_id": id.to_string(), "state": state.as_str()}).to_string(),
    }
}

/// What `result` (and `submit --wait`) prints for a finished job. In text a
/// job without a value prints nothing on stdout: its reason goes to stderr.
pub(crate) fn outcome(format: Format, id: JobId, outcome: &JobOutcome) -> Option<String> {
    match (format, &outcome.result) {
        (Format::Text, Ok(value)) => Some(raw(value)),
        (Format::Text, Err(_)) => None,
        (Format::Json, result) => {
            let mut object = json!({"job_id": id.to_string(), "state": outcome.state.as_str()});
            match result {
                Ok(value) => object["value"] = value.clone(),
                Err((kind, message)) => object["error"] = error(*kind, message),
            }
            Some(object.to_string())
        }
    }
}

/// What `map` prints for one argument: the value (text: raw, as `result`
/// prints it) or why there is none, one line either way.
pub(crate) fn map_item(format: Format, item: &MapItem) -> String {
    if format == Format::Text {
        return match &item.result {
            Ok(value) => raw(value),
            Err(failure) => format!("error: {}", failure.to_string().replace('\n', " ")),
        };
    }
    let mut object = json!({
        "index": item.index,
        "job_id": item.job.map(|id| id.to_string()),
    });
    let (state, detail) = match &item.result {
        Ok(value) => (JobState::Succeeded.as_str(), ("value", value.clone())),
        Err(ClientError::JobFailed { kind, message, .. }) => {
            (JobState::Failed.as_str(), ("error", error(*kind, message)))
        }
        Err(ClientError::Cancelled { .. }) => (
            JobState::Cancelled.as_str(),
            ("error", error(ErrorKind::Cancelled, "cancelled")),
        ),
        // No job was made: the server refused the argument.
        Err(refused) => (
            "rejected",
            (
                "error",
                json!({
                    "kind": "rejected",
                    "code": refused.code().map(i32::from),
                    "message": refused.to_string(),
                }),
            ),
        ),
    };
    object["state"] = json!(state);
    object[detail.0] = detail.1;
    object.to_string()
}

/// What `done` prints.
pub(crate) fn done(format: Format, id: JobId, state: JobState) -> String {
    match format {
        Format::Text => state.is_terminal().to_string(),
        Format::Json => json!({
            "job_id": id.to_string(),
            "done": state.is_terminal(),
            "state": state.as_str(),
        })
        .to_string(),
    }
}

/// What `cancel` prints.
pub(crate) fn cancel(format: Format, id: JobId, report: &CancelReport) -> String {
    match format {
        Format::Text => match report.outcome {
            CancelOutcome::Cancelled => "cancelled".to_owned(),
            CancelOutcome::Aborted => "aborted".to_owned(),
            CancelOutcome::Requested => {
                "requested (not cancelled yet: the blocking function must honour it)".to_owned()
            }
            CancelOutcome::AlreadyDone => "already done".to_owned(),
            // Unspecified, or an outcome the library learnt after this
            // match was written (the enum is non-exhaustive).
            _ => format!(
                "unknown outcome (the job is {}; this jobctl may be older than the server)",
                report.state
            ),
        },
        Format::Json => json!({
            "job_id": id.to_string(),
            "outcome": report.outcome.as_str(),
            "cancelled": report.cancelled,
            "state": report.state.as_str(),
        })
        .to_string(),
    }
}

/// What `status` prints: aligned `key: value` lines, or one JSON object.
/// Text leaves out what the job does not have yet (start and finish times,
/// result); JSON keeps every key, with null, so scripts see one shape.
pub(crate) fn status(format: Format, job: &JobInfo) -> String {
    let time = |t: Option<SystemTime>| t.map(timestamp);
    let labels = sorted(&job.labels);
    let worker_labels = sorted(&job.worker_labels);
    match format {
        Format::Text => {
            let mut rows = vec![
                ("job_id", job.id.to_string()),
                ("function", job.function.clone()),
                ("pool", job.pool.clone()),
                ("state", job.state.to_string()),
                ("args", job.args.to_string()),
            ];
            for (key, labels) in [("labels", &labels), ("worker_labels", &worker_labels)] {
                if !labels.is_empty() {
                    let pairs: Vec<String> =
                        labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    rows.push((key, pairs.join(", ")));
                }
            }
            if let Some(request_id) = &job.request_id {
                rows.push(("request_id", request_id.clone()));
            }
            for (key, at) in [
                ("submitted", job.submitted_at),
                ("started", job.started_at),
                ("finished", job.finished_at),
                ("not_before", job.not_before),
            ] {
                if let Some(at) = time(at) {
                    rows.push((key, at));
                }
            }
            rows.push(("attempt", job.attempt.to_string()));
            if job.priority != 0 {
                rows.push(("priority", job.priority.to_string()));
            }
            if let Some(progress) = &job.progress {
                let percent = format!("{:.0}%", progress.fraction * 100.0);
                rows.push(("progress", format!("{percent} {}", progress.message)));
            }
            match job.outcome.as_ref().map(|o| &o.result) {
                Some(Ok(value)) => rows.push(("value", value.to_string())),
                Some(Err((kind, message))) => {
                    rows.push(("error", format!("{}: {message}", kind.as_str())));
                }
                None => {}
            }
            aligned(&rows)
        }
        Format::Json => {
            let mut object = json!({
                "job_id": job.id.to_string(),
                "function": job.function,
                "pool": job.pool,
                "state": job.state.as_str(),
                "args": job.args,
                "labels": labels,
                "worker_labels": worker_labels,
                "request_id": job.request_id,
                "submit_time": time(job.submitted_at),
                "start_time": time(job.started_at),
                "finish_time": time(job.finished_at),
                "attempt": job.attempt,
                "priority": job.priority,
                "not_before": time(job.not_before),
                "value": null,
                "error": null,
                "progress": job.progress.as_ref().map(|p| json!({
                    "fraction": p.fraction,
                    "message": p.message,
                })),
            });
            match job.outcome.as_ref().map(|o| &o.result) {
                Some(Ok(value)) => object["value"] = value.clone(),
                Some(Err((kind, message))) => object["error"] = error(*kind, message),
                None => {}
            }
            object.to_string()
        }
    }
}

/// What `functions` prints: an aligned table with a header, each function
/// followed by its argument schema (compact JSON) and what it returns when
/// it declared them, and for one served by remote workers how many serve it
/// now; or one JSON object per function.
pub(crate) fn functions(format: Format, functions: &[FunctionInfo]) -> String {
    match format {
        Format::Text => {
            let name_width = functions.iter().map(|f| f.name.len()).max().unwrap_or(0);
            let pool_width = functions.iter().map(|f| f.pool.len()).max().unwrap_or(0);
            let (name_width, pool_width) = (name_width.max(4), pool_width.max(4));
            let row = |name: &str, pool: &str, text: &str| {
                format!("{name:<name_width$}  {pool:<pool_width$}  {text}")
                    .trim_end()
                    .to_owned()
            };
            let mut lines = vec![row("NAME", "POOL", "DESCRIPTION")];
            for f in functions {
                lines.push(row(&f.name, &f.pool, &f.description));
                if let Some(schema) = &f.args_schema {
                    lines.push(row("", "", &format!("args: {schema}")));
                }
                if let Some(returns) = &f.returns {
                    lines.push(row("", "", &format!("returns: {returns}")));
                }
                if f.pool_kind == PoolKind::Worker {
                    lines.push(row("", "", &served_by(f.workers)));
                }
            }
            lines.join("\n")
        }
        Format::Json => functions
            .iter()
            .map(|f| {
                json!({
                    "name": f.name,
                    "pool": f.pool,
                    "pool_kind": f.pool_kind.as_str(),
                    // Only worker-served functions have workers to count.
                    "workers": (f.pool_kind == PoolKind::Worker).then_some(f.workers),
                    "description": f.description,
                    "args_schema": f.args_schema,
                    "returns": f.returns,
                })
                .to_string()
            })
            .collect::<Vec<_>>()
            .join("\n"),
    }
}

/// The line under a worker-served function: who serves it now.
fn served_by(workers: u32) -> String {
    match workers {
        0 => "served by no worker now (its jobs wait for one)".to_owned(),
        1 => "served by 1 worker".to_owned(),
        n => format!("served by {n} workers"),
    }
}

/// Labels sorted by key, for output that does not change from run to run.
fn sorted(labels: &std::collections::HashMap<String, String>) -> BTreeMap<&str, &str> {
    labels
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect()
}

/// A result as a shell user wants it: a string as-is (so `$(jobctl result
/// ID)` is the text itself), anything else as compact JSON.
fn raw(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

pub(crate) fn error(kind: ErrorKind, message: &str) -> Value {
    json!({"kind": kind.as_str(), "message": message})
}

/// RFC 3339 in UTC, as the protobuf JSON mapping writes timestamps.
pub(crate) fn timestamp(at: SystemTime) -> String {
    prost_types::Timestamp::from(at).to_string()
}

/// Rows as a table of left-aligned columns two spaces apart, the first row
/// being the header; no trailing spaces.
pub(crate) fn columns<const N: usize>(rows: &[[String; N]]) -> String {
    let mut widths = [0; N];
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    rows.iter()
        .map(|row| {
            row.iter()
                .zip(widths)
                .map(|(cell, width)| format!("{cell:<width$}"))
                .collect::<Vec<_>>()
                .join("  ")
                .trim_end()
                .to_owned()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn aligned(rows: &[(&str, String)]) -> String {
    let width = rows.iter().map(|(key, _)| key.len()).max().unwrap_or(0) + 1;
    rows.iter()
        .map(|(key, value)| format!("{:<width$} {value}", format!("{key}:")))
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use std::{collections::HashMap, time::Duration};

    use super::*;

    fn succeeded(value: Value) -> JobOutcome {
        JobOutcome {
            state: JobState::Succeeded,
            result: Ok(value),
        }
    }

    #[test]
    fn map_items_are_one_line_each_in_both_formats() {
        let id = JobId::new();
        let item = |result| MapItem {
            index: 7,
            job: Some(id),
            result,
        };
        let ok = item(Ok(json!("hi")));
        assert_eq!(map_item(Format::Text, &ok), "hi");
        let json_ok: Value = serde_json::from_str(&map_item(Format::Json, &ok)).unwrap();
        assert_eq!(
            json_ok,
            json!({"index": 7, "job_id": id.to_string(), "state": "succeeded", "value": "hi"})
        );

        let failed = item(Err(ClientError::JobFailed {
            id,
            kind: ErrorKind::Panicked,
            message: "boom\nline two".into(),
        }));
        let text = map_item(Format::Text, &failed);
        assert!(
            text.starts_with("error: job ") && !text.contains('\n'),
            "{text}"
        );
        let json_failed: Value = serde_json::from_str(&map_item(Format::Json, &failed)).unwrap();
        assert_eq!(json_failed["state"], "failed");
        assert_eq!(json_failed["error"]["kind"], "panicked");

        let cancelled = item(Err(ClientError::Cancelled { id }));
        let json_cancelled: Value =
            serde_json::from_str(&map_item(Format::Json, &cancelled)).unwrap();
        assert_eq!(json_cancelled["state"], "cancelled");

        let refused = MapItem {
            index: 8,
            job: None,
            result: Err(ClientError::Rpc(tonic::Status::resource_exhausted(
                "queue full",
            ))),
        };
        let json_refused: Value = serde_json::from_str(&map_item(Format::Json, &refused)).unwrap();
        assert_eq!(json_refused["state"], "rejected");
        assert_eq!(json_refused["job_id"], Value::Null);
        assert_eq!(json_refused["error"]["code"], 8);
        assert!(map_item(Format::Text, &refused).contains("queue full"));
    }

    #[test]
    fn text_results_print_strings_raw_and_the_rest_as_json() {
        let id = JobId::new();
        let text = |v| outcome(Format::Text, id, &succeeded(v)).unwrap();
        assert_eq!(text(json!("Hello, Ann!")), "Hello, Ann!");
        assert_eq!(text(json!({"x": [1, 2]})), r#"{"x":[1,2]}"#);
        assert_eq!(text(json!(null)), "null");
        let failed = JobOutcome {
            state: JobState::Failed,
            result: Err((ErrorKind::Failed, "boom".to_owned())),
        };
        assert_eq!(outcome(Format::Text, id, &failed), None);
    }

    #[test]
    fn json_results_carry_a_value_or_an_error() {
        let id = JobId::new();
        let ok: Value =
            serde_json::from_str(&outcome(Format::Json, id, &succeeded(json!(1))).unwrap())
                .unwrap();
        assert_eq!(
            ok,
            json!({"job_id": id.to_string(), "state": "succeeded", "value": 1})
        );
        let failed = JobOutcome {
            state: JobState::Failed,
            result: Err((ErrorKind::Panicked, "boom".to_owned())),
        };
        let line = outcome(Format::Json, id, &failed).unwrap();
        assert!(!line.contains('\n'));
        let failed: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(
            failed,
            json!({"job_id": id.to_string(), "state": "failed",
                   "error": {"kind": "panicked", "message": "boom"}})
        );
    }

    #[test]
    fn status_text_is_aligned_and_skips_what_is_not_there() {
        let job = JobInfo {
            id: JobId::new(),
            function: "hello".to_owned(),
            pool: "async".to_owned(),
            state: JobState::Pending,
            args: json!("Ann"),
            labels: HashMap::from([("team".to_owned(), "infra".to_owned())]),
            worker_labels: HashMap::new(),
            request_id: None,
            submitted_at: Some(SystemTime::UNIX_EPOCH + Duration::from_secs(86_400)),
            started_at: None,
            finished_at: None,
            attempt: 0,
            priority: 0,
            not_before: None,
            timeout: None,
            max_attempts: 1,
            outcome: None,
            progress: None,
        };
        let text = status(Format::Text, &job);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], format!("job_id:    {}", job.id));
        assert_eq!(lines[4], r#"args:      "Ann""#);
        assert_eq!(lines[5], "labels:    team=infra");
        assert_eq!(lines[6], "submitted: 1970-01-02T00:00:00Z");
        assert_eq!(lines[7], "attempt:   0");
        assert_eq!(lines.len(), 8);
        let json: Value = serde_json::from_str(&status(Format::Json, &job)).unwrap();
        assert_eq!(json["start_time"], Value::Null);
        assert_eq!(json["labels"], json!({"team": "infra"}));
    }

    #[test]
    fn functions_table_lines_up() {
        let f = |name: &str, pool: &str| FunctionInfo {
            name: name.to_owned(),
            pool: pool.to_owned(),
            pool_kind: if pool == "async" {
                PoolKind::Async
            } else {
                PoolKind::Blocking
            },
            workers: 0,
            description: format!("about {name}"),
            args_schema: None,
            returns: None,
        };
        let described = FunctionInfo {
            args_schema: Some(json!({"type": "string"})),
            returns: Some("a greeting".to_owned()),
            ..f("hello", "async")
        };
        let table = functions(
            Format::Text,
            &[
                f("echo", "async"),
                described.clone(),
                f("return_future", "blocking"),
            ],
        );
        assert_eq!(
            table,
            "NAME           POOL      DESCRIPTION\n\
             echo           async     about echo\n\
             hello          async     about hello\n\
             \x20                        args: {\"type\":\"string\"}\n\
             \x20                        returns: a greeting\n\
             return_future  blocking  about return_future"
        );
        let json: Value = serde_json::from_str(&functions(Format::Json, &[described])).unwrap();
        assert_eq!(json["args_schema"], json!({"type": "string"}));
        assert_eq!(json["returns"], "a greeting");
        assert_eq!(json["pool_kind"], "async");
        assert_eq!(json["workers"], Value::Null);
    }

    #[test]
    fn worker_served_functions_say_how_many_workers_serve_them() {
        let remote = |workers| FunctionInfo {
            name: "resize".to_owned(),
            pool: "worker".to_owned(),
            pool_kind: PoolKind::Worker,
            workers,
            description: "Resizes an image".to_owned(),
            args_schema: None,
            returns: None,
        };
        assert_eq!(
            functions(Format::Text, &[remote(2)]),
            "NAME    POOL    DESCRIPTION\n\
             resize  worker  Resizes an image\n\
             \x20               served by 2 workers"
        );
        assert!(
            functions(Format::Text, &[remote(0)])
                .ends_with("served by no worker now (its jobs wait for one)")
        );
        let json: Value = serde_json::from_str(&functions(Format::Json, &[remote(0)])).unwrap();
        assert_eq!(json["pool_kind"], "worker");
        assert_eq!(json["workers"], 0);
    }

    #[test]
    fn a_job_lost_with_its_worker_says_so_with_its_worker_labels() {
        let job = JobInfo {
            id: JobId::new(),
            function: "resize".to_owned(),
            pool: "worker".to_owned(),
            state: JobState::Failed,
            args: json!(null),
            labels: HashMap::new(),
            worker_labels: HashMap::from([("gpu".to_owned(), "true".to_owned())]),
            request_id: None,
            submitted_at: None,
            started_at: None,
            finished_at: None,
            attempt: 3,
            priority: 0,
            not_before: None,
            timeout: None,
            max_attempts: 1,
            outcome: Some(JobOutcome {
                state: JobState::Failed,
                result: Err((ErrorKind::WorkerLost, "lost its worker 3 times".to_owned())),
            }),
            progress: None,
        };
        let text = status(Format::Text, &job);
        assert!(text.contains("\nworker_labels: gpu=true\n"), "{text}");
        assert!(
            text.ends_with("error:         worker_lost: lost its worker 3 times"),
            "{text}"
        );
        let json: Value = serde_json::from_str(&status(Format::Json, &job)).unwrap();
        assert_eq!(json["worker_labels"], json!({"gpu": "true"}));
        assert_eq!(json["error"]["kind"], "worker_lost");
    }
}

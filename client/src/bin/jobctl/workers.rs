//! `jobctl workers`: the remote worker sessions attached to jobd, as a table
//! for a person at a terminal or one JSON object per worker for anything
//! else, the way `jobctl list` prints jobs.
//!
//! Apart from `output` because, like `list`, it chooses between a table and
//! JSON lines by where stdout goes, and its ages are relative to now.

use std::{
    collections::BTreeMap,
    io::IsTerminal as _,
    time::{Duration, SystemTime},
};

use jobd_client::{JobClient, WorkerInfo};
use serde_json::{Value, json};

use crate::{
    cli::Format,
    commands::print,
    failure::Failure,
    output::{self, timestamp},
};

/// How many function names and running job ids a table cell shows before
/// it says how many more there are (JSON has them all).
const CELL_ITEMS: usize = 3;

/// `jobctl workers`.
pub(crate) async fn list(client: &JobClient, format: Format) -> Result<(), Failure> {
    let workers = client.workers().await?;
    let now = SystemTime::now();
    if format == Format::Text && std::io::stdout().is_terminal() {
        print(&table(&workers, now))
    } else if workers.is_empty() {
        Ok(())
    } else {
        let lines: Vec<String> = workers
            .iter()
            .map(|worker| json_line(worker, now).to_string())
            .collect();
        print(&lines.join("\n"))
    }
}

/// One worker as a JSON object: every field, with times in RFC 3339 and the
/// heartbeat's age in seconds.
fn json_line(worker: &WorkerInfo, now: SystemTime) -> Value {
    let labels: BTreeMap<&str, &str> = worker
        .labels
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    json!({
        "session_id": worker.session_id,
        "name": worker.name,
        "instance": worker.instance,
        "peer": worker.peer,
        "version": worker.version,
        "functions": worker.functions,
        "labels": labels,
        "slots": worker.slots,
        "busy": worker.busy,
        "free": worker.slots.saturating_sub(worker.busy),
        "running": worker.running.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "last_heartbeat": worker.last_heartbeat.map(timestamp),
        "last_heartbeat_age_secs": worker.last_heartbeat.map(|at| age(at, now).as_secs_f64()),
        "attached_at": worker.attached_at.map(timestamp),
        "draining": worker.draining,
    })
}

/// An aligned table with a header: the columns a person scans for.
fn table(workers: &[WorkerInfo], now: SystemTime) -> String {
    let header = [
        "NAME",
        "INSTANCE",
        "PEER",
        "FUNCTIONS",
        "BUSY/FREE",
        "RUNNING",
        "HEARTBEAT",
        "DRAINING",
    ]
    .map(str::to_owned);
    let rows: Vec<[String; 8]> = std::iter::once(header)
        .chain(workers.iter().map(|worker| {
            [
                worker.name.clone(),
                // A UUID's first group tells the instances in one table
                // apart; JSON has the whole id.
                worker.instance.chars().take(8).collect(),
                worker.peer.clone(),
                few(worker.functions.iter().map(String::as_str)),
                format!(
                    "{}/{}",
                    worker.busy,
                    worker.slots.saturating_sub(worker.busy)
                ),
                few(worker.running.iter().map(ToString::to_string)),
                worker
                    .last_heartbeat
                    .map(|at| format!("{} ago", short_age(age(at, now))))
                    .unwrap_or_default(),
                if worker.draining { "yes" } else { "no" }.to_owned(),
            ]
        }))
        .collect();
    output::columns(&rows)
}

/// The first few items, comma-separated, and how many more there are.
fn few<S: AsRef<str>>(items: impl ExactSizeIterator<Item = S>) -> String {
    let total = items.len();
    let shown: Vec<String> = items
        .take(CELL_ITEMS)
        .map(|item| item.as_ref().to_owned())
        .collect();
    match total.saturating_sub(CELL_ITEMS) {
        0 => shown.join(","),
        more => format!("{} +{more}", shown.join(",")),
    }
}

/// How long ago `at` was; zero for a time ahead of this machine's clock.
fn age(at: SystemTime, now: SystemTime) -> Duration {
    now.duration_since(at).unwrap_or_default()
}

/// An age in its largest whole unit: 4s, 2m, 3h, 5d.
fn short_age(age: Duration) -> String {
    let secs = age.as_secs();
    match secs {
        0..60 => format!("{secs}s"),
        60..3_600 => format!("{}m", secs / 60),
        3_600..86_400 => format!("{}h", secs / 3_600),
        _ => format!("{}d", secs / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use jobd_client::JobId;

    use super::*;

    fn worker(name: &str, functions: &[&str], running: usize) -> WorkerInfo {
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        WorkerInfo {
            session_id: format!("s-{name}"),
            name: name.to_owned(),
            instance: "0d9f2a4e-1111-4222-8333-444455556666".to_owned(),
            peer: "10.0.0.7:51234".to_owned(),
            functions: functions.iter().map(|&f| f.to_owned()).collect(),
            labels: HashMap::from([("gpu".to_owned(), "true".to_owned())]),
            slots: 8,
            busy: u32::try_from(running).unwrap(),
            running: (0..running).map(|_| JobId::new()).collect(),
            last_heartbeat: Some(at),
            attached_at: Some(at - Duration::from_secs(3_600)),
            version: "jobd-client 0.1.0".to_owned(),
            draining: running == 0,
        }
    }

    #[test]
    fn the_table_lines_up_and_shortens_long_cells() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_004);
        let workers = [
            worker("gpu-box", &["resize"], 1),
            worker("w", &["a", "b", "c", "d", "e"], 0),
        ];
        let table = table(&workers, now);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3);
        let column = |line: &str, text: &str| line.find(text);
        assert_eq!(column(lines[0], "PEER"), column(lines[1], "10.0.0.7"));
        assert_eq!(column(lines[0], "BUSY/FREE"), column(lines[1], "1/7"));
        assert!(lines[1].contains("  0d9f2a4e  "), "{table}");
        assert!(lines[1].ends_with("4s ago     no"), "{table}");
        assert!(lines[2].contains("a,b,c +2"), "{table}");
        assert!(lines[2].ends_with("yes"), "{table}");
        assert_eq!(table.lines().next().map(str::trim_end), Some(lines[0]));
    }

    #[test]
    fn json_has_every_field() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_090);
        let one = worker("gpu-box", &["resize", "crop"], 2);
        let line = json_line(&one, now);
        assert_eq!(line["instance"], one.instance);
        assert_eq!(line["functions"], json!(["resize", "crop"]));
        assert_eq!(line["labels"], json!({"gpu": "true"}));
        assert_eq!(
            (
                line["slots"].as_u64(),
                line["busy"].as_u64(),
                line["free"].as_u64()
            ),
            (Some(8), Some(2), Some(6))
        );
        assert_eq!(line["running"].as_array().map(Vec::len), Some(2));
        assert_eq!(line["last_heartbeat"], "1970-01-12T13:46:40Z");
        assert_eq!(line["last_heartbeat_age_secs"], 90.0);
        assert_eq!(line["draining"], false);
        assert!(!line.to_string().contains('\n'));
    }

    #[test]
    fn ages_are_short() {
        let s = |secs| short_age(Duration::from_secs(secs));
        assert_eq!(
            [s(0), s(59), s(60), s(7_199), s(86_400)],
            ["0s", "59s", "1m", "1h", "1d"]
        );
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(10);
        assert_eq!(age(now + Duration::from_secs(5), now), Duration::ZERO);
    }
}

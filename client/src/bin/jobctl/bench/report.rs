//! What `bench` prints: an aligned table for people, or one JSON object for
//! scripts. Pure functions of the figures, so the formats are tested without
//! a server.

use std::time::Duration;

use serde_json::{Value, json};

use super::load::Phase;
use crate::cli::{BenchMode, Format};

/// Everything one `jobctl bench` run measured, and how it was set up.
#[derive(Debug)]
pub(crate) struct Report {
    pub(crate) mode: BenchMode,
    pub(crate) function: String,
    /// The pool asked for (`--pool`); `None`: the function's own.
    pub(crate) pool: Option<String>,
    pub(crate) payload_bytes: usize,
    pub(crate) connections: u32,
    pub(crate) concurrency: u32,
    pub(crate) warmup: Duration,
    /// How many times the floor and the mode alternated.
    pub(crate) rounds: u32,
    /// Jobs per SubmitBatch call, in batch mode.
    pub(crate) batch_size: Option<u32>,
    /// The gRPC floor: health checks, measured first.
    pub(crate) floor: Measured,
    /// The mode's own phase; `None` in floor mode.
    pub(crate) run: Option<Measured>,
    pub(crate) server_pid: Option<u32>,
    /// The server's resident memory just before the mode's phase.
    pub(crate) rss_before: Option<u64>,
    /// The server's resident memory after it.
    pub(crate) rss_after: Option<u64>,
    /// The remote worker that served the jobs (`--worker-slots`); `None`
    /// when jobd's own pools ran them.
    pub(crate) worker: Option<RemoteWorker>,
}

/// The worker a `--worker-slots` bench started.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RemoteWorker {
    pub(crate) slots: u32,
    pub(crate) pid: u32,
}

/// One phase's figures.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Measured {
    /// Jobs (or floor requests) that succeeded.
    pub(crate) ok: u64,
    pub(crate) errors: u64,
    pub(crate) first_error: Option<String>,
    pub(crate) elapsed: Duration,
    /// Latency percentiles of successful requests, in microseconds.
    pub(crate) p50_us: u64,
    pub(crate) p90_us: u64,
    pub(crate) p99_us: u64,
    pub(crate) max_us: u64,
    /// The server's CPU time in the measured window, with `--server-pid`.
    pub(crate) server_cpu: Option<Duration>,
}

impl From<Phase> for Measured {
    fn from(phase: Phase) -> Self {
        let at = |q| phase.latency.value_at_quantile(q);
        Self {
            ok: phase.ok,
            errors: phase.errors,
            p50_us: at(0.50),
            p90_us: at(0.90),
            p99_us: at(0.99),
            max_us: phase.latency.max(),
            first_error: phase.first_error,
            elapsed: phase.elapsed,
            server_cpu: phase.server_cpu,
        }
    }
}

impl Measured {
    /// The server's CPU time per success, in microseconds.
    pub(crate) fn server_cpu_us_per_op(&self) -> Option<f64> {
        let cpu = self.server_cpu?;
        (self.ok > 0).then(|| cpu.as_secs_f64() * 1e6 / self.ok as f64)
    }

    /// Successes per second.
    pub(crate) fn rate(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.ok as f64 / secs
        } else {
            0.0
        }
    }
}

impl Report {
    /// The mode's jobs/s over the floor's RPC/s.
    fn ratio(&self) -> Option<f64> {
        let floor = self.floor.rate();
        self.run
            .as_ref()
            .filter(|_| floor > 0.0)
            .map(|run| run.rate() / floor)
    }

    /// The floor's server CPU per RPC over the mode's server CPU per job:
    /// like `ratio`, but of the server's own cost, so the client's share of
    /// the machine and other load on it matter less.
    fn cpu_ratio(&self) -> Option<f64> {
        let floor = self.floor.server_cpu_us_per_op()?;
        let run = self.run.as_ref()?.server_cpu_us_per_op()?;
        (run > 0.0).then(|| floor / run)
    }

    /// Server memory added per counted job, when it was measured. Only
    /// without warmup: the warmup's jobs are in the server's memory too, but
    /// not in the count.
    fn rss_per_job(&self) -> Option<f64> {
        let (before, after, run) = (self.rss_before?, self.rss_after?, self.run.as_ref()?);
        (run.ok > 0 && self.warmup.is_zero())
            .then(|| (after as f64 - before as f64) / run.ok as f64)
    }
}

/// The report in `format`.
pub(crate) fn render(format: Format, report: &Report) -> String {
    match format {
        Format::Text => text(report),
        Format::Json => json(report).to_string(),
    }
}

/// One JSON object, every key always present (null where it does not apply)
/// so that scripts see one shape whatever the mode.
fn json(report: &Report) -> Value {
    let run = report.run.as_ref();
    let floor = &report.floor;
    json!({
        "mode": report.mode.as_str(),
        "function": (report.mode != BenchMode::Floor).then_some(&report.function),
        "pool": report.pool.as_ref().filter(|_| report.mode != BenchMode::Floor),
        "payload_bytes": (report.mode != BenchMode::Floor).then_some(report.payload_bytes),
        "connections": report.connections,
        "concurrency": report.concurrency,
        "warmup_secs": report.warmup.as_secs_f64(),
        "order": "floor first, then the mode",
        "rounds": report.rounds,
        "batch_size": report.batch_size,
        "jobs": run.map(|r| r.ok),
        "errors": run.map(|r| r.errors),
        "first_error": run.and_then(|r| r.first_error.as_deref()),
        "duration_secs": run.map(|r| r.elapsed.as_secs_f64()),
        "jobs_per_sec": run.map(Measured::rate),
        "p50_us": run.map(|r| r.p50_us),
        "p90_us": run.map(|r| r.p90_us),
        "p99_us": run.map(|r| r.p99_us),
        "max_us": run.map(|r| r.max_us),
        "floor_requests": floor.ok,
        "floor_errors": floor.errors,
        "floor_first_error": floor.first_error,
        "floor_duration_secs": floor.elapsed.as_secs_f64(),
        "floor_rps": floor.rate(),
        "floor_p50_us": floor.p50_us,
        "floor_p90_us": floor.p90_us,
        "floor_p99_us": floor.p99_us,
        "floor_max_us": floor.max_us,
        "ratio": report.ratio(),
        "server_pid": report.server_pid,
        "server_rss_before_bytes": report.rss_before,
        "server_rss_bytes": report.rss_after,
        "server_rss_per_job_bytes": report.rss_per_job(),
        "server_cpu_us_per_job": run.and_then(Measured::server_cpu_us_per_op),
        "floor_server_cpu_us_per_rpc": floor.server_cpu_us_per_op(),
        "cpu_ratio": report.cpu_ratio(),
        "worker_slots": report.worker.map(|w| w.slots),
    })
}

/// A heading, a table with one row per phase, then the ratio, memory and
/// first errors, each where there is one.
fn text(report: &Report) -> String {
    let mut lines = vec![heading(report)];
    let mut rows = vec![
        [
            "phase", "count", "errors", "secs", "per sec", "p50 us", "p90 us", "p99 us", "max us",
        ]
        .map(str::to_owned),
    ];
    rows.push(row("floor (RPCs)", &report.floor));
    if let Some(run) = &report.run {
        rows.push(row(&format!("{} (jobs)", report.mode.as_str()), run));
    }
    lines.extend(table(&rows));
    if let Some(worker) = report.worker {
        lines.push(format!(
            "jobs served by a remote worker over the worker protocol: `jobctl worker --noop {} \
             --concurrency {}` (pid {})",
            report.function, worker.slots, worker.pid
        ));
    }
    if let Some(batch_size) = report.batch_size {
        lines.push(format!(
            "latency is per SubmitBatch call of up to {batch_size} jobs"
        ));
    }
    if let Some(ratio) = report.ratio() {
        lines.push(format!(
            "ratio: {ratio:.3} ({} jobs/s over floor RPC/s)",
            report.mode.as_str()
        ));
    }
    if let Some(floor) = report.floor.server_cpu_us_per_op() {
        let run = report
            .run
            .as_ref()
            .and_then(Measured::server_cpu_us_per_op)
            .map(|us| format!("{us:.1} us per job, "))
            .unwrap_or_default();
        let ratio = report
            .cpu_ratio()
            .map(|r| format!(" (cpu ratio {r:.3})"))
            .unwrap_or_default();
        lines.push(format!(
            "server CPU: {run}{floor:.1} us per floor RPC{ratio}"
        ));
    }
    if let (Some(before), Some(after)) = (report.rss_before, report.rss_after) {
        let per_job = report
            .rss_per_job()
            .map(|bytes| format!("; {bytes:.0} B per job"))
            .unwrap_or_default();
        lines.push(format!(
            "server memory (RSS): {} before, {} after ({}{per_job})",
            mib(before as f64),
            mib(after as f64),
            signed_mib(after as f64 - before as f64),
        ));
    } else if let Some(before) = report.rss_before {
        lines.push(format!(
            "server memory (RSS): {} before; unreadable after the run",
            mib(before as f64)
        ));
    }
    let errors = [("floor", &report.floor)]
        .into_iter()
        .chain(report.run.iter().map(|run| (report.mode.as_str(), run)));
    for (phase, measured) in errors {
        if let Some(error) = &measured.first_error {
            lines.push(format!("first {phase} error: {error}"));
        }
    }
    lines.join("\n")
}

fn heading(report: &Report) -> String {
    let what = match report.mode {
        BenchMode::Floor => "floor (grpc.health.v1.Health/Check)".to_owned(),
        mode => format!(
            "{} {}{} with {}",
            mode.as_str(),
            report.function,
            report
                .pool
                .as_ref()
                .map(|pool| format!(" on the {pool} pool"))
                .unwrap_or_default(),
            match report.payload_bytes {
                0 => "null args".to_owned(),
                bytes => format!("a {bytes}-byte string arg"),
            }
        ),
    };
    let order = match (report.run.is_some(), report.rounds) {
        (false, _) => String::new(),
        (true, 1) => "; floor measured first".to_owned(),
        (true, rounds) => format!("; floor then mode, {rounds} rounds"),
    };
    let plural = if report.connections == 1 { "" } else { "s" };
    format!(
        "jobctl bench: {what}; {} connection{plural} x {} in flight; warmup {}s{order}",
        report.connections,
        report.concurrency,
        report.warmup.as_secs_f64()
    )
}

fn row(phase: &str, m: &Measured) -> [String; 9] {
    [
        phase.to_owned(),
        m.ok.to_string(),
        m.errors.to_string(),
        format!("{:.2}", m.elapsed.as_secs_f64()),
        format!("{:.1}", m.rate()),
        m.p50_us.to_string(),
        m.p90_us.to_string(),
        m.p99_us.to_string(),
        m.max_us.to_string(),
    ]
}

/// Rows with the first column left-aligned and the numbers right-aligned.
fn table(rows: &[[String; 9]]) -> Vec<String> {
    let mut widths = [0; 9];
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.len());
        }
    }
    rows.iter()
        .map(|row| {
            let mut line = format!("{:<w$}", row[0], w = widths[0]);
            for (cell, width) in row.iter().zip(widths).skip(1) {
                line.push_str(&format!("  {cell:>width$}"));
            }
            line
        })
        .collect()
}

fn mib(bytes: f64) -> String {
    format!("{:.1} MiB", bytes / (1024.0 * 1024.0))
}

fn signed_mib(bytes: f64) -> String {
    let sign = if bytes < 0.0 { "-" } else { "+" };
    format!("{sign}{}", mib(bytes.abs()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn measured(ok: u64, secs: u64) -> Measured {
        Measured {
            ok,
            errors: 0,
            first_error: None,
            elapsed: Duration::from_secs(secs),
            p50_us: 100,
            p90_us: 200,
            p99_us: 400,
            max_us: 1000,
            server_cpu: None,
        }
    }

    fn report(mode: BenchMode) -> Report {
        Report {
            mode,
            function: "noop".to_owned(),
            pool: None,
            payload_bytes: 0,
            connections: 4,
            concurrency: 64,
            warmup: Duration::from_secs(1),
            rounds: 1,
            batch_size: (mode == BenchMode::Batch).then_some(1000),
            floor: measured(20_000, 2),
            run: (mode != BenchMode::Floor).then(|| measured(5_000, 1)),
            server_pid: None,
            rss_before: None,
            rss_after: None,
            worker: None,
        }
    }

    #[test]
    fn json_has_the_rates_the_ratio_and_one_shape() {
        let submit = json(&report(BenchMode::Submit));
        assert_eq!(submit["mode"], "submit");
        assert_eq!(submit["jobs"], 5000);
        assert_eq!(submit["jobs_per_sec"], 5000.0);
        assert_eq!(submit["floor_rps"], 10_000.0);
        assert_eq!(submit["ratio"], 0.5);
        assert_eq!(submit["batch_size"], Value::Null);
        assert_eq!(submit["server_rss_bytes"], Value::Null);

        let floor = json(&report(BenchMode::Floor));
        assert_eq!(floor["jobs"], Value::Null);
        assert_eq!(floor["ratio"], Value::Null);
        assert_eq!(floor["floor_rps"], 10_000.0);
        let keys = |v: &Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
        assert_eq!(keys(&submit), keys(&floor));
        assert!(!render(Format::Json, &report(BenchMode::Batch)).contains('\n'));
    }

    #[test]
    fn memory_is_reported_per_job() {
        let mut with_memory = report(BenchMode::Submit);
        with_memory.warmup = Duration::ZERO;
        with_memory.server_pid = Some(42);
        with_memory.rss_before = Some(10 << 20);
        with_memory.rss_after = Some((10 << 20) + 5_000 * 300);
        assert_eq!(json(&with_memory)["server_rss_per_job_bytes"], 300.0);
        let shown = text(&with_memory);
        assert!(
            shown.contains("10.0 MiB before, 11.4 MiB after (+1.4 MiB; 300 B per job)"),
            "{shown}"
        );
        // The warmup's jobs are in the memory but not in the count.
        with_memory.warmup = Duration::from_secs(1);
        assert_eq!(json(&with_memory)["server_rss_per_job_bytes"], Value::Null);
        assert!(!text(&with_memory).contains("per job"));
    }

    #[test]
    fn server_cpu_is_reported_per_operation_and_as_a_ratio() {
        let mut with_cpu = report(BenchMode::Submit);
        assert_eq!(json(&with_cpu)["cpu_ratio"], Value::Null);
        assert!(!text(&with_cpu).contains("server CPU"));
        // 20,000 floor RPCs in 0.2 s of server CPU, 5,000 jobs in 0.1 s.
        with_cpu.floor.server_cpu = Some(Duration::from_millis(200));
        with_cpu.run.as_mut().unwrap().server_cpu = Some(Duration::from_millis(100));
        let shown = json(&with_cpu);
        assert_eq!(shown["floor_server_cpu_us_per_rpc"], 10.0);
        assert_eq!(shown["server_cpu_us_per_job"], 20.0);
        assert_eq!(shown["cpu_ratio"], 0.5);
        let shown = text(&with_cpu);
        assert!(
            shown.contains("server CPU: 20.0 us per job, 10.0 us per floor RPC (cpu ratio 0.500)"),
            "{shown}"
        );
    }

    #[test]
    fn text_is_an_aligned_table() {
        let mut batch = report(BenchMode::Batch);
        batch.run.as_mut().unwrap().first_error = Some("queue full".to_owned());
        let text = text(&batch);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[1..4],
            [
                "phase         count  errors  secs  per sec  p50 us  p90 us  p99 us  max us",
                "floor (RPCs)  20000       0  2.00  10000.0     100     200     400    1000",
                "batch (jobs)   5000       0  1.00   5000.0     100     200     400    1000",
            ]
        );
        assert!(text.contains("ratio: 0.500"), "{text}");
        assert!(text.contains("first batch error: queue full"), "{text}");
        assert!(!text.contains("remote worker"), "{text}");
    }

    #[test]
    fn a_remote_worker_is_named_in_both_formats() {
        let mut remote = report(BenchMode::Roundtrip);
        assert_eq!(json(&remote)["worker_slots"], Value::Null);
        remote.function = "bench.noop".to_owned();
        remote.worker = Some(RemoteWorker {
            slots: 8,
            pid: 4242,
        });
        assert_eq!(json(&remote)["worker_slots"], 8);
        let shown = text(&remote);
        assert!(
            shown.contains(
                "jobs served by a remote worker over the worker protocol: \
                 `jobctl worker --noop bench.noop --concurrency 8` (pid 4242)"
            ),
            "{shown}"
        );
    }
}

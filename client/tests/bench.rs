//! `jobctl bench` as users run it: the real binary as a child process against
//! a real jobd served in-process on 127.0.0.1:0.
//!
//! Every run is bounded by a job count (`--jobs`), not by time, and no
//! assertion is about speed: these tests check that the bench counts, reports
//! and fails honestly, whatever the machine.

use std::{num::NonZeroUsize, process::Output, time::Duration};

use assert_cmd::Command;
use jobd::{Engine, EngineConfig};
use jobd_test_support::{BlockingServer, TestServer};
use serde_json::{Value, json};

/// Bounds every jobctl run, so a hang fails the test instead of stalling it.
const RUN_LIMIT: Duration = Duration::from_secs(120);

/// The workspace's test server (on a runtime of its own), with a `fail`
/// function, and jobctl bench run against it.
struct Target {
    addr: String,
    engine: Engine,
    server: BlockingServer,
}

impl Target {
    fn start() -> Self {
        Self::with_config(EngineConfig::default())
    }

    fn with_config(config: EngineConfig) -> Self {
        let (registry, _fixtures) = jobd_test_support::registry();
        let server = BlockingServer::start(|| {
            TestServer::start_with_grace(registry, config, Duration::from_secs(1))
        });
        Self {
            addr: server.server().url(),
            engine: server.engine().clone(),
            server,
        }
    }

    /// Runs `jobctl --addr ADDR ARGS...`.
    fn jobctl(&self, args: &[&str]) -> Run {
        run(jobctl().arg("--addr").arg(&self.addr).args(args))
    }

    /// Runs a bench with JSON output and no warmup, and returns its report.
    fn bench(&self, args: &[&str]) -> Value {
        let args: Vec<&str> = ["bench", "--warmup", "0", "--output", "json"]
            .into_iter()
            .chain(args.iter().copied())
            .collect();
        let run = self.jobctl(&args);
        assert_eq!(run.code, Some(0), "{run:#?}");
        // No progress line on a pipe, and nothing else either.
        assert_eq!(run.stderr, "", "{run:#?}");
        let line = run.stdout.strip_suffix('\n').expect("a final newline");
        assert!(!line.contains('\n'), "one line of JSON: {run:#?}");
        serde_json::from_str(line).unwrap_or_else(|e| panic!("{line:?} is not JSON: {e}"))
    }

    fn shutdown(self) {
        self.server.shutdown();
    }
}

fn jobctl() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_jobctl"));
    command
        .env_remove("JOBD_ADDR")
        .env_remove("RUST_LOG")
        .timeout(RUN_LIMIT);
    command
}

#[derive(Debug)]
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn run(command: &mut Command) -> Run {
    let Output {
        status,
        stdout,
        stderr,
    } = command.output().expect("jobctl runs");
    Run {
        code: status.code(),
        stdout: String::from_utf8(stdout).expect("utf-8 stdout"),
        stderr: String::from_utf8(stderr).expect("utf-8 stderr"),
    }
}

impl Run {
    /// Exit code 3, nothing on stdout, and one line on stderr, returned.
    fn failed_in_one_line(&self) -> &str {
        assert_eq!(self.code, Some(3), "{self:#?}");
        assert_eq!(self.stdout, "", "{self:#?}");
        let line = self.stderr.strip_suffix('\n').expect("a final newline");
        assert!(!line.contains('\n'), "one line: {self:#?}");
        assert!(line.starts_with("jobctl: "), "{self:#?}");
        line
    }
}

fn number(report: &Value, key: &str) -> f64 {
    report[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} is a number in {report}"))
}

/// The figures every report with a mode phase must have, consistent.
fn assert_sane(report: &Value) {
    for key in ["jobs_per_sec", "floor_rps", "ratio", "duration_secs"] {
        assert!(number(report, key) > 0.0, "{key} > 0 in {report}");
    }
    for prefix in ["", "floor_"] {
        let p = |q: &str| number(report, &format!("{prefix}{q}_us"));
        assert!(p("p50") > 0.0, "{report}");
        assert!(p("p50") <= p("p90"), "{report}");
        assert!(p("p90") <= p("p99"), "{report}");
        assert!(p("p99") <= p("max"), "{report}");
    }
    assert_eq!(report["connections"], 4);
    assert_eq!(report["concurrency"], 64);
}

#[test]
fn submit_mode_counts_exactly_the_jobs_asked_for() {
    let server = Target::start();
    let report = server.bench(&["--mode", "submit", "--jobs", "2000"]);
    assert_eq!(report["mode"], "submit");
    assert_eq!(report["jobs"], 2000, "{report}");
    assert_eq!(report["errors"], 0, "{report}");
    assert_eq!(report["first_error"], Value::Null, "{report}");
    // The floor ran first, with the same budget, counted in RPCs.
    assert_eq!(report["floor_requests"], 2000, "{report}");
    assert_eq!(report["floor_errors"], 0, "{report}");
    assert_eq!(report["batch_size"], Value::Null);
    assert_sane(&report);
    // The server really got them (plus nothing from a warmup of 0).
    assert_eq!(server.engine.job_count(), 2000);
    server.shutdown();
}

#[test]
fn rounds_alternate_and_still_count_exactly_the_jobs_asked_for() {
    let server = Target::start();
    let report = server.bench(&["--mode", "submit", "--jobs", "1001", "--rounds", "4"]);
    assert_eq!(report["rounds"], 4, "{report}");
    assert_eq!(report["jobs"], 1001, "{report}");
    assert_eq!(report["floor_requests"], 1001, "{report}");
    assert_eq!(report["errors"], 0, "{report}");
    assert_sane(&report);
    assert_eq!(server.engine.job_count(), 1001);

    let text = server.jobctl(&["bench", "--warmup", "0", "--jobs", "40", "--rounds", "2"]);
    assert_eq!(text.code, Some(0), "{text:#?}");
    assert!(
        text.stdout.contains("floor then mode, 2 rounds"),
        "{text:#?}"
    );
    server.shutdown();
}

#[test]
fn roundtrip_mode_waits_for_every_result() {
    let server = Target::start();
    let report = server.bench(&[
        "--mode",
        "roundtrip",
        "--jobs",
        "500",
        "--payload-bytes",
        "64",
    ]);
    assert_eq!(report["mode"], "roundtrip");
    assert_eq!(report["jobs"], 500, "{report}");
    assert_eq!(report["errors"], 0, "{report}");
    assert_eq!(report["payload_bytes"], 64);
    assert_sane(&report);
    assert_eq!(server.engine.job_counts().get("succeeded"), Some(&500));
    server.shutdown();
}

#[test]
fn the_pool_flag_sends_every_job_to_that_pool() {
    let server = Target::start();
    // sha256 of one short string: the near-empty blocking job that the
    // process pool is compared with.
    let report = server.bench(&[
        "--mode",
        "roundtrip",
        "--jobs",
        "50",
        "--function",
        "sha256",
        "--payload-bytes",
        "8",
        "--pool",
        "blocking",
    ]);
    assert_eq!(report["pool"], "blocking", "{report}");
    assert_eq!(report["jobs"], 50, "{report}");
    assert_eq!(report["errors"], 0, "{report}");
    // The pool reaches the server: a blocking function is refused the async
    // pool, and the bench says why in one line.
    let run = server.jobctl(&[
        "bench",
        "--jobs",
        "5",
        "--warmup",
        "0",
        "--function",
        "sha256",
        "--pool",
        "async",
    ]);
    let line = run.failed_in_one_line();
    assert!(line.contains("not the async pool"), "{line}");
    server.shutdown();
}

#[test]
fn batch_mode_counts_jobs_and_cuts_the_last_batch_to_the_budget() {
    let server = Target::start();
    let report = server.bench(&[
        "--mode",
        "batch",
        "--jobs",
        "2500",
        "--batch-size",
        "1000",
        "--connections",
        "2",
        "--concurrency",
        "2",
    ]);
    assert_eq!(report["mode"], "batch");
    assert_eq!(report["jobs"], 2500, "{report}");
    assert_eq!(report["errors"], 0, "{report}");
    assert_eq!(report["batch_size"], 1000);
    assert_eq!(server.engine.job_count(), 2500);
    server.shutdown();
}

#[test]
fn floor_mode_measures_health_checks_only() {
    let server = Target::start();
    let report = server.bench(&["--mode", "floor", "--jobs", "1000"]);
    assert_eq!(report["mode"], "floor");
    assert_eq!(report["floor_requests"], 1000, "{report}");
    assert_eq!(report["floor_errors"], 0);
    assert!(number(&report, "floor_rps") > 0.0, "{report}");
    assert!(number(&report, "floor_p50_us") <= number(&report, "floor_p99_us"));
    // No job ran, so no job figure is made up.
    for key in ["jobs", "jobs_per_sec", "ratio", "p50_us"] {
        assert_eq!(report[key], Value::Null, "{key} in {report}");
    }
    assert_eq!(server.engine.job_count(), 0);
    server.shutdown();
}

#[test]
fn text_output_is_a_table_with_the_ratio() {
    let server = Target::start();
    let run = server.jobctl(&["bench", "--jobs", "300", "--warmup", "0"]);
    assert_eq!(run.code, Some(0), "{run:#?}");
    assert_eq!(run.stderr, "", "{run:#?}");
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert!(
        lines[0].starts_with("jobctl bench: submit noop"),
        "{run:#?}"
    );
    assert!(lines[1].starts_with("phase "), "{run:#?}");
    assert!(lines[2].starts_with("floor (RPCs) "), "{run:#?}");
    assert!(lines[3].starts_with("submit (jobs) "), "{run:#?}");
    assert!(lines[4].starts_with("ratio: "), "{run:#?}");
    server.shutdown();
}

#[test]
fn server_memory_is_read_before_and_after() {
    // The server runs in this test's process, so its pid is ours.
    let server = Target::start();
    let pid = std::process::id().to_string();
    let report = server.bench(&["--jobs", "200", "--server-pid", &pid]);
    assert_eq!(report["server_pid"], json!(std::process::id()));
    assert!(number(&report, "server_rss_before_bytes") > 0.0, "{report}");
    assert!(number(&report, "server_rss_bytes") > 0.0, "{report}");
    // CPU time is counted in 10 ms ticks: 200 jobs may take less than one,
    // so only its presence is certain.
    assert!(number(&report, "server_cpu_us_per_job") >= 0.0, "{report}");
    assert!(
        number(&report, "floor_server_cpu_us_per_rpc") >= 0.0,
        "{report}"
    );

    // A process that does not exist is a usage error, found before any load.
    let run = server.jobctl(&["bench", "--jobs", "10", "--server-pid", "4294967295"]);
    assert_eq!(run.code, Some(2), "{run:#?}");
    assert!(run.stderr.contains("--server-pid"), "{run:#?}");
    assert_eq!(server.engine.job_count(), 200);
    server.shutdown();
}

#[test]
fn rejected_jobs_are_counted_with_the_first_reason() {
    // Paused with room for 100: exactly 100 submits are accepted, the rest
    // find the queue full.
    let server = Target::with_config(EngineConfig {
        paused: true,
        max_queued: NonZeroUsize::new(100).expect("nonzero"),
        ..EngineConfig::default()
    });
    let report = server.bench(&["--mode", "submit", "--jobs", "300"]);
    assert_eq!(report["jobs"], 100, "{report}");
    assert_eq!(report["errors"], 200, "{report}");
    let first = report["first_error"].as_str().expect("a first error");
    assert!(
        first.contains("RESOURCE_EXHAUSTED") || first.contains("full"),
        "{first}"
    );

    // Now every submit fails: nothing to measure, exit 3, one line.
    let run = server.jobctl(&["bench", "--jobs", "50", "--warmup", "0"]);
    let line = run.failed_in_one_line();
    assert!(line.contains("50 submits failed"), "{line}");
    server.shutdown();
}

#[test]
fn failed_jobs_fail_a_roundtrip() {
    let server = Target::start();
    let run = server.jobctl(&[
        "bench",
        "--mode",
        "roundtrip",
        "--function",
        "fail",
        "--jobs",
        "20",
        "--warmup",
        "0",
    ]);
    let line = run.failed_in_one_line();
    assert!(line.contains("failed on purpose"), "{line}");
    server.shutdown();
}

#[test]
fn an_unknown_function_is_refused_before_any_load() {
    let server = Target::start();
    let run = server.jobctl(&["bench", "--function", "nope", "--jobs", "10"]);
    let line = run.failed_in_one_line();
    assert!(line.contains("\"nope\""), "{line}");
    assert_eq!(server.engine.job_count(), 0);
    server.shutdown();
}

#[test]
fn an_unreachable_server_fails_at_once_in_one_line() {
    let run = run(jobctl().args(["--addr", "http://127.0.0.1:1", "bench"]));
    let line = run.failed_in_one_line();
    // The connection itself was refused: the bench did not go on to count
    // failed health checks for 5 s.
    assert_eq!(
        line,
        "jobctl: cannot reach jobd at http://127.0.0.1:1: connection refused"
    );
}

/// `--worker-slots`: the bench starts a remote worker (`jobctl worker
/// --noop bench.noop`), every job of the run is served by it (jobd has no
/// function of that name itself, so no job could have run otherwise), the
/// report says so, and the worker is stopped and gone when the bench ends.
#[test]
fn a_remote_worker_serves_the_bench_and_is_stopped_after() {
    let server = Target::start();
    let report = server.bench(&[
        "--mode",
        "roundtrip",
        "--jobs",
        "300",
        "--worker-slots",
        "3",
    ]);
    assert_sane(&report);
    assert_eq!(report["function"], "bench.noop");
    assert_eq!(report["worker_slots"], 3);
    assert_eq!(
        (report["jobs"].as_u64(), report["errors"].as_u64()),
        (Some(300), Some(0)),
        "{report}"
    );
    // The worker drained and detached before the bench returned.
    let workers = server.jobctl(&["workers"]);
    assert_eq!(
        (workers.code, workers.stdout.as_str()),
        (Some(0), ""),
        "{workers:#?}"
    );

    // A worker jobd refuses (a name jobd has itself) ends the bench with
    // exit code 3, in one line, after the worker's own line.
    let run = server.jobctl(&[
        "bench",
        "--worker-slots",
        "1",
        "--function",
        "noop",
        "--jobs",
        "10",
    ]);
    assert_eq!(run.code, Some(3), "{run:#?}");
    assert_eq!(run.stdout, "");
    let last = run.stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with(
            "jobctl: bench: the remote worker: `jobctl worker` stopped before serving"
        ),
        "{run:#?}"
    );
    assert!(
        run.stderr
            .contains("jobd has a function of that name itself"),
        "{run:#?}"
    );
    server.shutdown();
}

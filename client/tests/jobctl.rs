//! `jobctl` as users run it: the real binary as a child process, against a
//! real jobd served in-process on 127.0.0.1:0.
//!
//! Each test owns a [`Target`]: the workspace's test server (the listener is
//! bound before serving, so no sleep is needed before connecting), whose
//! test functions signal when they start, so a test waits for "running"
//! without guessing a delay.

use std::{
    process::{Output, Stdio},
    sync::Mutex,
    time::Duration,
};

use assert_cmd::Command;
use jobd::{Engine, EngineConfig, StoreConfig};
use jobd_test_support::{BlockingServer, Fixtures, TestServer};
use predicates::prelude::*;
use serde_json::{Value, json};

/// How long running jobs get to finish when a test server stops; tests
/// cancel what they start, so this only bounds a failing test.
const GRACE: Duration = Duration::from_secs(1);

/// Bounds every jobctl run, so a hang fails the test instead of stalling it.
const RUN_LIMIT: Duration = Duration::from_secs(60);

/// How long a test waits for a job to signal that it started.
const START_LIMIT: Duration = Duration::from_secs(10);

/// A jobd served in-process with the fixture functions (the workspace's one
/// test server, on a runtime of its own), and jobctl run against it.
struct Target {
    addr: String,
    /// The server's engine, to observe it from the test.
    engine: Engine,
    /// Tells when a `*_started` job begins.
    fixtures: Mutex<Fixtures>,
    server: BlockingServer,
}

impl Target {
    fn start() -> Self {
        Self::start_on(&StoreConfig::Memory)
    }

    /// A server on the given store (restart tests use a SQLite directory).
    fn start_on(store: &StoreConfig) -> Self {
        let (registry, fixtures) = jobd_test_support::registry();
        let server = BlockingServer::start(|| {
            TestServer::start_on(registry, EngineConfig::default(), GRACE, store)
        });
        Self {
            addr: server.server().url(),
            engine: server.engine().clone(),
            fixtures: Mutex::new(fixtures),
            server,
        }
    }

    /// Runs jobctl against this server.
    fn jobctl(&self, args: &[&str]) -> Run {
        let run = self.jobctl_job_may_panic(args);
        for text in [&run.stdout, &run.stderr] {
            assert!(!text.contains("panicked"), "\"panicked\" in {run:#?}");
        }
        run
    }

    /// As [`Self::jobctl`], for a job that panics on purpose: jobctl then
    /// truthfully says the job panicked, and only jobctl must not.
    fn jobctl_job_may_panic(&self, args: &[&str]) -> Run {
        execute(jobctl().arg("--addr").arg(&self.addr).args(args))
    }

    /// Submits and returns the job id, checking that the id is all that is
    /// printed.
    fn submit(&self, args: &[&str]) -> String {
        let submit: Vec<&str> = ["submit"].into_iter().chain(args.iter().copied()).collect();
        let id = self.jobctl(&submit).success().line();
        uuid::Uuid::try_parse(&id).unwrap_or_else(|e| panic!("{id:?} is not a UUID: {e}"));
        id
    }

    /// Blocks until a `*_started` job begins, and returns its argument.
    fn wait_started(&self) -> Value {
        let mut fixtures = self.fixtures.lock().expect("one test thread");
        self.server.block_on(fixtures.next_started())
    }

    /// Blocks until `count` callers wait on a job's result. Polls, because
    /// the engine has no signal for this; the condition is exact, though, not
    /// a guess at how long a process takes to start.
    fn wait_for_waiters(&self, count: usize) {
        let deadline = std::time::Instant::now() + START_LIMIT;
        while self.engine.waiters() < count {
            assert!(
                std::time::Instant::now() < deadline,
                "no {count} waiter(s) after {START_LIMIT:?}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Stops the server as a crash would: every task and connection dropped
    /// at once, nothing drained.
    fn crash(self) {
        self.server.crash();
    }

    /// Stops the server and re-raises its error or panic, if any.
    fn shutdown(self) {
        self.server.shutdown();
    }
}

/// The jobctl binary with a clean environment: no address or log filter from
/// the developer's shell, and RUST_BACKTRACE=1 to prove errors still read as
/// one line.
fn jobctl_std() -> std::process::Command {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_jobctl"));
    command
        .env_remove("JOBD_ADDR")
        .env_remove("RUST_LOG")
        .env("RUST_BACKTRACE", "1");
    command
}

/// [`jobctl_std`], bounded so that a hang fails the test instead of stalling
/// it.
fn jobctl() -> Command {
    let mut command = Command::from_std(jobctl_std());
    command.timeout(RUN_LIMIT);
    command
}

/// One finished jobctl run.
#[derive(Debug)]
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn execute(command: &mut Command) -> Run {
    finished(command.output().expect("jobctl runs"))
}

fn finished(output: Output) -> Run {
    let Output {
        status,
        stdout,
        stderr,
    } = output;
    let run = Run {
        code: status.code(),
        stdout: String::from_utf8(stdout).expect("utf-8 stdout"),
        stderr: String::from_utf8(stderr).expect("utf-8 stderr"),
    };
    // Whatever happened, it must not look like a crash.
    for text in [&run.stdout, &run.stderr] {
        for crash in CRASH_SIGNS {
            assert!(!text.contains(crash), "{crash:?} in {run:#?}");
        }
    }
    run
}

/// What a panic, a backtrace or a Debug dump of an error chain would leave
/// behind. [`Target::jobctl`] also rejects "panicked" alone.
const CRASH_SIGNS: [&str; 5] = [
    "panicked at",
    "Backtrace",
    "backtrace",
    "Caused by",
    "RUST_BACKTRACE",
];

impl Run {
    fn code(self, expected: i32) -> Self {
        assert_eq!(self.code, Some(expected), "{self:#?}");
        self
    }

    /// Exit 0 and nothing on stderr (no spinner either: stderr is a pipe).
    fn success(self) -> Self {
        let run = self.code(0);
        assert_eq!(run.stderr, "", "{run:#?}");
        run
    }

    /// Stdout, which must be exactly one line.
    fn line(&self) -> String {
        one_line(&self.stdout, self)
    }

    /// Stdout parsed as one line of JSON.
    fn json(&self) -> Value {
        let line = self.line();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?} is not JSON: {e}"))
    }

    /// Stderr, which must be exactly one line.
    fn error_line(&self) -> String {
        one_line(&self.stderr, self)
    }
}

fn one_line(text: &str, run: &Run) -> String {
    let line = text
        .strip_suffix('\n')
        .unwrap_or_else(|| panic!("no final newline in {run:#?}"));
    assert!(!line.contains('\n'), "more than one line in {run:#?}");
    line.to_owned()
}

#[test]
fn help_teaches_the_commands_with_examples() {
    let run = execute(jobctl().arg("--help")).success();
    for needle in [
        "submit",
        "result",
        "jobctl submit hello Ann",
        "jobctl result <id>",
    ] {
        assert!(run.stdout.contains(needle), "{needle:?} in {run:#?}");
    }
    jobctl()
        .args(["submit", "--help"])
        .assert()
        .success()
        .stdout(
            predicate::str::contains("--label <KEY=VALUE>").and(predicate::str::contains("JSON")),
        );
}

#[test]
fn submit_prints_an_id_and_result_prints_the_value() {
    let server = Target::start();
    let id = server.submit(&["hello"]);
    assert_eq!(
        server.jobctl(&["result", &id]).success().line(),
        "Hello, world!"
    );

    let id = server.submit(&["hello", "Ann"]);
    assert_eq!(
        server.jobctl(&["result", &id]).success().line(),
        "Hello, Ann!"
    );
    // Asking again gives the same answer: results are kept.
    assert_eq!(
        server.jobctl(&["result", &id]).success().line(),
        "Hello, Ann!"
    );
    server.shutdown();
}

#[test]
fn submit_wait_prints_the_result_instead_of_the_id() {
    let server = Target::start();
    let run = server
        .jobctl(&["submit", "--wait", "hello", "Ann"])
        .success();
    assert_eq!(run.line(), "Hello, Ann!");
    server.shutdown();
}

#[test]
fn arguments_are_json_where_they_parse_and_several_become_an_array() {
    let server = Target::start();
    let echo = |args: &[&str]| {
        let command: Vec<&str> = ["submit", "--wait", "echo"]
            .into_iter()
            .chain(args.iter().copied())
            .collect();
        server.jobctl(&command).success().line()
    };
    assert_eq!(echo(&["a", "1", r#"{"x":2}"#]), r#"["a",1,{"x":2}]"#);
    assert_eq!(echo(&[]), "null");
    assert_eq!(echo(&["1.5"]), "1.5");
    assert_eq!(echo(&["-3"]), "-3");
    // A JSON string is printed raw, like any string result.
    assert_eq!(echo(&[r#""42""#]), "42");
    assert_eq!(echo(&[r#"{"x":[1,2]}"#]), r#"{"x":[1,2]}"#);
    server.shutdown();
}

#[test]
fn json_output_is_one_object_per_answer() {
    let server = Target::start();
    let submitted = server
        .jobctl(&["--output", "json", "submit", "hello", "Ann"])
        .success()
        .json();
    let id = submitted["job_id"]
        .as_str()
        .expect("job_id is a string")
        .to_owned();
    uuid::Uuid::try_parse(&id).expect("job_id is a UUID");
    assert!(
        ["pending", "running", "succeeded"].contains(&submitted["state"].as_str().unwrap_or("")),
        "{submitted}"
    );

    // The flag is global: it may follow the subcommand too.
    let result = server
        .jobctl(&["result", &id, "-o", "json"])
        .success()
        .json();
    assert_eq!(
        result,
        json!({"job_id": id, "state": "succeeded", "value": "Hello, Ann!"})
    );

    let waited = server
        .jobctl(&["-o", "json", "submit", "--wait", "echo", "1", "2"])
        .success()
        .json();
    assert_eq!(waited["state"], "succeeded");
    assert_eq!(waited["value"], json!([1, 2]));

    let done = server.jobctl(&["-o", "json", "done", &id]).success().json();
    assert_eq!(
        done,
        json!({"job_id": id, "done": true, "state": "succeeded"})
    );
    server.shutdown();
}

#[test]
fn done_says_false_while_running_and_true_once_finished() {
    let server = Target::start();
    let id = server.submit(&["sleep", "30"]);
    assert_eq!(server.jobctl(&["done", &id]).success().line(), "false");
    let cancelled = server.jobctl(&["cancel", &id]).success().line();
    // Pending or running at the moment of the cancel: either way it is over.
    assert!(
        ["cancelled", "aborted"].contains(&cancelled.as_str()),
        "{cancelled}"
    );
    assert_eq!(server.jobctl(&["done", &id]).success().line(), "true");

    let id = server.submit(&["hello"]);
    server.jobctl(&["result", &id]).success();
    assert_eq!(server.jobctl(&["done", &id]).success().line(), "true");
    server.shutdown();
}

#[test]
fn cancel_aborts_a_running_async_job_which_then_reports_cancelled() {
    let server = Target::start();
    let id = server.submit(&["async_started", "tag"]);
    assert_eq!(server.wait_started(), json!("tag"));
    assert_eq!(server.jobctl(&["cancel", &id]).success().line(), "aborted");

    let run = server.jobctl(&["result", &id]).code(1);
    assert_eq!(run.stdout, "");
    assert_eq!(run.error_line(), format!("jobctl: job {id} was cancelled"));

    let status = server
        .jobctl(&["status", &id, "--output", "json"])
        .success()
        .json();
    assert_eq!(status["state"], "cancelled");
    assert_eq!(status["error"]["kind"], "cancelled");
    server.shutdown();
}

#[test]
fn cancel_of_a_running_blocking_job_is_a_request() {
    let server = Target::start();
    let id = server.submit(&["polite_started", "tag"]);
    server.wait_started();
    let report = server.jobctl(&["cancel", &id]).success().line();
    assert_eq!(
        report,
        "requested (not cancelled yet: the blocking function must honour it)"
    );
    // This function honours the request, so the wait ends cancelled.
    let json = server.jobctl(&["-o", "json", "result", &id]).code(1);
    assert_eq!(json.json()["state"], "cancelled");
    assert_eq!(json.error_line(), format!("jobctl: job {id} was cancelled"));
    server.shutdown();
}

#[test]
fn cancel_of_a_finished_job_says_already_done() {
    let server = Target::start();
    let id = server.submit(&["hello"]);
    server.jobctl(&["result", &id]).success();
    assert_eq!(
        server.jobctl(&["cancel", &id]).success().line(),
        "already done"
    );
    let json = server
        .jobctl(&["-o", "json", "cancel", &id])
        .success()
        .json();
    assert_eq!(
        json,
        json!({"job_id": id, "outcome": "already_done", "cancelled": false, "state": "succeeded"})
    );
    server.shutdown();
}

#[test]
fn a_failed_job_exits_1_with_its_reason_on_one_line() {
    let server = Target::start();
    let id = server.submit(&["fail"]);
    let run = server.jobctl(&["result", &id]).code(1);
    assert_eq!(run.stdout, "");
    let error = run.error_line();
    assert!(
        error.starts_with(&format!("jobctl: job {id} failed: failed on purpose")),
        "{error}"
    );

    let json = server.jobctl(&["result", &id, "-o", "json"]).code(1).json();
    assert_eq!(json["state"], "failed");
    assert_eq!(json["error"]["kind"], "failed");
    assert!(
        json["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("failed on purpose")
    );

    let run = server.jobctl(&["submit", "--wait", "fail"]).code(1);
    assert_eq!(run.stdout, "");
    assert!(
        run.error_line().ends_with("failed: failed on purpose"),
        "{run:#?}"
    );

    let run = server
        .jobctl_job_may_panic(&["submit", "--wait", "panic_async"])
        .code(1);
    let error = run.error_line();
    assert!(
        error.contains(" failed: ") && error.contains("panicked: async boom"),
        "{error}"
    );
    server.shutdown();
}

#[test]
fn schema_violations_exit_3_naming_every_field_on_one_line() {
    let server = Target::start();
    let run = server
        .jobctl(&["submit", "return_future", r#"{"message": 1, "delay": -1}"#])
        .code(3);
    let error = run.error_line();
    assert!(error.starts_with("jobctl: invalid request: "), "{error}");
    assert!(
        error.contains("args.message") && error.contains("args.delay"),
        "{error}"
    );
    server.shutdown();
}

#[test]
fn status_shows_the_whole_job() {
    let server = Target::start();
    let id = server.submit(&[
        "hello",
        "Ann",
        "--label",
        "team=infra",
        "--label",
        "ticket=42",
        "--request-id",
        "order-7",
    ]);
    server.jobctl(&["result", &id]).success();

    let text = server.jobctl(&["status", &id]).success().stdout;
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], format!("job_id:     {id}"));
    for expected in [
        "function:   hello",
        "pool:       async",
        "state:      succeeded",
        r#"args:       "Ann""#,
        "labels:     team=infra, ticket=42",
        "request_id: order-7",
        "attempt:    1",
        r#"value:      "Hello, Ann!""#,
    ] {
        assert!(lines.contains(&expected), "{expected:?} in\n{text}");
    }
    for timed in ["submitted:  ", "started:    ", "finished:   "] {
        assert!(
            lines.iter().any(|l| l.starts_with(timed)),
            "{timed:?} in\n{text}"
        );
    }

    let json = server
        .jobctl(&["status", &id, "-o", "json"])
        .success()
        .json();
    assert_eq!(json["job_id"], id.as_str());
    assert_eq!(json["function"], "hello");
    assert_eq!(json["pool"], "async");
    assert_eq!(json["state"], "succeeded");
    assert_eq!(json["args"], "Ann");
    assert_eq!(json["labels"], json!({"team": "infra", "ticket": "42"}));
    assert_eq!(json["request_id"], "order-7");
    assert_eq!(json["attempt"], 1);
    assert_eq!(json["value"], "Hello, Ann!");
    assert_eq!(json["error"], Value::Null);
    for time in ["submit_time", "start_time", "finish_time"] {
        assert!(
            json[time].as_str().is_some_and(|t| t.ends_with('Z')),
            "{time} in {json}"
        );
    }
    server.shutdown();
}

/// With no worker attached, `workers` writes nothing to a pipe (one JSON
/// line per worker there) and succeeds; `functions -o json` gives every
/// function its pool kind, and a count of workers only to worker-served
/// ones.
#[test]
fn workers_and_pool_kinds_reach_the_command_line() {
    let server = Target::start();
    let run = server.jobctl(&["workers"]).success();
    assert_eq!(run.stdout, "");
    let text = server.jobctl(&["-o", "json", "functions"]).success().stdout;
    for line in text.lines() {
        let function: Value = serde_json::from_str(line).unwrap();
        assert!(
            // process: the test build's faulty functions (test.*).
            ["async", "blocking", "process"].contains(&function["pool_kind"].as_str().unwrap()),
            "{line}"
        );
        assert_eq!(function["workers"], Value::Null, "{line}");
    }
}

#[test]
fn functions_lists_names_pools_and_descriptions() {
    let server = Target::start();
    let text = server.jobctl(&["functions"]).success().stdout;
    let rows: Vec<Vec<&str>> = text
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows[0], ["NAME", "POOL", "DESCRIPTION"]);
    assert!(
        rows.iter().any(|r| r[..3] == ["hello", "async", "Greets"]),
        "{text}"
    );
    assert!(
        rows.iter().any(|r| r[..2] == ["return_future", "blocking"]),
        "{text}"
    );
    // Aligned: every description starts in the same column.
    let column = |line: &str| line.find("DESCRIPTION").or_else(|| line.find("Greets"));
    let header = text.lines().next().and_then(column);
    let hello = text
        .lines()
        .find(|l| l.starts_with("hello "))
        .and_then(column);
    assert_eq!(header, hello, "{text}");
    // Under hello: its argument schema and what it returns, in the same column.
    let below: Vec<&str> = text
        .lines()
        .skip_while(|l| !l.starts_with("hello "))
        .skip(1)
        .take(2)
        .collect();
    assert!(below[0].trim_start().starts_with("args: {"), "{text}");
    assert!(below[1].trim_start().starts_with("returns: "), "{text}");
    assert_eq!(
        column(&below[0].replace("args:", "Greets")),
        header,
        "{text}"
    );

    let json = server
        .jobctl(&["functions", "--output", "json"])
        .success()
        .stdout;
    let functions: Vec<Value> = json
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    let pool = |name: &str| {
        functions
            .iter()
            .find(|f| f["name"] == name)
            .map(|f| f["pool"].clone())
    };
    assert_eq!(pool("hello"), Some(json!("async")));
    assert_eq!(pool("return_future"), Some(json!("blocking")));
    let hello = functions.iter().find(|f| f["name"] == "hello").unwrap();
    assert_eq!(
        hello["args_schema"]["properties"]["name"]["type"],
        json!(["string", "null"])
    );
    assert!(hello["returns"].as_str().unwrap().contains("greeting"));
    let fail = functions.iter().find(|f| f["name"] == "fail").unwrap();
    assert_eq!(fail["args_schema"], Value::Null);
    server.shutdown();
}

#[test]
fn result_timeout_exits_3_and_the_job_keeps_running() {
    let server = Target::start();
    let id = server.submit(&["sleep", "30"]);
    let run = server.jobctl(&["result", &id, "--timeout", "0.2"]).code(3);
    assert_eq!(run.stdout, "");
    assert_eq!(
        run.error_line(),
        format!("jobctl: job {id} did not finish within 0.2s; it keeps running")
    );
    assert_eq!(server.jobctl(&["done", &id]).success().line(), "false");

    let run = server
        .jobctl(&["submit", "--wait", "--timeout", "0", "sleep", "30"])
        .code(3);
    assert!(
        run.error_line().contains("did not finish within 0s"),
        "{run:#?}"
    );

    server.jobctl(&["cancel", &id]).success();
    let other = run.error_line();
    let other = other
        .split_whitespace()
        .nth(2)
        .expect("the id is in the message");
    server.jobctl(&["cancel", other]).success();
    server.shutdown();
}

#[test]
fn request_errors_exit_3_with_one_line() {
    let server = Target::start();
    let run = server.jobctl(&["submit", "no_such_function"]).code(3);
    assert_eq!(run.stdout, "");
    assert!(
        run.error_line()
            .starts_with(r#"jobctl: unknown job function "no_such_function""#),
        "{run:#?}"
    );

    let unknown = "01890a5d-ac96-774b-bcce-b302099a8057";
    for command in ["result", "done", "status", "cancel"] {
        let run = server.jobctl(&[command, unknown]).code(3);
        assert_eq!(run.error_line(), format!("jobctl: job {unknown} not found"));
    }

    // hello runs on the async pool; asking for another is refused.
    let run = server
        .jobctl(&["submit", "--pool", "blocking", "hello"])
        .code(3);
    assert!(
        run.error_line().starts_with("jobctl: invalid request: "),
        "{run:#?}"
    );
    server.shutdown();
}

#[test]
fn usage_errors_exit_2() {
    let server = Target::start();
    let usage_error = |args: &[&str]| {
        let run = server.jobctl(args).code(2);
        assert_eq!(run.stdout, "");
        let line = run.error_line();
        assert!(line.starts_with("jobctl: "), "{line}");
        line
    };
    for command in ["result", "done", "status", "cancel"] {
        let line = usage_error(&[command, "not-a-job-id"]);
        assert!(
            line.contains(r#"job id "not-a-job-id" is not a UUID"#),
            "{line}"
        );
    }
    let line = usage_error(&["submit", "hello", "--label", "no-equals-sign"]);
    assert!(line.contains("write KEY=VALUE"), "{line}");
    let some_id = "01890a5d-ac96-774b-bcce-b302099a8057";
    let line = usage_error(&["result", some_id, "--timeout", "-1"]);
    assert!(line.contains("0 or more"), "{line}");
    let line = usage_error(&["result", some_id, "--timeout", "soon"]);
    assert!(line.contains("not a number of seconds"), "{line}");
    let line = usage_error(&["submit", "hello", "--timeout", "1"]);
    assert!(line.contains("--wait"), "{line}");
    let line = usage_error(&["submit", "hello", "--wiat"]);
    assert!(line.contains("'--wait'"), "{line}");
    usage_error(&["frobnicate"]);
    usage_error(&["--output", "yaml", "functions"]);
    let line = usage_error(&[]);
    assert!(line.contains("requires a subcommand"), "{line}");
    server.shutdown();

    // A bare `jobctl` shows the help instead, still as a usage error.
    let run = execute(&mut jobctl()).code(2);
    assert!(run.stderr.contains("Usage:"), "{run:#?}");

    let run = execute(jobctl().args(["--addr", "http://", "functions"])).code(2);
    assert_eq!(
        run.error_line(),
        r#"jobctl: invalid server address "http://": invalid URI"#
    );
}

/// A worker whose command cannot start would take jobs only to fail them:
/// it refuses to start instead, before it connects (the address is one
/// nothing listens on, so an attempt to connect would fail otherwise).
#[test]
fn a_worker_whose_program_cannot_start_refuses_to_start() {
    for (exec, expected) in [
        (
            "upper=no-such-program-jobd a-z A-Z",
            r#"jobctl: --exec upper: cannot run "no-such-program-jobd": not found in PATH"#,
        ),
        (
            "size=/nonexistent/wc -c",
            r#"jobctl: --exec size: cannot run "/nonexistent/wc": /nonexistent/wc does not exist"#,
        ),
    ] {
        let run = execute(jobctl().args([
            "--addr",
            "http://127.0.0.1:1",
            "worker",
            "--exec",
            "fine=cat",
            "--exec",
            exec,
        ]))
        .code(2);
        assert_eq!(run.stdout, "");
        assert_eq!(run.error_line(), expected);
    }
}

#[test]
fn an_unreachable_server_is_one_line_and_exit_3() {
    let refused =
        execute(jobctl().args(["--addr", "http://127.0.0.1:1", "submit", "hello"])).code(3);
    assert_eq!(refused.stdout, "");
    assert_eq!(
        refused.error_line(),
        "jobctl: cannot reach jobd at http://127.0.0.1:1: connection refused"
    );
    // The address can come from the environment too.
    let from_env = execute(
        jobctl()
            .env("JOBD_ADDR", "127.0.0.1:1")
            .args(["result", "01890a5d-ac96-774b-bcce-b302099a8057"]),
    )
    .code(3);
    assert_eq!(
        from_env.error_line(),
        "jobctl: cannot reach jobd at 127.0.0.1:1: connection refused"
    );
}

#[test]
fn a_server_that_dies_mid_wait_is_one_line_and_exit_3() {
    let server = Target::start();
    let id = server.submit(&["async_started"]);
    server.wait_started();
    let waiting = jobctl_std()
        .args(["--addr", &server.addr, "result", &id])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("jobctl starts");
    server.wait_for_waiters(1);
    server.crash();
    let run = finished(waiting.wait_with_output().expect("jobctl ends")).code(3);
    assert_eq!(run.stdout, "");
    let error = run.error_line();
    assert!(
        error.starts_with("jobctl: lost the connection to jobd at http://127.0.0.1:"),
        "{error}"
    );
}

#[test]
fn result_after_a_restart_prints_the_stored_result() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = StoreConfig::Sqlite {
        dir: dir.path().to_owned(),
    };
    let first = Target::start_on(&store);
    let id = first.submit(&["hello", "Ann"]);
    assert_eq!(
        first.jobctl(&["result", &id]).success().line(),
        "Hello, Ann!"
    );
    first.shutdown();

    let second = Target::start_on(&store);
    assert_eq!(
        second.jobctl(&["result", &id]).success().line(),
        "Hello, Ann!"
    );
    assert_eq!(second.jobctl(&["done", &id]).success().line(), "true");
    second.shutdown();
}

#[test]
fn a_request_id_makes_submit_idempotent() {
    let server = Target::start();
    let first = server.submit(&["--request-id", "order-1", "echo", "x"]);
    let again = server.submit(&["--request-id", "order-1", "echo", "x"]);
    assert_eq!(first, again);
    let run = server.jobctl(&["submit", "--request-id", "order-1", "echo", "y"]);
    assert_eq!(run.code, Some(3), "{run:#?}");
    assert!(run.stderr.contains(&first), "{run:#?}");
    server.shutdown();
}

#[test]
fn wait_prints_the_done_and_not_done_split_and_exits_0() {
    let server = Target::start();
    let quick = server.submit(&["hello", "Ann"]);
    server.jobctl(&["result", &quick]).success();
    let slow = server.submit(&["async_started"]);
    server.wait_started();

    let run = server.jobctl(&["wait", &slow, &quick, "--return-when", "first"]);
    let run = run.success();
    assert_eq!(
        run.stdout,
        format!("done: {quick}\nnot_done: {slow}\n"),
        "{run:#?}"
    );
    // Running out of time is an answer too.
    let json = server
        .jobctl(&["-o", "json", "wait", &quick, &slow, "--timeout", "0.2"])
        .success()
        .json();
    assert_eq!(json, json!({"done": [quick], "not_done": [slow]}));

    let run = server.jobctl(&["wait", &slow, "--return-when", "soon"]);
    assert_eq!(run.code, Some(2), "{run:#?}");
    let unknown = uuid::Uuid::now_v7().to_string();
    let run = server.jobctl(&["wait", &quick, &unknown]).code(3);
    assert!(run.error_line().contains("not found"), "{run:#?}");
    server.jobctl(&["cancel", &slow]).success();
    server.shutdown();
}

#[test]
fn list_prints_json_lines_through_a_pipe_with_filters_and_a_limit() {
    let server = Target::start();
    let labelled = server.submit(&["hello", "Ann", "--label", "team=x"]);
    server.jobctl(&["result", &labelled]).success();
    let other = server.submit(&["echo", "1"]);
    server.jobctl(&["result", &other]).success();

    let job = server
        .jobctl(&["list", "--label", "team=x"])
        .success()
        .json();
    assert_eq!(job["job_id"], json!(labelled));
    assert_eq!(job["function"], json!("hello"));
    assert_eq!(job["value"], json!("Hello, Ann!"));
    // Newest first; --limit stops the walk.
    let newest = server
        .jobctl(&["list", "--state", "succeeded", "--limit", "1"])
        .success()
        .json();
    assert_eq!(newest["job_id"], json!(other));
    let run = server.jobctl(&["list"]).success();
    assert_eq!(run.stdout.lines().count(), 2, "{run:#?}");
    let run = server.jobctl(&["list", "--function", "sleep"]).success();
    assert_eq!(run.stdout, "");
    let run = server.jobctl(&["list", "--state", "bogus"]);
    assert_eq!(run.code, Some(2), "{run:#?}");
    server.shutdown();
}

#[test]
fn delete_forgets_a_finished_job_and_refuses_a_running_one() {
    let server = Target::start();
    let finished = server.submit(&["hello"]);
    server.jobctl(&["result", &finished]).success();
    assert_eq!(
        server.jobctl(&["delete", &finished]).success().line(),
        "deleted"
    );
    let run = server.jobctl(&["status", &finished]).code(3);
    assert!(run.error_line().contains("was deleted"), "{run:#?}");

    let running = server.submit(&["async_started"]);
    server.wait_started();
    let run = server.jobctl(&["delete", &running]).code(3);
    assert!(run.error_line().contains("cancel it first"), "{run:#?}");
    server.jobctl(&["cancel", &running]).success();
    let json = server
        .jobctl(&["-o", "json", "delete", &running])
        .success()
        .json();
    assert_eq!(json, json!({"job_id": running, "deleted": true}));
    server.shutdown();
}

#[test]
fn watch_prints_json_lines_until_the_watched_jobs_finish() {
    let server = Target::start();
    let counted = server.submit(&["count", r#"{"steps": 3, "seconds": 0.3}"#]);
    let failed = server.submit(&["fail"]);
    // A failed job among the watched ones: exit 1, as `result` does.
    let run = server
        .jobctl(&["-o", "json", "watch", &counted, &failed])
        .code(1);
    let events: Vec<Value> = run
        .stdout
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{line:?}: {e}")))
        .collect();
    assert!(events.len() >= 2, "{run:#?}");
    let seqs: Vec<u64> = events.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] <= w[1]), "{seqs:?}");
    let last_of = |id: &str| {
        events
            .iter()
            .rev()
            .find(|e| e["job_id"] == id)
            .unwrap_or_else(|| panic!("no event for {id} in {run:#?}"))
    };
    let count_done = last_of(&counted);
    assert_eq!(count_done["state"], "succeeded", "{count_done}");
    assert_eq!(count_done["value"], 3);
    assert_eq!(count_done["progress"]["fraction"], 1.0);
    assert_eq!(count_done["progress"]["message"], "3 of 3");
    let fail_done = last_of(&failed);
    assert_eq!(fail_done["state"], "failed", "{fail_done}");
    assert_eq!(fail_done["error"]["message"], "failed on purpose");
    assert_eq!(
        run.error_line(),
        format!("jobctl: job {failed} failed: failed on purpose")
    );

    // Text, not on a terminal: one plain line per event.
    let run = server.jobctl(&["watch", &counted]).success();
    assert_eq!(
        run.line(),
        format!("{counted}  succeeded  100%  3 of 3  3"),
        "{run:#?}"
    );
    server.shutdown();
}

#[test]
fn watch_by_filter_follows_new_jobs_until_count() {
    let server = Target::start();
    let watcher = jobctl_std()
        .args(["--addr", &server.addr, "-o", "json", "watch"])
        .args([
            "--function",
            "hello",
            "--state",
            "succeeded",
            "--count",
            "1",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("jobctl starts");
    // Wait (bounded) until its watch stream is open on the server.
    let deadline = std::time::Instant::now() + START_LIMIT;
    while server.engine.event_stats().1 < 1 {
        assert!(std::time::Instant::now() < deadline, "jobctl never watched");
        std::thread::sleep(Duration::from_millis(5));
    }
    server
        .jobctl(&["submit", "--wait", "echo", "not me"])
        .success();
    let id = server.submit(&["hello", "Ann"]);
    let run = finished(watcher.wait_with_output().expect("jobctl ends")).success();
    let event: Value = serde_json::from_str(&run.line()).expect("one JSON line");
    assert_eq!(event["job_id"], id.as_str());
    assert_eq!(event["kind"], "state");
    assert_eq!(event["function"], "hello");
    assert_eq!(event["value"], "Hello, Ann!");
    server.shutdown();
}

impl Target {
    /// Runs jobctl against this server with `stdin` as its input.
    fn jobctl_with_stdin(&self, args: &[&str], stdin: &str) -> Run {
        let run = execute(
            jobctl()
                .arg("--addr")
                .arg(&self.addr)
                .args(args)
                .write_stdin(stdin),
        );
        for text in [&run.stdout, &run.stderr] {
            assert!(!text.contains("panicked"), "\"panicked\" in {run:#?}");
        }
        run
    }
}

#[test]
fn map_prints_one_result_per_input_line_in_order() {
    let server = Target::start();
    let run = server
        .jobctl_with_stdin(&["map", "hello"], "Ann\n\n\"Bob\"\n{\"name\": \"Cy\"}\n")
        .success();
    assert_eq!(run.stdout, "Hello, Ann!\nHello, Bob!\nHello, Cy!\n");

    let input: String = (0..300).map(|n| format!("{n}\n")).collect();
    let run = server
        .jobctl_with_stdin(&["map", "echo", "--max-in-flight", "8"], &input)
        .success();
    assert_eq!(run.stdout, input);
    // Each line was a real job.
    assert_eq!(server.engine.job_count(), 303);

    let run = server
        .jobctl_with_stdin(&["map", "--unordered", "echo", "--priority", "5"], &input)
        .success();
    let mut got: Vec<u32> = run.stdout.lines().map(|l| l.parse().unwrap()).collect();
    got.sort_unstable();
    assert_eq!(got, (0..300).collect::<Vec<_>>());
    server.shutdown();
}

#[test]
fn map_answers_failures_per_line_and_exits_1() {
    let server = Target::start();
    // "oops" breaks sleep's argument schema: the server refuses that input
    // alone, in its place, and the map goes on.
    let run = server
        .jobctl_with_stdin(&["-o", "json", "map", "sleep"], "0\noops\n0.01\n")
        .code(1);
    let lines: Vec<Value> = run
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3, "{run:#?}");
    for (n, line) in lines.iter().enumerate() {
        assert_eq!(line["index"], json!(n));
        assert_eq!(line["job_id"].is_string(), n != 1, "{line}");
    }
    assert_eq!(lines[0]["state"], json!("succeeded"));
    assert_eq!(lines[0]["value"], json!(0));
    assert_eq!(lines[1]["state"], json!("rejected"));
    assert_eq!(lines[1]["error"]["kind"], json!("rejected"));
    assert_eq!(lines[1]["error"]["code"], json!(3), "INVALID_ARGUMENT");
    assert_eq!(lines[2]["state"], json!("succeeded"));
    assert_eq!(run.error_line(), "jobctl: 1 of 3 map jobs did not succeed");

    // A job that fails while running is its line's answer too.
    let run = server
        .jobctl_with_stdin(&["-o", "json", "map", "fail"], "1\n")
        .code(1);
    let line: Value = serde_json::from_str(run.stdout.trim()).unwrap();
    assert_eq!(line["state"], json!("failed"), "{line}");
    assert_eq!(line["error"]["kind"], json!("failed"), "{line}");

    // Text: the failed input's line says why, in its place.
    let run = server.jobctl_with_stdin(&["map", "fail"], "0\n").code(1);
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert!(lines[0].starts_with("error: job "), "{run:#?}");

    let run = server
        .jobctl_with_stdin(&["map", "no_such_function"], "1\n")
        .code(3);
    assert!(run.error_line().contains("no_such_function"), "{run:#?}");
    server
        .jobctl(&["map", "echo", "--max-in-flight", "0"])
        .code(2);
    server.shutdown();
}

#[test]
fn map_exits_3_when_the_server_ends_the_stream_with_an_error() {
    let server = Target::start();
    // The third input alone makes a request over the server's 4 MiB message
    // cap: the server answers the two inputs before it and then ends the Map
    // stream OUT_OF_RANGE. The fourth input is never taken, so jobctl must
    // not exit 0 as though every input had been answered.
    let huge = format!("\"{}\"", "x".repeat(5 * 1024 * 1024));
    let stdin = format!("1\n2\n{huge}\n4\n");
    let run = server.jobctl_with_stdin(&["map", "echo"], &stdin).code(3);
    assert_eq!(run.stdout, "1\n2\n", "{run:#?}");
    let error = run.error_line();
    assert!(error.starts_with("jobctl: "), "{error}");
    assert!(error.contains("the map ended after 2 answers: "), "{error}");
    assert!(error.contains("too large"), "{error}");
    server.shutdown();
}

#[test]
fn list_filters_by_submission_time() {
    let server = Target::start();
    let id = server.submit(&["hello"]);
    server.jobctl(&["result", &id]).success();
    let listed = |args: &[&str]| {
        let list: Vec<&str> = ["list"].into_iter().chain(args.iter().copied()).collect();
        server.jobctl(&list).success().stdout.lines().count()
    };
    assert_eq!(listed(&["--submitted-after", "1h"]), 1);
    assert_eq!(listed(&["--submitted-before", "1h"]), 0);
    assert_eq!(listed(&["--submitted-after", "2000-01-01T00:00:00Z"]), 1);
    assert_eq!(listed(&["--submitted-after", "2999-01-01T00:00:00Z"]), 0);
    assert_eq!(
        listed(&[
            "--submitted-after",
            "10m",
            "--submitted-before",
            "2999-01-01T00:00:00+02:00"
        ]),
        1
    );
    let run = server
        .jobctl(&["list", "--submitted-after", "yesterday"])
        .code(2);
    assert!(run.error_line().contains("RFC 3339"), "{run:#?}");
    server.shutdown();
}

/// `jobctl worker` as a child process of the test, its log lines (stderr)
/// read on a thread so that a test can wait for one, and killed if a test
/// fails before it stops it.
struct WorkerProcess {
    child: std::process::Child,
    log: std::sync::mpsc::Receiver<String>,
}

impl WorkerProcess {
    fn start(addr: &str, args: &[&str]) -> Self {
        let mut child = jobctl_std()
            .args(["--addr", addr, "worker"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn jobctl worker");
        let stderr = child.stderr.take().expect("piped stderr");
        let (lines, log) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead as _;
            // Read to the end, so that the worker never blocks on a full
            // pipe, whether or not the test still listens.
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                let _ = lines.send(line);
            }
        });
        Self { child, log }
    }

    /// Waits for a log line containing `needle`, and returns it.
    fn wait_log(&self, needle: &str) -> String {
        let deadline = std::time::Instant::now() + START_LIMIT;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.log.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(line) => seen.push(line),
                Err(error) => panic!("no log line with {needle:?} ({error}) in {seen:#?}"),
            }
        }
    }

    /// SIGTERM through kill(1) (the workspace forbids unsafe code), then
    /// its exit status. Polls for the exit: a child's exit has no signal a
    /// test can wait on with a bound.
    fn terminate(mut self) -> std::process::ExitStatus {
        let status = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM failed");
        let deadline = std::time::Instant::now() + START_LIMIT;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the worker did not exit"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The pids of processes whose argv is exactly `argv`.
fn processes(argv: &[&str]) -> Vec<u32> {
    let wanted: Vec<u8> = argv
        .iter()
        .flat_map(|a| [a.as_bytes(), b"\0"].concat())
        .collect();
    std::fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(|entry| {
            let pid: u32 = entry.ok()?.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            (cmdline == wanted).then_some(pid)
        })
        .collect()
}

/// Polls `condition` until it holds, at most [`START_LIMIT`]: for what
/// has no signal to wait on (a process appearing or gone).
fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + START_LIMIT;
    while !condition() {
        assert!(std::time::Instant::now() < deadline, "never: {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `jobctl worker --exec` runs a command per job through jobd-command:
/// the job's arguments as JSON on stdin, stdout as the result (JSON when it
/// parses, else a string), a clean environment, a non-zero exit as a
/// failure with its code and stderr; a cancel kills the command's whole
/// process group, and so does the job's time limit (as timed out).
/// SIGTERM drains the worker, which exits 0.
#[test]
fn a_worker_runs_commands_for_jobs_and_drains_on_sigterm() {
    let server = Target::start();
    let worker = WorkerProcess::start(
        &server.addr,
        &[
            "--name",
            "commands",
            "--concurrency",
            "4",
            "--exec",
            "cmd.upper=tr a-z A-Z",
            "--exec",
            "cmd.parrot=cat",
            "--exec",
            "cmd.env=env",
            "--exec",
            r#"cmd.fail=sh -c "echo first >&2; echo oops >&2; exit 3""#,
            // Two processes in the command's group: both must go.
            "--exec",
            "cmd.stall=sh -c 'sleep 7778 & exec sleep 7777'",
            "--noop",
            "cmd.nothing",
        ],
    );
    worker.wait_log("attached to jobd");

    let functions = server.jobctl(&["-o", "json", "functions"]).success().stdout;
    let upper = functions
        .lines()
        .map(|line| serde_json::from_str::<Value>(line).unwrap())
        .find(|f| f["name"] == "cmd.upper")
        .unwrap_or_else(|| panic!("no cmd.upper in {functions}"));
    assert_eq!(
        (upper["pool_kind"].as_str(), upper["workers"].as_u64()),
        (Some("worker"), Some(1))
    );
    assert!(
        upper["description"]
            .as_str()
            .unwrap()
            .starts_with("Runs tr "),
        "{upper}"
    );

    let result = |args: &[&str]| {
        let submit: Vec<&str> = ["submit", "--wait"]
            .into_iter()
            .chain(args.iter().copied())
            .collect();
        server.jobctl(&submit)
    };
    assert_eq!(result(&["cmd.upper", "shout"]).success().line(), "SHOUT");
    assert_eq!(
        result(&["cmd.parrot", r#"{"x":[1,2]}"#]).success().line(),
        r#"{"x":[1,2]}"#
    );
    assert_eq!(result(&["cmd.nothing", "7"]).success().line(), "7");
    let env = result(&["cmd.env"]).success().stdout;
    let mut names: Vec<&str> = env
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, _)| k)
        .collect();
    names.sort_unstable();
    assert_eq!(names, ["JOBD_ATTEMPT", "JOBD_JOB_ID", "PATH"], "{env}");
    let failed = result(&["cmd.fail"]).code(1);
    assert!(
        failed
            .stderr
            .contains("failed: exited with code 3: first\noops")
            || failed
                .stderr
                .contains("failed: exited with code 3: first oops"),
        "{failed:#?}"
    );

    // A cancel kills the whole process group at once.
    let id = server.submit(&["cmd.stall"]);
    eventually("the command runs", || {
        !processes(&["sleep", "7777"]).is_empty()
    });
    server.jobctl(&["cancel", &id]).success();
    let cancelled = server.jobctl(&["result", &id]).code(1);
    assert!(cancelled.stderr.contains("was cancelled"), "{cancelled:#?}");
    eventually("the command's group is gone", || {
        processes(&["sleep", "7777"]).is_empty() && processes(&["sleep", "7778"]).is_empty()
    });

    // So does the job's time limit, and the job fails as timed out.
    let id = server.submit(&["cmd.stall", "--run-timeout", "0.5"]);
    server.jobctl(&["result", &id]).code(1);
    let status = server
        .jobctl(&["-o", "json", "status", &id])
        .success()
        .json();
    assert_eq!(status["error"]["kind"], "timed_out", "{status}");
    eventually("the timed-out group is gone", || {
        processes(&["sleep", "7777"]).is_empty() && processes(&["sleep", "7778"]).is_empty()
    });

    assert_eq!(worker.terminate().code(), Some(0));
}

#[test]
fn logs_prints_output_as_written_and_follow_resumes_across_a_broken_connection() {
    use std::io::{BufRead as _, BufReader, Read as _};

    let target = Target::start();
    let gate = std::sync::Arc::clone(&target.fixtures.lock().expect("one test thread").gate);
    let id = target.submit(&["log_gated"]);
    target.wait_started();
    let proxy = jobd_test_support::proxy::CutProxy::start(target.server.server().addr);
    let mut follower = jobctl_std()
        .args(["--addr", &proxy.url(), "logs", "--follow", &id])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("jobctl runs");
    let pid = follower.id();
    // Bounds the test: a follower still running after RUN_LIMIT is killed
    // (and the test fails); once it has exited, the watchdog stands down.
    let (exited, watching) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if watching.recv_timeout(RUN_LIMIT) == Err(std::sync::mpsc::RecvTimeoutError::Timeout) {
            let _ = std::process::Command::new("kill")
                .args(["-9", &pid.to_string()])
                .status();
        }
    });
    let mut stdout = BufReader::new(follower.stdout.take().expect("piped"));
    let mut first = Vec::new();
    stdout.read_until(b'\n', &mut first).unwrap();
    assert_eq!(first, b"first\n");
    // Every connection through the proxy dies while the follower waits.
    proxy.reset();
    gate.add_permits(1);
    let mut rest = Vec::new();
    stdout.read_to_end(&mut rest).unwrap();
    let status = follower.wait().unwrap();
    drop(exited);
    watchdog.join().unwrap();
    let mut stderr = String::new();
    follower
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(status.success(), "{status:?}: {stderr}");
    // Nothing lost, nothing twice, bytes as written.
    assert_eq!(rest, b"\xff\xfe\nsecond\n", "{stderr}");

    // Read once, after the job ended: the whole log.
    let whole = jobctl_std()
        .args(["--addr", &target.addr, "logs", &id])
        .output()
        .unwrap();
    assert!(whole.status.success());
    assert_eq!(whole.stdout, b"first\n\xff\xfe\nsecond\n");
    // As JSON: one object per entry; bytes that are not UTF-8 in base64.
    let json = target.jobctl(&["-o", "json", "logs", &id]).success();
    let entries: Vec<Value> = json
        .stdout
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(entries.len(), 3, "{json:#?}");
    assert_eq!(entries[0]["text"], "first\n");
    assert_eq!(entries[0]["stream"], "log");
    assert_eq!(entries[1]["data_base64"], "//4K");
    assert_eq!(entries[1]["stream"], "stdout");
    assert_eq!(entries[2]["offset"], 9);
    // An unknown job: one line, exit 3.
    let unknown = target
        .jobctl(&["logs", "0190b6e0-0000-7000-8000-000000000000"])
        .code(3);
    assert!(unknown.error_line().contains("not found"), "{unknown:#?}");
    target.shutdown();
}

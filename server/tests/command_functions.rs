//! Command functions (`jobd --functions FILE`) in the real `jobd` binary:
//! arguments stay single literal argv elements, stdin JSON, results and
//! failures, output in the job's log (bytes as written), resource limits
//! set before the program runs, time limits and cancels that leave no
//! process behind, and files with mistakes refused at start.

#![allow(
    clippy::disallowed_methods,
    reason = "tests of the real jobd binary keep real time: its clock is the system's"
)]

use std::time::{Duration, Instant};

use futures::StreamExt as _;
use jobd_client::{ErrorKind, JobClient, JobOutcome, JobState};
use jobd_test_support::{JobdProcess, jobd_binary, refused_start};
use serde_json::{Value, json};

/// A unique marker for processes this test run starts.
fn marker() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("{}{nanos}", std::process::id())
}

const FUNCTIONS: &str = r#"
[functions.say]
description = "Prints its text argument"
command = ["printf", "%s", "{text}"]
result = "text"

[functions.say_anything]
command = ["printf", "%s", "{text}"]
result = "text"
allow_leading_dash = true

[functions.sum]
description = "Sums a JSON array read from stdin"
command = ["python3", "-c", "import sys, json; print(sum(json.load(sys.stdin)))"]
args_schema = { type = "array", items = { type = "number" } }

[functions.chatty]
command = "sh -c 'echo out one; echo err one >&2; printf \"\\377\\n\"; echo out two'"
result = "none"

[functions.fail]
command = ["sh", "-c", "echo something broke >&2; exit 3"]

[functions.missing]
command = ["no-such-program-for-jobd-tests"]

[functions.limited]
command = ["sh", "-c", "ulimit -v; ulimit -t; ulimit -n"]
result = "text"
limits = { memory = "256MiB", cpu_time = "7s", open_files = 40 }

[functions.hog]
command = ["python3", "-c", "b = bytearray(1024 * 1024 * 1024); print(len(b))"]
limits = { memory = "256MiB" }

[functions.slow]
command = ["sleep", "30"]
timeout = "1s"

[functions.family]
command = ["sh", "-c", "sleep {tag} & sleep {tag}; wait"]
args_schema = { type = "object", properties = { tag = { type = "string" } }, required = ["tag"] }
"#;

struct Server {
    jobd: JobdProcess,
    _dir: tempfile::TempDir,
}

fn start() -> Server {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("functions.toml");
    std::fs::write(&path, FUNCTIONS).unwrap();
    let jobd = JobdProcess::start(
        jobd_binary!(),
        &[
            "--store",
            "memory",
            "--functions",
            path.to_str().unwrap(),
            "--blocking-workers",
            "4",
        ],
    );
    Server { jobd, _dir: dir }
}

async fn outcome(client: &JobClient, function: &str, args: Value) -> JobOutcome {
    let job = client.submit(function, args).await.unwrap();
    job.outcome(Some(Duration::from_secs(30))).await.unwrap()
}

fn failure(outcome: &JobOutcome) -> (ErrorKind, &str) {
    match &outcome.result {
        Err((kind, message)) => (*kind, message.as_str()),
        Ok(value) => panic!("expected a failure, got {value}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn arguments_are_single_literal_arguments_and_never_options() {
    let server = start();
    let client = JobClient::connect(server.jobd.url()).await.unwrap();
    let witness = std::env::temp_dir().join(format!("jobd-pwned-{}", marker()));
    let hostile = format!(
        "a b; touch {w} $(touch {w}) `touch {w}` | touch {w} > {w} * ~",
        w = witness.display()
    );
    let said = outcome(&client, "say", json!({"text": hostile})).await;
    assert_eq!(said.result, Ok(json!(hostile)));
    assert!(!witness.exists(), "a value ran as a command");
    // A value that could pass for an option is refused, unless allowed.
    let dash = outcome(&client, "say", json!({"text": "-v"})).await;
    assert_eq!(dash.state, JobState::Failed);
    assert!(failure(&dash).1.contains("'-'"), "{dash:?}");
    let allowed = outcome(&client, "say_anything", json!({"text": "-v"})).await;
    assert_eq!(allowed.result, Ok(json!("-v")));
    // The schema made of the placeholders refuses what does not fit.
    let refused = client
        .submit("say", json!({"text": ["x"]}))
        .await
        .unwrap_err();
    assert_eq!(
        refused.code(),
        Some(tonic::Code::InvalidArgument),
        "{refused}"
    );
    // The process pool's children do not have command functions: asking
    // for it is refused at Submit, not failed in a child.
    let mut on_process = jobd_client::Submission::new("say", json!({"text": "x"}));
    on_process.pool = Some("process".into());
    let refused = client.submit_with(on_process).await.unwrap_err();
    assert_eq!(
        refused.code(),
        Some(tonic::Code::InvalidArgument),
        "{refused}"
    );
    assert!(
        refused.to_string().contains("not the process pool"),
        "{refused}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdin_results_failures_and_output_logs() {
    let server = start();
    let client = JobClient::connect(server.jobd.url()).await.unwrap();
    assert_eq!(
        outcome(&client, "sum", json!([1, 2, 3.5])).await.result,
        Ok(json!(6.5))
    );

    let failed = outcome(&client, "fail", Value::Null).await;
    assert_eq!(failed.state, JobState::Failed);
    assert_eq!(failure(&failed).1, "exited with code 3: something broke");

    let missing = outcome(&client, "missing", Value::Null).await;
    assert_eq!(missing.state, JobState::Failed);
    assert!(
        failure(&missing)
            .1
            .contains("no-such-program-for-jobd-tests"),
        "{missing:?}"
    );

    let job = client.submit("chatty", Value::Null).await.unwrap();
    assert_eq!(job.result().await.unwrap(), Value::Null);
    let mut pages = client.logs(job.id(), 0, false).await.unwrap();
    let mut log: Vec<(jobd_client::LogStream, Vec<u8>)> = Vec::new();
    while let Some(page) = pages.next().await {
        log.extend(
            page.unwrap()
                .entries
                .into_iter()
                .map(|e| (e.stream, e.data)),
        );
    }
    let stdout: Vec<&[u8]> = log
        .iter()
        .filter(|(s, _)| *s == jobd_client::LogStream::Stdout)
        .map(|(_, d)| d.as_slice())
        .collect();
    assert_eq!(stdout, [&b"out one\n"[..], b"\xff\n", b"out two\n"]);
    assert!(
        log.contains(&(jobd_client::LogStream::Stderr, b"err one\n".to_vec())),
        "{log:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_are_set_before_the_program_runs() {
    let server = start();
    let client = JobClient::connect(server.jobd.url()).await.unwrap();
    // As the program itself sees them: KiB, seconds, descriptors.
    let limited = outcome(&client, "limited", Value::Null).await;
    assert_eq!(limited.result, Ok(json!("262144\n7\n40")));
    // A program that wants more memory than its limit fails cleanly.
    let hog = outcome(&client, "hog", Value::Null).await;
    assert_eq!(hog.state, JobState::Failed);
    assert!(failure(&hog).1.contains("MemoryError"), "{hog:?}");
}

/// Processes whose command line holds `tag`, other than this test's own.
fn processes_with(tag: &str) -> usize {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(Result::ok)
        .filter(|entry| {
            std::fs::read(entry.path().join("cmdline"))
                .is_ok_and(|cmdline| String::from_utf8_lossy(&cmdline).contains(tag))
        })
        .count()
}

/// Waits (bounded) until no process holds `tag`: the group is stopped
/// before the job ends, so this should hold at once.
fn none_left(tag: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while processes_with(tag) > 0 {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn time_limits_and_cancels_stop_the_whole_process_group() {
    let server = start();
    let client = JobClient::connect(server.jobd.url()).await.unwrap();
    let started = Instant::now();
    let slow = outcome(&client, "slow", Value::Null).await;
    assert_eq!(slow.state, JobState::Failed);
    assert_eq!(failure(&slow).0, ErrorKind::TimedOut, "{slow:?}");
    // The limit (1 s), then SIGTERM and at most the kill grace.
    assert!(
        started.elapsed() < Duration::from_secs(1 + 5 + 2),
        "{:?}",
        started.elapsed()
    );

    // A program that leaves a child behind in the background: a cancel
    // takes both.
    let tag = format!("1000.{}", marker());
    let job = client.submit("family", json!({"tag": tag})).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while processes_with(&tag) < 2 {
        assert!(Instant::now() < deadline, "the family never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    job.cancel().await.unwrap();
    let ended = job.outcome(Some(Duration::from_secs(30))).await.unwrap();
    assert_eq!(ended.state, JobState::Cancelled, "{ended:?}");
    assert!(none_left(&tag), "processes of a cancelled job are left");
}

#[test]
fn a_functions_file_with_a_mistake_stops_jobd_at_start() {
    let dir = tempfile::tempdir().unwrap();
    for (text, expected) in [
        (
            "[functions.x]\ncommand = [\"cat\", \"{nope}\"]\nargs_schema = { type = \"object\", properties = { yes = { type = \"string\" } } }\n",
            "placeholder {nope} is not a property",
        ),
        (
            "[functions.x]\ncommand = [\"{prog}\"]\n",
            "may not hold a placeholder",
        ),
        (
            "[functions.x]\ncommand = [\"cat\"]\ntimeout = \"soon\"\n",
            "timeout",
        ),
        (
            "[functions.x]\ncommand = [\"cat\"]\ncolour = \"red\"\n",
            "colour",
        ),
        ("[functions.hello]\ncommand = [\"cat\"]\n", "already"),
        (
            "[functions.x]\ncommand = [\"cat\"]\nresult = \"yaml\"\n",
            "result",
        ),
    ] {
        let path = dir.path().join("functions.toml");
        std::fs::write(&path, text).unwrap();
        let error = refused_start(jobd_binary!(), &["--functions", path.to_str().unwrap()]);
        assert!(error.contains(expected), "{text}: {error}");
        assert!(error.contains("functions.toml"), "{error}");
    }
}

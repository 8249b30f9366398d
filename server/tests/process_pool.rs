//! The process pool against the real `jobd` binary: jobs in child
//! processes that crash, abort, segfault, leak, loop or leave processes
//! behind cost one child (or one job), never jobd; cancel, time limits and
//! SIGTERM leave no process behind; the pool keeps its size.
//!
//! The misbehaving functions are jobd's test-only built-ins (`test.*`, the
//! `fault-injection` feature this crate's tests build jobd with). Processes
//! are counted in `/proc`: a process's end has no event a test could await
//! from outside, so the tests look again (bounded) where they must, and
//! look once where jobd promises an order (a cancelled job's processes are
//! gone when Cancel answers; a finished job's leftovers when its result
//! is there).

#![allow(
    clippy::disallowed_methods,
    reason = "tests of the real jobd binary keep real time: its clock is the system's"
)]

use std::time::Duration;

use jobd_client::{CancelOutcome, Error, ErrorKind, JobClient, JobHandle, Submission};
use jobd_proto::pb::{self, job_service_client::JobServiceClient};
use jobd_test_support::{JobdProcess, jobd_binary, procs, seed_example};
use serde_json::{Value, json};
use tokio_stream::StreamExt as _;

/// The grace between SIGTERM and SIGKILL of a child's group (jobd's
/// `KILL_GRACE`).
const KILL_GRACE: Duration = Duration::from_secs(2);

/// How long the pool may take to start a child in place of one that went
/// (a debug build of jobd starting again, on a busy machine).
const RESTART: Duration = Duration::from_secs(20);

async fn start(args: &[&str]) -> (JobdProcess, JobClient) {
    let server = JobdProcess::start(jobd_binary!(), args);
    let client = JobClient::connect(server.url()).await.unwrap();
    (server, client)
}

/// Submits `function(args)` to the process pool, with a running-time limit
/// if given.
async fn submit(
    client: &JobClient,
    function: &str,
    args: Value,
    timeout: Option<Duration>,
) -> JobHandle {
    let mut submission = Submission::new(function, args);
    submission.pool = Some("process".into());
    submission.timeout = timeout;
    client.submit_with(submission).await.unwrap()
}

/// The job's failure, which must be of `kind`; its message.
async fn failure(job: &JobHandle, kind: ErrorKind) -> String {
    match job.result_timeout(Duration::from_secs(30)).await {
        Err(Error::JobFailed {
            kind: got, message, ..
        }) if got == kind => message,
        other => panic!("expected a {kind:?} failure, got {other:?}"),
    }
}

/// Follows the job's log until a line contains `needle` (at most 20 s);
/// returns that line. This is how a test knows a job's code has reached a
/// point: the job says so.
async fn log_line(server: &JobdProcess, job: &JobHandle, needle: &str) -> String {
    let mut jobs = JobServiceClient::new(server.channel().await);
    let mut stream = jobs
        .logs(pb::LogsRequest {
            job_id: job.id().to_string(),
            offset: 0,
            follow: true,
        })
        .await
        .unwrap()
        .into_inner();
    let found = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(page) = stream.next().await {
            for entry in page.unwrap().entries {
                let line = String::from_utf8_lossy(&entry.data).into_owned();
                if line.contains(needle) {
                    return Some(line);
                }
            }
        }
        None
    })
    .await;
    match found {
        Ok(Some(line)) => line,
        Ok(None) => panic!("the log of {} ended without {needle:?}", job.id()),
        Err(_) => panic!("no {needle:?} in the log of {} within 20 s", job.id()),
    }
}

/// The whole log of a finished job, as (stream, text) pairs.
async fn log_of(server: &JobdProcess, job: &JobHandle) -> Vec<(pb::LogStream, String)> {
    let mut jobs = JobServiceClient::new(server.channel().await);
    let mut stream = jobs
        .logs(pb::LogsRequest {
            job_id: job.id().to_string(),
            offset: 0,
            follow: false,
        })
        .await
        .unwrap()
        .into_inner();
    let mut entries = Vec::new();
    while let Some(page) = stream.next().await {
        for entry in page.unwrap().entries {
            entries.push((
                entry.stream(),
                String::from_utf8_lossy(&entry.data).into_owned(),
            ));
        }
    }
    entries
}

/// Waits (bounded) until jobd has exactly `n` live process-pool children;
/// returns their pids.
fn children(jobd: u32, n: usize) -> Vec<u32> {
    procs::wait_for(RESTART, &format!("jobd with {n} children"), || {
        let children = procs::pool_children(jobd);
        if children.len() == n {
            Ok(children.iter().map(|p| p.pid).collect())
        } else {
            Err(format!("{children:?}"))
        }
    })
}

/// Runs `n` short jobs at once, so that the pool has started `n` children.
async fn warm_up(client: &JobClient, n: usize) {
    let mut jobs = Vec::new();
    for i in 0..n {
        jobs.push(submit(client, "return_future", json!([format!("w{i}"), 0.3]), None).await);
    }
    for job in jobs {
        job.result().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_example_on_two_process_workers() {
    let (_server, client) = start(&["--process-workers", "2"]).await;
    // Both run at once, in two children (starting them is part of the
    // 3 s).
    let [hello, _world] = seed_example(&client, Some("process")).await;
    let info = hello.status().await.unwrap();
    assert_eq!(info.pool, "process");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_fails_only_its_job_and_the_pool_heals() {
    let (server, client) = start(&["--process-workers", "2"]).await;
    warm_up(&client, 2).await;
    let before = children(server.pid(), 2);

    let abort = submit(&client, "test.abort", Value::Null, None).await;
    let message = failure(&abort, ErrorKind::WorkerLost).await;
    assert!(message.contains("SIGABRT"), "{message}");
    let segv = submit(&client, "test.segfault", Value::Null, None).await;
    let message = failure(&segv, ErrorKind::WorkerLost).await;
    assert!(message.contains("SIGSEGV"), "{message}");
    let overflow = submit(&client, "test.stack_overflow", Value::Null, None).await;
    let message = failure(&overflow, ErrorKind::WorkerLost).await;
    assert!(message.contains("stack overflow"), "{message}");
    let exit = submit(&client, "test.exit", json!(7), None).await;
    let message = failure(&exit, ErrorKind::WorkerLost).await;
    assert!(message.contains("exited with code 7"), "{message}");

    // jobd is fine, and so is the pool: back to two children, new ones in
    // place of those that died, and they run jobs.
    assert_eq!(
        client
            .submit("hello", json!("Ann"))
            .await
            .unwrap()
            .result()
            .await
            .unwrap(),
        json!("Hello, Ann!")
    );
    let after = children(server.pid(), 2);
    assert!(
        after.iter().any(|pid| !before.contains(pid)),
        "{before:?} -> {after:?}"
    );
    let job = submit(&client, "return_future", json!(["again", 0]), None).await;
    assert_eq!(job.result().await.unwrap(), json!("again"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_child_retries_a_job_with_attempts_left() {
    let (_server, client) = start(&["--process-workers", "1"]).await;
    let mut submission = Submission::new("test.abort", Value::Null);
    submission.max_attempts = 2;
    let job = client.submit_with(submission).await.unwrap();
    let message = failure(&job, ErrorKind::WorkerLost).await;
    assert!(message.contains("SIGABRT"), "{message}");
    // It ran twice: the first loss cost an attempt, the second failed it.
    assert_eq!(job.status().await.unwrap().attempt, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_child_never_retries_a_function_not_safe_to_retry() {
    let (_server, client) =
        start(&["--process-workers", "1", "--not-safe-to-retry", "test.exit"]).await;
    let mut submission = Submission::new("test.exit", json!(1));
    submission.max_attempts = 3;
    let job = client.submit_with(submission).await.unwrap();
    let message = failure(&job, ErrorKind::WorkerLost).await;
    assert!(message.contains("not safe to retry"), "{message}");
    assert_eq!(job.status().await.unwrap().attempt, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runaway_loop_is_killed_at_its_time_limit() {
    let (server, client) = start(&["--process-workers", "1"]).await;
    let limit = Duration::from_secs(1);
    let job = submit(&client, "test.spin", Value::Null, Some(limit)).await;
    log_line(&server, &job, "spinning").await;
    let spinner = children(server.pid(), 1)[0];
    let message = failure(&job, ErrorKind::TimedOut).await;
    assert!(message.contains("killed"), "{message}");
    // From its start to its end, by the server's own clock: the limit, the
    // kill (a loop does not hold out against SIGTERM), and slack.
    let info = job.status().await.unwrap();
    let ran = info
        .finished_at
        .unwrap()
        .duration_since(info.started_at.unwrap())
        .unwrap();
    assert!(
        ran >= limit && ran < limit + KILL_GRACE + Duration::from_secs(1),
        "{ran:?}"
    );
    // The job ended only once its child was gone.
    assert!(
        !procs::alive(spinner),
        "the spinning child {spinner} survived"
    );
    // And the pool has a child again.
    let replacement = children(server.pid(), 1)[0];
    assert_ne!(replacement, spinner);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_kills_the_job_and_every_process_it_started() {
    let (server, client) = start(&["--process-workers", "1"]).await;
    let job = submit(&client, "test.spawn_sleepers", json!(true), None).await;
    let line = log_line(&server, &job, "sleepers").await;
    let sleepers: Vec<u32> =
        serde_json::from_str(line.trim().trim_start_matches("sleepers ")).unwrap();
    let child = children(server.pid(), 1)[0];
    let group: Vec<u32> = procs::in_group(child).iter().map(|p| p.pid).collect();
    for pid in sleepers.iter().chain([&child]) {
        assert!(group.contains(pid), "{pid} not in the group {group:?}");
    }

    let report = job.cancel().await.unwrap();
    assert_eq!(report.outcome, CancelOutcome::Aborted);
    assert_eq!(report.state, jobd_client::JobState::Cancelled);
    // When Cancel answers, nothing of the job runs any more: not its child,
    // not the sleeper it started, not the one a shell left behind.
    for pid in sleepers.iter().chain([&child]) {
        assert!(!procs::alive(*pid), "{pid} outlived the cancel");
    }
    assert_eq!(procs::in_group(child), vec![]);
    assert!(matches!(job.result().await, Err(Error::Cancelled { .. })));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_a_finished_job_left_behind_are_stopped_before_it_ends() {
    let (server, client) = start(&["--process-workers", "1"]).await;
    let job = submit(&client, "test.spawn_sleepers", json!(false), None).await;
    let sleepers: Vec<u32> = serde_json::from_value(job.result().await.unwrap()).unwrap();
    for pid in &sleepers {
        assert!(!procs::alive(*pid), "{pid} outlived its job");
    }
    let log = log_of(&server, &job).await;
    assert!(
        log.iter()
            .any(|(_, line)| line.contains("left processes running")),
        "{log:?}"
    );
    // Its child went with them, and was replaced.
    children(server.pid(), 1);
    assert_eq!(
        submit(&client, "return_future", json!(["next", 0]), None)
            .await
            .result()
            .await
            .unwrap(),
        json!("next")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_hog_is_killed_by_its_limit() {
    let (server, client) =
        start(&["--process-workers", "1", "--process-memory-limit", "256MiB"]).await;
    let hog = submit(&client, "test.memory_hog", json!(1024), None).await;
    let message = failure(&hog, ErrorKind::WorkerLost).await;
    assert!(message.contains("memory allocation"), "{message}");
    assert!(message.contains("--process-memory-limit"), "{message}");
    // Under the limit, the same function runs to its end: the limit is what
    // stopped it, not a child that cannot work at all.
    let modest = submit(&client, "test.memory_hog", json!(32), None).await;
    assert_eq!(modest.result().await.unwrap(), json!(32));
    children(server.pid(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_is_replaced_after_its_share_of_jobs() {
    let (server, client) = start(&[
        "--process-workers",
        "1",
        "--process-max-jobs-per-child",
        "2",
    ])
    .await;
    let mut pids = Vec::new();
    for _ in 0..5 {
        let job = submit(&client, "test.pid", Value::Null, None).await;
        pids.push(job.result().await.unwrap().as_u64().unwrap() as u32);
    }
    assert_eq!(pids[0], pids[1], "{pids:?}");
    assert_eq!(pids[2], pids[3], "{pids:?}");
    assert_ne!(pids[1], pids[2], "{pids:?}");
    assert_ne!(pids[3], pids[4], "{pids:?}");
    // A retired child is gone (and reaped) before its successor starts.
    assert!(!procs::alive(pids[0]));
    assert!(!procs::alive(pids[2]));
    assert_eq!(children(server.pid(), 1), vec![pids[4]]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_process_job_prints_is_in_its_log() {
    let (server, client) = start(&["--process-workers", "1"]).await;
    let job = submit(&client, "test.print", json!("x"), None).await;
    assert_eq!(job.result().await.unwrap(), Value::Null);
    let log = log_of(&server, &job).await;
    // stdout goes to stderr in a child (its stdout is the protocol); a
    // last line without a newline is kept too.
    for expected in [
        (pb::LogStream::Stderr, "out: x\n"),
        (pb::LogStream::Stderr, "err: x"),
        (pb::LogStream::Log, "log: x\n"),
    ] {
        assert!(
            log.iter()
                .any(|(stream, line)| (*stream, line.as_str()) == expected),
            "{expected:?} not in {log:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_children_running_leaves_no_process() {
    let (mut server, client) = start(&["--process-workers", "2", "--shutdown-grace", "1s"]).await;
    let sleepers = submit(&client, "test.spawn_sleepers", json!(true), None).await;
    let spinner = submit(&client, "test.spin", Value::Null, None).await;
    let line = log_line(&server, &sleepers, "sleepers").await;
    log_line(&server, &spinner, "spinning").await;
    let mut pids: Vec<u32> =
        serde_json::from_str(line.trim().trim_start_matches("sleepers ")).unwrap();
    pids.extend(children(server.pid(), 2));

    server.terminate();
    let status = tokio::task::spawn_blocking(move || {
        let status = server.wait_exit(Duration::from_secs(20));
        (status, server)
    })
    .await
    .unwrap()
    .0;
    assert!(status.success(), "jobd exited with {status}");
    for pid in pids {
        assert!(!procs::alive(pid), "{pid} outlived jobd");
    }
}

//! The durable store through the real binary: results survive restarts,
//! interrupted jobs are recovered (or failed, for poison pills and functions
//! not safe to retry), and a data directory that cannot be used is refused
//! with a clear message instead of a silent fallback to memory.

#![allow(
    clippy::disallowed_methods,
    reason = "tests of the real jobd binary keep real time: its clock is the system's"
)]

use std::{
    path::Path,
    time::{Duration, Instant},
};

use jobd_client::{JobClient, JobHandle, JobState};
use jobd_test_support::{JobdProcess, free_listen, jobd_binary, refused_start};
use serde_json::json;

/// Waits until the job's start is on disk: the claim rides in the next
/// group commit, and only a durable claim makes a crash count against the
/// job. Another process has no signal for that, so this looks at the
/// database (read-only, beside the server; bounded).
async fn until_running(dir: &Path, job: &JobHandle) {
    let conn = rusqlite::Connection::open_with_flags(
        dir.join(jobd::store::DB_FILE),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    let id = job.id().as_uuid().as_bytes().to_vec();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let state: i64 = conn
            .query_row("SELECT state FROM jobs WHERE id = ?1", [&id], |r| r.get(0))
            .unwrap();
        if state == 2 {
            return;
        }
        assert!(Instant::now() < deadline, "job never started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn restart(server: &mut JobdProcess, dir: &Path, listen: &str, args: &[&str]) -> JobClient {
    server.kill9();
    *server = JobdProcess::start_in(jobd_binary!(), dir, listen, args);
    JobClient::connect(server.url()).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_and_pending_jobs_survive_restarts_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let listen = free_listen();
    let args = ["--blocking-workers", "1"];
    let mut server = JobdProcess::start_in(jobd_binary!(), dir.path(), &listen, &args);
    let client = JobClient::connect(server.url()).await.unwrap();

    let greeting = client.submit("hello", json!("Ann")).await.unwrap();
    assert_eq!(greeting.result().await.unwrap(), json!("Hello, Ann!"));
    // One worker: `first` runs, `second` and `third` wait behind it.
    let first = client
        .submit("return_future", json!(["first", 0.5]))
        .await
        .unwrap();
    until_running(dir.path(), &first).await;
    let second = client
        .submit("return_future", json!(["second", 0]))
        .await
        .unwrap();
    let third = client
        .submit("return_future", json!(["third", 0]))
        .await
        .unwrap();

    let client = restart(&mut server, dir.path(), &listen, &args).await;
    // The stored result is still there.
    assert_eq!(
        client.job(greeting.id()).result().await.unwrap(),
        json!("Hello, Ann!")
    );
    // The interrupted job ran again (attempt 2), then the pending ones, in
    // their original order.
    let infos = {
        let mut infos = Vec::new();
        for job in [&first, &second, &third] {
            let job = client.job(job.id());
            job.result().await.unwrap();
            infos.push(job.status().await.unwrap());
        }
        infos
    };
    assert_eq!(infos[0].attempt, 2, "{:?}", infos[0]);
    assert_eq!(infos[1].attempt, 1);
    let finish = |i: usize| infos[i].finished_at.unwrap();
    assert!(
        finish(0) <= finish(1) && finish(1) <= finish(2),
        "out of order: {infos:?}"
    );
    server.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_that_keeps_crashing_the_server_is_failed_as_a_poison_pill() {
    let dir = tempfile::tempdir().unwrap();
    let listen = free_listen();
    let mut server = JobdProcess::start_in(jobd_binary!(), dir.path(), &listen, &[]);
    let mut client = JobClient::connect(server.url()).await.unwrap();
    let job = client
        .submit("return_future", json!(["boom", 60]))
        .await
        .unwrap();
    for crash in 1..=jobd::store::POISON_LIMIT {
        until_running(dir.path(), &client.job(job.id())).await;
        client = restart(&mut server, dir.path(), &listen, &[]).await;
        let info = client.job(job.id()).status().await.unwrap();
        if crash < jobd::store::POISON_LIMIT {
            assert_ne!(info.state, JobState::Failed, "failed after {crash} crashes");
        }
    }
    let outcome = client.job(job.id()).outcome(None).await.unwrap();
    assert_eq!(outcome.state, JobState::Failed);
    let (_, message) = outcome.result.unwrap_err();
    assert!(message.contains("poison pill"), "{message}");
    server.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn functions_not_safe_to_retry_fail_instead_of_running_twice() {
    let dir = tempfile::tempdir().unwrap();
    let listen = free_listen();
    let args = ["--not-safe-to-retry", "return_future"];
    let mut server = JobdProcess::start_in(jobd_binary!(), dir.path(), &listen, &args);
    let client = JobClient::connect(server.url()).await.unwrap();
    let job = client
        .submit("return_future", json!(["once", 60]))
        .await
        .unwrap();
    until_running(dir.path(), &job).await;
    let client = restart(&mut server, dir.path(), &listen, &args).await;
    let outcome = client.job(job.id()).outcome(None).await.unwrap();
    assert_eq!(outcome.state, JobState::Failed);
    let (kind, message) = outcome.result.unwrap_err();
    assert_eq!(kind, jobd_client::ErrorKind::Interrupted);
    assert!(message.contains("interrupted by restart"), "{message}");
    assert_eq!(client.job(job.id()).status().await.unwrap().attempt, 1);
    server.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_full_fails_stop_and_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let listen = free_listen();
    // A database capped at 40 pages fills up after a few hundred jobs.
    let mut server = JobdProcess::start_in(
        jobd_binary!(),
        dir.path(),
        &listen,
        &["--unsafe-max-db-pages", "40"],
    );
    let client = JobClient::connect(server.url()).await.unwrap();
    let big = "x".repeat(500);
    let mut acked = Vec::new();
    let first_error = loop {
        match client.submit("noop", json!(big)).await {
            Ok(job) => acked.push(job.id()),
            Err(err) => break err,
        }
        assert!(acked.len() < 10_000, "the capped database never filled up");
    };
    assert_eq!(
        first_error.code(),
        Some(tonic::Code::ResourceExhausted),
        "{first_error}"
    );
    assert!(
        first_error.to_string().contains("disk is full"),
        "{first_error}"
    );
    // Fail-stop: later writes are refused too, and the server stays up.
    let again = client.submit("hello", json!(null)).await.unwrap_err();
    assert!(
        matches!(
            again.code(),
            Some(tonic::Code::Unavailable | tonic::Code::ResourceExhausted)
        ),
        "{again}"
    );
    assert!(!acked.is_empty());

    // Restart without the cap: every acknowledged job is there and finishes.
    let client = restart(&mut server, dir.path(), &listen, &[]).await;
    for id in acked {
        assert_eq!(client.job(id).result().await.unwrap(), json!(big));
    }
    server.terminate();
}

#[test]
fn a_data_dir_in_use_by_another_jobd_is_refused() {
    let server = JobdProcess::start(jobd_binary!(), &[]);
    let dir = server.data_dir().to_str().unwrap().to_owned();
    let err = refused_start(jobd_binary!(), &["--data-dir", &dir]);
    assert!(err.contains("in use by another running jobd"), "{err}");
}

#[test]
fn a_corrupt_database_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(jobd::store::DB_FILE), vec![0xA5; 64 * 1024]).unwrap();
    let err = refused_start(
        jobd_binary!(),
        &["--data-dir", dir.path().to_str().unwrap()],
    );
    assert!(err.contains("cannot open the job database"), "{err}");
    assert!(err.contains("not a database"), "{err}");
}

#[test]
fn an_unwritable_data_dir_is_refused() {
    // /proc refuses new entries even to root, unlike a chmod-ed directory.
    let err = refused_start(
        jobd_binary!(),
        &["--data-dir", "/proc/jobd-test-cannot-exist/data"],
    );
    assert!(err.contains("data directory"), "{err}");
    assert!(err.contains("cannot create it"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_killed_mid_attempt_keeps_its_attempt_count_across_the_restart() {
    let dir = tempfile::tempdir().unwrap();
    let listen = free_listen();
    let mut server = JobdProcess::start_in(jobd_binary!(), dir.path(), &listen, &[]);
    let client = JobClient::connect(server.url()).await.unwrap();
    let job = client
        .submit_with(jobd_client::Submission::new("sleep", json!(2)).max_attempts(3))
        .await
        .unwrap();
    until_running(dir.path(), &job).await;
    let client = restart(&mut server, dir.path(), &listen, &[]).await;
    let job = client.job(job.id());
    assert_eq!(
        job.result_timeout(Duration::from_secs(30)).await.unwrap(),
        json!(2)
    );
    let info = job.status().await.unwrap();
    // The killed start was attempt 1; the run after the restart is 2.
    assert_eq!(
        (info.state, info.attempt, info.max_attempts),
        (JobState::Succeeded, 2, 3)
    );
    // Every transition is kept, the recovery's re-queue included, in order:
    // (state code, attempt).
    let (states, times): (Vec<(i64, u32)>, Vec<i64>) = history(dir.path(), &job)
        .into_iter()
        .map(|(state, attempt, at)| ((state, attempt), at))
        .unzip();
    assert_eq!(states, [(1, 0), (2, 1), (1, 1), (2, 2), (3, 2)]);
    assert!(times.is_sorted(), "{times:?}");
}

/// A job's transitions as the database keeps them: `(state code, attempt,
/// microseconds)` from its `history` column (`state,attempt,at;` each).
fn history(dir: &Path, job: &JobHandle) -> Vec<(i64, u32, i64)> {
    let conn = rusqlite::Connection::open_with_flags(
        dir.join(jobd::store::DB_FILE),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    let id = job.id().as_uuid().as_bytes().to_vec();
    let text: String = conn
        .query_row("SELECT history FROM jobs WHERE id = ?1", [&id], |r| {
            r.get(0)
        })
        .unwrap();
    text.split_terminator(';')
        .map(|entry| {
            let fields: Vec<i64> = entry.split(',').map(|f| f.parse().unwrap()).collect();
            let [state, attempt, at] = fields[..] else {
                panic!("bad history entry {entry:?}")
            };
            (state, u32::try_from(attempt).unwrap(), at)
        })
        .collect()
}

//! `max_attempts` across restarts of a durable server: a job that was
//! waiting to retry, or was interrupted mid-attempt, carries on with the
//! right attempt number after the restart and stops at `max_attempts`.

use std::{sync::Arc, time::Duration};

use jobd::{JobError, Registry, StoreConfig};
use jobd_client::{ErrorKind, JobId, JobState, Submission};
use serde_json::json;
use tokio::sync::{Notify, mpsc};

use crate::harness::{TestServer, config};

/// What `flaky` does in one server's life, after reporting its attempt.
#[derive(Clone)]
enum Behaviour {
    /// Waits for the test's go-ahead, then fails retryably.
    FailWhenTold(Arc<Notify>),
    /// Runs until it is interrupted.
    Hang,
    /// Fails retryably at once.
    Fail,
}

/// A registry whose `flaky` reports `ctx.attempt()` on `attempts`, then
/// behaves as told.
fn flaky(behaviour: Behaviour, attempts: mpsc::Sender<u32>) -> Registry {
    let mut registry = Registry::new();
    registry.register_async(
        "flaky",
        "reports its attempt, then as told",
        move |ctx, _args| {
            let (behaviour, attempts) = (behaviour.clone(), attempts.clone());
            async move {
                let attempt = ctx.attempt();
                let _ = attempts.send(attempt).await;
                match behaviour {
                    Behaviour::FailWhenTold(go) => go.notified().await,
                    Behaviour::Hang => tokio::time::sleep(Duration::from_secs(60)).await,
                    Behaviour::Fail => {}
                }
                Err(JobError::Retryable(format!("attempt {attempt} failed")))
            }
        },
    );
    registry
}

async fn start(dir: &std::path::Path, registry: Registry) -> TestServer {
    let store = StoreConfig::Sqlite {
        dir: dir.to_owned(),
    };
    // A short grace, so that a hanging job is interrupted at shutdown.
    TestServer::start_on(
        registry,
        config(4, 1, 100),
        Duration::from_millis(200),
        &store,
    )
    .await
}

/// Waits until the job is pending again after `attempt` (its retry is
/// committed). Polls an exact condition; bounded.
async fn until_pending_after(server: &TestServer, id: JobId, attempt: u32) {
    let client = server.client().await;
    for _ in 0..1000 {
        let info = client.job(id).status().await.unwrap();
        if info.state == JobState::Pending && info.attempt == attempt {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("job {id} never went back to pending after attempt {attempt}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attempts_carry_on_across_restarts_and_stop_at_max_attempts() {
    let dir = tempfile::tempdir().unwrap();
    let (tx, mut attempts) = mpsc::channel(16);

    // Life 1: attempt 1 fails retryably; the pools are paused before the
    // retry can start, and the server stops with the job waiting to retry.
    let go = Arc::new(Notify::new());
    let server = start(
        dir.path(),
        flaky(Behaviour::FailWhenTold(Arc::clone(&go)), tx.clone()),
    )
    .await;
    let id = server
        .client()
        .await
        .submit_with(Submission::new("flaky", json!(null)).max_attempts(4))
        .await
        .unwrap()
        .id();
    assert_eq!(attempts.recv().await, Some(1));
    server.engine.set_paused(true);
    go.notify_one();
    until_pending_after(&server, id, 1).await;
    server.shutdown().await;

    // Life 2: the retry is attempt 2 (not 1 again); it is interrupted by
    // the shutdown while it runs.
    let server = start(dir.path(), flaky(Behaviour::Hang, tx.clone())).await;
    assert_eq!(attempts.recv().await, Some(2));
    server.shutdown().await;

    // Life 3: attempts 3 and 4 fail, and there is no fifth.
    let server = start(dir.path(), flaky(Behaviour::Fail, tx)).await;
    let job = server.client().await.job(id);
    let outcome = job.outcome(Some(Duration::from_secs(30))).await.unwrap();
    assert_eq!(outcome.state, JobState::Failed);
    assert_eq!(
        outcome.result,
        Err((ErrorKind::Failed, "attempt 4 failed".to_owned()))
    );
    assert_eq!(attempts.recv().await, Some(3));
    assert_eq!(attempts.recv().await, Some(4));
    let info = job.status().await.unwrap();
    assert_eq!((info.attempt, info.max_attempts), (4, 4));
    server.shutdown().await;
    assert!(
        attempts.try_recv().is_err(),
        "an attempt beyond max_attempts ran"
    );
}

//! Cancel in every state, with the answer saying what happened.

use jobd_client::{CancelOutcome, JobState};
use serde_json::json;

use crate::harness::{TestServer, config, registry};

#[tokio::test]
async fn pending_job_is_cancelled_at_once_and_never_runs() {
    let (registry, mut fx) = registry();
    let server = TestServer::start(registry, config(8, 1, 100)).await;
    let client = server.client().await;
    let blocker = client.submit("blocking_started", json!(300)).await.unwrap();
    fx.started.recv().await.unwrap();
    let queued = client.submit("probe_blocking", json!(1)).await.unwrap();

    let report = queued.cancel().await.unwrap();
    assert_eq!(report.outcome, CancelOutcome::Cancelled);
    assert!(report.cancelled);
    assert_eq!(report.state, JobState::Cancelled);
    assert!(matches!(
        queued.result().await,
        Err(jobd_client::Error::Cancelled { .. })
    ));
    let outcome = queued.outcome(None).await.unwrap();
    assert_eq!(outcome.state, JobState::Cancelled);

    blocker.result().await.unwrap();
    // The worker got past the cancelled job without running it.
    let next = client.submit("probe_blocking", json!(1)).await.unwrap();
    next.result().await.unwrap();
    assert_eq!(fx.probe.started(), 1, "the cancelled job ran");
    server.shutdown().await;
}

#[tokio::test]
async fn running_async_job_is_aborted() {
    let (server, mut fx) = TestServer::with_fixtures().await;
    let client = server.client().await;
    let job = client.submit("async_started", json!("a")).await.unwrap();
    assert_eq!(fx.started.recv().await.unwrap(), json!("a"));
    let report = job.cancel().await.unwrap();
    assert_eq!(report.outcome, CancelOutcome::Aborted);
    assert!(report.cancelled);
    assert_eq!(report.state, JobState::Cancelled);
    assert!(job.done().await.unwrap());
    assert!(matches!(
        job.result().await,
        Err(jobd_client::Error::Cancelled { .. })
    ));
    server.shutdown().await;
}

#[tokio::test]
async fn running_blocking_job_gets_a_request_it_may_ignore() {
    let (server, mut fx) = TestServer::with_fixtures().await;
    let client = server.client().await;
    let job = client.submit("blocking_started", json!(300)).await.unwrap();
    fx.started.recv().await.unwrap();
    let report = job.cancel().await.unwrap();
    // Like Future.cancel() on a running future: False.
    assert_eq!(report.outcome, CancelOutcome::Requested);
    assert!(!report.cancelled);
    assert_eq!(report.state, JobState::Running);
    // This function does not look at its context, so it completes.
    assert_eq!(job.result().await.unwrap(), json!("finished anyway"));
    server.shutdown().await;
}

#[tokio::test]
async fn running_blocking_job_that_honours_the_request_ends_cancelled() {
    let (server, mut fx) = TestServer::with_fixtures().await;
    let client = server.client().await;
    let job = client.submit("polite_started", json!(null)).await.unwrap();
    fx.started.recv().await.unwrap();
    let report = job.cancel().await.unwrap();
    assert_eq!(report.outcome, CancelOutcome::Requested);
    let outcome = job.outcome(None).await.unwrap();
    assert_eq!(outcome.state, JobState::Cancelled);
    server.shutdown().await;
}

#[tokio::test]
async fn cpu_bound_builtin_honours_cancel() {
    let (server, _fx) = TestServer::with_fixtures().await;
    let client = server.client().await;
    // Far more rounds than the test could wait for.
    let job = client
        .submit("sha256", json!({"text": "x", "rounds": 100_000_000}))
        .await
        .unwrap();
    // A built-in has no start signal to wait on; its state is the signal.
    let mut polls = 0;
    while job.state().await.unwrap() != JobState::Running {
        polls += 1;
        assert!(polls < 10_000, "sha256 never started on an idle pool");
        tokio::task::yield_now().await;
    }
    let report = job.cancel().await.unwrap();
    assert_eq!(report.outcome, CancelOutcome::Requested, "{report:?}");
    assert_eq!(job.outcome(None).await.unwrap().state, JobState::Cancelled);
    server.shutdown().await;
}

#[tokio::test]
async fn finished_job_reports_already_done() {
    let (server, _fx) = TestServer::with_fixtures().await;
    let client = server.client().await;
    let job = client.submit("hello", json!(null)).await.unwrap();
    job.result().await.unwrap();
    let report = job.cancel().await.unwrap();
    assert_eq!(report.outcome, CancelOutcome::AlreadyDone);
    assert!(!report.cancelled);
    assert_eq!(report.state, JobState::Succeeded);
    assert_eq!(job.result().await.unwrap(), json!("Hello, world!"));
    server.shutdown().await;
}

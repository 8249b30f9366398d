//! Graceful shutdown: stop accepting, let running jobs finish within the
//! grace period, answer waiters, and say NOT_SERVING from the start.

use std::time::Duration;

use jobd_client::JobState;
use serde_json::json;

use crate::harness::{TestServer, config, registry};

#[tokio::test]
async fn running_jobs_finish_and_waiters_get_their_answers() {
    let (registry, mut fx) = registry();
    let server =
        TestServer::start_with_grace(registry, config(8, 1, 100), Duration::from_secs(10)).await;
    let client = server.client().await;
    let running = client.submit("blocking_started", json!(500)).await.unwrap();
    fx.started.recv().await.unwrap();
    let waiter = tokio::spawn({
        let running = running.clone();
        async move { running.result().await }
    });
    server.until_waiters(1).await;
    let engine = server.engine.clone();
    server.shutdown().await;
    // The drain waited for the running job; its waiter got the real result.
    assert_eq!(waiter.await.unwrap().unwrap(), json!("finished anyway"));
    assert_eq!(
        engine.state(running.id()).await.unwrap(),
        JobState::Succeeded
    );
    // New work is refused.
    let refused = engine
        .submit(jobd::SubmitSpec {
            function: "hello".into(),
            ..Default::default()
        })
        .await;
    assert_eq!(refused, Err(jobd::Error::ShuttingDown));
}

#[tokio::test]
async fn jobs_still_running_after_the_grace_period_are_interrupted() {
    let (registry, mut fx) = registry();
    let server =
        TestServer::start_with_grace(registry, config(8, 1, 100), Duration::from_millis(200)).await;
    let client = server.client().await;
    let stuck = client.submit("async_started", json!(null)).await.unwrap();
    fx.started.recv().await.unwrap();
    let waiter = tokio::spawn({
        let stuck = stuck.clone();
        async move { stuck.outcome(None).await }
    });
    server.until_waiters(1).await;
    let engine = server.engine.clone();
    server.shutdown().await;
    let outcome = waiter.await.unwrap().unwrap();
    assert_eq!(outcome.state, JobState::Failed);
    let (kind, message) = outcome.result.unwrap_err();
    assert_eq!(kind, jobd_client::ErrorKind::Interrupted);
    assert!(message.contains("shut down"), "{message}");
    assert_eq!(engine.state(stuck.id()).await.unwrap(), JobState::Failed);
}

#[tokio::test]
async fn health_turns_not_serving_when_the_drain_starts() {
    let (registry, mut fx) = registry();
    let server =
        TestServer::start_with_grace(registry, config(8, 1, 100), Duration::from_secs(10)).await;
    let client = server.client().await;
    let channel = tonic::transport::Endpoint::from_shared(server.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    // Watch on an open stream: it survives the drain and reports the change.
    let mut watch = health
        .watch(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let serving = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
    let not_serving = tonic_health::pb::health_check_response::ServingStatus::NotServing as i32;
    assert_eq!(watch.message().await.unwrap().unwrap().status, serving);

    let running = client
        .submit("blocking_started", json!(1000))
        .await
        .unwrap();
    fx.started.recv().await.unwrap();
    let waiter = tokio::spawn(async move { running.result().await });
    server.until_waiters(1).await;
    server.begin_shutdown();
    assert_eq!(watch.message().await.unwrap().unwrap().status, not_serving);
    drop(watch);
    // The job started before the drain still finishes, and the call that
    // was waiting for it gets the answer.
    assert_eq!(waiter.await.unwrap().unwrap(), json!("finished anyway"));
    server.join().await;
}

/// Drops slowly, as a job future holding a resource with a costly cleanup.
struct SlowDrop;

impl Drop for SlowDrop {
    fn drop(&mut self) {
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// `hang`: reports its attempt on `started`, then runs until interrupted
/// and drops slowly.
fn hanging(started: tokio::sync::mpsc::Sender<u32>) -> jobd::Registry {
    let mut registry = jobd::Registry::new();
    registry.register_async("hang", "runs until interrupted", move |ctx, _args| {
        let started = started.clone();
        async move {
            let _cleanup = SlowDrop;
            let _ = started.send(ctx.attempt()).await;
            std::future::pending::<()>().await;
            Ok(json!(null))
        }
    });
    registry
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_store_opens_again_as_soon_as_shutdown_returns() {
    // The interrupted job's task still holds the engine (and the store's
    // lock on its directory) until its future is dropped: shutdown must
    // wait for that, so that an embedder can open the store again.
    let dir = tempfile::tempdir().unwrap();
    let store = jobd::StoreConfig::Sqlite {
        dir: dir.path().to_owned(),
    };
    let (started, mut attempts) = tokio::sync::mpsc::channel(1);
    let grace = Duration::from_millis(100);
    let server =
        TestServer::start_on(hanging(started.clone()), config(4, 1, 100), grace, &store).await;
    server
        .client()
        .await
        .submit("hang", json!(null))
        .await
        .unwrap();
    assert_eq!(attempts.recv().await, Some(1));
    server.shutdown().await;

    let engine = jobd::Engine::open(hanging(started), config(4, 1, 100), &store)
        .expect("the store opens again once shutdown has returned");
    // The interrupted job went back to pending and runs again.
    assert_eq!(attempts.recv().await, Some(2));
    engine.shutdown(grace).await;
}

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

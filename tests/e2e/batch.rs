//! SubmitBatch, pausing the pools, and the client's automatic request ids
//! and retries.

use std::{future::IntoFuture as _, time::Duration};

use jobd_client::{JobClient, JobState, Submission};
use jobd_proto::pb;
use serde_json::json;
use tonic::Code;

use crate::harness::{TestServer, config, on_tokio_clock, registry, submit_noops};

#[tokio::test]
async fn a_batch_answers_each_item_in_order() {
    let (server, _fx) = TestServer::with_fixtures().await;
    let client = server.client().await;
    let batch = vec![
        Submission::new("echo", json!(0)),
        Submission::new("no_such_function", json!(1)),
        Submission::new("echo", json!(2)),
        Submission::new("bad name!", json!(3)),
        Submission::new("echo", json!(4)),
    ];
    let results = client.submit_batch(batch).await.unwrap();
    assert_eq!(results.len(), 5);
    assert_eq!(
        results[1].as_ref().unwrap_err().code(),
        Some(Code::NotFound)
    );
    assert_eq!(
        results[3].as_ref().unwrap_err().code(),
        Some(Code::InvalidArgument)
    );
    for (i, result) in results.iter().enumerate().filter(|(i, _)| i % 2 == 0) {
        let job = result.as_ref().unwrap();
        assert_eq!(job.result().await.unwrap(), json!(i), "item {i}");
    }
    assert_eq!(server.engine.job_count(), 3);
    server.shutdown().await;
}

#[tokio::test]
async fn a_thousand_jobs_in_one_batch_all_complete() {
    let (server, _fx) = TestServer::with_fixtures().await;
    let client = server.client().await;
    let jobs = submit_noops(&client, 1000).await;
    for (n, job) in jobs.iter().enumerate() {
        assert_eq!(job.result().await.unwrap(), json!(n));
    }
    server.shutdown().await;
}

#[tokio::test]
async fn empty_and_oversized_batches_are_invalid_argument() {
    let (server, _fx) = TestServer::with_fixtures().await;
    let mut rpc = server.client().await.rpc();
    let status = rpc
        .submit_batch(pb::SubmitBatchRequest { requests: vec![] })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let one = pb::SubmitRequest {
        function: "noop".into(),
        ..Default::default()
    };
    let status = rpc
        .submit_batch(pb::SubmitBatchRequest {
            requests: vec![one; 10_001],
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("10000"), "{}", status.message());
    assert_eq!(server.engine.job_count(), 0);
    server.shutdown().await;
}

#[tokio::test]
async fn paused_pools_queue_jobs_until_resumed() {
    let (registry, fx) = registry();
    let server = TestServer::start(
        registry,
        jobd::EngineConfig {
            paused: true,
            ..config(8, 1, 100)
        },
    )
    .await;
    let client = server.client().await;
    let a = client.submit("probe_async", json!(1)).await.unwrap();
    let b = client.submit("probe_blocking", json!(1)).await.unwrap();
    let err = a
        .result_timeout(Duration::from_millis(100))
        .await
        .unwrap_err();
    assert!(matches!(err, jobd_client::Error::Timeout), "{err}");
    assert_eq!(a.state().await.unwrap(), JobState::Pending);
    assert_eq!(b.state().await.unwrap(), JobState::Pending);
    assert_eq!(fx.probe.started(), 0);
    server.engine.set_paused(false);
    assert_eq!(a.result().await.unwrap(), json!("probed"));
    assert_eq!(b.result().await.unwrap(), json!("probed"));
    server.shutdown().await;
}

/// On tokio's paused clock: the client's retry pauses pass in virtual time.
#[tokio::test(start_paused = true)]
async fn the_client_sets_a_request_id_and_retries_until_the_server_is_up() {
    // Reserve a port, then start the server on it only after the client's
    // first attempt has failed: the retry must get through.
    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = probe.local_addr().unwrap();
    drop(probe);
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_lazy();
    let client = JobClient::from_channel(channel);
    let started = tokio::time::Instant::now();
    let submit = tokio::spawn(async move {
        let job = client.submit("hello", json!("late")).await?;
        let info = job.status().await?;
        Ok::<_, jobd_client::Error>((job.result().await?, info.request_id))
    });
    // The first attempt, at once, is refused (nothing listens); the retries
    // wait 50 ms, then 200 ms, then 800 ms. The server is up from 120 ms.
    tokio::time::sleep(Duration::from_millis(120)).await;
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let (registry, _fx) = registry();
    let engine = jobd::Engine::start(registry, on_tokio_clock(jobd::EngineConfig::default()));
    let stop = tokio_util::sync::CancellationToken::new();
    let server = tokio::spawn(
        jobd::serve(listener, engine)
            .with_graceful_shutdown(stop.clone().cancelled_owned(), Duration::from_secs(1))
            .into_future(),
    );
    let (value, request_id) = submit.await.unwrap().unwrap();
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(50),
        "the first attempt cannot have got through: {waited:?}"
    );
    assert!(
        waited < Duration::from_millis(1050),
        "more retries than the server's start needed: {waited:?}"
    );
    assert_eq!(value, json!("Hello, late!"));
    assert!(
        request_id.is_some_and(|id| id.len() == 36),
        "no automatic request id"
    );
    stop.cancel();
    server.await.unwrap().unwrap();
}

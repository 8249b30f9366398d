//! Pool sizes are limits the functions themselves can observe.

use std::time::{Duration, Instant};

use futures::future::join_all;
use serde_json::json;

use crate::harness::{TestServer, config, registry};

#[tokio::test]
async fn blocking_pool_never_runs_more_than_its_workers() {
    let (registry, fx) = registry();
    let server = TestServer::start(registry, config(64, 2, 100)).await;
    let client = server.client().await;
    let mut jobs = Vec::new();
    for _ in 0..8 {
        jobs.push(client.submit("probe_blocking", json!(50)).await.unwrap());
    }
    for result in join_all(jobs.iter().map(|j| j.result())).await {
        assert_eq!(result.unwrap(), json!("probed"));
    }
    assert_eq!(fx.probe.started(), 8);
    // Exactly the pool size: never more, and the pool was really used in
    // parallel.
    assert_eq!(fx.probe.max_running(), 2);
    server.shutdown().await;
}

#[tokio::test]
async fn async_pool_concurrency_limit_holds() {
    let (registry, fx) = registry();
    let server = TestServer::start(registry, config(3, 1, 100)).await;
    let client = server.client().await;
    let mut jobs = Vec::new();
    for _ in 0..12 {
        jobs.push(client.submit("probe_async", json!(30)).await.unwrap());
    }
    for result in join_all(jobs.iter().map(|j| j.result())).await {
        assert_eq!(result.unwrap(), json!("probed"));
    }
    assert_eq!(fx.probe.started(), 12);
    assert_eq!(fx.probe.max_running(), 3);
    server.shutdown().await;
}

#[tokio::test]
async fn two_hundred_async_sleeps_run_concurrently() {
    let (server, _fx) = TestServer::with_fixtures().await;
    let client = server.client().await;
    let start = Instant::now();
    let jobs = join_all((0..200).map(|_| client.submit("sleep", json!(0.5)))).await;
    let jobs: Vec<_> = jobs.into_iter().map(Result::unwrap).collect();
    for result in join_all(jobs.iter().map(|j| j.result())).await {
        assert_eq!(result.unwrap(), json!(0.5));
    }
    let elapsed = start.elapsed();
    // Sequentially this would take 100 s; concurrently a little over 0.5 s.
    assert!(elapsed < Duration::from_secs(2), "took {elapsed:?}");
    server.shutdown().await;
}

#[tokio::test]
async fn blocking_jobs_do_not_stall_the_async_pool() {
    let (registry, mut fx) = registry();
    let server = TestServer::start(registry, config(64, 1, 100)).await;
    let client = server.client().await;
    let blocker = client
        .submit("blocking_started", json!(2000))
        .await
        .unwrap();
    fx.started.recv().await.unwrap();
    // The only blocking worker is busy for 2 s; async work is unaffected.
    let start = Instant::now();
    let quick = client.submit("hello", json!("fast")).await.unwrap();
    assert_eq!(quick.result().await.unwrap(), json!("Hello, fast!"));
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "{:?}",
        start.elapsed()
    );
    assert!(!blocker.done().await.unwrap());
    blocker.result().await.unwrap();
    server.shutdown().await;
}

//! Priority aging: a low-priority job runs despite a steady flood of
//! higher-priority ones, as observed by the job functions themselves.

use std::time::Duration;

use jobd::{EngineConfig, Registry};
use jobd_client::Submission;
use serde_json::json;
use tokio::sync::mpsc;

use crate::harness::{TestServer, config};

/// Priority of the flood; the lone job has priority 0.
const FLOOD_PRIORITY: i32 = 100;
/// High-priority jobs kept queued ahead of the lone job at all times.
const BACKLOG: usize = 20;

/// One async worker running `record`, which reports each argument as it
/// starts and takes 2 ms.
fn recording_server(aging: Duration) -> (Registry, EngineConfig, mpsc::Receiver<i64>) {
    let (tx, rx) = mpsc::channel(64);
    let mut registry = Registry::new();
    registry.register_async(
        "record",
        "reports its argument, sleeps 2 ms",
        move |_ctx, args| {
            let tx = tx.clone();
            async move {
                // The test stops listening at its end, with jobs still queued.
                let _ = tx.send(args.as_i64().unwrap_or_default()).await;
                tokio::time::sleep(Duration::from_millis(2)).await;
                Ok(args)
            }
        },
    );
    let config = EngineConfig {
        paused: true,
        priority_aging: aging,
        ..config(1, 1, 10_000)
    };
    (registry, config, rx)
}

/// Queues BACKLOG flood jobs and then the lone job (argument -1), resumes
/// the pool, and tops the flood up by one job for every job that starts, so
/// newer high-priority jobs are always waiting. Returns how many flood jobs
/// submitted after the lone job started before it, or `None` if it had not
/// started after `max_starts` starts.
async fn flood(aging: Duration, max_starts: usize) -> Option<usize> {
    let (registry, config, mut ran) = recording_server(aging);
    let server = TestServer::start(registry, config).await;
    let client = server.client().await;
    let high = |n: i64| Submission::new("record", json!(n)).priority(FLOOD_PRIORITY);
    let backlog = (0..BACKLOG as i64).map(high).collect();
    for job in client.submit_batch(backlog).await.unwrap() {
        job.unwrap();
    }
    client
        .submit_with(Submission::new("record", json!(-1)))
        .await
        .unwrap();
    server.engine.set_paused(false);
    let mut overtook = 0;
    let mut answer = None;
    for next in (BACKLOG as i64..).take(max_starts) {
        let started = ran.recv().await.unwrap();
        if started == -1 {
            answer = Some(overtook);
            break;
        }
        if started >= BACKLOG as i64 {
            overtook += 1;
        }
        client.submit_with(high(next)).await.unwrap();
    }
    server.engine.set_paused(true);
    drop(ran);
    server.shutdown().await;
    answer
}

#[tokio::test]
async fn a_low_priority_job_runs_despite_a_flood_of_higher_ones() {
    // 10 ms a step and a gap of 100 steps: flood jobs that arrive up to 1 s
    // after the lone job may overtake it, later ones may not.
    let overtook = flood(Duration::from_millis(10), 5_000)
        .await
        .expect("the low-priority job never ran during the flood");
    eprintln!("{overtook} newer high-priority jobs ran before the aged low-priority one");
    assert!(
        overtook > 0,
        "priority no longer matters: no newer high-priority job overtook the lone job"
    );
}

#[tokio::test]
async fn without_aging_the_flood_starves_the_low_priority_job() {
    // The control: proves the test above can fail.
    assert_eq!(flood(Duration::ZERO, 300).await, None);
}

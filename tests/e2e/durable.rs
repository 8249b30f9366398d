//! Idempotent Submit and retention, on both stores: the same request id never
//! creates a second job, and expired jobs are told apart from unknown ones.

use std::time::Duration;

use futures::future::join_all;
use jobd_client::{JobId, Submission};
use jobd_proto::pb;
use serde_json::json;
use tonic::Code;

use crate::harness::{self, TestServer, config};

/// Both stores, with the given retention.
async fn on_both_stores<F, Fut>(retention: Duration, test: F)
where
    F: Fn(TestServer) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let config = jobd::EngineConfig {
        retention,
        ..config(64, 2, 10_000)
    };
    harness::on_both_stores(config, |server, _fx| test(server)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_submits_with_one_request_id_make_one_job() {
    on_both_stores(Duration::from_secs(3600), |server| async move {
        let client = server.client().await;
        let submits = (0..50).map(|_| {
            client
                .submit_with(Submission::new("echo", json!({"a": 1, "b": 2})).request_id("order-7"))
        });
        let ids: Vec<JobId> = join_all(submits)
            .await
            .into_iter()
            .map(|r| r.unwrap().id())
            .collect();
        assert!(ids.iter().all(|id| *id == ids[0]), "{ids:?}");
        assert_eq!(server.engine.job_count(), 1);
        // Key order in the arguments does not make it a different request.
        let same = client
            .submit_with(Submission::new("echo", json!({"b": 2, "a": 1})).request_id("order-7"))
            .await
            .unwrap();
        assert_eq!(same.id(), ids[0]);
        server.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_request_id_with_other_content_is_already_exists() {
    on_both_stores(Duration::from_secs(3600), |server| async move {
        let client = server.client().await;
        let first = client
            .submit_with(Submission::new("echo", json!(1)).request_id("r-1"))
            .await
            .unwrap();
        let err = client
            .submit_with(Submission::new("echo", json!(2)).request_id("r-1"))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some(Code::AlreadyExists), "{err}");
        assert!(err.to_string().contains(&first.id().to_string()), "{err}");
        let err = client
            .submit_with(Submission::new("hello", json!("Ann")).request_id("r-1"))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some(Code::AlreadyExists), "{err}");
        assert_eq!(server.engine.job_count(), 1);
        server.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_after_client_timeouts_make_exactly_one_job_per_request_id() {
    on_both_stores(Duration::from_secs(3600), |server| async move {
        let rpc = server.client().await.rpc();
        const REQUESTS: usize = 100;
        let mut gave_up = 0;
        let mut job_of = Vec::new();
        for n in 0..REQUESTS {
            let request = || pb::SubmitRequest {
                function: "noop".into(),
                args: Some(jobd_proto::value::from_json(json!(n))),
                request_id: format!("retry-{n}"),
                ..Default::default()
            };
            // A deadline too short to wait for the answer: the server may or
            // may not have created the job by the time the client gives up.
            let mut hasty = tonic::Request::new(request());
            hasty.set_timeout(Duration::from_micros(200));
            if rpc.clone().submit(hasty).await.is_err() {
                gave_up += 1;
            }
            // The retry, with the same request id, must find that job.
            let answer = rpc.clone().submit(request()).await.unwrap().into_inner();
            job_of.push(answer.job_id);
        }
        assert!(gave_up > 0, "no submit timed out; the test proved nothing");
        let mut unique = job_of.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), REQUESTS);
        assert_eq!(
            server.engine.job_count(),
            REQUESTS,
            "a retry created a second job"
        );
        server.shutdown().await;
    })
    .await;
}

/// The in-memory store on tokio's paused clock: retention's timers and the
/// stored finish times move with virtual time, so the test waits for no
/// real second.
#[tokio::test(start_paused = true)]
async fn finished_jobs_expire_and_say_so_in_memory() {
    let retention = Duration::from_secs(60);
    let (registry, _fx) = harness::registry();
    let config = harness::on_tokio_clock(jobd::EngineConfig {
        retention,
        ..config(64, 2, 10_000)
    });
    expire_and_say_so(TestServer::start(registry, config).await, retention).await;
}

/// The SQLite store in real time, with a short retention: its writer
/// answers from a thread of its own, which a paused runtime cannot wait
/// for without moving its clock on by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_jobs_expire_and_say_so_on_disk() {
    let retention = Duration::from_millis(300);
    let dir = tempfile::tempdir().unwrap();
    let (registry, _fx) = harness::registry();
    let config = jobd::EngineConfig {
        retention,
        ..config(64, 2, 10_000)
    };
    let store = jobd::StoreConfig::Sqlite {
        dir: dir.path().to_owned(),
    };
    let server = TestServer::start_on(registry, config, Duration::from_secs(5), &store).await;
    expire_and_say_so(server, retention).await;
}

async fn expire_and_say_so(server: TestServer, retention: Duration) {
    let client = server.client().await;
    let job = client.submit("hello", json!("Ann")).await.unwrap();
    assert_eq!(job.result().await.unwrap(), json!("Hello, Ann!"));
    let finished = tokio::time::Instant::now();
    // Retention has no completion signal to wait on; look until the job is
    // gone (bounded).
    let deadline = finished + Duration::from_secs(20) + retention * 2;
    let err = loop {
        match job.status().await {
            Ok(_) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the job never expired"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(err) => break err,
        }
    };
    assert_eq!(err.code(), Some(Code::NotFound), "{err}");
    assert!(err.to_string().contains("retention"), "{err}");
    assert!(
        finished.elapsed() >= retention,
        "expired before its retention: {:?}",
        finished.elapsed()
    );
    // Result does not hang on an expired job; it says the same.
    let err = job
        .result_timeout(Duration::from_secs(5))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::NotFound), "{err}");
    assert!(err.to_string().contains("retention"), "{err}");
    // A job that never existed is plain not found.
    let err = client.job(JobId::new()).status().await.unwrap_err();
    assert_eq!(err.code(), Some(Code::NotFound));
    assert!(!err.to_string().contains("retention"), "{err}");
    server.shutdown().await;
}

/// ListJobs time filters compare what clients are shown, at one precision
/// end to end, stable across a restart: a job shown as submitted at T is
/// after `T - 1ns` and before `T + 1ns`, and "submitted after the newest
/// time I have seen" misses no job, even among a thousand submitted in one
/// batch (each has its own time).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_time_filters_are_exact_and_survive_a_restart() {
    use futures::TryStreamExt as _;
    use jobd_client::ListFilter;

    let dir = tempfile::tempdir().unwrap();
    let store = jobd::StoreConfig::Sqlite {
        dir: dir.path().to_owned(),
    };
    let start = || async {
        let (registry, _fx) = harness::registry();
        let config = jobd::EngineConfig {
            paused: true,
            ..config(64, 2, 10_000)
        };
        TestServer::start_on(registry, config, Duration::from_secs(5), &store).await
    };
    let times = |client: jobd_client::JobClient, filter: ListFilter| async move {
        let mut jobs: Vec<(JobId, std::time::SystemTime)> = client
            .list_all(filter)
            .map_ok(|job| (job.id, job.submitted_at.expect("a submit time")))
            .try_collect()
            .await
            .unwrap();
        jobs.reverse();
        jobs
    };

    let server = start().await;
    let client = server.client().await;
    harness::submit_noops(&client, 1000).await;
    let shown = times(client.clone(), ListFilter::default()).await;
    assert_eq!(shown.len(), 1000);
    assert!(
        shown.windows(2).all(|w| w[0].1 < w[1].1),
        "every job of the batch has its own, increasing, submit time"
    );
    let ns = Duration::from_nanos(1);
    let (id, t) = shown[500];
    let after = times(
        client.clone(),
        ListFilter {
            submitted_after: Some(t - ns),
            ..ListFilter::default()
        },
    )
    .await;
    assert_eq!(
        after.first(),
        Some(&(id, t)),
        "T - 1ns includes the job at T"
    );
    assert_eq!(after.len(), 500);
    let before = times(
        client.clone(),
        ListFilter {
            submitted_before: Some(t + ns),
            ..ListFilter::default()
        },
    )
    .await;
    assert_eq!(
        before.last(),
        Some(&(id, t)),
        "T + 1ns includes the job at T"
    );
    assert_eq!(before.len(), 501);
    let newer = times(
        client.clone(),
        ListFilter {
            submitted_after: Some(t),
            ..ListFilter::default()
        },
    )
    .await;
    assert_eq!(
        newer,
        shown[501..],
        "after the newest time seen: none missed"
    );
    server.shutdown().await;

    // After a restart the same jobs show the same times (read from disk).
    let server = start().await;
    let again = times(server.client().await, ListFilter::default()).await;
    assert_eq!(again, shown);
    server.shutdown().await;
}

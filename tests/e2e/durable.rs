//! Idempotent Submit and retention, on both stores: the same request id never
//! creates a second job, and expired jobs are told apart from unknown ones.

use std::time::{Duration, Instant};

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_jobs_expire_and_say_so() {
    on_both_stores(Duration::from_millis(300), |server| async move {
        let client = server.client().await;
        let job = client.submit("hello", json!("Ann")).await.unwrap();
        assert_eq!(job.result().await.unwrap(), json!("Hello, Ann!"));
        // Retention has no completion signal to wait on; look until the job
        // is gone (bounded).
        let deadline = Instant::now() + Duration::from_secs(20);
        let err = loop {
            match job.status().await {
                Ok(_) => {
                    assert!(Instant::now() < deadline, "the job never expired");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(err) => break err,
            }
        };
        assert_eq!(err.code(), Some(Code::NotFound), "{err}");
        assert!(err.to_string().contains("retention"), "{err}");
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
    })
    .await;
}

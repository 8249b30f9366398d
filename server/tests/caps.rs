//! The per-job and per-call caps of the real `jobd` binary (issue 6): how
//! long one `Result`/`Wait` may block (`--max-wait`, and the client asking
//! again past it), how many may block at once (`--max-waiters`), and how
//! large a result may be (`--max-result-bytes`).

#![allow(
    clippy::disallowed_methods,
    reason = "tests of the real jobd binary keep real time: its clock is the system's"
)]

use std::time::{Duration, Instant};

use jobd_client::{JobClient, ReturnWhen};
use jobd_proto::pb::{self, job_service_client::JobServiceClient};
use jobd_test_support::{JobdProcess, jobd_binary, submit_noop};
use serde_json::json;
use tonic::Code;

fn seconds(seconds: i64) -> Option<prost_types::Duration> {
    Some(prost_types::Duration { seconds, nanos: 0 })
}

#[tokio::test]
async fn a_wait_longer_than_the_cap_is_cut_and_the_client_asks_again() {
    let server = JobdProcess::start(jobd_binary!(), &["--store", "memory", "--max-wait", "1s"]);
    let client = JobClient::connect(server.url()).await.unwrap();
    let job = client.submit("sleep", json!(2.5)).await.unwrap();

    // One raw Result asking for 10 s is cut at the cap.
    let mut raw = JobServiceClient::connect(server.url()).await.unwrap();
    let asked = Instant::now();
    let cut = raw
        .result(pb::ResultRequest {
            job_id: job.id().to_string(),
            timeout: seconds(10),
        })
        .await
        .unwrap_err();
    assert_eq!(cut.code(), Code::DeadlineExceeded, "{cut:?}");
    assert!(cut.message().contains("--max-wait"), "{cut:?}");
    let waited = asked.elapsed();
    assert!(
        (Duration::from_millis(900)..Duration::from_secs(2)).contains(&waited),
        "{waited:?}"
    );
    // So is a Wait: its answer is the split at the cap.
    let split = raw
        .wait(pb::WaitRequest {
            job_ids: vec![job.id().to_string()],
            timeout: seconds(10),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(split.not_done, [job.id().to_string()]);

    // The client library asks again and so waits as long as it was told.
    assert_eq!(
        job.result_timeout(Duration::from_secs(20)).await.unwrap(),
        json!(2.5)
    );
    let later = client.submit("sleep", json!(2.5)).await.unwrap();
    let waited = client
        .wait([later.id()], ReturnWhen::AllCompleted, None)
        .await
        .unwrap();
    assert_eq!(
        waited.done.len(),
        1,
        "Wait with no timeout ends when the job does"
    );
    assert!(waited.not_done.is_empty());

    // Its own shorter timeout still holds, past one cut.
    let long = client.submit("sleep", json!(30)).await.unwrap();
    let asked = Instant::now();
    let timed_out = long.result_timeout(Duration::from_millis(1500)).await;
    assert!(
        matches!(timed_out, Err(jobd_client::Error::Timeout)),
        "{timed_out:?}"
    );
    let waited = asked.elapsed();
    assert!(
        (Duration::from_millis(1400)..Duration::from_millis(2900)).contains(&waited),
        "{waited:?}"
    );
}

#[tokio::test]
async fn waiters_beyond_the_cap_are_refused_at_once_and_others_still_work() {
    let server = JobdProcess::start(
        jobd_binary!(),
        &["--store", "memory", "--paused", "--max-waiters", "2"],
    );
    let mut jobs = JobServiceClient::connect(server.url()).await.unwrap();
    let pending = submit_noop(&mut jobs).await;
    let spawn_waiter = || {
        let (mut jobs, job_id) = (jobs.clone(), pending.clone());
        tokio::spawn(async move {
            jobs.result(pb::ResultRequest {
                job_id,
                timeout: seconds(60),
            })
            .await
        })
    };
    let mut blocked = vec![spawn_waiter(), spawn_waiter()];
    // A zero-timeout Result answers DEADLINE_EXCEEDED while a slot is free,
    // RESOURCE_EXHAUSTED (at once) once both waiters hold theirs. The probe
    // holds a slot for an instant itself, so a waiter arriving meanwhile is
    // refused: it is sent again.
    let probe = |mut jobs: JobServiceClient<tonic::transport::Channel>, job_id: String| async move {
        let asked = Instant::now();
        let code = jobs
            .result(pb::ResultRequest {
                job_id,
                timeout: seconds(0),
            })
            .await
            .unwrap_err()
            .code();
        assert!(asked.elapsed() < Duration::from_secs(2), "answered at once");
        code
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        for waiter in &mut blocked {
            if waiter.is_finished() {
                let refused = (&mut *waiter).await.unwrap().unwrap_err();
                assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
                *waiter = spawn_waiter();
            }
        }
        if probe(jobs.clone(), pending.clone()).await == Code::ResourceExhausted
            && blocked.iter().all(|w| !w.is_finished())
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the waiter cap never took effect"
        );
        tokio::task::yield_now().await;
    }
    let refused = jobs
        .wait(pb::WaitRequest {
            job_ids: vec![pending.clone()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert!(refused.message().contains("--max-waiters"), "{refused:?}");
    // Calls that do not wait are not affected.
    let done = jobs
        .done(pb::DoneRequest {
            job_id: pending.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!done.done);
    // A waiter that leaves gives its slot back.
    blocked[0].abort();
    let deadline = Instant::now() + Duration::from_secs(10);
    while probe(jobs.clone(), pending.clone()).await != Code::DeadlineExceeded {
        assert!(Instant::now() < deadline, "the slot was never given back");
        tokio::task::yield_now().await;
    }
}

#[tokio::test]
async fn a_result_over_the_cap_fails_the_job_as_data() {
    let server = JobdProcess::start(
        jobd_binary!(),
        &["--store", "memory", "--max-result-bytes", "1000"],
    );
    let client = JobClient::connect(server.url()).await.unwrap();
    let small = client.submit("echo", json!("x".repeat(900))).await.unwrap();
    assert_eq!(small.result().await.unwrap(), json!("x".repeat(900)));
    // 1,002 bytes of JSON with the quotes.
    let big = client
        .submit("echo", json!("x".repeat(1000)))
        .await
        .unwrap();
    let outcome = big.outcome(None).await.unwrap();
    assert_eq!(outcome.state, jobd_client::JobState::Failed);
    let (kind, message) = outcome.result.unwrap_err();
    assert_eq!(kind, jobd_client::ErrorKind::ResultTooLarge);
    assert!(
        message.contains("1002 bytes") && message.contains("--max-result-bytes"),
        "{message}"
    );
}

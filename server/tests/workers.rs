//! Remote workers against the real `jobd` binary: what survives a kill -9
//! of jobd, and what a network partition between a worker and jobd does.
//! The worker side is scripted message by message, so each test knows
//! exactly which reports were sent and when.

#![allow(
    clippy::disallowed_methods,
    reason = "tests of the real jobd binary keep real time: its clock is the system's"
)]

use std::time::{Duration, Instant};

use jobd_proto::{
    pb::{self, job_service_client::JobServiceClient},
    value,
};
use jobd_test_support::{
    JobdProcess, free_listen, jobd_binary,
    proxy::CutProxy,
    worker::{RawWorker, attach},
};
use serde_json::json;
use tonic::transport::{Channel, Endpoint};

/// Fast worker timings, so losses show within a test's patience.
const TIMINGS: [&str; 4] = [
    "--worker-heartbeat-interval",
    "200ms",
    "--worker-lease-timeout",
    "2s",
];

async fn channel(url: String) -> Channel {
    Endpoint::from_shared(url)
        .unwrap()
        .connect()
        .await
        .expect("connect")
}

async fn submit(jobs: &mut JobServiceClient<Channel>, function: &str) -> String {
    jobs.submit(pb::SubmitRequest {
        function: function.into(),
        args: Some(value::from_json(json!(1))),
        ..Default::default()
    })
    .await
    .expect("Submit")
    .into_inner()
    .job_id
}

async fn result(jobs: &mut JobServiceClient<Channel>, id: &str) -> pb::ResultResponse {
    jobs.result(pb::ResultRequest {
        job_id: id.to_owned(),
        timeout: Some(prost_types::Duration {
            seconds: 10,
            nanos: 0,
        }),
    })
    .await
    .expect("Result")
    .into_inner()
}

fn held(assignment: &pb::Assignment) -> pb::HeldLease {
    pb::HeldLease {
        job_id: assignment.job_id.clone(),
        attempt: assignment.attempt,
        fencing_token: assignment.fencing_token,
    }
}

/// jobd dies with a worker's job running; the worker re-attaches to the
/// restarted jobd with the job it still holds, and the job runs once: no
/// other worker gets it, and the report made after the restart counts.
#[tokio::test]
async fn a_worker_keeps_its_job_across_a_kill_9_of_jobd() {
    let dir = tempfile::tempdir().unwrap();
    let listen = free_listen();
    let mut jobd = JobdProcess::start_in(jobd_binary!(), dir.path(), &listen, &TIMINGS);
    let mut jobs = JobServiceClient::new(jobd.channel().await);
    let first = attach("survivor", &["render"], 1);
    let mut worker = RawWorker::open(jobd.channel().await, first.clone(), None)
        .await
        .unwrap();
    let id = submit(&mut jobs, "render").await;
    let assignment = worker.assignment().await;
    assert_eq!(assignment.job_id, id);

    jobd.kill9();
    drop(worker);
    let jobd = JobdProcess::start_in(jobd_binary!(), dir.path(), &listen, &TIMINGS);
    // Another worker of the function attaches first: the job is not its.
    let mut other = RawWorker::open(jobd.channel().await, attach("other", &["render"], 1), None)
        .await
        .unwrap();
    let _alive = other.heartbeats(Duration::from_millis(100));
    let mut again = first;
    again.running = vec![held(&assignment)];
    let back = RawWorker::open(jobd.channel().await, again, None)
        .await
        .unwrap();
    let mut back = back;
    assert!(
        back.attached.lost.is_empty(),
        "the restarted jobd took the job away: {:?}",
        back.attached.lost
    );
    back.succeed(&assignment, json!("rendered once")).await;
    assert_eq!(back.ack().await.result(), pb::report_ack::Result::Accepted);
    let nothing = tokio::time::timeout(Duration::from_millis(500), other.next()).await;
    assert!(nothing.is_err(), "the job ran twice: {nothing:?}");

    let mut jobs = JobServiceClient::new(jobd.channel().await);
    let answer = result(&mut jobs, &id).await;
    assert_eq!(answer.state(), pb::JobState::Succeeded);
    assert_eq!(
        answer.value.map(value::to_json),
        Some(json!("rendered once"))
    );
    let job = jobs
        .get_job(pb::GetJobRequest { job_id: id })
        .await
        .unwrap()
        .into_inner()
        .job
        .unwrap();
    assert_eq!(job.attempt, 1, "the job ran more than once");
}

/// A worker cut off from jobd by a partition loses its job once its lease
/// lapses; the job runs again on another worker; when the partition heals,
/// the first worker's report is refused as stale and changes nothing.
#[tokio::test]
async fn a_partitioned_worker_loses_its_job_and_its_late_report_is_refused() {
    let jobd = JobdProcess::start(jobd_binary!(), &TIMINGS);
    let mut jobs = JobServiceClient::new(jobd.channel().await);
    let proxy = CutProxy::start(jobd.addr);
    let first = attach("cut-off", &["render"], 1);
    let mut cut_off = RawWorker::open(channel(proxy.url()).await, first.clone(), None)
        .await
        .unwrap();
    let id = submit(&mut jobs, "render").await;
    let lost = cut_off.assignment().await;
    assert_eq!(lost.job_id, id);

    proxy.partition();
    let cut_at = Instant::now();
    let mut other = RawWorker::open(jobd.channel().await, attach("other", &["render"], 1), None)
        .await
        .unwrap();
    let _alive = other.heartbeats(Duration::from_millis(100));
    let second = other.assignment().await;
    let took = cut_at.elapsed();
    assert_eq!(second.job_id, id);
    assert_eq!(second.attempt, 2);
    assert!(second.fencing_token > lost.fencing_token);
    // Lease 2 s, plus maintenance's second, plus slack for a loaded machine.
    assert!(
        took < Duration::from_secs(2 + 1 + 2),
        "the job came back after {took:?}"
    );

    proxy.heal();
    // jobd ended the cut-off session meanwhile; the worker hears it now.
    let ended = loop {
        match cut_off.next().await {
            Ok(Some(_)) => {}
            other => break other,
        }
    };
    assert!(ended.is_err(), "{ended:?}");
    let mut again = first;
    again.running = vec![held(&lost)];
    let mut back = RawWorker::open(channel(proxy.url()).await, again, None)
        .await
        .unwrap();
    assert_eq!(back.attached.lost, vec![held(&lost)]);
    back.succeed(&lost, json!("late")).await;
    assert_eq!(back.ack().await.result(), pb::report_ack::Result::Stale);

    other.succeed(&second, json!("on time")).await;
    assert_eq!(other.ack().await.result(), pb::report_ack::Result::Accepted);
    let answer = result(&mut jobs, &id).await;
    assert_eq!(answer.value.map(value::to_json), Some(json!("on time")));
}

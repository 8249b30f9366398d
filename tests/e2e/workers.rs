//! The worker protocol from jobd's side, with scripted workers that say
//! exactly what each test needs: assignment and reports, credits, fencing,
//! pushed cancels, lapsed leases, re-attach, routing by worker labels,
//! drain, and every way a worker can break the protocol.

use std::time::{Duration, Instant};

use jobd_client::{ErrorKind, JobClient, JobState, Submission};
use jobd_proto::{
    pb::{self, worker_message::Kind},
    value,
};
use jobd_test_support::worker::{RawWorker, attach};
use serde_json::json;
use tonic::{Code, transport::Channel};

use crate::harness::{TestServer, config, registry};

/// A server whose workers must be heard from every 100 ms and lose their
/// leases after 400 ms of silence.
async fn server() -> TestServer {
    let (registry, _fx) = registry();
    let config = jobd::EngineConfig {
        worker_heartbeat_interval: Duration::from_millis(100),
        worker_lease_timeout: Duration::from_millis(400),
        ..config(64, 2, 1000)
    };
    TestServer::start(registry, config).await
}

async fn channel(server: &TestServer) -> Channel {
    Channel::from_shared(server.url())
        .unwrap()
        .connect()
        .await
        .unwrap()
}

async fn worker(server: &TestServer, attach: pb::Attach) -> RawWorker {
    RawWorker::open(channel(server).await, attach, None)
        .await
        .expect("the worker attaches")
}

fn value_of(assignment: &pb::Assignment) -> serde_json::Value {
    value::option_to_json(assignment.args.clone())
}

#[tokio::test]
async fn a_worker_serves_a_declared_function_end_to_end() {
    let server = server().await;
    let client = server.client().await;
    let mut shout = attach("shouter", &["shout"], 4);
    shout.functions[0].args_schema = Some(value::from_json(json!({"type": "string"})));
    let mut worker = worker(&server, shout).await;
    assert!(!worker.attached.session_id.is_empty());

    // Known to clients, with its schema, served by one worker.
    let functions = client.functions().await.unwrap();
    let info = functions.iter().find(|f| f.name == "shout").unwrap();
    assert_eq!(info.pool, "worker");
    // Submit checks the declared schema.
    let refused = client.submit("shout", json!(5)).await.unwrap_err();
    assert_eq!(refused.code(), Some(Code::InvalidArgument), "{refused}");

    let job = client.submit("shout", json!("hello")).await.unwrap();
    let assignment = worker.assignment().await;
    assert_eq!(assignment.job_id, job.id().to_string());
    assert_eq!(
        (assignment.function.as_str(), assignment.attempt),
        ("shout", 1)
    );
    assert_eq!(value_of(&assignment), json!("hello"));
    worker.succeed(&assignment, json!("HELLO")).await;
    let ack = worker.ack().await;
    assert_eq!(ack.result(), pb::report_ack::Result::Accepted);
    assert_eq!(job.result().await.unwrap(), json!("HELLO"));

    // Listed while attached.
    let workers = client.rpc().list_workers(pb::ListWorkersRequest {}).await;
    let workers = workers.unwrap().into_inner().workers;
    assert_eq!(workers.len(), 1);
    assert_eq!(workers[0].name, "shouter");
    assert_eq!(workers[0].functions, ["shout"]);
    assert_eq!((workers[0].slots, workers[0].busy), (4, 0));
    server.shutdown().await;
}

#[tokio::test]
async fn a_worker_is_given_no_more_jobs_than_its_free_slots() {
    let server = server().await;
    let client = server.client().await;
    let mut worker = worker(&server, attach("two", &["work"], 2)).await;
    let _alive = worker.heartbeats(Duration::from_millis(100));
    let mut jobs = Vec::new();
    for n in 0..5 {
        jobs.push(client.submit("work", json!(n)).await.unwrap());
    }
    let first = worker.assignment().await;
    let second = worker.assignment().await;
    // Two slots, two jobs: nothing more comes until a slot is free again.
    let more = tokio::time::timeout(Duration::from_millis(300), worker.next()).await;
    assert!(more.is_err(), "a third job came without credit: {more:?}");
    worker.succeed(&first, json!("done")).await;
    assert_eq!(
        worker.ack().await.result(),
        pb::report_ack::Result::Accepted
    );
    let still = tokio::time::timeout(Duration::from_millis(300), worker.next()).await;
    assert!(still.is_err(), "a report is not a credit: {still:?}");
    worker.credit(1).await;
    let third = worker.assignment().await;
    assert_ne!(third.job_id, second.job_id);
    // Its jobs go back to the queue rather than hold the drain for its grace.
    drop(worker.close());
    server.shutdown().await;
}

#[tokio::test]
async fn reports_are_fenced_and_a_repeat_is_accepted_again() {
    let server = server().await;
    let client = server.client().await;
    let mut worker = worker(&server, attach("fenced", &["work"], 1)).await;
    let job = client.submit("work", json!(1)).await.unwrap();
    let assignment = worker.assignment().await;

    let mut forged = assignment.clone();
    forged.fencing_token += 1;
    worker.succeed(&forged, json!("forged")).await;
    let ack = worker.ack().await;
    assert_eq!(ack.result(), pb::report_ack::Result::Stale, "{ack:?}");
    assert!(ack.reason.contains("not current"), "{ack:?}");

    worker.succeed(&assignment, json!("real")).await;
    assert_eq!(
        worker.ack().await.result(),
        pb::report_ack::Result::Accepted
    );
    // The same report again (its ack was lost, say): accepted again, and
    // nothing changes.
    worker.succeed(&assignment, json!("again")).await;
    assert_eq!(
        worker.ack().await.result(),
        pb::report_ack::Result::Accepted
    );
    assert_eq!(job.result().await.unwrap(), json!("real"));

    let mut unknown = assignment.clone();
    unknown.job_id = jobd_proto::JobId::new().to_string();
    worker.succeed(&unknown, json!("?")).await;
    assert_eq!(worker.ack().await.result(), pb::report_ack::Result::Stale);
    server.shutdown().await;
}

#[tokio::test]
async fn a_cancel_reaches_the_worker_at_once_and_the_job_ends_cancelled() {
    let server = server().await;
    let client = server.client().await;
    let mut worker = worker(&server, attach("cancellable", &["slow"], 1)).await;
    let job = client.submit("slow", json!(null)).await.unwrap();
    let assignment = worker.assignment().await;
    let asked = Instant::now();
    let report = job.cancel().await.unwrap();
    assert!(
        !report.cancelled,
        "a remote job is asked to stop: {report:?}"
    );
    let cancel = match worker.next().await {
        Ok(Some(pb::server_message::Kind::Cancel(cancel))) => cancel,
        other => panic!("expected a cancel, got {other:?}"),
    };
    let took = asked.elapsed();
    assert!(
        took < Duration::from_millis(100),
        "the cancel took {took:?}"
    );
    assert_eq!(
        (cancel.job_id.as_str(), cancel.fencing_token),
        (assignment.job_id.as_str(), assignment.fencing_token)
    );
    worker
        .send(Kind::CancelAck(pb::CancelAck {
            job_id: cancel.job_id.clone(),
            fencing_token: cancel.fencing_token,
        }))
        .await;
    worker
        .send(Kind::Report(pb::Report {
            job_id: assignment.job_id.clone(),
            fencing_token: assignment.fencing_token,
            outcome: Some(pb::report::Outcome::Failure(pb::WorkerFailure {
                kind: pb::worker_failure::Kind::Cancelled.into(),
                message: String::new(),
            })),
        }))
        .await;
    assert_eq!(
        worker.ack().await.result(),
        pb::report_ack::Result::Accepted
    );
    let outcome = job.outcome(Some(Duration::from_secs(5))).await.unwrap();
    assert_eq!(outcome.state, JobState::Cancelled);
    server.shutdown().await;
}

#[tokio::test]
async fn a_silent_worker_loses_its_job_to_another_and_its_late_report_is_refused() {
    let server = server().await;
    let client = server.client().await;
    let mut silent = worker(&server, attach("silent", &["work"], 1)).await;
    let job = client.submit("work", json!(1)).await.unwrap();
    let first = silent.assignment().await;
    let went_quiet = Instant::now();
    // Another worker of the function is ready; the silent one says nothing
    // more, and jobd ends its session once the lease timeout passes.
    let mut other = worker(&server, attach("other", &["work"], 1)).await;
    let _alive = other.heartbeats(Duration::from_millis(100));
    let ended = silent.next().await.unwrap_err();
    assert_eq!(ended.code(), Code::DeadlineExceeded, "{ended}");
    let second = other.assignment().await;
    let took = went_quiet.elapsed();
    assert_eq!(second.job_id, first.job_id);
    assert_eq!(second.attempt, 2);
    assert!(second.fencing_token > first.fencing_token);
    assert!(
        took < Duration::from_millis(400 + 1000 + 500),
        "the job came back after {took:?} (lease 400 ms)"
    );

    // The first worker comes back, still holding its old lease: jobd says
    // it is lost, and a report under it is refused.
    let mut back = attach("silent", &["work"], 1);
    back.running = vec![pb::HeldLease {
        job_id: first.job_id.clone(),
        attempt: first.attempt,
        fencing_token: first.fencing_token,
    }];
    let mut returned = worker(&server, back).await;
    assert_eq!(returned.attached.lost.len(), 1);
    returned.succeed(&first, json!("late")).await;
    assert_eq!(returned.ack().await.result(), pb::report_ack::Result::Stale);
    other.succeed(&second, json!("on time")).await;
    assert_eq!(other.ack().await.result(), pb::report_ack::Result::Accepted);
    assert_eq!(job.result().await.unwrap(), json!("on time"));
    server.shutdown().await;
}

#[tokio::test]
async fn a_job_not_safe_to_retry_fails_worker_lost_when_its_worker_vanishes() {
    let server = server().await;
    let client = server.client().await;
    let mut once = attach("once", &["charge"], 1);
    once.functions[0].not_safe_to_retry = true;
    let mut worker = worker(&server, once).await;
    let job = client.submit("charge", json!(1)).await.unwrap();
    worker.assignment().await;
    drop(worker.close());
    let outcome = job.outcome(Some(Duration::from_secs(10))).await.unwrap();
    assert_eq!(outcome.state, JobState::Failed);
    assert!(
        matches!(&outcome.result, Err((ErrorKind::WorkerLost, m)) if m.contains("not safe to retry")),
        "{:?}",
        outcome.result
    );
    server.shutdown().await;
}

#[tokio::test]
async fn a_worker_that_reconnects_keeps_its_jobs() {
    let server = server().await;
    let client = server.client().await;
    let first = attach("blinking", &["work"], 1);
    let instance = first.instance.clone();
    let mut worker = worker(&server, first).await;
    let job = client.submit("work", json!(1)).await.unwrap();
    let assignment = worker.assignment().await;
    // The network blinks: the stream is gone, the process carries on.
    drop(worker.close());
    let mut again = attach("blinking", &["work"], 1);
    again.instance = instance;
    again.running = vec![pb::HeldLease {
        job_id: assignment.job_id.clone(),
        attempt: assignment.attempt,
        fencing_token: assignment.fencing_token,
    }];
    let mut worker = self::worker(&server, again).await;
    assert!(worker.attached.lost.is_empty(), "{:?}", worker.attached);
    worker.succeed(&assignment, json!("kept")).await;
    assert_eq!(
        worker.ack().await.result(),
        pb::report_ack::Result::Accepted
    );
    assert_eq!(job.result().await.unwrap(), json!("kept"));
    assert_eq!(job.status().await.unwrap().attempt, 1, "it ran once");
    server.shutdown().await;
}

#[tokio::test]
async fn worker_labels_route_jobs_to_workers_that_carry_them() {
    let server = server().await;
    let client = server.client().await;
    let mut plain = worker(&server, attach("plain", &["render"], 4)).await;
    let mut gpu_attach = attach("gpu", &["render"], 4);
    gpu_attach.labels.insert("gpu".into(), "true".into());
    let mut gpu = worker(&server, gpu_attach).await;
    let _alive = (
        plain.heartbeats(Duration::from_millis(100)),
        gpu.heartbeats(Duration::from_millis(100)),
    );
    let needs_gpu = client
        .submit_with(Submission::new("render", json!("big")).worker_label("gpu", "true"))
        .await
        .unwrap();
    let assignment = gpu.assignment().await;
    assert_eq!(assignment.job_id, needs_gpu.id().to_string());
    let nothing = tokio::time::timeout(Duration::from_millis(300), plain.next()).await;
    assert!(
        nothing.is_err(),
        "a gpu job went to a plain worker: {nothing:?}"
    );
    // Worker labels only mean something for worker functions.
    let refused = client
        .submit_with(Submission::new("hello", json!(null)).worker_label("gpu", "true"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Some(Code::InvalidArgument), "{refused}");
    drop(gpu.close());
    server.shutdown().await;
}

#[tokio::test]
async fn a_shutdown_drains_workers_and_waits_for_their_reports() {
    let server = server().await;
    let client = server.client().await;
    let mut worker = worker(&server, attach("drained", &["work"], 1)).await;
    let job = client.submit("work", json!(1)).await.unwrap();
    let assignment = worker.assignment().await;
    server.begin_shutdown();
    match worker.next().await {
        Ok(Some(pb::server_message::Kind::Drain(drain))) => assert!(drain.grace.is_some()),
        other => panic!("expected a drain, got {other:?}"),
    }
    worker.succeed(&assignment, json!("finished")).await;
    assert_eq!(
        worker.ack().await.result(),
        pb::report_ack::Result::Accepted
    );
    // The listener is closed by now; the engine still answers.
    let record = server.engine.get(job.id()).await.unwrap();
    assert_eq!(record.state, jobd_proto::JobState::Succeeded);
    assert_eq!(record.outcome.unwrap().unwrap(), json!("finished"));
    let ended = loop {
        match worker.next().await {
            Ok(Some(_)) => {}
            other => break other,
        }
    };
    assert!(
        matches!(&ended, Err(status) if status.code() == Code::Unavailable),
        "{ended:?}"
    );
    server.join().await;
}

#[tokio::test]
async fn a_worker_that_leaves_during_the_drain_does_not_hold_it() {
    let (registry, _fx) = registry();
    let config = jobd::EngineConfig {
        worker_heartbeat_interval: Duration::from_millis(100),
        worker_lease_timeout: Duration::from_millis(400),
        ..config(64, 2, 1000)
    };
    // A grace far longer than the test's patience.
    let server = TestServer::start_with_grace(registry, config, Duration::from_secs(600)).await;
    let client = server.client().await;
    let mut worker = worker(&server, attach("leaving", &["work"], 1)).await;
    client.submit("work", json!(1)).await.unwrap();
    worker.assignment().await;
    server.begin_shutdown();
    match worker.next().await {
        Ok(Some(pb::server_message::Kind::Drain(_))) => {}
        other => panic!("expected a drain, got {other:?}"),
    }
    // It goes without reporting: nobody is left to report, so the drain
    // ends now rather than after the grace.
    drop(worker.close());
    tokio::time::timeout(Duration::from_secs(30), server.join())
        .await
        .expect("the drain waited for a worker that had gone");
}

/// Every way a worker can break the protocol gets a clear status, and
/// other sessions carry on.
#[tokio::test]
async fn protocol_errors_end_only_the_session_that_made_them() {
    let server = server().await;
    let client = server.client().await;
    let mut bystander = worker(&server, attach("bystander", &["work"], 1)).await;

    let refusals: Vec<(&str, pb::Attach, Code)> = vec![
        ("no slots", attach("w", &["f"], 0), Code::InvalidArgument),
        (
            "too many slots",
            attach("w", &["f"], 10_001),
            Code::InvalidArgument,
        ),
        ("no functions", attach("w", &[], 1), Code::InvalidArgument),
        (
            "bad name",
            attach("bad name", &["f"], 1),
            Code::InvalidArgument,
        ),
        (
            "bad function name",
            attach("w", &["no spaces"], 1),
            Code::InvalidArgument,
        ),
        (
            "a function twice",
            attach("w", &["f", "f"], 1),
            Code::InvalidArgument,
        ),
        (
            "jobd's own function",
            attach("w", &["hello"], 1),
            Code::FailedPrecondition,
        ),
        (
            "no instance",
            pb::Attach {
                instance: String::new(),
                ..attach("w", &["f"], 1)
            },
            Code::InvalidArgument,
        ),
        (
            "a bad schema",
            {
                let mut bad = attach("w", &["f"], 1);
                bad.functions[0].args_schema = Some(value::from_json(json!({"type": 5})));
                bad
            },
            Code::InvalidArgument,
        ),
        (
            "a bad held lease",
            {
                let mut bad = attach("w", &["f"], 1);
                bad.running = vec![pb::HeldLease {
                    job_id: "not-an-id".into(),
                    ..Default::default()
                }];
                bad
            },
            Code::InvalidArgument,
        ),
        (
            "another contract for a served function",
            {
                let mut other = attach("w", &["work"], 1);
                other.functions[0].not_safe_to_retry = true;
                other
            },
            Code::FailedPrecondition,
        ),
    ];
    for (case, attach, code) in refusals {
        let refused = RawWorker::open(channel(&server).await, attach, None).await;
        match refused {
            Err(status) => assert_eq!(status.code(), code, "{case}: {status}"),
            Ok(_) => panic!("{case}: attached"),
        }
    }

    // Messages out of order or malformed, after a good attach.
    let cases: Vec<(&str, Kind, Code)> = vec![
        (
            "a second attach",
            Kind::Attach(attach("w", &["f"], 1)),
            Code::FailedPrecondition,
        ),
        (
            "a report with a malformed id",
            Kind::Report(pb::Report {
                job_id: "nope".into(),
                fencing_token: 1,
                outcome: Some(pb::report::Outcome::Value(value::from_json(json!(1)))),
            }),
            Code::InvalidArgument,
        ),
        (
            "a report with no outcome",
            Kind::Report(pb::Report {
                job_id: jobd_proto::JobId::new().to_string(),
                fencing_token: 1,
                outcome: None,
            }),
            Code::InvalidArgument,
        ),
    ];
    for (case, kind, code) in cases {
        let mut session = worker(&server, attach("w", &["f"], 1)).await;
        session.send(kind).await;
        let ended = loop {
            match session.next().await {
                Ok(Some(_)) => {}
                other => break other,
            }
        };
        match ended {
            Err(status) => assert_eq!(status.code(), code, "{case}: {status}"),
            other => panic!("{case}: the session went on: {other:?}"),
        }
    }
    // A first message that is not an attach.
    let (tx, outgoing) = tokio::sync::mpsc::channel(1);
    tx.send(pb::WorkerMessage {
        kind: Some(Kind::Heartbeat(pb::Heartbeat {})),
    })
    .await
    .unwrap();
    let status = pb::worker_service_client::WorkerServiceClient::new(channel(&server).await)
        .session(tokio_stream::wrappers::ReceiverStream::new(outgoing))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status}");

    // The bystander was never disturbed.
    let job = client.submit("work", json!(1)).await.unwrap();
    let assignment = bystander.assignment().await;
    bystander.succeed(&assignment, json!("fine")).await;
    assert_eq!(
        bystander.ack().await.result(),
        pb::report_ack::Result::Accepted
    );
    assert_eq!(job.result().await.unwrap(), json!("fine"));
    server.shutdown().await;
}

#[tokio::test]
async fn worker_tokens_attach_workers_and_nothing_else() {
    const CLIENT: &str = "client-token-0123456789";
    const WORKER: &str = "worker-token-0123456789";
    let tokens = jobd::auth::TokenSet::parse(
        "inline",
        &format!("{CLIENT} name=client\n{WORKER} name=worker worker\n"),
    )
    .unwrap();
    let security = jobd::Security {
        tokens: Some(std::sync::Arc::new(tokens)),
        ..Default::default()
    };
    let server = TestServer::start_secure(security).await;
    let channel = channel(&server).await;
    let refused = RawWorker::open(channel.clone(), attach("w", &["f"], 1), Some(CLIENT))
        .await
        .err()
        .expect("a client token cannot attach");
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused}");
    RawWorker::open(channel.clone(), attach("w", &["f"], 1), Some(WORKER))
        .await
        .expect("a worker token attaches");
    {
        let token = WORKER;
        let client = JobClient::connect_with(
            server.url(),
            jobd_client::ConnectOptions::default().bearer_token(token),
        )
        .await
        .unwrap();
        let refused = client.submit("hello", json!(null)).await.unwrap_err();
        assert_eq!(refused.code(), Some(Code::PermissionDenied), "{refused}");
        let refused = client.functions().await.unwrap_err();
        assert_eq!(refused.code(), Some(Code::PermissionDenied), "{refused}");
    }
    server.shutdown().await;
}

#[tokio::test]
async fn a_workers_log_lines_join_the_jobs_log_before_its_report() {
    let server = server().await;
    let client = server.client().await;
    let mut worker = worker(&server, attach("talkative", &["work"], 1)).await;
    let job = client.submit("work", json!(1)).await.unwrap();
    let assignment = worker.assignment().await;
    let log = |token: u64, data: &[u8]| {
        Kind::Log(pb::LogLines {
            job_id: assignment.job_id.clone(),
            fencing_token: token,
            lines: vec![pb::LogLine {
                stream: pb::LogStream::Stderr.into(),
                data: data.to_vec(),
            }],
        })
    };
    worker
        .send(log(assignment.fencing_token, b"warming up\n"))
        .await;
    // Under another lease: dropped, and the session carries on.
    worker
        .send(log(assignment.fencing_token + 7, b"forged\n"))
        .await;
    worker.succeed(&assignment, json!("done")).await;
    assert_eq!(
        worker.ack().await.result(),
        pb::report_ack::Result::Accepted
    );
    assert_eq!(job.result().await.unwrap(), json!("done"));

    let mut rpc = pb::job_service_client::JobServiceClient::new(channel(&server).await);
    let mut pages = rpc
        .logs(pb::LogsRequest {
            job_id: assignment.job_id.clone(),
            offset: 0,
            follow: true,
        })
        .await
        .unwrap()
        .into_inner();
    let mut entries = Vec::new();
    while let Some(page) = pages.message().await.unwrap() {
        entries.extend(page.entries);
    }
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert_eq!(entries[0].data, b"warming up\n");
    assert_eq!(entries[0].stream(), pb::LogStream::Stderr);
    server.shutdown().await;
}

/// jobd restarts after a worker's job failed retryably and before the
/// worker's report was acknowledged; the worker re-attaches (without the
/// finished job, which it no longer runs) and sends the report again: the
/// job's retry budget decides, as it would have without the restart (its
/// first attempt is retried, its last one fails).
#[tokio::test]
async fn a_retryable_failure_sent_again_after_a_restart_keeps_the_retry_budget() {
    let dir = tempfile::tempdir().unwrap();
    let store = jobd::StoreConfig::Sqlite {
        dir: dir.path().to_owned(),
    };
    let start = || async {
        let (registry, _fx) = registry();
        let config = jobd::EngineConfig {
            worker_heartbeat_interval: Duration::from_millis(100),
            worker_lease_timeout: Duration::from_secs(5),
            ..config(64, 2, 1000)
        };
        TestServer::start_on(registry, config, Duration::from_millis(100), &store).await
    };
    let retryable = |assignment: &pb::Assignment| {
        Kind::Report(pb::Report {
            job_id: assignment.job_id.clone(),
            fencing_token: assignment.fencing_token,
            outcome: Some(pb::report::Outcome::Failure(pb::WorkerFailure {
                kind: pb::worker_failure::Kind::Retryable.into(),
                message: "the database blinked".into(),
            })),
        })
    };
    let identity = attach("flaky", &["work"], 1);
    let mut server = start().await;
    let mut before = worker(&server, identity.clone()).await;
    let id = server
        .client()
        .await
        .submit_with(Submission::new("work", json!(1)).max_attempts(2))
        .await
        .unwrap()
        .id();
    for attempt in 1..=2 {
        let assignment = before.assignment().await;
        assert_eq!(
            (assignment.attempt, assignment.job_id.clone()),
            (attempt, id.to_string())
        );
        // The drain's grace passes without a report: the job keeps its
        // lease across the restart.
        server.shutdown().await;
        drop(before);
        server = start().await;
        let again = worker(&server, identity.clone()).await;
        let _alive = again.heartbeats(Duration::from_millis(100));
        let mut again = again;
        again.send(retryable(&assignment)).await;
        assert_eq!(again.ack().await.result(), pb::report_ack::Result::Accepted);
        again.credit(1).await;
        before = again;
    }
    drop(before.close());
    let outcome = server
        .client()
        .await
        .job(id)
        .outcome(Some(Duration::from_secs(10)))
        .await
        .unwrap();
    assert_eq!(outcome.state, JobState::Failed, "{outcome:?}");
    server.shutdown().await;
}

/// A lane that claimed a job for a free slot another lane took meanwhile
/// holds the job while it waits for a slot; once no worker serves the job
/// any more (its only worker drains), the job goes back to pending instead
/// of looking running with nobody to run it.
///
/// With the SQLite store each lane awaits the commit of its claim before it
/// assigns, so two lanes woken by one freed slot both claim, and one of
/// them is left holding its job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_held_for_a_slot_goes_back_when_no_worker_serves_it() {
    let dir = tempfile::tempdir().unwrap();
    let (registry, _fx) = registry();
    let config = jobd::EngineConfig {
        worker_heartbeat_interval: Duration::from_millis(100),
        worker_lease_timeout: Duration::from_millis(400),
        ..config(64, 2, 1000)
    };
    let store = jobd::StoreConfig::Sqlite {
        dir: dir.path().to_owned(),
    };
    let server = TestServer::start_on(registry, config, Duration::from_secs(5), &store).await;
    let client = server.client().await;
    let mut worker = worker(&server, attach("one", &["f", "g", "h"], 1)).await;
    let _alive = worker.heartbeats(Duration::from_millis(100));

    // The one slot is busy; f and g wait for it, each in its own lane.
    let h = client.submit("h", json!(0)).await.unwrap();
    let busy = worker.assignment().await;
    assert_eq!(busy.job_id, h.id().to_string());
    let f = client.submit("f", json!(1)).await.unwrap();
    let g = client.submit("g", json!(2)).await.unwrap();
    worker.succeed(&busy, json!("done")).await;
    assert_eq!(
        worker.ack().await.result(),
        pb::report_ack::Result::Accepted
    );
    // One freed slot wakes both lanes.
    worker.credit(1).await;
    let taken = worker.assignment().await;
    let held = if taken.job_id == f.id().to_string() {
        &g
    } else {
        &f
    };
    let status = held.status().await.unwrap();
    assert_eq!(
        (status.state, status.attempt),
        (JobState::Running, 1),
        "the other lane claimed its job too, and holds it for a slot"
    );

    // Its only worker drains: nobody will take the held job, so it is
    // given back.
    assert!(worker.send(Kind::Draining(pb::Draining {})).await);
    let mut events = client
        .watch(jobd_client::Watch::ids([held.id()]))
        .await
        .unwrap();
    let back = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(event) = tokio_stream::StreamExt::next(&mut events).await {
            if event.unwrap().state == Some(JobState::Pending) {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(back, Ok(true), "the held job did not go back to pending");
    drop(worker.close());
    server.shutdown().await;
}
